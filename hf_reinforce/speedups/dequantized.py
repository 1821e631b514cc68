"""The passes that need no gradient (generation, reference and reward scores) on a 4-bit model, through plain products.

bitsandbytes dequantises a 4-bit weight on every call and a LoRA layer adds two small products of its own, so on a CPU
a token of generation costs about twice what it costs the same model unquantised (docs/benchmarks.md). Where the
memory of an unquantised copy is affordable, each 4-bit layer keeps its weight dequantised once, with its active LoRA
adapters merged in, and uses it whenever no gradient is wanted; a pass that needs gradients runs the layer as before.
The merged copy is rebuilt when an adapter's weights change (an optimizer step, a loaded state) or another adapter is
made active. Fused optimizers (`torch.optim.AdamW(fused=True)`, transformers' default `adamw_torch_fused`) update the
parameters in place without bumping their version counters, so every optimizer step, of any optimizer, counts as a
change too.
"""

import bitsandbytes as bnb
import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from torch.optim.optimizer import register_optimizer_step_post_hook


ORIGINAL_FORWARD = "_forward_before_dequantized"
CACHE = "_dequantized_weights"
# How many optimizer steps this process has taken, any optimizer: counted by a global post-step hook
_optimizer_steps = [0]
register_optimizer_step_post_hook(
    lambda optimizer, args, kwargs: _optimizer_steps.__setitem__(0, _optimizer_steps[0] + 1)
)


def dequantize_for_inference(model: torch.nn.Module) -> int:
    """Route every 4-bit linear layer of `model` (a LoRA layer on one as a whole) through a dequantised copy of its
    weight whenever gradients are off; returns how many layers were routed. Idempotent."""
    lora_bases = {id(module.base_layer) for module in model.modules() if isinstance(module, LoraLinear4bit)}
    routed = 0
    for module in model.modules():
        four_bit = isinstance(module, LoraLinear4bit) or (
            isinstance(module, bnb.nn.Linear4bit) and id(module) not in lora_bases
        )
        if four_bit and ORIGINAL_FORWARD not in module.__dict__:
            module.__dict__[ORIGINAL_FORWARD] = module.forward
            module.__dict__.setdefault(CACHE, {})
            module.forward = _dequantized_forward(module)
            routed += 1
    return routed


def cached_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The dequantised and merged copies the routed layers of `model` hold now."""
    caches = (module.__dict__.get(CACHE, {}) for module in model.modules())
    return [tensor for cache in caches for tensor in cache.values() if isinstance(tensor, torch.Tensor)]


def _dequantized_forward(layer: torch.nn.Module):
    original = layer.__dict__[ORIGINAL_FORWARD]

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() or args or kwargs:  # gradients, or peft's per-row adapters: the layer as it is
            return original(x, *args, **kwargs)
        weight = effective_weight(layer, x.dtype)
        if weight is None:
            return original(x, *args, **kwargs)
        base = layer.base_layer if isinstance(layer, LoraLinear4bit) else layer
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    return forward


def effective_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The (out, in) weight the layer applies now: the dequantised base plus `scaling·B·A` of each active adapter;
    None where that sum is not what the layer computes (adapters merged into the 4-bit weight, DoRA and other
    variants, active dropout, the weight packed for bitsandbytes' CPU inference kernel)."""
    cache = layer.__dict__[CACHE]
    base = layer.base_layer if isinstance(layer, LoraLinear4bit) else layer
    weight = base.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        return None
    base_key = (dtype, id(weight), weight.data_ptr(), weight._version)
    if cache.get("base_key") != base_key:
        cache.clear()
        cache["base"] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        cache["base_key"] = base_key
    if not isinstance(layer, LoraLinear4bit):
        return cache["base"]
    if layer.merged:  # the 4-bit weight holds adapters, which peft takes out again when they are disabled
        return None
    if layer.disable_adapters:
        return cache["base"]
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in adapters:
        dropout = layer.lora_dropout[name]
        if name in layer.lora_variant or (dropout.training and not isinstance(dropout, torch.nn.Identity)):
            return None
    if not adapters:
        return cache["base"]
    merged_key = (
        _optimizer_steps[0],
        *(
            (
                name,
                layer.scaling[name],
                *((id(p), p.data_ptr(), p._version) for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)),
            )
            for name in adapters
        ),
    )
    if cache.get("merged_key") != merged_key:
        merged = cache["base"].clone()
        for name in adapters:
            merged += layer.get_delta_weight(name).to(dtype)
        cache["merged"], cache["merged_key"] = merged, merged_key
    return cache["merged"]
