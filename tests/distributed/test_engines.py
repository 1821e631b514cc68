"""
The tiny REINFORCE recipe launched on two CPU processes (gloo) under each engine of recipes/accelerate_configs: DDP
with the critic and the reward model as adapters on the policy's 4-bit base, DeepSpeed ZeRO-2 (the same one-base
layout) and ZeRO-3 and FSDP2 (which shard the base, so the critic is a model of its own). Each run must exit 0, run
the engine its config names, and end with the same policy and critic on both processes (sharded weights are gathered
first). Under ZeRO-3, a critic of its own built from a backbone (not a reward adapter) carries LoRA on the very modules
the policy's targets name, here given as full module names. A greedy two-process DDP run must also end where a
one-process run with the same global batch ends.

Under DDP (shared-base critic), ZeRO-2, ZeRO-3 (critic of its own) and FSDP2 (4-bit stored as float32), a run killed
with -9 in the step after its first checkpoint (the launcher and both training processes) and resumed with
`--resume_from_checkpoint true` must end with the uninterrupted run's weights and last checkpoint.

The ZeRO runs need DeepSpeed (in the `dev` and `deepspeed` extras) and are skipped without it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from hf_reinforce.checkpoints import checkpoint_folders, newest_complete_checkpoint
from hf_reinforce.cli import make_tiny
from hf_reinforce.scripts import reward


pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "reinforce" / "config_qlora.yaml"
LAUNCH_TIMEOUT_SECONDS = 600
STEPS = 3
# The REINFORCE script, plus a dump of what each process holds at the end: the engine that ran, whether the policy's
# weights were sharded, and the trainable weights of the policy and the critic (gathered where the engine shards them).
DUMPING_SCRIPT = """
import json
import sys

import torch
from safetensors.torch import save_file

from hf_reinforce import ReinforceTrainer
from hf_reinforce.engines import engine_that_ran
from hf_reinforce.scripts import reinforce

training_steps_here = 0


def counted(training_step):
    def training_step_counted(*args, **kwargs):
        global training_steps_here
        training_steps_here += 1
        return training_step(*args, **kwargs)

    return training_step_counted


ReinforceTrainer.training_step = counted(ReinforceTrainer.training_step)


def whole(parameter):
    if hasattr(parameter, "full_tensor"):  # FSDP2's DTensor shard
        return parameter.full_tensor()
    if hasattr(parameter, "ds_id"):  # a ZeRO-3 partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.detach().clone()
    return parameter.detach()


def is_sharded(parameter):
    if hasattr(parameter, "full_tensor"):
        return parameter.to_local().numel() < parameter.numel()
    return hasattr(parameter, "ds_id") and parameter.ds_tensor.numel() < parameter.ds_numel


def lora_modules(model, adapter_name):
    # the modules holding LoRA weights of `adapter_name`, named from their decoder layer on (`layers.0.mlp.up_proj`)
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    return sorted(name[name.index("layers."):] for name in names)


def dump_then_finish(trainer, training_args, dataset_name, saved_what):
    critic = trainer.critic.model
    critic_ids = {id(p) for p in critic.trainable_parameters()}
    policy = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad and id(p) not in critic_ids]
    critic_state = enumerate(critic.trainable_parameters())
    state = {f"policy.{n}": whole(p).float().contiguous().cpu() for n, p in policy}
    state.update({f"critic.{i}": whole(p).float().contiguous().cpu() for i, p in critic_state})
    rank = trainer.accelerator.process_index
    save_file(state, f"{training_args.output_dir}/rank{rank}.safetensors")
    report = {
        "engine": engine_that_ran(trainer.accelerator),
        "policy_sharded": any(is_sharded(p) for p in trainer.model.parameters()),
        "critic_shares_base": critic.adapter_name is not None,
        "steps": trainer.state.global_step,
        "policy_lora": lora_modules(trainer.model, "default"),
        "critic_lora": lora_modules(critic.backbone, critic.adapter_name or "default"),
        "training_steps_here": training_steps_here,
    }
    with open(f"{training_args.output_dir}/rank{rank}.json", "w") as file:
        json.dump(report, file)
    finish(trainer, training_args, dataset_name, saved_what)


