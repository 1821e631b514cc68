"""What the trainers need to know about the engine `accelerate launch` started: DDP, DeepSpeed ZeRO-2/3 or FSDP2.

The policy is the engine's model. The critic and the reward model are not: where the engine leaves the policy's base
whole on every process (DDP, ZeRO-2) they sit on it as adapters; where it shards the base (ZeRO-3, FSDP2) they are
models of their own, loaded whole and replicated on every process (frozen for the reward model; the critic averages
its own gradients, see `Critic`), so that no forward of theirs runs on weights the engine has sharded.
"""

import contextlib
import os

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers.utils import logging

from .placement import POLICY_BASE, engine_shards, plan_placement


logger = logging.get_logger(__name__)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_engine() -> str | None:
    """The engine the `accelerate launch` config asked for ("zero2", "zero3", "fsdp2", "fsdp1"), None for DDP or no
    launch. Read from the launcher's environment, so it is known before any accelerator exists."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return None


def engine_shards_base() -> bool:
    """Whether the launched engine shards the policy's parameters over the processes (ZeRO-3, FSDP)."""
    return engine_shards(launched_engine())


def engine_that_ran(accelerator) -> str | None:
    """The engine the accelerator actually runs, named as `launched_engine` names them."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{state.deepspeed_plugin.zero_stage}"
    if state.distributed_type == DistributedType.FSDP:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    return None


def check_engine_engaged(accelerator) -> None:
    """Refuse a run whose engine silently did not start: a config asking for DeepSpeed or FSDP that ended as plain
    data parallelism would hold every weight on every device and run out of memory, or train the wrong thing."""
    launched, ran = launched_engine(), engine_that_ran(accelerator)
    if launched != ran:
        raise RuntimeError(
            f"The accelerate config asks for {launched or 'DDP'}, but the processes run "
            f"{ran or accelerator.distributed_type}. Check the config's distributed_type and that the engine is "
            'installed (`pip install -e ".[deepspeed]"`).'
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"{world_size} processes were launched but the accelerator sees {accelerator.num_processes}: each would "
            "train alone. Launch with the config's process count and without --cpu."
        )


def engage_fsdp_on_cpu(trainer) -> None:
    """Switch a trainer's accelerator from DDP to FSDP on CPU processes (gloo) when the launch asked for FSDP.

    Why: accelerate engages FSDP only when its processes sit on accelerator devices, and on CPU falls back to DDP
    without a word; FSDP2 itself shards over gloo. Without this, an FSDP config on CPU (the test machines) trains as
    DDP. Call before the trainer prepares its model (`train`).
    """
    state = trainer.accelerator.state
    if not _env_flag("ACCELERATE_USE_FSDP") or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class EngineMixin:
    """Both trainers: an FSDP launch on CPU processes runs FSDP (see `engage_fsdp_on_cpu`)."""

    # accelerate starts FSDP on accelerator devices only; FSDP launches on CPU processes get it here, before any
    # model is prepared, rather than running as DDP.
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        engage_fsdp_on_cpu(self)


@contextlib.contextmanager
def outside_zero3_init():
    """Load models whole even under ZeRO-3, whose `from_pretrained` otherwise partitions every model it loads: a
    reward model or critic outside the engine would then run on empty shards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def reward_sharing(reward_shares_base: bool | None) -> bool | None:
    """`reward_shares_base` as the launched engine allows it: never on a base that ZeRO-3 or FSDP shards (the rule of
    `placement.plan_placement`, which refuses True there)."""
    plan = plan_placement(policy_is_peft=True, reward_shares_base=reward_shares_base, engine=launched_engine())
    return reward_shares_base if plan.reward.base == POLICY_BASE else False


def check_dequantize_for_engine(dequantize_for_inference: bool, plan=None) -> None:
    """Refuse dequantize_for_inference on a base the engine shards (`plan`'s engine, else the launched one)."""
    base_is_sharded = plan.base_is_sharded if plan is not None else engine_shards_base()
    if dequantize_for_inference and base_is_sharded:
        raise ValueError(
            "dequantize_for_inference needs each process to hold whole 4-bit weights, but DeepSpeed ZeRO-3 or "
            "FSDP shards them; set `dequantize_for_inference: false` with these engines."
        )


def load_models_whole_on_every_process() -> None:
    """Turn off FSDP's RAM-efficient loading for the REINFORCE script.

    Why: it loads the weights on the first process only and leaves the others on the meta device until the engine
    copies them into the policy's shards; the reference, the reward model and the critic are loaded outside that copy,
    and every process but the first would fail with "Cannot copy out of meta tensor".
    """
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        logger.warning("fsdp_cpu_ram_efficient_loading is turned off: every process loads the models whole.")
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def check_quantization_for_engine(model_args) -> None:
    """Refuse 4-bit weights that FSDP cannot shard: bitsandbytes packs them into uint8 unless `bnb_4bit_quant_storage`
    names a float dtype, and FSDP2 then leaves every 4-bit weight whole on every process (accelerate excludes them)."""
    engine = launched_engine()
    if engine is None or not engine.startswith("fsdp") or not model_args.load_in_4bit:
        return
    storage, dtype = model_args.bnb_4bit_quant_storage, model_args.dtype
    wanted = dtype if dtype in FLOAT_DTYPES else "bfloat16"
    if storage != wanted:
        raise ValueError(
            f"bnb_4bit_quant_storage={storage!r} with {engine}: FSDP shards 4-bit weights only when they are stored "
            f"in the compute dtype (dtype={dtype!r}); add `--bnb_4bit_quant_storage {wanted}`."
        )
