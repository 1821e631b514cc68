"""
Training scripts, each runnable as `python -m hf_reinforce.scripts.<name>` or
`accelerate launch -m hf_reinforce.scripts.<name>`, and through the `hf-reinforce` CLI.

This module holds what both scripts share besides dataset loading (which lives in `data.py`).
"""

import argparse
import gc
import os

from trl import TrlParser


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of a script's description (its example commands) and shows every flag's default."""


def cpu_threads_per_process() -> int:
    """`OMP_NUM_THREADS` when set, else the cores this process may use (shared among the launched processes) less
    one, at least one.

    PyTorch's default, one thread per core in every process, oversubscribes a machine that runs anything else: each
    operation's threads then wait for the slowest of them, and a step can take ten times as long.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // processes - 1)


def set_cpu_threads() -> int:
    import torch

    threads = cpu_threads_per_process()
    torch.set_num_threads(threads)
    return threads


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
    """The end both scripts share: report every process, save, push when asked, then release the process group.

    A run that took no optimizer step saves nothing: an untrained model would replace whatever output_dir held.
    """
    report_process(trainer)
    if trainer.state.global_step == 0:
        release_process_group(trainer)
        raise RuntimeError(
            f"The run took no optimizer step, so nothing was saved to {training_args.output_dir}. Check that the "
            "training data has at least one batch and that max_steps or num_train_epochs is positive."
        )
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"{saved_what} saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    release_process_group(trainer)


def release_process_group(trainer) -> None:
    """Destroy the process group only after every DistributedDataParallel wrapper or DeepSpeed engine is gone (FSDP2
    shards the model in place and leaves no wrapper).

    Why: a wrapper that outlives the group is freed at interpreter exit, and its reducer's destructor then waits on
    gloo threads whose peers have already left, so a finished run never exits.
    """
    if trainer.accelerator.num_processes > 1:
        trainer.model_wrapped = trainer.model
        trainer.deepspeed = None  # a DeepSpeed engine holds its own reducer and communication buffers
        trainer.accelerator._models.clear()
        trainer.accelerator.deepspeed_engine_wrapped = None
        gc.collect()
        trainer.accelerator.wait_for_everyone()
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
