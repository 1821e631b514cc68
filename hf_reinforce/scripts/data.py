"""Dataset loading shared by the training scripts: a Hub dataset, a local data file, or a folder of data files."""

import codecs
import re
from collections import defaultdict
from pathlib import Path

from datasets import DatasetDict, IterableDatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError


# The `datasets` builder that reads each kind of local data file.
BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Sharded exports name their files `train-00000-of-00004.parquet`; every shard belongs to the split `train`.
SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
TEXT_BUILDERS = ("json", "csv")
READ_CHUNK_BYTES = 1 << 20


def check_text_file(path: Path) -> None:
    """Refuse an empty file, or one that is not UTF-8, naming the file and the line of the first bad byte (the
    readers would fail with a bare StopIteration or UnicodeDecodeError, or read the bytes as other characters)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, has_text = 1, False
    with open(path, "rb") as file:
        while chunk := file.read(READ_CHUNK_BYTES):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                bad_line = line + chunk[: error.start].count(b"\n")
                raise ValueError(
                    f"{path} is not UTF-8 text (byte {error.object[error.start : error.start + 1]!r} on line "
                    f"{bad_line}); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`."
                ) from None
            line += chunk.count(b"\n")
            has_text = has_text or bool(text.strip())
    if not has_text:
        raise ValueError(f"{path} is empty; give it at least one row, or remove it from the dataset folder.")


def local_data_files(path: Path, train_split: str) -> tuple[str, dict[str, list[str]]]:
    """
    Return the `datasets` builder and the split → files mapping for a local data file or folder.

    A single file becomes the split `train_split`. In a folder, each file's name (without extension and shard suffix)
    is its split, so `train.jsonl` + `test.jsonl` give the splits `train` and `test`.
    """
    files = [path] if path.is_file() else sorted(child for child in path.iterdir() if child.is_file())
    data_files = [file for file in files if file.suffix in BUILDER_BY_SUFFIX]
    if not data_files:
        raise ValueError(
            f"No data file found at {path}: expected a file or a folder of files ending in "
            f"{', '.join(BUILDER_BY_SUFFIX)}."
        )
    builders = {BUILDER_BY_SUFFIX[file.suffix] for file in data_files}
    if len(builders) > 1:
        raise ValueError(f"{path} mixes data formats ({', '.join(sorted(builders))}); keep one format per folder.")

    if path.is_file():
        return builders.pop(), {train_split: [str(path)]}
    files_by_split = defaultdict(list)
    for file in data_files:
        files_by_split[SHARD_SUFFIX.sub("", file.stem)].append(str(file))
    return builders.pop(), dict(files_by_split)


def load_script_dataset(script_args) -> DatasetDict | IterableDatasetDict:
    """
    Load `script_args.dataset_name`: a local data file or folder when that path exists, otherwise a Hub dataset.

    `script_args` is a [`trl.ScriptArguments`]; `dataset_config` applies to Hub datasets only.
    """
    path = Path(script_args.dataset_name).expanduser()
    if path.exists():
        builder, data_files = local_data_files(path, script_args.dataset_train_split)
        if builder in TEXT_BUILDERS:
            for files in data_files.values():
                for file in files:
                    check_text_file(Path(file))
        try:
            dataset = load_dataset(builder, data_files=data_files, streaming=script_args.dataset_streaming)
        except DatasetGenerationError as error:
            cause = error.__cause__ or error.__context__
            raise ValueError(
                f"{path} could not be read as {builder}: {cause or error}. Fix the file (each .jsonl line is one JSON "
                "object; a .json file is a list of objects or one object per line)."
            ) from error
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"{script_args.dataset_name} has no split {script_args.dataset_train_split!r} (it has "
            f"{', '.join(dataset)}); set `dataset_train_split` to one of them."
        )
    return dataset


def eval_split(dataset: DatasetDict | IterableDatasetDict, script_args, training_args):
    """The evaluation split when the trainer evaluates (`eval_strategy` other than "no"), else None."""
    if training_args.eval_strategy == "no":
        return None
    if script_args.dataset_test_split not in dataset:
        raise ValueError(
            f"Evaluating needs the split {script_args.dataset_test_split!r}, which {script_args.dataset_name} lacks "
            f"(it has {', '.join(dataset)}); set `dataset_test_split` to one of them or `eval_strategy` to 'no'."
        )
    return dataset[script_args.dataset_test_split]
