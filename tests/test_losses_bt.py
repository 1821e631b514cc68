import math

import pytest
import torch
import torch.nn.functional as F

from hf_reinforce.losses import bradley_terry_loss


def test_hard_label_values_match_hand_computation():
    rewards_chosen = torch.tensor([1.0, 0.0, -2.0])
    rewards_rejected = torch.tensor([0.0, 0.0, 1.0])
    # Gaps 1, 0 and −3: −log σ(1) = log(1 + e^−1), −log σ(0) = log 2, −log σ(−3) = log(1 + e^3)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert bradley_terry_loss(rewards_chosen, rewards_rejected).item() == pytest.approx(expected, rel=1e-6)
    all_chosen = torch.ones(3)
    assert bradley_terry_loss(rewards_chosen, rewards_rejected, all_chosen).item() == pytest.approx(expected, rel=1e-6)


def test_soft_label_value_matches_hand_computation():
    # p = 0.25 and gap 2: 0.25·log(1 + e^−2) + 0.75·log(1 + e^2)
    expected = 0.25 * math.log(1 + math.exp(-2)) + 0.75 * math.log(1 + math.exp(2))
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), chosen_prob=torch.tensor([0.25]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_margin_is_asked_of_the_preferred_answer():
    chosen, rejected, margin = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])
    # p = 1: the gap 1 minus the margin 1 leaves −log σ(0) = log 2
    assert bradley_terry_loss(chosen, rejected, margin=margin).item() == pytest.approx(math.log(2), rel=1e-6)
    # p = 0: `rejected` is preferred and must beat `chosen` by the margin, −log σ(−1 − 1) = log(1 + e^2)
    loss = bradley_terry_loss(chosen, rejected, chosen_prob=torch.tensor([0.0]), margin=margin)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)


def test_larger_margin_gives_larger_loss():
    chosen, rejected = torch.tensor([0.5, 2.0]), torch.tensor([0.0, -1.0])
    chosen_prob = torch.tensor([0.8, 0.3])
    losses = [bradley_terry_loss(chosen, rejected, chosen_prob, torch.full((2,), m)).item() for m in (0.0, 0.5, 2.0)]
    assert losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("with_margin", [False, True])
def test_chosen_prob_zero_equals_swapping_chosen_and_rejected(with_margin):
    generator = torch.Generator().manual_seed(0)
    rewards_chosen, rewards_rejected = torch.randn(2, 16, generator=generator)
    margin = torch.rand(16, generator=generator) if with_margin else None
    swapped = bradley_terry_loss(rewards_rejected, rewards_chosen, margin=margin)
    never_chosen = bradley_terry_loss(rewards_chosen, rewards_rejected, torch.zeros(16), margin)
    torch.testing.assert_close(never_chosen, swapped)
    assert not torch.allclose(never_chosen, bradley_terry_loss(rewards_chosen, rewards_rejected, margin=margin))


def test_hard_labels_equal_trl_loss():
    generator = torch.Generator().manual_seed(1)
    rewards_chosen, rewards_rejected, margin = torch.randn(3, 16, generator=generator)
    trl_loss = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()  # trl.RewardTrainer.compute_loss
    torch.testing.assert_close(bradley_terry_loss(rewards_chosen, rewards_rejected, torch.ones(16), margin), trl_loss)


@pytest.mark.parametrize("margin", [None, 0.7])
def test_half_probability_gives_zero_gradient_at_equal_rewards(margin):
    rewards_chosen = torch.full((4,), 0.3, requires_grad=True)
    rewards_rejected = torch.full((4,), 0.3, requires_grad=True)
    margin = None if margin is None else torch.full((4,), margin)
    bradley_terry_loss(rewards_chosen, rewards_rejected, torch.full((4,), 0.5), margin).backward()
    assert torch.equal(rewards_chosen.grad, torch.zeros(4))
    assert torch.equal(rewards_rejected.grad, torch.zeros(4))


def test_gradient_is_sigmoid_of_gap_minus_chosen_prob():
    # dL/d(gap) = σ(gap) − p per pair (divided by the batch size), so the loss is minimal where σ(gap) = p
    gap = torch.tensor([0.0, 1.0, math.log(0.8 / 0.2)])
    chosen_prob = torch.tensor([0.75, 0.2, 0.8])
    rewards_chosen = gap.clone().requires_grad_(True)
    bradley_terry_loss(rewards_chosen, torch.zeros(3), chosen_prob).backward()
    expected = torch.tensor([0.5 - 0.75, 1 / (1 + math.exp(-1)) - 0.2, 0.0]) / 3
    torch.testing.assert_close(rewards_chosen.grad, expected)


@pytest.mark.parametrize("chosen_prob", [1.0, 0.0, 0.5])
def test_stable_for_rewards_of_order_1e4(chosen_prob):
    rewards_chosen = torch.tensor([1e4, -1e4], requires_grad=True)
    rewards_rejected = torch.tensor([-1e4, 1e4], requires_grad=True)
    loss = bradley_terry_loss(rewards_chosen, rewards_rejected, torch.full((2,), chosen_prob))
    loss.backward()
    # Gaps ±2e4: −log σ(−x) ≈ x and −log σ(x) ≈ 0, so each pair costs 2e4 times the probability it ranks lower,
    # which sums to 2e4 over the two pairs for every p
    assert loss.item() == pytest.approx(2e4 / 2, rel=1e-6)
    assert torch.isfinite(rewards_chosen.grad).all() and torch.isfinite(rewards_rejected.grad).all()
    # dL/d(gap) = σ(gap) − p is then 1 − p or −p, divided by the batch size
    torch.testing.assert_close(rewards_chosen.grad, torch.tensor([1 - chosen_prob, -chosen_prob]) / 2)
