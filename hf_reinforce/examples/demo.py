"""The offline end-to-end demo: the whole method on CPU in a minute or two, from a blank tiny language model to a
policy that pleases a hidden gold preference it never sees directly.

  1. pretrain a tiny character-level LM on synthetic sentences, so that its samples look like text;
  2. sample pairs of its completions and let a Bradley-Terry annotator with a hidden gold reward (the number of
     letters `a`) state which one it prefers;
  3. train a Bradley-Terry reward model on those pairs with QLoRA and measure its held-out accuracy;
  4. fine-tune the LM with REINFORCE against the learned reward, with a value-head critic as baseline (QLoRA, the
     critic a second adapter on the same 4-bit base);
  5. compare the gold reward of its samples on held-out prompts before and after, plot the training curves and
     write everything to `--output_dir` (summary.json, training_curves.png, the models).

example:
  hf-reinforce demo --output_dir outputs/demo
"""

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only: the demo runs on machines without a display

import datasets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    BitsAndBytesConfig,
    ProgressCallback,
    set_seed,
)
from trl import TrlParser  # noqa: E402

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer  # noqa: E402
from hf_reinforce.examples.tiny import build_tiny_causal_lm, build_tiny_tokenizer, gold_reward  # noqa: E402
from hf_reinforce.reward_models import RewardModelScorer, load_reward_adapter  # noqa: E402
from hf_reinforce.scripts import HelpFormatter  # noqa: E402


# The synthetic language: sentences of 4 to 8 words from this list, ending with a period. Words differ in how many
# letters `a` they hold (0 to 3), so a policy can raise the gold reward while still writing words.
WORDS = (
    "the a cat sat on mat dog ran to park banana is big red sun tree fish swim in sea bird sings song we eat bread "
    "and jam my old hat blue sky salad tasty papaya data man can nap van fan hot cold soup milk go home see you it "
    "was very good day"
).split()
MAX_COMPLETION_LENGTH = 24  # characters (= tokens): about four words
QUANTIZATION = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
# What both trainers are given to run here: on the CPU, without checkpoints or trackers, with progress bars.
CPU_RUN = {
    "bf16": False,
    "use_cpu": True,
    "activation_checkpointing": False,
    "disable_tqdm": False,  # quieted library logging would switch the bars off
    "save_strategy": "no",
    "report_to": "none",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STAGES = ("pretrain", "preferences", "reward model", "reinforce", "evaluate")
PLOT_FILE, SUMMARY_FILE = "training_curves.png", "summary.json"


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Folder for the models, plots and summary."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage; the same seed gives the same run."})
    quick: bool = field(
        default=False,
        metadata={"help": "Shrink every stage to a smoke run of well under a minute (its numbers mean nothing)."},
    )
    pretrain_steps: int = field(default=300, metadata={"help": "Steps of language-model pretraining."})
    num_train_pairs: int = field(default=1024, metadata={"help": "Preference pairs to train the reward model on."})
    num_held_out_pairs: int = field(default=256, metadata={"help": "Held-out pairs for its accuracy."})
    reward_steps: int = field(default=150, metadata={"help": "Reward-model training steps."})
    reinforce_steps: int = field(default=200, metadata={"help": "REINFORCE steps (one batch of rollouts each)."})
    reinforce_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the policy's LoRA."})
    beta: float = field(default=0.1, metadata={"help": "KL penalty to the pretrained LM in the return."})
    num_eval_prompts: int = field(default=32, metadata={"help": "Held-out prompts of the gold evaluation."})
    samples_per_eval_prompt: int = field(default=8, metadata={"help": "Completions sampled per held-out prompt."})


# Used by --quick: enough of each stage to run every code path once.
QUICK_SIZES = {
    "pretrain_steps": 20,
    "num_train_pairs": 32,
    "num_held_out_pairs": 16,
    "reward_steps": 4,
    "reinforce_steps": 3,
    "num_eval_prompts": 4,
    "samples_per_eval_prompt": 2,
}


class ProgressBarWithMetrics(ProgressCallback):
    """The trainers' progress bar, showing a few logged metrics on the bar instead of printing every log."""

    def __init__(self, metrics: dict[str, str]):
        super().__init__()
        self.metrics = metrics  # name on the bar -> logged key

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None:
            shown = {name: f"{logs[key]:.3g}" for name, key in self.metrics.items() if key in logs}
            self.training_bar.set_postfix(shown, refresh=False)


