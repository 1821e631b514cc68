"""Checkpoints a run can resume from, and the trainer behaviour that keeps them so.

The trainer writes `trainer_state.json` last: a `checkpoint-<step>` folder without a readable one was cut off while
being written (a killed run) and is never resumed from. `resume_from_checkpoint=True` (or "true") picks the newest
complete checkpoint, "auto" the same or a fresh start.
"""

import json
from pathlib import Path

from safetensors import safe_open


TRAINER_STATE = "trainer_state.json"
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
    for weights in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as reader:
                reader.keys()
        except Exception:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            return f"{weights.relative_to(folder)} is cut off or damaged"
    return None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [child for child in output_dir.iterdir() if child.is_dir() and checkpoint_step(child) is not None]
    return sorted(folders, key=checkpoint_step)


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    for folder in reversed(checkpoint_folders(output_dir)):
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


class ResumableMixin:
    """Checkpoint handling shared by the trainers: a run resumes only from a complete checkpoint written by the same
    kind of run, and a checkpoint being rewritten never looks complete."""

    # `True` or "true" means the newest *complete* checkpoint (transformers would take the newest folder, even one
    # cut off by a kill), and a checkpoint of another kind of run is refused before any weight is loaded
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self._check_resumable(Path(checkpoint))
        return super().train(checkpoint, *args, **kwargs)

    def _check_resumable(self, checkpoint: Path) -> None:
        """Raise a ValueError naming `checkpoint` when this trainer cannot resume from it."""

    # A run resumed from an earlier step rewrites later checkpoints: the old trainer state goes first, so that a kill
    # during the rewrite leaves a folder that reads as incomplete
    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        if self.args.should_save:
            (folder / TRAINER_STATE).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
