"""Kill a run anywhere (`kill -9` during a step, while each file of a checkpoint is written, right after one) and
resume it: the resumed run ends where an uninterrupted one does, from the newest *complete* checkpoint.

The killed run is a forked child of the test process, which has the models' modules imported already; the moment of
the kill is set by wrapping the function that writes the file (the file is left cut in half, as a kill in the middle
of the write leaves it) or by a trainer callback.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, TrainerCallback

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from hf_reinforce.checkpoints import (
    incomplete_checkpoint_reason,
    newest_complete_checkpoint,
    resolve_resume_from_checkpoint,
    run_id,
    write_run_id,
)
from hf_reinforce.cli import make_tiny
from hf_reinforce.scripts import reinforce
from hf_reinforce.testing import make_preference_dataset, save_tiny_models


PROMPTS = Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8})
PAIRS = make_preference_dataset(32, seed=5)
MAX_STEPS, SAVE_STEPS = 4, 2
KILL_TIMEOUT_SECONDS = 300
TINY_REINFORCE_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "reinforce" / "config_qlora.yaml"
# The runs: a critic adapter on the policy's 4-bit base; a critic of its own (what several processes need), on a
# 4-bit and on a full-precision base; and a reward model.
RUNS = ("shared_critic", "own_critic_4bit", "own_critic_fp32", "reward")
# When the run dies: while writing each file of the second checkpoint (the first is complete), in the middle of a
# training step (between backward and optimizer step), and right after the first checkpoint is written.
FILE_MOMENTS = (
    "adapter_model.safetensors",
    "optimizer.pt",
    "critic_state.safetensors",
    "scheduler.pt",
    "trainer_state.json",
)
MOMENTS = ("training_step", *FILE_MOMENTS, "after_checkpoint")


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


def lora(task_type: str) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=task_type)


def build_trainer(run: str, output_dir: Path, tiny_paths: dict, callbacks=None):
    common = {"output_dir": str(output_dir), "bf16": False, "report_to": "none", "disable_tqdm": True}
    common.update(max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, logging_steps=1)
    if run == "reward":
        args = RewardConfig(**common, per_device_train_batch_size=4, learning_rate=1e-3, gradient_checkpointing=False)
        return RewardTrainer(
            model=tiny_paths["reward_model"],
            args=args,
            train_dataset=PAIRS,
            peft_config=lora("SEQ_CLS"),
            callbacks=callbacks,
        )
    args = ReinforceConfig(
        **common,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-3,
        beta=0.01,
        critic_shares_base=run == "shared_critic",
    )
    quantized = run != "own_critic_fp32"
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if quantized else None
    return ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=count_a,
        args=args,
        train_dataset=PROMPTS,
        quantization_config=quantization_config,
        peft_config=lora("CAUSAL_LM"),
        callbacks=callbacks,
    )


def trained_state(trainer) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the run: the policy's (or reward model's) and the critic's."""
    state = {f"model.{n}": p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    value_model = getattr(trainer, "value_model", None)
    if value_model is not None:
        state.update({f"critic.{n}": t.float().clone() for n, t in value_model.trainable_state_dict().items()})
    return state


def adapters(trainer) -> list[str]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return sorted(model.peft_config) if isinstance(model, PeftModel) else []


class KillAt(TrainerCallback):
    """SIGKILL this process in the middle of a training step or right after a checkpoint, at a given step."""

    def __init__(self, event: str, step: int):
        self.event, self.step = event, step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.event == "training_step" and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **kwargs):
        if self.event == "after_checkpoint" and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_while_writing(file_name: str, checkpoint: str) -> None:
    """Make the writers SIGKILL this process once they have written half of `file_name` in `checkpoint`."""
    import peft.peft_model
    import transformers.modeling_utils
    import transformers.trainer_callback

    import hf_reinforce.critic

    def cut_and_kill(path) -> None:
        path = Path(path)
        if path.name == file_name and path.parent.name == checkpoint:
            os.truncate(path, path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def wrapped(write):
        def write_then_maybe_kill(obj, path, *args, **kwargs):
            write(obj, path, *args, **kwargs)
            cut_and_kill(path)

        return write_then_maybe_kill

    torch.save = wrapped(torch.save)
    for module in (peft.peft_model, transformers.modeling_utils):
        module.safe_save_file = wrapped(module.safe_save_file)
    hf_reinforce.critic.save_file = wrapped(hf_reinforce.critic.save_file)
    state_class = transformers.trainer_callback.TrainerState
    state_class.save_to_json = wrapped(state_class.save_to_json)


def _train_until_killed(run: str, output_dir: Path, tiny_paths: dict, moment: str, checkpoint_step: int) -> None:
    torch.set_num_threads(1)
    if moment in FILE_MOMENTS:
        kill_while_writing(moment, f"checkpoint-{checkpoint_step}")
        callbacks = None
    else:
        callbacks = [KillAt(moment, checkpoint_step)]
    build_trainer(run, output_dir, tiny_paths, callbacks).train()
    os._exit(3)  # the run was meant to die: the test sees this exit code as a failure


def train_and_kill(run: str, output_dir: Path, tiny_paths: dict, moment: str, checkpoint_step: int) -> None:
    child = multiprocessing.get_context("fork").Process(
        target=_train_until_killed, args=(run, output_dir, tiny_paths, moment, checkpoint_step)
    )
    child.start()
    child.join(KILL_TIMEOUT_SECONDS)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL, f"the run was to be killed at {moment}, but exited with {child.exitcode}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_paths, tmp_path_factory):
    """The parameters and adapters each run ends with when nothing stops it, computed once per run."""
    results = {}

    def result(run: str):
        if run not in results:
            trainer = build_trainer(run, tmp_path_factory.mktemp(f"straight-{run}"), tiny_paths)
            trainer.train()
            results[run] = trained_state(trainer), adapters(trainer)
        return results[run]

    return result


def assert_resumes_like_an_uninterrupted_run(run, output_dir, tiny_paths, uninterrupted, resume="true") -> None:
    trainer = build_trainer(run, output_dir, tiny_paths)
    trainer.train(resume_from_checkpoint=resume)
    expected_state, expected_adapters = uninterrupted(run)
    assert adapters(trainer) == expected_adapters  # no stray adapter from a sub-folder of the checkpoint
    resumed = trained_state(trainer)
    assert resumed.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert trainer.state.global_step == MAX_STEPS


CASES = [(run, moment) for run in RUNS for moment in MOMENTS if not (run == "reward" and "critic" in moment)]


@pytest.mark.slow
@pytest.mark.parametrize("run, moment", CASES, ids=[f"{run}-{moment}" for run, moment in CASES])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, tiny_paths, uninterrupted, run, moment):
    output_dir = tmp_path / "run"
    # Files die in the second checkpoint's write; a step or the moment after a save, around the first checkpoint
    train_and_kill(run, output_dir, tiny_paths, moment, SAVE_STEPS * 2 if moment in FILE_MOMENTS else SAVE_STEPS)
    assert newest_complete_checkpoint(output_dir) == output_dir / f"checkpoint-{SAVE_STEPS}"
    assert_resumes_like_an_uninterrupted_run(run, output_dir, tiny_paths, uninterrupted)


