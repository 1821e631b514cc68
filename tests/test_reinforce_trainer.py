import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import BitsAndBytesConfig
from trl import RLOOConfig, RLOOTrainer

from hf_reinforce import ReinforceConfig, ReinforceTrainer, ValueHeadModel
from hf_reinforce.advantages import carry_forward, leave_one_out_mean, optimal_token_baseline
from hf_reinforce.speedups import fused_lora
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer, save_tiny_models


PROMPTS = Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8})


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


def config(tmp_path, **overrides) -> ReinforceConfig:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "beta": 0.0,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return ReinforceConfig(**settings)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def abc_tokenizer():
    return build_tiny_tokenizer(characters="abc")


def qlora_kwargs(compute_dtype=torch.float32):
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        ),
        "peft_config": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    }


def snapshot(named_parameters) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone().float() for name, param in named_parameters}


def changed(before: dict[str, torch.Tensor], named_parameters) -> set[str]:
    return {name for name, param in named_parameters if not torch.equal(before[name], param.detach().float())}


def logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if entry.get(key) is not None]


@pytest.mark.parametrize("baseline", ["critic", "otb", "rloo", "mean", "none"])
def test_each_baseline_raises_a_simple_reward(tmp_path, abc_tokenizer, baseline):
    policy = build_tiny_causal_lm(abc_tokenizer, seed=1)
    before = snapshot(policy.named_parameters())
    args = config(tmp_path, baseline=baseline, max_steps=40, learning_rate=3e-3, critic_learning_rate=3e-3)
    trainer = ReinforceTrainer(
        model=policy, reward_funcs=count_a, args=args, train_dataset=PROMPTS, processing_class=abc_tokenizer
    )
    trainer.train()
    rewards = logged(trainer, "reward")
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    print(f"{baseline}: mean reward of the first 8 steps {first:.2f}, of the last 8 steps {last:.2f}")
    assert last > first + 0.5
    assert changed(before, policy.named_parameters()) == set(before)


def test_logged_metrics_and_tensorboard(tmp_path, tiny_paths):
    args = config(tmp_path, beta=0.05, report_to=["tensorboard"])
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    trainer.train()
    entry = trainer.state.log_history[0]
    for key in (
        "reward",
        "reward_std",
        "kl",
        "entropy",
        "completions/mean_length",
        "advantages/mean",
        "advantages/std",
        "critic/value_loss",
        "critic/explained_variance",
        "critic/recentred_explained_variance",
        "critic/returns_variance_finished",
        "critic/weight",
        "objective/rlhf_reward",
    ):
        assert key in entry, key
    assert any(Path(args.output_dir).rglob("events.out.tfevents.*"))


def test_kl_penalty_enters_the_return(tmp_path, tiny_paths):
    """R = reward − β·KL: with the policy moving, the penalised return falls below the raw reward."""
    args = config(tmp_path, beta=0.5, max_steps=6, learning_rate=1e-2)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    trainer.train()
    last = trainer.state.log_history[-2]
    kl_per_token, mean_length = last["kl"], last["completions/mean_length"]
    assert kl_per_token > 0
    # the logged means are over different populations (tokens vs sequences), so compare with a loose tolerance
    expected = last["reward"] - 0.5 * kl_per_token * mean_length
    assert last["objective/rlhf_reward"] == pytest.approx(expected, rel=0.3, abs=0.05)


def test_qlora_shared_base_trains_policy_and_critic_on_one_base(tmp_path, tiny_paths):
    args = config(tmp_path, beta=0.05, critic_shares_base=True)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS, **qlora_kwargs()
    )
    policy = trainer.model
    assert isinstance(policy, PeftModel) and policy.is_loaded_in_4bit
    assert trainer.value_model.backbone is policy and trainer.ref_model is None  # one quantised base in memory
    assert set(policy.peft_config) == {"default", "critic"}
    before = snapshot(policy.named_parameters())
    head_before = trainer.value_model.value_head.weight.detach().clone()
    trainer.train()
    moved = changed(before, policy.named_parameters())
    assert any(".default." in name for name in moved), "the policy adapter did not train"
    assert any(".critic." in name for name in moved), "the critic adapter did not train"
    assert all(".default." in name or ".critic." in name for name in moved), "the frozen base moved"
    assert not torch.equal(head_before, trainer.value_model.value_head.weight)
    assert all(math.isfinite(v) for v in logged(trainer, "kl"))


