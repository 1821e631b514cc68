"""
The tiny REINFORCE recipe launched on two CPU processes (gloo) under each engine of recipes/accelerate_configs: DDP
with the critic and the reward model as adapters on the policy's 4-bit base, DeepSpeed ZeRO-2 (the same one-base
layout) and ZeRO-3 and FSDP2 (which shard the base, so the critic is a model of its own). Each run must exit 0, run
the engine its config names, and end with the same policy and critic on both processes (sharded weights are gathered
first). Under ZeRO-3, a critic of its own built from a backbone (not a reward adapter) carries LoRA on the very modules
the policy's targets name, here given as full module names. A greedy two-process DDP run must also end where a
one-process run with the same global batch ends.

The ZeRO runs need DeepSpeed (in the `dev` and `deepspeed` extras) and are skipped without it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

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

from hf_reinforce.engines import engine_that_ran
from hf_reinforce.scripts import reinforce


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


def launch(workdir: Path, config: str, output_dir: Path, *flags: str) -> str:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate_configs" / f"{config}.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        *script_flags(output_dir, *flags),
    ]  # fmt: skip
    return run(command, workdir)


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
