"""Where each role sits: which base, adapter and head the policy, the reference, the critic and the reward models get.

The rules live here once, in `plan_placement`, which decides a `PlacementPlan` before any model loads. The trainer
builds it once and hands it to the reward-model resolution, the critic builder and the engine checks; the memory
estimator (`tools/memory.py`) builds its layout from the same function, so that the estimate describes what is built:

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
# A role's base in a `PlacementPlan`
POLICY_BASE = "the policy's base"
OWN_MODEL = "a model of its own"
# Adapter names on the policy's base (PEFT's own for the policy)
POLICY_ADAPTER, CRITIC_ADAPTER, REWARD_ADAPTER = "default", "critic", "reward"
SHARDED_BASE = "the engine shards the policy's base over the processes"


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
        return CriticPlacement(CRITIC_OF_ITS_OWN, SHARDED_BASE)
    return CriticPlacement(CRITIC_ON_POLICY_BASE, "one base for policy, reference and critic")


def engine_shards(engine: str | None) -> bool:
    """Whether an engine, named as `engines.launched_engine` names them, shards the policy's parameters."""
    return engine is not None and (engine == "zero3" or engine.startswith("fsdp"))


@dataclass(frozen=True)
class RolePlacement:
    """One role's place: the base it runs on, its adapter there (None: no adapter), its head, and why."""

    base: str  # POLICY_BASE or OWN_MODEL
    adapter: str | None
    head: str  # "LM head", "value head" or "score head"
    reason: str  # for logs and docs


@dataclass(frozen=True)
class PlacementPlan:
    """Where every role sits, decided by `plan_placement` before any model loads."""

    policy: RolePlacement
    reference: RolePlacement | None  # None without a reference (beta=0)
    critic: RolePlacement | None  # None without a critic (a baseline other than "critic")
    reward: RolePlacement  # a reward adapter trained on the policy's base with the policy's quantization
    reward_required: bool  # reward_shares_base=True: a reward adapter that cannot join the base is an error
    engine: str | None = None  # "zero2", "zero3", "fsdp2" ... or None for DDP and one process

    @property
    def base_is_sharded(self) -> bool:
        return engine_shards(self.engine)

    def reward_joins(self, fits: bool) -> bool:
        """Whether a reward adapter joins the policy's base, given whether it `fits` it (trained on that base,
        quantised alike)."""
        return fits and self.reward.base == POLICY_BASE

    def check_reward_fits(self, fits: bool, why: str, what: str) -> None:
        """Refuse, under reward_shares_base=True, a reward adapter (`what`) that cannot sit on the base (`why`)."""
        if self.reward_required and not fits:
            raise ValueError(
                f"reward_shares_base=True, but the reward adapter {what} cannot sit on the policy's base: {why}. Set "
                "reward_shares_base=None (share when possible) or False."
            )


def plan_placement(
    *,
    policy_is_peft: bool,
    critic: bool = True,
    critic_shares_base: bool = True,
    reward_shares_base: bool | None = None,
    reference: bool = True,
    engine: str | None = None,
) -> PlacementPlan:
    """The `PlacementPlan` of a run (see the module docstring): `policy_is_peft` when the policy trains a LoRA
    adapter, `critic` when baseline="critic", `reference` unless beta=0, `engine` as `engines.launched_engine` names
    it. Refuses reward_shares_base=True on a base the engine shards."""
    if policy_is_peft:
        policy = RolePlacement(POLICY_BASE, POLICY_ADAPTER, "LM head", "LoRA on the model given")
        frozen = RolePlacement(POLICY_BASE, None, "LM head", "the policy's base with its adapters disabled")
    else:
        policy = RolePlacement(POLICY_BASE, None, "LM head", "full fine-tuning of the model given")
        frozen = RolePlacement(OWN_MODEL, None, "LM head", "a frozen copy of the policy")
    return PlacementPlan(
        policy=policy,
        reference=frozen if reference else None,
        critic=_critic_entry(policy_is_peft, critic_shares_base, engine_shards(engine)) if critic else None,
        reward=_reward_entry(policy_is_peft, reward_shares_base, engine),
        reward_required=policy_is_peft and reward_shares_base is True,
        engine=engine,
    )


def plan_for_run(args, policy_is_peft: bool, engine: str | None) -> PlacementPlan:
    """The plan of a `ReinforceConfig` run (`args`)."""
    return plan_placement(
        policy_is_peft=policy_is_peft,
        critic=args.baseline == "critic",
        critic_shares_base=args.critic_shares_base,
        reward_shares_base=args.reward_shares_base,
        reference=args.beta != 0.0,
        engine=engine,
    )


def _critic_entry(policy_is_peft: bool, critic_shares_base: bool, base_is_sharded: bool) -> RolePlacement:
    placement = place_critic(policy_is_peft, critic_shares_base, base_is_sharded)
    if placement.where == CRITIC_ON_POLICY_BASE:
        return RolePlacement(POLICY_BASE, CRITIC_ADAPTER, "value head", placement.reason)
    return RolePlacement(OWN_MODEL, POLICY_ADAPTER if policy_is_peft else None, "value head", placement.reason)


def _reward_entry(policy_is_peft: bool, reward_shares_base: bool | None, engine: str | None) -> RolePlacement:
    """Where a reward adapter trained on the policy's base, quantised alike, goes."""
    if not policy_is_peft:
        return RolePlacement(OWN_MODEL, None, "score head", "the policy is not a PEFT model (give a `peft_config`)")
    if reward_shares_base is False:
        return RolePlacement(OWN_MODEL, None, "score head", "reward_shares_base=False")
    if engine_shards(engine):
        if reward_shares_base is True:
            raise ValueError(
                f"reward_shares_base=True puts the reward adapter on the policy's base, which {engine} shards over "
                "the processes; set reward_shares_base=None or False, or launch with the ddp or zero2 config."
            )
        return RolePlacement(OWN_MODEL, None, "score head", SHARDED_BASE)
    return RolePlacement(POLICY_BASE, REWARD_ADAPTER, "score head", "one base for policy, reference and reward model")


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