def test_dequantize_for_inference_changes_speed_not_results(tmp_path, tiny_paths):
    runs = []
    for dequantize in (False, True):
        args = config(tmp_path / str(dequantize), beta=0.05, max_steps=2, dequantize_for_inference=dequantize)
        trainer = ReinforceTrainer(
            model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS, **qlora_kwargs()
        )
        before = snapshot(trainer.model.named_parameters())
        trainer.train()
        assert any(".default." in name for name in changed(before, trainer.model.named_parameters()))
        runs.append({key: logged(trainer, key) for key in ("reward", "kl", "loss", "critic/value_loss")})
    # the same completions (sampled from the same seed) and the same losses, to rounding
    for key, values in runs[0].items():
        assert runs[1][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_qlora_policy_adapter_takes_the_activation_dtype(tmp_path, tiny_paths, model_dtype, monkeypatch):
    """TRL casts a quantized policy's adapter to bf16; on an fp32 model it goes back to fp32, so that it trains as one
    fused product per layer (which needs the adapter in the activations' dtype); a bf16 model keeps it in bf16."""
    fused = []
    apply = fused_lora.LoraOn4bit.apply
    monkeypatch.setattr(fused_lora.LoraOn4bit, "apply", lambda x, A, *rest: fused.append(A) or apply(x, A, *rest))
    args = config(tmp_path, max_steps=2, model_init_kwargs={"dtype": model_dtype})
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS, **qlora_kwargs()
    )
    policy_adapter = {name: param for name, param in trainer.model.named_parameters() if ".default." in name}
    before = snapshot(policy_adapter.items())
    trainer.train()
    assert changed(before, policy_adapter.items())
    assert {param.dtype for param in policy_adapter.values()} == {model_dtype}
    fused_policy_layers = {id(A) for A in fused} & {id(param) for param in policy_adapter.values()}
    assert len(fused_policy_layers) == len(policy_adapter) // 2  # every LoRA A of the policy trained fused


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_separate_critic_is_its_own_quantised_lora_model(tmp_path, tiny_paths, compute_dtype):
    args = config(tmp_path, critic_shares_base=False, max_steps=2)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=count_a,
        args=args,
        train_dataset=PROMPTS,
        **qlora_kwargs(compute_dtype),
    )
    critic_backbone = trainer.value_model.backbone
    assert critic_backbone is not trainer.model and isinstance(critic_backbone, PeftModel)
    assert critic_backbone.is_loaded_in_4bit
    before = snapshot(critic_backbone.named_parameters())
    trainer.train()
    assert changed(before, critic_backbone.named_parameters())


def test_critic_warmup_keeps_the_policy_learning_with_the_fallback_baseline(tmp_path, tiny_paths):
    args = config(tmp_path, critic_warmup_steps=3, max_steps=5, critic_shares_base=True)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS, **qlora_kwargs()
    )
    before = snapshot(trainer.model.named_parameters())
    trainer.train()
    moved = changed(before, trainer.model.named_parameters())
    assert any(".default." in name for name in moved), "the policy waited for the critic"
    assert any(".critic." in name for name in moved)
    assert logged(trainer, "critic/weight")[:3] == [0.0, 0.0, 0.0]  # the critic-free fallback during warm-up


def test_critic_regresses_the_kl_penalty_still_to_come(tmp_path, tiny_paths):
    """With beta > 0 the return of token t is R − β·Σ_{k≥t} KL_k, which the critic regresses."""
    args = config(tmp_path, beta=0.5, max_steps=2, learning_rate=1e-2)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    seen = {}
    rollout_of, returns_of = trainer._rollout, trainer._returns

    def record_rollout(*inputs):
        seen["rollout"] = rollout_of(*inputs)
        return seen["rollout"]

    def record_returns(rewards, per_token_kl, mask, local):
        stages = returns_of(rewards, per_token_kl, mask, local)
        seen.update(kl=per_token_kl, returns=stages[1], mask=mask)
        return stages

    trainer._rollout, trainer._returns = record_rollout, record_returns
    trainer.train()
    kl, returns, mask = seen["kl"], seen["returns"], seen["mask"]
    ids = seen["rollout"].input_ids
    completions = trainer.processing_class.batch_decode(ids[:, -mask.size(1) :], skip_special_tokens=True)
    rewards = torch.tensor(count_a(completions))
    kl_to_come = (kl * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns, (rewards.unsqueeze(1) - 0.5 * kl_to_come) * mask)
    assert kl.abs().sum() > 0


