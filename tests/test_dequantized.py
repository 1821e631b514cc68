"""Dequantised 4-bit weights for the passes without gradients (`hf_reinforce.speedups.dequantized`): the same outputs
as the 4-bit layers, with whatever adapters are active, rebuilt when the adapters change; passes with gradients
untouched."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_reinforce.speedups.dequantized import CACHE, dequantize_for_inference
from hf_reinforce.testing import save_tiny_models


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"]


def lora_model(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4)
    # Random B as well as A, so that every adapter changes the outputs
    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def logits(model, input_ids, with_grad: bool) -> torch.Tensor:
    """With gradients on the layers run as bitsandbytes and peft run them; without, through the dequantised copies."""
    with torch.set_grad_enabled(with_grad):
        return model(input_ids).logits.detach()


def test_no_grad_passes_match_the_4bit_layers_for_every_adapter_state(policy_path):
    model = lora_model(policy_path).eval()
    input_ids = torch.randint(4, 50, (3, 10))
    before_routing = logits(model, input_ids, with_grad=False)
    # every q, k, v, o, gate, up and down projection of the 2 layers, each routed once (its 4-bit base is not)
    assert dequantize_for_inference(model) == len(TARGETS) * 2
    assert dequantize_for_inference(model) == 0  # idempotent
    torch.testing.assert_close(logits(model, input_ids, with_grad=False), before_routing, atol=1e-4, rtol=1e-4)

    with torch.no_grad():  # an optimizer step changes the adapter in place: the merged copy must follow
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(0.05)
    torch.testing.assert_close(
        logits(model, input_ids, with_grad=False), logits(model, input_ids, with_grad=True), atol=1e-4, rtol=1e-4
    )
    with model.disable_adapter():  # the reference model: the 4-bit base alone
        base = logits(model, input_ids, with_grad=True)
        torch.testing.assert_close(logits(model, input_ids, with_grad=False), base, atol=1e-4, rtol=1e-4)
    model.set_adapter("other")
    other = logits(model, input_ids, with_grad=True)
    torch.testing.assert_close(logits(model, input_ids, with_grad=False), other, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(other, base, atol=1e-3) and not torch.allclose(other, before_routing, atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_the_merged_copy_follows_optimizer_steps_that_leave_version_counters_alone(policy_path, fused):
    """transformers' default optimizer, fused AdamW, updates parameters in place without bumping `_version`: a merged
    copy keyed on versions alone went on generating from the adapter as it was before training."""
    model = lora_model(policy_path)
    dequantize_for_inference(model)
    input_ids = torch.randint(4, 50, (3, 10))
    before = logits(model, input_ids, with_grad=False)  # builds the merged copy
    adapter = [param for name, param in model.named_parameters() if ".default." in name]
    optimizer = torch.optim.AdamW(adapter, lr=0.05, fused=fused)
    model(input_ids).logits.square().mean().backward()
    optimizer.step()
    after = logits(model, input_ids, with_grad=False)
    torch.testing.assert_close(after, logits(model, input_ids, with_grad=True), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)


def test_passes_with_gradients_are_untouched(policy_path):
    input_ids = torch.randint(4, 50, (2, 12))
    gradients = []
    for route in (False, True):
        model = lora_model(policy_path)
        if route:
            dequantize_for_inference(model)
            with torch.no_grad():
                model(input_ids)  # a generation before the update fills the caches
        model(input_ids, labels=input_ids).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_plain_4bit_layers_are_routed_and_generation_is_unchanged(policy_path):
    model = AutoModelForCausalLM.from_pretrained(policy_path, quantization_config=NF4).eval()
    prompt = torch.randint(4, 50, (2, 5))
    expected = model.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert dequantize_for_inference(model) == len(TARGETS) * 2
    torch.testing.assert_close(model.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=0), expected)
    caches = [module.__dict__[CACHE] for module in model.modules() if CACHE in module.__dict__]
    assert all(cache["base"].dtype == torch.float32 for cache in caches) and "merged" not in caches[0]


def test_adapters_merged_into_the_4bit_weight_run_as_peft_runs_them(policy_path):
    model = lora_model(policy_path).eval()
    input_ids = torch.randint(4, 50, (2, 8))
    dequantize_for_inference(model)
    logits(model, input_ids, with_grad=False)  # caches filled before the merge
    model.merge_adapter()
    torch.testing.assert_close(
        logits(model, input_ids, with_grad=False), logits(model, input_ids, with_grad=True), atol=1e-4, rtol=1e-4
    )
    with model.disable_adapter():  # peft unmerges first: the 4-bit base alone again
        torch.testing.assert_close(
            logits(model, input_ids, with_grad=False), logits(model, input_ids, with_grad=True), atol=1e-4, rtol=1e-4
        )
