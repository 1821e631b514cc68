"""`hf_reinforce.speedups.prepare_models`, the one entry both trainers install the CPU speed paths through."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_reinforce.speedups import dequantized, fused_lora, prepare_models
from hf_reinforce.testing import save_tiny_models
from hf_reinforce.value_head import ValueHeadModel


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"]


def qlora_model(path, embedding_dtype=torch.float32):
    """A 4-bit policy with a random LoRA adapter, its trainable parameters cast to bf16 as TRL casts them."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4, dtype=embedding_dtype)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
    return model


def trainable_dtypes(model) -> set[torch.dtype]:
    return {parameter.dtype for parameter in model.parameters() if parameter.requires_grad}


def replaced_forwards(model) -> dict[str, object]:
    """Every forward installed on a module instance, by module name: what the speed paths replace."""
    return {name: module.__dict__["forward"] for name, module in model.named_modules() if "forward" in module.__dict__}


@pytest.mark.parametrize(
    ("embedding_dtype", "expected"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
def test_trainable_parameters_follow_fp32_embeddings_only(policy_path, embedding_dtype, expected):
    model = qlora_model(policy_path, embedding_dtype)
    assert model.get_input_embeddings().weight.dtype == embedding_dtype
    assert trainable_dtypes(model) == {torch.bfloat16}
    prepare_models([model])
    assert trainable_dtypes(model) == {expected}


def test_a_value_head_model_without_embeddings_of_its_own_is_left_in_its_dtype(policy_path):
    policy = qlora_model(policy_path)
    critic = ValueHeadModel(policy)
    prepare_models([critic])
    assert trainable_dtypes(policy) == {torch.bfloat16}
    assert fused_lora.fuse_lora_for_training(critic) == 0  # the critic's LoRA layers were fused all the same


def test_preparing_twice_is_preparing_once(policy_path):
    """A policy and a critic on its base prepared together, then again: the same parameters, forwards and outputs."""
    once, twice = qlora_model(policy_path), qlora_model(policy_path)
    prepare_models([once, ValueHeadModel(once)], generating=once, dequantize=True)
    for _ in range(2):
        prepare_models([twice, ValueHeadModel(twice)], generating=twice, dequantize=True)
    forwards = replaced_forwards(twice)
    prepare_models([twice], generating=twice, dequantize=True)
    assert replaced_forwards(twice) == forwards  # nothing wrapped again
    assert forwards.keys() == replaced_forwards(once).keys()
    state_once, state_twice = once.state_dict(), twice.state_dict()
    assert state_once.keys() == state_twice.keys()
    for name, tensor in state_once.items():
        assert torch.equal(tensor, state_twice[name]), name
    input_ids = torch.randint(4, 50, (2, 9))
    for with_grad in (True, False):  # the fused products, then the dequantised weights
        with torch.set_grad_enabled(with_grad):
            torch.testing.assert_close(twice(input_ids).logits, once(input_ids).logits, rtol=0, atol=0)


def test_none_entries_and_reward_functions_are_skipped(policy_path):
    model = qlora_model(policy_path)
    prepare_models([None, model, None], [None, lambda completions, **kwargs: [0.0]], dequantize=True)
    assert trainable_dtypes(model) == {torch.float32}
    assert fused_lora.fuse_lora_for_training(model) == 0
    prepare_models([None])


@pytest.mark.parametrize("dequantize", [False, True])
def test_dequantize_reaches_frozen_models(policy_path, dequantize):
    trained = qlora_model(policy_path)
    frozen = AutoModelForCausalLM.from_pretrained(policy_path, quantization_config=NF4)
    prepare_models([trained], [frozen], generating=trained, dequantize=dequantize)
    for model in (trained, frozen):
        assert (dequantized.dequantize_for_inference(model) == 0) is dequantize
    assert fused_lora.fuse_lora_for_training(trained) == 0
    assert "forward" in trained.get_output_embeddings().__dict__  # lm_head_in_blocks, on the generating model only
    assert "forward" not in frozen.get_output_embeddings().__dict__
