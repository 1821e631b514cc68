"""Model cards for Hub pushes: base model, method, key settings, final metrics, how to load the result, citations."""

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from trl.trainer.utils import get_config_model_id

from .reinforce_config import ReinforceConfig


BASELINE_DESCRIPTIONS = {
    "critic": "V(s_t), a value-head critic trained alongside the policy to regress the return",
    "rloo": "the mean reward of the other completions of the same prompt (leave-one-out, as in RLOO)",
    "mean": "the mean reward of the batch",
    "none": "no baseline (vanilla REINFORCE: A_t = G_t)",
}
# Logged keys reported on the card, by trainer: the last logged value of each that was logged at all.
REINFORCE_METRICS = (
    "reward",
    "reward_std",
    "objective/rlhf_reward",
    "kl",
    "entropy",
    "critic/explained_variance",
    "critic/value_loss",
    "completions/mean_length",
)
REWARD_METRICS = ("accuracy", "soft_accuracy", "margin", "loss", "eval_accuracy", "eval_soft_accuracy", "eval_loss")
CITATIONS = {
    "REINFORCE": """\
@article{williams1992simple,
  title   = {Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning},
  author  = {Williams, Ronald J.},
  journal = {Machine Learning},
  volume  = {8},
  number  = {3--4},
  pages   = {229--256},
  year    = {1992}
}""",
    # Raw: the accents are LaTeX escapes
    "RLOO": r"""@inproceedings{ahmadian2024back,
  title     = {{Back to Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback in LLMs}},
  author    = {Ahmadian, Arash and Cremer, Chris and Gall{\'{e}}, Matthias and Fadaee, Marzieh and Kreutzer, Julia and
               Pietquin, Olivier and {\"{U}}st{\"{u}}n, Ahmet and Hooker, Sara},
  booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics (ACL)},
  pages     = {12248--12267},
  year      = {2024}
}""",
    "the Bradley-Terry model": """\
@article{bradley1952rank,
  title   = {Rank Analysis of Incomplete Block Designs: I. The Method of Paired Comparisons},
  author  = {Bradley, Ralph Allan and Terry, Milton E.},
  journal = {Biometrika},
  volume  = {39},
  number  = {3/4},
  pages   = {324--345},
  year    = {1952}
}""",
    "TRL": """\
@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and
             Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}""",
}