@pytest.mark.parametrize("baseline", ["critic", "rloo"])
def test_rollouts_are_reused_with_the_clipped_surrogate(tmp_path, abc_tokenizer, baseline):
    args = config(tmp_path, baseline=baseline, num_iterations=2, max_steps=4)
    policy = build_tiny_causal_lm(abc_tokenizer, seed=1)
    before = snapshot(policy.named_parameters())
    trainer = ReinforceTrainer(
        model=policy, reward_funcs=count_a, args=args, train_dataset=PROMPTS, processing_class=abc_tokenizer
    )
    trainer.train()
    assert changed(before, policy.named_parameters())
    assert len(logged(trainer, "reward")) == 2  # two batches of rollouts, each used for two optimizer steps
    assert len(logged(trainer, "loss")) == 4 and all(math.isfinite(loss) for loss in logged(trainer, "loss"))


def test_rloo_evaluates_with_one_completion_per_prompt(tmp_path, tiny_paths):
    args = config(tmp_path, baseline="rloo", eval_strategy="steps", eval_steps=2, num_generations_eval=1, max_steps=2)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS, eval_dataset=PROMPTS
    )
    trainer.train()
    assert logged(trainer, "eval_loss") == [0.0]  # RLOO's zero advantages: nothing to compare a completion with


def test_batch_mean_baseline_needs_no_groups(tmp_path, abc_tokenizer):
    args = config(tmp_path, baseline="mean", num_generations=1, max_steps=2)
    trainer = ReinforceTrainer(
        model=build_tiny_causal_lm(abc_tokenizer, seed=1),
        reward_funcs=count_a,
        args=args,
        train_dataset=PROMPTS,
        processing_class=abc_tokenizer,
    )
    trainer.train()
    assert logged(trainer, "advantages/std")[0] > 0


@pytest.mark.parametrize("shares_base", [True, False])
def test_value_model_maps_each_prefix_to_one_value(tmp_path, tiny_paths, shares_base):
    args = config(tmp_path, critic_shares_base=shares_base)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS, **qlora_kwargs()
    )
    nn.init.normal_(trainer.value_model.value_head.weight)  # a non-zero head, so values depend on the input
    input_ids = torch.randint(4, 40, (3, 7))
    values = trainer.value_model(input_ids, torch.ones_like(input_ids))
    assert values.shape == (3, 7) and values.dtype == torch.float32
    edited = input_ids.clone()
    edited[:, 5] = 41  # changing token 5 may change V of prefixes that contain it, never of shorter ones
    edited_values = trainer.value_model(edited, torch.ones_like(edited))
    torch.testing.assert_close(values[:, :5], edited_values[:, :5])
    assert not torch.allclose(values[:, 5:], edited_values[:, 5:])


def test_value_model_from_reward_model_starts_from_its_score_head(tmp_path, tiny_paths):
    from transformers import AutoModelForSequenceClassification

    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_paths["reward_model"], num_labels=1)
    args = config(tmp_path, max_steps=1)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=reward_model, args=args, train_dataset=PROMPTS)
    hidden_size = reward_model.config.hidden_size
    torch.testing.assert_close(trainer.value_model.value_head.weight[:, :hidden_size], reward_model.score.weight)
    assert trainer.value_model.value_head.weight[:, hidden_size:].abs().sum() == 0  # the accumulated read-out
    trainer.train()


@pytest.mark.parametrize("use_qlora", [False, True])
def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tmp_path, tiny_paths, use_qlora):
    def run(output_dir, resume_from_checkpoint=None):
        args = config(tmp_path, output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2)
        trainer = ReinforceTrainer(
            model=tiny_paths["policy"],
            reward_funcs=count_a,
            args=args,
            train_dataset=PROMPTS,
            **(qlora_kwargs() if use_qlora else {}),
        )
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return snapshot(trainer.model.named_parameters()), trainer.value_model.trainable_state_dict()

    policy_straight, critic_straight = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    for name in ("critic_state.safetensors", "critic_optimizer.pt", "critic_scheduler.pt", "value_model"):
        assert (checkpoint / name).exists(), name
    assert (checkpoint / "value_model" / "value_head.safetensors").exists()
    assert [p.name for p in checkpoint.rglob("*.bin")] == ["training_args.bin"]  # weights are all safetensors
    policy_resumed, critic_resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    for name, tensor in policy_straight.items():
        torch.testing.assert_close(policy_resumed[name], tensor, msg=name)
    for name, tensor in critic_straight.items():
        torch.testing.assert_close(critic_resumed[name], tensor, msg=name)


