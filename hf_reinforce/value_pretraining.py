"""Value pretraining: the critic regressed, before RL starts, on answers of the initial policy that already exist.

A fresh critic explains little of the returns of the first batches, and a run of a few dozen steps may end before it
has learned much (VC-PPO pretrains the value model for this reason). Answers of the initial policy often exist
already, e.g. those the reward model's preference pairs were made of: each is tokenised as the trainer's rollouts
are (the prompt through the chat template with the generation prompt, the answer's tokens then EOS, cut at
`max_completion_length`), scored with the trainer's reward functions as in its step, and every prefix of it gets the
answer's return as its target. At the start the policy is its reference, so the KL penalty is 0 and that return is
R (discounted by `gamma`). Nothing is sampled: the cost is one scoring pass and the critic's regression.
"""

import math

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.data_utils import is_conversational

from .rollout import Rollout


PRETRAINING_LOSS = "critic/pretraining_loss"
COLUMNS = ("prompt", "completion")


def checked_value_pretraining_dataset(dataset, args):
    """`dataset`, once it is known to be usable for value pretraining under `args` (None stays None)."""
    if dataset is None:
        return None
    if args.baseline != "critic":
        raise ValueError(
            f"value_pretraining_dataset pretrains the critic, which only baseline='critic' builds, but baseline="
            f"{args.baseline!r}; leave value_pretraining_dataset unset or set `baseline: critic`."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"value_pretraining_dataset must be a datasets.Dataset with `prompt` and `completion` columns; got "
            f"{type(dataset).__name__}."
        )
    for column in COLUMNS:
        if column not in dataset.column_names:
            raise ValueError(
                f"value_pretraining_dataset has no `{column}` column (its columns: {dataset.column_names}); it needs "
                "`prompt` and `completion` columns, texts or lists of chat messages, as TRL's prompt-completion "
                "datasets."
            )
    if len(dataset) == 0:
        raise ValueError(
            "value_pretraining_dataset is empty; give it answers of the initial policy or leave it unset."
        )
    return dataset


def global_batches(order: list[int], batch_size: int, num_processes: int) -> list[list[int]]:
    """Rows of `order` in batches of `batch_size` per process; with several processes the last batch wraps around
    to the first rows, so that every process takes the same number of rows (and steps)."""
    size = batch_size * num_processes
    batches = [order[start : start + size] for start in range(0, len(order), size)]
    if num_processes > 1 and len(batches[-1]) < size:
        batches[-1] = (batches[-1] + order * math.ceil(size / len(order)))[:size]
    return batches


def critic_updates(trainer, num_training_steps: int) -> int:
    """The updates the critic's schedule counts: one per batch of rollouts, plus those of value pretraining."""
    args = trainer.args
    updates = math.ceil(num_training_steps / (args.steps_per_generation * trainer.num_iterations))
    dataset = trainer.value_pretraining_dataset
    if dataset is not None:
        num_processes = trainer.accelerator.num_processes
        batches = global_batches(list(range(len(dataset))), args.per_device_train_batch_size, num_processes)
        updates += args.critic_pretraining_epochs * len(batches)
    return updates


