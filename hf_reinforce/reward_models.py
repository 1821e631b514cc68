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

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from .engines import launched_engine
from .placement import POLICY_BASE, REWARD_ADAPTER, PlacementPlan, plan_placement
from .speedups.quantization import keep_4bit_layers_differentiable


REWARD_TRAINING_FILE = "reward_training.json"
# What must agree for two loads of a base to hold the same quantised weights
QUANTIZATION_KEYS = (
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
)


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


class _HeadLoadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def head_load_report_silenced():
    """Drop transformers' load report while a reward adapter's base loads.

    Why: the base has no score head, so transformers reports `score.weight | MISSING ... newly initialized`, but the
    adapter loaded next replaces that head with the trained one; the report would only alarm.
    """
    logger, report_filter = logging.getLogger("transformers.modeling_utils"), _HeadLoadReportFilter()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def load_reward_adapter(adapter_dir, quantization_config=None, model_init_kwargs=None, device=None):
    """A reward adapter folder loaded onto its base, quantised as at training time; returns (model, tokenizer)."""
    base_name = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    kwargs = {"num_labels": 1, **(model_init_kwargs or {})}
    kwargs.pop("quantization_config", None)
    quantization = training_quantization(adapter_dir, quantization_config)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device or "cpu"})  # 4-bit weights stay put
    with head_load_report_silenced():
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


def same_quantization(first, second) -> bool:
    """Whether two quantization configs (or None for full precision) give the same weights when loading a base."""
    if first is None or second is None:
        return first is None and second is None
    first, second = (q if isinstance(q, dict) else q.to_dict() for q in (first, second))
    return all(str(first.get(key)) == str(second.get(key)) for key in QUANTIZATION_KEYS)


def same_base(adapter_dir, policy_name_or_path) -> bool:
    """Whether a reward adapter folder was trained on the policy's base checkpoint."""
    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not isinstance(policy_name_or_path, str | Path):
        return False
    if Path(base).exists() and Path(policy_name_or_path).exists():
        return Path(base).resolve() == Path(policy_name_or_path).resolve()
    return base == str(policy_name_or_path)


def policy_base_name(model, peft_config) -> str | None:
    """The base checkpoint of a policy that will be a PEFT model, None otherwise."""
    if isinstance(model, PeftModel):
        return model.peft_config[model.active_adapter].base_model_name_or_path
    return str(model) if isinstance(model, str | Path) and peft_config is not None else None


class SharedRewardAdapter:
    """Stands in for a reward adapter folder that will sit on the policy's own base, until the policy exists."""

    def __init__(self, adapter_dir, tokenizer):
        self.adapter_dir, self.tokenizer = Path(adapter_dir), tokenizer
        self.__name__ = self.adapter_dir.name

    def __call__(self, **kwargs):
        raise RuntimeError("A reward adapter for the policy's base was not attached to it; this is a bug.")


def resolve_reward_models(
    reward_funcs,
    processing_classes,
    quantization_config,
    model_init_kwargs,
    device,
    share_with=None,
    plan: PlacementPlan | None = None,
):
    """Reward functions and processing classes with every reward adapter path loaded as it was trained and every
    `PeftModel` given its tokenizer (paths of full models are left for TRL, which loads them as they were saved).

    `share_with` is `(policy name or path, reward_shares_base)` when the policy will be a PEFT model: an adapter folder
    trained on that same base with the same quantization then becomes a `SharedRewardAdapter`, to be attached to the
    policy's base instead of loading a second copy of it, where `plan` (the trainer's `PlacementPlan`; else one made
    from `reward_shares_base` and the launched engine) puts reward adapters there.
    """
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
            if shares_policy_base(reward_func, quantization_config, share_with, index, plan):
                tokenizer = processing_classes[index] or adapter_tokenizer(reward_func)
                reward_funcs[index] = SharedRewardAdapter(reward_func, tokenizer)
                processing_classes[index] = None  # TRL passes plain functions no processing class
                continue
            reward_funcs[index], tokenizer = load_reward_adapter(
                reward_func, quantization_config, model_init_kwargs, device
            )
            processing_classes[index] = processing_classes[index] or tokenizer
        elif isinstance(reward_funcs[index], PeftModel) and processing_classes[index] is None:
            processing_classes[index] = tokenizer_for(reward_funcs[index], index)
    return reward_funcs, processing_classes


