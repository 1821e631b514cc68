"""Bradley-Terry reward model training with soft preference labels: TRL's `RewardTrainer` with five changes.

1. The loss is `hf_reinforce.losses.bradley_terry_loss`, fed by an optional `chosen_prob` column (soft labels).
2. Malformed preference data fails at construction with a message that names the row, the column and the fix.
3. QLoRA trains on CPU with fp32 activations (TRL casts the trainable parameters of a quantized model to bf16) and
   keeps training after an evaluation (bitsandbytes would switch to a CPU kernel without backward).
4. The reward head always joins the PEFT `modules_to_save`, so a saved adapter carries its trained head.
5. With `shared_prefix_forward`, the tokens that every sequence of a batch starts with run once
   (`hf_reinforce.speedups.shared_prefix`).
"""

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from peft import PeftConfig, PeftModel
from transformers import BitsAndBytesConfig, DataCollator, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import EvalPrediction
from trl import RewardTrainer as TRLRewardTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import get_config_model_id

from .checkpoints import ResumableMixin, checkpoint_model_kind
from .checks import check_local_path
from .engines import EngineMixin
from .losses import bradley_terry_loss
from .model_card import ModelCardMixin
from .reward_config import RewardConfig
from .reward_models import record_reward_training
from .speedups import prepare_models
from .speedups.shared_prefix import forward_with_shared_prefix


CHOSEN_PROB_COLUMN = "chosen_prob"
MARGIN_COLUMN = "margin"
# Samplers that read each row's length from `args.length_column_name`
LENGTH_GROUPED_SAMPLERS = ("group_by_length", "batch_rebalance")
# The names transformers gives the head of a sequence classifier: decoder models use `score`, encoders `classifier`
REWARD_HEAD_NAMES = ("score", "classifier")


@dataclass
class DataCollatorForSoftPreference(DataCollatorForPreference):
    """TRL's [`DataCollatorForPreference`] that also batches the optional `chosen_prob` column, as it does `margin`."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if CHOSEN_PROB_COLUMN in examples[0]:
            # (batch,): one probability per pair, aligned with the chosen half of `input_ids`
            chosen_prob = [example[CHOSEN_PROB_COLUMN] for example in examples]
            batch[CHOSEN_PROB_COLUMN] = torch.tensor(chosen_prob, dtype=torch.float)
        return batch


def pair_length(example: dict[str, Any], column: str) -> dict[str, int]:
    """The tokens a pair takes in a batch, where chosen and rejected are padded alike: the longer one's."""
    return {column: max(len(example["chosen_ids"]), len(example["rejected_ids"]))}


def groups_by_length(args: RewardConfig) -> bool:
    return args.train_sampling_strategy in LENGTH_GROUPED_SAMPLERS


def _is_empty(answer: Any) -> bool:
    # A text answer is empty when blank; a conversational one when it has no message
    return answer is None or len(answer.strip() if isinstance(answer, str) else answer) == 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_preference_example(example: dict[str, Any], index: int, dataset_name: str) -> dict[str, Any]:
    for column in ("prompt", "chosen", "rejected"):
        if column in example and example[column] is not None and not isinstance(example[column], str | list):
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset has a `{column}` of type {type(example[column]).__name__} "
                f"({example[column]!r}); answers and prompts are texts (or lists of chat messages). Fix or drop that "
                "row."
            )
    for column in ("chosen", "rejected"):
        if column in example and _is_empty(example[column]):
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset has an empty `{column}` answer; every pair needs two "
                "non-empty answers. Drop such rows first, e.g. `dataset.filter(lambda row: row['chosen'].strip() "
                "and row['rejected'].strip())`."
            )
    chosen_prob = example.get(CHOSEN_PROB_COLUMN, 1.0)
    if not (_is_number(chosen_prob) and 0.0 <= chosen_prob <= 1.0):  # NaN fails both comparisons
        raise ValueError(
            f"Row {index} of the {dataset_name} dataset has `{CHOSEN_PROB_COLUMN}`={chosen_prob!r}; it must be a "
            "probability in [0, 1] (how likely annotators are to prefer `chosen`). Fix or drop that row."
        )
    margin = example.get(MARGIN_COLUMN, 0.0)
    if not (_is_number(margin) and math.isfinite(margin)):
        raise ValueError(
            f"Row {index} of the {dataset_name} dataset has `{MARGIN_COLUMN}`={margin!r}; it must be a finite number "
            "(how much higher `chosen` should score, 0 for none). Fix or drop that row."
        )
    return example


