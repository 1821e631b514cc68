import copy
from pathlib import Path

import torch
from accelerate.utils import gather
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, PreTrainedModel, get_scheduler
from trl import RLOOConfig, RLOOTrainer
from trl.trainer.utils import disable_dropout_in_model, use_adapter

from .advantages import (
    discounted_returns,
    explained_variance,
    masked_mean,
    masked_var,
    sequence_baseline,
    token_advantages,
    whiten,
)
from .losses import reinforce_loss, value_loss
from .model_card import ModelCardMixin
from .quantization import keep_4bit_layers_differentiable
from .reinforce_config import ReinforceConfig
from .value_head import ValueHeadModel


CRITIC_ADAPTER = "critic"
VALUE_MODEL_DIR = "value_model"
CRITIC_STATE = "critic_state.safetensors"
CRITIC_OPTIMIZER = "critic_optimizer.pt"
CRITIC_SCHEDULER = "critic_scheduler.pt"
# Inputs RLOO forwards to the model next to the token ids when the prompts carry images.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class ReinforceTrainer(ModelCardMixin, RLOOTrainer):
    """
    REINFORCE with a baseline: the loss `−1/S Σ_i Σ_t A_t · log π(a_t|s_t)` with `A_t = G_t − b_t`.

    `G_t` is the return of the sequence reward R (reward functions / reward models, minus `beta`·KL to the reference)
    and `b_t` the baseline picked by `args.baseline`: a value-head critic V(s_t) trained to regress the return on its
    own optimizer (`"critic"`), the leave-one-out mean (`"rloo"`), the batch mean (`"mean"`) or nothing (`"none"`).

    Generation, reward computation, the reference model, PEFT and vLLM come from [`trl.RLOOTrainer`], whose
    constructor this shares, plus:

    Args:
        value_model (`str`, `PreTrainedModel`, `PeftModel`, `ValueHeadModel` or `None`):
            The critic, used when `args.baseline == "critic"`. A path or model is wrapped in a [`ValueHeadModel`];
            `None` builds one: a second adapter on the policy's base when the policy is a PEFT model and
            `args.critic_shares_base`, otherwise a copy of the reward model's backbone (when a reward model is given)
            or of the policy's, with the same quantization and LoRA settings as the policy.
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
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = ReinforceConfig(f"{model_name.split('/')[-1]}-REINFORCE")
        elif isinstance(args, RLOOConfig) and not isinstance(args, ReinforceConfig):
            raise TypeError("args is an RLOOConfig; pass an hf_reinforce.ReinforceConfig, which adds `baseline`.")
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # The KL penalty enters the return in `_generate_and_score_completions`, where the reference forward runs
        # once; zeroing RLOO's own coefficient keeps the parent from running it a second time.
        self.kl_coef, self.beta = self.beta, 0.0
        self._scoring_rollouts = False
        keep_4bit_layers_differentiable(self.model)
        self.value_model = None
        self.critic_optimizer = self.critic_scheduler = None
        if args.baseline == "critic":
            self.value_model = self._build_value_model(value_model, quantization_config)
            keep_4bit_layers_differentiable(self.value_model)
            if args.disable_dropout:
                disable_dropout_in_model(self.value_model)
            self._critic = self._wrap_for_data_parallel(self.value_model.train())
        elif value_model is not None:
            raise ValueError(f"value_model is only used with baseline='critic', but baseline={args.baseline!r}.")

    def _build_value_model(self, value_model, quantization_config) -> ValueHeadModel:
        if isinstance(value_model, ValueHeadModel):
            return value_model.to(self.accelerator.device)
        if isinstance(value_model, PreTrainedModel | PeftModel):
            return ValueHeadModel(value_model).to(self.accelerator.device)
        if value_model is not None and not isinstance(value_model, str):
            raise TypeError(
                f"value_model must be a path, a transformers/PEFT model or a ValueHeadModel; got {type(value_model)}."
            )
        if value_model is None and isinstance(self.model, PeftModel) and self.args.critic_shares_base:
            return self._add_critic_adapter()
        reward_models = [self.accelerator.unwrap_model(f) for f in self.reward_funcs if isinstance(f, PreTrainedModel)]
        source = reward_models[0] if reward_models else self.accelerator.unwrap_model(self.model)
        if isinstance(source, PeftModel):
            source = source.get_base_model()
        head_init = None
        if value_model is None and reward_models and hasattr(reward_models[0], "score"):
            head_init = reward_models[0].score.weight.detach().float().cpu()  # start from the reward model's head
        if isinstance(self.model, PeftModel) or isinstance(value_model, str):
            # A quantized or adapter-trained policy: load the backbone afresh and give the critic its own LoRA
            model_init_kwargs = dict(self.args.model_init_kwargs or {})
            if quantization_config is not None:
                model_init_kwargs["quantization_config"] = quantization_config
                model_init_kwargs.setdefault("device_map", {"": self.accelerator.device})  # 4-bit weights don't move
            backbone = AutoModel.from_pretrained(value_model or source.config._name_or_path, **model_init_kwargs)
            if isinstance(self.model, PeftModel):
                backbone = self._lora_copy(backbone)
        else:
            backbone = copy.deepcopy(source.base_model)  # full fine-tuning: the critic starts as a copy of the decoder
        critic = ValueHeadModel(backbone, head_init=head_init)
        if quantization_config is None:
            return critic.to(self.accelerator.device)
        critic.value_head.to(self.accelerator.device)
        return critic

    def _lora_copy(self, backbone):
        lora_config = copy.deepcopy(self.model.peft_config["default"])
        lora_config.task_type = None  # the critic's backbone is a bare decoder, not a causal LM
        return get_peft_model(backbone, lora_config)

    def _add_critic_adapter(self) -> ValueHeadModel:
        if self.accelerator.num_processes > 1:
            raise ValueError(
                "critic_shares_base=True keeps policy and critic on one card; with several processes set "
                "critic_shares_base=False so that the critic is its own data-parallel model."
            )
        policy = self.model
        policy.add_adapter(CRITIC_ADAPTER, copy.deepcopy(policy.peft_config["default"]))
        policy.set_adapter("default")  # keeps the critic's adapter out of the policy optimizer
        critic = ValueHeadModel(policy, adapter_name=CRITIC_ADAPTER)
        critic.value_head.to(self.accelerator.device)
        return critic

    def _wrap_for_data_parallel(self, critic: ValueHeadModel):
        if self.accelerator.num_processes == 1:
            return critic
        device_ids = [self.accelerator.device] if self.accelerator.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(critic, device_ids=device_ids)

    # The critic's optimizer and schedule are created next to the policy's, once the run length is known.
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.value_model is not None and self.critic_optimizer is None:
            self.critic_optimizer = torch.optim.AdamW(
                self.value_model.trainable_parameters(), lr=self.args.critic_learning_rate
            )
            num_critic_updates = -(-num_training_steps // self.args.steps_per_generation)
            self.critic_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                self.critic_optimizer,
                num_warmup_steps=0,
                num_training_steps=num_critic_updates,
            )
        return scheduler

    # Keeps the raw rewards: the parent folds them into its own leave-one-out advantages and returns only those.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    # RLOO scores each rollout under the current policy for its ratio clipping; the REINFORCE loss has no ratio, so
    # that forward pass is skipped unless the KL penalty needs those log-probabilities.
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._scoring_rollouts and self.kl_coef == 0.0:
            return input_ids.new_zeros(input_ids.size(0), logits_to_keep, dtype=torch.float32), None, None
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )

    # Replaces RLOO's sequence advantages by the per-token A_t = G_t − b_t of the configured baseline.
    def _generate_and_score_completions(self, inputs):
        self._scoring_rollouts = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._scoring_rollouts = False
        if self.kl_coef == 0.0:
            output.pop("old_logps")  # zeros: never computed, see above
        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_mask = output["prompt_ids"], output["completion_mask"]
        input_ids = torch.cat([prompt_ids, output["completion_ids"]], dim=1)  # (B, P+C)
        attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)  # (B, P+C)
        local = slice(
            self.accelerator.process_index * len(prompt_ids), (self.accelerator.process_index + 1) * len(prompt_ids)
        )

        rewards = self._sequence_rewards(output, input_ids, attention_mask)  # (global B,), NaN = unscorable
        scorable = rewards.isfinite()
        mask = completion_mask * scorable[local].unsqueeze(1)  # (B, C): unscorable completions teach nothing
        returns = discounted_returns(rewards[local].nan_to_num(0.0, 0.0, 0.0), mask, self.args.gamma)  # (B, C)
        if self.value_model is not None and mode == "train":
            values, critic_loss = self._fit_critic(input_ids, attention_mask, returns, mask)  # values: (B, C) = V(s_t)
            baselines = values
        elif self.value_model is not None:
            baselines = values = self._critic_values(input_ids, attention_mask, returns.size(1))
        else:
            num_generations = self.num_generations if mode == "train" else self.num_generations_eval
            baselines = sequence_baseline(
                rewards.masked_fill(~scorable, torch.nan), self.args.baseline, num_generations
            )
            baselines = baselines[local].nan_to_num(0.0)  # a lone scorable completion has no baseline to compare
        advantages = token_advantages(returns, baselines, mask)
        if self.args.whiten_advantages:
            advantages = whiten(advantages, mask)
        output["advantages"] = advantages

        metrics = self._metrics[mode]
        metrics["rewards/num_nonfinite"].append((~scorable).sum().item())
        metrics["advantages/mean"].append(masked_mean(advantages, mask).item())
        metrics["advantages/std"].append(masked_var(advantages, mask).sqrt().item())
        if self.value_model is not None:
            metrics["critic/values_mean"].append(masked_mean(values, mask).item())
            metrics["critic/explained_variance"].append(explained_variance(values, returns, mask).item())
            if mode == "train":
                metrics["critic/value_loss"].append(critic_loss)
        return output

    def _sequence_rewards(self, output, input_ids, attention_mask) -> torch.Tensor:
        """R = Σ_k w_k·r_k − β·KL(π‖π_ref), gathered over processes like RLOO's rewards (NaN where unscorable)."""
        rewards_per_func = self._rewards_per_func  # (global B, num_funcs), NaN where a function abstained
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[rewards_per_func.isnan().all(dim=1)] = torch.nan
        if self.reward_clip_range:
            rewards = rewards.clamp(*self.reward_clip_range)
        mode = "train" if self.model.training else "eval"
        if self.kl_coef != 0.0:
            completion_mask = output["completion_mask"]
            ref_logps = self._reference_logps(output, input_ids, attention_mask)  # (B, C)
            kl = output["old_logps"] - (ref_logps * completion_mask).sum(1)  # (B,): Σ_t log π/π_ref
            kl_stats = self.accelerator.reduce(torch.stack([kl.sum(), completion_mask.sum().float()]), "sum")
            self._metrics[mode]["kl"].append((kl_stats[0] / kl_stats[1].clamp(min=1.0)).item())
            rewards = rewards - self.kl_coef * gather(kl)
        self._metrics[mode]["objective/rlhf_reward"].append(torch.nanmean(rewards[rewards.isfinite()]).item())
        return rewards

    @torch.no_grad()
    def _reference_logps(self, output, input_ids, attention_mask) -> torch.Tensor:
        logits_to_keep = output["completion_ids"].size(1)
        kwargs = {key: output[key] for key in MULTIMODAL_KEYS if key in output}
        batch_size = self.args.per_device_train_batch_size
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(
                self.ref_model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )[0]
        # With PEFT the reference is the base with adapters disabled (or the "ref" copy of a pretrained adapter)
        policy = self.accelerator.unwrap_model(self.model)
        with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
            return self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )[0]

    def _critic_rows(self, input_ids, attention_mask, rows, completion_length) -> torch.Tensor:
        """V(s_t) for each completion token a_t of the rows; s_t is the prefix before a_t, ending at position t − 1."""
        values = self._critic(input_ids[rows], attention_mask[rows])  # (rows, P+C)
        return values[:, -completion_length - 1 : -1].float()  # (rows, C)

    def _row_chunks(self, num_rows: int) -> list[slice]:
        chunk = self.args.per_device_train_batch_size
        return [slice(start, start + chunk) for start in range(0, num_rows, chunk)]

    @torch.no_grad()
    def _critic_values(self, input_ids, attention_mask, completion_length) -> torch.Tensor:
        chunks = self._row_chunks(len(input_ids))
        return torch.cat([self._critic_rows(input_ids, attention_mask, rows, completion_length) for rows in chunks])

    def _fit_critic(self, input_ids, attention_mask, returns, mask) -> tuple[torch.Tensor, float]:
        """Regress V(s_t) on the returns with the critic's own optimizer.

        Returns the values each row had before the critic trained on it, which are the baselines: the first pass
        of the regression computes them anyway, so no separate value pass is needed.
        """
        baseline_values, losses = [], []
        with self.value_model.critic_adapter():
            for epoch in range(self.args.critic_epochs):
                for rows in self._row_chunks(len(input_ids)):
                    values = self._critic_rows(input_ids, attention_mask, rows, returns.size(1))
                    if epoch == 0:
                        baseline_values.append(values.detach())
                    loss = value_loss(values, returns[rows], mask[rows])
                    loss.backward()
                    if self.args.critic_max_grad_norm > 0:
                        parameters = self.critic_optimizer.param_groups[0]["params"]
                        torch.nn.utils.clip_grad_norm_(parameters, self.args.critic_max_grad_norm)
                    self.critic_optimizer.step()
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
        self.critic_scheduler.step()
        return torch.cat(baseline_values), torch.stack(losses).mean().item()  # one device sync per update

    # The seed's token-level loss on the advantages above; during critic warm-up the policy does not move.
    def _compute_loss(self, model, inputs):
        if self.state.global_step < self.args.critic_warmup_steps:
            return torch.zeros((), device=self.accelerator.device, requires_grad=True)
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
            **{key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs},
        )
        loss = reinforce_loss(per_token_logps, inputs["advantages"], completion_mask)
        mode = "train" if self.model.training else "eval"
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        entropy_stats = self.accelerator.reduce(
            torch.stack([(entropies * completion_mask).sum(), completion_mask.sum().float()]), reduction="sum"
        )
        self._metrics[mode]["entropy"].append((entropy_stats[0] / entropy_stats[1].clamp(min=1.0)).item())
        return loss

    # A saved model is usable without the trainer: the critic (adapter or weights) and its head sit beside the policy.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.value_model is not None and self.args.should_save:
            # A critic adapter on the policy's base is already saved by PEFT, in the `critic` sub-folder
            shared_adapter = f"../{CRITIC_ADAPTER}" if self.value_model.adapter_name == CRITIC_ADAPTER else None
            value_model_dir = Path(output_dir or self.args.output_dir) / VALUE_MODEL_DIR
            self.value_model.save_pretrained(value_model_dir, adapter_saved_at=shared_adapter)

    # Checkpoints hold the critic's exact trainable state and its optimizer and schedule, for resuming.
    def _save_optimizer_and_scheduler(self, output_dir: str):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.value_model is not None and self.args.should_save:
            save_file(self.value_model.trainable_state_dict(), Path(output_dir) / CRITIC_STATE)
            torch.save(self.critic_optimizer.state_dict(), Path(output_dir) / CRITIC_OPTIMIZER)
            torch.save(self.critic_scheduler.state_dict(), Path(output_dir) / CRITIC_SCHEDULER)

    # Loading an adapter upcasts it to fp32 while TRL trains QLoRA adapters in bf16: resume in the dtype of the run.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        dtypes = {name: param.dtype for name, param in self.model.named_parameters()}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in self.model.named_parameters():
            if param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.value_model is None:
            return
        checkpoint = Path(checkpoint)
        if not (checkpoint / CRITIC_STATE).exists():
            raise FileNotFoundError(
                f"{checkpoint} holds no critic state ({CRITIC_STATE}); it was not written by a ReinforceTrainer with "
                "baseline='critic', so the critic cannot be resumed from it."
            )
        device = self.accelerator.device
        self.value_model.load_trainable_state_dict(load_file(checkpoint / CRITIC_STATE, device=str(device)))
        self.critic_optimizer.load_state_dict(torch.load(checkpoint / CRITIC_OPTIMIZER, map_location=device))
        self.critic_scheduler.load_state_dict(torch.load(checkpoint / CRITIC_SCHEDULER))
