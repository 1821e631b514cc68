"""Fine-tune a causal LM with REINFORCE against a reward model, on prompts (column `prompt`) from a Hub dataset
or a local json/jsonl/parquet/csv file or folder.

examples:
  # one process (CPU or one GPU)
  python -m hf_reinforce.scripts.reinforce --config recipes/qwen2.5-0.5b/reinforce/config_qlora.yaml
  # several GPUs: the critic cannot share the policy's base across processes, so it becomes its own model
  accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \\
      -m hf_reinforce.scripts.reinforce --config recipes/qwen2.5-0.5b/reinforce/config_qlora.yaml \\
      --critic_shares_base false

Flags given with --config override the recipe's values, e.g. --baseline rloo --num_generations 4.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.scripts import make_script_parser, model_init_kwargs, save_and_finish
from hf_reinforce.scripts.data import eval_split, load_script_dataset


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
            "model is read from adapter_config.json). It is loaded with the policy's `dtype` and 4/8-bit settings."
        },
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model to build the critic from when `baseline=critic`: a Hub id or a local folder, given a value "
            "head. When unset the trainer builds it: a second LoRA adapter on the policy's base with "
            "`critic_shares_base` (one process only), else from the reward model or the policy."
        },
    )


def load_reward_model(
    name_or_path: str, model_args: ModelConfig, training_args: ReinforceConfig
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """
    Load a reward model and its tokenizer, loaded with the policy's `dtype` and quantization.

    A LoRA adapter folder is applied to its base model. Without quantization the adapter is merged, giving a plain
    model the trainer can place on each device; with 4/8-bit weights it stays a separate layer, because merging would
    round the (small) LoRA update into the quantization grid.
    """
    quantization_config = get_quantization_config(model_args)
    load_kwargs = dict(
        num_labels=1,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype),
    )
    if quantization_config is not None:
        # Quantized weights cannot be moved once loaded, so they go straight to this process's device.
        load_kwargs.update(quantization_config=quantization_config, device_map={"": training_args.device})

    folder = Path(name_or_path)
    if (folder / "adapter_config.json").is_file():
        base_name_or_path = PeftConfig.from_pretrained(name_or_path).base_model_name_or_path
        base_model = AutoModelForSequenceClassification.from_pretrained(base_name_or_path, **load_kwargs)
        model = PeftModel.from_pretrained(base_model, name_or_path)
        if quantization_config is None:
            model = model.merge_and_unload()
        # An adapter saved without its tokenizer scores text tokenized like its base model.
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(name_or_path if has_tokenizer else base_name_or_path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The reward is read at the last non-padding token, found through the config's pad token id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def main(script_args: ReinforceScriptArguments, training_args: ReinforceConfig, model_args: ModelConfig):
    if script_args.reward_model_name_or_path is None:
        raise ValueError("Set `reward_model_name_or_path`: REINFORCE needs a reward model to score the completions.")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    reward_model, reward_tokenizer = load_reward_model(
        script_args.reward_model_name_or_path, model_args, training_args
    )
    dataset = load_script_dataset(script_args)
    trainer = ReinforceTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_split(dataset, script_args, training_args),
        reward_processing_classes=reward_tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        value_model=script_args.value_model_name_or_path,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_and_finish(trainer, training_args, script_args.dataset_name, saved_what="Policy")


def make_parser(prog: str | None = None) -> TrlParser:
    return make_script_parser((ReinforceScriptArguments, ReinforceConfig, ModelConfig), __doc__, prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
