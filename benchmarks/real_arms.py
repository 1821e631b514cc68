"""The named arms on the real-model task (`hf-reinforce real-demo`), on seeds no setting was chosen on.

    python benchmarks/real_arms.py --seeds 10 11 12 --arms critic critic-w0 critic-head otb rloo --jobs 2
    python benchmarks/real_arms.py --seeds 10 11 12 --report            # the table of the runs already made

Per seed, the datasets and the reward model are made once (the preferences and reward-model stages of `real-demo`,
in `<output_dir>/base/seed_<N>`); every arm then runs the REINFORCE stage and the evaluation on them
(`real-demo --reward_from`, one thread, in `<output_dir>/arms/<arm>/seed_<N>`), so that the arms differ in
REINFORCE alone. Arms are those of `hf_reinforce.examples.arms`, plus variants of them (`STUDY_ARMS`): `critic-pre`,
`critic` with its value pretrained on the answers of the reward model's preference pairs (`--value_pretraining`), and
`critic-pre-lr1e-4`, the same at a tenth of the critic's learning rate; `critic-head-e4`, `critic-head` fitting each
batch in 4 epochs; and `critic-1-w0`, `critic-1`'s isolated ablation (its weight w held at 0: the baseline is the rest
of the batch's mean return). A run whose `summary.json` exists is not run again (delete its folder to rerun it). The
report: per arm and seed, the held-out gold gain, held-out KL per answer, answers repeating a word, and the critic's
out-of-sample explained variance (raw, recentred, per third of the answer, pooled over all answers and over the
finished ones) and weight over the last 20 % of logged steps; per arm, the mean over seeds and the paired differences
to its isolated ablation (`critic-w0`, or `critic-1-w0` for `critic-1`) and to `rloo` (four completions per prompt, the
reference of `critic-1`) with their standard errors.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


PRE_ARM = "critic-pre"
# Variants of the named arms: real-demo flags
STUDY_ARMS = {
    PRE_ARM: ["--arm", "critic", "--value_pretraining", "true"],
    "critic-head-e4": ["--arm", "critic-head", "--reinforce_settings", "critic_epochs=4"],
    "critic-1-w0": ["--arm", "critic-1", "--reinforce_settings", "critic_weight=0.0"],
    "critic-pre-lr1e-4": ["--arm", "critic", "--value_pretraining", "true"]
    + ["--reinforce_settings", "critic_learning_rate=1e-4"],
}
ABLATION = "critic-w0"
ABLATIONS = {"critic-1": "critic-1-w0"}  # an arm's isolated ablation, where it is not critic-w0
RLOO_ARM = "rloo"  # four completions per prompt, the reference of `critic-1`
COLUMNS = (
    ("gold_gain", "gain"),
    ("kl_per_answer_held_out", "KL/answer"),
    ("repetitive_after", "repeats"),
    ("critic_explained_variance_pooled", "EV pooled"),
    ("critic_explained_variance_finished_pooled", "EV pooled, finished"),
    ("critic_recentred_explained_variance", "EV recentred"),
    ("critic_explained_variance_first", "EV 1st third"),
    ("critic_explained_variance_middle", "EV 2nd third"),
    ("critic_explained_variance_last", "EV 3rd third"),
    ("critic_weight", "w"),
)


def prepare_seed(seed: int, base_dir: Path, threads: int) -> None:
    """The seed's datasets and reward model, as `real-demo` makes them, without its REINFORCE stage."""
    if (base_dir / "prep.json").exists():
        return
    code = (
        "import json, sys, torch; from pathlib import Path; from transformers import AutoTokenizer, set_seed; "
        "from hf_reinforce.examples.demo import Stages, demo_process_settings; "
        "from hf_reinforce.examples.real_demo.arguments import RealDemoArguments; "
        "from hf_reinforce.examples.real_demo.cli import data_and_reward_model, prepare_model; "
        "from hf_reinforce.examples.real_demo.preferences import make_data; "
        "from hf_reinforce.examples.real_demo.sampling import Sampling; "
        f"torch.set_num_threads({threads}); seed, out = {seed}, Path({str(base_dir)!r}); "
        "args = RealDemoArguments(output_dir=str(out), seeds=[seed]); model = prepare_model(args)\n"
        "with demo_process_settings():\n"
        "    set_seed(seed); out.mkdir(parents=True, exist_ok=True)\n"
        "    stages = Stages(('preferences', 'reward model'), desc=f'seed {seed}')\n"
        "    with stages.stage('preferences', 'pairs'):\n"
        "        make_data(model, AutoTokenizer.from_pretrained(model), out, args, seed, Sampling.of_recipe(False))\n"
        "    _, quality, log = data_and_reward_model(model, out, args, seed, stages)\n"
        "    (out / 'training_logs.json').write_text(json.dumps({'reward': log}))\n"
        "    (out / 'prep.json').write_text(json.dumps({'quality': quality, 'seconds': stages.seconds}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def run_arm(arm: str, seed: int, output_dir: Path) -> None:
    run_dir = output_dir / "arms" / arm / f"seed_{seed}"
    if (run_dir / "summary.json").exists():
        return
    flags = STUDY_ARMS.get(arm, ["--arm", arm])
    command = ["hf-reinforce", "real-demo", "--seeds", str(seed), *flags, "--num_threads", "1"]
    command += ["--reward_from", str(output_dir / "base" / f"seed_{seed}"), "--output_dir", str(run_dir)]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def results(output_dir: Path, arms: list[str], seeds: list[int]) -> dict:
    """{arm: {seed: the run's results}} of the runs that finished."""
    found = {}
    for arm in arms:
        for seed in seeds:
            path = output_dir / "arms" / arm / f"seed_{seed}" / "summary.json"
            if path.exists():
                found.setdefault(arm, {})[seed] = json.loads(path.read_text())["runs"][0]
    return found


def cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def paired(found: dict, arm: str, reference: str, key: str = "gold_gain") -> str:
    """Mean over the seeds both ran of this arm's value minus the reference arm's, ± its standard error, and the
    ratio of their means over those seeds."""
    seeds = sorted(set(found.get(arm, {})) & set(found.get(reference, {})))
    if arm == reference or not seeds:
        return "-"
    differences = [found[arm][s][key] - found[reference][s][key] for s in seeds]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    arm_mean, reference_mean = (statistics.fmean(found[name][s][key] for s in seeds) for name in (arm, reference))
    return f"{statistics.fmean(differences):+.3f} ± {error:.3f} ({arm_mean / reference_mean:.2f}x; {len(seeds)} seeds)"


def report(found: dict) -> str:
    header = ["arm", "seed", *(name for _, name in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, runs in found.items():
        for seed, run in sorted(runs.items()):
            lines.append(f"| {arm} | {seed} | " + " | ".join(cell(run.get(key)) for key, _ in COLUMNS) + " |")
        if len(runs) > 1:
            means = [[run.get(key) for run in runs.values() if run.get(key) is not None] for key, _ in COLUMNS]
            row = " | ".join(cell(statistics.fmean(v)) if v else "-" for v in means)
            lines.append(f"| **{arm}** | mean | {row} |")
    lines += [
        "",
        "Gold gain minus the reference arm's: mean ± s.e. over the seeds both ran (ratio of their means).",
        "",
    ]
    lines += [f"| arm | minus its isolated ablation's | minus {RLOO_ARM}'s |", "|---|---|---|"]
    for arm in found:
        ablation = ABLATIONS.get(arm, ABLATION)
        lines.append(f"| {arm} | {ablation}: {paired(found, arm, ablation)} | {paired(found, arm, RLOO_ARM)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument(
        "--arms", nargs="+", default=["critic", ABLATION, "critic-head", PRE_ARM, "otb", "rloo", "critic-1"]
    )
    parser.add_argument("--output_dir", default="outputs/real-arms")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--report", action="store_true", help="only the table of the runs already made")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    if not args.report:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda s: prepare_seed(s, output_dir / "base" / f"seed_{s}", 1), args.seeds))
            jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
            list(pool.map(lambda job: run_arm(*job, output_dir), jobs))
    print(report(results(output_dir, args.arms, args.seeds)))


if __name__ == "__main__":
    main()
