"""
Training scripts, each runnable as `python -m hf_reinforce.scripts.<name>` or
`accelerate launch -m hf_reinforce.scripts.<name>`, and through the `hf-reinforce` CLI.

This module holds what both scripts share: dataset loading (a Hub dataset, a local data file, or a folder of data
files), CPU threads, model loading arguments, and the end of a run.
"""

import argparse
import codecs
import gc
import os
import re
from collections import defaultdict
from pathlib import Path

from datasets import DatasetDict, IterableDatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from trl import TrlParser, get_peft_config, get_quantization_config

from hf_reinforce.checkpoints import check_output_dir
from hf_reinforce.checks import check_local_path
from hf_reinforce.engines import check_engine_engaged, check_quantization_for_engine


# The `datasets` builder that reads each kind of local data file.
BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Sharded exports name their files `train-00000-of-00004.parquet`; every shard belongs to the split `train`.
SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
TEXT_BUILDERS = ("json", "csv")
READ_CHUNK_BYTES = 1 << 20


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of a script's description (its example commands) and shows every flag's default."""


def cpu_threads_per_process() -> int:
    """`OMP_NUM_THREADS` when set, else the cores this process may use (shared among the launched processes) less
    one, at least one.

    PyTorch's default, one thread per core in every process, oversubscribes a machine that runs anything else: each
    operation's threads then wait for the slowest of them, and a step can take ten times as long.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // processes - 1)


def set_cpu_threads() -> int:
    import torch

    threads = cpu_threads_per_process()
    torch.set_num_threads(threads)
    return threads


def model_init_kwargs(model_args, training_args) -> dict:
    """
    `from_pretrained` keyword arguments taken from the [`trl.ModelConfig`] flags, updated with the training config's
    own `model_init_kwargs` (which therefore win).
    """
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def report_process(trainer) -> None:
    """
    Print one line from every process (the trainer's own logs come from the main process only), so the output of a
    multi-process run shows that each rank took part and how far it got.
    """
    state = trainer.accelerator.state
    print(
        f"[process {state.process_index + 1}/{state.num_processes}] finished {trainer.state.global_step} optimizer "
        f"steps on {state.device} ({state.distributed_type})",
        flush=True,
    )


def save_and_finish(trainer, training_args, dataset_name: str | None, saved_what: str) -> None:
    """The end both scripts share: report every process, save, push when asked, then release the process group.

    A run that took no optimizer step saves nothing: an untrained model would replace whatever output_dir held.
    """
    report_process(trainer)
    if trainer.state.global_step == 0:
        release_process_group(trainer)
        raise RuntimeError(
            f"The run took no optimizer step, so nothing was saved to {training_args.output_dir}. Check that the "
            "training data has at least one batch and that max_steps or num_train_epochs is positive."
        )
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"{saved_what} saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    release_process_group(trainer)


def release_process_group(trainer) -> None:
    """Destroy the process group only after every DistributedDataParallel wrapper or DeepSpeed engine is gone (FSDP2
    shards the model in place and leaves no wrapper).

    Why: a wrapper that outlives the group is freed at interpreter exit, and its reducer's destructor then waits on
    gloo threads whose peers have already left, so a finished run never exits.
    """
    if trainer.accelerator.num_processes > 1:
        trainer.model_wrapped = trainer.model
        trainer.deepspeed = None  # a DeepSpeed engine holds its own reducer and communication buffers
        trainer.accelerator._models.clear()
        trainer.accelerator.deepspeed_engine_wrapped = None
        gc.collect()
        trainer.accelerator.wait_for_everyone()
    trainer.end()


def prepare_run(script_args, training_args, model_args, local_paths: tuple[str, ...] = ()):
    """What both scripts do before any model loads: refuse a missing local model folder, 4-bit weights the launched
    engine cannot shard, a missing local path among the script arguments named in `local_paths` and an output folder
    that holds an earlier result; set the CPU threads and the model loading arguments. Returns the loaded dataset."""
    check_local_path(model_args.model_name_or_path, "model_name_or_path")
    check_quantization_for_engine(model_args)
    for name in local_paths:
        check_local_path(getattr(script_args, name), name)
    check_output_dir(training_args)
    set_cpu_threads()
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    return load_script_dataset(script_args)


def trainer_inputs(dataset, script_args, training_args, model_args) -> dict:
    """The trainer arguments both scripts take from the flags: the base model, the splits, quantization and LoRA."""
    return {
        "model": model_args.model_name_or_path,
        "args": training_args,
        "train_dataset": dataset[script_args.dataset_train_split],
        "eval_dataset": eval_split(dataset, script_args, training_args),
        "quantization_config": get_quantization_config(model_args),
        "peft_config": get_peft_config(model_args),
    }


def train(trainer, training_args) -> None:
    """Check that the launch's engine (DeepSpeed, FSDP) took hold, then train, resuming when asked."""
    check_engine_engaged(trainer.accelerator)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)


def run_script(make_parser, main) -> None:
    """A script's `__main__`: its flags (and recipe) from the command line, then its `main`."""
    main(*make_parser().parse_args_and_config())


def make_script_parser(dataclass_types: tuple, description: str, prog: str | None = None) -> TrlParser:
    return TrlParser(
        dataclass_types,
        prog=prog,
        # The help lists every flag below; the generated usage line would list them all a second time.
        usage="%(prog)s [--config RECIPE.yaml] [--FLAG VALUE ...]",
        description=description,
        formatter_class=HelpFormatter,
    )


# ---- datasets ----
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
