"""The critic's life cycle: built once, fitted on every batch of rollouts, asked for baselines, saved and restored.

The trainer hands the critic the rollouts and their returns and gets per-token baselines back; the estimators are
the pure functions of `advantages.py`. What lives here is the state those functions need: the value model, its
optimizer and schedule, the running statistics of the returns (the critic learns normalised returns, PopArt-style,
so one learning rate fits rewards of any scale) and the running regression sums that weigh the critic in the
baseline by how much of the return it has been predicting.
"""

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel, get_scheduler
from transformers.utils import logging

from .advantages import MAX_CRITIC_WEIGHT, critic_baseline, critic_weight_sums
from .engines import launched_engine, outside_zero3_init
from .losses import value_loss
from .placement import (
    CRITIC_ADAPTER,
    POLICY_BASE,
    SHARDED_BASE,
    PlacementPlan,
    adapted_module_names,
    critic_layer_indices,
    critic_lora_config,
    layer_of,
    plan_for_run,
)
from .reward_models import SharedBaseRewardScorer, reward_adapter_weights, shares_base_weights, unwrap_scorer
from .speedups.quantization import keep_4bit_layers_differentiable
from .value_head import ValueHeadModel


logger = logging.get_logger(__name__)
CRITIC_STATE = "critic_state.safetensors"
CRITIC_OPTIMIZER = "critic_optimizer.pt"
CRITIC_SCHEDULER = "critic_scheduler.pt"
# Running statistics forget a batch's weight by this factor per batch: about the last ten batches count.
STATISTICS_DECAY = 0.9
# The check of the critic's weight forgets faster, about the last three batches: it follows the critic's current
# accuracy, and one batch it predicts well or badly tells more than the slope's slow fit.
WEIGHT_CHECK_DECAY = 0.7
MIN_RETURN_STD = 1e-6


class RunningMeans:
    """Exponential moving averages of a few scalars, bias-corrected for their start at zero (as Adam's moments)."""

    def __init__(self, names: tuple[str, ...], decay: float = STATISTICS_DECAY):
        self.names, self.decay = names, decay
        self.sums = torch.zeros(len(names), dtype=torch.float64)
        self.weight = 0.0  # Σ decay^k: what the sums would hold for a constant stream of ones

    def update(self, values: torch.Tensor) -> None:
        self.sums = self.decay * self.sums + values.detach().double().cpu()
        self.weight = self.decay * self.weight + 1.0

    def __getitem__(self, name: str) -> float:
        if self.weight == 0.0:
            return 0.0
        return (self.sums[self.names.index(name)] / self.weight).item()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.sums": self.sums.clone(),
            f"{prefix}.weight": torch.tensor(self.weight, dtype=torch.float64),
        }

    def load_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.sums = state[f"{prefix}.sums"].double().clone()
        self.weight = state[f"{prefix}.weight"].item()


def slope(sums: RunningMeans) -> float:
    """Least-squares slope through 0 of the regression whose E[x·y], E[x²], E[y²] `sums` hold, within [0, MAX];
    0 while the predictor has (next to) no variance, as an untrained critic's values have."""
    xx = sums["xx"]
    if not xx > 1e-8 * sums["yy"]:
        return 0.0
    return min(max(sums["xy"] / xx, 0.0), MAX_CRITIC_WEIGHT)


def calibration(sums: RunningMeans) -> float:
    """The least-squares slope, within [0, 1], of the returns' deviations on the critic's term in the baseline as
    it was weighted before each batch was seen (E[z·y], E[z²] in `sums`, z = ŵ·x): 1 while the weight fitted on
    earlier batches has predicted each next batch as well as it predicted those, 0 while it predicted nothing (nor
    anything before any prediction was made)."""
    zz = sums["zz"]
    if not zz > 0.0:
        return 0.0
    return min(max(sums["zy"] / zz, 0.0), 1.0)


