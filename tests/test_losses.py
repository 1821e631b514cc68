import torch

from hf_reinforce.losses import clipped_surrogate_loss, reinforce_loss, value_loss


def test_reinforce_loss_matches_the_seed_formula_by_hand():
    # −1/S Σ_i Σ_t A_it · log π_it over the masked tokens, S = 2 sequences
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    advantages = torch.tensor([[2.0, 2.0, 7.0], [-1.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    expected = -((2 * -1 + 2 * -2) + (-1 * -0.5 + 3 * -0.25)) / 2
    torch.testing.assert_close(reinforce_loss(logprobs, advantages, mask), torch.tensor(expected))


def test_reinforce_loss_gradient_is_minus_advantage_over_s_and_never_reaches_the_baseline():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]], requires_grad=True)
    values = torch.tensor([[0.5, 0.5], [1.0, 1.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, 2.0], [3.0, 3.0]]) - values
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    reinforce_loss(logprobs, advantages, mask).backward()
    torch.testing.assert_close(logprobs.grad, -(advantages.detach() * mask) / 2)
    assert values.grad is None


def test_value_loss_is_masked_mse_and_never_reaches_the_returns():
    values = torch.tensor([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 2.0, 0.0], [3.0, 3.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = value_loss(values, returns, mask)
    torch.testing.assert_close(loss, torch.tensor((1.0 + 0.0 + 9.0) / 3))
    loss.backward()
    assert returns.grad is None
    torch.testing.assert_close(values.grad, torch.tensor([[-2.0, 0.0, 0.0], [-6.0, 0.0, 0.0]]) / 3)


def test_centred_value_loss_ignores_a_shared_offset():
    values = torch.tensor([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # errors −1, 0, −3 over the mask: mean −4/3, centred variance ((1/3)² + (4/3)² + (5/3)²) / 3
    expected = ((1 / 3) ** 2 + (4 / 3) ** 2 + (5 / 3) ** 2) / 3
    torch.testing.assert_close(value_loss(values, returns, mask, centred=True), torch.tensor(expected))
    torch.testing.assert_close(value_loss(values + 7.0, returns, mask, centred=True), torch.tensor(expected))


def test_clipped_surrogate_has_the_seed_gradient_on_fresh_rollouts():
    torch.manual_seed(0)
    logprobs = torch.randn(3, 4).requires_grad_()
    advantages, mask = torch.randn(3, 4), torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0], [1.0] * 4])
    for sequence_level in (False, True):
        sequence_advantages = advantages[:, :1].expand(3, 4) if sequence_level else advantages
        surrogate = clipped_surrogate_loss(
            logprobs, logprobs.detach(), sequence_advantages, mask, 0.2, 0.2, sequence_level=sequence_level
        )
        (surrogate_gradient,) = torch.autograd.grad(surrogate, logprobs)
        (seed_gradient,) = torch.autograd.grad(reinforce_loss(logprobs, sequence_advantages, mask), logprobs)
        torch.testing.assert_close(surrogate_gradient, seed_gradient)


def test_clipped_surrogate_clips_by_hand():
    old = torch.zeros(2, 2)
    logprobs = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # token ratios 1.5, 1, 0.5, 1
    advantages = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])
    mask = torch.ones(2, 2)
    # min(ρA, clip(ρ)A): 1.2·2 (clipped above), 1, −0.8·1 (clipped below for A < 0), 3
    expected = -(2.4 + 1.0 - 0.8 + 3.0) / 2
    torch.testing.assert_close(
        clipped_surrogate_loss(logprobs, old, advantages, mask, 0.2, 0.2), torch.tensor(expected)
    )
    # sequence level, as trl.RLOOTrainer: ρ_i = Π_t ρ_it = 1.5 and 0.5, advantage of the first token
    sequence = torch.tensor([[2.0, 2.0], [-1.0, -1.0]])
    expected = -(1.2 * 2.0 + 0.8 * -1.0) / 2
    result = clipped_surrogate_loss(logprobs, old, sequence, mask, 0.2, 0.2, sequence_level=True)
    torch.testing.assert_close(result, torch.tensor(expected))
