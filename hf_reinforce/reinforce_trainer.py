from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.utils import gather
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import RLOOConfig, RLOOTrainer
from trl.trainer.utils import disable_dropout_in_model

from .advantages import (
    discounted_returns,
    explained_variance,
    gae_advantages,
    masked_mean,
    masked_var,
    optimal_token_baseline,
    reward_to_go,
    sequence_baseline,
    token_advantages,
    token_rewards,
    value_diagnostics,
    whiten,
)
from .checkpoints import ADAPTER_WEIGHTS, ResumableMixin, check_reinforce_checkpoint
from .checks import check_enough_prompts, check_reinforce_inputs
from .critic import CRITIC_ADAPTER, Critic, build_value_model
from .engines import EngineMixin, check_dequantize_for_engine, launched_engine, outside_zero3_init
from .losses import clipped_surrogate_loss, reinforce_loss
from .model_card import ModelCardMixin
from .placement import PlacementPlan, plan_for_run
from .reinforce_config import ReinforceConfig
from .reward_models import as_scorer, policy_base_name, resolve_reward_models
from .rollout import Rollout, RolloutMixin, cut_off, sequence_rewards
from .speedups import prepare_models
from .value_pretraining import ValuePretrainingCallback, checked_value_pretraining_dataset, critic_updates


VALUE_MODEL_DIR = "value_model"


