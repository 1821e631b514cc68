"""The training scripts run in-process on tiny local models and data: recipes as a user runs them, plus overrides."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from trl import ModelConfig, ScriptArguments

from hf_reinforce import ReinforceConfig, scripts
from hf_reinforce.cli import make_tiny
from hf_reinforce.reward_models import RewardModelScorer, load_reward_adapter
from hf_reinforce.scripts import reinforce, reward
from hf_reinforce.testing import make_preference_dataset


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY_REWARD_RECIPE = RECIPES / "tiny" / "reward" / "config_qlora.yaml"
TINY_REINFORCE_RECIPE = RECIPES / "tiny" / "reinforce" / "config_qlora.yaml"


def run_script(script, args: list[str]) -> None:
    script.main(*script.make_parser().parse_args_and_config(args))


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """
    A working directory where the tiny reward recipe has run exactly as its README says: the recipes' relative paths
    (outputs/tiny/...) resolve inside it.
    """
    workdir = tmp_path_factory.mktemp("tiny")
    make_tiny(str(workdir / "outputs" / "tiny"), num_train_pairs=256, seed=0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(workdir)
        run_script(reward, ["--config", str(TINY_REWARD_RECIPE)])
    return workdir


def tiny_model_args(load_in_4bit: bool) -> ModelConfig:
    return ModelConfig(dtype="float32", load_in_4bit=load_in_4bit)


def tiny_reinforce_args(output_dir: Path) -> ReinforceConfig:
    return ReinforceConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none")


def finished_scores(scorer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The scorer's rewards of each pair's chosen and rejected answers, as finished completions."""
    eos = [[scorer.tokenizer.eos_token_id]] * len(rows)
    chosen = scorer(prompts=rows["prompt"], completions=rows["chosen"], completion_ids=eos)
    rejected = scorer(prompts=rows["prompt"], completions=rows["rejected"], completion_ids=eos)
    return torch.tensor(chosen), torch.tensor(rejected)


def test_tiny_reward_recipe_writes_a_reward_adapter_that_ranks_held_out_pairs(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)  # the adapter names its base model by the recipe's relative path
    adapter_dir = tiny_workdir / "outputs" / "tiny" / "reward"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert "score" in adapter_config["modules_to_save"]  # the reward head travels with the adapter
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "tokenizer_config.json").is_file()

    # No quantization asked for: the adapter goes back onto the 4-bit base it was trained on, as recorded
    model, tokenizer = load_reward_adapter(adapter_dir)
    assert isinstance(model, PeftModel) and model.get_base_model().is_loaded_in_4bit
    scorer = RewardModelScorer(model, tokenizer, [tokenizer.eos_token_id], name="reward")
    chosen, rejected = finished_scores(scorer, make_preference_dataset(64, seed=1))
    assert (chosen > rejected).float().mean() > 0.8