@dataclass
class CriticBatch:
    """A batch of rollouts as the critic regresses it: inputs, returns, and what its first pass computed."""

    input_ids: torch.Tensor  # (B, P+C)
    attention_mask: torch.Tensor  # (B, P+C)
    returns: torch.Tensor  # (B, C): G_t
    mask: torch.Tensor  # (B, C)
    layer_input: torch.Tensor | None  # (B, P+C, hidden) entering the first trained layer, from the reference pass
    targets: torch.Tensor  # (B, C): normalised returns
    num_tokens: torch.Tensor  # completion tokens of all processes
    first_losses: list = field(default_factory=list)
    normalized_values: torch.Tensor | None = None  # (B, C), before fitting
    values: torch.Tensor | None = None  # (B, C): V(s_t) in reward units, before fitting
    frozen_features: list = field(default_factory=list)  # per row chunk (rows, P+C, 2·hidden), frozen backbone only


@dataclass(frozen=True)
class CriticUpdate:
    value_loss: float  # mean over epochs of the centred value loss
    num_skipped_updates: int  # optimizer steps skipped for non-finite gradients


class Critic:
    """V(s_t) for the baseline, with its own optimizer, return statistics and term weights.

    Args:
        model: the [`ValueHeadModel`].
        args: the trainer's [`ReinforceConfig`].
        accelerator: the trainer's accelerator (several processes: the critic's gradients and statistics are
            averaged over them).
    """

    def __init__(self, model: ValueHeadModel, args, accelerator):
        self.model, self.args, self.accelerator = model, args, accelerator
        keep_4bit_layers_differentiable(model)
        if args.critic_head_only:
            model.freeze_backbone()
        model.train()
        self.optimizer = self.scheduler = None
        self.returns = RunningMeans(("mean", "square"))
        self.weight_fit = RunningMeans(("xy", "xx", "yy"))  # see `advantages.critic_weight_sums`
        self.weight_check = RunningMeans(("zy", "zz"), decay=WEIGHT_CHECK_DECAY)  # see `calibration`

    def create_optimizer(self, num_updates: int) -> None:
        self._broadcast_from_main_process()
        # The centred value loss is blind to V's level, so the head's bias would get rounding noise for a gradient,
        # which Adam turns into steps of either sign (different on every process count); `_shift_level` sets it.
        self.model.value_head.bias.requires_grad_(False)
        fitted = [p for p in self.model.fitted_parameters() if p is not self.model.value_head.bias]
        self.optimizer = torch.optim.AdamW(fitted, lr=self.args.critic_learning_rate)
        self.scheduler = get_scheduler(
            self.args.lr_scheduler_type, self.optimizer, num_warmup_steps=0, num_training_steps=num_updates
        )

    # ---- values ----
    @contextlib.contextmanager
    def capturing_layer_input(self, into: list):
        """Collect into `into` the hidden states a forward of the shared base computes at the critic's first trained
        layer, for `first_pass` and `values` to start there. Only for a critic on the top layers of the policy's base
        whose reference is that base with adapters disabled; otherwise nothing is collected."""
        if self.model.first_trained_layer == 0:
            yield
            return
        with self.model.capture_layer_input(into):
            yield

    def _normalized_rows(self, input_ids, attention_mask, rows, completion_length, layer_input) -> torch.Tensor:
        """(V(s_t) − mean)/std for each completion token a_t of the rows; s_t ends at position t − 1."""
        features = self._features(input_ids, attention_mask, rows, completion_length, layer_input)
        return self._head_rows(features, completion_length)

    def _features(self, input_ids, attention_mask, rows, completion_length, layer_input) -> torch.Tensor:
        completion_start = input_ids.size(1) - completion_length - 1  # the prompt's last position
        rows_input = None if layer_input is None else layer_input[rows]
        return self.model.features(input_ids[rows], attention_mask[rows], completion_start, rows_input)

    def _head_rows(self, features: torch.Tensor, completion_length: int) -> torch.Tensor:
        values = self.model.value_head(features).squeeze(-1)  # (rows, P+C), normalised units
        return values[:, -completion_length - 1 : -1].float()  # (rows, C): column 0 is V(s_0), the prompt's value

    def _row_chunks(self, num_rows: int) -> list[slice]:
        chunk = self.args.per_device_train_batch_size
        return [slice(start, start + chunk) for start in range(0, num_rows, chunk)]

    @torch.no_grad()
    def values(self, input_ids, attention_mask, completion_length: int, layer_input=None) -> torch.Tensor:
        """V(s_t) in reward units, (batch, completion_len)."""
        chunks = self._row_chunks(len(input_ids))
        normalized = torch.cat(
            [self._normalized_rows(input_ids, attention_mask, r, completion_length, layer_input) for r in chunks]
        )
        return self.model.denormalize(normalized)

    # ---- fitting ----
    def _update_return_statistics(self, returns: torch.Tensor, mask: torch.Tensor) -> None:
        stats = torch.stack([(returns * mask).sum(), (returns.square() * mask).sum(), mask.sum()]).double()
        total, square, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        if count == 0 or not math.isfinite(square):  # returns too large to square stay out of the statistics
            return
        self.returns.update(torch.tensor([total / count, square / count]))
        mean = self.returns["mean"]
        std = math.sqrt(max(self.returns["square"] - mean**2, 0.0))
        self.model.rescale_returns(mean, max(std, MIN_RETURN_STD * max(1.0, abs(mean))))

    def _backward_pass(self, batch: CriticBatch, keep_values: bool) -> tuple[list, list]:
        """One pass of the centred value loss over the batch in row chunks, gradients accumulated (no step)."""
        values, losses = [], []
        completion_length = batch.returns.size(1)
        # The backward pass must see the critic's adapter too: activation checkpointing recomputes the forward there
        with self.model.critic_adapter():
            for index, rows in enumerate(self._row_chunks(len(batch.input_ids))):
                # A frozen backbone's features are the same in every epoch: its forward runs once per batch
                if index < len(batch.frozen_features):
                    features = batch.frozen_features[index]
                else:
                    features = self._features(
                        batch.input_ids, batch.attention_mask, rows, completion_length, batch.layer_input
                    )
                    if not self.model.backbone_trains:
                        batch.frozen_features.append(features)
                normalized = self._head_rows(features, completion_length)
                if keep_values:
                    values.append(normalized.detach())
                loss = value_loss(normalized, batch.targets[rows], batch.mask[rows], centred=True)
                loss = loss * (batch.mask[rows].sum() / batch.num_tokens)
                loss.backward()
                losses.append(loss.detach())
        return values, losses

    def first_pass(self, input_ids, attention_mask, returns, mask, layer_input=None) -> CriticBatch:
        """V(s_t) of every row as the critic stands *before* this batch moves it, from the first pass of the regression
        on it: its gradients accumulate, and `update` takes the optimizer steps. No row's baseline may depend on its
        own return, and the pass computes the values anyway."""
        # input_ids, attention_mask: (B, P+C)   returns, mask: (B, C)
        self._update_return_statistics(returns, mask)  # output-preserving: the values are still those before fitting
        targets = (returns - self.model.return_mean) / self.model.return_std  # (B, C)
        # Each process weighs its rows by the tokens of all processes, so the summed gradients are the global mean's
        num_tokens = self.accelerator.reduce(mask.sum().float(), reduction="sum").clamp(min=1)
        batch = CriticBatch(input_ids, attention_mask, returns, mask, layer_input, targets, num_tokens)
        normalized, batch.first_losses = self._backward_pass(batch, keep_values=True)
        batch.normalized_values = torch.cat(normalized)  # (B, C)
        batch.values = self.model.denormalize(batch.normalized_values)
        return batch

    def update(self, batch: CriticBatch) -> CriticUpdate:
        """The optimizer steps of the regression of the normalised V(s_t) on the normalised returns: the first on the
        gradients of `first_pass`, then one per further epoch (`critic_epochs`), each accumulated over row chunks."""
        losses = list(batch.first_losses)
        skipped = not self._step(torch.stack(losses).sum())
        for _ in range(1, self.args.critic_epochs):
            _, epoch_losses = self._backward_pass(batch, keep_values=False)
            losses += epoch_losses
            skipped += not self._step(torch.stack(epoch_losses).sum())
        self.scheduler.step()
        if skipped == 0:
            self._shift_level(batch.targets, batch.normalized_values, batch.mask)
        total_loss = self.accelerator.reduce(torch.stack(losses).sum(), reduction="sum")  # one sync per batch
        return CriticUpdate(value_loss=total_loss.item() / self.args.critic_epochs, num_skipped_updates=int(skipped))

    def pretrain(self, epochs) -> list[float]:
        """Regress the critic before RL on batches of answers of the initial policy, as on rollouts (`first_pass`
        and `update`: return statistics, normalised targets, its optimizer and schedule), but without joining the
        fit of w, which stays for the batches whose baselines it weighs. `epochs` yields, per epoch, batches of
        (input_ids, attention_mask, returns, mask); the mean value loss of each epoch comes back."""
        losses = []
        for batches in epochs:
            epoch_losses = [self.update(self.first_pass(*batch)).value_loss for batch in batches]
            losses.append(sum(epoch_losses) / max(len(epoch_losses), 1))
        return losses

    @torch.no_grad()
    def _shift_level(self, targets, values, mask) -> None:
        """Move the head's bias by the batch's mean error, which the centred loss leaves alone: the level of V plays
        no part in the recentred baselines, but it keeps the saved critic's values in reward units."""
        stats = torch.stack([((targets - values) * mask).sum(), mask.sum()])
        error_sum, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        if count > 0:
            self.model.value_head.bias.add_(error_sum / count)

    def _step(self, loss: torch.Tensor) -> bool:
        """One optimizer step on the accumulated gradients; False, and no step, when the loss or the gradients are not
        finite (returns of ±1e30 overflow the squared error). A non-finite loss poisons the gradients before they are
        summed over processes, so that every process skips alike, without a synchronisation of its own."""
        parameters = self.optimizer.param_groups[0]["params"]
        loss_is_finite = torch.where(torch.isfinite(loss), 1.0, torch.nan)
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(loss_is_finite.to(parameter.grad.dtype))
        self._sum_gradients_over_processes(parameters)
        grads_finite = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
        finite = bool(torch.stack(grads_finite).all()) if grads_finite else True  # one device sync, not one each
        if finite:
            if self.args.critic_max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, self.args.critic_max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    # Why not DistributedDataParallel: its reducer hooks fire per backward and per bucket, so a chunk count, an unused
    # parameter or a no-grad forward that differs between processes leaves one process waiting forever. Every process
    # takes the same optimizer steps, so one flat all-reduce per step is all the synchronisation the critic needs. The
    # sum is the global batch's gradient: `first_pass` divides each process's loss by the token count of all processes.
    def _sum_gradients_over_processes(self, parameters) -> None:
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat, reduction="sum")
        for parameter, grad in zip(parameters, torch.split(flat, [g.numel() for g in grads])):
            parameter.grad = grad.view_as(parameter).to(parameter.dtype)

    # Every process starts from the main process's critic, whatever each drew for its fresh LoRA and head weights.
    @torch.no_grad()
    def _broadcast_from_main_process(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        parameters = self.model.trainable_parameters()
        flat = broadcast(torch.cat([p.detach().reshape(-1).float() for p in parameters]), from_process=0)
        for parameter, value in zip(parameters, torch.split(flat, [p.numel() for p in parameters])):
            parameter.copy_(value.view_as(parameter))

    # ---- baselines ----
    def weight(self, warming_up: bool = False) -> float:
        """w of `advantages.critic_baseline`, from earlier batches only: `critic_weight` when given, else the
        least-squares slope fitted on them, times its `calibration` (0 at first: the weight earns its place by
        predicting batches it was not fitted on); 0 while warming up.

        Why the calibration: the values of a critic that keeps changing can stop explaining the returns while a slope
        fitted on its earlier values still lets them in; it follows how the fitted weight does out of sample."""
        if warming_up:
            return 0.0
        if self.args.critic_weight is not None:
            return self.args.critic_weight
        return slope(self.weight_fit) * calibration(self.weight_check)

    def baselines(self, values, returns, mask, group_size: int, warming_up: bool = False) -> torch.Tensor:
        """Per-token baselines b_t (B, C) of the (global) batch; see `advantages.critic_baseline`."""
        return critic_baseline(values, returns, mask, group_size, self.weight(warming_up))

    def observe(self, values, returns, mask, group_size: int) -> None:
        """Add this batch, with the values the critic had before training on it, to the regression that sets w for
        later batches, and check how the slope fitted before it predicts it."""
        sums = critic_weight_sums(values, returns, mask, group_size)  # [Σ x·y, Σ x², Σ y²]
        fitted = slope(self.weight_fit)
        self.weight_check.update(torch.stack([fitted * sums[0], fitted**2 * sums[1]]))
        self.weight_fit.update(sums)

    # ---- checkpoints ----
    def save_checkpoint(self, directory: Path) -> None:
        state = self.model.trainable_state_dict()
        for name, means in self._statistics():
            state.update(means.state(f"statistics.{name}"))
        save_file(state, directory / CRITIC_STATE)
        torch.save(self.optimizer.state_dict(), directory / CRITIC_OPTIMIZER)
        torch.save(self.scheduler.state_dict(), directory / CRITIC_SCHEDULER)

    def _statistics(self) -> tuple[tuple[str, RunningMeans], ...]:
        return ("returns", self.returns), ("weight_fit", self.weight_fit), ("weight_check", self.weight_check)

    def load_checkpoint(self, directory: Path) -> None:
        if not (directory / CRITIC_STATE).exists():
            raise FileNotFoundError(
                f"{directory} holds no critic state ({CRITIC_STATE}); it was not written by a ReinforceTrainer with "
                "baseline='critic', so the critic cannot be resumed from it."
            )
        # safetensors and torch.load take "cpu" but not the "cpu:0" of a process that accelerate launched on CPU
        device = "cpu" if self.accelerator.device.type == "cpu" else str(self.accelerator.device)
        state = load_file(directory / CRITIC_STATE, device=device)
        statistics = {k.removeprefix("statistics."): v.cpu() for k, v in state.items() if k.startswith("statistics.")}
        self.model.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith("statistics.")})
        for name, means in self._statistics():
            means.load_state(statistics, name)
        self.optimizer.load_state_dict(
            torch.load(directory / CRITIC_OPTIMIZER, map_location=device, weights_only=True)
        )
        self.scheduler.load_state_dict(torch.load(directory / CRITIC_SCHEDULER, weights_only=True))


