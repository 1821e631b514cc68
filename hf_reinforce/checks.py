"""Checks of user input that would otherwise fail far from its cause, each naming the field and the fix."""

from pathlib import Path

from datasets import Dataset, IterableDataset


def looks_like_local_path(name_or_path: str) -> bool:
    """True for what cannot be a Hub id: an absolute path, one starting with `.` or `~`, or one with more than one
    `/` (Hub ids are `name` or `owner/name`)."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def check_local_path(name_or_path, field: str) -> None:
    """Refuse a local path that does not exist, before a loader reports it as a malformed Hub id."""
    if isinstance(name_or_path, str | Path) and looks_like_local_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            hint = " (the tiny models are written by `hf-reinforce make-tiny`)" if "tiny" in str(path) else ""
            raise FileNotFoundError(
                f"{field}={str(name_or_path)!r}: no such file or folder{hint}. Check the path, or give a Hub id "
                "(`owner/name`)."
            )


def check_prompt_dataset(dataset, dataset_name: str) -> None:
    """Raise a `ValueError` naming the row or column and the fix when `dataset` holds no usable prompts.

    An `IterableDataset` (streaming) is checked for its columns only.
    """
    if dataset is None or not isinstance(dataset, Dataset | IterableDataset):
        return
    columns = dataset.column_names
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"The {dataset_name} dataset has no `prompt` column (its columns: {columns}); REINFORCE generates "
            "completions of those prompts. Rename yours, e.g. `dataset = dataset.rename_column('question', 'prompt')`."
        )
    if isinstance(dataset, IterableDataset):
        return
    for index, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str | list):
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset has a `prompt` of type {type(prompt).__name__} "
                f"({prompt!r}); a prompt is a text or a list of chat messages. Fix or drop that row."
            )
        if len(prompt) == 0:
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset has an empty `prompt`; give every row some text to "
                "complete, or drop such rows, e.g. `dataset.filter(lambda row: row['prompt'])`."
            )


def check_enough_prompts(dataset, args) -> None:
    """Raise a `ValueError` when `dataset` has fewer prompts than one batch of rollouts takes: not one step would
    run (RLOO's sampler drops an incomplete batch), and the run would end with the untrained model."""
    needed = args.generation_batch_size // args.num_generations
    if isinstance(dataset, Dataset) and len(dataset) < needed:
        raise ValueError(
            f"The train dataset has {len(dataset)} prompt(s), but one batch of rollouts needs {needed} different "
            "prompts (generation_batch_size / num_generations), so not one step would run. Add prompts, or lower "
            "`per_device_train_batch_size` or `steps_per_generation`, or raise `num_generations`."
        )


def check_reinforce_inputs(model, reward_funcs, value_model, train_dataset, eval_dataset, args) -> None:
    """Missing local folders, unusable prompt datasets and a critic without a use, refused before any model loads."""
    if value_model is not None and args.baseline != "critic":
        raise ValueError(f"value_model is only used with baseline='critic', but baseline={args.baseline!r}.")
    check_local_path(model, "model")
    check_local_path(value_model, "value_model")
    check_prompt_dataset(train_dataset, "train")
    for name, dataset in (eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}).items():
        check_prompt_dataset(dataset, name)
    for index, reward_func in enumerate(reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]):
        check_local_path(reward_func, f"reward_funcs[{index}]")


def check_text_prompts(inputs: list[dict]) -> None:
    """Refuse prompts with images: the REINFORCE step forwards token ids only."""
    if any(row.get("image") is not None or row.get("images") for row in inputs):
        raise ValueError(
            "The dataset's rows carry `image`/`images`, but ReinforceTrainer trains on text prompts only; drop those "
            "columns, or use trl.RLOOTrainer for vision-language models."
        )
