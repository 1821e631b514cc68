"""Train a Bradley-Terry reward model on preference pairs: columns `chosen` and `rejected` (optionally `prompt`,
`chosen_prob` and `margin`), from a Hub dataset or a local json/jsonl/parquet/csv file or folder.

examples:
  # one process (CPU or one GPU)
  python -m hf_reinforce.scripts.reward --config recipes/qwen2.5-0.5b/reward/config_qlora.yaml
  # several GPUs
  accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \\
      -m hf_reinforce.scripts.reward --config recipes/qwen2.5-0.5b/reward/config_qlora.yaml

Flags given with --config override the recipe's values, e.g. --learning_rate 5e-5.
"""

from trl import ModelConfig, ScriptArguments, TrlParser

from hf_reinforce import RewardConfig, RewardTrainer
from hf_reinforce.scripts import make_script_parser, prepare_run, run_script, save_and_finish, train, trainer_inputs


def make_parser(prog: str | None = None) -> TrlParser:
    return make_script_parser((ScriptArguments, RewardConfig, ModelConfig), __doc__, prog)


def main(script_args: ScriptArguments, training_args: RewardConfig, model_args: ModelConfig):
    if model_args.use_peft and model_args.lora_task_type != "SEQ_CLS":
        # With any other task type PEFT neither trains nor saves the freshly initialised reward head, so the adapter
        # would score every text with random weights.
        raise ValueError(
            f"A reward model trained with LoRA needs lora_task_type='SEQ_CLS' (got {model_args.lora_task_type!r})."
        )
    dataset = prepare_run(script_args, training_args, model_args, local_paths=("dataset_name",))
    trainer = RewardTrainer(**trainer_inputs(dataset, script_args, training_args, model_args))
    train(trainer, training_args)
    save_and_finish(trainer, training_args, script_args.dataset_name, saved_what="Reward model")


if __name__ == "__main__":
    run_script(make_parser, main)
