"""The three losses of the method, as pure functions of tensors and masks (no model needed to test them)."""

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    chosen_prob: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss `−p·log σ(r_c − r_r − m) − (1−p)·log σ(r_r − r_c − m)`, averaged over the batch.

    `p` is the probability that annotators prefer `chosen` (1.0 gives TRL's hard-label loss) and `m` TRL's optional
    margin, asked of whichever answer is preferred, so `p=0` is exactly the loss with chosen and rejected swapped.
    `logsigmoid` keeps it finite for rewards of any size.
    """
    # rewards_chosen, rewards_rejected, chosen_prob, margin: (batch,)
    reward_gap = rewards_chosen - rewards_rejected
    if margin is None:
        margin = torch.zeros_like(reward_gap)
    log_prob_chosen_wins = F.logsigmoid(reward_gap - margin)
    if chosen_prob is None:
        return -log_prob_chosen_wins.mean()
    log_prob_rejected_wins = F.logsigmoid(-reward_gap - margin)
    chosen_prob = chosen_prob.to(reward_gap.dtype)
    return -(chosen_prob * log_prob_chosen_wins + (1 - chosen_prob) * log_prob_rejected_wins).mean()


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The seed's policy loss `−1/S Σ_i Σ_t A_it · log π(a_it | s_it)` over S sampled completions.

    Advantages are treated as constants: the policy gradient never flows into whatever produced the baseline.
    """
    # logprobs, advantages, mask: (S, completion_len); mask is 1 on completion tokens, 0 on padding
    num_samples = logprobs.size(0)
    return -(advantages.detach() * logprobs * mask).sum() / num_samples


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean squared error between the critic's values V(s_t) and the returns it regresses."""
    # values, returns, mask: (batch, completion_len)
    squared_error = (values - returns.detach()) ** 2 * mask
    return squared_error.sum() / mask.sum().clamp(min=1)
