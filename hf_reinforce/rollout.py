"""One batch of rollouts as a record, and the pure functions that turn what was sampled into sequence rewards.

`ReinforceTrainer` builds one `Rollout` per generation batch: the prompts' and completions' token ids and masks, every
reward function's score, and the log-probabilities the step needs. Every later stage of the step reads it, and
nothing else: no stage leaves state on the trainer for another to pick up.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
from accelerate.utils import gather, gather_object, pad_across_processes
from transformers import GenerationConfig, LogitsProcessorList
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import nanstd, pad, use_adapter

from .checks import check_text_prompts
from .speedups.sampling import InverseCdfSampler


@dataclass(frozen=True)
class Rollout:
    """The completions of one generation batch, scored. Rows are this process's; `rewards_per_func` is gathered."""

    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C), right-padded
    completion_mask: torch.Tensor  # (B, C): 1 up to and including EOS (0 for a masked truncated completion)
    rewards_per_func: torch.Tensor  # (global B, num_funcs), NaN where a function abstained
    rollout_logps: torch.Tensor | None  # (B, C) log π_old(a_t|s_t), None when nothing reads it
    reference_logps: torch.Tensor | None  # (B, C) log π_ref(a_t|s_t), None without a KL penalty
    critic_layer_input: torch.Tensor | None  # (B, P+C, hidden) entering the critic's first trained layer, if kept
    local: slice  # this process's rows of the global batch
    sum_squared_probs: torch.Tensor | None = None  # (B, C) Σ_a π_old(a|s_t)², for the optimal token baseline only

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P+C)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P+C)

    def per_token_kl(self) -> torch.Tensor:
        """log π(a_t|s_t) − log π_ref(a_t|s_t) on completion tokens (B, C); zeros without a KL penalty."""
        if self.reference_logps is None:
            return torch.zeros_like(self.completion_mask, dtype=torch.float32)
        return (self.rollout_logps - self.reference_logps) * self.completion_mask


def padded_token_ids(ids: list[list[int]], pad_token_id: int, side: str, multiple_of, device) -> tuple:
    """(ids, mask) of token-id lists padded on `side` to one tensor, as `trl.RLOOTrainer` pads them."""
    tensors = [torch.tensor(row) for row in ids]
    masks = [torch.ones_like(row, dtype=torch.long) for row in tensors]
    padded = pad(tensors, padding_value=pad_token_id, padding_side=side, pad_to_multiple_of=multiple_of)
    mask = pad(masks, padding_value=0, padding_side=side, pad_to_multiple_of=multiple_of)
    return padded.to(device), mask.to(device)


def sequence_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor, clip_range=None) -> torch.Tensor:
    """R = Σ_k w_k·r_k over the reward functions, clipped to `clip_range`; NaN where every function abstained."""
    # rewards_per_func: (B, num_funcs)   weights: (num_funcs,)
    rewards = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)  # (B,)
    rewards[rewards_per_func.isnan().all(dim=1)] = torch.nan
    if clip_range:
        rewards = rewards.clamp(*clip_range)
    return rewards


def cut_off(completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos_token_ids) -> torch.Tensor:
    """Whether each completion ended without EOS, cut at the length limit (B,)."""
    # completion_ids, completion_mask: (B, C)
    lengths = completion_mask.sum(dim=1)
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    ended = torch.isin(last, torch.tensor(list(eos_token_ids), device=last.device))
    return (lengths > 0) & ~ended


