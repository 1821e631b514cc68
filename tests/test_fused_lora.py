import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_reinforce.speedups import fused_lora
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    build_tiny_causal_lm(build_tiny_tokenizer()).save_pretrained(directory)
    return directory


def qlora_model(tiny_dir, **lora):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=NF4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **lora)
    return get_peft_model(base, config).train()


def loss_and_gradients(model, input_ids):
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeddings).logits.log_softmax(-1)[..., 7].sum()
    loss.backward()
    trained = [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]
    return loss.detach(), [embeddings.grad.clone(), *trained]


def count_fused_products(monkeypatch) -> list:
    calls = []
    apply = fused_lora.LoraOn4bit.apply
    monkeypatch.setattr(fused_lora.LoraOn4bit, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


def test_the_folded_product_gives_peft_outputs_and_gradients(tiny_dir, monkeypatch):
    """Output, input gradient and the adapter's gradients are PEFT's, within float32 rounding."""
    model = qlora_model(tiny_dir)
    input_ids = torch.randint(4, 50, (3, 11))
    expected_loss, expected = loss_and_gradients(model, input_ids)
    assert fused_lora.fuse_lora_for_training(model) == 7 * model.config.num_hidden_layers
    assert fused_lora.fuse_lora_for_training(model) == 0  # idempotent
    calls = count_fused_products(monkeypatch)
    loss, gradients = loss_and_gradients(model, input_ids)
    assert len(calls) == 7 * model.config.num_hidden_layers
    torch.testing.assert_close(loss, expected_loss)
    assert len(gradients) == len(expected) and all(g.abs().sum() > 0 for g in expected)
    for gradient, reference in zip(gradients, expected):
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["no gradients", "adapter disabled", "dropout", "two adapters"])
def test_peft_runs_the_layer_where_folding_would_change_it(tiny_dir, monkeypatch, case):
    model = qlora_model(tiny_dir, lora_dropout=0.5 if case == "dropout" else 0.0)
    if case == "two adapters":
        model.add_adapter("other", LoraConfig(r=4, target_modules=TARGETS))
        model.base_model.set_adapter(["default", "other"])
    fused_lora.fuse_lora_for_training(model)
    calls = count_fused_products(monkeypatch)
    embeddings = model.get_input_embeddings()(torch.randint(4, 50, (2, 5))).detach().requires_grad_()
    if case == "no gradients":
        with torch.no_grad():
            model(inputs_embeds=embeddings)
    elif case == "adapter disabled":
        with model.disable_adapter():
            model(inputs_embeds=embeddings).logits.sum().backward()
    else:
        model(inputs_embeds=embeddings).logits.sum().backward()
    assert calls == [] and (case == "no gradients" or embeddings.grad.abs().sum() > 0)
