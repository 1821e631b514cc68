"""Tiny offline models and tokenizers for tests, the demo and the tiny recipes.

Nothing here touches the network: the tokenizer is built from a character list and the models from a config, so
every code path that takes a model *path* can be exercised by saving these to a folder first.
"""

import math
import random
import string
from pathlib import Path

import datasets
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = string.ascii_lowercase + string.digits + " .,!?:;'-+=()\n"


def build_tiny_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character; 54 tokens by default) that needs no file."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(characters))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"  # RLOO generation needs left padding; reward models read the last real token
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    """A 2-layer, 64-wide Llama config sized for the tokenizer (about 0.1 M parameters)."""
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    config.update(overrides)
    return LlamaConfig(**config)


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides))


def build_tiny_reward_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides
) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1, **overrides))


def save_tiny_models(directory: str | Path, seed: int = 0, **config_overrides) -> dict[str, str]:
    """Save a tiny tokenizer, causal LM and reward model under `directory`; return their paths by role."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    paths = {"policy": directory / "tiny-llama", "reward_model": directory / "tiny-llama-reward"}
    for role, model in (
        ("policy", build_tiny_causal_lm(tokenizer, seed=seed, **config_overrides)),
        ("reward_model", build_tiny_reward_model(tokenizer, seed=seed, **config_overrides)),
    ):
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return {role: str(path) for role, path in paths.items()}


TARGET_CHARACTER = "a"
NON_TARGET_CHARACTERS = [character for character in string.ascii_lowercase if character != TARGET_CHARACTER]


def gold_reward(text: str) -> float:
    """The hidden preference of the synthetic task: the number of times the letter `a` occurs in `text`.

    A tiny reward model learns it in a few dozen steps, and a tiny policy can raise it by writing more `a`s, so the
    same rule serves for reward modelling and for REINFORCE. Prompts of `make_preference_dataset` contain no `a`, so
    scoring a prompt plus its completion gives the same value as scoring the completion alone.
    """
    return float(text.count(TARGET_CHARACTER))


def _sample_completion(rng: random.Random, length: int) -> str:
    # Each completion draws its own share of `a`s, so pairs cover gold gaps from 1 to `length`
    target_rate = rng.uniform(0.0, 0.6)
    return "".join(
        TARGET_CHARACTER if rng.random() < target_rate else rng.choice(NON_TARGET_CHARACTERS) for _ in range(length)
    )


def make_preference_dataset(
    num_pairs: int, seed: int = 0, soft: bool = False, completion_length: int = 12, temperature: float = 1.0
) -> datasets.Dataset:
    """Preference pairs ranked by `gold_reward` (more `a`s is better), in TRL's explicit-prompt format.

    Each row has a `prompt` (3 to 6 letters other than `a`, then `:`) and two completions of `completion_length`
    lowercase letters with different `gold_reward`; `chosen` is always the one with more `a`s (ties are never drawn).
    With `soft=True` a `chosen_prob` column holds the probability that a Bradley-Terry annotator with the given
    `temperature` prefers `chosen`: `σ((gold_reward(chosen) − gold_reward(rejected)) / temperature)`, above 0.5.
    The same `seed` always gives the same dataset; use different seeds for training and held-out pairs.
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < num_pairs:
        prompt = "".join(rng.choice(NON_TARGET_CHARACTERS) for _ in range(rng.randint(3, 6))) + ":"
        first, second = _sample_completion(rng, completion_length), _sample_completion(rng, completion_length)
        gold_gap = gold_reward(first) - gold_reward(second)
        if gold_gap == 0:
            continue
        chosen, rejected = (first, second) if gold_gap > 0 else (second, first)
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if soft:
            row["chosen_prob"] = 1.0 / (1.0 + math.exp(-abs(gold_gap) / temperature))
        rows.append(row)
    return datasets.Dataset.from_list(rows)
