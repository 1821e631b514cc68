"""Keeping bitsandbytes 4-bit layers trainable on CPU."""

from torch import nn


def keep_4bit_layers_differentiable(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a `Linear4bit` that runs once in eval mode without gradients repacks its weight into
    an inference-only layout for good; from then on its matmul has no backward, so the gradients of every adapter
    below it are silently wrong. An evaluation pass, or a critic's value pass, between training steps triggers it.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
