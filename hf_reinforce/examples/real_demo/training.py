"""The real demo's two trainers, set up from the SmolLM2 recipes (shipped in the package) with its flags over them."""

import json
from pathlib import Path

from datasets import Dataset
from trl import get_peft_config, get_quantization_config

from hf_reinforce import ReinforceTrainer, RewardTrainer
from hf_reinforce.examples.arms import arm_flags
from hf_reinforce.examples.demo import with_metrics_on_progress_bar
from hf_reinforce.examples.real_demo.arguments import QUICK_MAX_COMPLETION_LENGTH, RealDemoArguments
from hf_reinforce.examples.real_demo.data import REINFORCE_RECIPE, REWARD_DIR, REWARD_RECIPE, read_jsonl
from hf_reinforce.examples.real_demo.judge import gold
from hf_reinforce.scripts import model_init_kwargs
from hf_reinforce.scripts import reinforce as reinforce_script
from hf_reinforce.scripts import reward as reward_script


def recipe_args(script, recipe: Path, overrides: list[str]):
    """(script, training, model) arguments of a recipe with flags over it, as `hf-reinforce <script>` parses them."""
    return script.make_parser().parse_args_and_config(["--config", str(recipe), *overrides])


def recipe_overrides(model: str, dataset: Path, output_dir: Path, seed: int, max_steps: int | None) -> list[str]:
    """The flags both trainers take over their recipe: the model, the dataset, the output folder, the seed and, when
    given, the number of steps."""
    overrides = ["--model_name_or_path", model, "--dataset_name", str(dataset), "--output_dir", str(output_dir)]
    overrides += ["--seed", str(seed)]
    if max_steps is not None:
        overrides += ["--max_steps", str(max_steps)]
    return overrides


def train_reward_model(model: str, data_dir: Path, output_dir: Path, args: RealDemoArguments, seed: int):
    overrides = recipe_overrides(model, data_dir / "preferences", output_dir, seed, args.reward_steps)
    script_args, training_args, model_args = recipe_args(reward_script, REWARD_RECIPE, overrides)
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


def value_pretraining_answers(data_dir: Path) -> Dataset:
    """The distinct (prompt, answer) of the preference pairs' chosen and rejected answers, for the critic to regress
    on before REINFORCE (`--value_pretraining`)."""
    answers = {}
    for row in read_jsonl(data_dir / "preferences" / "train.jsonl"):
        for answer in (row["chosen"], row["rejected"]):
            answers.setdefault(json.dumps([row["prompt"], answer]), {"prompt": row["prompt"], "completion": answer})
    return Dataset.from_list(list(answers.values()))


def build_reinforce_trainer(model: str, data_dir: Path, output_dir: Path, args: RealDemoArguments, seed: int):
    overrides = recipe_overrides(model, data_dir / "prompts", output_dir, seed, args.reinforce_steps)
    overrides += ["--reward_model_name_or_path", str(data_dir / REWARD_DIR)]
    overrides += arm_flags(args.arm) if args.arm else ["--baseline", args.baseline]
    overrides += ["--reward_weights", "1.0", "0.0"]
    for setting in (args.reinforce_settings or "").split():
        name, value = setting.split("=", 1)
        overrides += [f"--{name}", value]
    if args.quick:
        overrides += ["--max_completion_length", str(QUICK_MAX_COMPLETION_LENGTH)]
    script_args, training_args, model_args = recipe_args(reinforce_script, REINFORCE_RECIPE, overrides)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    with_critic = args.value_pretraining and training_args.baseline == "critic"
    trainer = ReinforceTrainer(
        model=model,
        # The saved reward adapter goes back onto the policy's 4-bit base; the critic starts from it
        reward_funcs=[script_args.reward_model_name_or_path, gold],
        args=training_args,
        train_dataset=Dataset.from_list(read_jsonl(data_dir / "prompts" / "train.jsonl")),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        value_pretraining_dataset=value_pretraining_answers(data_dir) if with_critic else None,
    )
    metrics = {"reward": "reward", "gold": "rewards/gold/mean", "kl": "kl", "EV": "critic/explained_variance"}
    return with_metrics_on_progress_bar(trainer, metrics)
