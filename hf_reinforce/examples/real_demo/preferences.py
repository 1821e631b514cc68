"""Preference pairs of the model's own answers, labelled by the gold judge: the datasets the two recipes read."""

import functools
import itertools
import math
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_reinforce.examples.real_demo.arguments import RealDemoArguments
from hf_reinforce.examples.real_demo.data import (
    NEGATIVE_PROMPT,
    POSITIVE_PROMPT,
    chat_prompt,
    split_items,
    write_jsonl,
)
from hf_reinforce.examples.real_demo.judge import gold_score
from hf_reinforce.examples.real_demo.sampling import Sampling, sample_answers
from hf_reinforce.speedups.sampling import lm_head_in_blocks


# The preference pairs are sampled 64 at a time, as they were for the reward models that docs/real_model.md measures:
# a batch of another size pads the prompts otherwise, and the same seed then draws other answers.
PREFERENCE_SAMPLING_BATCH_SIZE = 64


def label_pairs(prompts: list[list[dict]], groups: list[list[dict]], tau: float) -> list[dict]:
    """Conversational preference pairs from every two finished answers of a prompt with a different gold score, the
    better one chosen, with the soft label sigmoid((g_chosen - g_rejected) / tau) and the scores kept."""
    rows = []
    for prompt, group in zip(prompts, groups, strict=True):
        finished = [answer for answer in group if answer["finished"] and answer["text"]]
        for first, second in itertools.combinations(finished, 2):
            scores = gold_score(first["text"]), gold_score(second["text"])
            if scores[0] == scores[1]:
                continue  # no preference to learn
            (chosen, g_chosen), (rejected, g_rejected) = sorted(zip((first, second), scores), key=lambda x: -x[1])
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen["text"]}],
                    "rejected": [{"role": "assistant", "content": rejected["text"]}],
                    "chosen_prob": 1 / (1 + math.exp(-(g_chosen - g_rejected) / tau)),
                    "gold_chosen": g_chosen,
                    "gold_rejected": g_rejected,
                }
            )
    return rows


def make_data(model_name: str, tokenizer, data_dir: Path, args: RealDemoArguments, seed: int, sampling: Sampling):
    """Sample and label the pairs (training and held-out items) and write the datasets the recipes read."""
    train_items, held_out_items = split_items(args.num_held_out_items, seed)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
    lm_head_in_blocks(model)
    pair_items = random.Random(seed).choices(train_items, k=args.num_pair_prompts)
    # Held-out pairs: the model's own answers to the plain prompt, as REINFORCE will sample them
    contrasts = {
        "train": {
            NEGATIVE_PROMPT: args.negative_answers_per_prompt,
            POSITIVE_PROMPT: args.positive_answers_per_prompt,
        },
        "test": {},
    }
    splits = {"train": pair_items, "test": held_out_items}
    for offset, (split, items) in enumerate(splits.items()):
        prompts = [chat_prompt(item) for item in items]
        plain = args.completions_per_prompt - sum(contrasts[split].values())
        sample = functools.partial(
            sample_answers,
            model,
            tokenizer,
            sampling=sampling,
            seed=seed + offset,
            batch_size=PREFERENCE_SAMPLING_BATCH_SIZE,
        )
        groups = sample(prompts, plain, desc=f"sampling {split} pairs")
        for template, count in contrasts[split].items():
            if count:
                contrast_groups = sample(
                    [chat_prompt(item, template) for item in items], count, desc="contrast answers"
                )
                groups = [group + extra for group, extra in zip(groups, contrast_groups, strict=True)]
        pairs = label_pairs(prompts, groups, args.tau)
        if not pairs:
            raise ValueError(
                f"No {split} pair could be labelled: no prompt got two finished answers with different gold scores. "
                "Raise `num_pair_prompts`, `completions_per_prompt` or the recipe's `max_completion_length`."
            )
        write_jsonl(pairs, data_dir / "preferences" / f"{split}.jsonl")
    write_jsonl([{"prompt": chat_prompt(item)} for item in train_items], data_dir / "prompts" / "train.jsonl")
    write_jsonl([{"prompt": chat_prompt(item)} for item in held_out_items], data_dir / "prompts" / "test.jsonl")
