import pytest
import torch
from bitsandbytes.nn.modules import has_avx512bf16
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_reinforce.speedups.quantization import keep_4bit_layers_differentiable
from hf_reinforce.testing import save_tiny_models


def lora_gradients(model_path, eval_pass_first: bool, keep_differentiable: bool) -> dict[str, torch.Tensor]:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    if keep_differentiable:
        keep_4bit_layers_differentiable(model)
    input_ids = torch.randint(4, 50, (2, 12))
    if eval_pass_first:  # e.g. an evaluation, or a value pass of a critic, between training steps
        model.eval()
        with torch.no_grad():
            model(input_ids)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    # a layer whose backward is lost leaves the adapters below it with no gradient at all
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_an_eval_pass_no_longer_corrupts_4bit_lora_gradients(tmp_path):
    path = save_tiny_models(tmp_path)["policy"]
    reference = lora_gradients(path, eval_pass_first=False, keep_differentiable=False)
    protected = lora_gradients(path, eval_pass_first=True, keep_differentiable=True)
    for name, grad in reference.items():
        torch.testing.assert_close(protected[name], grad, msg=name)
    unprotected = lora_gradients(path, eval_pass_first=True, keep_differentiable=False)
    assert any(not torch.allclose(unprotected[name], grad) for name, grad in reference.items())
