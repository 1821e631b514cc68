import math
import warnings
from dataclasses import dataclass, field, fields

from trl import RLOOConfig

from .advantages import BASELINES, MAX_CRITIC_WEIGHT
from .config_defaults import overwrite_output_dir_field, resolve_device_defaults, resume_from_checkpoint_field


# Fields that act only through the critic, which only baseline="critic" builds: set under another baseline, they warn.
CRITIC_ONLY_FIELDS = (
    "critic_learning_rate",
    "critic_weight",
    "critic_warmup_steps",
    "critic_shares_base",
    "critic_layers",
    "critic_epochs",
    "critic_max_grad_norm",
    "critic_pretraining_epochs",
    "critic_head_only",
    "lam",
)


@dataclass
class ReinforceConfig(RLOOConfig):
    r"""
    Configuration class for the [`ReinforceTrainer`]: REINFORCE with a baseline, a value-head critic by default.

    This class lists only the parameters that this package adds to [`trl.RLOOConfig`] or redefines; every other field
    of [`trl.RLOOConfig`] and [`~transformers.TrainingArguments`] keeps its meaning.

    The policy loss is `−1/S Σ_i Σ_t A_t · log π(a_t|s_t)` with `A_t = G_t − b_t`, where `G_t` is the return of token t
    (the reward functions' score minus `beta` times the KL to the reference still to come) and `b_t` the baseline
    chosen by `baseline`. With `num_iterations > 1` each batch of rollouts is reused with the clipped, importance-
    weighted form of that loss (`epsilon`, `epsilon_high`), as in `trl.RLOOTrainer`.

    Parameters:
        > Parameters that control the baseline and the returns

        baseline (`str`, *optional*, defaults to `"critic"`):
            Baseline `b_t` subtracted from the return `G_t`, one of:

            - `"critic"`: a value-head critic `V(s_t)`, trained alongside the policy, recentred on the other
              completions: `b_t^i = w·V(s_t^i) + mean_{j≠i}(G_t^j − w·V(s_t^j))`. The others `j` are the other
              completions of the same prompt, or the rest of the batch when `num_generations=1`; a completion shorter
              than `t` stands in with its last token's `G − w·V`, an unscorable one is left out. `w` is the
              least-squares slope through 0 of `G_t^i − mean_{j≠i} G_t^j` on `V(s_t^i) − mean_{j≠i} V(s_t^j)`, fitted
              on earlier training batches only (weighted by `0.9^age`), clipped to `[0, 2]`, times its calibration:
              the slope, within `[0, 1]`, of each later batch's `G_t^i − mean_{j≠i} G_t^j` on the critic's term as
              the slope fitted before that batch weighted it (weighted by `0.7^age`), so that w follows how the
              critic predicts batches it has not been fitted on. It is 0 for the first two batches, during
              `critic_warmup_steps` and while the recentred values have (next to) no variance. With
              `w = 0`, `b_t^i` is the leave-one-out mean of the others' returns `G_t^j`; with `w = 1`, `V(s_t^i)` plus
              the others' mean error.
            - `"otb"`: the optimal token baseline (arXiv 2602.07078), critic-free:
              `b_t^i = Σ_{j≠i} G_t^j·W_t^j / Σ_{j≠i} W_t^j` over the same others as the critic's, with
              `W_t = Σ_{k≤t} (1 − 2·π(a_k|s_k) + Σ_a π(a|s_k)²)` from the sampling distribution (a forward pass at
              the sampling temperature, or the inverse-CDF sampler's record).
            - `"rloo"`: the mean reward of the other completions of the same prompt, the KL penalty summed into each
              sequence reward, as in [`trl.RLOOTrainer`]. Needs `num_generations >= 2`.
            - `"mean"`: the mean return `G_0` of the batch.
            - `"none"`: no baseline (vanilla REINFORCE).
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount of the per-token rewards, under every baseline. `1.0` is the undiscounted return, where every
            token's return is the sequence reward `R` minus the KL penalty still to come.
        missing_eos_penalty (`float`, *optional*):
            Subtracted from the reward of a completion cut at `max_completion_length` without an EOS, under every
            baseline, as TRL's PPO trainer did. Reward models never score such a completion as finished (no EOS or
            end-of-turn is added to it), whatever this is; use `mask_truncated_completions` to leave them out of the
            loss instead.
        normalize_advantages (`bool`, *optional*, defaults to `False`):
            Whether to whiten the per-token advantages `A_t`, under every baseline: shifted and scaled to mean `0.0`
            and variance `1.0` over all completion tokens of the generation batch (each process's share of it),
            padding and unscorable completions left out.

        > Parameters that control the critic (only used when `baseline="critic"`; set otherwise, they warn)

        critic_learning_rate (`float`, *optional*, defaults to `1e-3`):
            Learning rate of the critic's own AdamW optimizer. The critic regresses returns in normalised units
            (running mean and standard deviation), so one value serves rewards of any scale.
        critic_weight (`float`, *optional*):
            `w` held fixed instead of fitted. `0.0` is the isolated ablation of the critic: the same trainer, returns
            and critic training, with baselines that ignore the critic (the others' mean of `G_t`); `1.0` is
            `V(s_t)` itself, recentred. `None` (the default) fits `w` as described under `baseline`.
        critic_warmup_steps (`int`, *optional*, defaults to `0`):
            Number of optimizer steps during which `w = 0`: the critic learns, and the policy learns too, with the
            critic-free fallback, the leave-one-out mean of the other completions' returns (the rest of the batch
            when `num_generations=1`). Rarely needed: `w` stays 0 while the critic's recentred values do not vary.
        critic_epochs (`int`, *optional*, defaults to `1`):
            Optimizer steps of critic regression on each batch of rollouts.
        critic_max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient-norm clip for the critic's updates (`0` disables clipping).
        critic_head_only (`bool`, *optional*, defaults to `False`):
            Train the value head alone on a frozen backbone (with a critic copied from a reward adapter, on the
            reward model's own hidden states), whose forward then runs without gradients.
        critic_pretraining_epochs (`int`, *optional*, defaults to `1`):
            Epochs of regression on the trainer's `value_pretraining_dataset` before a fresh run starts (answers of
            the initial policy, each prefix's target its answer's reward), in batches of
            `per_device_train_batch_size` answers. Unused without that dataset and when resuming from a checkpoint.
        critic_shares_base (`bool`, *optional*, defaults to `True`):
            When the policy is a PEFT model, make the critic a second LoRA adapter (plus its head) on the policy's
            frozen base, so a single (possibly 4-bit) base is held in memory. Ignored for full fine-tuning, and when
            DeepSpeed ZeRO-3 or FSDP shards the base, where the critic is its own model.
        critic_layers (`int`, *optional*):
            With `critic_shares_base`, the number of top decoder layers the critic's adapter trains. The layers below
            carry no critic weights, so their forward is the reference model's, already computed for the KL penalty.
            `None` (the default) trains a quarter of the layers, at about a quarter of the cost; `0` trains all of
            them. Ignored when the critic starts from a reward adapter, whose layers it keeps.
        lam (`float`, *optional*, defaults to `1.0`):
            GAE λ of the critic's advantages `A_t = Σ_l λ^l·γ^l·δ_{t+l}`, `δ_t = r_t + γ·b_{t+1} − b_t`: `1.0` is the
            Monte-Carlo advantage `G_t − b_t` of REINFORCE with a baseline (unbiased); below 1 trades sampled returns
            for the baselines. The critic itself always regresses Monte-Carlo returns.

        > Parameters that control models, generation and memory

        reward_shares_base (`bool`, *optional*):
            With a PEFT policy, under every baseline, put a reward model that is a LoRA adapter trained on the
            policy's base (with the same quantization) on that base as a frozen adapter with its score head, instead
            of loading a second copy of the base. `None` (the default) does so whenever it is possible, `True`
            requires it, `False` never does.
        dequantize_for_inference (`bool`, *optional*, defaults to `False`):
            Keep each 4-bit layer's weight dequantised, with its active LoRA adapters merged in, for the passes that
            need no gradient (generation, the rollouts' and the reference's log-probabilities, a reward or critic
            adapter on the policy's base). About twice as fast a generation on CPU, at the memory of an unquantised
            copy of the base; no effect without 4-bit layers.
        inverse_cdf_sampling (`bool`, *optional*, defaults to `False`):
            Draw each token by inverse transform sampling (one uniform number per completion) instead of
            `torch.multinomial`: the same distribution, other draws, faster on CPU; without `generation_kwargs` the
            drawn tokens' log-probabilities are kept, so the KL penalty needs no second forward. Plain temperature
            sampling with transformers' `generate` only: no `top_k`, `top_p`, `min_p`, `repetition_penalty`, vLLM or
            continuous batching.

        > Parameters that control the training scripts

        resume_from_checkpoint (`str`, *optional*):
            A checkpoint folder, `true` for the newest complete checkpoint in `output_dir` (an error when there is
            none), or `auto` for the same or a fresh start. A checkpoint cut off while being written is never resumed.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let the training scripts replace a saved model in `output_dir`; without it they refuse such a folder.

        > Deprecated parameters

        whiten_advantages:

            <Deprecated version="0.1.0">

            Parameter `whiten_advantages` is a deprecated alias of `normalize_advantages`: when set (`True` or
            `False`) it warns and sets `normalize_advantages` to its value, and afterwards reads the same as it.

            </Deprecated>

    > [!NOTE]
    > These parameters have default values different from [`trl.RLOOConfig`]:
    > - `bf16`: Defaults to `True` only on an accelerator that supports it, instead of whenever `fp16` is not set.
    > - `dataloader_pin_memory`: Always `False` without an accelerator, where there is nothing to pin memory for.
    """

    baseline: str = field(
        default="critic",
        metadata={
            "help": "Baseline b_t subtracted from the return G_t: 'critic' (a value-head critic V, recentred on the "
            "other completions: b_t = w·V(s_t) + the others' mean of G_t − w·V(s_t), w a least-squares slope fitted "
            "on earlier batches, in [0, 2]), 'otb' (the optimal token baseline: the others' G_t weighted by "
            "their summed squared score-function norms, critic-free), 'rloo' (mean reward of the other "
            "completions of the same prompt), 'mean' (batch mean return) or 'none' (vanilla REINFORCE).",
            "choices": list(BASELINES),
        },
    )
    critic_learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Learning rate of the critic's own AdamW optimizer (baseline='critic' only). The critic "
            "regresses returns in normalised units (running mean and standard deviation), so one value serves "
            "rewards of any scale."
        },
    )
    critic_weight: float | None = field(
        default=None,
        metadata={
            "help": "w held fixed instead of fitted (baseline='critic' only): 0 is the isolated ablation (the critic "
            "trains, the baseline ignores it: the others' mean of G_t), 1 is V(s_t) itself, recentred; None fits w."
        },
    )
    critic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps during which the baseline ignores the critic (w = 0; baseline='critic' only): "
            "the critic learns, and the policy learns with the critic-free fallback, the leave-one-out mean of the "
            "other completions' returns (the rest of the batch when num_generations=1). Rarely needed: w stays 0 "
            "while the critic's recentred values do not vary."
        },
    )
    critic_shares_base: bool = field(
        default=True,
        metadata={
            "help": "When the policy is a PEFT model, make the critic a second LoRA adapter (plus its head) on the "
            "policy's frozen base, so a single (possibly 4-bit) base is held in memory (baseline='critic' only). "
            "Ignored for full fine-tuning, where the critic is always its own model."
        },
    )
    critic_layers: int | None = field(
        default=None,
        metadata={
            "help": "With critic_shares_base, the number of top decoder layers the critic's adapter trains "
            "(baseline='critic' only). The layers below run the reference model's forward, already computed for the "
            "KL penalty: None (a quarter of the layers) costs about a quarter of a full critic; 0 trains every layer. "
            "Ignored when the critic starts from a reward adapter, whose layers it keeps."
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
        metadata={"help": "Optimizer steps of critic regression on each batch of rollouts (baseline='critic' only)."},
    )
    critic_max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Gradient-norm clip for the critic's updates, 0 disables it (baseline='critic' only)."},
    )
    critic_head_only: bool = field(
        default=False,
        metadata={
            "help": "Train only the critic's value head on its frozen backbone (a reward adapter's hidden states when "
            "copied from one), which then runs without gradients (baseline='critic' only)."
        },
    )
    critic_pretraining_epochs: int = field(
        default=1,
        metadata={
            "help": "Epochs of critic regression on the trainer's value_pretraining_dataset before a fresh run starts "
            "(answers of the initial policy, every prefix's target its answer's reward), in batches of "
            "per_device_train_batch_size answers (baseline='critic' only; unused without that dataset or when "
            "resuming)."
        },
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
    # Redeclared for its help: the advantages are per-token here, and are whitened over completion tokens.
    normalize_advantages: bool = field(
        default=False,
        metadata={
            "help": "Whiten the per-token advantages A_t: shift and scale them to mean 0 and variance 1 over all "
            "completion tokens of the generation batch (each process's share), padding and unscorable completions "
            "left out."
        },
    )
    whiten_advantages: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated: use `normalize_advantages`, which this sets to its value when given.",
            "nargs": "?",  # keeps the bare `--whiten_advantages` flag meaning true, as when it was a plain bool
            "const": True,
        },
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
            "help": "GAE λ of the critic's advantages (baseline='critic' only): 1.0 is the Monte-Carlo advantage "
            "G_t − b_t of REINFORCE with a baseline (unbiased); below 1 trades sampled returns for the critic's "
            "baselines. The critic itself always regresses Monte-Carlo returns."
        },
    )
    resume_from_checkpoint: str | None = resume_from_checkpoint_field()
    overwrite_output_dir: bool = overwrite_output_dir_field()

    def __post_init__(self):
        check_baseline(self)
        check_critic_and_returns(self)
        check_numbers(self)
        check_inverse_cdf_sampling(self)
        resolve_whiten_advantages(self)
        warn_ignored_critic_fields(self)
        resolve_device_defaults(self)
        rloo_post_init(self)
        self.whiten_advantages = self.normalize_advantages  # the deprecated name, still readable

    # Why: `Trainer` pickles its arguments into training_args.bin beside every saved model and checkpoint, which
    # `push_to_hub` uploads; the Hub token stays in memory only
    def __getstate__(self):
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state


