"""The critic: a causal-LM backbone plus an fp32 scalar head, one value per token."""

import contextlib
import json
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel


VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head_config.json"


class ValueHeadModel(nn.Module):
    """V(s): `forward(input_ids, attention_mask) -> values` of shape (batch, seq), `values[:, k]` = V(ids[:, :k+1]).

    Args:
        backbone: a transformers model (causal LM, sequence classifier or bare decoder) or a `peft.PeftModel` of one.
            Only its decoder runs: no vocabulary-sized logits are computed.
        adapter_name: set when the critic is one adapter of a PEFT model whose other adapter is the policy (the
            shared-base, one-card mode); that adapter is made active for the critic's forward passes only.
        head_init: optional (1, hidden) weight to start the head from, e.g. a reward model's score head; zeros
            otherwise, so an untrained critic predicts V = 0 and the first advantages equal the returns.
    """

    def __init__(
        self,
        backbone: PreTrainedModel | PeftModel,
        adapter_name: str | None = None,
        head_init: torch.Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(backbone, PreTrainedModel | PeftModel):
            raise TypeError(
                f"value_model must be a transformers model, a PEFT model, a path to one, or a ValueHeadModel; got "
                f"{type(backbone).__name__}."
            )
        if adapter_name is not None and (
            not isinstance(backbone, PeftModel) or adapter_name not in backbone.peft_config
        ):
            raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of the given backbone.")
        self.backbone = backbone
        self.adapter_name = adapter_name
        hidden_size = getattr(self.config.get_text_config(), "hidden_size", None)
        if hidden_size is None:
            raise ValueError(f"{type(backbone).__name__} has no `hidden_size` in its config; it cannot be a critic.")
        self.value_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.value_head.bias)
        with torch.no_grad():
            self.value_head.weight.copy_(head_init if head_init is not None else torch.zeros(1, hidden_size))

    @property
    def config(self):
        return self.backbone.config

    def _decoder(self) -> nn.Module:
        model = self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone
        return model.base_model  # transformers' bare decoder (e.g. LlamaModel): LoRA layers are injected in place

    @contextlib.contextmanager
    def critic_adapter(self):
        """Activate the critic's adapter on a shared base for the duration (a no-op for a critic of its own)."""
        if self.adapter_name is None or self.backbone.active_adapter == self.adapter_name:
            yield
            return
        previous = self.backbone.active_adapter
        self.backbone.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            self.backbone.set_adapter(previous)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask: (batch, seq) -> values: (batch, seq)
        with self.critic_adapter():
            hidden = self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the critic's optimizer updates: its adapter (or whole backbone) and the head, never the policy's."""
        if self.adapter_name is not None:
            backbone_params = [p for n, p in self.backbone.named_parameters() if f".{self.adapter_name}." in n]
        elif isinstance(self.backbone, PeftModel):
            backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        else:
            backbone_params = list(self.backbone.parameters())
        return backbone_params + list(self.value_head.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold to restore the critic exactly (never the frozen base)."""
        if isinstance(self.backbone, PeftModel):
            backbone_state = get_peft_model_state_dict(self.backbone, adapter_name=self.adapter_name or "default")
        else:
            backbone_state = self.backbone.state_dict()
        state = {f"backbone.{k}": v for k, v in backbone_state.items()}
        state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head_state = {k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")}
        self.value_head.load_state_dict(head_state)
        if isinstance(self.backbone, PeftModel):
            result = set_peft_model_state_dict(
                self.backbone, backbone_state, adapter_name=self.adapter_name or "default"
            )
            if result.unexpected_keys:
                raise ValueError(f"Critic checkpoint holds unexpected keys: {result.unexpected_keys[:5]}")
        else:
            self.backbone.load_state_dict(backbone_state)

    def _auto_class_name(self) -> str:
        """The transformers auto class that rebuilds the backbone, so that saved adapter weights find their modules."""
        model = self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone
        for suffix in ("ForCausalLM", "ForSequenceClassification"):
            if type(model).__name__.endswith(suffix):
                return f"AutoModel{suffix}"
        return "AutoModel"

    def save_pretrained(self, save_directory: str | Path, adapter_saved_at: str | None = None) -> None:
        """Save in loadable form: the head (safetensors), a small config, and the adapter or backbone weights.

        `adapter_saved_at` is for a critic adapter already written next to the policy that shares its base (a path
        relative to `save_directory`): the config points there instead of writing the adapter a second time.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.value_head.state_dict().items()}, save_directory / VALUE_HEAD_WEIGHTS
        )
        if adapter_saved_at is not None:
            adapter_directory = adapter_saved_at
        elif self.adapter_name is not None:
            self.backbone.save_pretrained(save_directory, selected_adapters=[self.adapter_name])
            adapter_directory = self.adapter_name  # PEFT stores a non-default adapter in a sub-folder of its name
        else:
            self.backbone.save_pretrained(save_directory)
            adapter_directory = "." if isinstance(self.backbone, PeftModel) else None
        config = {
            "base_model_name_or_path": getattr(self.config, "_name_or_path", None),
            "auto_class": self._auto_class_name(),
            "adapter_directory": adapter_directory,
            "hidden_size": self.value_head.in_features,
        }
        (save_directory / VALUE_HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: str | None = None, **model_kwargs) -> "ValueHeadModel":
        """Load a critic saved by `save_pretrained`; `base_model` overrides the base recorded for an adapter."""
        directory = Path(directory)
        config = json.loads((directory / VALUE_HEAD_CONFIG).read_text())
        auto_class = getattr(transformers, config["auto_class"])
        if config["adapter_directory"] is None:
            backbone = auto_class.from_pretrained(directory, **model_kwargs)
        else:
            base = auto_class.from_pretrained(base_model or config["base_model_name_or_path"], **model_kwargs)
            backbone = PeftModel.from_pretrained(base, directory / config["adapter_directory"])
        critic = cls(backbone)
        critic.value_head.load_state_dict(load_file(directory / VALUE_HEAD_WEIGHTS))
        return critic
