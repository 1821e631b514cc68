"""Keeping bitsandbytes 4-bit layers trainable on CPU."""

import torch
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


def cast_trainable_parameters_to_activation_dtype(model: nn.Module) -> None:
    """Undo TRL's bf16 cast of a quantized model's trainable parameters when its activations are not bf16.

    TRL casts LoRA (and a reward head) to bf16 for QLoRA, but bitsandbytes layers compute in `bnb_4bit_compute_dtype`
    and return their input's dtype, so the hidden states keep the dtype of the unquantized embeddings. With fp32
    embeddings a bf16 reward head fails with "expected m1 and m2 to have the same dtype", and a bf16 LoRA adapter
    rounds every optimizer update to 8 bits of mantissa and runs its products in bf16, which CPUs without native bf16
    compute several times slower than fp32.
    """
    activation_dtype = model.get_input_embeddings().weight.dtype
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.to(activation_dtype)