# ---- construction ----
def reward_model_of(reward_funcs, accelerator) -> PreTrainedModel | PeftModel | None:
    """The first reward function that is a model of its own (possibly a PEFT model), unwrapped, or None."""
    for reward_func in reward_funcs:
        if isinstance(reward_func, SharedBaseRewardScorer):
            continue  # its model is the policy; see `shared_reward_source`
        reward_func = unwrap_scorer(reward_func)
        model = accelerator.unwrap_model(reward_func) if isinstance(reward_func, torch.nn.Module) else None
        if isinstance(model, PreTrainedModel | PeftModel):
            return model
    return None


def shared_reward_source(reward_funcs):
    """The folder or model of the first reward adapter that sits on the policy's base, or None."""
    return next((f.source for f in reward_funcs if isinstance(f, SharedBaseRewardScorer)), None)


def score_head_weight(reward_model) -> torch.Tensor | None:
    """The (1, hidden) weight of a sequence classifier's score head (a PEFT model's trained copy when it has one)."""
    model = reward_model.get_base_model() if isinstance(reward_model, PeftModel) else reward_model
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        return None
    if hasattr(head, "modules_to_save"):  # PEFT keeps the trained head as a copy per adapter
        adapter = reward_model.active_adapter if isinstance(reward_model, PeftModel) else "default"
        head = head.modules_to_save[adapter] if adapter in head.modules_to_save else head.original_module
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.size(0) != 1:
        return None
    return weight.detach().float().cpu()


