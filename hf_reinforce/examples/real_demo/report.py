"""The summary over seeds: summary.json, training_curves.png and the table printed at the end."""

import dataclasses
import json
import statistics
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only: the demo runs on machines without a display

import matplotlib.pyplot as plt  # noqa: E402

from hf_reinforce.examples.demo import logged, save_figure  # noqa: E402
from hf_reinforce.examples.real_demo.arguments import RealDemoArguments, arm_name  # noqa: E402
from hf_reinforce.examples.real_demo.evaluation import CRITIC_METRICS  # noqa: E402


PLOT_FILE, SUMMARY_FILE = "training_curves.png", "summary.json"


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
    *(f"critic_{name}" for name in CRITIC_METRICS),
    "critic_explained_variance_pooled",
    "critic_explained_variance_finished_pooled",
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
    save_figure(figure, path)


def print_table(summary: dict) -> None:
    rows = [("seed", *(str(run["seed"]) for run in summary["runs"]))]
    for key in SUMMARY_KEYS:
        rows.append((key, *("-" if run[key] is None else f"{run[key]:.3f}" for run in summary["runs"])))
    rows.append(("minutes", *(f"{sum(run['seconds_per_stage'].values()) / 60:.1f}" for run in summary["runs"])))
    width = max(len(row[0]) for row in rows)
    print("\n".join(f"{row[0]:<{width}}  " + "  ".join(f"{cell:>8}" for cell in row[1:]) for row in rows))


def write_summary(runs: list[dict], model_name: str, args: RealDemoArguments) -> dict:
    """summary.json and the plot over the seeds finished so far."""
    summary = {
        **{key: over_seeds(runs, key) for key in SUMMARY_KEYS},
        "runs": [{key: value for key, value in run.items() if key != "logs"} for run in runs],
        "gold_reward": "VADER compound sentiment score of the answer, in [-1, 1] (vaderSentiment)",
        "reward_model": "Bradley-Terry with soft labels, QLoRA (recipes/smollm2-135m/reward/config_qlora.yaml)",
        "arm": arm_name(args),
        "policy": f"REINFORCE, arm {arm_name(args)}, QLoRA (recipes/smollm2-135m/reinforce/config_qlora.yaml)",
        "model": model_name,
        "arguments": dataclasses.asdict(args),
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, output_dir / PLOT_FILE)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