def with_reward_head_saved(peft_config: PeftConfig | None) -> PeftConfig | None:
    """A copy of `peft_config` whose `modules_to_save` includes the reward head (TRL issue #1379).

    Left out, the head keeps its random initialisation, is frozen and is missing from the saved adapter. PEFT methods
    without such a list (prompt tuning and the like) are returned as they are.
    """
    if peft_config is None or not hasattr(peft_config, "modules_to_save"):
        return peft_config
    if peft_config.task_type == "SEQ_CLS":  # PEFT adds `classifier` and `score` itself; a second time would duplicate
        return peft_config
    peft_config = copy.copy(peft_config)
    modules_to_save = list(peft_config.modules_to_save or [])
    peft_config.modules_to_save = modules_to_save + [name for name in REWARD_HEAD_NAMES if name not in modules_to_save]
    return peft_config


def check_preference_dataset(dataset: Dataset | IterableDataset, dataset_name: str) -> Dataset | IterableDataset:
    """Raise a `ValueError` naming the column and the fix if `dataset` is not a usable preference dataset.

    A `Dataset` is checked row by row now; an `IterableDataset` (streaming) lazily, as its rows are read, and the
    returned dataset must then be used in its place.
    """
    column_names = get_dataset_column_names(dataset)
    is_tokenized = {"chosen_ids", "rejected_ids"} <= set(column_names)
    is_legacy_tokenized = {"chosen_input_ids", "rejected_input_ids"} <= set(column_names)
    if not (is_tokenized or is_legacy_tokenized):
        for column in ("chosen", "rejected"):
            if column not in column_names:
                raise ValueError(
                    f"The {dataset_name} dataset has no `{column}` column (its columns: {column_names}). A preference "
                    "dataset needs `chosen` and `rejected` answers, plus an optional shared `prompt`; rename yours, "
                    f"e.g. `dataset = dataset.rename_column('response_b', '{column}')`."
                )
    if isinstance(dataset, IterableDataset):
        return dataset.map(_check_preference_example, with_indices=True, fn_kwargs={"dataset_name": dataset_name})
    if len(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset has no rows; give it preference pairs to train on.")
    checked = ("prompt", "chosen", "rejected", CHOSEN_PROB_COLUMN, MARGIN_COLUMN)
    checked_columns = [name for name in checked if name in column_names]
    if checked_columns:
        for index, example in enumerate(dataset.select_columns(checked_columns)):
            _check_preference_example(example, index, dataset_name)
    return dataset


def check_preference_datasets(train_dataset, eval_dataset) -> tuple:
    """`check_preference_dataset` on the training and evaluation datasets (a dict of them too), which it returns."""
    if train_dataset is not None:
        train_dataset = check_preference_dataset(train_dataset, "train")
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: check_preference_dataset(dataset, name) for name, dataset in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = check_preference_dataset(eval_dataset, "eval")
    return train_dataset, eval_dataset


class RewardTrainer(ResumableMixin, EngineMixin, ModelCardMixin, TRLRewardTrainer):
    """Drop-in [`trl.RewardTrainer`] training on soft preference labels, with QLoRA that also runs on CPU.

    Same arguments as TRL's trainer. Rows may carry `chosen_prob` (probability that annotators prefer `chosen`,
    default 1.0) next to TRL's `margin`; the loss is `hf_reinforce.losses.bradley_terry_loss` and `soft_accuracy`,
    `mean_chosen_reward` and `mean_rejected_reward` join TRL's metrics.
    """

    _tag_names = ["trl", "reward-trainer", "hf_reinforce"]

    # Why: collate `chosen_prob`, keep the reward head in the adapter, undo TRL's bf16 cast of a quantized model and
    # keep its 4-bit layers differentiable after evaluations
    def __init__(
        self,
        model: "str | PreTrainedModel | PeftModel",
        args: RewardConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset
        | IterableDataset
        | DatasetDict
        | IterableDatasetDict
        | dict[str, Dataset | IterableDataset]
        | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: "BitsAndBytesConfig | None" = None,
        peft_config: "PeftConfig | None" = None,
    ):
        check_local_path(model, "model")
        train_dataset, eval_dataset = check_preference_datasets(train_dataset, eval_dataset)
        if args is None:  # TRL would default to its own config, which skips our checks
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = RewardConfig(f"{model_name.split('/')[-1]}-Reward")
        if getattr(args, "shared_prefix_forward", False) and PartialState().num_processes > 1:
            raise ValueError(
                "`shared_prefix_forward` runs in one process: with several (DDP, DeepSpeed, FSDP) each forward of "
                "the wrapped model would be taken for a step. Set `shared_prefix_forward: false`."
            )
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "data_collator": data_collator}
        metrics = {"compute_metrics": compute_metrics, "preprocess_logits_for_metrics": preprocess_logits_for_metrics}
        optimization = {"optimizers": optimizers, "optimizer_cls_and_kwargs": optimizer_cls_and_kwargs}
        loading = {"quantization_config": quantization_config, "peft_config": with_reward_head_saved(peft_config)}
        super().__init__(
            model,
            args,
            processing_class=processing_class,
            callbacks=callbacks,
            **datasets,
            **metrics,
            **optimization,
            **loading,
        )
        if data_collator is None:
            self.data_collator = DataCollatorForSoftPreference(
                pad_token_id=self.processing_class.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of
            )
        prepare_models([self.model])  # QLoRA on CPU: fp32 adapters, differentiable 4-bit layers, fused LoRA

    # Why: a dataset whose every pair is longer than `max_length` would train on nothing and save an untrained model;
    # the length-grouped samplers of transformers look for `input_ids`, which a preference dataset does not have
    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase,
        args: RewardConfig,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(prepared, Dataset) and len(prepared) == 0 and len(dataset) > 0:
            raise ValueError(
                f"Every pair of the {dataset_name} dataset ({len(dataset)} rows) is longer than max_length="
                f"{args.max_length} tokens, so none is left to train on. Raise `max_length`, or shorten the texts."
            )
        if (
            groups_by_length(args)
            and isinstance(prepared, Dataset)
            and args.length_column_name not in prepared.column_names
        ):
            prepared = prepared.map(
                pair_length, fn_kwargs={"column": args.length_column_name}, desc=f"Measuring {dataset_name} pairs"
            )
        return prepared

    # Why: a checkpoint of a REINFORCE run (a policy, maybe a critic) fails deep inside the optimizer's state otherwise
    def _check_resumable(self, checkpoint):
        if checkpoint_model_kind(checkpoint) == "policy" or (checkpoint / "value_model").is_dir():
            raise ValueError(
                f"{checkpoint} is not a reward model's checkpoint (its model generates text: a REINFORCE policy?); "
                "resume a reward run from one of its own checkpoints, or start afresh."
            )

    # Why: `remove_unused_columns` would drop `chosen_prob` before the collator sees it, as it would `margin`, and the
    # pair lengths before a length-grouped sampler reads them
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        kept = [CHOSEN_PROB_COLUMN, *([self.args.length_column_name] if groups_by_length(self.args) else [])]
        self._signature_columns = [*self._signature_columns, *(c for c in kept if c not in self._signature_columns)]

    # Why: swap TRL's hard-label loss for the soft-label one; TRL's forward pass (less the tokens every sequence
    # shares, with `shared_prefix_forward`) and metrics are kept as they are
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        chosen_prob = inputs.pop(CHOSEN_PROB_COLUMN, None)  # (batch,) or None; the model must not receive it
        if getattr(self.args, "shared_prefix_forward", False):  # a trl.RewardConfig has no such field
            pad_token_id = self.accelerator.unwrap_model(model).config.get_text_config().pad_token_id
            model = functools.partial(forward_with_shared_prefix, model, pad_token_id=pad_token_id)
        _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

        # outputs.logits: (2·batch, 1), the chosen answers first
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)  # (batch,) each
        loss = bradley_terry_loss(rewards_chosen, rewards_rejected, chosen_prob, inputs.get("margin"))
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)

        with torch.no_grad():
            mode = "train" if self.model.training else "eval"
            prob = torch.ones_like(rewards_chosen) if chosen_prob is None else chosen_prob.to(rewards_chosen.dtype)
            # Expected agreement with an annotator who prefers `chosen` with probability p; ties agree with no one
            agreement = prob * (rewards_chosen > rewards_rejected) + (1 - prob) * (rewards_rejected > rewards_chosen)
            for name, values in (
                ("soft_accuracy", agreement),
                ("mean_chosen_reward", rewards_chosen),
                ("mean_rejected_reward", rewards_rejected),
            ):
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(values.mean()).mean().item())

        return (loss, outputs) if return_outputs else loss

    # Why: record how the base was quantised, so that `ReinforceTrainer` puts a saved adapter back onto the same
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            record_reward_training(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)
