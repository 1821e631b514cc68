"""Tiny offline models and tokenizers for tests, the demo and the tiny recipes.

Nothing here touches the network: the tokenizer is built from a character list and the models from a config, so
every code path that takes a model *path* can be exercised by saving these to a folder first.
"""

import string
from pathlib import Path

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


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character, 54 tokens) that needs no file."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
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


def save_tiny_models(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """Save a tiny tokenizer, causal LM and reward model under `directory`; return their paths by role."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    paths = {"policy": directory / "tiny-llama", "reward_model": directory / "tiny-llama-reward"}
    for role, model in (
        ("policy", build_tiny_causal_lm(tokenizer, seed=seed)),
        ("reward_model", build_tiny_reward_model(tokenizer, seed=seed)),
    ):
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return {role: str(path) for role, path in paths.items()}