def test_saved_value_model_reloads_with_the_same_values(tmp_path, tiny_paths):
    args = config(tmp_path, critic_shares_base=False)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=count_a,
        args=args,
        train_dataset=PROMPTS,
        **{"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])},
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    input_ids = torch.randint(4, 40, (2, 9))
    reloaded = ValueHeadModel.from_pretrained(tmp_path / "final" / "value_model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids), trainer.value_model(input_ids), atol=1e-5, rtol=0)


def test_non_finite_rewards_are_skipped_and_counted(tmp_path, tiny_paths):
    def sometimes_broken(completions, **kwargs):
        return [
            math.inf if i % 4 == 0 else (math.nan if i % 4 == 1 else float(t.count("a")))
            for i, t in enumerate(completions)
        ]

    args = config(tmp_path, max_steps=2)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=sometimes_broken, args=args, train_dataset=PROMPTS
    )
    trainer.train()
    assert logged(trainer, "rewards/num_nonfinite")[0] == 4  # of 8 completions a step: 2 scored inf, 2 NaN
    for module in (trainer.model, trainer.value_model):
        assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bad_configuration_is_named(tmp_path, tiny_paths):
    with pytest.raises(ValueError, match="baseline='ppo' is not supported; set `baseline`"):
        config(tmp_path, baseline="ppo")
    with pytest.raises(ValueError, match="baseline='rloo' needs at least two completions.*num_generations"):
        config(tmp_path, baseline="rloo", num_generations=1)
    with pytest.raises(ValueError, match="num_iterations"):
        config(tmp_path, num_iterations=0)
    with pytest.raises(ValueError, match="gamma"):
        config(tmp_path, gamma=0.0)
    with pytest.raises(ValueError, match="lam=1.5"):
        config(tmp_path, lam=1.5)
    with pytest.raises(ValueError, match="critic_learning_rate=nan"):
        config(tmp_path, critic_learning_rate=math.nan)
    with pytest.raises(ValueError, match="critic_layers=-1"):
        config(tmp_path, critic_layers=-1)
    for baseline in ("critic", "mean", "none"):
        assert config(tmp_path, baseline=baseline, num_generations=1).num_generations == 1
    assert config(tmp_path, num_iterations=2).num_iterations == 2
    for name, value in (("top_p", 0.9), ("top_k", 5), ("min_p", 0.1), ("repetition_penalty", 1.2)):
        with pytest.raises(ValueError, match=f"inverse_cdf_sampling .* but {name}=.* reset `{name}`"):
            config(tmp_path, inverse_cdf_sampling=True, **{name: value})


def test_inverse_cdf_sampling_keeps_the_rollouts_log_probabilities(tmp_path, tiny_paths, monkeypatch):
    """With a KL penalty, the rollouts' log π comes from generation: one forward less (the reference's is left), and
    the same values as a full forward over prompt and completion."""
    args = config(tmp_path, baseline="mean", beta=0.5, num_iterations=2, temperature=0.7, inverse_cdf_sampling=True)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    forwards = []
    parent_pass = RLOOTrainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(
        RLOOTrainer,
        "_get_per_token_logps_and_entropies",
        lambda self, *args, **kwargs: forwards.append(1) or parent_pass(self, *args, **kwargs),
    )
    trainer.model.train()
    torch.manual_seed(0)
    output = trainer._generate_and_score_completions([{"prompt": p} for p in ["ab", "cab"] for _ in range(4)])
    assert len(forwards) == 1  # the reference's

    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    with torch.no_grad():
        recomputed = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, output["completion_ids"].size(1)
        )[0]
    mask = output["completion_mask"].bool()
    assert mask.sum() > 8
    torch.testing.assert_close(output["old_per_token_logps"][mask], recomputed[mask], atol=1e-5, rtol=1e-5)


