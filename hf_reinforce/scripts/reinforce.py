"""Fine-tune a causal LM with REINFORCE against a reward model, on prompts (column `prompt`) from a Hub dataset
or a local json/jsonl/parquet/csv file or folder.

examples:
  # one process (CPU or one GPU)
  python -m hf_reinforce.scripts.reinforce --config recipes/qwen2.5-0.5b/reinforce/config_qlora.yaml
  # several GPUs (DDP: the critic stays an adapter on each process's copy of the policy's base)
  accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 4 \\
      -m hf_reinforce.scripts.reinforce --config recipes/qwen2.5-0.5b/reinforce/config_qlora.yaml

Flags given with --config override the recipe's values, e.g. --baseline rloo --num_generations 4.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.checks import check_local_path
from hf_reinforce.engines import load_models_whole_on_every_process
from hf_reinforce.reinforce_trainer import check_enough_prompts
from hf_reinforce.scripts import (
    make_script_parser,
    prepare_run,
    run_script,
    save_and_finish,
    train,
    trainer_inputs,
)


@dataclass
class ReinforceScriptArguments(ScriptArguments):
    """
    Script arguments of the REINFORCE script: the dataset flags of [`trl.ScriptArguments`] plus the reward and value
    models.
    """

    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Sequence-classification reward model scoring each prompt + completion: a Hub id, a folder saved "
            "with `save_pretrained`, or the LoRA adapter folder written by `hf-reinforce reward --use_peft` (its base "
            "model is read from adapter_config.json and quantised as it was during reward training)."
        },
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model to build the critic from when `baseline=critic`: a Hub id or a local folder, given a value "
            "head. When unset the trainer builds it: a second LoRA adapter on the policy's base with "
            "`critic_shares_base` (unless ZeRO-3 or FSDP shards that base), else from the reward model or the policy."
        },
    )


def make_parser(prog: str | None = None) -> TrlParser:
    return make_script_parser((ReinforceScriptArguments, ReinforceConfig, ModelConfig), __doc__, prog)


def main(script_args: ReinforceScriptArguments, training_args: ReinforceConfig, model_args: ModelConfig):
    if script_args.reward_model_name_or_path is None:
        raise ValueError("Set `reward_model_name_or_path`: REINFORCE needs a reward model to score the completions.")
    for name in ("reward_model_name_or_path", "value_model_name_or_path", "dataset_name"):
        check_local_path(getattr(script_args, name), name)
    dataset = prepare_run(script_args, training_args, model_args)
    load_models_whole_on_every_process()
    check_enough_prompts(dataset[script_args.dataset_train_split], training_args)  # before any model loads
    trainer = ReinforceTrainer(
        # A reward adapter goes back onto its base quantised as at training time; a full model loads as saved
        reward_funcs=script_args.reward_model_name_or_path,
        value_model=script_args.value_model_name_or_path,
        **trainer_inputs(dataset, script_args, training_args, model_args),
    )
    train(trainer, training_args)
    save_and_finish(trainer, training_args, script_args.dataset_name, saved_what="Policy")


if __name__ == "__main__":
    run_script(make_parser, main)
