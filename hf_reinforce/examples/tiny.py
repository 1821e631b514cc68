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


class EnumerableToy:
    """A policy small enough to enumerate: vocabulary {a, b, c, EOS}, horizon 3, the fixed random policy of a tiny
    Llama and the reward R = #a − ½·#c.

    The exact value of every state follows from the seed's recursion V(s_t) = Σ_a P(a|s_t)·V(s_{t+1}) with
    V(terminal) = R, so a critic can be checked against it, and per-sample policy gradients can be computed for any
    baseline to compare their means (bias) and variances.
    """

    horizon = 3
    prompt = "ab"

    def __init__(self, seed: int = 0):
        self.tokenizer = build_tiny_tokenizer(characters="abc")
        self.policy = build_tiny_causal_lm(self.tokenizer, seed=seed)
        with torch.no_grad():
            self.policy.lm_head.weight.mul_(3)  # a policy far enough from uniform that states differ in value
        tok = self.tokenizer
        self.suppressed = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id]  # actions are a, b, c and EOS
        self.prompt_ids = tok(self.prompt)["input_ids"]

    @staticmethod
    def reward(completions, **kwargs) -> list[float]:
        return [text.count("a") - 0.5 * text.count("c") for text in completions]

    def reward_of(self, completion: tuple[int, ...]) -> float:
        return self.reward([self.tokenizer.decode(list(completion), skip_special_tokens=True)])[0]

    def _logits(self, completions: list[tuple[int, ...]]) -> torch.Tensor:
        """π's logits at every state of each completion, unavailable actions masked: (num, horizon, vocab)."""
        padding = self.tokenizer.pad_token_id  # after the end: causal attention keeps it out of the earlier logits
        ids = [self.prompt_ids + list(c) + [padding] * (self.horizon - len(c)) for c in completions]
        positions = slice(len(self.prompt_ids) - 1, len(self.prompt_ids) - 1 + self.horizon)
        logits = self.policy(torch.tensor(ids)).logits[:, positions]
        return logits.index_fill(-1, torch.tensor(self.suppressed), -torch.inf)

    def next_token_probs(self, completion: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            return self._logits([completion])[0, len(completion)].softmax(-1)

    def is_terminal(self, completion: tuple[int, ...]) -> bool:
        return len(completion) == self.horizon or (bool(completion) and completion[-1] == self.tokenizer.eos_token_id)

    def exact_values(self) -> dict[tuple[int, ...], float]:
        """V(s) for every non-terminal state s (a completion prefix), by the seed's recursion."""
        values = {}

        def value(completion):
            total = 0.0
            for action, prob in enumerate(self.next_token_probs(completion).tolist()):
                if prob > 0.0:
                    successor = completion + (action,)
                    total += prob * (self.reward_of(successor) if self.is_terminal(successor) else value(successor))
            values[completion] = total
            return total

        value(())
        return values

    def sample(self, num_samples: int, seed: int = 0) -> list[tuple[int, ...]]:
        """Completions drawn from π (ending at EOS or at the horizon)."""
        generator = torch.Generator().manual_seed(seed)
        completions = []
        for _ in range(num_samples):
            completion = ()
            while not self.is_terminal(completion):
                action = torch.multinomial(self.next_token_probs(completion), 1, generator=generator).item()
                completion += (action,)
            completions.append(completion)
        return completions

    def score_vectors(self, completions: list[tuple[int, ...]]) -> torch.Tensor:
        """∇ log π(a_t|s_t) w.r.t. the policy's output layer, per sample and token: (num, horizon, params), 0 after
        the end. A baseline's per-sample gradient is then Σ_t A_t · score_t."""
        weight = self.policy.lm_head.weight
        logprobs = self._logits(completions).log_softmax(-1)  # (num, horizon, vocab)
        scores = torch.zeros(len(completions), self.horizon, weight.numel())
        for i, completion in enumerate(completions):
            for t, action in enumerate(completion):
                (gradient,) = torch.autograd.grad(logprobs[i, t, action], weight, retain_graph=True)
                scores[i, t] = gradient.flatten()
        return scores

    def token_tensors(self, completions: list[tuple[int, ...]], values: dict[tuple[int, ...], float] | None = None):
        """(returns G_t, mask, values V(s_t)) of the completions as (num, horizon) tensors; values from a state->V map
        (zeros without one)."""
        returns, mask, state_values = (torch.zeros(len(completions), self.horizon) for _ in range(3))
        for i, completion in enumerate(completions):
            mask[i, : len(completion)] = 1.0
            returns[i, : len(completion)] = self.reward_of(completion)
            if values is not None:
                state_values[i, : len(completion)] = torch.tensor(
                    [values[completion[:t]] for t in range(len(completion))]
                )
        return returns, mask, state_values

    def critic_values(self, value_model) -> dict[tuple[int, ...], float]:
        """A critic's V for every non-terminal state: its output at the state's last token."""
        states = list(self.exact_values())
        with torch.no_grad():
            values = [value_model(torch.tensor([self.prompt_ids + list(state)]))[0, -1].item() for state in states]
        return dict(zip(states, values))


def per_sample_gradients(scores: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Σ_t A_t · ∇log π(a_t|s_t) per sample, from `EnumerableToy.score_vectors` (num, horizon, params) and the
    advantages (num, horizon): the seed's loss gradient, sample by sample (num, params), sign aside."""
    return torch.einsum("nt,ntp->np", advantages, scores)


def bias_statistic(gradients: torch.Tensor, reference: torch.Tensor, group_size: int = 1) -> float:
    """How far the mean gradients of two estimators on the same samples differ, in units of Monte-Carlo error:
    ‖mean of the differences‖² over its expected size when both have the same mean, tr Cov / n; about 1 without
    bias. Differences are summed per group first, since a leave-one-out baseline ties a group's samples together."""
    differences = (gradients - reference).view(-1, group_size, gradients.size(1)).sum(dim=1)  # independent groups
    return (differences.mean(0).square().sum() / (differences.var(0).sum() / len(differences))).item()
