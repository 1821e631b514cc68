"""Defaults that TRL's configs leave to values that fail or warn on a CPU-only machine, shared by both configs."""

from transformers.utils import is_torch_bf16_gpu_available


def resolve_device_defaults(config) -> None:
    """Fill in `bf16` from the device when the user left it unset, and move TRL's `gradient_checkpointing` default to
    its transformers 5 name.

    TRL turns an unset `bf16` into True, which a CPU-only machine refuses ("Your setup doesn't support bf16/gpu"), and
    sets `gradient_checkpointing`, which transformers 5 renamed `activation_checkpointing` and warns about on every
    config. Run before the parent's `__post_init__`.
    """
    if config.bf16 is None and not config.fp16:
        config.bf16 = not config.use_cpu and is_torch_bf16_gpu_available()
    if config.activation_checkpointing is None and config.gradient_checkpointing is not None:
        config.activation_checkpointing, config.gradient_checkpointing = config.gradient_checkpointing, None
