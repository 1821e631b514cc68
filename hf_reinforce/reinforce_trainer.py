import contextlib
import functools
import math
from pathlib import Path

import torch
from accelerate.utils import gather, pad_across_processes
from datasets import Dataset, IterableDataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import GenerationConfig, LogitsProcessorList
from trl import RLOOConfig, RLOOTrainer
from trl.trainer.utils import disable_dropout_in_model, use_adapter

from .advantages import (
    discounted_returns,
    explained_variance,
    gae_advantages,
    masked_mean,
    masked_var,
    recentred_explained_variance,
    reward_to_go,
    sequence_baseline,
    token_advantages,
    token_rewards,
    whiten,
)
from .checkpoints import ResumableMixin, checkpoint_model_kind, safetensors_shapes
from .checks import check_local_path
from .critic import CRITIC_ADAPTER, CRITIC_STATE, Critic, build_value_model, shares_base_weights
from .dequantized import dequantize_for_inference
from .engines import engage_fsdp_on_cpu, engine_shards_base, outside_zero3_init, reward_sharing
from .fused_lora import fuse_lora_for_training
from .losses import clipped_surrogate_loss, reinforce_loss
from .model_card import ModelCardMixin
from .quantization import cast_trainable_parameters_to_activation_dtype, keep_4bit_layers_differentiable
from .reinforce_config import ReinforceConfig
from .reward_models import (
    RewardModelScorer,
    SharedBaseRewardScorer,
    SharedRewardAdapter,
    policy_base_name,
    resolve_reward_models,
    same_quantization,
)
from .sampling import InverseCdfSampler, lm_head_in_blocks


VALUE_MODEL_DIR = "value_model"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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


def check_prompt_dataset(dataset, dataset_name: str) -> None:
    """Raise a `ValueError` naming the row or column and the fix when `dataset` holds no usable prompts.

    An `IterableDataset` (streaming) is checked for its columns only.
    """
    if dataset is None or not isinstance(dataset, Dataset | IterableDataset):
        return
    columns = dataset.column_names
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"The {dataset_name} dataset has no `prompt` column (its columns: {columns}); REINFORCE generates "
            "completions of those prompts. Rename yours, e.g. `dataset = dataset.rename_column('question', 'prompt')`."
        )
    if isinstance(dataset, IterableDataset):
        return
    for index, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str | list):
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset has a `prompt` of type {type(prompt).__name__} "
                f"({prompt!r}); a prompt is a text or a list of chat messages. Fix or drop that row."
            )
        if len(prompt) == 0:
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset has an empty `prompt`; give every row some text to "
                "complete, or drop such rows, e.g. `dataset.filter(lambda row: row['prompt'])`."
            )


def check_enough_prompts(dataset, args: ReinforceConfig) -> None:
    """Raise a `ValueError` when `dataset` has fewer prompts than one batch of rollouts takes: not one step would
    run (RLOO's sampler drops an incomplete batch), and the run would end with the untrained model."""
    needed = args.generation_batch_size // args.num_generations
    if isinstance(dataset, Dataset) and len(dataset) < needed:
        raise ValueError(
            f"The train dataset has {len(dataset)} prompt(s), but one batch of rollouts needs {needed} different "
            "prompts (generation_batch_size / num_generations), so not one step would run. Add prompts, or lower "
            "`per_device_train_batch_size` or `steps_per_generation`, or raise `num_generations`."
        )


def check_inputs(model, reward_funcs, value_model, train_dataset, eval_dataset) -> None:
    """Missing local folders and unusable prompt datasets, refused before any model loads."""
    check_local_path(model, "model")
    check_local_path(value_model, "value_model")
    check_prompt_dataset(train_dataset, "train")
    for name, dataset in (eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}).items():
        check_prompt_dataset(dataset, name)
    for index, reward_func in enumerate(reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]):
        check_local_path(reward_func, f"reward_funcs[{index}]")


