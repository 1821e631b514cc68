"""
Training scripts, each runnable as `python -m hf_reinforce.scripts.<name>` or
`accelerate launch -m hf_reinforce.scripts.<name>`, and through the `hf-reinforce` CLI.

This module holds what both scripts share besides dataset loading (which lives in `data.py`).
"""

import argparse

from trl import TrlParser


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of a script's description (its example commands) and shows every flag's default."""


def model_init_kwargs(model_args, training_args) -> dict:
    """
    `from_pretrained` keyword arguments taken from the [`trl.ModelConfig`] flags, updated with the training config's
    own `model_init_kwargs` (which therefore win).
    """
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def report_process(trainer) -> None:
    """
    Print one line from every process (the trainer's own logs come from the main process only), so the output of a
    multi-process run shows that each rank took part and how far it got.
    """
    state = trainer.accelerator.state
    print(
        f"[process {state.process_index + 1}/{state.num_processes}] finished {trainer.state.global_step} optimizer "
        f"steps on {state.device} ({state.distributed_type})",
        flush=True,
    )


def save_and_finish(trainer, training_args, dataset_name: str | None, saved_what: str) -> None:
    """The end both scripts share: report every process, save, push when asked, then release the process group."""
    report_process(trainer)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"{saved_what} saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    trainer.end()


def make_script_parser(dataclass_types: tuple, description: str, prog: str | None = None) -> TrlParser:
    return TrlParser(
        dataclass_types,
        prog=prog,
        # The help lists every flag below; the generated usage line would list them all a second time.
        usage="%(prog)s [--config RECIPE.yaml] [--FLAG VALUE ...]",
        description=description,
        formatter_class=HelpFormatter,
    )
