import math

import pytest
import torch

from hf_reinforce.advantages import (
    carry_forward,
    critic_baseline,
    critic_weight_sums,
    discounted_returns,
    explained_variance,
    gae_advantages,
    leave_one_out_mean,
    masked_mean,
    masked_var,
    optimal_token_baseline,
    position_thirds,
    recentred_explained_variance,
    reward_to_go,
    sequence_baseline,
    token_advantages,
    token_rewards,
    value_diagnostics,
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


def test_token_rewards_pay_the_kl_where_it_is_incurred_and_the_reward_at_the_end():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.1, 0.0, 0.2], [1.0, 1.0, 1.0, 1.0]])
    beta = 0.5
    expected = torch.tensor([[-0.05, 2.0 - 0.1, 0.0, 0.0], [-0.25, 0.05, 0.0, -1.0 - 0.1], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_rewards(REWARDS, kl, MASK, beta), expected)


def test_reward_to_go_sums_the_rewards_still_to_come():
    rewards = torch.tensor([[1.0, 2.0, 9.0, 9.0], [1.0, 0.0, -1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    expected = torch.tensor([[3.0, 2.0, 0.0, 0.0], [3.0, 2.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(reward_to_go(rewards * MASK, MASK), expected)
    # with γ = 0.5 on the second row: G_3 = 3, G_2 = −1 + 1.5, G_1 = 0 + 0.25, G_0 = 1 + 0.125
    torch.testing.assert_close(reward_to_go(rewards * MASK, MASK, 0.5)[1], torch.tensor([1.125, 0.25, 0.5, 3.0]))
    # a reward paid at the end only gives back `discounted_returns`
    terminal = token_rewards(REWARDS, torch.zeros_like(MASK), MASK, beta=0.0)
    torch.testing.assert_close(reward_to_go(terminal, MASK, 0.5), discounted_returns(REWARDS, MASK, 0.5))


def test_gae_with_lambda_one_is_the_monte_carlo_advantage():
    kl = torch.rand(3, 4)
    rewards = token_rewards(REWARDS, kl, MASK, beta=0.3)
    values = torch.randn(3, 4)
    expected = token_advantages(reward_to_go(rewards, MASK), values, MASK)
    torch.testing.assert_close(gae_advantages(rewards, values, MASK, gamma=1.0, lam=1.0), expected)


def test_gae_with_lambda_below_one_matches_the_hand_computed_sum():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 1.0]])
    mask = torch.ones(1, 4)
    gamma, lam = 0.9, 0.5
    # δ_t = r_t + γ·V_{t+1} − V_t with V after the end = 0
    deltas = [0.0 + 0.9 * 1.0 - 0.5, 1.0 + 0.9 * 1.5 - 1.0, 0.0 + 0.9 * 1.0 - 1.5, 2.0 - 1.0]
    gl = gamma * lam
    expected = [
        deltas[0] + gl * deltas[1] + gl**2 * deltas[2] + gl**3 * deltas[3],
        deltas[1] + gl * deltas[2] + gl**2 * deltas[3],
        deltas[2] + gl * deltas[3],
        deltas[3],
    ]
    torch.testing.assert_close(gae_advantages(rewards, values, mask, gamma, lam), torch.tensor([expected]))


def test_gae_stops_at_the_end_of_each_completion():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 7.0, 7.0]])  # values after the end must not leak in
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    advantages = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ_1 = 1 − 0.25, δ_0 = 1 + 0.25 − 0.5; A_1 = δ_1, A_0 = δ_0 + 0.5·δ_1
    torch.testing.assert_close(advantages, torch.tensor([[0.75 + 0.5 * 0.75, 0.75, 0.0, 0.0]]))


def test_leave_one_out_mean_over_groups_of_rows():
    # two groups of three rows, two columns each; a NaN member is left out of the others' means
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, math.nan], [0.0, 1.0], [3.0, 2.0], [6.0, 3.0]])
    expected = torch.tensor([[4.0, 20.0], [3.5, 10.0], [1.5, math.nan], [4.5, 2.5], [3.0, 2.0], [1.5, 1.5]])
    torch.testing.assert_close(leave_one_out_mean(values, 3), expected, equal_nan=True)
    assert leave_one_out_mean(values, 1).isnan().all()  # nobody else to average


def test_carry_forward_repeats_the_last_token_over_the_padding():
    values = torch.tensor([[1.0, 2.0, 8.0, 9.0], [1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0]])
    carried = carry_forward(values, MASK)
    torch.testing.assert_close(carried[:2], torch.tensor([[1.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]]))
    assert carried[2].isnan().all()  # a masked-out completion has nothing to stand in with


def test_a_constant_critic_gives_exactly_the_rloo_advantages():
    torch.manual_seed(0)
    mask = torch.ones(8, 5)
    mask[2, 3:] = 0  # completions of different lengths
    mask[5, 1:] = 0
    rewards = torch.randn(8)
    returns = discounted_returns(rewards, mask)
    constant = torch.full((8, 5), 3.7)
    for weight in (0.0, 1.0, 1.6):
        baselines = critic_baseline(constant, returns, mask, group_size=4, weight=weight)
        rloo = token_advantages(returns, sequence_baseline(rewards, "rloo", 4), mask)
        torch.testing.assert_close(token_advantages(returns, baselines, mask), rloo)


