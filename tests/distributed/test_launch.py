"""
The tiny recipes launched on two processes, the way a multi-GPU user launches them: `hf-reinforce <script>
--accelerate_config ddp --num_processes 2`. Here the processes run on CPU and talk over gloo: the recipes set
`use_cpu`, which turns the DDP launch into accelerate's MULTI_CPU mode (`accelerate launch --cpu` would start a single
process unless MPI is set up).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_reinforce.cli import make_tiny
from hf_reinforce.scripts import reward


pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes"
LAUNCH_TIMEOUT_SECONDS = 240


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A working directory with outputs/tiny as make-tiny writes it and the reward adapter of the tiny recipe."""
    workdir = tmp_path_factory.mktemp("tiny")
    make_tiny(str(workdir / "outputs" / "tiny"), num_train_pairs=256, seed=0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(workdir)
        recipe = str(RECIPES / "tiny" / "reward" / "config_qlora.yaml")
        reward.main(*reward.make_parser().parse_args_and_config(["--config", recipe]))
    return workdir


def free_port() -> int:
    # Other test runs on the machine may hold accelerate's default port 29500.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_on_two_processes(script: str, workdir: Path, *script_args: str) -> str:
    command = [
        sys.executable, "-m", "hf_reinforce.cli", script,
        "--accelerate_config", "ddp", "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(free_port()),
        "--config", str(RECIPES / "tiny" / script / "config_qlora.yaml"), *script_args,
    ]  # fmt: skip
    # One thread per process: two processes share this machine's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def assert_both_processes_trained(output: str, steps: int) -> None:
    for rank in (1, 2):
        assert f"[process {rank}/2] finished {steps} optimizer steps on cpu:0 (DistributedType.MULTI_CPU)" in output


def single_checkpoint_state(output_dir: Path, steps: int) -> dict:
    # Only the main process writes checkpoints: two ranks must not leave two folders or a half-written one.
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == [f"checkpoint-{steps}"]
    state = json.loads((output_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    return state


def test_reward_recipe_trains_on_two_processes(tiny_workdir):
    output_dir = tiny_workdir / "outputs" / "launch" / "reward"
    output = launch_on_two_processes(
        "reward", tiny_workdir,
        "--max_steps", "10", "--save_strategy", "steps", "--save_steps", "10", "--output_dir", str(output_dir),
    )  # fmt: skip

    assert_both_processes_trained(output, steps=10)
    single_checkpoint_state(output_dir, steps=10)
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_reinforce_recipe_trains_policy_and_critic_on_two_processes(tiny_workdir):
    output_dir = tiny_workdir / "outputs" / "launch" / "reinforce"
    output = launch_on_two_processes(
        "reinforce", tiny_workdir,
        "--max_steps", "4", "--save_steps", "4", "--logging_steps", "1", "--output_dir", str(output_dir),
    )  # fmt: skip

    assert_both_processes_trained(output, steps=4)
    state = single_checkpoint_state(output_dir, steps=4)
    value_losses = [entry["critic/value_loss"] for entry in state["log_history"] if "critic/value_loss" in entry]
    assert len(value_losses) == 4
    assert (output_dir / "adapter_model.safetensors").is_file()
