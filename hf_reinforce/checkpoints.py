"""Checkpoints a run can resume from, and the trainer behaviour that keeps them so.

The trainer writes `trainer_state.json` last: a `checkpoint-<step>` folder without a readable one was cut off while
being written (a killed run) and is never resumed from. `resume_from_checkpoint=True` (or "true") picks the newest
complete checkpoint, "auto" the same or a fresh start.

Every run records its id in `output_dir/run.json`, and every checkpoint it writes carries a copy: a fresh run over an
earlier run's folder (`overwrite_output_dir`) gets a new id, so the earlier run's checkpoints left in the folder are
never taken for the newest of this one. The copy also records how many processes wrote the checkpoint: each of them
writes its own random state after the first process has written its share, so a checkpoint of several processes is
complete only once every `rng_state_<process>.pth` is there.
"""

import json
import uuid
from pathlib import Path

from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open

from .critic import CRITIC_STATE


TRAINER_STATE = "trainer_state.json"
RUN_FILE = "run.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
# `resume_from_checkpoint` values that ask for the newest complete checkpoint of `output_dir` rather than a folder:
# `true` fails when there is none, "auto" then starts afresh (a command that can be rerun after a kill). A YAML
# recipe's `true` arrives as a bool, a command line's as a string.
NEWEST_CHECKPOINT = ("true", "True")
NEWEST_CHECKPOINT_OR_FRESH = "auto"
# The files whose presence in `output_dir` means a model was saved there.
FINISHED_MODEL_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)


def checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def incomplete_checkpoint_reason(folder: Path) -> str | None:
    """Why `folder` is not a checkpoint a run can resume from (None when it is one).

    The trainer writes `trainer_state.json` last, so a folder without a readable one was cut off while being written;
    a truncated weights file (a checkpoint rewritten over an older one) is caught by reading its header.
    """
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        return f"it has no {TRAINER_STATE} (the run stopped while writing it)"
    try:
        json.loads(state_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"its {TRAINER_STATE} is cut off"
    missing = missing_process_states(folder)
    if missing:
        return f"it has no {missing[0]} (a process stopped before writing its random state)"
    for weights in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as reader:
                reader.keys()
        except Exception:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            return f"{weights.relative_to(folder)} is cut off or damaged"
    return None


def missing_process_states(folder: Path) -> list[str]:
    """The per-process random states a checkpoint of several processes lacks (none when it saved no random state)."""
    processes = recorded_processes(folder)
    if processes < 2 or not any(folder.glob("rng_state_*.pth")):
        return []
    return [name for name in (f"rng_state_{rank}.pth" for rank in range(processes)) if not (folder / name).is_file()]


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [child for child in output_dir.iterdir() if child.is_dir() and checkpoint_step(child) is not None]
    return sorted(folders, key=checkpoint_step)


def run_record(folder: str | Path) -> dict:
    """What `folder` (an output folder or a checkpoint) records of the run that wrote it; {} when nothing."""
    try:
        record = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_id(folder: str | Path) -> str | None:
    """The id of the run that wrote `folder` (an output folder or a checkpoint), None when it records none."""
    return run_record(folder).get("run_id")


def recorded_processes(folder: str | Path) -> int:
    """How many processes wrote the checkpoint `folder` (1 when it does not record it)."""
    return int(run_record(folder).get("processes", 1))


def write_run_id(folder: str | Path, value: str, processes: int | None = None) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {"run_id": value} if processes is None else {"run_id": value, "processes": processes}
    (Path(folder) / RUN_FILE).write_text(json.dumps(record) + "\n")


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run `output_dir` records (of any run when it records none)."""
    current = run_id(output_dir)
    for folder in reversed(checkpoint_folders(output_dir)):
        if current is not None and run_id(folder) != current:
            continue  # an earlier run's, left in a folder that a later run took over
        if incomplete_checkpoint_reason(folder) is None:
            return folder
    return None


def resolve_resume_from_checkpoint(value, output_dir: str | Path) -> str | None:
    """The checkpoint folder to resume from, or None to start afresh, for a `resume_from_checkpoint` value.

    `True` (or "true") is the newest complete checkpoint of `output_dir`, "auto" the same or a fresh start
    when there is none yet, a path that folder; an incomplete folder is never resumed from.
    """
    if value is None or value is False or value in ("", "false", "False"):
        return None
    if value is True or value in NEWEST_CHECKPOINT or value == NEWEST_CHECKPOINT_OR_FRESH:
        checkpoint = newest_complete_checkpoint(output_dir)
        if checkpoint is None and value != NEWEST_CHECKPOINT_OR_FRESH:
            found = [folder.name for folder in checkpoint_folders(output_dir)]
            what = f"only incomplete ones ({', '.join(found)}, cut off while being written)" if found else "none"
            raise ValueError(
                f"resume_from_checkpoint={value!r} resumes from the newest complete checkpoint in output_dir="
                f"{str(output_dir)!r}, but it holds {what}. Start afresh without --resume_from_checkpoint, or pass "
                f"--resume_from_checkpoint {NEWEST_CHECKPOINT_OR_FRESH} to resume when there is a checkpoint and "
                "start afresh otherwise."
            )
        return None if checkpoint is None else str(checkpoint)
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"resume_from_checkpoint={value!r}: no such folder. Give a checkpoint folder (output_dir/checkpoint-"
            "<step>) or `true` for the newest complete checkpoint in output_dir."
        )
    reason = incomplete_checkpoint_reason(folder)
    if reason is not None:
        newest = newest_complete_checkpoint(folder.parent)
        hint = f"resume from {str(newest)!r} instead" if newest else "start afresh"
        raise ValueError(f"resume_from_checkpoint={value!r} is an incomplete checkpoint: {reason}; {hint}.")
    return str(folder)


def check_not_finished(checkpoint: Path, max_steps: int) -> None:
    """Refuse to resume from a checkpoint at or past `max_steps`: transformers would take one more step than asked
    before it stops (it checks the step count after each step only), so the resumed run would end past it."""
    global_step = json.loads((checkpoint / TRAINER_STATE).read_text()).get("global_step", 0)
    if 0 < max_steps <= global_step:
        raise ValueError(
            f"{checkpoint} is at step {global_step}, and this run stops at max_steps={max_steps}: the run that wrote "
            "it had finished training (it was stopped while saving its final model). Its trained model is that "
            "checkpoint's; load it from there, or resume with a larger --max_steps to train further."
        )


def check_output_dir(args) -> None:
    """Refuse to train into an `output_dir` that already holds a saved model, unless resuming or told to overwrite it
    (`args` is a training config); a `resume_from_checkpoint` that names no usable checkpoint is refused too."""
    output_dir = args.output_dir
    resuming = resolve_resume_from_checkpoint(args.resume_from_checkpoint, output_dir) is not None
    if resuming or getattr(args, "overwrite_output_dir", False):
        return
    saved = [name for name in FINISHED_MODEL_FILES if (Path(output_dir) / name).is_file()]
    if saved:
        raise FileExistsError(
            f"output_dir={str(output_dir)!r} already holds a trained model ({saved[0]}), which this run would "
            "overwrite. Choose another --output_dir, resume with --resume_from_checkpoint true, or pass "
            "--overwrite_output_dir true to replace it."
        )
    # A fresh run among an earlier run's checkpoints would later resume from whichever of the two wrote the last one
    checkpoint = newest_complete_checkpoint(output_dir)
    if checkpoint is not None:
        raise FileExistsError(
            f"output_dir={str(output_dir)!r} holds the checkpoints of an earlier run (the newest complete one: "
            f"{checkpoint.name}). Resume it with --resume_from_checkpoint true, choose another --output_dir, or pass "
            "--overwrite_output_dir true to start afresh over them."
        )


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a safetensors file, read from its header only."""
    with safe_open(str(path), framework="pt") as reader:
        return {name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()}


def checkpoint_model_kind(checkpoint: Path) -> str | None:
    """`"reward"` when a checkpoint's model scores texts (sequence classification), `"policy"` when it generates
    them (causal LM), None when its configuration does not say."""
    adapter_config = checkpoint / "adapter_config.json"
    config = checkpoint / "config.json"
    if adapter_config.is_file():
        kinds = [json.loads(adapter_config.read_text()).get("task_type")]
    elif config.is_file():
        kinds = json.loads(config.read_text()).get("architectures") or []
    else:
        kinds = []
    for kind in kinds:
        if kind and (kind == "SEQ_CLS" or kind.endswith("ForSequenceClassification")):
            return "reward"
        if kind and (kind == "CAUSAL_LM" or kind.endswith("ForCausalLM")):
            return "policy"
    return None


def check_same_tensors(checkpoint: Path, file_name: str, expected: dict, what: str, ignore_prefix=None) -> None:
    """Raise a ValueError unless `file_name` in `checkpoint` holds tensors of the names and shapes of `expected`
    (besides those named `ignore_prefix...`)."""
    path = checkpoint / file_name
    if not path.is_file():
        raise ValueError(
            f"{checkpoint} holds no {file_name}, so the {what} cannot be resumed from it: another kind of run "
            "wrote it (another baseline, or a full model instead of an adapter). Resume with the settings of the "
            "run that wrote it, or start afresh."
        )
    found = {
        name: shape
        for name, shape in safetensors_shapes(path).items()
        if not (ignore_prefix and name.startswith(ignore_prefix))
    }
    expected = {name: tuple(tensor.shape) for name, tensor in expected.items()}
    if found != expected:
        differ = sorted(name for name in found.keys() & expected.keys() if found[name] != expected[name])
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        raise ValueError(
            f"The {what} in {path} does not fit this run's (missing {missing[:2]}, unexpected {extra[:2]}, other "
            f"shapes {differ[:2]}): it was written with other model, LoRA or critic settings (e.g. "
            "critic_shares_base, critic_layers). Resume with the settings of the run that wrote it, or start afresh."
        )


def check_reinforce_checkpoint(trainer, checkpoint: Path) -> None:
    """Refuse a checkpoint a REINFORCE run cannot resume from: a reward model's, or one whose policy adapter or critic
    does not fit this run's (the policy's where no engine shards it; the critic's always, as no engine shards it)."""
    if checkpoint_model_kind(checkpoint) == "reward":
        raise ValueError(
            f"{checkpoint} is a checkpoint of a reward model (RewardTrainer); resume a REINFORCE run from one of "
            "its own checkpoints, or give the reward model as `reward_model_name_or_path`."
        )
    # The engines shard the policy (their own loaders check what they load); no engine shards the critic
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(policy, PeftModel) and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        expected = get_peft_model_state_dict(policy, adapter_name="default")
        check_same_tensors(checkpoint, ADAPTER_WEIGHTS, expected, "policy adapter")
    if trainer.critic is not None:
        expected = trainer.value_model.trainable_state_dict()
        check_same_tensors(checkpoint, CRITIC_STATE, expected, "critic", ignore_prefix="statistics.")


class ResumableMixin:
    """Checkpoint handling shared by the trainers: a run resumes only from a complete checkpoint written by the same
    kind of run, and a checkpoint being rewritten never looks complete."""

    # `True` or "true" means the newest *complete* checkpoint (transformers would take the newest folder, even one
    # cut off by a kill), and a checkpoint of another kind of run is refused before any weight is loaded
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self._check_resumable(Path(checkpoint))
            check_not_finished(Path(checkpoint), self.args.max_steps)
            self._before_resuming(Path(checkpoint))
        if self.args.should_save:  # a resumed run goes on under its id, a fresh one gets its own
            run = (run_id(checkpoint) if checkpoint is not None else None) or uuid.uuid4().hex
            write_run_id(self.args.output_dir, run)
            if checkpoint is not None and run_id(checkpoint) is None:
                write_run_id(checkpoint, run)  # a checkpoint written before ids were recorded joins the run
        return super().train(checkpoint, *args, **kwargs)

    def _check_resumable(self, checkpoint: Path) -> None:
        """Raise a ValueError naming `checkpoint` when this trainer cannot resume from it."""

    def _before_resuming(self, checkpoint: Path) -> None:
        """Prepare to resume from `checkpoint`, once every check has passed."""

    @staticmethod
    def is_checkpoint_folder(folder) -> bool:
        return checkpoint_step(Path(folder)) is not None

    # A run resumed from an earlier step rewrites later checkpoints: the old trainer state goes first (the model is
    # the first thing a checkpoint writes), so that a kill during the rewrite leaves a folder that reads as incomplete
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if (
            _internal_call
            and output_dir is not None
            and self.is_checkpoint_folder(output_dir)
            and self.args.should_save
        ):
            (Path(output_dir) / TRAINER_STATE).unlink(missing_ok=True)
        super().save_model(output_dir, _internal_call)
        if output_dir is None or not self.is_checkpoint_folder(output_dir) or not self.args.should_save:
            return
        current = run_id(self.args.output_dir)
        if current is not None:
            write_run_id(output_dir, current, self.args.world_size)  # before trainer_state.json, written last