def load_adapter_weights(target: PeftModel, lora_weights: dict, adapter_name: str) -> None:
    result = set_peft_model_state_dict(target, lora_weights, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"The reward model's adapter does not fit the critic: {result.unexpected_keys[:3]} ...")


def build_value_model(
    value_model, policy, reward_funcs, args, accelerator, quantization_config, plan: PlacementPlan | None = None
) -> ValueHeadModel:
    """The critic's value model, as `ReinforceTrainer`'s `value_model` argument documents, placed as `plan.critic`
    says (the trainer's plan; made from `args` and the launched engine when not given).

    Whenever a reward model is given and the critic is not told otherwise, it starts from the reward model: its
    backbone (or adapter) and its score head, so V(s_t) starts as the reward model's score of the prefix s_t.
    """
    if plan is None:
        plan = plan_for_run(args, isinstance(policy, PeftModel), launched_engine())
    critic = _build_value_model(value_model, policy, reward_funcs, args, accelerator, quantization_config, plan)
    if not isinstance(value_model, ValueHeadModel):
        critic.accumulation_length = args.max_completion_length
    if args.activation_checkpointing and critic.adapter_name is None:
        checkpoint_activations(critic.backbone, args.activation_checkpointing_kwargs)
    return critic


def checkpoint_activations(backbone: PreTrainedModel | PeftModel, checkpointing_kwargs: dict | None) -> None:
    """Activation checkpointing on a critic of its own, as `Trainer` sets it on the policy: a critic on the policy's
    base has it with that base, one of its own would otherwise keep every layer's activations for its backward."""
    kwargs = dict(checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    model = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    if not getattr(model, "supports_gradient_checkpointing", False):
        logger.warning(f"{type(model).__name__} does not support activation checkpointing: the critic runs without.")
        return
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
    )