@pytest.mark.parametrize("run", ["own_critic_fp32", "reward"])
def test_a_checkpoint_cut_off_while_written_is_never_resumed_from(tmp_path, tiny_paths, uninterrupted, run):
    output_dir = tmp_path / "run"
    train_and_kill(run, output_dir, tiny_paths, "optimizer.pt", SAVE_STEPS * 2)
    assert (output_dir / f"checkpoint-{SAVE_STEPS * 2}").is_dir()
    with pytest.raises(ValueError, match=r"checkpoint-4.* is an incomplete checkpoint: it has no trainer_state.json"):
        build_trainer(run, output_dir, tiny_paths).train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))
    assert_resumes_like_an_uninterrupted_run(run, output_dir, tiny_paths, uninterrupted)


def test_with_no_complete_checkpoint_true_is_refused_and_auto_starts_afresh(tmp_path, tiny_paths, uninterrupted):
    output_dir = tmp_path / "run"
    train_and_kill("own_critic_fp32", output_dir, tiny_paths, "trainer_state.json", SAVE_STEPS)
    json_text = (output_dir / "checkpoint-2" / "trainer_state.json").read_text()
    with pytest.raises(ValueError):
        json.loads(json_text)  # cut off in the middle
    message = r"holds only incomplete ones \(checkpoint-2, cut off.*--resume_from_checkpoint auto"
    with pytest.raises(ValueError, match=message):
        resolve_resume_from_checkpoint(True, output_dir)
    assert_resumes_like_an_uninterrupted_run("own_critic_fp32", output_dir, tiny_paths, uninterrupted, "auto")


