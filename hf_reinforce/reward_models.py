"""The reward model at scoring time is the model that was trained, however it is handed to `ReinforceTrainer`.

A path to a LoRA reward adapter, a path to a full or merged model, a loaded `PeftModel` (4-bit or not), a
`PreTrainedModel`, or the CLI's `--reward_model_name_or_path`: in every case the trainer scores with

1. **the same weights** — an adapter goes back onto its base quantised as during training (`RewardTrainer` records
   the quantization in `reward_training.json` beside the adapter; for an adapter trained elsewhere, the trainer's own
   `quantization_config` is used), never merged into a base of another precision;
2. **the same text** — a finished completion is scored as `RewardTrainer` trained on it: prompt + completion + EOS
   (plain text) or the chat template's rendering of the conversation, tokenized with the tokenizer's special tokens,
   and read at the same position (the last non-padding token, found through the tokenizer's pad token);
3. **no fake ending** — a completion cut at `max_completion_length` is scored without the EOS or end-of-turn that would
   claim it finished, so a reward model cannot be pleased by text that never ends (`missing_eos_penalty` can further
   lower its reward).
"""

import json
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from .quantization import keep_4bit_layers_differentiable


REWARD_TRAINING_FILE = "reward_training.json"


def record_reward_training(model, output_dir: str | Path) -> None:
    """Write how a reward model's base was loaded (its quantization), so that an adapter goes back onto the same."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    quantization = getattr(base.config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    record = {"quantization_config": quantization}
    (Path(output_dir) / REWARD_TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


def is_adapter_folder(name_or_path) -> bool:
    return isinstance(name_or_path, str | Path) and (Path(name_or_path) / "adapter_config.json").is_file()


def training_quantization(adapter_dir: str | Path, fallback: BitsAndBytesConfig | None) -> BitsAndBytesConfig | None:
    """The quantization the adapter's base had during training, or `fallback` when it was not recorded."""
    record_path = Path(adapter_dir) / REWARD_TRAINING_FILE
    if not record_path.is_file():
        return fallback
    recorded = json.loads(record_path.read_text())["quantization_config"]
    return None if recorded is None else BitsAndBytesConfig.from_dict(recorded)


def load_reward_adapter(adapter_dir, quantization_config=None, model_init_kwargs=None, device=None):
    """A reward adapter folder loaded onto its base, quantised as at training time; returns (model, tokenizer)."""
    base_name = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    kwargs = {"num_labels": 1, **(model_init_kwargs or {})}
    kwargs.pop("quantization_config", None)
    quantization = training_quantization(adapter_dir, quantization_config)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device or "cpu"})  # 4-bit weights stay put
    base = AutoModelForSequenceClassification.from_pretrained(base_name, **kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base_name)
    return model, tokenizer


def tokenizer_for(reward_model, index: int):
    """The tokenizer of a reward model handed over without one: its base model's, or a clear error."""
    config = reward_model.peft_config[reward_model.active_adapter] if isinstance(reward_model, PeftModel) else None
    name = config.base_model_name_or_path if config is not None else reward_model.config._name_or_path
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"reward_funcs[{index}] is a {type(reward_model).__name__} without a tokenizer, and none could be loaded "
            f"from its base {name!r} ({error}). Pass the tokenizer it was trained with: "
            "`ReinforceTrainer(..., reward_processing_classes=tokenizer)`, or the reward model's folder as a path."
        ) from error


def resolve_reward_models(reward_funcs, processing_classes, quantization_config, model_init_kwargs, device):
    """Reward functions and processing classes with every reward adapter path loaded as it was trained and every
    `PeftModel` given its tokenizer (paths of full models are left for TRL, which loads them as they were saved)."""
    reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list) else [reward_funcs]
    if processing_classes is None:
        processing_classes = [None] * len(reward_funcs)
    elif not isinstance(processing_classes, list):
        processing_classes = [processing_classes]
    processing_classes = list(processing_classes)
    if len(processing_classes) != len(reward_funcs):
        raise ValueError(
            f"reward_processing_classes has {len(processing_classes)} entries for {len(reward_funcs)} reward "
            "functions; give one per reward function (None for plain functions)."
        )
    for index, reward_func in enumerate(reward_funcs):
        if is_adapter_folder(reward_func):
            reward_funcs[index], tokenizer = load_reward_adapter(
                reward_func, quantization_config, model_init_kwargs, device
            )
            processing_classes[index] = processing_classes[index] or tokenizer
        elif isinstance(reward_funcs[index], PeftModel) and processing_classes[index] is None:
            processing_classes[index] = tokenizer_for(reward_funcs[index], index)
    return reward_funcs, processing_classes


class RewardModelScorer:
    """A sequence-classification reward model as a reward function that scores texts as it was trained on them.

    Args:
        model: the reward model (`PreTrainedModel` or `PeftModel`), already on its device.
        tokenizer: the tokenizer it was trained with.
        eos_token_ids: the ids that end a completion (a completion without one was cut at the length limit).
        name: the name its rewards are logged under.
        batch_size: texts per forward pass.
    """

    def __init__(self, model, tokenizer, eos_token_ids, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_token_ids = set(eos_token_ids)
        self.__name__ = name
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The model reads the last non-padding token, found through the config's pad token id, as in training
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        keep_4bit_layers_differentiable(model)  # the same 4-bit kernel as during training, to the last digit

    def finished(self, completion_ids) -> list[bool]:
        return [bool(ids) and ids[-1] in self.eos_token_ids for ids in completion_ids]

    def texts(self, prompts, completions, finished: list[bool]) -> list[str]:
        """The texts as `RewardTrainer` tokenizes them, without a closing EOS or end-of-turn where unfinished."""
        if isinstance(prompts[0], list):  # conversational: the chat template renders the whole conversation
            return [
                self.tokenizer.apply_chat_template(
                    prompt + completion, tokenize=False, continue_final_message=not done
                )
                for prompt, completion, done in zip(prompts, completions, finished, strict=True)
            ]
        eos = self.tokenizer.eos_token
        return [
            prompt + completion + (eos if done and not completion.endswith(eos) else "")
            for prompt, completion, done in zip(prompts, completions, finished, strict=True)
        ]

    @torch.inference_mode()
    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        texts = self.texts(prompts, completions, self.finished(completion_ids))
        # Chat templates carry their own special tokens; plain text gets the tokenizer's, as in `RewardTrainer`
        add_special_tokens = not isinstance(prompts[0], list)
        device = next(self.model.parameters()).device
        rewards = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                padding_side="right",
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            ).to(device)
            rewards += self.model(**inputs).logits[:, 0].float().tolist()
        return rewards


def unwrap_scorer(reward_func):
    """The model inside a `RewardModelScorer`, or the reward function itself."""
    return reward_func.model if isinstance(reward_func, RewardModelScorer) else reward_func


def is_reward_model(reward_func) -> bool:
    return isinstance(unwrap_scorer(reward_func), PreTrainedModel | PeftModel)