def shares_policy_base(adapter_dir, quantization_config, share_with, index: int, plan=None) -> bool:
    """Apply `reward_shares_base` through the placement plan: None shares when possible, True requires it, False
    never shares."""
    if share_with is None:
        return False  # the policy is not a PEFT model (give a `peft_config`)
    policy, reward_shares_base = share_with
    if plan is None:
        plan = plan_placement(policy_is_peft=True, reward_shares_base=reward_shares_base, engine=launched_engine())
    fits, why = reward_adapter_fits(adapter_dir, policy, quantization_config)
    plan.check_reward_fits(fits, why, f"reward_funcs[{index}]={str(adapter_dir)!r}")
    return plan.reward_joins(fits)


def reward_adapter_fits(adapter_dir, policy_name_or_path, quantization_config) -> tuple[bool, str]:
    """Whether a reward adapter folder can sit on the policy's base loaded with `quantization_config`: trained on that
    base checkpoint, quantised alike (as `reward_training.json` records; else taken to be); and why not."""
    if not same_base(adapter_dir, policy_name_or_path):
        return False, "it was trained on another base"
    if not same_quantization(training_quantization(adapter_dir, quantization_config), quantization_config):
        return False, "its base was quantised otherwise than the policy's"
    return True, ""


def adapter_tokenizer(adapter_dir):
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    return AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base)


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
        device = self.model.get_input_embeddings().weight.device
        rewards = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                padding_side="right",
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            ).to(device)
            rewards += self.scores(inputs).float().tolist()
        return rewards

    def scores(self, inputs) -> torch.Tensor:
        """The reward of each row of a tokenized batch (batch,)."""
        return self.model(**inputs).logits[:, 0]


class SharedBaseRewardScorer(RewardModelScorer):
    """A reward model that is an adapter (`reward`) and a score head on the policy's own base: one quantised base for
    policy, reference, critic and reward model. It computes what the reward model loaded on its own would: the
    decoder with the reward adapter active, the score head, read at the last non-padding token."""

    def __init__(self, policy: PeftModel, source, tokenizer, eos_token_ids, name: str, batch_size: int = 8):
        self.source = source  # the reward adapter folder or model, which a critic may start from
        self.score_head = attach_reward_adapter(policy, source)
        super().__init__(policy, tokenizer, eos_token_ids, name, batch_size)

    def scores(self, inputs) -> torch.Tensor:
        with active_adapter(self.model, REWARD_ADAPTER):
            decoder = self.model.get_base_model().base_model
            hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        logits = self.score_head(hidden.to(self.score_head.weight.dtype)).squeeze(-1)  # (batch, seq)
        # as transformers' sequence classifiers pool: the last position that is not the pad token
        not_pad = (inputs["input_ids"] != self.tokenizer.pad_token_id).int()
        last = (torch.arange(not_pad.size(1), device=not_pad.device) * not_pad).argmax(-1)
        return logits[torch.arange(len(logits), device=logits.device), last]


@contextlib.contextmanager
def active_adapter(model: PeftModel, adapter_name: str):
    previous = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def reward_adapter_weights(source) -> tuple[object, dict[str, torch.Tensor], torch.Tensor]:
    """(LoRA config, LoRA weights, score-head weight) of a reward adapter folder or a loaded reward `PeftModel`."""
    if isinstance(source, PeftModel):
        config = source.peft_config[source.active_adapter]
        state = get_peft_model_state_dict(source, adapter_name=source.active_adapter)
    else:
        config = PeftConfig.from_pretrained(str(source))
        state = load_file(Path(source) / "adapter_model.safetensors")
    head = [value for key, value in state.items() if key.endswith((".score.weight", ".classifier.weight"))]
    if len(head) != 1 or head[0].size(0) != 1:
        raise ValueError(
            f"The reward adapter {source} holds no one-output score head (saved in `modules_to_save`) to score with."
        )
    return config, {key: value for key, value in state.items() if "lora_" in key}, head[0]