def test_inverse_cdf_sampling_scores_the_rollouts_when_generation_kwargs_process_the_logits(tmp_path, tiny_paths):
    """min_new_tokens masks the end of sequence before the sampler sees the scores: those are not the policy's
    log-probabilities, so the rollouts get their own forward and the KL to the unchanged reference starts at 0."""
    args = config(
        tmp_path, baseline="mean", beta=0.5, inverse_cdf_sampling=True, generation_kwargs={"min_new_tokens": 6}
    )
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    trainer.model.train()
    trainer._generate_and_score_completions([{"prompt": p} for p in ["ab", "cab"] for _ in range(4)])
    assert trainer._metrics["train"]["kl"] == [pytest.approx(0.0, abs=1e-6)]


def test_inverse_cdf_sampling_trains_and_restores_the_sampling_config(tmp_path, tiny_paths):
    args = config(tmp_path, beta=0.1, inverse_cdf_sampling=True)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    before = snapshot(trainer.model.named_parameters())
    trainer.train()
    assert changed(before, trainer.model.named_parameters())
    assert trainer.generation_config.do_sample and "generate" not in vars(trainer.model)
    assert all(length > 0 for length in logged(trainer, "completions/mean_length"))


def test_bad_value_models_are_named(tmp_path, tiny_paths):
    kwargs = {"model": tiny_paths["policy"], "reward_funcs": count_a, "train_dataset": PROMPTS}
    with pytest.raises(TypeError, match="value_model must be"):
        ReinforceTrainer(args=config(tmp_path), value_model=42, **kwargs)
    with pytest.raises(TypeError, match="value_model must be"):
        ReinforceTrainer(args=config(tmp_path), value_model=nn.Linear(4, 1), **kwargs)
    with pytest.raises(ValueError, match="value_model is only used with baseline='critic'"):
        ReinforceTrainer(args=config(tmp_path, baseline="rloo"), value_model=tiny_paths["policy"], **kwargs)
    with pytest.raises(TypeError, match="ReinforceConfig"):
        ReinforceTrainer(args=RLOOConfig(str(tmp_path), bf16=False, report_to="none"), **kwargs)


def test_rloo_baseline_reproduces_trl_rloo_advantages_at_token_level(tmp_path, tiny_paths):
    from trl import RLOOTrainer

    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 8, "num_generations": 4}
    settings.update({"max_completion_length": 6, "beta": 0.0, "bf16": False, "report_to": "none"})
    trl_trainer = RLOOTrainer(
        model=tiny_paths["policy"], reward_funcs=count_a, args=RLOOConfig(**settings), train_dataset=PROMPTS
    )
    ours = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=count_a,
        args=ReinforceConfig(baseline="rloo", **settings),
        train_dataset=PROMPTS,
    )
    batch = [{"prompt": prompt} for prompt in ["ab", "ab", "ab", "ab", "cab", "cab", "cab", "cab"]]
    outputs = []
    for trainer in (trl_trainer, ours):
        trainer.model.train()
        torch.manual_seed(0)
        outputs.append(trainer._generate_and_score_completions(batch))
    trl_output, our_output = outputs
    assert torch.equal(trl_output["completion_ids"], our_output["completion_ids"])
    mask = our_output["completion_mask"]
    torch.testing.assert_close(our_output["advantages"], trl_output["advantages"][:, None] * mask)
    assert trl_output["advantages"].abs().sum() > 0  # the check compares something


def test_masked_truncated_completions_teach_neither_policy_nor_critic(tmp_path, abc_tokenizer):
    special = [abc_tokenizer.pad_token_id, abc_tokenizer.bos_token_id, abc_tokenizer.unk_token_id]
    args = config(
        tmp_path,
        mask_truncated_completions=True,
        max_completion_length=3,
        max_steps=1,
        generation_kwargs={"suppress_tokens": special},  # a completion ends with EOS or is cut off
    )
    trainer = ReinforceTrainer(
        model=build_tiny_causal_lm(abc_tokenizer, seed=1),
        reward_funcs=count_a,
        args=args,
        train_dataset=PROMPTS,
        processing_class=abc_tokenizer,
    )
    seen = {}
    first_pass = trainer.critic.first_pass

    def record(input_ids, attention_mask, returns, mask, layer_input=None):
        seen["mask"] = mask
        return first_pass(input_ids, attention_mask, returns, mask, layer_input)

    trainer.critic.first_pass = record
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": p} for p in ["ab"] * 4 + ["cab"] * 4])
    ended = (output["completion_ids"] == abc_tokenizer.eos_token_id).any(dim=1)
    assert (~ended).any() and ended.any()  # some completions were cut off at 3 tokens, some ended
    assert (output["advantages"][~ended] == 0).all() and (seen["mask"][~ended] == 0).all()
    assert (seen["mask"][ended].sum(dim=1) > 0).all()