def test_reinforce_script_scores_with_a_saved_full_reward_model(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    captured = {}
    monkeypatch.setattr(reinforce.ReinforceTrainer, "train", lambda self, **kwargs: captured.setdefault("t", self))
    monkeypatch.setattr(reinforce, "save_and_finish", lambda *args, **kwargs: None)
    run_script(
        reinforce,
        [
            "--config", str(TINY_REINFORCE_RECIPE),
            "--reward_model_name_or_path", "outputs/tiny/tiny-llama-reward",
            "--output_dir", str(tiny_workdir / "unused"),
        ],
    )  # fmt: skip
    scorer = captured["t"].reward_funcs[0]
    assert isinstance(scorer, RewardModelScorer) and scorer.model.config.num_labels == 1
    assert scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id
    chosen, rejected = finished_scores(scorer, make_preference_dataset(4, seed=1))
    assert chosen.shape == rejected.shape == (4,)


def test_reward_script_trains_a_full_model_from_a_single_json_file(tmp_path, tiny_workdir):
    pairs_file = tmp_path / "pairs.json"
    make_preference_dataset(32, seed=3).to_json(pairs_file)
    output_dir = tmp_path / "reward-full"
    run_script(
        reward,
        [
            "--config", str(TINY_REWARD_RECIPE),
            "--model_name_or_path", str(tiny_workdir / "outputs" / "tiny" / "tiny-llama"),
            "--dataset_name", str(pairs_file),
            "--use_peft", "false",
            "--load_in_4bit", "false",
            "--eval_strategy", "no",
            "--max_steps", "3",
            "--output_dir", str(output_dir),
        ],
    )  # fmt: skip
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert (output_dir / "model.safetensors").is_file()
    assert not (output_dir / "adapter_config.json").exists()


def test_reward_script_refuses_a_lora_adapter_without_its_reward_head():
    args = reward.make_parser().parse_args_and_config(
        ["--config", str(TINY_REWARD_RECIPE), "--lora_task_type", "CAUSAL_LM"]
    )
    with pytest.raises(ValueError, match="SEQ_CLS"):
        reward.main(*args)


def test_reinforce_script_requires_a_reward_model():
    script_args, training_args, model_args = reinforce.make_parser().parse_args_and_config(
        ["--config", str(TINY_REINFORCE_RECIPE)]
    )
    script_args.reward_model_name_or_path = None
    with pytest.raises(ValueError, match="reward_model_name_or_path"):
        reinforce.main(script_args, training_args, model_args)


def test_tiny_reinforce_recipe_trains_the_policy_and_its_critic(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    run_script(
        reinforce,
        ["--config", str(TINY_REINFORCE_RECIPE), "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1"],
    )

    output_dir = tiny_workdir / "outputs" / "tiny" / "reinforce"
    assert (output_dir / "adapter_model.safetensors").is_file()
    trainer_state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == 3
    assert any("critic/value_loss" in entry for entry in trainer_state["log_history"])


# Dataset loading


def script_args(dataset_name: Path, **overrides) -> ScriptArguments:
    return ScriptArguments(dataset_name=str(dataset_name), **overrides)


def test_a_single_data_file_becomes_the_train_split(tmp_path):
    make_preference_dataset(5).to_json(tmp_path / "pairs.jsonl")
    dataset = scripts.load_script_dataset(script_args(tmp_path / "pairs.jsonl", dataset_train_split="train_prefs"))
    assert list(dataset) == ["train_prefs"]
    assert dataset["train_prefs"].column_names == ["prompt", "chosen", "rejected"]
    assert dataset["train_prefs"].num_rows == 5


def test_the_files_of_a_folder_are_splits_named_after_them(tmp_path):
    make_preference_dataset(6).to_parquet(tmp_path / "train-00000-of-00002.parquet")
    make_preference_dataset(4).to_parquet(tmp_path / "train-00001-of-00002.parquet")
    make_preference_dataset(3).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "README.md").write_text("Files that hold no data are skipped.")
    dataset = scripts.load_script_dataset(script_args(tmp_path))
    assert {split: rows.num_rows for split, rows in dataset.items()} == {"train": 10, "test": 3}


def test_csv_files_load(tmp_path):
    pd.DataFrame({"prompt": ["ab:", "cd:"]}).to_csv(tmp_path / "train.csv", index=False)
    assert scripts.load_script_dataset(script_args(tmp_path))["train"]["prompt"] == ["ab:", "cd:"]


def test_a_folder_mixing_formats_is_refused(tmp_path):
    make_preference_dataset(2).to_json(tmp_path / "train.jsonl")
    make_preference_dataset(2).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(ValueError, match="mixes data formats"):
        scripts.load_script_dataset(script_args(tmp_path))


def test_a_folder_without_data_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(ValueError, match="No data file"):
        scripts.load_script_dataset(script_args(tmp_path))


def test_a_missing_train_split_is_named(tmp_path):
    make_preference_dataset(2).to_json(tmp_path / "test.jsonl")
    with pytest.raises(ValueError, match="no split 'train'"):
        scripts.load_script_dataset(script_args(tmp_path))


def test_the_eval_split_is_needed_only_when_evaluating(tmp_path):
    make_preference_dataset(2).to_json(tmp_path / "train.jsonl")
    dataset = scripts.load_script_dataset(script_args(tmp_path))
    no_eval = tiny_reinforce_args(tmp_path / "out")
    assert scripts.eval_split(dataset, script_args(tmp_path), no_eval) is None

    evaluating = ReinforceConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, eval_strategy="steps", eval_steps=1
    )
    with pytest.raises(ValueError, match="'test'"):
        scripts.eval_split(dataset, script_args(tmp_path), evaluating)
