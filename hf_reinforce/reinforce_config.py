from dataclasses import dataclass, field

from trl import RLOOConfig

from .advantages import BASELINES


@dataclass
class ReinforceConfig(RLOOConfig):
    r"""
    Configuration for [`ReinforceTrainer`]: every [`trl.RLOOConfig`] field, plus the baseline and the critic.

    The policy loss is `−1/S Σ_i Σ_t A_t · log π(a_t|s_t)` with `A_t = G_t − b_t`, where `G_t` is the return of the
    sequence reward (reward functions minus `beta`·KL to the reference) and `b_t` the baseline chosen by `baseline`.
    """

    baseline: str = field(
        default="critic",
        metadata={
            "help": "Baseline subtracted from the return: 'critic' (a value-head model V(s_t), trained alongside), "
            "'rloo' (mean reward of the other completions of the same prompt), 'mean' (batch mean reward) or "
            "'none' (vanilla REINFORCE).",
            "choices": list(BASELINES),
        },
    )
    critic_learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Learning rate of the critic's own AdamW optimizer (used only when baseline='critic')."},
    )
    critic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Number of optimizer steps during which only the critic learns and the policy stays fixed, so "
            "that the baseline is informative before it shapes the policy gradient."
        },
    )
    critic_shares_base: bool = field(
        default=True,
        metadata={
            "help": "When the policy is a PEFT model, make the critic a second LoRA adapter (plus its head) on the "
            "policy's frozen base, so a single (possibly 4-bit) base is held in memory. Ignored for full "
            "fine-tuning, where the critic is always its own model."
        },
    )
    critic_epochs: int = field(
        default=1,
        metadata={"help": "Passes of critic regression over each batch of rollouts."},
    )
    critic_max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Gradient-norm clip for the critic's updates (0 disables clipping)."},
    )
    whiten_advantages: bool = field(
        default=False,
        metadata={"help": "Shift and scale the per-token advantages of each batch to mean 0 and variance 1."},
    )
    gamma: float = field(
        default=1.0,
        metadata={
            "help": "Discount of the reward paid at the last completion token; 1.0 is the undiscounted return, "
            "where every token's return is the sequence reward R."
        },
    )

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(
                f"baseline={self.baseline!r} is not supported; set `baseline` to one of {', '.join(BASELINES)}."
            )
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError(
                f"baseline='rloo' needs at least two completions per prompt, but num_generations="
                f"{self.num_generations}; raise `num_generations` or use baseline='critic'."
            )
        if self.num_generations < 1:
            raise ValueError(f"num_generations={self.num_generations} must be at least 1.")
        if self.critic_learning_rate <= 0:
            raise ValueError(f"critic_learning_rate={self.critic_learning_rate} must be positive.")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps={self.critic_warmup_steps} must be 0 or more.")
        if self.critic_epochs < 1:
            raise ValueError(f"critic_epochs={self.critic_epochs} must be at least 1.")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in (0, 1]; 1.0 is the undiscounted return.")
        if self.num_iterations != 1:
            raise ValueError(
                f"num_iterations={self.num_iterations}: REINFORCE is on-policy, each batch of rollouts is used for "
                "exactly one policy update. Set `num_iterations=1`."
            )
        try:
            super().__post_init__()
        except ValueError as error:
            # RLOO's last check asks for groups of at least two completions; a critic or no baseline needs no groups.
            groupless = self.num_generations == 1 and self.baseline in ("critic", "none")
            if not (groupless and "2 generations" in str(error)):
                raise
        # RLOO's flag and ours mean the same thing here; honour either.
        self.whiten_advantages = self.whiten_advantages or self.normalize_advantages
