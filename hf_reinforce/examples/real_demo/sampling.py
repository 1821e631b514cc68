"""Answers sampled as the REINFORCE recipe samples them, with the log-probability of each under the sampling model."""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hf_reinforce.examples.real_demo.arguments import QUICK_MAX_COMPLETION_LENGTH
from hf_reinforce.examples.real_demo.data import REINFORCE_RECIPE
from hf_reinforce.examples.real_demo.training import recipe_args
from hf_reinforce.scripts import reinforce as reinforce_script
from hf_reinforce.speedups.sampling import InverseCdfSampler


# Answers generated together: on 2 CPU cores a batch of 128 costs about a fifth less per answer than one of 64.
SAMPLING_BATCH_SIZE = 128


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled, everywhere in the demo: as the REINFORCE recipe samples them."""

    temperature: float
    max_new_tokens: int

    @classmethod
    def of_recipe(cls, quick: bool) -> "Sampling":
        training_args = recipe_args(reinforce_script, REINFORCE_RECIPE, [])[1]
        max_new_tokens = QUICK_MAX_COMPLETION_LENGTH if quick else training_args.max_completion_length
        return cls(temperature=training_args.temperature, max_new_tokens=max_new_tokens)


@torch.no_grad()
def sample_answers(
    model,
    tokenizer,
    prompts: list[list[dict]],
    num_per_prompt: int,
    sampling: Sampling,
    seed: int,
    desc: str,
    batch_size: int = SAMPLING_BATCH_SIZE,
) -> list[list[dict]]:
    """`num_per_prompt` answers per chat prompt, sampled as REINFORCE samples them: per prompt a list of {"text",
    "ids" (the completion's tokens, with its end-of-turn when it finished), "finished", "logp" (log p of those tokens
    under `model` at the sampling temperature: of the distribution they were drawn from)}."""
    torch.manual_seed(seed)
    model.eval()
    eos = tokenizer.eos_token_id
    rows = [prompt for prompt in prompts for _ in range(num_per_prompt)]
    answers = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in rows[start : start + batch_size]
        ]
        # The chat template writes its own special tokens, as the trainers tokenize it
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        sampler = InverseCdfSampler(sampling.temperature, record_logps=True, logps_temperature=sampling.temperature)
        output = model.generate(
            **inputs.to(model.device),
            # Temperature sampling with the draw made by the processor, greedy search keeping it: ten times cheaper
            # than `do_sample=True`'s torch.multinomial on a CPU
            do_sample=False,
            logits_processor=[sampler],
            temperature=None,
            top_k=None,
            top_p=None,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        token_logps = torch.stack(sampler.token_logps, dim=1).tolist()  # (rows, generated)
        for row, logps in zip(output[:, inputs["input_ids"].size(1) :].tolist(), token_logps, strict=True):
            # pad = EOS here: the completion ends at its first EOS, which is kept as the end of its turn
            finished = eos in row
            ids = row[: row.index(eos) + 1] if finished else row
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            answers.append({"text": text, "ids": ids, "finished": finished, "logp": math.fsum(logps[: len(ids)])})
    return [answers[i : i + num_per_prompt] for i in range(0, len(answers), num_per_prompt)]
