import pytest
import torch

from hf_reinforce.speedups.sampling import (
    LM_HEAD_BLOCK,
    LM_HEAD_MAX_ROWS,
    InverseCdfSampler,
    inverse_cdf_sample,
    lm_head_in_blocks,
)
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer


def draw_frequencies(probs: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = inverse_cdf_sample(probs.expand(draws, -1), generator)  # (draws,)
    return torch.bincount(tokens, minlength=probs.size(-1)).float() / draws


def test_draws_follow_the_probabilities_and_never_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.0, 0.3, 0.0]])  # a zero inside, and at the end
    frequencies = draw_frequencies(probs, 40_000)
    assert frequencies[[1, 3, 5]].sum() == 0
    # binomial standard error at p=0.5 over 40,000 draws is 0.0025
    assert frequencies == pytest.approx(probs[0], abs=0.01)


def test_unnormalised_rows_are_drawn_in_proportion():
    weights = torch.tensor([[2.0, 6.0, 0.0, 2.0]])
    assert draw_frequencies(weights, 40_000) == pytest.approx(torch.tensor([0.2, 0.6, 0.0, 0.2]), abs=0.01)


def test_a_draw_at_the_very_top_of_the_cdf_stays_on_a_drawable_token(monkeypatch):
    # u·total rounds to the total for u just below 1; the draw must not fall on the zero-probability tail
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.full(shape, 1 - 2**-24, dtype=kwargs["dtype"]))
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert inverse_cdf_sample(probs).tolist() == [1, 2]


def test_the_processor_keeps_one_token_drawn_at_the_temperature():
    scores = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    sampler = InverseCdfSampler(temperature=0.5, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([sampler(None, scores) for _ in range(20_000)])  # (20000, 4)
    assert (rows.isfinite().sum(dim=1) == 1).all() and (rows[rows.isfinite()] == 0).all()
    frequencies = rows.isfinite().float().mean(dim=0)
    assert frequencies == pytest.approx(torch.softmax(scores[0] / 0.5, dim=-1), abs=0.01)


def test_greedy_generation_keeps_the_processors_draws():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(tokenizer).eval()
    inputs = tokenizer(["a tent", "a sofa and a lamp"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    torch.manual_seed(0)
    output = model.generate(**inputs, do_sample=False, logits_processor=[InverseCdfSampler(0.7)], **kwargs)
    new_tokens = output[:, inputs["input_ids"].size(1) :]  # (2, 6)

    # The same draws by hand: the model's next-token distribution at 0.7, one uniform variable per row and token
    torch.manual_seed(0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for step in range(6):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            token = inverse_cdf_sample(torch.softmax(logits / 0.7, dim=-1))
            assert token.tolist() == new_tokens[:, step].tolist()
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert len(set(new_tokens.flatten().tolist())) > 2  # sampled, not one repeated greedy token


@pytest.mark.parametrize("logps_temperature", [1.0, 0.5])
def test_recorded_logps_are_the_drawn_tokens_at_their_temperature(logps_temperature):
    scores = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, -3.0, 4.0, 1.0]])
    sampler = InverseCdfSampler(0.7, record_logps=True, logps_temperature=logps_temperature)
    tokens = sampler(None, scores).argmax(dim=-1)  # (2,): the only finite entry of each row
    # log softmax(s / T)_k = s_k / T - log sum_j exp(s_j / T), by hand for each row
    expected = [
        row[k].item() / logps_temperature - torch.log(torch.exp(row / logps_temperature).sum()).item()
        for row, k in zip(scores, tokens.tolist())
    ]
    assert len(sampler.token_logps) == 1
    assert sampler.token_logps[0].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", ["temperature", "logps_temperature"])
def test_temperatures_must_be_positive(name):
    with pytest.raises(ValueError, match=name):
        InverseCdfSampler(**{name: 0.0})


@pytest.mark.parametrize("bias", [False, True])
def test_the_lm_head_in_blocks_gives_the_same_logits(bias):
    head = torch.nn.Linear(16, 2 * LM_HEAD_BLOCK + 5, bias=bias)  # two whole blocks and a partial one
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    hidden = torch.randn(3, 4, 16)  # (B, T, hidden)
    expected = head(hidden).detach()
    products = []
    original_linear = torch.nn.functional.linear
    torch.nn.functional.linear = lambda x, w, b=None: products.append(w.size(0)) or original_linear(x, w, b)
    try:
        assert lm_head_in_blocks(model) and not lm_head_in_blocks(model)  # installed once
        with torch.no_grad():
            blocked = head(hidden)
        assert products == [LM_HEAD_BLOCK, LM_HEAD_BLOCK, 5]
        torch.testing.assert_close(blocked, expected, rtol=1e-6, atol=1e-6)
        products.clear()
        head(hidden)  # with gradients: one product, which autograd differentiates
        with torch.no_grad():
            head(torch.randn(LM_HEAD_MAX_ROWS + 1, 16))  # many rows: one product
        assert products == [head.out_features] * 2
    finally:
        torch.nn.functional.linear = original_linear
