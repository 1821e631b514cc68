import pytest
import torch

from hf_reinforce.sampling import InverseCdfSampler, inverse_cdf_sample
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


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        InverseCdfSampler(temperature=0.0)
