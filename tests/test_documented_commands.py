"""
Every shell command in README.md, docs/ and the recipe READMEs, taken from their ```bash blocks, either runs word for
word (offline, on the tiny models, in a fresh folder per document, in the document's order, with `.venv` activated as
the README says) or, where it needs a GPU or the Hub's models, is parsed by the script it launches. Commands that
another test already runs, or that take many minutes, are listed with the reason. A new documented command that no
rule covers fails the fast test below, so it gets a rule (and a run) when it is written.
"""

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "recipes").glob("**/README.md")],
    key=lambda path: str(path),
)
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
COMMAND_TIMEOUT_SECONDS = 600

# (pattern, reason): commands this test does not run, and why. Each reason names where else the command is checked.
NOT_RUN_HERE = (
    (r"^make (install|test|test-slow|lint)\b", "the CI script runs it on a fresh clone"),
    (r"^make demo\b|^hf-reinforce demo\b", "tests/test_demo.py runs it and checks the figures docs/demo.md quotes"),
    (r"^make real-demo\b|^hf-reinforce real-demo\b", "30 minutes; tests/test_real_model.py runs its recipes"),
    (r"^hf-reinforce make-smollm2\b", "tests/test_real_model.py builds the model the same way"),
    (r"^pip install\b", "the CI script installs the package"),
    (r"^\.venv/bin/pytest\b", "the CI script runs the test suite"),
    (r"^tensorboard\b", "a viewer"),
    (r"^python benchmarks/", "a benchmark of many minutes; its `--help` is run instead"),
    (r"^accelerate launch .*benchmarks/soak\.py", "half an hour; tests/test_soak.py runs the soak for 12 steps"),
)
# Launches that need CUDA (a single-GPU or multi-GPU accelerate config, or more processes than this machine's test
# runs), the Hub's models and datasets (the recipes of real models), or tens of minutes of CPU (the SmolLM2 recipes,
# which tests/test_real_model.py runs for two steps each): parsed, not run.
PARSED_ONLY = (
    r"single_gpu\.yaml",
    r"--num_processes ([3-9]|\d\d)",
    r"recipes/(qwen|llama|smollm2)[^ ]*/",
)
SCRIPT_MODULES = {"reward": "hf_reinforce.scripts.reward", "reinforce": "hf_reinforce.scripts.reinforce"}


@dataclass
class DocumentedCommand:
    document: Path
    text: str

    def __str__(self) -> str:
        return f"{self.document.relative_to(ROOT)}: {self.text}"


def documented_commands(document: Path) -> list[DocumentedCommand]:
    commands = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", document.read_text(), re.DOTALL):
        if language not in SHELL_LANGUAGES:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            text = re.sub(r"\s+#.*$", "", line).strip()
            if text and not text.startswith("#"):
                commands.append(DocumentedCommand(document, " ".join(text.split())))
    return commands


def reason_not_run(command: DocumentedCommand) -> str | None:
    return next((reason for pattern, reason in NOT_RUN_HERE if re.search(pattern, command.text)), None)


def is_parsed_only(command: DocumentedCommand) -> bool:
    launches_training = re.search(
        r"hf_reinforce\.scripts\.(reward|reinforce)\b|hf-reinforce (reward|reinforce)\b", command.text
    )
    return bool(launches_training) and any(re.search(pattern, command.text) for pattern in PARSED_ONLY)


def script_and_arguments(command: DocumentedCommand) -> tuple[str, list[str]]:
    """The training script a launch runs, and its own arguments (those after the module or subcommand)."""
    words = shlex.split(command.text)
    if "-m" in words:
        module = words[words.index("-m") + 1]
        name = next(name for name, path in SCRIPT_MODULES.items() if path == module)
        return name, words[words.index("-m") + 2 :]
    name = next(word for word in words if word in SCRIPT_MODULES)
    arguments = words[words.index(name) + 1 :]
    launcher_flags = ("--accelerate_config", "--num_processes", "--main_process_port", "--mixed_precision")
    for flag in launcher_flags:  # `hf-reinforce <script>` passes these to accelerate, not to the script
        if flag in arguments:
            position = arguments.index(flag)
            del arguments[position : position + 2]
    return name, arguments


def check_parses(command: DocumentedCommand) -> None:
    import importlib

    name, arguments = script_and_arguments(command)
    config_file = re.search(r"--config_file (\S+)", command.text)
    if config_file:
        assert (ROOT / config_file.group(1)).is_file(), f"{command}: no accelerate config {config_file.group(1)}"
    parser = importlib.import_module(SCRIPT_MODULES[name]).make_parser()
    # bf16 (the GPU recipes' setting) is refused without a bf16-capable GPU unless the run is told it is on CPU
    parser.parse_args_and_config([*arguments, "--use_cpu", "true"])


def all_commands() -> list[DocumentedCommand]:
    return [command for document in DOCUMENTS for command in documented_commands(document)]


def test_every_documented_command_is_run_parsed_or_excused():
    runnable = [c for c in all_commands() if reason_not_run(c) is None and not is_parsed_only(c)]
    unknown_programs = [
        str(c)
        for c in runnable
        if not re.match(r"^(hf-reinforce|python -m hf_reinforce\.|accelerate launch|source \.venv)", c.text)
    ]
    assert unknown_programs == [], "give these commands a rule in this file"
    for command in all_commands():
        if is_parsed_only(command) and reason_not_run(command) is None:
            check_parses(command)


def run_in_shell(command: str, workdir: Path) -> subprocess.CompletedProcess:
    # The README's set-up: `.venv` activated in the shell; one CPU thread per process on this shared machine.
    script = f"set -e\nexport HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1\nsource .venv/bin/activate\n{command}\n"
    return subprocess.run(
        ["bash", "-c", script], cwd=workdir, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
    )


def documents_with_commands() -> list[Path]:
    return [document for document in DOCUMENTS if documented_commands(document)]


@pytest.mark.slow
@pytest.mark.parametrize("document", documents_with_commands(), ids=lambda path: str(path.relative_to(ROOT)))
def test_documented_commands_run_as_written(document, tmp_path):
    for name in ("recipes", "benchmarks", ".venv"):  # a fresh folder that looks like the repository root
        (tmp_path / name).symlink_to(ROOT / name)
    for command in documented_commands(document):
        if reason_not_run(command) is not None:
            if command.text.startswith("python benchmarks/"):
                result = run_in_shell(f"python {command.text.split()[1]} --help", tmp_path)
                assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
            continue
        if is_parsed_only(command):
            check_parses(command)
            continue
        result = run_in_shell(command.text, tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
