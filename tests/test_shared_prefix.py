import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_reinforce.speedups.shared_prefix import forward_with_shared_prefix, shared_prefix_length
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_reward_model, build_tiny_tokenizer


PAD = 0


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return input_ids, attention_mask


@pytest.mark.parametrize(
    "rows, pad_token_id, expected",
    [
        ([[5, 6, 7, 8], [5, 6, 7, 9, 9]], None, 3),
        ([[5, 6, 7, 8], [5, 6, 9]], None, 2),
        ([[5, 6, 7], [5, 6, 7, 8]], None, 2),  # the shorter row keeps its last token
        ([[5, 6], [5, 6], [5, 6]], None, 1),  # identical rows: each keeps one token
        ([[4, 6], [5, 6]], None, 0),
        ([[5, 6, 7, PAD], [5, 6, 7, PAD, 8]], PAD, 2),  # an end of turn that is the pad token is not a row's own
        ([[5, 6, 7, PAD], [5, 6, 7, PAD, 8]], None, 3),
    ],
)
def test_shared_prefix_length_by_hand(rows, pad_token_id, expected):
    assert shared_prefix_length(*right_padded(rows), pad_token_id=pad_token_id) == expected


def test_padding_is_never_shared():
    input_ids = torch.tensor([[5, 6, PAD], [5, 6, PAD]])
    attention_mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert shared_prefix_length(input_ids, attention_mask) == 1


def batch_with_a_shared_prompt(tokenizer):
    texts = ["system: be brief. user: rate a cat. ok", "system: be brief. user: rate a dog. nice!", "system: be bri"]
    tokens = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    return right_padded(tokens), len("system: be bri")


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_sequence_classifier_scores_and_gradients_match_a_full_forward():
    tokenizer = build_tiny_tokenizer()
    (input_ids, attention_mask), prefix = batch_with_a_shared_prompt(tokenizer)
    model = get_peft_model(
        build_tiny_reward_model(tokenizer), LoraConfig(r=4, task_type="SEQ_CLS", init_lora_weights=False)
    )
    assert shared_prefix_length(input_ids, attention_mask, tokenizer.pad_token_id) == prefix

    full = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (3, 1)
    full.square().sum().backward()
    expected = gradients(model)
    model.zero_grad()
    shared = forward_with_shared_prefix(model, input_ids, attention_mask, pad_token_id=tokenizer.pad_token_id).logits
    shared.square().sum().backward()

    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    assert expected.keys() == gradients(model).keys() and any("lora_A" in name for name in expected)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_causal_lm_logits_after_the_prefix_match_a_full_forward():
    tokenizer = build_tiny_tokenizer()
    (input_ids, attention_mask), prefix = batch_with_a_shared_prompt(tokenizer)
    model = build_tiny_causal_lm(tokenizer)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (3, L, V)
        shared = forward_with_shared_prefix(model, input_ids, attention_mask).logits  # (3, L - prefix, V)
    assert shared.shape[1] == input_ids.size(1) - prefix
    real = attention_mask[:, prefix:].bool()
    torch.testing.assert_close(shared[real], full[:, prefix:][real], rtol=1e-5, atol=1e-5)


def test_one_row_or_nothing_shared_is_a_plain_forward():
    calls = []

    def model(**kwargs):
        calls.append(kwargs)
        return "outputs"

    input_ids, attention_mask = right_padded([[4, 6], [5, 6]])
    assert forward_with_shared_prefix(model, input_ids, attention_mask, use_cache=False) == "outputs"
    assert forward_with_shared_prefix(model, input_ids[:1], attention_mask[:1]) == "outputs"
    assert len(calls) == 2 and calls[0]["input_ids"] is input_ids and calls[0]["use_cache"] is False