def with_metrics_on_progress_bar(trainer, metrics: dict[str, str]):
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarWithMetrics(metrics))
    return trainer


def synthetic_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + "."


def split_prompts(num_held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Every prompt (the first two words of a sentence and a space), shuffled and split: held-out prompts are never
    trained on, neither by the reward model nor by REINFORCE."""
    prompts = [f"{first} {second} " for first in WORDS for second in WORDS]
    random.Random(seed).shuffle(prompts)
    return prompts[num_held_out:], prompts[:num_held_out]


def pretrain_language_model(
    tokenizer, num_steps: int, seed: int, batch_size: int = 32
) -> tuple[torch.nn.Module, list]:
    """Next-character prediction on synthetic sentences; returns the model and its loss curve."""
    set_seed(seed)
    model = build_tiny_causal_lm(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    losses = []
    for _ in tqdm(range(num_steps), desc="pretraining the base LM", leave=False):
        texts = [synthetic_sentence(rng) + tokenizer.eos_token for _ in range(batch_size)]
        batch = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], num_per_prompt: int, seed: int) -> list[list[str]]:
    """`num_per_prompt` completions of each prompt, sampled at temperature 1 as REINFORCE samples them."""
    torch.manual_seed(seed)
    model.eval()
    completions = []
    for start in range(0, len(prompts), 64):
        chunk = [prompt for prompt in prompts[start : start + 64] for _ in range(num_per_prompt)]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=MAX_COMPLETION_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
        completions += [texts[i : i + num_per_prompt] for i in range(0, len(texts), num_per_prompt)]
    return completions


def mean_gold_reward(completions: list[list[str]]) -> float:
    rewards = [gold_reward(text) for group in completions for text in group]
    return sum(rewards) / len(rewards)


def label_pairs(prompts: list[str], completion_pairs: list[list[str]]) -> Dataset:
    """Preference pairs as a Bradley-Terry annotator with the gold reward states them.

    The annotator prefers `chosen` with probability σ(gold(chosen) − gold(rejected)); that probability is kept as the
    soft label `chosen_prob`. Pairs the gold reward cannot tell apart carry no preference and are dropped.
    """
    rows = []
    for prompt, (first, second) in zip(prompts, completion_pairs):
        gap = gold_reward(first) - gold_reward(second)
        if gap == 0 or not (first.strip() and second.strip()):  # the reward trainer rejects empty answers
            continue
        chosen, rejected = (first, second) if gap > 0 else (second, first)
        rows.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_prob": 1 / (1 + math.exp(-abs(gap)))}
        )
    return Dataset.from_list(rows)


def train_reward_model(args: DemoArguments, base_model: str, pairs: Dataset, output_dir: Path) -> RewardTrainer:
    config = RewardConfig(
        output_dir=str(output_dir),
        max_steps=args.reward_steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=max(args.reward_steps // 30, 1),
        seed=args.seed,
        **CPU_RUN,
    )
    trainer = RewardTrainer(
        model=base_model,
        args=config,
        train_dataset=pairs,
        quantization_config=QUANTIZATION,
        peft_config=LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=LORA_TARGETS),
    )
    with_metrics_on_progress_bar(trainer, {"loss": "loss", "accuracy": "accuracy"}).train()
    trainer.save_model(str(output_dir))
    trainer.create_model_card(model_name="demo-reward-model")
    return trainer


def reward_model_accuracy(adapter_dir: Path, pairs: Dataset) -> float:
    """How often the saved reward model ranks a held-out pair as the gold reward does, scored exactly as
    `ReinforceTrainer` will score completions: the adapter back on its 4-bit base, each answer followed by EOS."""
    model, tokenizer = load_reward_adapter(adapter_dir)
    scorer = RewardModelScorer(model, tokenizer, [tokenizer.eos_token_id], name="reward_model")
    finished = [[tokenizer.eos_token_id]] * len(pairs)  # the pairs are finished answers
    chosen = scorer(prompts=pairs["prompt"], completions=pairs["chosen"], completion_ids=finished)
    rejected = scorer(prompts=pairs["prompt"], completions=pairs["rejected"], completion_ids=finished)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def gold(completions: list[str], **kwargs) -> list[float]:
    """The hidden gold reward, logged next to the learned one (with weight 0: REINFORCE never optimises it)."""
    return [gold_reward(text) for text in completions]


def build_reinforce_trainer(args: DemoArguments, base_model: str, reward_model: Path, prompts: list[str], output_dir):
    config = ReinforceConfig(
        output_dir=str(output_dir),
        baseline="critic",  # default critic settings: an adapter on the same 4-bit base, from the reward adapter
        # The reward model learned on finished sentences; one cut off at 24 characters has no score it was trained
        # to give, so it teaches nothing (TRL's option; `missing_eos_penalty` would be the other way)
        mask_truncated_completions=True,
        learning_rate=args.reinforce_learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        num_generations=4,
        per_device_train_batch_size=32,  # completions per step: 8 prompts, 4 samples each
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=1.0,
        reward_weights=[1.0, 0.0],
        max_steps=args.reinforce_steps,
        logging_steps=max(args.reinforce_steps // 30, 1),
        seed=args.seed,
        **CPU_RUN,
    )
    trainer = ReinforceTrainer(
        model=base_model,
        # The saved reward adapter goes back onto its 4-bit base; the critic starts from it
        reward_funcs=[str(reward_model), gold],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        quantization_config=QUANTIZATION,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS),
    )
    metrics = {"reward": "reward", "gold": "rewards/gold/mean", "kl": "kl", "EV": "critic/explained_variance"}
    return with_metrics_on_progress_bar(trainer, metrics)


def logged(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    entries = [entry for entry in log_history if entry.get(key) is not None]  # a metric may log None
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]


def tail_mean(values: list[float], fraction: float = 0.2) -> float:
    """Mean over the last `fraction` of a logged curve: one logging step of a noisy metric says little."""
    tail = values[-max(1, round(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def plot_curves(pretrain_losses: list[float], reward_log: list[dict], reinforce_log: list[dict], path: Path) -> None:
    panels = [
        (
            "base LM pretraining",
            "next-character loss",
            [("loss", range(1, len(pretrain_losses) + 1), pretrain_losses)],
        ),
        ("reward model", "accuracy on training batches", [("accuracy", *logged(reward_log, "accuracy"))]),
        (
            "REINFORCE: reward",
            "mean per completion",
            [
                ("learned reward", *logged(reinforce_log, "reward")),
                ("gold reward", *logged(reinforce_log, "rewards/gold/mean")),
            ],
        ),
        ("REINFORCE: critic value loss", "MSE", [("value loss", *logged(reinforce_log, "critic/value_loss"))]),
        ("REINFORCE: critic", "explained variance", [("EV", *logged(reinforce_log, "critic/explained_variance"))]),
        ("REINFORCE: KL to the base LM", "per token", [("KL", *logged(reinforce_log, "kl"))]),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, (title, ylabel, curves) in zip(axes.flat, panels):
        for label, steps, values in curves:
            axis.plot(list(steps), values, label=label)
        axis.set(title=title, xlabel="step", ylabel=ylabel)
        if len(curves) > 1:
            axis.legend()
    save_figure(figure, path)


def save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_table(summary: dict) -> None:
    rows = [
        ("gold reward before REINFORCE", f"{summary['gold_reward_before']:.3f}"),
        ("gold reward after REINFORCE", f"{summary['gold_reward_after']:.3f}"),
        ("reward model held-out accuracy", f"{summary['reward_model_accuracy']:.3f}"),
        ("critic explained variance", f"{summary['critic_explained_variance']:.3f}"),
        ("wall time", f"{sum(summary['seconds_per_stage'].values()):.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows))


class Stages:
    """A progress bar over a run's stages that also times each of them."""

    def __init__(self, names: tuple[str, ...] = STAGES, desc: str = "demo"):
        self.progress = tqdm(total=len(names), desc=desc)
        self.seconds = {}

    @contextlib.contextmanager
    def stage(self, name: str, description: str):
        self.progress.set_postfix_str(description)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.progress.update()


def run(args: DemoArguments) -> dict:
    if args.quick:
        args = dataclasses.replace(args, **QUICK_SIZES)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base_model = str(output_dir / "base_model")
    tokenizer = build_tiny_tokenizer()
    train_prompts, held_out_prompts = split_prompts(max(args.num_eval_prompts, args.num_held_out_pairs), args.seed)
    eval_prompts = held_out_prompts[: args.num_eval_prompts]
    stages = Stages()

    with stages.stage("pretrain", "pretraining the base language model"):
        language_model, pretrain_losses = pretrain_language_model(tokenizer, args.pretrain_steps, args.seed)
        language_model.save_pretrained(base_model)
        tokenizer.save_pretrained(base_model)

    with stages.stage("preferences", "sampling and labelling preference pairs"):
        train_pairs, held_out_pairs = make_pairs(language_model, tokenizer, train_prompts, held_out_prompts, args)

    with stages.stage("reward model", "training the reward model (QLoRA)"):
        reward_trainer = train_reward_model(args, base_model, train_pairs, output_dir / "reward_model")
        accuracy = reward_model_accuracy(output_dir / "reward_model", held_out_pairs)

    with stages.stage("reinforce", "REINFORCE with a critic (QLoRA)"):
        trainer = build_reinforce_trainer(
            args, base_model, output_dir / "reward_model", train_prompts, output_dir / "policy"
        )
        # The policy's LoRA adapter starts at zero: this samples the 4-bit base that REINFORCE starts from
        before = sample_completions(trainer.model, tokenizer, eval_prompts, args.samples_per_eval_prompt, args.seed)
        trainer.train()
        trainer.save_model()
        trainer.create_model_card(model_name="demo-policy")

    with stages.stage("evaluate", "evaluating against the gold reward"):
        after = sample_completions(trainer.model, tokenizer, eval_prompts, args.samples_per_eval_prompt, args.seed)
        plot_curves(
            pretrain_losses, reward_trainer.state.log_history, trainer.state.log_history, output_dir / PLOT_FILE
        )
    stages.progress.close()

    summary = {
        "gold_reward_before": mean_gold_reward(before),
        "gold_reward_after": mean_gold_reward(after),
        "reward_model_accuracy": accuracy,
        "critic_explained_variance": tail_mean(logged(trainer.state.log_history, "critic/explained_variance")[1]),
        "seconds_per_stage": stages.seconds,
        **describe_run(before, after, train_pairs, held_out_pairs, args),
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_pairs(language_model, tokenizer, train_prompts, held_out_prompts, args: DemoArguments):
    """Labelled pairs of the pretrained LM's completions: to train the reward model on, and held out."""
    pair_prompts = random.Random(args.seed).choices(train_prompts, k=args.num_train_pairs)
    completions = sample_completions(language_model, tokenizer, pair_prompts, 2, args.seed)
    train_pairs = label_pairs(pair_prompts, completions)
    pair_prompts = held_out_prompts[: args.num_held_out_pairs]
    completions = sample_completions(language_model, tokenizer, pair_prompts, 2, args.seed + 1)
    return train_pairs, label_pairs(pair_prompts, completions)


def describe_run(before, after, train_pairs, held_out_pairs, args: DemoArguments) -> dict:
    """The summary's samples, pair counts and descriptions of the run."""
    return {
        "samples_before": [group[0] for group in before[:8]],
        "samples_after": [group[0] for group in after[:8]],
        "num_train_pairs_labelled": len(train_pairs),
        "num_held_out_pairs_labelled": len(held_out_pairs),
        "gold_reward": "number of letters `a` in the completion",
        "reward_model": "Bradley-Terry, QLoRA (4-bit NF4 base, LoRA r=16 on all linear layers, score head saved)",
        "policy": "REINFORCE, QLoRA (4-bit NF4 base, LoRA r=16); the critic is a second LoRA adapter with a value "
        "head on the same base (critic_shares_base=True)",
        "arguments": dataclasses.asdict(args),
    }


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((DemoArguments,), prog=prog, description=__doc__, formatter_class=HelpFormatter)


@contextlib.contextmanager
def demo_process_settings():
    """Quiet libraries and one CPU thread for the demo's duration; the process is left as it was found.

    Loading a causal LM as a reward model reports its new score head, dataset maps and model loads show bars of their
    own, and TRL warns about deprecations it uses itself: all expected here, and they would bury the demo's own bars
    and table. Tiny models gain nothing from a second intra-op thread, and on a busy machine threads that wait for
    a shared core slow every step down many times.
    """
    verbosity, num_threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    bars = {
        "transformers": transformers.logging.is_progress_bar_enabled(),
        "datasets": datasets.is_progress_bar_enabled(),
    }
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars["transformers"]:
            transformers.logging.enable_progress_bar()
        if bars["datasets"]:
            datasets.enable_progress_bars()
        torch.set_num_threads(num_threads)


def main() -> None:
    # Called by `hf-reinforce demo`, which leaves the demo's flags in sys.argv
    (args,) = make_parser().parse_args_and_config()
    with demo_process_settings():
        summary = run(args)
    print_table(summary)
    print(f"Plots: {Path(args.output_dir) / PLOT_FILE}; summary: {Path(args.output_dir) / SUMMARY_FILE}")


if __name__ == "__main__":
    main()
