"""Where each role sits: which base, adapter and head the policy, the reference, the critic and the reward models get.

The rules live here once, and the trainer, the critic builder and the memory estimator all read them, so that the
estimate describes what is built:

- The **policy** is the model given, with its LoRA adapter (`default`) when `peft_config` is given.
- The **reference** is the policy's base with adapters disabled (PEFT), or a frozen copy (full fine-tuning).
- A **reward adapter** trained on the policy's base, quantised alike, joins that base as a frozen adapter (`reward`)
  with its score head, unless `reward_shares_base=False` or an engine shards the base (ZeRO-3, FSDP).
- The **critic** is an adapter (`critic`) plus a value head on the policy's base when the policy is a PEFT model and
  `critic_shares_base` (and no engine shards the base): a copy of a reward adapter on that base when there is one,
  otherwise a fresh adapter on the top `critic_layers` decoder layers. Otherwise it is a model of its own, whole on
  every process: a reward adapter's base with a copy of that adapter, a reward model's backbone, or the policy's,
  with the policy's quantization and LoRA targets mapped onto its backbone.
"""

import copy
import re
from dataclasses import dataclass


# A decoder layer's index in a module or weight name: `model.layers.3.self_attn.q_proj` is layer 3
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
CRITIC_ON_POLICY_BASE = "adapter on the policy's base"
CRITIC_OF_ITS_OWN = "model of its own"


def layer_of(name: str) -> int | None:
    """The decoder layer a module or weight name belongs to, or None."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def critic_layer_indices(num_layers: int, critic_layers: int | None) -> list[int]:
    """The decoder layers a fresh critic adapter on the policy's base trains: the top `critic_layers` (a quarter, at
    least one, when None; every layer for 0 or a count of at least `num_layers`)."""
    count = max(1, num_layers // 4) if critic_layers is None else critic_layers
    if not 0 < count < num_layers:
        count = num_layers
    return list(range(num_layers - count, num_layers))


@dataclass(frozen=True)
class CriticPlacement:
    """Where the critic sits, decided before it is built."""

    where: str  # CRITIC_ON_POLICY_BASE or CRITIC_OF_ITS_OWN
    reason: str  # why, for logs and docs


def place_critic(policy_is_peft: bool, critic_shares_base: bool, base_is_sharded: bool) -> CriticPlacement:
    """The critic's place (see the module docstring); `base_is_sharded` when ZeRO-3 or FSDP shards the policy."""
    if not policy_is_peft:
        return CriticPlacement(CRITIC_OF_ITS_OWN, "full fine-tuning: the policy's weights change, the critic's own")
    if not critic_shares_base:
        return CriticPlacement(CRITIC_OF_ITS_OWN, "critic_shares_base=False")
    if base_is_sharded:
        return CriticPlacement(CRITIC_OF_ITS_OWN, "the engine shards the policy's base over the processes")
    return CriticPlacement(CRITIC_ON_POLICY_BASE, "one base for policy, reference and critic")


def adapted_module_names(model, adapter_name: str = "default") -> list[str]:
    """The names, relative to the decoder (`layers.0.self_attn.q_proj`), of the modules of a PEFT causal LM or
    sequence classifier that carry LoRA weights of `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    decoder = model.get_base_model().base_model
    return sorted(
        name
        for name, module in decoder.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    )


def critic_lora_config(peft_config, adapted_modules: list[str] | None = None):
    """The LoRA config of a critic copied from the policy's or a reward adapter's: a bare decoder (no task head, no
    `modules_to_save`), trainable. `adapted_modules` (names relative to the decoder, see `adapted_module_names`)
    replace the targets when the critic's backbone is a bare decoder: however the policy's targets were given
    (`"all-linear"`, suffixes, full module names, a regular expression), they then name the same modules there."""
    lora_config = copy.deepcopy(peft_config)
    lora_config.task_type = None  # the critic's backbone is a bare decoder, not a causal LM or classifier
    lora_config.modules_to_save = None  # its head is the value head, not the reward model's score
    lora_config.inference_mode = False  # a reward adapter loaded for scoring is frozen; the critic's copy trains
    if adapted_modules is not None:
        lora_config.target_modules = list(adapted_modules)
        lora_config.layers_to_transform = lora_config.layers_pattern = None  # the names already pick the layers
        lora_config.exclude_modules = None
    return lora_config