def _build_value_model(value_model, policy, reward_funcs, args, accelerator, quantization_config, plan):
    device = accelerator.device
    if isinstance(value_model, ValueHeadModel):
        return value_model.to(device)
    if isinstance(value_model, PreTrainedModel | PeftModel):
        return _placed(ValueHeadModel(value_model), device, quantization_config)
    if value_model is not None and not isinstance(value_model, str):
        raise TypeError(
            f"value_model must be a path, a transformers/PEFT model or a ValueHeadModel; got {type(value_model)}."
        )
    reward_model = reward_model_of(reward_funcs, accelerator) if value_model is None else None
    if value_model is None and plan.critic.reason == SHARDED_BASE:
        logger.warning(
            f"{plan.engine} shards the policy's base over the processes, so the critic cannot be an adapter on it: it "
            "is a model of its own, whole on every process (critic_shares_base is ignored)."
        )
    elif value_model is None and plan.critic.base == POLICY_BASE:
        reward_source = shared_reward_source(reward_funcs)
        if reward_source is None and isinstance(reward_model, PeftModel) and shares_base_weights(policy, reward_model):
            reward_source = reward_model
        return _critic_adapter_on_policy(policy, reward_source, args, device)
    reward_adapter = shared_reward_source(reward_funcs) if value_model is None else None
    if reward_adapter is not None or isinstance(reward_model, PeftModel):
        source = reward_adapter if reward_adapter is not None else reward_model
        return _critic_from_reward_adapter(source, args, device, quantization_config)
    source = reward_model if reward_model is not None else accelerator.unwrap_model(policy)
    if isinstance(source, PeftModel):
        source = source.get_base_model()
    head_init = score_head_weight(reward_model) if reward_model is not None else None
    if isinstance(policy, PeftModel) or isinstance(value_model, str) or plan.base_is_sharded:
        # A quantized, adapter-trained or sharded policy: load the backbone afresh (whole, replicated on every
        # process) and give the critic its own LoRA
        with outside_zero3_init():
            backbone = AutoModel.from_pretrained(
                value_model or source.config._name_or_path, **_load_kwargs(args, device, quantization_config)
            )
        if isinstance(policy, PeftModel):
            targets = adapted_module_names(policy)  # the policy's, however given, named on the bare decoder
            backbone = get_peft_model(backbone, critic_lora_config(policy.peft_config["default"], targets))
    else:
        backbone = copy.deepcopy(source.base_model)  # full fine-tuning: the critic starts as a copy of the decoder
    return _placed(ValueHeadModel(backbone, head_init=head_init), device, quantization_config)


