"""LoRA on a 4-bit layer as one product, for the passes with gradients on a CPU.

PEFT runs a LoRA layer on a 4-bit base as the base product, a copy of its output, two thin products and a scaled sum;
their backward adds four more thin products and as many passes over the (tokens, out) gradient. Folding the adapter
into the dequantised weight, `W + s·B·A` (out, in), gives the same output with one product, and the input gradient
with one product too; only the adapter's own gradients keep their thin products. bitsandbytes dequantises the weight
for each product on a CPU anyway, so the folded weight costs no memory beyond what it already holds for a moment.
"""

import bitsandbytes as bnb
import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit


ORIGINAL_FORWARD = "_forward_before_fused_lora"


def fuse_lora_for_training(model: torch.nn.Module) -> int:
    """Run every LoRA layer on a 4-bit weight of `model` as one product in passes with gradients, where the layer is
    on a CPU with one plain adapter (no dropout, no DoRA or other variant); returns how many layers were routed.
    Idempotent, and other passes run the layer as before."""
    routed = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and ORIGINAL_FORWARD not in module.__dict__:
            # Under dequantize_for_inference the layer's own forward is already wrapped: this wraps the wrapper
            original = module.forward
            module.__dict__[ORIGINAL_FORWARD] = original
            module.forward = _fused_forward(module, original)
            routed += 1
    return routed


def _fused_forward(layer: LoraLinear4bit, original):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = _single_plain_adapter(layer, x) if torch.is_grad_enabled() and not (args or kwargs) else None
        if adapter is None:
            return original(x, *args, **kwargs)
        lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        return LoraOn4bit.apply(x, lora_A, lora_B, layer.base_layer, layer.scaling[adapter])

    return forward


def _single_plain_adapter(layer: LoraLinear4bit, x: torch.Tensor) -> str | None:
    """The adapter the layer would add, when the folded product computes exactly what PEFT computes; else None."""
    if x.device.type != "cpu" or layer.disable_adapters or layer.merged or torch.is_autocast_enabled("cpu"):
        return None
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(adapters) != 1 or adapters[0] in layer.lora_variant:
        return None
    adapter = adapters[0]
    dropout = layer.lora_dropout[adapter]
    if dropout.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0:
        return None
    base = layer.base_layer
    if base.bias is not None and base.bias.requires_grad or layer.lora_A[adapter].weight.dtype != x.dtype:
        return None
    quant_state = getattr(base.weight, "quant_state", None)  # none on a weight that FSDP2 has sharded
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):  # or repacked for a CPU kernel
        return None
    return adapter


def folded_weight(base, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling·B·A (out, in), W the dequantised 4-bit weight of `base`, in the adapter's dtype."""
    weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(lora_A.dtype)
    return weight.addmm_(lora_B, lora_A, alpha=scaling)


class LoraOn4bit(torch.autograd.Function):
    """y = x·(W + s·B·A)ᵀ + bias for a frozen 4-bit W; gradients for x, A (r, in) and B (out, r)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, base, scaling):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.base, ctx.scaling = base, scaling
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return torch.nn.functional.linear(x, folded_weight(base, lora_A, lora_B, scaling), bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad_output.reshape(-1, grad_output.size(-1))  # (N, out)
        inputs = x.reshape(-1, x.size(-1))  # (N, in)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ folded_weight(ctx.base, lora_A, lora_B, scaling)).view_as(x)
        if ctx.needs_input_grad[1]:
            grad_A = (grad @ lora_B).t() @ inputs * scaling  # (r, in)
        if ctx.needs_input_grad[2]:
            grad_B = grad.t() @ (inputs @ lora_A.t()) * scaling  # (out, r)
        return grad_x, grad_A, grad_B, None, None
