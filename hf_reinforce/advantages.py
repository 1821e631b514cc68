"""Returns, baselines and advantages: pure functions over (batch, completion_len) tensors and their masks.

Masks are 1 on completion tokens (up to and including EOS) and 0 on the padding after it, so a completion that
ends early simply has a shorter run of ones.
"""

import torch


BASELINES = ("critic", "rloo", "mean", "none")


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Monte-Carlo return G_t = γ^(T−t)·R of a reward R paid at the last completion token T.

    With γ = 1 (the seed's setting) every token's return is the sequence reward R itself.
    """
    # rewards: (batch,)   mask: (batch, completion_len)
    lengths = mask.sum(dim=1, keepdim=True)  # (batch, 1)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)  # (1, completion_len)
    steps_to_end = (lengths - 1 - positions).clamp(min=0).to(rewards.dtype)
    return rewards.unsqueeze(1) * gamma**steps_to_end * mask  # (batch, completion_len)


def sequence_baseline(rewards: torch.Tensor, kind: str, num_generations: int = 1) -> torch.Tensor:
    """A critic-free baseline per sequence: `"none"` (0), `"mean"` (batch mean) or `"rloo"` (leave-one-out).

    For `"rloo"` the batch holds `num_generations` consecutive completions per prompt, and each completion's
    baseline is the mean reward of the other completions of the same prompt. NaN rewards (unscorable completions)
    are left out of every mean; a baseline with nothing to average is NaN.
    """
    # rewards: (batch,)
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "mean":
        return torch.nanmean(rewards).expand_as(rewards)
    if kind == "rloo":
        if num_generations < 2:
            raise ValueError("The leave-one-out baseline needs num_generations >= 2.")
        grouped = rewards.view(-1, num_generations)  # (num_prompts, num_generations)
        scorable = (~grouped.isnan()).sum(dim=1, keepdim=True)  # (num_prompts, 1)
        others_sum = grouped.nansum(dim=1, keepdim=True) - grouped
        return (others_sum / (scorable - 1)).view(-1)
    raise ValueError(f"Unknown critic-free baseline {kind!r}; expected one of 'rloo', 'mean', 'none'.")


def token_advantages(returns: torch.Tensor, baselines: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A_t = G_t − b_t on completion tokens, 0 on padding; `baselines` is V(s_t) per token or b per sequence."""
    # returns, mask: (batch, completion_len)   baselines: (batch, completion_len) or (batch,)
    if baselines.dim() == 1:
        baselines = baselines.unsqueeze(1)
    return (returns - baselines) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of the masked entries."""
    return masked_mean((values - masked_mean(values, mask)) ** 2, mask)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale the masked entries to mean 0 and variance 1; padding stays 0."""
    # values, mask: (batch, completion_len)
    whitened = (values - masked_mean(values, mask)) * torch.rsqrt(masked_var(values, mask) + eps)
    return whitened * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(G − V) / Var(G) over masked tokens: 1 is a perfect critic, 0 no better than a constant.

    NaN when the returns do not vary, where the ratio means nothing (the trainer's logger skips NaN).
    """
    # values, returns, mask: (batch, completion_len)
    returns_var = masked_var(returns, mask)
    if returns_var == 0:
        return torch.full_like(returns_var, torch.nan)
    return 1 - masked_var(returns - values, mask) / returns_var
