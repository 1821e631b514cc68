"""The `hf-reinforce` command: help texts, dispatch in-process or through `accelerate launch`, and make-tiny."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
from trl import ScriptArguments

from hf_reinforce import cli
from hf_reinforce.scripts import load_script_dataset, reward


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY_REWARD_RECIPE = RECIPES / "tiny" / "reward" / "config_qlora.yaml"
TINY_REINFORCE_RECIPE = RECIPES / "tiny" / "reinforce" / "config_qlora.yaml"


def help_text(capsys, argv: list[str]) -> str:
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", cli.CACHED_HELP_COMMANDS)
def test_shipped_help_matches_the_parser(command):
    shipped = (cli.CACHED_HELP_DIR / f"{command}.txt").read_text()
    assert shipped == cli.render_help(command), (
        f"The shipped --help of `hf-reinforce {command}` is out of date; regenerate it with "
        '`python -c "from hf_reinforce.cli import write_cached_help; write_cached_help()"`.'
    )


@pytest.mark.parametrize("argv", [["--help"], ["reinforce", "--help"], ["reward", "-h"], ["demo", "--help"]])
def test_help_needs_neither_torch_nor_trl(argv):
    """Importing TRL takes seconds: help is answered from the package alone."""
    code = (
        "import sys\nfrom hf_reinforce import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'trl'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]"), result.stdout[-300:]


def test_help_lists_every_command_and_example_commands(capsys):
    text = help_text(capsys, ["--help"])
    for command in ("reward", "reinforce", "demo", "make-tiny"):
        assert f"\n    {command}" in text
    assert "hf-reinforce make-tiny --output_dir outputs/tiny" in text
    assert "hf-reinforce reinforce --accelerate_config ddp --num_processes 4" in text


def test_no_command_prints_the_help(capsys):
    assert cli.main([]) == 0
    assert "usage: hf-reinforce" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "own_flag"), [("reward", "--lora_task_type"), ("reinforce", "--reward_model_name_or_path")]
)
def test_training_command_help_shows_the_script_its_flags_and_how_to_launch(capsys, command, own_flag):
    text = help_text(capsys, [command, "--help"])
    assert text.startswith(f"usage: hf-reinforce {command}")
    assert f"python -m hf_reinforce.scripts.{command} --config recipes/qwen2.5-0.5b/{command}" in text
    assert own_flag in text
    assert "--accelerate_config NAME_OR_PATH" in text
    assert "ddp, fsdp2, single_gpu, zero2, zero3" in text


def test_make_tiny_help(capsys):
    assert "--output_dir" in help_text(capsys, ["make-tiny", "--help"])


def test_an_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2


def test_without_accelerate_config_the_script_runs_in_process_with_recipe_and_flags_merged(monkeypatch):
    received = []
    monkeypatch.setattr(reward, "main", lambda *args: received.append(args))

    assert cli.main(["reward", "--config", str(TINY_REWARD_RECIPE), "--learning_rate", "0.5"]) == 0

    ((script_args, training_args, model_args),) = received
    assert script_args.dataset_name == "outputs/tiny/preferences"  # from the recipe
    assert training_args.learning_rate == 0.5  # the flag wins over the recipe's 2e-3
    assert model_args.load_in_4bit and model_args.lora_task_type == "SEQ_CLS"


@pytest.fixture
def launched(monkeypatch):
    """The commands the CLI would run, instead of running them."""
    commands = []

    def record(command):
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode=0)

    monkeypatch.setattr(cli.subprocess, "run", record)
    return commands


def test_accelerate_config_launches_the_script_module_with_launch_flags_apart(launched):
    argv = ["--accelerate_config", "ddp", "--config", str(TINY_REINFORCE_RECIPE), "--num_processes", "2",
            "--max_steps", "2", "--main_process_port", "29555"]  # fmt: skip
    assert cli.main(["reinforce", *argv]) == 0

    assert launched == [
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(cli.ACCELERATE_CONFIGS_DIR / "ddp.yaml"),
            "--num_processes", "2", "--main_process_port", "29555",
            "-m", "hf_reinforce.scripts.reinforce",
            "--config", str(TINY_REINFORCE_RECIPE), "--max_steps", "2",
        ]
    ]  # fmt: skip


def test_accelerate_config_may_be_a_file(launched, tmp_path):
    config_file = tmp_path / "my_cluster.yaml"
    config_file.write_text("distributed_type: MULTI_GPU\n")
    cli.main(["reward", f"--accelerate_config={config_file}", "--config", str(TINY_REWARD_RECIPE)])
    assert launched[0][3:5] == ["--config_file", str(config_file)]


def test_an_unknown_accelerate_config_names_the_shipped_ones(launched):
    with pytest.raises(SystemExit, match="ddp, fsdp2, single_gpu, zero2, zero3"):
        cli.main(["reward", "--accelerate_config", "dpp", "--config", str(TINY_REWARD_RECIPE)])
    assert launched == []


def test_a_bad_flag_value_fails_before_any_process_starts(launched):
    with pytest.raises(SystemExit):
        cli.main(
            ["reinforce", "--accelerate_config", "ddp", "--config", str(TINY_REINFORCE_RECIPE), "--baseline", "x"]
        )
    assert launched == []


def test_launch_returns_the_exit_code_of_accelerate(monkeypatch):
    monkeypatch.setattr(cli.subprocess, "run", lambda command: subprocess.CompletedProcess(command, returncode=3))
    assert cli.main(["reward", "--accelerate_config", "ddp", "--config", str(TINY_REWARD_RECIPE)]) == 3


def test_demo_dispatches_to_the_demo_script_with_its_arguments(monkeypatch):
    received = []
    fake_demo = types.ModuleType("hf_reinforce.examples.demo")
    fake_demo.main = lambda: received.append(list(sys.argv))
    monkeypatch.setitem(sys.modules, "hf_reinforce.examples.demo", fake_demo)
    monkeypatch.setattr(sys, "argv", ["hf-reinforce"])

    assert cli.main(["demo", "--output_dir", "outputs/demo"]) == 0
    assert received == [["hf-reinforce demo", "--output_dir", "outputs/demo"]]


def test_make_tiny_writes_models_and_datasets_the_scripts_load(tmp_path, capsys):
    output_dir = tmp_path / "tiny"
    assert cli.main(["make-tiny", "--output_dir", str(output_dir), "--num_train_pairs", "8"]) == 0
    assert f"prompts: {output_dir / 'prompts'}" in capsys.readouterr().out

    for model in ("tiny-llama", "tiny-llama-reward"):
        assert (output_dir / model / "config.json").is_file()
        assert (output_dir / model / "tokenizer.json").is_file()
    preferences = load_script_dataset(ScriptArguments(dataset_name=str(output_dir / "preferences")))
    assert {split: rows.num_rows for split, rows in preferences.items()} == {"train": 8, "test": 2}
    assert preferences["train"].column_names == ["prompt", "chosen", "rejected"]
    prompts = load_script_dataset(ScriptArguments(dataset_name=str(output_dir / "prompts")))
    assert prompts["train"]["prompt"] == preferences["train"]["prompt"]
    assert prompts["train"].column_names == ["prompt"]


@pytest.mark.parametrize("script", ["reward", "reinforce"])
def test_scripts_run_as_modules(script):
    # `accelerate launch -m hf_reinforce.scripts.<script>` runs exactly this entry point on every process.
    result = subprocess.run(
        [sys.executable, "-m", f"hf_reinforce.scripts.{script}", "--help"], capture_output=True, text=True, check=True
    )
    assert f"python -m hf_reinforce.scripts.{script} --config" in result.stdout


def test_a_missing_local_model_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"model_name_or_path='outputs/tiny/tiny-llama': no such file.*make-tiny"
    ):
        cli.main(["reward", "--config", str(TINY_REWARD_RECIPE)])


def test_a_mistyped_flag_with_an_accelerate_config_gets_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli.main(["make-tiny", "--output_dir", "outputs/tiny"])
    argv = ["reward", "--config", str(TINY_REWARD_RECIPE), "--accelerate_config", "ddp", "--lerning_rate", "1e-3"]
    with pytest.raises(
        SystemExit,
        match="--lerning_rate: neither the reward script nor `accelerate launch` has this "
        "flag. Did you mean --learning_rate?",
    ):
        cli.main(argv)
