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


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """Masked mean squared error between the critic's values V(s_t) and the returns it regresses.

    With `centred=True` the mean error over the batch is subtracted first (the loss is the variance of the error):
    a critic whose baselines are recentred on the other completions' returns never uses its absolute level, so
    its capacity goes to the differences between states instead of chasing a level that moves as the policy learns.
    """
    # values, returns, mask: (batch, completion_len)
    error = (values - returns.detach()) * mask
    num_tokens = mask.sum().clamp(min=1)
    if centred:
        error = (error - error.sum() / num_tokens) * mask
    return error.square().sum() / num_tokens


def clipped_surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    sequence_level: bool = False,
) -> torch.Tensor:
    """The seed's loss re-weighted for rollouts sampled by an older policy, with the ratio clipped as in PPO.

    `−1/S Σ_i Σ_t min(ρ_it·A_it, clip(ρ_it, 1−ε_low, 1+ε_high)·A_it)` with ρ_it = π(a_it|s_it)/π_old(a_it|s_it).
    At ρ = 1 (the first pass over a batch) its gradient is that of `reinforce_loss`. With `sequence_level=True` the
    ratio is the whole completion's, ρ_i = Π_t ρ_it, applied to the sequence advantage A_i = A_i0 — the loss of
    `trl.RLOOTrainer`, whose advantages are one number per completion.
    """
    # logprobs, old_logprobs, advantages, mask: (S, completion_len)
    advantages = advantages.detach()
    if sequence_level:
        log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=1)  # (S,)
        advantages = advantages[:, 0]  # (S,): constant along each completion
        mask = torch.ones_like(log_ratio)
    else:
        log_ratio = (logprobs - old_logprobs) * mask  # (S, completion_len)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    surrogate = torch.min(ratio * advantages, clipped * advantages)
    return -(surrogate * mask).sum() / logprobs.size(0)