class ReinforceTrainer(RolloutMixin, ResumableMixin, EngineMixin, ModelCardMixin, RLOOTrainer):
    """
    REINFORCE with a baseline: the loss `−1/S Σ_i Σ_t A_t · log π(a_t|s_t)` with `A_t = G_t − b_t`.

    `G_t` is the return of token t: the sequence reward R (reward functions / reward models) minus `beta` times the KL
    to the reference still to come. `b_t` is the baseline picked by `args.baseline`: the value-head critic
    (`"critic"`), recentred on the other completions, `b_t^i = w·V(s_t^i) + mean_{j≠i}(G_t^j − w·V(s_t^j))` with w
    fitted on earlier batches (see `advantages.critic_baseline`); the leave-one-out mean (`"rloo"`, TRL's RLOO with
    the KL summed into R); the batch mean (`"mean"`) or nothing (`"none"`). One step, in
    `_generate_and_score_completions`: rollout → returns → values → baselines → critic update → advantages, then the
    loss in `compute_loss`.

    Generation, reward functions, the reference model, PEFT and vLLM come from [`trl.RLOOTrainer`], whose constructor
    this shares, plus:

    Args:
        value_model (`str`, `PreTrainedModel`, `PeftModel`, `ValueHeadModel` or `None`):
            The critic, used when `args.baseline == "critic"`. A path or model is wrapped in a [`ValueHeadModel`];
            `None` builds one: a second adapter on the policy's base when the policy is a PEFT model and
            `args.critic_shares_base`, otherwise a copy of the reward model's backbone (when a reward model is given)
            or of the policy's, with the same quantization and LoRA targets as the policy.
        value_pretraining_dataset (`datasets.Dataset` or `None`):
            With `baseline="critic"`: answers of the initial policy (`prompt` and `completion` columns, texts or chat
            messages) the critic regresses on before a fresh run starts; see `hf_reinforce.value_pretraining`.
    """

    _tag_names = ["trl", "hf_reinforce", "reinforce"]
    _name = "REINFORCE"

    def __init__(
        self,
        model,
        reward_funcs,
        args: ReinforceConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        value_model=None,
        value_pretraining_dataset=None,
    ):
        args = reinforce_config(model, args)
        check_reinforce_inputs(model, reward_funcs, value_model, train_dataset, eval_dataset, args)
        self.value_pretraining_dataset = checked_value_pretraining_dataset(value_pretraining_dataset, args)
        # Where each role sits, decided once before any model loads; refuses what the engine cannot place
        plan = plan_for_run(args, isinstance(model, PeftModel) or peft_config is not None, launched_engine())
        check_dequantize_for_engine(args.dequantize_for_inference, plan)
        policy_base = policy_base_name(model, peft_config)
        sharing = None if policy_base is None else (policy_base, args.reward_shares_base)
        with outside_zero3_init():  # a reward model is frozen and outside the engine: whole on every process
            reward_funcs, reward_processing_classes = resolve_reward_models(
                reward_funcs,
                reward_processing_classes,
                quantization_config,
                args.model_init_kwargs,
                args.device,
                sharing,
                plan,
            )
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        tokenizers = {"processing_class": processing_class, "reward_processing_classes": reward_processing_classes}
        loading = {"quantization_config": quantization_config, "peft_config": peft_config}
        super().__init__(
            model, reward_funcs, args, callbacks=callbacks, optimizers=optimizers, **datasets, **tokenizers, **loading
        )
        self.placement: PlacementPlan = plan
        policy = self.accelerator.unwrap_model(self.model)
        self.reward_funcs = [as_scorer(self, index, func, policy) for index, func in enumerate(self.reward_funcs)]
        self.critic = None
        if args.baseline == "critic":
            value_model = build_value_model(
                value_model, self.model, self.reward_funcs, args, self.accelerator, quantization_config, plan
            )
            if args.disable_dropout:
                disable_dropout_in_model(value_model)
            self.critic = Critic(value_model, args, self.accelerator)
            self.add_callback(ValuePretrainingCallback(self))
        frozen = [self.ref_model, *(getattr(func, "model", None) for func in self.reward_funcs)]
        prepare_models(
            [policy, self.value_model],
            [self.accelerator.unwrap_model(m) if isinstance(m, torch.nn.Module) else m for m in frozen],
            generating=policy,
            dequantize=args.dequantize_for_inference,
        )

    @property
    def value_model(self):
        """The critic's [`ValueHeadModel`] (None without `baseline="critic"`)."""
        return None if self.critic is None else self.critic.model

    # The critic's optimizer and schedule are created next to the policy's, once the run length is known.
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.critic is not None and self.critic.optimizer is None:
            self.critic.create_optimizer(num_updates=critic_updates(self, num_training_steps))
        return scheduler

    # ---------------------------------------------------------------------------------------------------------------
    # The step. Replaces RLOO's scoring (sequence-level leave-one-out advantages) by the per-token A_t = G_t − b_t.
    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rollout = self._rollout(inputs, mode)  # ids, masks, rewards per function, log-probabilities

        rewards = self._rewards(rollout)  # (global B,): R, NaN where unscorable
        scorable = rewards[rollout.local].isfinite().unsqueeze(1)  # (B, 1): an unscorable completion teaches nothing
        mask = rollout.completion_mask * scorable  # (B, C)
        per_token_kl = rollout.per_token_kl()  # (B, C)
        per_token_rewards, returns, sequence_returns = self._returns(rewards, per_token_kl, mask, rollout.local)
        self._metrics[mode]["objective/rlhf_reward"].append(torch.nanmean(sequence_returns).item())

        critic_batch, batch_values = None, None
        if self.critic is not None:  # V(s_t): taken before the critic learns from this batch
            critic_batch, batch_values = self._values(rollout, returns, mask, group_size, mode)
        baselines = self._baselines(rollout, batch_values, returns, mask, sequence_returns, group_size, mode)
        if critic_batch is not None:  # the critic learns from this batch only once its baselines are taken
            self._update_critic(critic_batch, batch_values)

        if baselines is None:  # RLOO evaluated with one completion per prompt: nothing to compare with
            advantages = torch.zeros_like(mask, dtype=torch.float32)
        elif self.critic is not None:
            advantages = gae_advantages(per_token_rewards, baselines, mask, self.args.gamma, self.args.lam)
        else:
            advantages = token_advantages(returns, baselines, mask)
        if self.args.normalize_advantages:
            advantages = whiten(advantages, mask)

        self._log_step(rollout, rewards, per_token_kl, advantages, mask, mode)
        batch = {
            "prompt_ids": rollout.prompt_ids,
            "prompt_mask": rollout.prompt_mask,
            "completion_ids": rollout.completion_ids,
            "completion_mask": rollout.completion_mask,
            "advantages": advantages,
        }
        if self.num_iterations > 1:  # the clipped surrogate compares the policy with the one that sampled
            batch["old_per_token_logps"] = rollout.rollout_logps
        return batch

    def _rewards(self, rollout: Rollout) -> torch.Tensor:
        """R of each completion (global B,): the weighted reward functions, clipped as configured, minus
        `missing_eos_penalty` for a completion cut at the length limit; NaN where unscorable."""
        rewards = sequence_rewards(rollout.rewards_per_func, self.reward_weights, self.reward_clip_range)
        if self.args.missing_eos_penalty is not None:
            cut = cut_off(rollout.completion_ids, rollout.completion_mask, self.eos_token_ids)
            rewards = rewards - self.args.missing_eos_penalty * gather(cut).float()
        return rewards

    def _returns(self, rewards, per_token_kl, mask, local):
        """Per-token rewards r_t (B, C), returns G_t (B, C) and each sequence's return (global B,, NaN unscorable).

        RLOO's return is TRL's: the KL summed into one sequence reward. The others pay the KL per token, where it is
        incurred, with the sequence reward on the last token (`advantages.token_rewards`)."""
        if self.args.baseline == "rloo":
            rewards = rewards - self.beta * gather(per_token_kl.sum(dim=1))  # (global B,)
            returns = discounted_returns(rewards[local].nan_to_num(0.0, 0.0, 0.0), mask, self.args.gamma)
            return None, returns, rewards
        per_token_rewards = token_rewards(rewards[local].nan_to_num(0.0, 0.0, 0.0), per_token_kl, mask, self.beta)
        returns = reward_to_go(per_token_rewards, mask, self.args.gamma)  # (B, C): G_t
        sequence_returns = gather(returns[:, 0].contiguous()).masked_fill(~rewards.isfinite(), torch.nan)
        return per_token_rewards, returns, sequence_returns

    def _values(self, rollout: Rollout, returns, mask, group_size: int, mode):
        """V(s_t) before the critic learns from this batch, with the returns and mask, gathered from every process
        (the others of a completion may sit on other processes). In training also the critic's record of the batch,
        whose first pass computed the values (its gradients wait for `_update_critic`)."""
        input_ids, attention_mask, layer_input = rollout.input_ids, rollout.attention_mask, rollout.critic_layer_input
        if mode == "train":
            critic_batch = self.critic.first_pass(input_ids, attention_mask, returns, mask, layer_input)
            values = critic_batch.values
        else:
            critic_batch, values = None, self.critic.values(input_ids, attention_mask, returns.size(1), layer_input)
        gathered = [self._gather_rows(tensor) for tensor in (values, returns, mask)]
        group = group_size if group_size > 1 else len(gathered[0])  # one completion per prompt: the rest of the batch
        return critic_batch, BatchValues(values, *gathered, group)

    def _baselines(self, rollout: Rollout, batch_values, returns, mask, sequence_returns, group_size, mode):
        """b_t (B, C) of the critic or the optimal token baseline, or b per sequence (B,) of the other critic-free
        baselines; None for RLOO evaluated with one completion per prompt."""
        if self.args.baseline == "otb":  # over every process's rows: the others may sit on other processes
            gathered = [returns, rollout.rollout_logps, rollout.sum_squared_probs, mask]
            gathered = [self._gather_rows(tensor.float()) for tensor in gathered]
            group = group_size if group_size > 1 else len(gathered[0])
            baselines = optimal_token_baseline(*gathered, group)
            return baselines[self._local_rows(len(returns)), : returns.size(1)].nan_to_num(0.0)
        if self.critic is None:
            if self.args.baseline == "rloo" and group_size < 2:
                return None
            return sequence_baseline(sequence_returns, self.args.baseline, group_size)[rollout.local].nan_to_num(0.0)
        values, all_values, all_returns, all_mask, group = batch_values
        warming_up = mode == "train" and self.state.global_step < self.args.critic_warmup_steps
        baselines = self.critic.baselines(all_values, all_returns, all_mask, group, warming_up)
        baselines = baselines[self._local_rows(len(values)), : values.size(1)].nan_to_num(0.0)
        metrics = self._metrics[mode]
        metrics["critic/values_mean"].append(masked_mean(values, mask).item())
        cut = gather(cut_off(rollout.completion_ids, rollout.completion_mask, self.eos_token_ids))
        for name, value in value_diagnostics(all_values, all_returns, all_mask, group, cut).items():
            metrics[f"critic/{name}"].append(value)
        metrics["critic/baseline_explained_variance"].append(explained_variance(baselines, returns, mask).item())
        metrics["critic/weight"].append(self.critic.weight(warming_up))
        return baselines

    def _update_critic(self, critic_batch, batch_values) -> None:
        """The critic's optimizer steps on this batch, and the batch joins the fit of w for later batches."""
        update = self.critic.update(critic_batch)
        self.critic.observe(*batch_values[1:])  # every process's values, returns and mask, and the group
        self._metrics["train"]["critic/value_loss"].append(update.value_loss)
        self._metrics["train"]["critic/num_skipped_updates"].append(update.num_skipped_updates)

    def _log_step(self, rollout: Rollout, rewards, per_token_kl, advantages, mask, mode: str) -> None:
        metrics = self._metrics[mode]
        if rollout.reference_logps is not None:
            completion_mask = rollout.completion_mask
            kl_stats = self.accelerator.reduce(torch.stack([per_token_kl.sum(), completion_mask.sum().float()]), "sum")
            metrics["kl"].append((kl_stats[0] / kl_stats[1].clamp(min=1.0)).item())
        metrics["rewards/num_nonfinite"].append((~rewards.isfinite()).sum().item())
        metrics["advantages/mean"].append(masked_mean(advantages, mask).item())
        metrics["advantages/std"].append(masked_var(advantages, mask).sqrt().item())
        first_token_advantages = self._gather_rows(advantages[:, :1]).squeeze(1)  # one per completion, for the table
        self._logs["advantages"].extend(first_token_advantages.tolist())

    # ---------------------------------------------------------------------------------------------------------------
    # REINFORCE's token-level loss on the advantages above (its clipped, importance-weighted form on reused rollouts).
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The ReinforceTrainer does not support returning outputs")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        if self.num_iterations == 1:
            loss = reinforce_loss(per_token_logps, inputs["advantages"], completion_mask)
        else:
            loss = clipped_surrogate_loss(
                per_token_logps,
                inputs["old_per_token_logps"],
                inputs["advantages"],
                completion_mask,
                self.epsilon_low,
                self.epsilon_high,
                sequence_level=self.args.baseline == "rloo",  # RLOO's ratio is the whole completion's
            )
        mode = "train" if self.model.training else "eval"
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        entropy_stats = self.accelerator.reduce(
            torch.stack([(entropies * completion_mask).sum(), completion_mask.sum().float()]), reduction="sum"
        )
        self._metrics[mode]["entropy"].append((entropy_stats[0] / entropy_stats[1].clamp(min=1.0)).item())
        return loss

    # ---------------------------------------------------------------------------------------------------------------
    # A saved model is usable without the trainer: the critic (adapter or weights) and its head sit beside the policy;
    # a checkpoint also holds the critic's exact trainable state, statistics, optimizer and schedule, for resuming.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.critic is not None and self.args.should_save:
            output_dir = Path(output_dir or self.args.output_dir)
            # A critic adapter on the policy's base is already saved by PEFT, in the `critic` sub-folder
            shared_adapter = f"../{CRITIC_ADAPTER}" if self.value_model.adapter_name == CRITIC_ADAPTER else None
            self.value_model.save_pretrained(output_dir / VALUE_MODEL_DIR, adapter_saved_at=shared_adapter)
            if self.is_checkpoint_folder(output_dir):
                self.critic.save_checkpoint(output_dir)

    # Too few prompts for one batch of rollouts would train nothing, and a script would then save the untrained model
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        check_enough_prompts(self.train_dataset, self.args)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # Our own hooks (see `ResumableMixin`): the checks; then, all passed, the critic's state once its optimizer exists.
    def _check_resumable(self, checkpoint: Path) -> None:
        check_reinforce_checkpoint(self, checkpoint)

    def _before_resuming(self, checkpoint: Path) -> None:
        if self.critic is not None:
            self.add_callback(CriticResumeCallback(self.critic, checkpoint))

    # A PEFT policy gets back its own adapter only: transformers would load every adapter sub-folder of the checkpoint
    # (`value_model/`, `critic/`) into it as one more adapter, and upcast the bf16 adapters of QLoRA to fp32. The
    # critic's own state comes back through `CriticResumeCallback`.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        policy = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(policy, PeftModel) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        weights = load_file(Path(resume_from_checkpoint) / ADAPTER_WEIGHTS)
        set_peft_model_state_dict(policy, weights, adapter_name="default")


