"""`ValueHeadModel`: normalised values that rescale without changing, the accumulated read-out, the forward that
starts at the first trained layer, and saving."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_reinforce import ValueHeadModel
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


def random_head(critic: ValueHeadModel) -> ValueHeadModel:
    torch.manual_seed(1)
    torch.nn.init.normal_(critic.value_head.weight)
    torch.nn.init.normal_(critic.value_head.bias)
    return critic


def test_rescaling_the_return_statistics_keeps_every_value(tokenizer):
    critic = random_head(ValueHeadModel(build_tiny_causal_lm(tokenizer)))
    input_ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        before = critic(input_ids)
        critic.rescale_returns(mean=120.0, std=35.0)
        torch.testing.assert_close(critic(input_ids), before, rtol=1e-5, atol=1e-4)
        normalized = critic(input_ids, normalized=True)
        torch.testing.assert_close(normalized * 35.0 + 120.0, before, rtol=1e-5, atol=1e-4)


def test_accumulated_read_out_counts_the_completion_only(tokenizer):
    critic = ValueHeadModel(build_tiny_causal_lm(tokenizer), accumulation_length=16)
    input_ids = torch.randint(4, 40, (1, 10))
    features = critic.features(input_ids, completion_start=3)
    hidden_size = critic.config.hidden_size
    accumulated = features[0, :, hidden_size:]
    assert accumulated[:4].abs().sum() == 0  # nothing accumulated up to and including the prompt's last token
    hidden = features[0, :, :hidden_size]
    normalized = hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(accumulated[6], normalized[4:7].sum(0) / 4.0)  # √16 = 4


def test_starting_at_the_first_trained_layer_reproduces_the_full_forward(tokenizer):
    """A critic adapter on the top layers of a shared base: the layers below run the base only, so their output,
    taken from another forward (the reference pass), can be fed straight to the trained layers."""
    model = build_tiny_causal_lm(tokenizer, num_hidden_layers=4)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    policy = get_peft_model(model, lora)
    policy.add_adapter("critic", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[3]))
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # trained adapters, not identities
    critic = random_head(ValueHeadModel(policy, adapter_name="critic"))
    input_ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        full = critic(input_ids)
        critic.first_trained_layer = 3
        split = critic(input_ids)
        captured = []
        with policy.disable_adapter(), critic.capture_layer_input(captured):
            policy(input_ids)  # the reference pass: adapters disabled, the whole model
        from_reference = critic(input_ids, layer_input=captured[0])
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(from_reference, full)
    assert policy.active_adapter == "default"  # the policy's adapter is active again


def test_saved_critic_reloads_with_its_statistics(tokenizer, tmp_path):
    model = build_tiny_causal_lm(tokenizer)
    model.save_pretrained(tmp_path / "base")
    critic = random_head(ValueHeadModel(model, accumulation_length=24))
    critic.rescale_returns(mean=3.0, std=2.0)
    critic.save_pretrained(tmp_path / "critic")
    reloaded = ValueHeadModel.from_pretrained(tmp_path / "critic")
    input_ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids), critic(input_ids))
    assert reloaded.accumulation_length == 24


def test_a_saved_config_naming_another_class_is_refused(tokenizer, tmp_path):
    critic = ValueHeadModel(build_tiny_causal_lm(tokenizer))
    critic.save_pretrained(tmp_path / "critic")
    config_path = tmp_path / "critic" / "value_head_config.json"
    config = json.loads(config_path.read_text())
    config["auto_class"] = "Trainer"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_class='Trainer'"):
        ValueHeadModel.from_pretrained(tmp_path / "critic")