class RolloutMixin:
    """The rollout stage of `ReinforceTrainer`: generate completions of a batch of prompts with TRL's generation, score
    them with its reward functions, and take the log-probabilities the step needs, into one `Rollout`. It records the
    rollout metrics and completion logs `trl.RLOOTrainer` records."""

    def _rollout(self, inputs, mode: str) -> Rollout:
        """Generate completions of the batch's prompts and score them: the record every later stage reads."""
        check_text_prompts(inputs)
        prompts = [row["prompt"] for row in inputs]
        prompt_ids, completion_ids, completions, sampled = self._sample(prompts)
        prompt_ids_t, prompt_mask, completion_ids_t, completion_mask = self._padded(prompt_ids, completion_ids)
        input_ids = torch.cat([prompt_ids_t, completion_ids_t], dim=1)  # (B, P+C)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+C)
        rollout_logps, sum_squared_probs = self._rollout_logps(
            input_ids, attention_mask, completion_ids_t.size(1), sampled, mode
        )
        rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids)  # (global B, F)
        reference_logps, layer_input = self._reference_pass(input_ids, attention_mask, completion_ids_t.size(1))
        self._log_rollout(prompts, completions, rewards_per_func, mode)
        rows = self._local_rows(len(prompts))
        return Rollout(
            prompt_ids_t,
            prompt_mask,
            completion_ids_t,
            completion_mask,
            rewards_per_func,
            rollout_logps,
            reference_logps,
            layer_input,
            rows,
            sum_squared_probs,
        )

    def _padded(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> tuple:
        """(prompt ids, prompt mask, completion ids, completion mask): prompts left-padded, completions right-padded,
        as TRL pads them; with `mask_truncated_completions` a completion without EOS gets a mask of zeros."""
        device, pad_id, multiple = self.accelerator.device, self._tokenizer.pad_token_id, self.pad_to_multiple_of
        prompts, prompt_mask = padded_token_ids(prompt_ids, pad_id, "left", multiple, device)
        completions, completion_mask = padded_token_ids(completion_ids, pad_id, "right", multiple, device)
        if self.mask_truncated_completions:
            eos_and_pad = [*self.eos_token_ids, pad_id]
            truncated = torch.tensor([ids[-1] not in eos_and_pad for ids in completion_ids], device=device)
            completion_mask = completion_mask * (~truncated).unsqueeze(1).int()
        return prompts, prompt_mask, completions, completion_mask

    def _sample(self, prompts):
        """TRL's generation: prompt ids, completion ids, decoded completions, and what the sampler kept of each drawn
        token: (log π, Σ_a π(a)²), each (B, T) or None. With `inverse_cdf_sampling` the tokens are drawn by
        `InverseCdfSampler`, which keeps them; otherwise nothing is kept."""
        if not self.args.inverse_cdf_sampling:
            return (*self._generate(prompts), (None, None))
        # The sampler sees the scores after generate's own processors: they are the policy's logits only when
        # `generation_kwargs` adds none (min_new_tokens, suppress_tokens...); otherwise the rollouts get their forward.
        optimal_token_baseline = self.args.baseline == "otb"
        needed = self.beta != 0.0 or self.num_iterations > 1 or optimal_token_baseline
        sampler = InverseCdfSampler(
            self.temperature,
            record_logps=needed and not self.args.generation_kwargs,
            logps_temperature=self.temperature,
            record_sum_squared_probs=optimal_token_baseline and not self.args.generation_kwargs,
        )
        with self._generating_through(sampler):
            prompt_ids, completion_ids, completions = self._generate(prompts)
        kept = [
            torch.stack(steps, dim=1) if steps else None for steps in (sampler.token_logps, sampler.sum_squared_probs)
        ]
        return prompt_ids, completion_ids, completions, tuple(kept)

    @contextlib.contextmanager
    def _generating_through(self, sampler: InverseCdfSampler):
        """RLOO's `generate` call made, for its duration, a greedy search that keeps the token `sampler` drew."""
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

    def _rollout_logps(self, input_ids, attention_mask, completion_length, sampled, mode):
        """log π_old(a_t|s_t) (B, C), for the KL penalty, reused rollouts or the optimal token baseline only, and
        Σ_a π_old(a|s_t)² (B, C) for that baseline only (else None): taken from the sampler when it kept them, from
        a forward pass otherwise; None when nothing reads them."""
        if self.beta == 0.0 and self.num_iterations == 1 and self.args.baseline != "otb":
            return None, None
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        if self.args.baseline == "otb":
            if all(kept is not None and kept.size(1) >= completion_length for kept in sampled):
                return tuple(kept[:, :completion_length].to(input_ids.device) for kept in sampled)
            return self._sampling_statistics(input_ids, attention_mask, completion_length, batch_size)
        sampled_logps = sampled[0]
        if sampled_logps is not None and sampled_logps.size(1) >= completion_length:
            return sampled_logps[:, :completion_length].to(input_ids.device), None
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            return self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, completion_length, batch_size
            )[0], None

    @torch.no_grad()
    def _sampling_statistics(self, input_ids, attention_mask, completion_length, batch_size):
        """log π(a_t|s_t) and Σ_a π(a|s_t)² (B, C) of the sampling distribution (the policy at its temperature)."""
        logps, sums = [], []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, len(input_ids), batch_size):
                rows = slice(start, start + batch_size)
                logits = self.model(
                    input_ids=input_ids[rows],
                    attention_mask=attention_mask[rows],
                    logits_to_keep=completion_length + 1,
                ).logits[:, :-1]  # (b, C, V): the logits that predict each completion token
                log_probs = (logits.float() / self.temperature).log_softmax(dim=-1)
                logps.append(log_probs.gather(-1, input_ids[rows, -completion_length:, None]).squeeze(-1))
                sums.append((2 * log_probs).exp().sum(dim=-1))
        return torch.cat(logps), torch.cat(sums)

    @torch.no_grad()
    def _reference_pass(self, input_ids, attention_mask, completion_length):
        """log π_ref(a_t|s_t) (B, C) for the KL penalty (None without one), and the hidden states that pass computed
        at the first layer a critic on the top layers of the same base trains (None unless that critic exists)."""
        if self.beta == 0.0:
            return None, None
        batch_size = self.args.per_device_train_batch_size
        if self.ref_model is not None:
            logps = self._get_per_token_logps_and_entropies(
                self.ref_model, input_ids, attention_mask, completion_length, batch_size
            )[0]
            return logps, None
        # With PEFT the reference is the base with adapters disabled (or the "ref" copy of a pretrained adapter)
        policy = self.accelerator.unwrap_model(self.model)
        ref_adapter = "ref" if "ref" in policy.peft_config else None
        reuse = self.critic is not None and ref_adapter is None and self.value_model.adapter_name is not None
        layer_inputs = []
        with (
            use_adapter(policy, adapter_name=ref_adapter),
            self.critic.capturing_layer_input(layer_inputs) if reuse else contextlib.nullcontext(),
        ):
            logps = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, completion_length, batch_size
            )[0]
        layer_input = torch.cat(layer_inputs) if layer_inputs else None
        return logps, layer_input if layer_input is not None and len(layer_input) == len(input_ids) else None

    def _local_rows(self, num_rows: int) -> slice:
        """This process's rows of a batch gathered from every process."""
        return slice(self.accelerator.process_index * num_rows, (self.accelerator.process_index + 1) * num_rows)

    def _gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, C) rows of every process, padded with zeros to the longest completion, in process order."""
        if self.accelerator.num_processes == 1:
            return tensor
        return gather(pad_across_processes(tensor.contiguous(), dim=1, pad_index=0))

    def _log_rollout(self, prompts, completions, rewards_per_func, mode: str) -> None:
        """The reward metrics and completion logs `trl.RLOOTrainer` records for a batch of rollouts."""
        metrics, group_size = (
            self._metrics[mode],
            self.num_generations if mode == "train" else self.num_generations_eval,
        )
        for index, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, index]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, index]).item())
            self._logs["rewards"][name].extend(rewards_per_func[:, index].tolist())
        rewards = sequence_rewards(rewards_per_func, self.reward_weights)
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        grouped = sequence_rewards(rewards_per_func, self.reward_weights, self.reward_clip_range).view(-1, group_size)
        group_std = nanstd(grouped, dim=1) if group_size > 1 else torch.zeros(len(grouped))
        metrics["frac_reward_zero_std"].append(
            torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()
        )
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):  # sorted: every rank alike
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / count)
        self._pending_metrics.clear()
