"""What both configs share: defaults that TRL's configs leave to values that fail or warn on a CPU-only machine, and
the fields the training scripts read."""

from dataclasses import field

import torch
from transformers.utils import is_torch_bf16_gpu_available


def resolve_device_defaults(config) -> None:
    """Fill in `bf16` from the device when the user left it unset, move TRL's `gradient_checkpointing` default to its
    transformers 5 name, and pin data-loader memory only where there is an accelerator to copy to.

    TRL turns an unset `bf16` into True, which a CPU-only machine refuses ("Your setup doesn't support bf16/gpu"), and
    sets `gradient_checkpointing`, which transformers 5 renamed `activation_checkpointing` and warns about on every
    config; pinned memory without an accelerator is a warning per data loader. Run before the parent's `__post_init__`.
    """
    on_accelerator = not config.use_cpu and torch.accelerator.is_available()
    if config.bf16 is None and not config.fp16:
        config.bf16 = on_accelerator and is_torch_bf16_gpu_available()
    if not on_accelerator:
        config.dataloader_pin_memory = False
    if config.activation_checkpointing is None and config.gradient_checkpointing is not None:
        config.activation_checkpointing, config.gradient_checkpointing = config.gradient_checkpointing, None


# The two fields the training scripts read in both configs, with one wording.
def resume_from_checkpoint_field():
    return field(
        default=None,
        metadata={
            "help": "Resume the training scripts from a checkpoint: a checkpoint folder, `true` for the newest "
            "complete checkpoint in output_dir (an error when there is none), or `auto` for the same or a fresh start "
            "when there is none. A checkpoint cut off while being written (a killed run) is never resumed from."
        },
    )


def overwrite_output_dir_field():
    return field(
        default=False,
        metadata={
            "help": "Let the training scripts write into an output_dir that already holds a saved model, replacing "
            "it. Without it they refuse such a folder (resuming with --resume_from_checkpoint is always allowed)."
        },
    )