def attach_reward_adapter(policy: PeftModel, source) -> torch.nn.Linear:
    """Add a reward adapter to the policy's base as a frozen adapter named `reward`; return its score head."""
    config, lora_weights, head_weight = reward_adapter_weights(source)
    config = copy.deepcopy(config)
    config.task_type, config.modules_to_save, config.inference_mode = None, None, True
    policy.add_adapter(REWARD_ADAPTER, config)
    result = set_peft_model_state_dict(policy, lora_weights, adapter_name=REWARD_ADAPTER)
    if result.unexpected_keys:
        raise ValueError(f"The reward adapter does not fit the policy's base: {result.unexpected_keys[:3]} ...")
    policy.set_adapter("default")  # the policy's adapter stays the trained one
    for name, parameter in policy.named_parameters():
        if f".{REWARD_ADAPTER}." in name:
            parameter.requires_grad_(False)
    device = policy.get_input_embeddings().weight.device
    head = torch.nn.Linear(head_weight.size(1), 1, bias=False, dtype=torch.float32, device=device)
    with torch.no_grad():
        head.weight.copy_(head_weight)
    return head.requires_grad_(False)


def unwrap_scorer(reward_func):
    """The model inside a `RewardModelScorer`, or the reward function itself."""
    return reward_func.model if isinstance(reward_func, RewardModelScorer) else reward_func


def is_reward_model(reward_func) -> bool:
    return isinstance(unwrap_scorer(reward_func), PreTrainedModel | PeftModel)


def shares_base_weights(model_a, model_b) -> bool:
    """Whether two (PEFT) models sit on the same base weights: same architecture sizes and input embeddings."""
    base_a = model_a.get_base_model() if isinstance(model_a, PeftModel) else model_a
    base_b = model_b.get_base_model() if isinstance(model_b, PeftModel) else model_b
    config_a, config_b = base_a.config.get_text_config(), base_b.config.get_text_config()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(config_a, key, None) != getattr(config_b, key, None):
            return False
    embeddings_a, embeddings_b = base_a.get_input_embeddings().weight, base_b.get_input_embeddings().weight
    return embeddings_a.shape == embeddings_b.shape and torch.equal(embeddings_a.cpu(), embeddings_b.cpu())


def joins_policy_base(
    reward_func, policy, reward_shares_base: bool | None, base_is_sharded: bool, plan: PlacementPlan | None = None
) -> bool:
    """A loaded reward `PeftModel` on the policy's own base weights, quantised alike, where the placement plan (made
    from `reward_shares_base` and `base_is_sharded` when not given) puts reward adapters on the policy's base."""
    if plan is None:
        engine = "zero3" if base_is_sharded else None  # any engine that shards the base places alike
        plan = plan_placement(
            policy_is_peft=isinstance(policy, PeftModel), reward_shares_base=reward_shares_base, engine=engine
        )
    if plan.reward.base != POLICY_BASE or not isinstance(policy, PeftModel) or not isinstance(reward_func, PeftModel):
        return False
    if not shares_base_weights(policy, reward_func):
        return False
    bases = (policy.get_base_model(), reward_func.get_base_model())
    return plan.reward_joins(same_quantization(*(getattr(base.config, "quantization_config", None) for base in bases)))


def as_scorer(trainer, index: int, reward_func, policy):
    """Reward function `index` of a `ReinforceTrainer` as it scores: a reward model scores texts as `RewardTrainer`
    trained it on them, never a cut-off completion as if it had ended, and a reward adapter trained on the policy's
    base joins it there (where the trainer's `placement` plan puts reward adapters) rather than holding a second copy
    of the base. Other reward functions are left as they are."""
    settings = {
        "eos_token_ids": trainer.eos_token_ids,
        "name": trainer.reward_func_names[index],
        "batch_size": trainer.args.per_device_train_batch_size,
    }
    shared = isinstance(reward_func, SharedRewardAdapter)
    plan = trainer.placement
    if shared or joins_policy_base(reward_func, policy, trainer.args.reward_shares_base, plan.base_is_sharded, plan):
        source = reward_func.adapter_dir if shared else reward_func
        tokenizer = (reward_func.tokenizer if shared else None) or trainer.reward_processing_classes[index]
        return SharedBaseRewardScorer(policy, source, tokenizer, **settings)
    if not isinstance(reward_func, torch.nn.Module):
        return reward_func
    if isinstance(reward_func, PeftModel) and not getattr(reward_func, "is_loaded_in_4bit", False):
        reward_func.to(trainer.accelerator.device)  # TRL places only transformers models
    return RewardModelScorer(reward_func, trainer.reward_processing_classes[index], **settings)