finish, reinforce.save_and_finish = reinforce.save_and_finish, dump_then_finish
reinforce.main(*reinforce.make_parser().parse_args_and_config(sys.argv[1:]))
"""
# Rollouts that cannot differ between the runs: greedy, one per prompt, all of the same length.
GREEDY = ("--num_generations", "1", "--generation_kwargs", '{"do_sample": false, "min_new_tokens": 12}')
# The tiny policy's attention queries and values, as full module names (they do not exist on the critic's bare decoder)
FULL_NAMES = tuple(f"model.layers.{layer}.self_attn.{name}_proj" for layer in range(2) for name in "qv")
OWN_CRITIC_FROM_POLICY = ("--load_in_4bit", "false", "--critic_shares_base", "false", "--value_model_name_or_path",
                          "outputs/tiny/tiny-llama")  # fmt: skip
# (accelerate config, flags): the recipe as it stands (its critic shares the policy's base where the engine allows it),
# with a critic of its own, with full-precision weights, or with 4-bit weights stored as FSDP shards them.
ENGINE_RUNS = {
    "ddp": ("ddp", ()),
    "ddp_own_critic": ("ddp", ("--critic_shares_base", "false")),
    "zero2": ("zero2", ()),
    "zero2_own_critic": ("zero2", ("--critic_shares_base", "false")),
    "zero3": ("zero3", ("--load_in_4bit", "false")),
    # a critic of its own from the policy's backbone (not the reward adapter), with the policy's targets mapped onto it
    "zero3_own_critic_full_names": ("zero3", (*OWN_CRITIC_FROM_POLICY, "--lora_target_modules", *FULL_NAMES)),
    "fsdp2": ("fsdp2", ("--load_in_4bit", "false")),
    "fsdp2_qlora": ("fsdp2", ("--bnb_4bit_quant_storage", "float32")),
}
# What each engine must report: its name, whether it shards the policy, whether the critic is an adapter on the base.
EXPECTED = {
    "ddp": ("MULTI_CPU", None, False, True),
    "ddp_own_critic": ("MULTI_CPU", None, False, False),
    "zero2": ("DEEPSPEED", "zero2", False, True),
    "zero2_own_critic": ("DEEPSPEED", "zero2", False, False),
    "zero3": ("DEEPSPEED", "zero3", True, False),
    "zero3_own_critic_full_names": ("DEEPSPEED", "zero3", True, False),
    "fsdp2": ("FSDP", "fsdp2", True, False),
    "fsdp2_qlora": ("FSDP", "fsdp2", True, False),
}


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """outputs/tiny as make-tiny writes it, the tiny recipe's reward adapter, and the dumping script."""
    workdir = tmp_path_factory.mktemp("engines")
    make_tiny(str(workdir / "outputs" / "tiny"), num_train_pairs=256, seed=0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(workdir)
        recipe = str(ROOT / "recipes" / "tiny" / "reward" / "config_qlora.yaml")
        reward.main(*reward.make_parser().parse_args_and_config(["--config", recipe, "--max_steps", "10"]))
    (workdir / "dumping_reinforce.py").write_text(DUMPING_SCRIPT)
    return workdir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], workdir: Path) -> str:
    # One thread per process: two processes share this machine's two cores. DeepSpeed finds no GPU and runs on CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def script_flags(output_dir: Path, *flags: str) -> list[str]:
    return [
        "dumping_reinforce.py", "--config", str(RECIPE), "--max_steps", str(STEPS), "--save_strategy", "no",
        "--logging_steps", "1", "--output_dir", str(output_dir), *flags,
    ]  # fmt: skip


def launch_command(config: str, output_dir: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate_configs" / f"{config}.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        *script_flags(output_dir, *flags),
    ]  # fmt: skip


def launch(workdir: Path, config: str, output_dir: Path, *flags: str) -> str:
    return run(launch_command(config, output_dir, *flags), workdir)


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


