"""What a seed's run achieved: the reward model against the gold on held-out pairs, and the policy's gold reward and
KL to its base on held-out items, before and after REINFORCE."""

import json
import math
import statistics
from pathlib import Path

import torch

from hf_reinforce.advantages import POSITIONS
from hf_reinforce.examples.demo import logged, tail_mean
from hf_reinforce.examples.real_demo.data import REWARD_DIR, read_jsonl
from hf_reinforce.examples.real_demo.judge import gold_score, repeats_a_word
from hf_reinforce.reward_models import RewardModelScorer, load_reward_adapter
from hf_reinforce.speedups.dequantized import dequantize_for_inference


def reward_model_quality(adapter_dir: Path, pairs: list[dict]) -> dict:
    """On held-out pairs, scored exactly as `ReinforceTrainer` scores finished answers (the adapter back on its 4-bit
    base, the conversation rendered by the chat template): the share ranked as the gold ranks them, and the Pearson
    correlation of its scores with the gold over the distinct answers."""
    model, tokenizer = load_reward_adapter(adapter_dir)
    dequantize_for_inference(model)  # as the REINFORCE recipe scores answers: the same scores, sooner
    scorer = RewardModelScorer(model, tokenizer, [tokenizer.eos_token_id], name="reward_model", batch_size=32)
    # Each answer sits in several pairs: every distinct one is scored once
    answers = {}  # conversation as JSON -> (prompt, answer, gold)
    for pair in pairs:
        for side in ("chosen", "rejected"):
            answers[json.dumps(pair["prompt"] + pair[side])] = (pair["prompt"], pair[side], pair[f"gold_{side}"])
    prompts, completions, golden = zip(*answers.values())
    finished = [[tokenizer.eos_token_id]] * len(answers)
    learned = scorer(prompts=list(prompts), completions=list(completions), completion_ids=finished)
    score = dict(zip(answers, learned, strict=True))
    chosen = [score[json.dumps(pair["prompt"] + pair["chosen"])] for pair in pairs]
    rejected = [score[json.dumps(pair["prompt"] + pair["rejected"])] for pair in pairs]
    return {
        "reward_model_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
        "reward_model_gold_correlation": statistics.correlation(learned, golden),
        "num_held_out_pairs": len(pairs),
    }


def held_out_quality(run_dir: Path) -> dict:
    """The reward model of `run_dir` against the gold on that run's held-out pairs."""
    return reward_model_quality(run_dir / REWARD_DIR, read_jsonl(run_dir / "preferences" / "test.jsonl"))


def answer_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor, temperature: float = 1.0
):
    """Per row, log p under `model` at `temperature` (softmax of the logits over it) of its answer tokens.
    `input_ids` and `attention_mask` (B, P+A) hold left-padded prompts followed by right-padded answers, `answer_mask`
    (B, A) marks the answer tokens; returns (B,)."""
    answer_length = answer_mask.size(1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+A): the padding shifts no position
    # Logits only where an answer token is predicted: over the prompts too, the LM head would cost as much again
    logits = (
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=answer_length + 1,
        )
        .logits[:, :-1]
        .float()
        / temperature
    )  # (B, A, V)
    answers = input_ids[:, -answer_length:, None]  # (B, A, 1)
    token_logps = logits.gather(-1, answers).squeeze(-1) - logits.logsumexp(-1)  # (B, A)
    return (token_logps * answer_mask).sum(-1)