def check_numbers(config: ReinforceConfig) -> None:
    """A finite `missing_eos_penalty` (or None) and at least one iteration per generation batch."""
    if config.missing_eos_penalty is not None and not math.isfinite(config.missing_eos_penalty):
        raise ValueError(f"missing_eos_penalty={config.missing_eos_penalty} must be a finite number or None.")
    if config.num_iterations < 1:
        raise ValueError(f"num_iterations={config.num_iterations} must be at least 1.")


def rloo_post_init(config: ReinforceConfig) -> None:
    """TRL's `RLOOConfig` checks and defaults, with groups of one allowed where the baseline needs no groups."""
    try:
        super(ReinforceConfig, config).__post_init__()
    except ValueError as error:
        # RLOO's last check asks for groups of at least two completions; the other baselines need no groups.
        groupless = config.num_generations == 1 and config.baseline != "rloo"
        if not (groupless and "2 generations" in str(error)):
            raise


def check_baseline(config: ReinforceConfig) -> None:
    if config.baseline not in BASELINES:
        raise ValueError(
            f"baseline={config.baseline!r} is not supported; set `baseline` to one of {', '.join(BASELINES)}."
        )
    if config.baseline == "rloo" and config.num_generations < 2:
        raise ValueError(
            f"baseline='rloo' needs at least two completions per prompt, but num_generations="
            f"{config.num_generations}; raise `num_generations` or use baseline='critic'."
        )
    if config.num_generations < 1:
        raise ValueError(f"num_generations={config.num_generations} must be at least 1.")


