import torch

from hf_reinforce.losses import reinforce_loss, value_loss


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