def needs_deepspeed(engine: str):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason='ZeRO needs DeepSpeed: pip install -e ".[deepspeed]"')


@pytest.mark.parametrize("engine", list(ENGINE_RUNS))
def test_engine_runs_and_ranks_agree(tiny_workdir, engine):
    needs_deepspeed(engine)
    config, flags = ENGINE_RUNS[engine]
    output_dir = tiny_workdir / "outputs" / "engines" / engine
    output = launch(tiny_workdir, config, output_dir, *flags)

    distributed_type, engine_name, sharded, shares_base = EXPECTED[engine]
    for rank in (1, 2):
        assert f"[process {rank}/2] finished {STEPS} optimizer steps" in output
        assert f"(DistributedType.{distributed_type})" in output
    reports = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        policy_lora, critic_lora = report.pop("policy_lora"), report.pop("critic_lora")
        assert report.pop("training_steps_here") == STEPS
        assert policy_lora and critic_lora
        if engine == "zero3_own_critic_full_names":
            assert critic_lora == policy_lora == [name.removeprefix("model.") for name in FULL_NAMES]
        assert report == {
            "engine": engine_name, "policy_sharded": sharded, "critic_shares_base": shares_base, "steps": STEPS,
        }  # fmt: skip
    states = [load_file(output_dir / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert any(key.startswith("critic.") for key in states[0]) and any(key.startswith("policy.") for key in states[0])
    assert max_difference(*states) <= 1e-6
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_two_process_ddp_matches_one_process(tiny_workdir):
    """16 prompts of one length per step either way: two processes of 8 rows, or one process of 8 rows with two steps
    of gradient accumulation, so the critic's chunks hold the same rows. The policy takes SGD steps: Adam turns the
    rounding differences of a gradient entry near zero into a full step of either sign. The runs then agree to the
    rounding of the same sums taken in another order."""
    prompts = tiny_workdir / "outputs" / "tiny" / "prompts"
    same_length = tiny_workdir / "outputs" / "parity" / "prompts"
    same_length.mkdir(parents=True)
    rows = [row for row in (prompts / "train.jsonl").read_text().splitlines() if len(json.loads(row)["prompt"]) == 6]
    (same_length / "train.jsonl").write_text("\n".join(rows) + "\n")
    flags = (*GREEDY, "--dataset_name", str(same_length), "--optim", "sgd", "--learning_rate", "0.05")
    one_dir, two_dir = (tiny_workdir / "outputs" / "parity" / name for name in ("one", "two"))
    run([sys.executable, *script_flags(one_dir, *flags, "--per_device_train_batch_size", "8",
                                       "--gradient_accumulation_steps", "2")], tiny_workdir)  # fmt: skip
    launch(tiny_workdir, "ddp", two_dir, *flags, "--per_device_train_batch_size", "8")

    one, two = load_file(one_dir / "rank0.safetensors"), load_file(two_dir / "rank0.safetensors")
    assert max(one[key].abs().max().item() for key in one if "lora_B" in key) > 1e-3  # the adapters trained
    assert max_difference(one, two) <= 1e-4


# ---- killed with -9 mid-run and resumed, under each engine ----
# (accelerate config, flags): a critic adapter on the policy's 4-bit base under DDP and ZeRO-2, a critic of its own
# under ZeRO-3 (full precision) and FSDP2 (4-bit weights stored as FSDP shards them).
KILLED_RUNS = {
    "ddp_shared_critic": ("ddp", ()),
    "zero2": ("zero2", ()),
    "zero3_own_critic": ("zero3", ("--load_in_4bit", "false")),
    "fsdp2_qlora": ("fsdp2", ("--bnb_4bit_quant_storage", "float32")),
}
KILL_STEPS, KILL_SAVE_STEPS = 4, 2
CHECKPOINTED = ("--max_steps", str(KILL_STEPS), "--save_strategy", "steps", "--save_steps", str(KILL_SAVE_STEPS))
# What a checkpoint holds besides the state a resumed run must reproduce: the random states (a resumed run restores
# them) and DeepSpeed's copy of its config.
NOT_COMPARED = ("rng_state",)


def flat_tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples, named by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    tensors = {}
    for key, item in items:
        tensors.update(flat_tensors(item, f"{prefix}.{key}" if prefix else str(key)))
    return tensors


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, whatever the engine wrote: safetensors, torch pickles (optimizer, scheduler,
    DeepSpeed's partitions) and FSDP's distributed-checkpoint folders, named by file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tensors = {}
    for path in sorted(checkpoint.rglob("*")):
        name = str(path.relative_to(checkpoint))
        if path.name.startswith(NOT_COMPARED):
            continue
        if path.suffix == ".safetensors":
            found = load_file(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            found = flat_tensors(torch.load(path, map_location="cpu", weights_only=False))
        elif path.is_dir() and any(path.glob("*.distcp")):
            scratch.mkdir(parents=True, exist_ok=True)
            converted = scratch / f"{name.replace('/', '_')}.pt"
            dcp_to_torch_save(path, converted)
            found = flat_tensors(torch.load(converted, map_location="cpu", weights_only=False))
        else:
            continue
        tensors.update({f"{name}:{key}": tensor for key, tensor in found.items()})
    return tensors


def launch_and_kill_after_first_checkpoint(workdir: Path, config: str, output_dir: Path, *flags: str) -> None:
    """Launch the run, wait for its first complete checkpoint, then SIGKILL every process of the launch at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = launch_command(config, output_dir, *flags)
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_SECONDS
    while newest_complete_checkpoint(output_dir) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # The launcher starts each training process in a session of its own: kill them all, as a lost machine would
    launched = psutil.Process(process.pid).children(recursive=True)
    for each in launched:
        each.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(launched, timeout=60)
    assert not alive and process.wait() == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("cell", list(KILLED_RUNS))
def test_a_run_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_workdir, tmp_path, cell):
    """The policy, the critic and every optimizer's state at the end of the resumed run, on both processes and in
    its last checkpoint, equal the uninterrupted run's (the one-process tests' tolerance)."""
    needs_deepspeed(cell)
    config, flags = KILLED_RUNS[cell]
    straight, killed = (tiny_workdir / "outputs" / "killed" / cell / name for name in ("straight", "killed"))
    launch(tiny_workdir, config, straight, *flags, *CHECKPOINTED)
    launch_and_kill_after_first_checkpoint(tiny_workdir, config, killed, *flags, *CHECKPOINTED)
    assert [folder.name for folder in checkpoint_folders(killed)][0] == f"checkpoint-{KILL_SAVE_STEPS}"
    assert not (killed / "adapter_model.safetensors").exists()

    launch(tiny_workdir, config, killed, *flags, *CHECKPOINTED, "--resume_from_checkpoint", "true")
    weight_differences = []
    for rank in (0, 1):
        resumed_report = json.loads((killed / f"rank{rank}.json").read_text())
        assert resumed_report["steps"] == KILL_STEPS and resumed_report["training_steps_here"] < KILL_STEPS
        expected, found = (load_file(folder / f"rank{rank}.safetensors") for folder in (straight, killed))
        weight_differences.append(max_difference(expected, found))
    assert max(weight_differences) <= 1e-5
    last = f"checkpoint-{KILL_STEPS}"
    expected, found = (checkpoint_tensors(folder / last, tmp_path / name) for name, folder in
                       (("straight", straight), ("killed", killed)))  # fmt: skip
    assert any("optimizer" in name or "optim_states" in name for name in expected)
    assert any(name.startswith("critic_optimizer.pt") for name in expected)
    assert expected.keys() == found.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=0, atol=1e-5, msg=name)
    differences = [(found[name].double() - tensor.double()).abs().max().item() for name, tensor in expected.items()
                   if tensor.numel()]  # fmt: skip
    weights = len(load_file(straight / "rank0.safetensors"))
    print(f"{cell}: {weights} weights per process, max difference {max(weight_differences):.3g}; "
          f"{len(expected)} checkpoint tensors, max difference {max(differences):.3g}")  # fmt: skip