class ReinforceTrainer(ResumableMixin, ModelCardMixin, RLOOTrainer):
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
        check_inputs(model, reward_funcs, value_model, train_dataset, eval_dataset)
        policy_base = policy_base_name(model, peft_config)
        with outside_zero3_init():  # a reward model is frozen and outside the engine: whole on every process
            reward_funcs, reward_processing_classes = resolve_reward_models(
                reward_funcs,
                reward_processing_classes,
                quantization_config,
                args.model_init_kwargs,
                args.device,
                share_with=None if policy_base is None else (policy_base, reward_sharing(args.reward_shares_base)),
            )
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
        self._scoring_rollouts, self._rollout_logps, self._generated_logps = False, None, None
        self._keep_fp32_adapter()
        keep_4bit_layers_differentiable(self.model)
        self.reward_funcs = [self._as_scorer(index, func) for index, func in enumerate(self.reward_funcs)]
        self.critic = None
        if args.baseline == "critic":
            value_model = build_value_model(
                value_model, self.model, self.reward_funcs, args, self.accelerator, quantization_config
            )
            if args.disable_dropout:
                disable_dropout_in_model(value_model)
            self.critic = Critic(value_model, args, self.accelerator)
        elif value_model is not None:
            raise ValueError(f"value_model is only used with baseline='critic', but baseline={args.baseline!r}.")
        for model in (self.model, self.value_model):  # LoRA on 4-bit weights trains as one product on CPUs
            if model is not None:
                fuse_lora_for_training(self.accelerator.unwrap_model(model))
        lm_head_in_blocks(self.accelerator.unwrap_model(self.model))  # the same logits, sooner, when decoding on CPUs
        if args.dequantize_for_inference:
            self._dequantize_for_inference()

    def _keep_fp32_adapter(self) -> None:
        """Undo TRL's bf16 cast of a quantized policy's adapter where its activations are fp32 (the CPU recipes): there
        it only rounds the updates away and runs the adapter's products in bf16, which most CPUs compute several times
        slower. With 16-bit activations the cast stays, as TRL meant it (and fp16 parameters would not train)."""
        policy = self.accelerator.unwrap_model(self.model)
        quantized = getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False)
        if quantized and policy.get_input_embeddings().weight.dtype == torch.float32:
            cast_trainable_parameters_to_activation_dtype(policy)

    def _dequantize_for_inference(self) -> None:
        """Route the 4-bit layers of every model this trainer runs without gradients through dequantised weights."""
        if engine_shards_base():
            raise ValueError(
                "dequantize_for_inference needs each process to hold whole 4-bit weights, but DeepSpeed ZeRO-3 or "
                "FSDP shards them; set `dequantize_for_inference: false` with these engines."
            )
        models = [self.model, self.ref_model, self.value_model]
        models += [getattr(func, "model", None) for func in self.reward_funcs]
        for model in models:
            if isinstance(model, torch.nn.Module):
                dequantize_for_inference(self.accelerator.unwrap_model(model))

    # Reward models score texts as `RewardTrainer` trained them, never a cut-off completion as if it had ended; a
    # reward adapter trained on the policy's base joins it there rather than holding a second copy of the base.
    def _as_scorer(self, index: int, reward_func):
        policy = self.accelerator.unwrap_model(self.model)
        if isinstance(reward_func, SharedRewardAdapter) or self._joins_policy_base(reward_func, policy):
            source = reward_func.adapter_dir if isinstance(reward_func, SharedRewardAdapter) else reward_func
            tokenizer = reward_func.tokenizer if isinstance(reward_func, SharedRewardAdapter) else None
            return SharedBaseRewardScorer(
                policy,
                source,
                tokenizer or self.reward_processing_classes[index],
                self.eos_token_ids,
                name=self.reward_func_names[index],
                batch_size=self.args.per_device_train_batch_size,
            )
        if not isinstance(reward_func, torch.nn.Module):
            return reward_func
        if isinstance(reward_func, PeftModel) and not getattr(reward_func, "is_loaded_in_4bit", False):
            reward_func.to(self.accelerator.device)  # TRL places only transformers models
        return RewardModelScorer(
            reward_func,
            self.reward_processing_classes[index],
            self.eos_token_ids,
            name=self.reward_func_names[index],
            batch_size=self.args.per_device_train_batch_size,
        )

    def _joins_policy_base(self, reward_func, policy) -> bool:
        """A loaded reward `PeftModel` on the policy's own base weights, quantised alike, unless told otherwise."""
        if self.args.reward_shares_base is False or engine_shards_base() or not isinstance(policy, PeftModel):
            return False
        if not isinstance(reward_func, PeftModel) or not shares_base_weights(policy, reward_func):
            return False
        bases = (policy.get_base_model(), reward_func.get_base_model())
        return same_quantization(*(getattr(base.config, "quantization_config", None) for base in bases))

    # accelerate starts FSDP on accelerator devices only; FSDP launches on CPU processes get it here, before any
    # model is prepared, rather than running as DDP.
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        engage_fsdp_on_cpu(self)

    @property
    def value_model(self):
        """The critic's [`ValueHeadModel`] (None without `baseline="critic"`)."""
        return None if self.critic is None else self.critic.model

    # The critic's optimizer and schedule are created next to the policy's, once the run length is known.
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.critic is not None and self.critic.optimizer is None:
            steps_per_rollout_batch = self.args.steps_per_generation * self.num_iterations
            self.critic.create_optimizer(num_updates=math.ceil(num_training_steps / steps_per_rollout_batch))
        return scheduler

    # Keeps the raw rewards: the parent folds them into its own leave-one-out advantages and returns only those.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    # torch.multinomial draws one exponential number per vocabulary entry, a large share of a CPU generation; with
    # `inverse_cdf_sampling` a logits processor draws each token from one uniform and keeps its log-probability.
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if not self.args.inverse_cdf_sampling:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        # The processor sees the scores after generate's own processors: they are the policy's logits only when
        # `generation_kwargs` adds none (min_new_tokens, suppress_tokens...); otherwise the rollouts get their forward.
        # Without a KL penalty or reused rollouts nothing reads them, and no token's log-probability is computed.
        needed = self.kl_coef != 0.0 or self.num_iterations > 1
        keep_logps = needed and not self.args.generation_kwargs
        sampler = InverseCdfSampler(self.temperature, record_logps=keep_logps, logps_temperature=self.temperature)
        with self._generating_through(sampler):
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        self._generated_logps = torch.stack(sampler.token_logps, dim=1) if sampler.token_logps else None  # (B, T)
        return completion_ids

    @contextlib.contextmanager
    def _generating_through(self, sampler: InverseCdfSampler):
        """RLOO's `generate` call made a greedy search that keeps the token `sampler`, its last processor, drew."""
        greedy = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None, "min_p": None}
        sampling_config, self.generation_config = (
            self.generation_config,
            GenerationConfig(**{**self.generation_kwargs, **greedy}, disable_compile=True),
        )
        policy = self.accelerator.unwrap_model(self.model_wrapped)
        policy.generate = functools.partial(
            type(policy).generate, policy, logits_processor=LogitsProcessorList([sampler])
        )
        try:
            yield
        finally:
            self.generation_config = sampling_config
            del policy.generate

    # RLOO scores each rollout under the current policy for its ratio clipping; the REINFORCE loss needs those
    # log-probabilities only for the KL penalty or for reusing the batch, so that forward pass is skipped otherwise,
    # and taken from generation when it kept them.
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._scoring_rollouts and self.kl_coef == 0.0 and self.num_iterations == 1:
            return input_ids.new_zeros(input_ids.size(0), logits_to_keep, dtype=torch.float32), None, None
        generated, self._generated_logps = self._generated_logps, None  # (B, T) or None
        if self._scoring_rollouts and generated is not None and generated.size(1) >= logits_to_keep:
            self._rollout_logps = generated[:, :logits_to_keep].to(input_ids.device)  # (B, C)
            return self._rollout_logps, None, None
        result = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if self._scoring_rollouts:
            self._rollout_logps = result[0]  # (B, C): log π_old(a_t|s_t), kept per token
        return result

    # Replaces RLOO's sequence advantages by the per-token A_t = G_t − b_t of the configured baseline.
    def _generate_and_score_completions(self, inputs):
        self._scoring_rollouts = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._scoring_rollouts, self._generated_logps = False, None
        rollout_logps, self._rollout_logps = self._rollout_logps, None  # (B, C) or None
        output.pop("old_logps")  # a sequence sum; the per-token values are kept when they are needed
        if self.num_iterations > 1:
            output["old_per_token_logps"] = rollout_logps
        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_mask = output["prompt_ids"], output["completion_mask"]
        input_ids = torch.cat([prompt_ids, output["completion_ids"]], dim=1)  # (B, P+C)
        attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)  # (B, P+C)
        local = slice(
            self.accelerator.process_index * len(prompt_ids), (self.accelerator.process_index + 1) * len(prompt_ids)
        )
        group_size = self.num_generations if mode == "train" else self.num_generations_eval

        rewards = self._scored_rewards(output)  # (global B,), NaN = unscorable
        scorable = rewards.isfinite()
        mask = completion_mask * scorable[local].unsqueeze(1)  # (B, C): unscorable completions teach nothing
        per_token_kl = self._per_token_kl(output, rollout_logps, input_ids, attention_mask, mode)  # (B, C)
        if self.args.baseline == "rloo":
            advantages = self._rloo_advantages(rewards, per_token_kl, mask, group_size, local)
        else:
            rewards_t = token_rewards(rewards[local].nan_to_num(0.0, 0.0, 0.0), per_token_kl, mask, self.kl_coef)
            returns = reward_to_go(rewards_t, mask, self.args.gamma)  # (B, C): G_t
            start_returns = gather(returns[:, 0].contiguous()).masked_fill(~scorable, torch.nan)  # (global B,)
            self._metrics[mode]["objective/rlhf_reward"].append(torch.nanmean(start_returns).item())
            if self.critic is not None:
                baselines = self._critic_baselines(input_ids, attention_mask, returns, mask, mode)
                advantages = gae_advantages(rewards_t, baselines, mask, self.args.gamma, self.args.lam)
            else:
                baselines = sequence_baseline(start_returns, self.args.baseline, group_size)[local]
                advantages = token_advantages(returns, baselines.nan_to_num(0.0), mask)
        if self.args.whiten_advantages:
            advantages = whiten(advantages, mask)
        output["advantages"] = advantages

        metrics = self._metrics[mode]
        metrics["rewards/num_nonfinite"].append((~scorable).sum().item())
        metrics["advantages/mean"].append(masked_mean(advantages, mask).item())
        metrics["advantages/std"].append(masked_var(advantages, mask).sqrt().item())
        return output

    def _scored_rewards(self, output) -> torch.Tensor:
        """R = Σ_k w_k·r_k of the reward functions, clipped as configured, minus `missing_eos_penalty` for a
        completion cut at the length limit (global B,), NaN where unscorable."""
        rewards_per_func = self._rewards_per_func  # (global B, num_funcs), NaN where a function abstained
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[rewards_per_func.isnan().all(dim=1)] = torch.nan
        if self.reward_clip_range:
            rewards = rewards.clamp(*self.reward_clip_range)
        if self.args.missing_eos_penalty is not None:
            rewards = rewards - self.args.missing_eos_penalty * gather(self._cut_off(output)).float()
        return rewards

    def _cut_off(self, output) -> torch.Tensor:
        """Whether each completion ended without EOS, cut at the length limit (B,)."""
        completion_ids, lengths = output["completion_ids"], output["completion_mask"].sum(dim=1)
        last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        ended = torch.isin(last, torch.tensor(self.eos_token_ids, device=last.device))
        return (lengths > 0) & ~ended

    def _per_token_kl(self, output, rollout_logps, input_ids, attention_mask, mode) -> torch.Tensor:
        """log π(a_t|s_t) − log π_ref(a_t|s_t) per completion token (B, C); zeros without a KL penalty."""
        completion_mask = output["completion_mask"]
        if self.kl_coef == 0.0:
            return torch.zeros_like(completion_mask, dtype=torch.float32)
        ref_logps = self._reference_logps(output, input_ids, attention_mask)  # (B, C)
        per_token_kl = (rollout_logps - ref_logps) * completion_mask
        kl_stats = self.accelerator.reduce(torch.stack([per_token_kl.sum(), completion_mask.sum().float()]), "sum")
        self._metrics[mode]["kl"].append((kl_stats[0] / kl_stats[1].clamp(min=1.0)).item())
        return per_token_kl

    def _rloo_advantages(self, rewards, per_token_kl, mask, group_size, local) -> torch.Tensor:
        """TRL's RLOO: the KL summed into one sequence reward, minus the leave-one-out mean of the group's."""
        rewards = rewards - self.kl_coef * gather(per_token_kl.sum(dim=1))  # (global B,)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["objective/rlhf_reward"].append(torch.nanmean(rewards).item())
        if group_size < 2:  # evaluation with one completion per prompt: nothing to compare with, as in RLOO
            return torch.zeros_like(mask, dtype=torch.float32)
        baselines = sequence_baseline(rewards, "rloo", group_size)[local].nan_to_num(0.0)
        returns = discounted_returns(rewards[local].nan_to_num(0.0, 0.0, 0.0), mask, self.args.gamma)
        return token_advantages(returns, baselines, mask)

    def _critic_baselines(self, input_ids, attention_mask, returns, mask, mode) -> torch.Tensor:
        """b_t from the critic (fitted on this batch first when training), with its metrics."""
        metrics = self._metrics[mode]
        if mode == "train":
            values, critic_loss = self.critic.fit(input_ids, attention_mask, returns, mask)  # V(s_t), before fitting
            metrics["critic/value_loss"].append(critic_loss)
            metrics["critic/num_skipped_updates"].append(self.critic.num_skipped_updates)
        else:
            values = self.critic.values(input_ids, attention_mask, returns.size(1))
        # The others of a completion may sit on other processes: the baselines are computed on the global batch
        all_values, all_returns, all_mask = (self._gather_rows(tensor) for tensor in (values, returns, mask))
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if group_size == 1:  # one completion per prompt: the others are the rest of the batch
            group_size = len(all_values)
        warming_up = mode == "train" and self.state.global_step < self.args.critic_warmup_steps
        baselines = self.critic.baselines(all_values, all_returns, all_mask, group_size, warming_up)
        if mode == "train":
            self.critic.observe(all_values, all_returns, all_mask, group_size)
        rows = slice(self.accelerator.process_index * len(values), (self.accelerator.process_index + 1) * len(values))
        baselines = baselines[rows, : values.size(1)].nan_to_num(0.0)
        metrics["critic/values_mean"].append(masked_mean(values, mask).item())
        metrics["critic/explained_variance"].append(explained_variance(values, returns, mask).item())
        metrics["critic/baseline_explained_variance"].append(explained_variance(baselines, returns, mask).item())
        recentred_ev = recentred_explained_variance(all_values, all_returns, all_mask, group_size)
        metrics["critic/recentred_explained_variance"].append(recentred_ev.item())
        metrics["critic/weight"].append(self.critic.weight(warming_up))
        return baselines

    def _gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, C) rows of every process, padded with zeros to the longest completion, in process order."""
        if self.accelerator.num_processes == 1:
            return tensor
        return gather(pad_across_processes(tensor.contiguous(), dim=1, pad_index=0))

    @torch.no_grad()
    def _reference_logps(self, output, input_ids, attention_mask) -> torch.Tensor:
        logits_to_keep = output["completion_ids"].size(1)
        kwargs = {key: output[key] for key in MULTIMODAL_KEYS if key in output}
        batch_size = self.args.per_device_train_batch_size
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(
                self.ref_model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )[0]
        # With PEFT the reference is the base with adapters disabled (or the "ref" copy of a pretrained adapter). A
        # critic on the top layers of that base keeps the hidden states below them from this pass.
        policy = self.accelerator.unwrap_model(self.model)
        ref_adapter = "ref" if "ref" in policy.peft_config else None
        reuse = self.critic is not None and ref_adapter is None and self.value_model.adapter_name is not None
        with (
            use_adapter(policy, adapter_name=ref_adapter),
            self.critic.reusing_reference_forward() if reuse else contextlib.nullcontext(),
        ):
            return self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )[0]

    # The seed's token-level loss on the advantages above (its clipped, importance-weighted form on reused rollouts).
    def _compute_loss(self, model, inputs):
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

    # A saved model is usable without the trainer: the critic (adapter or weights) and its head sit beside the policy.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.critic is not None and self.args.should_save:
            # A critic adapter on the policy's base is already saved by PEFT, in the `critic` sub-folder
            shared_adapter = f"../{CRITIC_ADAPTER}" if self.value_model.adapter_name == CRITIC_ADAPTER else None
            value_model_dir = Path(output_dir or self.args.output_dir) / VALUE_MODEL_DIR
            self.value_model.save_pretrained(value_model_dir, adapter_saved_at=shared_adapter)

    # Checkpoints hold the critic's exact trainable state, statistics, optimizer and schedule, for resuming.
    def _save_optimizer_and_scheduler(self, output_dir: str):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.critic is not None and self.args.should_save:
            self.critic.save_checkpoint(Path(output_dir))

    # Too few prompts for one batch of rollouts would train nothing, and a script would then save the untrained model
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        check_enough_prompts(self.train_dataset, self.args)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # A PEFT policy gets back its own adapter only: transformers would load every adapter sub-folder of the checkpoint
    # (`value_model/`, `critic/`) into it as one more adapter, and upcast the bf16 adapters of QLoRA to fp32. The
    # critic's own state comes back in `_load_optimizer_and_scheduler`.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        policy = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(policy, PeftModel) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        weights = load_file(Path(resume_from_checkpoint) / ADAPTER_WEIGHTS)
        set_peft_model_state_dict(policy, weights, adapter_name="default")

    def _check_resumable(self, checkpoint: Path) -> None:
        if checkpoint_model_kind(checkpoint) == "reward":
            raise ValueError(
                f"{checkpoint} is a checkpoint of a reward model (RewardTrainer); resume a REINFORCE run from one of "
                "its own checkpoints, or give the reward model as `reward_model_name_or_path`."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # the engines shard the parameters whose shapes the checks below compare
        policy = self.accelerator.unwrap_model(self.model)
        if isinstance(policy, PeftModel):
            expected = get_peft_model_state_dict(policy, adapter_name="default")
            self._check_same_tensors(checkpoint, ADAPTER_WEIGHTS, expected, "policy adapter")
        if self.critic is not None:
            expected = self.value_model.trainable_state_dict()
            self._check_same_tensors(checkpoint, CRITIC_STATE, expected, "critic", ignore_prefix="statistics.")

    @staticmethod
    def _check_same_tensors(checkpoint: Path, file_name: str, expected: dict, what: str, ignore_prefix=None):
        """Raise a ValueError unless `file_name` in `checkpoint` holds tensors of the names and shapes of
        `expected` (besides those named `ignore_prefix...`)."""
        path = checkpoint / file_name
        if not path.is_file():
            raise ValueError(
                f"{checkpoint} holds no {file_name}, so the {what} cannot be resumed from it: another kind of run "
                "wrote it (another baseline, or a full model instead of an adapter). Resume with the settings of the "
                "run that wrote it, or start afresh."
            )
        found = {
            name: shape
            for name, shape in safetensors_shapes(path).items()
            if not (ignore_prefix and name.startswith(ignore_prefix))
        }
        expected = {name: tuple(tensor.shape) for name, tensor in expected.items()}
        if found != expected:
            differ = sorted(name for name in found.keys() & expected.keys() if found[name] != expected[name])
            missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
            raise ValueError(
                f"The {what} in {path} does not fit this run's (missing {missing[:2]}, unexpected {extra[:2]}, other "
                f"shapes {differ[:2]}): it "
                "was written with other model, LoRA or critic settings (e.g. critic_shares_base, critic_layers). "
                "Resume with the settings of the run that wrote it, or start afresh."
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.critic is not None:
            self.critic.load_checkpoint(Path(checkpoint))
