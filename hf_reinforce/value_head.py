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
# The classes a saved critic may name to rebuild its backbone; anything else in a config file is refused.
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")


class _LayerInputReached(Exception):
    """Ends a forward pass once the hidden states entering the critic's first trained layer are known."""


class ValueHeadModel(nn.Module):
    """V(s): `forward(input_ids, attention_mask) -> values` of shape (batch, seq), `values[:, k]` = V(ids[:, :k+1]).

    The head reads two features of each position t: the decoder's last hidden state h_t, as a reward model's score
    head does, and the sum of the RMS-normalised hidden states of the completion so far, divided by
    √`accumulation_length` — what the tokens written so far have added up to, so that a return paid token by token
    is a linear function of the features. It predicts values in normalised units,
    `V = return_std · head(features) + return_mean` (PopArt): the critic learns at the same speed whatever the scale
    of the rewards, and `rescale_returns` changes the statistics without changing a single output. `forward` always
    answers in reward units.

    Args:
        backbone: a transformers model (causal LM, sequence classifier or bare decoder) or a `peft.PeftModel` of one.
            Only its decoder runs: no vocabulary-sized logits are computed.
        adapter_name: set when the critic is one adapter of a PEFT model whose other adapter is the policy (the
            shared-base, one-card mode); that adapter is made active for the critic's forward passes only.
        head_init: optional (1, hidden) weight to start the head's h_t part from, e.g. a reward model's score head;
            zeros otherwise, so an untrained critic predicts V = 0.
        accumulation_length: the completion length the sum of hidden states is scaled for (the trainer passes its
            `max_completion_length`).
    """

    def __init__(
        self,
        backbone: PreTrainedModel | PeftModel,
        adapter_name: str | None = None,
        head_init: torch.Tensor | None = None,
        accumulation_length: int = 256,
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
        self.accumulation_length = accumulation_length
        # Layers below this one carry none of the critic's weights (a critic adapter on the top layers of a shared
        # base): their forward is the reference model's, and can be taken from the reference pass.
        self.first_trained_layer = 0
        self.backbone_trains = True  # False: the head learns alone (`freeze_backbone`)
        self.value_head = nn.Linear(2 * hidden_size, 1, dtype=torch.float32)  # [h_t, accumulated] -> V
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if head_init is not None:
            with torch.no_grad():
                self.value_head.weight[:, :hidden_size].copy_(head_init)
        self.register_buffer("return_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("return_std", torch.ones((), dtype=torch.float32))

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

    # ---- the frozen lower layers of a shared base ----
    @contextlib.contextmanager
    def capture_layer_input(self, into: list, stop: bool = False):
        """Collect (into `into`) the hidden states entering the first layer the critic trains, during forwards of the
        base; `stop=True` ends each forward there. On a shared base the layers below carry no critic adapter, so the
        reference pass (adapters disabled) computes exactly what the critic's own forward would."""
        layer = self._decoder().layers[self.first_trained_layer]

        def hook(module, args, kwargs):
            into.append((args[0] if args else kwargs["hidden_states"]).detach())
            if stop:
                raise _LayerInputReached

        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        except _LayerInputReached:
            pass
        finally:
            handle.remove()

    @torch.no_grad()
    def layer_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states entering the first trained layer, from a forward of the frozen layers below it only."""
        captured = []
        with self.critic_adapter(), self.capture_layer_input(captured, stop=True):
            self._decoder()(input_ids=input_ids, attention_mask=attention_mask)
        return captured[0]

    def _hidden_states(self, input_ids, attention_mask, layer_input) -> torch.Tensor:
        decoder = self._decoder()
        if self.first_trained_layer == 0:
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if layer_input is None:
            layer_input = self.layer_input(input_ids, attention_mask)
        all_layers = decoder.layers
        decoder.layers = nn.ModuleList(list(all_layers)[self.first_trained_layer :])  # run the trained layers only
        try:
            return decoder(inputs_embeds=layer_input, attention_mask=attention_mask).last_hidden_state
        finally:
            decoder.layers = all_layers

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        completion_start: int = 0,
        layer_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[h_t, Σ_{completion_start < k ≤ t} ĥ_k / √accumulation_length] for every position t (batch, seq, 2·hidden).

        The sum starts after `completion_start` (the last prompt position: the prompt's own value has nothing
        accumulated); 0 accumulates over the whole text. `layer_input`, the hidden states entering the first trained
        layer when they are already known (see `capture_layer_input`), saves the forward of the layers below it.
        """
        # A frozen backbone runs without gradients: no backward pass, and no activations kept for one
        with self.critic_adapter(), torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            hidden = self._hidden_states(input_ids, attention_mask, layer_input)
        hidden = hidden.to(self.value_head.weight.dtype)  # (batch, seq, hidden)
        normalized = hidden * torch.rsqrt(hidden.square().mean(dim=-1, keepdim=True) + 1e-6)
        counted = torch.arange(hidden.size(1), device=hidden.device) > completion_start  # (seq,)
        if attention_mask is not None:
            counted = counted & attention_mask.bool()  # (batch, seq)
        accumulated = (normalized * counted.unsqueeze(-1)).cumsum(dim=1) / self.accumulation_length**0.5
        return torch.cat([hidden, accumulated], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        completion_start: int = 0,
        normalized: bool = False,
        layer_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """V(s) in reward units, or in the head's normalised units with `normalized=True` (what training regresses).

        `completion_start` is the position of the prompt's last token when the input is a prompt and a completion.
        """
        # input_ids, attention_mask: (batch, seq) -> values: (batch, seq)
        features = self.features(input_ids, attention_mask, completion_start, layer_input)
        values = self.value_head(features).squeeze(-1)
        return values if normalized else self.denormalize(values)

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized * self.return_std + self.return_mean

    @torch.no_grad()
    def rescale_returns(self, mean: float, std: float) -> None:
        """Move to new return statistics keeping every output V unchanged (PopArt's head rescaling)."""
        old_mean, old_std = self.return_mean.item(), self.return_std.item()
        self.value_head.weight.mul_(old_std / std)
        self.value_head.bias.mul_(old_std).add_(old_mean - mean).div_(std)
        self.return_mean.fill_(mean)
        self.return_std.fill_(std)

    def freeze_backbone(self) -> None:
        """Let the head learn alone on the backbone's features: its forward runs without gradients from now on, and
        `fitted_parameters` are the head's. The backbone's weights stay in `trainable_parameters`, which checkpoints
        and saves hold."""
        self.backbone_trains = False

    def fitted_parameters(self) -> list[nn.Parameter]:
        """What the critic's optimizer updates: `trainable_parameters`, or the head's alone with a frozen backbone."""
        return self.trainable_parameters() if self.backbone_trains else list(self.value_head.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The critic's own weights, which checkpoints hold: its adapter (or whole backbone) and the head, never the
        policy's."""
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
        state.update({f"value_head.{k}": v for k, v in self._head_state().items()})
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def _head_state(self) -> dict[str, torch.Tensor]:
        return {**self.value_head.state_dict(), "return_mean": self.return_mean, "return_std": self.return_std}

    def _load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        # Critics saved before the return statistics existed predict in reward units: mean 0, std 1
        with torch.no_grad():
            self.return_mean.fill_(state.pop("return_mean", torch.tensor(0.0)).item())
            self.return_std.fill_(state.pop("return_std", torch.tensor(1.0)).item())
        self.value_head.load_state_dict(state)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head_state = {k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")}
        self._load_head_state(head_state)
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
        for auto_class in AUTO_CLASSES[1:]:
            if type(model).__name__.endswith(auto_class.removeprefix("AutoModel")):
                return auto_class
        return "AutoModel"

    def save_pretrained(self, save_directory: str | Path, adapter_saved_at: str | None = None) -> None:
        """Save in loadable form: the head (safetensors), a small config, and the adapter or backbone weights.

        `adapter_saved_at` is for a critic adapter already written next to the policy that shares its base (a path
        relative to `save_directory`): the config points there instead of writing the adapter a second time.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous() for k, v in self._head_state().items()}, save_directory / VALUE_HEAD_WEIGHTS
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
            "hidden_size": self.value_head.in_features // 2,
            "accumulation_length": self.accumulation_length,
        }
        (save_directory / VALUE_HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: str | None = None, **model_kwargs) -> "ValueHeadModel":
        """Load a critic saved by `save_pretrained`; `base_model` overrides the base recorded for an adapter."""
        directory = Path(directory)
        config = json.loads((directory / VALUE_HEAD_CONFIG).read_text())
        if config.get("auto_class") not in AUTO_CLASSES:
            raise ValueError(
                f"{directory / VALUE_HEAD_CONFIG} names auto_class={config.get('auto_class')!r}; a critic is rebuilt "
                f"only with one of {', '.join(AUTO_CLASSES)}."
            )
        auto_class = getattr(transformers, config["auto_class"])
        if config["adapter_directory"] is None:
            backbone = auto_class.from_pretrained(directory, **model_kwargs)
        else:
            base = auto_class.from_pretrained(base_model or config["base_model_name_or_path"], **model_kwargs)
            backbone = PeftModel.from_pretrained(base, directory / config["adapter_directory"])
        critic = cls(backbone, accumulation_length=config["accumulation_length"])
        critic._load_head_state(load_file(directory / VALUE_HEAD_WEIGHTS))
        return critic