def completion_text(completion) -> str:
    """The text of an answer: itself, or the contents of its messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def tokenized_answers(trainer, dataset) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and completion token ids of every row, as the trainer's rollouts hold them: the prompt as TRL's
    generation tokenises it, the completion's tokens then EOS, cut at `max_completion_length` (without its EOS then,
    as a generation cut at the limit)."""
    prompt_ids, _, _ = trainer._tokenize_prompts(list(dataset["prompt"]))
    tokenizer, limit = trainer._tokenizer, trainer.args.max_completion_length
    completion_ids = [
        (tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[
            :limit
        ]
        for completion in dataset["completion"]
    ]
    return [list(ids) for ids in prompt_ids], completion_ids


def local_rows(trainer, batch: list[int]) -> slice:
    """This process's share of a global batch (all of it with one process)."""
    size = math.ceil(len(batch) / trainer.accelerator.num_processes)
    start = trainer.accelerator.process_index * size
    return slice(start, min(start + size, len(batch)))


def answer_rewards(trainer, dataset, prompt_ids, completion_ids) -> torch.Tensor:
    """R of every row (N,), as the trainer's step scores a rollout: its reward functions and weights, clipping and
    `missing_eos_penalty`; NaN where unscorable."""
    rewards = torch.full((len(dataset),), torch.nan, device=trainer.accelerator.device)
    order = list(range(len(dataset)))
    for batch in global_batches(order, trainer.args.per_device_train_batch_size, trainer.accelerator.num_processes):
        local = local_rows(trainer, batch)
        rows = batch[local]
        inputs = [dataset[index] for index in rows]
        prompts, ids = [row["prompt"] for row in inputs], [completion_ids[index] for index in rows]
        contents = trainer.processing_class.batch_decode(ids, skip_special_tokens=True)
        conversational = is_conversational({"prompt": prompts[0]})
        completions = [[{"role": "assistant", "content": c}] for c in contents] if conversational else contents
        rewards_per_func = trainer._calculate_rewards(inputs, prompts, completions, ids)  # (global B, F)
        padded = trainer._padded([prompt_ids[index] for index in rows], ids)
        rollout = Rollout(*padded, rewards_per_func, None, None, None, local)
        rewards[torch.tensor(batch, device=rewards.device)] = trainer._rewards(rollout)
    trainer._pending_metrics.clear()  # what reward functions logged belongs to no step of the run
    trainer._pending_extra_logs.clear()
    return rewards


def regression_batch(trainer, batch: list[int], rewards, prompt_ids, completion_ids) -> tuple:
    """(input_ids, attention_mask, returns, mask) of this process's rows of a global batch: the returns as the
    trainer's step computes them with a zero KL (the policy is still its reference), unscorable rows masked out."""
    local = local_rows(trainer, batch)
    rows = batch[local]
    prompts, prompt_mask, completions, completion_mask = trainer._padded(
        [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows]
    )
    batch_rewards = rewards[torch.tensor(batch, device=rewards.device)]  # (global B,)
    mask = completion_mask * batch_rewards[local].isfinite().unsqueeze(1)
    zero_kl = torch.zeros_like(mask, dtype=torch.float32)
    _, returns, _ = trainer._returns(batch_rewards, zero_kl, mask, local)
    return torch.cat([prompts, completions], 1), torch.cat([prompt_mask, completion_mask], 1), returns, mask


def pretraining_epochs(trainer, dataset, prompt_ids, completion_ids, rewards):
    """Per epoch, the regression batches of the rows in an order drawn from the run's seed (every process alike)."""
    args, num_processes = trainer.args, trainer.accelerator.num_processes
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.critic_pretraining_epochs):
        order = torch.randperm(len(dataset), generator=generator).tolist()
        batches = global_batches(order, args.per_device_train_batch_size, num_processes)
        yield (regression_batch(trainer, batch, rewards, prompt_ids, completion_ids) for batch in batches)


def pretrain_critic(trainer, dataset) -> list[float]:
    """Regress the trainer's critic on `dataset` for `critic_pretraining_epochs` epochs: each one's mean value loss."""
    prompt_ids, completion_ids = tokenized_answers(trainer, dataset)
    rewards = answer_rewards(trainer, dataset, prompt_ids, completion_ids)
    return trainer.critic.pretrain(pretraining_epochs(trainer, dataset, prompt_ids, completion_ids, rewards))


class ValuePretrainingCallback(TrainerCallback):
    """Pretrains the critic at the start of a fresh run, once its optimizer exists (`on_train_begin` runs after the
    trainer has created its optimizers), and logs the last epoch's mean value loss. A run resumed from a checkpoint
    (a step above 0) takes the critic's state from the checkpoint instead. Once per trainer."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, self.trainer = self.trainer, None
        if trainer is None or trainer.value_pretraining_dataset is None or state.global_step > 0:
            return
        losses = pretrain_critic(trainer, trainer.value_pretraining_dataset)
        trainer.log({PRETRAINING_LOSS: losses[-1]})
