import math
from dataclasses import dataclass, field

from trl import RLOOConfig

from .advantages import BASELINES
from .config_defaults import overwrite_output_dir_field, resolve_device_defaults, resume_from_checkpoint_field


@dataclass
class ReinforceConfig(RLOOConfig):
    r"""
    Configuration for [`ReinforceTrainer`]: every [`trl.RLOOConfig`] field, plus the baseline and the critic.

    The policy loss is `−1/S Σ_i Σ_t A_t · log π(a_t|s_t)` with `A_t = G_t − b_t`, where `G_t` is the return of token t
    (the reward functions' score minus `beta` times the KL to the reference still to come) and `b_t` the baseline
    chosen by `baseline`. With `num_iterations > 1` each batch of rollouts is reused with the clipped, importance-
    weighted form of that loss (`epsilon`, `epsilon_high`), as in `trl.RLOOTrainer`.
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
        default=1e-3,
        metadata={
            "help": "Learning rate of the critic's own AdamW optimizer (used only when baseline='critic'). The critic "
            "regresses returns in normalised units (running mean and standard deviation), so one value serves "
            "rewards of any scale."
        },
    )
    critic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Number of optimizer steps during which the critic learns but the baseline ignores it: the "
            "policy learns meanwhile with the critic-free fallback (leave-one-out mean, or batch mean when "
            "num_generations=1). Rarely needed: the critic's terms are weighted by how well they have been predicting "
            "the returns, so an untrained critic is ignored anyway."
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
    critic_layers: int | None = field(
        default=None,
        metadata={
            "help": "With critic_shares_base, the number of top decoder layers the critic's adapter trains. The "
            "layers below carry no critic weights, so their forward is the reference model's, already computed for "
            "the KL penalty: a critic on a quarter of the layers (the default, None) costs about a quarter of a full "
            "one. 0 trains every layer. Ignored when the critic starts from a reward adapter, whose layers it keeps."
        },
    )
    reward_shares_base: bool | None = field(
        default=None,
        metadata={
            "help": "With a PEFT policy, put a reward model that is a LoRA adapter trained on the policy's base (with "
            "the same quantization) on that base as a third, frozen adapter with its score head, instead of loading "
            "a second copy of the base: policy, reference, critic and reward model then share one (4-bit) base. None "
            "(the default) does so whenever it is possible, True requires it, False never does."
        },
    )
    critic_epochs: int = field(
        default=1,
        metadata={"help": "Optimizer steps of critic regression on each batch of rollouts."},
    )
    critic_max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Gradient-norm clip for the critic's updates (0 disables clipping)."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the reward of a completion cut at max_completion_length without an EOS, as TRL's "
            "PPO trainer did. Reward models never score such a completion as finished (no EOS or end-of-turn is "
            "added to it), whatever this is; use `mask_truncated_completions` to leave them out of the loss instead."
        },
    )
    dequantize_for_inference: bool = field(
        default=False,
        metadata={
            "help": "Keep each 4-bit layer's weight dequantised, with its active LoRA adapters merged in, for the "
            "passes that need no gradient (generation, the rollouts' and the reference's log-probabilities, a reward "
            "or critic adapter on the policy's base); the passes with gradients are unchanged. About twice as fast a "
            "generation on CPU, at the memory of an unquantised copy of the base (and of one merged copy); no effect "
            "without 4-bit layers."
        },
    )
    inverse_cdf_sampling: bool = field(
        default=False,
        metadata={
            "help": "Draw each token by inverse transform sampling (one uniform number per completion against the "
            "cumulative probabilities) instead of `torch.multinomial`, which on a CPU draws one exponential number "
            "per vocabulary entry: the same distribution, other draws, about 40 ms less a token for 32 completions "
            "over a 49k vocabulary on 2 cores. Without `generation_kwargs`, the drawn tokens' log-probabilities are "
            "kept from generation, so the KL penalty needs no second forward over the rollouts. Plain temperature "
            "sampling with transformers' `generate` only: no top_k, top_p, min_p or repetition_penalty, no vLLM or "
            "continuous batching."
        },
    )
    whiten_advantages: bool = field(
        default=False,
        metadata={"help": "Shift and scale the per-token advantages of each batch to mean 0 and variance 1."},
    )
    gamma: float = field(
        default=1.0,
        metadata={
            "help": "Discount of the per-token rewards; 1.0 is the undiscounted return, where every token's return is "
            "the sequence reward R minus the KL penalty still to come."
        },
    )
    lam: float = field(
        default=1.0,
        metadata={
            "help": "GAE λ of the critic's advantages: 1.0 is the Monte-Carlo advantage G_t − b_t of the seed "
            "(unbiased); below 1 trades sampled returns for the critic's own predictions. The critic itself always "
            "regresses Monte-Carlo returns."
        },
    )
    resume_from_checkpoint: str | None = resume_from_checkpoint_field()
    overwrite_output_dir: bool = overwrite_output_dir_field()

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
        if not (math.isfinite(self.critic_learning_rate) and self.critic_learning_rate > 0):
            raise ValueError(f"critic_learning_rate={self.critic_learning_rate} must be a positive number.")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps={self.critic_warmup_steps} must be 0 or more.")
        if self.critic_layers is not None and self.critic_layers < 0:
            raise ValueError(f"critic_layers={self.critic_layers} must be None (a quarter), 0 (all) or positive.")
        if self.critic_epochs < 1:
            raise ValueError(f"critic_epochs={self.critic_epochs} must be at least 1.")
        if not (math.isfinite(self.critic_max_grad_norm) and self.critic_max_grad_norm >= 0):
            raise ValueError(f"critic_max_grad_norm={self.critic_max_grad_norm} must be 0 (no clipping) or more.")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in (0, 1]; 1.0 is the undiscounted return.")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam} must lie in [0, 1]; 1.0 is the Monte-Carlo advantage.")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty={self.missing_eos_penalty} must be a finite number or None.")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be at least 1.")
        if self.inverse_cdf_sampling:
            self._check_inverse_cdf_sampling()
        resolve_device_defaults(self)
        try:
            super().__post_init__()
        except ValueError as error:
            # RLOO's last check asks for groups of at least two completions; the other baselines need no groups.
            groupless = self.num_generations == 1 and self.baseline != "rloo"
            if not (groupless and "2 generations" in str(error)):
                raise
        # RLOO's flag and ours mean the same thing here; honour either.
        self.whiten_advantages = self.whiten_advantages or self.normalize_advantages

    def _check_inverse_cdf_sampling(self) -> None:
        """inverse_cdf_sampling replaces plain temperature sampling in transformers' `generate`, and nothing else."""
        unsupported = {
            "top_k": self.top_k not in (0, None),
            "top_p": self.top_p != 1.0,
            "min_p": self.min_p is not None,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "use_vllm": self.use_vllm,
            "use_transformers_continuous_batching": self.use_transformers_continuous_batching
            or bool(getattr(self, "use_transformers_paged", False)),
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise ValueError(
                    "inverse_cdf_sampling draws from the plain temperature distribution with transformers' "
                    f"`generate`, but {name}={getattr(self, name)!r}; reset `{name}` or set "
                    "`inverse_cdf_sampling: false`."
                )

    # Why: `Trainer` pickles its arguments into training_args.bin beside every saved model and checkpoint, which
    # `push_to_hub` uploads; the Hub token stays in memory only
    def __getstate__(self):
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state