def check_critic_and_returns(config: ReinforceConfig) -> None:
    if not (math.isfinite(config.critic_learning_rate) and config.critic_learning_rate > 0):
        raise ValueError(f"critic_learning_rate={config.critic_learning_rate} must be a positive number.")
    if config.critic_weight is not None and not 0.0 <= config.critic_weight <= MAX_CRITIC_WEIGHT:
        raise ValueError(
            f"critic_weight={config.critic_weight} must lie in [0, {MAX_CRITIC_WEIGHT}] (0: the isolated ablation), "
            "or be None to fit it."
        )
    if config.critic_warmup_steps < 0:
        raise ValueError(f"critic_warmup_steps={config.critic_warmup_steps} must be 0 or more.")
    if config.critic_layers is not None and config.critic_layers < 0:
        raise ValueError(f"critic_layers={config.critic_layers} must be None (a quarter), 0 (all) or positive.")
    if config.critic_epochs < 1:
        raise ValueError(f"critic_epochs={config.critic_epochs} must be at least 1.")
    if config.critic_pretraining_epochs < 1:
        raise ValueError(f"critic_pretraining_epochs={config.critic_pretraining_epochs} must be at least 1.")
    if not (math.isfinite(config.critic_max_grad_norm) and config.critic_max_grad_norm >= 0):
        raise ValueError(f"critic_max_grad_norm={config.critic_max_grad_norm} must be 0 (no clipping) or more.")
    if not 0.0 < config.gamma <= 1.0:
        raise ValueError(f"gamma={config.gamma} must lie in (0, 1]; 1.0 is the undiscounted return.")
    if not 0.0 <= config.lam <= 1.0:
        raise ValueError(f"lam={config.lam} must lie in [0, 1]; 1.0 is the Monte-Carlo advantage.")


