"""The placement rules and plan, which the memory estimator and the built trainer agree on, and a critic of its own
on every form of the policy's LoRA targets."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, BitsAndBytesConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.engines import launched_engine
from hf_reinforce.placement import (
    CRITIC_OF_ITS_OWN,
    CRITIC_ON_POLICY_BASE,
    OWN_MODEL,
    POLICY_BASE,
    adapted_module_names,
    critic_layer_indices,
    critic_lora_config,
    layer_of,
    place_critic,
    plan_for_run,
    plan_placement,
)
from hf_reinforce.reward_models import SharedBaseRewardScorer, is_reward_model, record_reward_training
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer, save_tiny_models
from hf_reinforce.tools import memory


PROMPTS = Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8})
FULL_NAMES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    paths = save_tiny_models(tmp_path_factory.mktemp("tiny"))
    # an (untrained) reward adapter on the policy's 4-bit base, recorded as `RewardTrainer` records it
    base = AutoModelForSequenceClassification.from_pretrained(
        paths["policy"], num_labels=1, quantization_config=NF4, device_map={"": "cpu"}
    )
    adapter = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    paths["reward_adapter"] = paths["policy"] + "-reward-adapter"
    adapter.save_pretrained(paths["reward_adapter"])
    record_reward_training(adapter, paths["reward_adapter"])
    return paths


def test_critic_layers_are_the_top_quarter_by_default():
    assert critic_layer_indices(8, None) == [6, 7]
    assert critic_layer_indices(2, None) == [1]  # at least one
    assert critic_layer_indices(8, 3) == [5, 6, 7]
    assert critic_layer_indices(8, 0) == list(range(8)) == critic_layer_indices(8, 8) == critic_layer_indices(8, 9)


def test_layer_of_reads_decoder_layer_indices():
    assert layer_of("base_model.model.model.layers.12.mlp.up_proj.lora_A.default.weight") == 12
    assert layer_of("layers.0.self_attn") == 0
    assert layer_of("model.embed_tokens.weight") is None and layer_of("players.3.x") is None


def test_the_critic_sits_on_the_policy_base_only_where_it_can():
    assert place_critic(True, True, False).where == CRITIC_ON_POLICY_BASE
    assert place_critic(True, False, False).where == CRITIC_OF_ITS_OWN
    assert place_critic(True, True, True).where == CRITIC_OF_ITS_OWN  # ZeRO-3 / FSDP shard the base
    assert place_critic(False, True, False).where == CRITIC_OF_ITS_OWN  # full fine-tuning


def test_the_plan_places_every_role():
    shared = plan_placement(policy_is_peft=True)
    assert (shared.policy.base, shared.policy.adapter) == (POLICY_BASE, "default")
    assert (shared.reference.base, shared.reference.adapter) == (POLICY_BASE, None)
    assert (shared.critic.base, shared.critic.adapter, shared.critic.head) == (POLICY_BASE, "critic", "value head")
    assert (shared.reward.base, shared.reward.adapter) == (POLICY_BASE, "reward")
    assert shared.reward_joins(True) and not shared.reward_joins(False)
    sharded = plan_placement(policy_is_peft=True, engine="fsdp2")
    assert sharded.base_is_sharded and sharded.critic.base == sharded.reward.base == OWN_MODEL
    with pytest.raises(ValueError, match="reward_shares_base=True .* zero3 shards"):
        plan_placement(policy_is_peft=True, reward_shares_base=True, engine="zero3")
    full = plan_placement(policy_is_peft=False, critic=False, reference=False)
    assert full.critic is None and full.reference is None and full.reward.base == OWN_MODEL
    with pytest.raises(ValueError, match="cannot sit on the policy's base: its reason"):
        plan_placement(policy_is_peft=True, reward_shares_base=True).check_reward_fits(False, "its reason", "rm")


def count_b(completions, **kwargs):
    return [float(text.count("b")) for text in completions]


# (recipe settings, trainer settings, the layout both must find): a shared 4-bit base with the reward adapter on it,
# a critic of its own in full precision, full fine-tuning
LAYOUTS = {
    "shared-4bit-reward-adapter": (
        {"use_peft": True, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "dtype": "float32"},
        {"peft": True, "quantization_config": NF4, "reward": "adapter"},
        {"critic": "shared", "reward_model": "shared", "reference": "adapters"},
    ),
    "own-critic": (
        {"use_peft": True, "critic_shares_base": False},
        {"peft": True, "critic_shares_base": False},
        {"critic": "separate", "reward_model": "function", "reference": "adapters"},
    ),
    "full-fine-tuning": (
        {"use_peft": False},
        {"peft": False},
        {"critic": "separate", "reward_model": "function", "reference": "separate"},
    ),
}


def built_layout(trainer) -> dict[str, str]:
    """Where the built trainer's models actually sit, in the estimate's words."""
    critic = "none" if trainer.critic is None else "shared" if trainer.value_model.adapter_name else "separate"
    reward = "function"
    if any(is_reward_model(func) for func in trainer.reward_funcs):
        reward = "shared" if isinstance(trainer.reward_funcs[0], SharedBaseRewardScorer) else "separate"
    reference = "separate" if trainer.ref_model is not None else "adapters"
    return {"critic": critic, "reward_model": reward, "reference": reference}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_estimate_and_the_built_trainer_agree_on_placement(tmp_path, tiny_paths, layout):
    recipe_settings, trainer_settings, expected = LAYOUTS[layout]
    reward = tiny_paths["reward_adapter"] if trainer_settings.get("reward") == "adapter" else None
    recipe = {"model_name_or_path": tiny_paths["policy"], "reward_model_name_or_path": reward, **recipe_settings}
    plan, reward_fits = memory.recipe_placement(recipe)
    assert memory.layout_of(plan, reward_fits) == expected
    if recipe["use_peft"]:  # the estimate models LoRA training only
        _, setup, _ = memory.setup_from_recipe(recipe)
        assert {key: getattr(setup, key) for key in expected} == expected

    args = ReinforceConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        report_to="none",
        critic_shares_base=trainer_settings.get("critic_shares_base", True),
    )
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=reward or count_b,
        args=args,
        train_dataset=PROMPTS,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if trainer_settings["peft"] else None,
        quantization_config=trainer_settings.get("quantization_config"),
    )
    assert trainer.placement == plan
    assert built_layout(trainer) == expected


def test_the_estimate_places_as_a_sharded_engine_does(tiny_paths, monkeypatch):
    args = ReinforceConfig(output_dir="unused", report_to="none")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = {
        "model_name_or_path": tiny_paths["policy"],
        "reward_model_name_or_path": tiny_paths["reward_adapter"],
        "use_peft": True,
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "dtype": "float32",
    }
    plan, reward_fits = memory.recipe_placement(recipe, engine="zero3")
    assert plan == plan_for_run(args, True, launched_engine())
    assert reward_fits  # it fits the base, but the engine shards that base
    assert memory.layout_of(plan, reward_fits) == {
        "critic": "separate",
        "reward_model": "separate",
        "reference": "adapters",
    }
    _, setup, _ = memory.setup_from_recipe(recipe, engine="zero3")
    assert (setup.critic, setup.reward_model) == ("separate", "separate")


@pytest.mark.parametrize(
    "targets", ["all-linear", ["q_proj", "v_proj"], FULL_NAMES, r".*layers\.1\.self_attn\.(q|v)_proj"]
)
def test_the_policys_targets_name_the_same_modules_on_a_bare_decoder(targets):
    tokenizer = build_tiny_tokenizer(characters="abc")
    policy = get_peft_model(build_tiny_causal_lm(tokenizer), LoraConfig(r=4, target_modules=targets))
    names = adapted_module_names(policy)
    assert names and all(name.startswith("layers.") for name in names)
    decoder = AutoModel.from_config(policy.get_base_model().config)
    critic = get_peft_model(decoder, critic_lora_config(policy.peft_config["default"], names))
    assert adapted_module_names_of_decoder(critic) == names


def adapted_module_names_of_decoder(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    )


@pytest.mark.parametrize("targets", ["all-linear", FULL_NAMES], ids=["all-linear", "full-names"])
@pytest.mark.parametrize("use_4bit", [True, False], ids=["4bit", "full-precision"])
def test_a_critic_of_its_own_trains_checkpoints_and_resumes_exactly(tmp_path, tiny_paths, targets, use_4bit):
    def run(output_dir, resume_from_checkpoint=None):
        args = ReinforceConfig(
            output_dir=str(output_dir),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=6,
            max_steps=4,
            learning_rate=1e-3,
            beta=0.05,
            bf16=False,
            report_to="none",
            save_strategy="steps",
            save_steps=2,
            disable_tqdm=True,
            critic_shares_base=False,
        )
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        trainer = ReinforceTrainer(
            model=tiny_paths["policy"],
            reward_funcs=count_a,
            args=args,
            train_dataset=PROMPTS,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=targets),
            quantization_config=quantization if use_4bit else None,
        )
        critic_before = {k: v.clone() for k, v in trainer.value_model.trainable_state_dict().items()}
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return trainer, critic_before

    straight, critic_before = run(tmp_path / "straight")
    assert straight.value_model.backbone is not straight.model  # its own model
    critic_after = straight.value_model.trainable_state_dict()
    assert any("lora" in name for name in critic_after)
    moved = [name for name in critic_after if not torch.equal(critic_before[name], critic_after[name])]
    assert any("lora" in name for name in moved), "the critic's adapter did not train"
    resumed, _ = run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    for name, tensor in critic_after.items():
        torch.testing.assert_close(resumed.value_model.trainable_state_dict()[name], tensor, msg=name)
    policy_after = dict(straight.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        torch.testing.assert_close(parameter, policy_after[name], msg=name)
