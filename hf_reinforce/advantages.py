"""Returns, baselines and advantages: pure functions over (batch, completion_len) tensors and their masks.

Notation of the seed: S sampled completions i, tokens a_t in states s_t (the prompt and the tokens before a_t), the
return G_t of token t, a baseline b_t, the advantage A_t = G_t − b_t and the policy loss
−1/S Σ_i Σ_t A_t·log π(a_t|s_t).
Masks are 1 on completion tokens (up to and including EOS) and 0 on the padding after it, so a completion that ends
early simply has a shorter run of ones.

Every baseline here is unbiased: b_t^i may depend on s_t^i (the tokens before a_t) and on the *other* completions,
never on a_t or on what follows it, so E[b_t·∇log π(a_t|s_t)] = b_t·Σ_a ∇π(a|s_t) = 0 and subtracting it leaves the
expected gradient unchanged while it can shrink its variance.
"""

import torch


BASELINES = ("critic", "otb", "rloo", "mean", "none")
# Bounds of the weight w of the critic in `critic_baseline`; above 1 corrects a critic that moves too little.
MAX_CRITIC_WEIGHT = 2.0


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Monte-Carlo return G_t = γ^(T−t)·R of a reward R paid at the last completion token T.

    With γ = 1 (the seed's setting) every token's return is the sequence reward R itself.
    """
    # rewards: (batch,)   mask: (batch, completion_len)
    lengths = mask.sum(dim=1, keepdim=True)  # (batch, 1)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)  # (1, completion_len)
    steps_to_end = (lengths - 1 - positions).clamp(min=0).to(rewards.dtype)
    return rewards.unsqueeze(1) * gamma**steps_to_end * mask  # (batch, completion_len)


def token_rewards(rewards: torch.Tensor, per_token_kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards r_t = −β·KL_t, plus the sequence reward R on the last completion token.

    The KL penalty is paid where it is incurred, so a value critic can tell a state whose KL is already spent from
    one whose KL is still to come.
    """
    # rewards: (batch,)   per_token_kl, mask: (batch, completion_len)
    lengths = mask.sum(dim=1).long()  # (batch,)
    last = torch.nn.functional.one_hot((lengths - 1).clamp(min=0), mask.size(1)).to(rewards.dtype)  # (B, C)
    last = last * (lengths > 0).unsqueeze(1)
    return (-beta * per_token_kl + rewards.unsqueeze(1) * last) * mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{k≥t} γ^(k−t)·r_k: the return of token t from per-token rewards (0 on padding)."""
    # rewards, mask: (batch, completion_len)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return returns * mask


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> torch.Tensor:
    """Generalised advantage estimation: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ·b_{t+1} − b_t, b after the end = 0.

    `values` are the baselines b_t. With λ = 1 this is exactly the seed's Monte-Carlo advantage G_t − b_t; λ < 1
    trades the variance of the sampled future for the bias of the baselines.
    """
    # rewards, values, mask: (batch, completion_len)
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # b_{t+1}, 0 after the end
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = deltas[:, t] + gamma * lam * running * mask[:, t]
        advantages[:, t] = running
    return advantages * mask


def leave_one_out_mean(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of the other members of each consecutive group of `group_size`.

    NaN members are left out of the others' means, and get NaN themselves, as does a member with no other present.
    """
    # values: (batch, ...) with batch divisible by group_size; the mean is over dim 0 within each group
    grouped = values.view(-1, group_size, *values.shape[1:])  # (num_groups, group_size, ...)
    present = (~grouped.isnan()).sum(dim=1, keepdim=True)  # (num_groups, 1, ...)
    others_sum = grouped.nansum(dim=1, keepdim=True) - grouped  # NaN for a NaN member
    return (others_sum / (present - 1)).view(values.shape)  # NaN too where no other member is present


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
        return leave_one_out_mean(rewards, num_generations)
    raise ValueError(f"Unknown critic-free baseline {kind!r}; expected one of 'rloo', 'mean', 'none'.")


def carry_forward(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's values on its completion tokens, its last one repeated over the padding after it; NaN for a row
    without tokens. Lets a completion that ended early still stand beside longer ones at every position."""
    # values, mask: (batch, completion_len)
    lengths = mask.sum(dim=1).long()  # (batch,)
    positions = torch.arange(values.size(1), device=values.device).unsqueeze(0)  # (1, completion_len)
    index = torch.minimum(positions, (lengths - 1).clamp(min=0).unsqueeze(1))  # (batch, completion_len)
    carried = values.gather(1, index)
    return carried.masked_fill((lengths == 0).unsqueeze(1), torch.nan)


def critic_baseline(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group_size: int, weight: float = 1.0
) -> torch.Tensor:
    """b_t^i = w·V(s_t^i) + mean_{j≠i}(G_t^j − w·V(s_t^j)): the critic recentred on the other completions.

    The others are the `group_size` consecutive completions of one prompt, or the whole batch when each prompt is
    sampled once; a completion shorter than t stands in with its last token's G − w·V. The seed's baseline is V(s_t);
    its errors that are shared by the others at the same step (a level that lags the rising rewards, an expected
    future the critic has not learned yet) cancel, and what remains is what the critic knows of *this* completion's
    state against the others': the tokens it has written so far, and, without groups, its prompt.

    - w = 0, or a critic that is constant: b_t^i = mean_{j≠i} G_t^j, with the reward paid at the end exactly
      RLOO's leave-one-out mean (the batch mean without groups): an untrained or lagging critic costs nothing.
    - w = 1: V(s_t^i) plus the others' mean error, the seed's state-dependent baseline.

    Unbiased for any w that does not depend on completion i: b_t^i uses only s_t^i and the other completions, never
    a_t or what follows it. NaN returns (unscorable completions) are left out of the others' mean.
    """
    # values, returns, mask: (batch, completion_len)   -> (batch, completion_len), NaN where no other completion
    residuals = carry_forward(returns - weight * values, mask)  # (batch, completion_len)
    return weight * values + leave_one_out_mean(residuals, group_size)


def optimal_token_baseline(
    returns: torch.Tensor,
    token_logps: torch.Tensor,
    sum_squared_probs: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """The optimal token baseline (OTB, arXiv 2602.07078), critic-free, from the sampling pass alone:
    b_t^i = Σ_{j≠i} G_t^j·W_t^j / Σ_{j≠i} W_t^j with W_t = Σ_{k≤t} (1 − 2·π(a_k|s_k) + Σ_a π(a|s_k)²).

    W_t is ‖∇_logits log π(a_k|s_k)‖² summed over the tokens so far: how much gradient a completion carries up to t,
    so a completion whose tokens were near-certain weighs little. The others are the `group_size` consecutive
    completions of one prompt (the whole batch when each prompt is sampled once); completion i is left out of its
    own baseline, which keeps it unbiased (the paper's sum runs over the whole group). A completion shorter than t
    stands in with its last token's G and W. Probabilities are those of the sampling distribution (its temperature).
    """
    # returns, token_logps, sum_squared_probs, mask: (batch, completion_len)   -> (batch, completion_len)
    gradient_norms = (1 - 2 * token_logps.exp() + sum_squared_probs) * mask  # (B, C): ‖e_a − π‖² per token
    weights = carry_forward(gradient_norms.cumsum(dim=1), mask)  # (B, C): W_t
    weighted_returns = carry_forward(returns, mask) * weights  # (B, C)
    others_weighted = leave_one_out_mean(weighted_returns, group_size)  # the 1/(n−1) factors cancel in the ratio
    others_weights = leave_one_out_mean(weights, group_size)
    return others_weighted / others_weights.clamp(min=1e-12)


def recentred(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group_size: int):
    """x = V(s_t) − others' mean V(s_t) and y = G_t − others' mean G_t, with the mask of tokens where both exist:
    what `critic_baseline` asks of the critic is to predict y by x."""
    # values, returns, mask: (batch, completion_len)
    x = values - leave_one_out_mean(carry_forward(values, mask), group_size)
    y = returns - leave_one_out_mean(carry_forward(returns, mask), group_size)
    return x, y, mask * ~(x.isnan() | y.isnan())


def critic_weight_sums(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """[Σ x·y, Σ x², Σ y²] for the slope of y = G_t − others' mean G_t on x = V(s_t) − others' mean V(s_t).

    The slope is the weight w of `critic_baseline` that minimises the advantages' variance: 1 for exact values, 0
    for values that are noise, above 1 for values that move less than the returns do.
    """
    x, y, usable = recentred(values, returns, mask, group_size)
    return regression_sums(y, x, usable)


def recentred_explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group_size: int, where: torch.Tensor | None = None
) -> torch.Tensor:
    """1 − Σ(y − x)² / Σ y² with x, y of `recentred`: the share of the returns' deviations from the other
    completions' that the critic's deviations predict. 0 for a constant critic; unlike `explained_variance`, blind to
    errors that every completion shares at a step, which the recentred baseline cancels. `where` (B, C) restricts the
    sums to some tokens (the others still count as the others' mean)."""
    x, y, usable = recentred(values, returns, mask, group_size)
    if where is not None:
        usable = usable * where
    x, y = x.nan_to_num(0.0) * usable, y.nan_to_num(0.0) * usable
    return 1 - (y - x).square().sum() / y.square().sum().clamp(min=1e-12)


def position_thirds(mask: torch.Tensor) -> torch.Tensor:
    """Which third of its completion each token lies in: 0 (first), 1 (middle) or 2 (last); −1 on padding. A token
    at position t of a completion of L tokens lies in third ⌊3t/L⌋."""
    # mask: (batch, completion_len)   -> (batch, completion_len), long
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)  # (1, C)
    return torch.where(mask.bool(), torch.div(3 * positions, lengths, rounding_mode="floor"), -1)


def regression_sums(targets: torch.Tensor, predictors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[Σ x·y, Σ x², Σ y²] over masked entries: the least-squares slope of y on x through 0 is Σ x·y / Σ x².

    Used to weigh a critic term by how much of the return it actually predicts: for exact values the slope is 1, for
    values that are noise 0, for values that move less than the returns do above 1.
    """
    # targets, predictors, mask: (batch, completion_len) or (batch,)
    targets, predictors = targets.nan_to_num(0.0) * mask, predictors.nan_to_num(0.0) * mask
    return torch.stack([(targets * predictors).sum(), predictors.square().sum(), targets.square().sum()])  # (3,)


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


POSITIONS = ("first", "middle", "last")


def value_diagnostics(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group_size: int, cut: torch.Tensor | None = None
) -> dict[str, float]:
    """What the values know of the returns, taken before the critic learns from them: the explained variance, raw
    and recentred (`recentred_explained_variance`), over all tokens and per third of the answers (`position_thirds`),
    and the variances of the returns and of their residuals, whose sums over steps give a pooled explained variance.

    With `cut` (which completions were cut at the length limit), the same three figures over the finished
    completions' tokens alone (`*_finished`): a missing-EOS penalty is paid on cut completions only, and these say
    what the values know of the returns without it."""
    # values, returns, mask: (batch, completion_len)   cut: (batch,) bool
    thirds = position_thirds(mask)
    diagnostics = {
        "explained_variance": explained_variance(values, returns, mask),
        "recentred_explained_variance": recentred_explained_variance(values, returns, mask, group_size),
        "returns_variance": masked_var(returns, mask),
        "residual_variance": masked_var(returns - values, mask),
    }
    for index, position in enumerate(POSITIONS):
        where = mask * (thirds == index)
        diagnostics[f"explained_variance_{position}"] = explained_variance(values, returns, where)
        diagnostics[f"recentred_explained_variance_{position}"] = recentred_explained_variance(
            values, returns, mask, group_size, where
        )
    if cut is not None:
        finished = mask * ~cut.unsqueeze(1)
        diagnostics["explained_variance_finished"] = explained_variance(values, returns, finished)
        diagnostics["returns_variance_finished"] = masked_var(returns, finished)
        diagnostics["residual_variance_finished"] = masked_var(returns - values, finished)
    values = torch.stack([value.float() for value in diagnostics.values()]).tolist()  # one copy to the host
    return dict(zip(diagnostics, values))