class ModelCardMixin:
    """
    Writes `README.md` in `output_dir` for [`ReinforceTrainer`] and [`RewardTrainer`]: put it first among a trainer's
    bases. `push_to_hub` (and each checkpoint save) calls `create_model_card` after saving the model, so the card
    uploaded with the weights describes them: base model, method, key hyperparameters, LoRA and quantization, the
    last logged metrics, how to load the policy, critic or reward model, and what to cite.
    """

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ):
        if not self.is_world_process_zero():
            return
        is_reinforce = isinstance(self.args, ReinforceConfig)
        base_model = get_config_model_id(self.model.config)
        is_adapter = isinstance(self.model, PeftModel)
        tags = {tags} if isinstance(tags, str) else set(tags or [])
        tags |= {"hf_reinforce", "trl", "reinforce" if is_reinforce else "reward-model", *self._tag_names}
        card_data = ModelCardData(
            # The Hub only accepts a Hub id here; a local base model is named in the text instead
            base_model=base_model if base_model and not os.path.isdir(base_model) else None,
            datasets=[dataset_name] if dataset_name else None,
            library_name="peft" if is_adapter else "transformers",
            model_name=model_name,
            pipeline_tag="text-generation" if is_reinforce else "text-classification",
            tags=sorted(tags),
        )
        repo = self.hub_model_id or self.args.output_dir
        sections = [
            f"# {model_name or Path(self.args.output_dir).name}",
            self._card_summary(is_reinforce, base_model, is_adapter, dataset_name),
            "## Training settings\n\n" + _table(("setting", "value"), self._card_settings(is_reinforce)),
            "## Final metrics\n\n" + self._card_metrics(is_reinforce),
            "## How to load it\n\n" + self._card_usage(is_reinforce, base_model, is_adapter, repo),
            "## Citations\n\n"
            + _citations(["REINFORCE", "RLOO", "TRL"] if is_reinforce else ["the Bradley-Terry model", "TRL"]),
        ]
        card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
        card.save(Path(self.args.output_dir) / "README.md")

    def _card_summary(self, is_reinforce: bool, base_model: str, is_adapter: bool, dataset_name: str | None) -> str:
        what = "A LoRA adapter for" if is_adapter else "A fine-tuned version of"
        on_data = (
            f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset" if dataset_name else ""
        )
        if is_reinforce:
            method = (
                "REINFORCE with a baseline: the policy minimises `−Σ_t A_t · log π(a_t|s_t)` with `A_t = G_t − b_t`, "
                f"where `G_t` is the return (reward minus `beta`·KL to the reference) and the baseline `b_t` is "
                f"{BASELINE_DESCRIPTIONS[self.args.baseline]}"
            )
            if self.value_model is not None:
                method += ". The critic is saved in `value_model/`"
        else:
            method = (
                "a Bradley-Terry reward model: one scalar reward r per text, trained on preference pairs to minimise "
                "`−p·log σ(r_chosen − r_rejected) − (1 − p)·log σ(r_rejected − r_chosen)`, where `p` is the "
                "probability that `chosen` is preferred (1 unless the data gives soft labels in `chosen_prob`)"
            )
        return (
            f"{what} `{base_model}`{on_data}, trained with `hf_reinforce` on "
            f"[TRL](https://github.com/huggingface/trl) as {method}."
        )

    def _card_settings(self, is_reinforce: bool) -> list[tuple[str, object]]:
        args = self.args
        settings = [("learning rate", args.learning_rate)]
        if is_reinforce:
            settings += [
                ("baseline", args.baseline),
                ("beta (KL coefficient)", self.beta),
                ("num_generations", args.num_generations),
                ("gamma", args.gamma),
                ("max_completion_length", args.max_completion_length),
                ("temperature", args.temperature),
                ("normalize_advantages", args.normalize_advantages),
            ]
            if self.value_model is not None:
                settings += [
                    ("critic learning rate", args.critic_learning_rate),
                    ("critic warm-up steps", args.critic_warmup_steps),
                    ("critic epochs per batch", args.critic_epochs),
                    ("critic shares the policy's base", self.value_model.adapter_name is not None),
                ]
        else:
            settings += [
                ("max_length", args.max_length),
                ("center_rewards_coefficient", args.center_rewards_coefficient),
            ]
        settings += [
            ("per-device batch size", args.per_device_train_batch_size),
            ("gradient accumulation steps", args.gradient_accumulation_steps),
            ("optimizer steps", self.state.global_step),
            ("seed", args.seed),
        ]
        if isinstance(self.model, PeftModel):
            lora = self.model.peft_config["default"]
            target_modules = ", ".join(sorted(lora.target_modules)) if lora.target_modules else None
            settings += [("LoRA r / alpha", f"{lora.r} / {lora.lora_alpha}"), ("LoRA target modules", target_modules)]
        settings.append(("quantization", _describe_quantization(self.model.config)))
        return settings

    def _card_metrics(self, is_reinforce: bool) -> str:
        keys = REINFORCE_METRICS if is_reinforce else REWARD_METRICS
        latest = {}
        for entry in self.state.log_history:
            latest.update({key: entry[key] for key in keys if entry.get(key) is not None})
        if not latest:
            return "No metrics were logged."
        rows = [(key, f"{latest[key]:.4g}") for key in keys if key in latest]
        return f"Last logged values, after {self.state.global_step} optimizer steps.\n\n" + _table(
            ("metric", "value"), rows
        )

    def _card_usage(self, is_reinforce: bool, base_model: str, is_adapter: bool, repo: str) -> str:
        model_class = "AutoModelForCausalLM" if is_reinforce else "AutoModelForSequenceClassification"
        labels = "" if is_reinforce else ", num_labels=1"
        imports = [f"from transformers import AutoTokenizer, {model_class}"]
        if is_adapter:
            imports.append("from peft import PeftModel")
            code = [
                f'base = {model_class}.from_pretrained("{base_model}"{labels})',
                f'model = PeftModel.from_pretrained(base, "{repo}")',
            ]
        else:
            code = [f'model = {model_class}.from_pretrained("{repo}"{labels})']
        code.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo}")')
        if not is_reinforce:
            code += [
                "",
                "# as in training, a text is scored with the EOS token appended",
                'inputs = tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")',
                "reward = model(**inputs).logits[0, 0]",
            ]
        elif self.value_model is not None:
            imports += ["from pathlib import Path", "from hf_reinforce import ValueHeadModel"]
            if self.hub_model_id:  # ValueHeadModel loads from a local folder
                imports.append("from huggingface_hub import snapshot_download")
                code += ["", f'folder = Path(snapshot_download("{repo}"))']
            else:
                code += ["", f'folder = Path("{repo}")']
            # A critic trained as an adapter is saved without its base, which must be named
            base_argument = f', base_model="{base_model}"' if isinstance(self.value_model.backbone, PeftModel) else ""
            code += [
                "# the critic: V(s_t) for every prefix s_t of a text",
                f'critic = ValueHeadModel.from_pretrained(folder / "value_model"{base_argument})',
                'values = critic(**tokenizer(text, return_tensors="pt"))  # (1, number of tokens)',
            ]
        # Standard library, third-party, then this library, as isort would order them
        imports.sort(
            key=lambda line: (not line.startswith("from pathlib"), line.startswith("from hf_reinforce"), line)
        )
        usage = "```python\n" + "\n".join([*imports, "", *code]) + "\n```"
        if _describe_quantization(self.model.config) != "none":
            usage += (
                "\n\nThe model was trained on a quantized base: pass the same `quantization_config` to "
                "`from_pretrained` to reproduce it exactly."
            )
        return usage


def _describe_quantization(config) -> str:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return "none"
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    if quantization.get("load_in_4bit"):
        return f"4-bit {quantization.get('bnb_4bit_quant_type', '')} (bitsandbytes)".replace("  ", " ")
    if quantization.get("load_in_8bit"):
        return "8-bit (bitsandbytes)"
    return str(quantization.get("quant_method", "yes"))


def _table(header: tuple[str, str], rows: list[tuple[str, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    return "\n".join(lines)


def _citations(names: list[str]) -> str:
    return "\n\n".join(f"Cite {name} as:\n\n```bibtex\n{CITATIONS[name]}\n```" for name in names)