def test_an_overwritten_folder_never_resumes_the_earlier_run(tmp_path, tiny_paths):
    """A fresh run over an earlier run's folder: the earlier run's later checkpoints stay on disk, but `true` resumes
    the newest checkpoint of the new run, never one of the old."""
    output_dir = tmp_path / "run"
    build_trainer("own_critic_fp32", output_dir, tiny_paths).train()  # checkpoints 2 and 4
    first_run = run_id(output_dir)
    assert run_id(output_dir / "checkpoint-4") == first_run
    trainer = build_trainer("own_critic_fp32", output_dir, tiny_paths)
    trainer.args.max_steps = SAVE_STEPS  # the new run stops after its first checkpoint, as if killed there
    trainer.train()
    assert run_id(output_dir) != first_run and run_id(output_dir / "checkpoint-2") == run_id(output_dir)
    assert (output_dir / "checkpoint-4").is_dir() and run_id(output_dir / "checkpoint-4") == first_run
    assert resolve_resume_from_checkpoint(True, output_dir) == str(output_dir / "checkpoint-2")
    resumed = build_trainer("own_critic_fp32", output_dir, tiny_paths)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == MAX_STEPS and run_id(output_dir / "checkpoint-4") == run_id(output_dir)


def test_a_checkpoint_of_the_last_step_is_refused_rather_than_trained_past(tmp_path, tiny_paths):
    """Killed after its last checkpoint, before its final save: resuming would take a step past `max_steps`."""
    output_dir = tmp_path / "run"
    build_trainer("own_critic_fp32", output_dir, tiny_paths).train()  # checkpoints 2 and 4 = MAX_STEPS
    with pytest.raises(ValueError, match=f"checkpoint-{MAX_STEPS} is at step {MAX_STEPS}.*max_steps={MAX_STEPS}"):
        build_trainer("own_critic_fp32", output_dir, tiny_paths).train(resume_from_checkpoint=True)
    longer = build_trainer("own_critic_fp32", output_dir, tiny_paths)
    longer.args.max_steps = MAX_STEPS + 1
    longer.train(resume_from_checkpoint=True)
    assert longer.state.global_step == MAX_STEPS + 1


def test_a_checkpoint_of_several_processes_is_complete_only_with_every_random_state(tmp_path):
    """Each process writes its random state on its own, after the first process may already have written the trainer
    state: the folder reads as complete only once every process's file is there."""
    checkpoint = tmp_path / "checkpoint-2"
    write_run_id(checkpoint, "run", processes=2)
    write_run_id(tmp_path, "run")
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "rng_state_0.pth").write_bytes(b"state")
    assert "rng_state_1.pth" in incomplete_checkpoint_reason(checkpoint)
    assert newest_complete_checkpoint(tmp_path) is None
    (checkpoint / "rng_state_1.pth").write_bytes(b"state")
    assert incomplete_checkpoint_reason(checkpoint) is None and newest_complete_checkpoint(tmp_path) == checkpoint


# ---- the script, killed from outside ----
def script_args(workdir: Path, output_dir: Path, *extra: str) -> list[str]:
    tiny = workdir / "outputs" / "tiny"
    return [
        "--config", str(TINY_REINFORCE_RECIPE), "--model_name_or_path", str(tiny / "tiny-llama"),
        "--reward_model_name_or_path", str(tiny / "tiny-llama-reward"), "--dataset_name", str(tiny / "prompts"),
        "--load_in_4bit", "false", "--critic_shares_base", "false", "--per_device_train_batch_size", "8",
        "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def saved_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run saved as its result (policy adapter, critic), checkpoints left out."""
    tensors = {}
    for path in sorted(output_dir.rglob("*.safetensors")):
        relative = path.relative_to(output_dir)
        if not relative.parts[0].startswith("checkpoint-"):
            tensors.update({f"{relative}:{name}": tensor for name, tensor in load_file(path).items()})
    return tensors


@pytest.mark.slow
def test_the_script_killed_from_outside_resumes_with_resume_from_checkpoint_true(tmp_path):
    make_tiny(str(tmp_path / "outputs" / "tiny"), num_train_pairs=16, seed=0)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reinforce.main(*reinforce.make_parser().parse_args_and_config(script_args(tmp_path, straight)))

    command = [sys.executable, "-m", "hf_reinforce.scripts.reinforce", *script_args(tmp_path, killed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while newest_complete_checkpoint(killed) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # somewhere after the first checkpoint: a step, or the next checkpoint
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()

    resumed = script_args(tmp_path, killed, "--resume_from_checkpoint", "true")
    reinforce.main(*reinforce.make_parser().parse_args_and_config(resumed))
    expected, found = saved_tensors(straight), saved_tensors(killed)
    assert found.keys() == expected.keys() and any(name.startswith("value_model") for name in found)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=0, atol=1e-5, msg=name)