def _load_kwargs(args, device, quantization_config) -> dict:
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs.setdefault("device_map", {"": device})  # 4-bit weights cannot move once loaded
    return kwargs


def _placed(critic: ValueHeadModel, device, quantization_config) -> ValueHeadModel:
    if quantization_config is None and not getattr(critic.config, "quantization_config", None):
        return critic.to(device)
    return _with_head_on(critic, device)  # quantized weights stay where they were loaded


def _with_head_on(critic: ValueHeadModel, device) -> ValueHeadModel:
    critic.value_head.to(device)
    critic.return_mean.data, critic.return_std.data = critic.return_mean.to(device), critic.return_std.to(device)
    return critic


def keep_out_of_policy_ddp(policy: PeftModel, adapter_name: str) -> None:
    """Leave an adapter's parameters out of the DistributedDataParallel wrapper accelerate puts around the policy:
    the critic sums its own gradients once per optimizer step (`Critic._sum_gradients_over_processes`), and
    a DDP reducer that waits for gradients the policy's backward never produces would hang."""
    names = [name for name, _ in policy.named_parameters() if f".{adapter_name}." in name]
    previous = list(getattr(policy, "_ddp_params_and_buffers_to_ignore", []))
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(policy, previous + names)


def _critic_adapter_on_policy(policy: PeftModel, reward_source, args, device) -> ValueHeadModel:
    """The one-card critic: a second adapter on the policy's own base.

    Warm-started from a reward adapter on the same base when there is one (on the layers that adapter trains);
    otherwise it trains the top `critic_layers` decoder layers, and the forward of the layers below is the reference
    pass's.
    """
    if reward_source is not None:
        peft_config, lora_weights, head_weight = reward_adapter_weights(reward_source)
        lora_config = critic_lora_config(peft_config)
    else:
        lora_config = critic_lora_config(policy.peft_config["default"])
        num_layers = policy.config.get_text_config().num_hidden_layers
        layers = critic_layer_indices(num_layers, args.critic_layers)
        if len(layers) < num_layers:
            lora_config.layers_to_transform = layers
    policy.add_adapter(CRITIC_ADAPTER, lora_config)
    if reward_source is not None:
        load_adapter_weights(policy, lora_weights, CRITIC_ADAPTER)
    policy.set_adapter("default")  # keeps the critic's adapter out of the policy optimizer
    keep_out_of_policy_ddp(policy, CRITIC_ADAPTER)
    head_init = head_weight.detach().float().cpu() if reward_source is not None else None
    critic = _with_head_on(ValueHeadModel(policy, adapter_name=CRITIC_ADAPTER, head_init=head_init), device)
    first_adapted_layer = lowest_adapted_layer(policy, CRITIC_ADAPTER)
    if first_adapted_layer > 0:
        critic.first_trained_layer = _checked_first_trained_layer(critic, first_adapted_layer)
    return critic


