import math

import pytest
import torch

from hf_reinforce.advantages import (
    discounted_returns,
    explained_variance,
    masked_mean,
    masked_var,
    sequence_baseline,
    token_advantages,
    whiten,
)


# Three completions of a 4-token window: the first ends with EOS at t=1 (then padding), the second fills the window,
# the third was masked out entirely.
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
REWARDS = torch.tensor([2.0, -1.0, 5.0])


def test_undiscounted_returns_are_the_sequence_reward_on_every_token():
    expected = torch.tensor([[2.0, 2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(discounted_returns(REWARDS, MASK), expected)


def test_discounted_returns_count_steps_to_the_last_real_token():
    # G_t = γ^(T−t) R: T=1 for the first row (EOS in the middle of the window), T=3 for the second
    gamma = 0.5
    expected = torch.tensor([[1.0, 2.0, 0.0, 0.0], [-0.125, -0.25, -0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(discounted_returns(REWARDS, MASK, gamma), expected)


def test_rloo_baseline_is_the_mean_of_the_other_completions_of_the_prompt():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])  # two prompts, three completions each
    expected = torch.tensor([4.0, 3.5, 1.5, 6.0, 4.0, 2.0])
    torch.testing.assert_close(sequence_baseline(rewards, "rloo", num_generations=3), expected)


def test_rloo_baseline_leaves_unscorable_completions_out():
    rewards = torch.tensor([1.0, math.nan, 3.0, 5.0, math.nan, math.nan])
    baseline = sequence_baseline(rewards, "rloo", num_generations=3)
    torch.testing.assert_close(baseline[[0, 2]], torch.tensor([3.0, 1.0]))
    assert baseline[1].isnan() and baseline[3].isnan()  # the lone scorable completion has nobody to compare with


def test_mean_and_none_baselines():
    rewards = torch.tensor([1.0, 2.0, math.nan, 6.0])
    torch.testing.assert_close(sequence_baseline(rewards, "mean"), torch.full((4,), 3.0))
    torch.testing.assert_close(sequence_baseline(rewards, "none"), torch.zeros(4))


def test_sequence_baseline_rejects_unknown_kinds_and_lone_generations():
    with pytest.raises(ValueError, match="Unknown critic-free baseline 'critic'"):
        sequence_baseline(REWARDS, "critic")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        sequence_baseline(REWARDS, "rloo", num_generations=1)


def test_token_advantages_subtract_per_token_values_and_zero_the_padding():
    returns = discounted_returns(REWARDS, MASK)
    values = torch.tensor([[0.5, 1.5, 9.0, 9.0], [0.0, -2.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
    expected = torch.tensor([[1.5, 0.5, 0.0, 0.0], [-1.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_advantages(returns, values, MASK), expected)


def test_token_advantages_broadcast_a_sequence_baseline():
    returns = discounted_returns(REWARDS, MASK)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [-3.0, -3.0, -3.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_advantages(returns, torch.tensor([1.0, 2.0, 3.0]), MASK), expected)


def test_masked_statistics_ignore_padding():
    values = torch.tensor([[1.0, 3.0, 100.0, 100.0], [2.0, 2.0, 2.0, 4.0], [7.0, 7.0, 7.0, 7.0]])
    # masked entries: 1, 3, 2, 2, 2, 4 -> mean 7/3, squared deviations (16+4+1+1+1+25)/9 / 6 = 8/9
    torch.testing.assert_close(masked_mean(values, MASK), torch.tensor(14 / 6))
    torch.testing.assert_close(masked_var(values, MASK), torch.tensor(8 / 9))


def test_whiten_gives_zero_mean_unit_variance_on_masked_entries_and_keeps_padding_zero():
    values = torch.tensor([[1.0, 3.0, 100.0, 100.0], [2.0, 2.0, 2.0, 4.0], [7.0, 7.0, 7.0, 7.0]])
    whitened = whiten(values, MASK)
    torch.testing.assert_close(masked_mean(whitened, MASK), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_var(whitened, MASK), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (whitened[MASK == 0] == 0).all()


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(explained_variance(returns, returns, MASK), torch.tensor(1.0))
    constant = torch.full_like(returns, 3.0)
    torch.testing.assert_close(explained_variance(constant, returns, MASK), torch.tensor(0.0))
    # residuals -1..+1 around a spread of returns: 1 − Var(residual) / Var(returns) by hand
    residual = torch.tensor([[1.0, -1.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    returns_var = (torch.tensor([1.0, 2, 3, 4, 5, 6]).var(unbiased=False)).item()
    expected = 1 - 1.0 / returns_var
    torch.testing.assert_close(explained_variance(returns - residual, returns, MASK), torch.tensor(expected))
    assert explained_variance(constant, torch.ones_like(returns), MASK).isnan()  # returns that never vary