class BatchValues(NamedTuple):
    """The critic's values of a batch, before it learns from it: this process's rows, and every process's."""

    values: torch.Tensor  # (B, C): V(s_t)
    all_values: torch.Tensor  # (global B, C), padded to the longest completion
    all_returns: torch.Tensor  # (global B, C)
    all_mask: torch.Tensor  # (global B, C)
    group: int  # the completions each completion is compared with: its prompt's, or the whole batch


def reinforce_config(model, args: ReinforceConfig | None) -> ReinforceConfig:
    """`args`, or the default config named after the model; an `RLOOConfig` is refused (it has no `baseline`)."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return ReinforceConfig(f"{model_name.split('/')[-1]}-REINFORCE")
    if isinstance(args, RLOOConfig) and not isinstance(args, ReinforceConfig):
        raise TypeError("args is an RLOOConfig; pass an hf_reinforce.ReinforceConfig, which adds `baseline`.")
    return args


class CriticResumeCallback(TrainerCallback):
    """Restores the critic's state from the checkpoint a run resumes from, once its optimizer exists: `on_train_begin`
    runs after the trainer has created its optimizers and loaded their states. Once per `train` call."""

    def __init__(self, critic: Critic, checkpoint: Path):
        self.critic, self.checkpoint = critic, checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.checkpoint is not None:
            self.critic.load_checkpoint(self.checkpoint)
            self.checkpoint = None