def test_critic_baseline_by_hand():
    # one group of two completions, two tokens each: b_t^i = w·V_t^i + (G_t^j − w·V_t^j)
    values = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    returns = torch.tensor([[4.0, 4.0], [6.0, 6.0]])
    mask = torch.ones(2, 2)
    expected = torch.tensor(
        [[0.5 * 1 + (6 - 0.5 * 3), 0.5 * 2 + (6 - 0.5 * 5)], [0.5 * 3 + (4 - 0.5), 0.5 * 5 + (4 - 1)]]
    )
    torch.testing.assert_close(critic_baseline(values, returns, mask, group_size=2, weight=0.5), expected)
    # without groups the others are the rest of the batch: the same here, with a group of the whole batch
    torch.testing.assert_close(
        critic_baseline(values, returns, mask, group_size=2, weight=1.0)[0, 0], torch.tensor(4.0)
    )


def test_critic_weight_sums_give_slope_one_for_exact_values_and_zero_for_noise():
    torch.manual_seed(0)
    mask = torch.ones(64, 6)
    past = torch.randn(64, 6).cumsum(dim=1)  # what the tokens so far have earned
    future = torch.randn(64, 6)  # what is still to come, unpredictable
    returns = past + future
    xy, xx, _ = critic_weight_sums(past, returns, mask, group_size=4)
    assert (xy / xx).item() == pytest.approx(1.0, abs=0.1)
    xy, xx, _ = critic_weight_sums(torch.randn(64, 6), returns, mask, group_size=4)
    assert abs((xy / xx).item()) < 0.15
    assert recentred_explained_variance(torch.full((64, 6), 2.0), returns, mask, 4) == pytest.approx(0.0)
    assert recentred_explained_variance(past, returns, mask, 4) > 0.5


def test_optimal_token_baseline_by_hand():
    # One prompt, three completions; the first ends after one token (its second token's numbers must not count)
    returns = torch.tensor([[1.0, 0.0], [3.0, 3.0], [5.0, 5.0]])
    probs = torch.tensor([[0.5, 1.0], [0.25, 0.5], [1.0, 0.5]])  # π(a_t|s_t) of the drawn tokens
    sum_squared_probs = torch.tensor([[0.5, 7.0], [0.375, 0.5], [1.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    # 1 − 2π + Σπ²: [0.5, -], [0.875, 0.5], [0, 0.5]; summed so far, the first carried forward: W below
    weights = torch.tensor([[0.5, 0.5], [0.875, 1.375], [0.0, 0.5]])
    carried_returns = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    expected = torch.zeros(3, 2)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        expected[i] = sum(carried_returns[j] * weights[j] for j in others) / sum(weights[j] for j in others)
    baselines = optimal_token_baseline(returns, probs.log(), sum_squared_probs, mask, group_size=3)
    assert torch.allclose(baselines, expected)
    assert baselines[0, 1].item() == pytest.approx((3 * 1.375 + 5 * 0.5) / 1.875)


def test_optimal_token_baseline_with_equal_weights_is_the_others_mean_return():
    torch.manual_seed(0)
    returns = torch.randn(6, 5)
    mask = torch.ones(6, 5)
    uniform = torch.full((6, 5), 0.25)  # every token drawn with π = 1/4 out of 4 equally likely ones
    baselines = optimal_token_baseline(returns, uniform.log(), uniform, mask, group_size=3)
    assert torch.allclose(baselines, leave_one_out_mean(returns, 3), atol=1e-6)


def test_position_thirds_split_each_completion_by_its_own_length():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 2, -1, -1], [0, -1, -1, -1, -1, -1]])
    assert torch.equal(position_thirds(mask), expected)


def test_value_diagnostics_split_the_explained_variance_by_position():
    torch.manual_seed(0)
    returns = torch.randn(4, 6)
    values = returns.clone()
    values[:, 4:] = 0.0  # the values know the first two thirds exactly, nothing of the last
    mask = torch.ones(4, 6)
    diagnostics = value_diagnostics(values, returns, mask, group_size=2)
    assert diagnostics["explained_variance"] == pytest.approx(explained_variance(values, returns, mask).item())
    assert diagnostics["explained_variance_first"] == pytest.approx(1.0)
    assert diagnostics["explained_variance_middle"] == pytest.approx(1.0)
    last = torch.zeros_like(mask)
    last[:, 4:] = 1.0
    assert diagnostics["explained_variance_last"] == pytest.approx(explained_variance(values, returns, last).item())
    assert diagnostics["recentred_explained_variance_first"] == pytest.approx(1.0)
    assert diagnostics["recentred_explained_variance_last"] == pytest.approx(0.0)
    pooled = 1 - diagnostics["residual_variance"] / diagnostics["returns_variance"]
    assert pooled == pytest.approx(diagnostics["explained_variance"])


def test_value_diagnostics_split_off_the_finished_completions():
    returns = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 0.0], [-3.0, -3.0, -3.0]])
    values = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 0.0], [0.0, 0.0, 0.0]])  # exact, but blind to the penalty
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cut = torch.tensor([False, False, True])
    diagnostics = value_diagnostics(values, returns, mask, group_size=3, cut=cut)
    assert diagnostics["explained_variance_finished"] == pytest.approx(1.0)
    assert diagnostics["residual_variance_finished"] == pytest.approx(0.0)
    assert diagnostics["returns_variance_finished"] == pytest.approx(0.96)  # 1, 1, 1, 3, 3: mean 1.8, variance 0.96
    # every token: returns of mean 0 and variance 48 / 8; residuals 0 five times and -3 three times
    assert diagnostics["explained_variance"] == pytest.approx(1 - (27 / 8 - (9 / 8) ** 2) / 6)
    assert "explained_variance_finished" not in value_diagnostics(values, returns, mask, group_size=3)