def lowest_adapted_layer(model: torch.nn.Module, adapter_name: str) -> int:
    """The index of the lowest decoder layer (a `layers.<i>` module) holding LoRA weights of `adapter_name`, however
    the adapter chose its modules (`layers_to_transform`, a regular expression, a list of names); 0 when none is."""
    layers = []
    for name, module in model.named_modules():
        layer = layer_of(name)
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A and layer is not None:
            layers.append(layer)
    return min(layers, default=0)


@torch.no_grad()
def _checked_first_trained_layer(critic: ValueHeadModel, layer: int) -> int:
    """`layer` if running the decoder from that layer's input reproduces its full forward, else 0 (a model whose
    forward treats `inputs_embeds` specially, e.g. scales them, cannot be started in the middle)."""
    input_ids = torch.arange(8, device=critic.value_head.weight.device).unsqueeze(0) % critic.config.vocab_size
    critic.first_trained_layer = 0
    full = critic.features(input_ids)
    critic.first_trained_layer = layer
    try:
        split = critic.features(input_ids)
    except Exception:  # noqa: BLE001 - any failure means the model cannot be entered mid-stack
        return 0
    return layer if torch.allclose(full, split, rtol=1e-4, atol=1e-4) else 0


def _critic_from_reward_adapter(source, args, device, quantization_config) -> ValueHeadModel:
    """A critic of its own from a reward adapter (a loaded PEFT reward model or its folder): its base (quantized as
    the policy), a trainable copy of its adapter, and its score head."""
    peft_config, lora_weights, head_weight = reward_adapter_weights(source)
    load_kwargs = {"num_labels": 1, **_load_kwargs(args, device, quantization_config)}
    with outside_zero3_init():
        base = AutoModelForSequenceClassification.from_pretrained(peft_config.base_model_name_or_path, **load_kwargs)
    backbone = get_peft_model(base, critic_lora_config(peft_config))
    load_adapter_weights(backbone, lora_weights, "default")
    critic = ValueHeadModel(backbone, head_init=head_weight.detach().float().cpu())
    return _placed(critic, device, quantization_config)
