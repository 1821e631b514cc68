"""The CPU speed paths: replaced `forward`s and a `generate` helper that make QLoRA training and sampling faster on
CPUs.

Each module changes how fast a result is computed, never the result, up to float rounding:

- `sampling`: the next token drawn by inverse transform (`InverseCdfSampler`) and the LM head of a decoding step in
  cache-sized blocks (`lm_head_in_blocks`).
- `dequantized`: 4-bit weights kept dequantised, adapters merged in, for the passes without gradients
  (`dequantize_for_inference`).
- `fused_lora`: a LoRA layer on a 4-bit weight trained as one product (`fuse_lora_for_training`).
- `quantization`: bitsandbytes' 4-bit layers kept differentiable on CPUs (`keep_4bit_layers_differentiable`), and the
  trainable parameters of a quantized model kept in its activation dtype
  (`cast_trainable_parameters_to_activation_dtype`).
- `shared_prefix`: the tokens that every row of a batch starts with run once (`forward_with_shared_prefix`).

Both trainers call [`prepare_models`] once their models are built; `shared_prefix` and `InverseCdfSampler` are called
where a forward or a generation runs.
"""

from collections.abc import Iterable

import torch
from torch import nn

from .dequantized import dequantize_for_inference
from .fused_lora import fuse_lora_for_training
from .quantization import cast_trainable_parameters_to_activation_dtype, keep_4bit_layers_differentiable
from .sampling import lm_head_in_blocks


__all__ = ["prepare_models"]


def prepare_models(trained, frozen=(), *, generating=None, dequantize=False) -> None:
    """Install the speed paths on a trainer's models, unwrapped (not yet wrapped by DDP, DeepSpeed or FSDP).

    Args:
        trained: the models whose adapters or weights train (a `PeftModel`, a `PreTrainedModel`, a `ValueHeadModel`);
            None entries are skipped. Each gets, in this order: TRL's bf16 cast of a quantized model's trainable
            parameters undone where its input embeddings are fp32, its 4-bit layers kept differentiable, and its LoRA
            layers on 4-bit weights fused into one product for the passes with gradients.
        frozen: models that only run without gradients (a reference model, reward models); entries that are not
            `nn.Module`s (reward functions, None) are skipped.
        generating: the model that generates, whose LM head is then computed in blocks when decoding on a CPU.
        dequantize: route the 4-bit layers of every trained and frozen model through dequantised weights for the
            passes without gradients (memory for an unquantised copy of each base).

    Idempotent: a model prepared twice (a policy, and a critic adapter on the same base) is as if prepared once.
    """
    trained = [model for model in trained if model is not None]
    for model in trained:
        _keep_fp32_trainable_parameters(model)
        keep_4bit_layers_differentiable(model)
        fuse_lora_for_training(model)  # LoRA on 4-bit weights trains as one product on CPUs
    if generating is not None:
        lm_head_in_blocks(generating)  # the same logits, sooner, when decoding on CPUs
    if dequantize:
        for model in _modules([*trained, *frozen]):
            dequantize_for_inference(model)


def _keep_fp32_trainable_parameters(model: nn.Module) -> None:
    """Undo TRL's bf16 cast of a quantized model's trainable parameters where its activations are fp32 (the CPU
    recipes): there it only rounds the updates away and runs the adapter's products in bf16, which most CPUs compute
    several times slower. With 16-bit activations the cast stays, as TRL meant it (and fp16 parameters would not
    train). A model without `get_input_embeddings` or a quantization flag of its own (a `ValueHeadModel`) is left as
    it is."""
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not quantized or get_embeddings is None:
        return
    embeddings = get_embeddings()
    if getattr(embeddings, "weight", None) is not None and embeddings.weight.dtype == torch.float32:
        cast_trainable_parameters_to_activation_dtype(model)


def _modules(models: Iterable) -> list[nn.Module]:
    return [model for model in models if isinstance(model, nn.Module)]
