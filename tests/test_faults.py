"""Bad input, as a user gives it, to both trainers, the scripts and the CLI: every case gets an error that names the
field, row or file and says what to do, raised before any model is loaded where the data allows it, and no case
writes NaN weights or overwrites an earlier result. Also: secrets stay out of what the package prints and writes.
"""

import json
import math
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from peft import LoraConfig
from transformers import PreTrainedModel

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer, cli, scripts
from hf_reinforce.scripts import reinforce, reward, save_and_finish
from hf_reinforce.testing import make_preference_dataset, save_tiny_models


PROMPTS = Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8})
PAIRS = make_preference_dataset(8, seed=6, soft=True)
FAKE_TOKEN = "hf_FakeTokenThatMustNeverBeWritten0123"


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any `from_pretrained` of a model fails the test: the error under test must come before one."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran before the bad input was reported")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


def with_row(dataset: Dataset, index: int, **values) -> Dataset:
    rows = dataset.to_list()
    rows[index].update(values)
    return Dataset.from_list(rows)


def with_column(dataset: Dataset, name: str, values: list) -> Dataset:
    return Dataset.from_dict({**dataset.to_dict(), name: values})


def reward_args(tmp_path, **overrides) -> RewardConfig:
    settings = dict(output_dir=str(tmp_path / "run"), bf16=False, report_to="none", per_device_train_batch_size=4)
    return RewardConfig(**{**settings, **overrides})


def reinforce_args(tmp_path, **overrides) -> ReinforceConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        bf16=False,
        report_to="none",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    return ReinforceConfig(**{**settings, **overrides})