@pytest.mark.parametrize("inverse_cdf_sampling", [True, False])
def test_optimal_token_baseline_reads_the_sampling_distribution(tmp_path, tiny_paths, inverse_cdf_sampling):
    """OTB's log π and Σ_a π² are those of the policy at the sampling temperature: kept by the sampler, or from a
    forward pass; the baselines are `advantages.optimal_token_baseline` of them."""
    args = config(tmp_path, baseline="otb", temperature=0.7, inverse_cdf_sampling=inverse_cdf_sampling)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    trainer.model.train()
    rollouts, baselines = [], []
    rollout, choose = trainer._rollout, trainer._baselines
    trainer._rollout = lambda *a: rollouts.append(rollout(*a)) or rollouts[-1]
    trainer._baselines = lambda *a: baselines.append((a, choose(*a))) or baselines[-1][1]
    torch.manual_seed(0)
    trainer._generate_and_score_completions([{"prompt": p} for p in ["ab", "cab"] for _ in range(4)])
    (record,) = rollouts
    mask = record.completion_mask.bool()
    logps, sums = trainer._sampling_statistics(
        record.input_ids, record.attention_mask, record.completion_ids.size(1), batch_size=8
    )
    torch.testing.assert_close(record.rollout_logps[mask], logps[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(record.sum_squared_probs[mask], sums[mask], atol=1e-5, rtol=1e-5)
    assert (sums[mask] < 1).all() and (sums[mask] > 0).all()
    ((_, _, returns, step_mask, *_), chosen) = baselines[0]
    expected = optimal_token_baseline(returns, logps, sums, step_mask.float(), 4)
    torch.testing.assert_close(chosen * step_mask, expected * step_mask, atol=1e-5, rtol=1e-5)


def test_isolated_ablation_trains_the_critic_and_ignores_it(tmp_path, tiny_paths):
    """critic_weight=0: the critic trains as ever, and the baselines are the others' mean of G_t, whatever it says."""
    args = config(tmp_path, critic_weight=0.0, beta=0.1, max_steps=4)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    critic_before = snapshot(p for p in trainer.value_model.named_parameters() if p[1].requires_grad)
    chosen = []
    choose = trainer._baselines
    trainer._baselines = lambda *a: chosen.append((a, choose(*a))) or chosen[-1][1]
    trainer.train()
    assert len(chosen) == 4 and logged(trainer, "critic/weight") == [0.0] * 4
    for (_, _, returns, mask, *_), baselines in chosen:
        others = leave_one_out_mean(carry_forward(returns, mask), 4).nan_to_num(0.0)
        torch.testing.assert_close(baselines * mask, others * mask)
    assert changed(critic_before, trainer.value_model.named_parameters()) == set(critic_before)


@pytest.mark.parametrize("baseline", ["critic", "otb"])
def test_one_generation_per_prompt_compares_with_the_rest_of_the_batch(tmp_path, tiny_paths, baseline):
    args = config(tmp_path, baseline=baseline, num_generations=1, max_steps=3, beta=0.1)
    trainer = ReinforceTrainer(model=tiny_paths["policy"], reward_funcs=count_a, args=args, train_dataset=PROMPTS)
    policy = trainer.model
    before = snapshot(policy.named_parameters())
    chosen = []
    choose = trainer._baselines
    trainer._baselines = lambda *a: chosen.append((a, choose(*a))) or chosen[-1][1]
    trainer.train()
    assert changed(before, policy.named_parameters()) == set(before)
    (rollout, batch_values, returns, mask, _, group_size, _), baselines = chosen[0]
    assert group_size == 1
    if baseline == "critic":  # the first batch has w = 0: the mean of the other seven completions' G_t
        assert batch_values.group == 8
        others = leave_one_out_mean(carry_forward(returns, mask), 8)
    else:
        others = optimal_token_baseline(returns, rollout.rollout_logps, rollout.sum_squared_probs, mask.float(), 8)
    torch.testing.assert_close(baselines * mask, others.nan_to_num(0.0) * mask)
