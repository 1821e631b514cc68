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

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from hf_reinforce import RewardConfig, RewardTrainer
from hf_reinforce.checkpoints import check_output_dir
from hf_reinforce.checks import check_local_path
from hf_reinforce.engines import check_engine_engaged, check_quantization_for_engine, engage_fsdp_on_cpu
from hf_reinforce.scripts import make_script_parser, model_init_kwargs, save_and_finish, set_cpu_threads
from hf_reinforce.scripts.data import eval_split, load_script_dataset


def main(script_args: ScriptArguments, training_args: RewardConfig, model_args: ModelConfig):
    if model_args.use_peft and model_args.lora_task_type != "SEQ_CLS":
        # With any other task type PEFT neither trains nor saves the freshly initialised reward head, so the adapter
        # would score every text with random weights.
        raise ValueError(
            f"A reward model trained with LoRA needs lora_task_type='SEQ_CLS' (got {model_args.lora_task_type!r})."
        )
    check_local_path(model_args.model_name_or_path, "model_name_or_path")
    check_quantization_for_engine(model_args)
    check_local_path(script_args.dataset_name, "dataset_name")
    check_output_dir(training_args)
    set_cpu_threads()
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    dataset = load_script_dataset(script_args)
    trainer = RewardTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_split(dataset, script_args, training_args),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    engage_fsdp_on_cpu(trainer)
    check_engine_engaged(trainer.accelerator)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_and_finish(trainer, training_args, script_args.dataset_name, saved_what="Reward model")


def make_parser(prog: str | None = None) -> TrlParser:
    return make_script_parser((ScriptArguments, RewardConfig, ModelConfig), __doc__, prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