@torch.no_grad()
def mean_kl(
    model, tokenizer, prompts: list[list[dict]], groups: list[list[dict]], temperature: float, batch_size: int = 32
) -> float:
    """KL(policy || base) per answer of the distribution that was sampled, estimated on its samples: the mean of
    sum_t log pi - log pi_ref over each answer's tokens, both at the sampling `temperature`. log pi is the one
    `sample_answers` kept while sampling; the reference is the same 4-bit base with the adapters switched off."""
    rows = []
    for prompt, group in zip(prompts, groups, strict=True):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        rows += [(prompt_ids, answer["ids"], answer["logp"]) for answer in group]
    differences = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompt_length = max(len(prompt) for prompt, _, _ in batch)
        answer_length = max(len(answer) for _, answer, _ in batch)
        input_ids = torch.full((len(batch), prompt_length + answer_length), tokenizer.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        answer_mask = torch.zeros(len(batch), answer_length, dtype=torch.long)
        for row, (prompt, answer, _) in enumerate(batch):
            tokens = slice(prompt_length - len(prompt), prompt_length + len(answer))
            input_ids[row, tokens] = torch.tensor(prompt + answer)
            attention_mask[row, tokens] = 1
            answer_mask[row, : len(answer)] = 1
        tensors = [t.to(model.device) for t in (input_ids, attention_mask, answer_mask)]
        with model.disable_adapter():
            reference = answer_logps(model, *tensors, temperature=temperature).tolist()
        differences += [policy - ref for (_, _, policy), ref in zip(batch, reference, strict=True)]
    return statistics.fmean(differences)


# Logged critic metrics, each reported over the last 20 % of logged steps under `critic_<name>`
CRITIC_METRICS = (
    "explained_variance",
    "recentred_explained_variance",
    *(
        f"{kind}_{position}"
        for kind in ("explained_variance", "recentred_explained_variance")
        for position in POSITIONS
    ),
    "explained_variance_finished",
    "weight",
)


def critic_diagnostics(log: list[dict]) -> dict:
    """What the critic knew over the last 20 % of logged steps (None without a critic): each of `CRITIC_METRICS`
    averaged over those steps, and the explained variance pooled over them, 1 − Σ Var(G − V) / Σ Var(G), over all
    answers and over the finished ones alone (no missing-EOS penalty in their returns)."""
    diagnostics = {}
    for name in CRITIC_METRICS:
        _, values = logged(log, f"critic/{name}")
        diagnostics[f"critic_{name}"] = tail_mean(values) if values else None
    for answers in ("", "_finished"):
        _, residual = logged(log, f"critic/residual_variance{answers}")
        _, returns = logged(log, f"critic/returns_variance{answers}")
        tail = max(1, round(len(returns) * 0.2))
        pooled = 1 - sum(residual[-tail:]) / sum(returns[-tail:]) if returns and sum(returns[-tail:]) > 0 else None
        diagnostics[f"critic_explained_variance{answers}_pooled"] = pooled
    return diagnostics


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def seed_results(
    seed: int,
    before: list,
    after: list,
    eval_prompts: list,
    log: list[dict],
    *,
    quality: dict,
    kl: float,
    num_train_pairs: int,
    seconds_per_stage: dict,
) -> dict:
    """A seed's results: the held-out gold reward and how many answers finished or repeat a word, before and after
    REINFORCE (`before`, `after`: the answers to `eval_prompts`), the tails of the training curves (`log`), a few
    samples, and what was measured elsewhere (the reward model's quality, the held-out KL, ...)."""
    answers_before = [answer for group in before for answer in group]
    answers_after = [answer for group in after for answer in group]
    gold_before, stderr_before = mean_and_stderr([gold_score(a["text"]) for a in answers_before])
    gold_after, stderr_after = mean_and_stderr([gold_score(a["text"]) for a in answers_after])
    _, train_kl = logged(log, "kl")
    return {
        "seed": seed,
        "gold_reward_before": gold_before,
        "gold_reward_after": gold_after,
        "gold_gain": gold_after - gold_before,
        "gold_reward_before_stderr": stderr_before,
        "gold_reward_after_stderr": stderr_after,
        **quality,
        "kl_per_answer_held_out": kl,
        "kl_per_token_training": tail_mean(train_kl) if train_kl else None,
        **critic_diagnostics(log),
        "finished_before": statistics.fmean(a["finished"] for a in answers_before),
        "finished_after": statistics.fmean(a["finished"] for a in answers_after),
        "repetitive_before": statistics.fmean(repeats_a_word(a["text"]) for a in answers_before),
        "repetitive_after": statistics.fmean(repeats_a_word(a["text"]) for a in answers_after),
        "num_train_pairs": num_train_pairs,
        "seconds_per_stage": seconds_per_stage,
        "samples": [
            {
                "prompt": prompt[-1]["content"],
                "before": b[0]["text"],
                "after": a[0]["text"],
                "gold_before": gold_score(b[0]["text"]),
                "gold_after": gold_score(a[0]["text"]),
            }
            for prompt, b, a in zip(eval_prompts[:8], before, after)
        ],
    }