# ---- preference data (RewardTrainer): refused before the model loads ----
N = len(PAIRS)
PREFERENCE_CASES = {
    "no_rejected_column": (lambda: PAIRS.remove_columns("rejected"), r"no `rejected` column.*rename_column"),
    "no_chosen_column": (lambda: PAIRS.rename_column("chosen", "answer"), r"no `chosen` column.*rename_column"),
    "empty_chosen": (lambda: with_row(PAIRS, 2, chosen=""), r"Row 2 of the train dataset has an empty `chosen`"),
    "blank_rejected": (lambda: with_row(PAIRS, 3, rejected="  "), r"Row 3 .* empty `rejected`.*filter"),
    "null_rejected": (lambda: with_row(PAIRS, 1, rejected=None), r"Row 1 .* empty `rejected`"),
    "int_chosen": (lambda: with_column(PAIRS, "chosen", list(range(N))), r"Row 0 .*`chosen` of type int.*Fix or drop"),
    "int_prompt": (lambda: with_column(PAIRS, "prompt", [7] * N), r"Row 0 .*`prompt` of type int"),
    "prob_above_1": (lambda: with_row(PAIRS, 1, chosen_prob=1.5), r"Row 1 .*`chosen_prob`=1.5.*\[0, 1\]"),
    "prob_nan": (lambda: with_row(PAIRS, 4, chosen_prob=math.nan), r"Row 4 .*`chosen_prob`=nan"),
    "prob_null": (lambda: with_row(PAIRS, 5, chosen_prob=None), r"Row 5 .*`chosen_prob`=None"),
    "prob_text": (lambda: with_column(PAIRS, "chosen_prob", ["0.5"] * N), r"Row 0 .*`chosen_prob`='0.5'"),
    "margin_nan": (lambda: with_column(PAIRS, "margin", [0.0] * 3 + [math.nan] * (N - 3)), r"Row 3 .*`margin`=nan"),
    "margin_inf": (lambda: with_column(PAIRS, "margin", [math.inf] * N), r"Row 0 .*`margin`=inf.*finite number"),
    "margin_null": (lambda: with_column(PAIRS, "margin", [1.0, None] * (N // 2)), r"Row 1 .*`margin`=None"),
    "margin_text": (lambda: with_column(PAIRS, "margin", ["1"] * N), r"Row 0 .*`margin`='1'"),
    "no_rows": (lambda: PAIRS.select([]), r"The train dataset has no rows"),
}


@pytest.mark.parametrize("case", PREFERENCE_CASES)
def test_bad_preference_data_is_refused_before_the_model_loads(tmp_path, tiny_paths, no_model_loading, case):
    make_dataset, message = PREFERENCE_CASES[case]
    with pytest.raises(ValueError, match=message):
        RewardTrainer(model=tiny_paths["reward_model"], args=reward_args(tmp_path), train_dataset=make_dataset())


def test_bad_eval_pairs_name_the_eval_dataset(tmp_path, tiny_paths, no_model_loading):
    with pytest.raises(ValueError, match=r"Row 0 of the held_out dataset has `margin`=nan"):
        RewardTrainer(
            model=tiny_paths["reward_model"],
            args=reward_args(tmp_path),
            train_dataset=PAIRS,
            eval_dataset={"held_out": with_column(PAIRS, "margin", [math.nan] * N)},
        )


def test_pairs_all_longer_than_max_length_are_refused(tmp_path, tiny_paths):
    with pytest.raises(ValueError, match=r"Every pair of the train dataset \(8 rows\) is longer than max_length=3"):
        RewardTrainer(model=tiny_paths["reward_model"], args=reward_args(tmp_path, max_length=3), train_dataset=PAIRS)


# ---- prompts (ReinforceTrainer): refused before any model loads ----
PROMPT_CASES = {
    "no_prompt_column": (lambda: PROMPTS.rename_column("prompt", "question"), r"no `prompt` column.*rename_column"),
    "empty_prompts": (lambda: Dataset.from_dict({"prompt": [""] * 8}), r"Row 0 .* empty `prompt`.*filter"),
    "one_empty_prompt": (lambda: with_row(PROMPTS, 5, prompt=""), r"Row 5 of the train dataset has an empty `prompt`"),
    "int_prompts": (lambda: Dataset.from_dict({"prompt": list(range(8))}), r"Row 0 .*`prompt` of type int"),
}


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_bad_prompts_are_refused_before_any_model_loads(tmp_path, tiny_paths, no_model_loading, case):
    make_dataset, message = PROMPT_CASES[case]
    with pytest.raises(ValueError, match=message):
        ReinforceTrainer(
            model=tiny_paths["policy"],
            reward_funcs=tiny_paths["reward_model"],
            args=reinforce_args(tmp_path),
            train_dataset=make_dataset(),
        )


def test_too_few_prompts_for_one_batch_are_refused_before_training(tmp_path, tiny_paths):
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=count_a,
        args=reinforce_args(tmp_path),
        train_dataset=PROMPTS.select([0]),
    )
    with pytest.raises(ValueError, match=r"has 1 prompt\(s\), but one batch of rollouts needs 2"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_eval_prompts_without_a_prompt_column_name_the_eval_dataset(tmp_path, tiny_paths, no_model_loading):
    with pytest.raises(ValueError, match=r"The eval dataset has no `prompt` column"):
        ReinforceTrainer(
            model=tiny_paths["policy"],
            reward_funcs=count_a,
            args=reinforce_args(tmp_path),
            train_dataset=PROMPTS,
            eval_dataset=PROMPTS.rename_column("prompt", "text"),
        )


# ---- configuration: refused when the config is built ----
CONFIG_CASES = {
    "baseline": (ReinforceConfig, {"baseline": "ppo"}, r"baseline='ppo' is not supported; set `baseline`"),
    "rloo_groups": (ReinforceConfig, {"baseline": "rloo", "num_generations": 1}, r"raise `num_generations`"),
    "critic_lr_nan": (ReinforceConfig, {"critic_learning_rate": math.nan}, r"critic_learning_rate=nan"),
    "critic_lr_negative": (ReinforceConfig, {"critic_learning_rate": -1e-3}, r"critic_learning_rate=-0.001"),
    "critic_epochs": (ReinforceConfig, {"critic_epochs": 0}, r"critic_epochs=0 must be at least 1"),
    "critic_grad_norm": (ReinforceConfig, {"critic_max_grad_norm": math.nan}, r"critic_max_grad_norm=nan"),
    "critic_warmup": (ReinforceConfig, {"critic_warmup_steps": -1}, r"critic_warmup_steps=-1"),
    "critic_layers": (ReinforceConfig, {"critic_layers": -1}, r"critic_layers=-1"),
    "gamma": (ReinforceConfig, {"gamma": 0.0}, r"gamma=0.0 must lie in \(0, 1\]"),
    "lam": (ReinforceConfig, {"lam": 1.5}, r"lam=1.5 must lie in \[0, 1\]"),
    "eos_penalty": (ReinforceConfig, {"missing_eos_penalty": math.inf}, r"missing_eos_penalty=inf"),
    "num_iterations": (ReinforceConfig, {"num_iterations": 0}, r"num_iterations=0"),
    "max_length": (RewardConfig, {"max_length": 0}, r"`max_length` must be a positive number"),
    "center_rewards": (RewardConfig, {"center_rewards_coefficient": -0.01}, r"`center_rewards_coefficient` must"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_configuration_is_named(tmp_path, case):
    config_class, fields, message = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=message):
        config_class(output_dir=str(tmp_path), bf16=False, report_to="none", **fields)


# ---- data files (both scripts) ----
def write_bytes(name: str, content: bytes):
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return write


def only_a_test_split(folder: Path) -> Path:
    PAIRS.to_json(folder / "test.jsonl")
    return folder


def two_formats(folder: Path) -> Path:
    PAIRS.to_json(folder / "train.jsonl")
    PAIRS.to_parquet(folder / "test.parquet")
    return folder


FILE_CASES = {
    "empty_file": (write_bytes("train.jsonl", b""), r"train.jsonl is empty; give it at least one row"),
    "blank_file": (write_bytes("train.jsonl", b"\n\n"), r"train.jsonl is empty"),
    "latin1_jsonl": (write_bytes("p.jsonl", b'{"prompt": "caf\xe9"}\n'), r"p.jsonl is not UTF-8 .*line 1.*iconv"),
    "latin1_csv": (
        write_bytes("p.csv", b"prompt\nab\ncaf\xe9\n"),
        r"p.csv is not UTF-8 text \(byte b'\\xe9' on line 3",
    ),
    "broken_json": (write_bytes("p.jsonl", b'{"prompt": "ab"}\n{"prompt": \n'), r"p.jsonl could not be read as json"),
    "no_data_files": (write_bytes("notes.txt", b"no data"), r"No data file found"),
    "mixed_formats": (two_formats, r"mixes data formats \(json, parquet\); keep one format"),
    "no_train_split": (only_a_test_split, r"has no split 'train' \(it has test\); set `dataset_train_split`"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_data_files_are_named(tmp_path, case):
    write, message = FILE_CASES[case]
    path = write(tmp_path)
    args = reinforce.ReinforceScriptArguments(dataset_name=str(path if path.is_file() else tmp_path))
    with pytest.raises(ValueError, match=message):
        scripts.load_script_dataset(args)


# ---- scripts: refused before any model loads ----
def reward_script_args(tiny_paths, data_file: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", tiny_paths["reward_model"], "--dataset_name", str(data_file),
        "--output_dir", str(output_dir), "--bf16", "false", "--report_to", "none", *extra,
    ]  # fmt: skip


def reinforce_script_args(tiny_paths, data_file: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", tiny_paths["policy"], "--reward_model_name_or_path", tiny_paths["reward_model"],
        "--dataset_name", str(data_file), "--output_dir", str(output_dir), "--bf16", "false", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "6", *extra,
    ]  # fmt: skip


def finished_model_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"an earlier result")
    return folder


def complete_checkpoint_in(folder: Path) -> Path:
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return folder


def incomplete_checkpoint_in(folder: Path) -> Path:
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"cut o")
    return folder


SCRIPT_CASES = {
    "reward_reused_output_dir": (
        reward, lambda out: finished_model_in(out), [], FileExistsError,
        r"output_dir=.* already holds a trained model \(adapter_model.safetensors\).*--overwrite_output_dir true",
    ),
    "reinforce_reused_output_dir": (
        reinforce, lambda out: finished_model_in(out), [], FileExistsError, r"--resume_from_checkpoint true, or pass",
    ),
    "fresh_start_over_checkpoints": (
        reward, complete_checkpoint_in, [], FileExistsError,
        r"holds the checkpoints of an earlier run \(the newest complete one: checkpoint-2\)\. Resume it with",
    ),
    "resume_true_without_checkpoints": (
        reinforce, lambda out: out, ["--resume_from_checkpoint", "true"], ValueError,
        r"resume_from_checkpoint='true' .* holds none\. Start afresh without --resume_from_checkpoint",
    ),
    "resume_true_with_only_incomplete": (
        reward, incomplete_checkpoint_in, ["--resume_from_checkpoint", "true"], ValueError,
        r"holds only incomplete ones \(checkpoint-2",
    ),
    "resume_incomplete_folder": (
        reinforce, incomplete_checkpoint_in, ["--resume_from_checkpoint", "{out}/checkpoint-2"], ValueError,
        r"is an incomplete checkpoint: it has no trainer_state.json \(the run stopped .*\); start afresh",
    ),
    "resume_missing_folder": (
        reward, lambda out: out, ["--resume_from_checkpoint", "{out}/checkpoint-9"], FileNotFoundError,
        r"checkpoint-9'?: no such folder",
    ),
    "reward_lora_without_head": (
        reward, lambda out: out, ["--use_peft", "true", "--lora_task_type", "CAUSAL_LM"], ValueError, r"SEQ_CLS",
    ),
    "too_few_prompts": (
        reinforce, lambda out: out, ["--dataset_name", "{one_prompt}"], ValueError,
        r"The train dataset has 1 prompt\(s\), but one batch of rollouts needs 2 .*Add prompts",
    ),
    "missing_model_folder": (
        reinforce, lambda out: out, ["--model_name_or_path", "./no/such/model"], FileNotFoundError,
        r"model_name_or_path='./no/such/model': no such file or folder",
    ),
    "missing_reward_model_folder": (
        reinforce, lambda out: out, ["--reward_model_name_or_path", "/no/such/reward"], FileNotFoundError,
        r"reward_model_name_or_path='/no/such/reward'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_bad_script_arguments_are_refused_before_any_model_loads(tmp_path, tiny_paths, no_model_loading, case):
    script, prepare, extra, error, message = SCRIPT_CASES[case]
    output_dir = prepare(tmp_path / "out")
    data_file, one_prompt = tmp_path / "data.jsonl", tmp_path / "one_prompt.jsonl"
    PAIRS.to_json(data_file)
    PAIRS.select([0]).to_json(one_prompt)
    extra = [argument.format(out=output_dir, one_prompt=one_prompt) for argument in extra]
    make_args = reward_script_args if script is reward else reinforce_script_args
    parsed = script.make_parser().parse_args_and_config(make_args(tiny_paths, data_file, output_dir, *extra))
    with pytest.raises(error, match=message):
        script.main(*parsed)


def test_overwrite_output_dir_lets_a_script_replace_an_earlier_result(tmp_path, tiny_paths, monkeypatch):
    output_dir = finished_model_in(tmp_path / "out")
    data_file = tmp_path / "data.jsonl"
    PAIRS.to_json(data_file)
    monkeypatch.setattr(reward.RewardTrainer, "train", lambda self, **kwargs: None)
    monkeypatch.setattr(reward, "save_and_finish", lambda *args, **kwargs: None)
    args = reward_script_args(tiny_paths, data_file, output_dir, "--overwrite_output_dir", "true")
    reward.main(*reward.make_parser().parse_args_and_config(args))


def test_a_run_that_took_no_step_saves_nothing(tmp_path, tiny_paths):
    output_dir = finished_model_in(tmp_path / "out")
    trainer = RewardTrainer(
        model=tiny_paths["reward_model"], args=reward_args(tmp_path, output_dir=str(output_dir)), train_dataset=PAIRS
    )
    with pytest.raises(RuntimeError, match=r"took no optimizer step, so nothing was saved to .*out"):
        save_and_finish(trainer, trainer.args, None, saved_what="Reward model")
    assert (output_dir / "adapter_model.safetensors").read_bytes() == b"an earlier result"


# ---- resuming from a checkpoint of another kind of run: refused before any weight is loaded ----
def fake_checkpoint(folder: Path, task_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": task_type}))
    return folder


def test_a_reward_checkpoint_does_not_resume_a_reinforce_run(tmp_path, tiny_paths):
    checkpoint = fake_checkpoint(tmp_path / "run" / "checkpoint-2", "SEQ_CLS")
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=reinforce_args(tmp_path), train_dataset=PROMPTS
    )
    with pytest.raises(ValueError, match=r"checkpoint-2 is a checkpoint of a reward model \(RewardTrainer\)"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_reinforce_checkpoint_does_not_resume_a_reward_run(tmp_path, tiny_paths):
    fake_checkpoint(tmp_path / "run" / "checkpoint-2", "CAUSAL_LM")
    trainer = RewardTrainer(model=tiny_paths["reward_model"], args=reward_args(tmp_path), train_dataset=PAIRS)
    with pytest.raises(ValueError, match=r"checkpoint-2 is not a reward model's checkpoint"):
        trainer.train(resume_from_checkpoint="true")


def test_a_checkpoint_of_other_critic_settings_is_refused_before_loading(tmp_path, tiny_paths):
    def trainer(critic_shares_base: bool, lora_r: int = 4, **overrides):
        return ReinforceTrainer(
            model=tiny_paths["policy"],
            reward_funcs=count_a,
            args=reinforce_args(tmp_path, critic_shares_base=critic_shares_base, **overrides),
            train_dataset=PROMPTS,
            peft_config=LoraConfig(r=lora_r, target_modules=["q_proj", "v_proj"]),
        )

    trainer(True, save_strategy="steps", save_steps=2).train()
    other = trainer(False)
    before = {name: p.detach().clone() for name, p in other.model.named_parameters()}
    with pytest.raises(ValueError, match=r"The critic in .*critic_state.safetensors does not fit this run's"):
        other.train(resume_from_checkpoint="true")
    for name, param in other.model.named_parameters():
        assert torch.equal(param, before[name]), name  # nothing was loaded
    with pytest.raises(ValueError, match=r"The policy adapter in .*adapter_model.safetensors .*other shapes"):
        trainer(True, lora_r=8).train(resume_from_checkpoint="true")


# ---- runs that would otherwise end with non-finite weights ----
def test_overflowing_rewards_skip_the_critic_update_and_are_counted(tmp_path, tiny_paths):
    def overflowing(completions, **kwargs):
        return [1e30 if i % 2 else -1e30 for i in range(len(completions))]

    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=overflowing, args=reinforce_args(tmp_path), train_dataset=PROMPTS
    )
    trainer.train()
    skipped = [
        entry["critic/num_skipped_updates"] for entry in trainer.state.log_history if "critic/value_loss" in entry
    ]
    assert skipped == [1.0, 1.0]
    for module in (trainer.model, trainer.value_model):
        assert all(torch.isfinite(p).all() for p in module.parameters())


# ---- CLI ----
CLI_CASES = {
    "unknown_accelerate_config": (["--accelerate_config", "nope"], r"--accelerate_config nope: no such file"),
    "accelerate_config_without_value": (["--accelerate_config"], r"--accelerate_config needs a value"),
    "mistyped_flag": (
        ["--accelerate_config", "ddp", "--num_proceses", "2"],
        r"--num_proceses: neither .* Did you mean",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_cli_arguments_get_one_line(tmp_path, tiny_paths, monkeypatch, case):
    argv, message = CLI_CASES[case]
    data_file = tmp_path / "data.jsonl"
    PAIRS.to_json(data_file)
    monkeypatch.setattr(cli.subprocess, "run", lambda *args, **kwargs: pytest.fail("a process was launched"))
    with pytest.raises(SystemExit, match=message):
        cli.main(["reward", *reward_script_args(tiny_paths, data_file, tmp_path / "out"), *argv])


# ---- secrets ----
@pytest.fixture
def captured_uploads(monkeypatch, tmp_path):
    """What `push_to_hub` would upload, copied to a local folder instead of the Hub."""
    uploads = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, run_as_future=False, **kwargs):
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                destination = uploads / f"{len(list(uploads.rglob('*')))}-{path.name}"
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(path.read_bytes())
        commit = CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )
        if not run_as_future:  # the trainer pushes checkpoints in the background, as a future
            return commit
        future = Future()
        future.set_result(commit)
        return future

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def files_holding(folder: Path, secret: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_a_hub_token_is_in_no_printed_line_no_written_file_and_no_upload(
    tmp_path, tiny_paths, captured_uploads, capfd, caplog
):
    data_file = tmp_path / "prompts.jsonl"
    PROMPTS.to_json(data_file)
    output_dir = tmp_path / "out"
    args = reinforce_script_args(
        tiny_paths, data_file, output_dir,
        "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2",
        "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
        "--push_to_hub", "true", "--hub_model_id", "someone/tiny", "--hub_token", FAKE_TOKEN,
    )  # fmt: skip
    with caplog.at_level("DEBUG"):
        reinforce.main(*reinforce.make_parser().parse_args_and_config(args))
    assert (output_dir / "checkpoint-2" / "training_args.bin").is_file()
    assert any(captured_uploads.rglob("*training_args.bin"))
    assert files_holding(output_dir, FAKE_TOKEN) == []
    assert files_holding(captured_uploads, FAKE_TOKEN) == []
    printed = capfd.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err + caplog.text


def test_the_cli_never_prints_a_hub_token(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(cli.subprocess, "run", lambda command, **kwargs: launched.append(command) or _Done())
    recipe = Path(cli.__file__).resolve().parent.parent / "recipes" / "tiny" / "reward" / "config_qlora.yaml"
    argv = ["--config", str(recipe), "--accelerate_config", "ddp", "--hub_token", FAKE_TOKEN]
    cli.main(["reward", *argv, f"--hub_token={FAKE_TOKEN}"])
    assert FAKE_TOKEN in launched[0]  # the launched script still gets it
    printed = capsys.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err
    assert "--hub_token '<redacted>'" in printed.err and "'--hub_token=<redacted>'" in printed.err


class _Done:
    returncode = 0