def check_inverse_cdf_sampling(config: ReinforceConfig) -> None:
    """inverse_cdf_sampling replaces plain temperature sampling in transformers' `generate`, and nothing else."""
    if not config.inverse_cdf_sampling:
        return
    unsupported = {
        "top_k": config.top_k not in (0, None),
        "top_p": config.top_p != 1.0,
        "min_p": config.min_p is not None,
        "repetition_penalty": config.repetition_penalty != 1.0,
        "use_vllm": config.use_vllm,
        "use_transformers_continuous_batching": config.use_transformers_continuous_batching
        or bool(getattr(config, "use_transformers_paged", False)),
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(
                "inverse_cdf_sampling draws from the plain temperature distribution with transformers' "
                f"`generate`, but {name}={getattr(config, name)!r}; reset `{name}` or set "
                "`inverse_cdf_sampling: false`."
            )


def resolve_whiten_advantages(config: ReinforceConfig) -> None:
    """`whiten_advantages`, when given, is the deprecated spelling of `normalize_advantages`: it sets it, and warns."""
    if config.whiten_advantages is None:
        return
    if not config.whiten_advantages and config.normalize_advantages:
        raise ValueError(
            "whiten_advantages=False contradicts normalize_advantages=True; `whiten_advantages` is a deprecated "
            "alias of `normalize_advantages`: set only `normalize_advantages`."
        )
    warnings.warn(
        f"`whiten_advantages` is deprecated and will be removed; use `normalize_advantages: "
        f"{str(bool(config.whiten_advantages)).lower()}` instead (set to that value now).",
        FutureWarning,
        stacklevel=4,
    )
    config.normalize_advantages = bool(config.whiten_advantages)


def warn_ignored_critic_fields(config: ReinforceConfig) -> None:
    """Name each critic field set to a value of its own under a baseline that builds no critic."""
    if config.baseline == "critic":
        return
    defaults = {f.name: f.default for f in fields(ReinforceConfig) if f.name in CRITIC_ONLY_FIELDS}
    for name in CRITIC_ONLY_FIELDS:
        value = getattr(config, name)
        if value != defaults[name]:
            warnings.warn(
                f"{name}={value!r} is ignored with baseline={config.baseline!r}: it only acts on the critic, which "
                "only baseline='critic' trains; leave it unset or set `baseline: critic`.",
                UserWarning,
                stacklevel=4,
            )
