"""The critic's life cycle (`hf_reinforce.critic`): scale-free fitting, the weight it earns in the baseline, and its
warm start from a reward model (full precision or a 4-bit LoRA adapter)."""

import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from hf_reinforce.advantages import explained_variance
from hf_reinforce.critic import MAX_CRITIC_WEIGHT, RunningMeans, calibration, slope
from hf_reinforce.testing import EnumerableToy, build_tiny_tokenizer, make_preference_dataset, save_tiny_models


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
LORA_KWARGS = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LORA = LoraConfig(**LORA_KWARGS)
PROMPTS = Dataset.from_dict({"prompt": ["bcd:", "xyz:", "klm:", "rst:"] * 8})


def run_args(tmp_path, **overrides) -> ReinforceConfig:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 16,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 1,
        "beta": 0.0,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    return ReinforceConfig(**{**settings, **overrides})


def logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if entry.get(key) is not None]


def test_slope_weighs_the_critic_by_what_it_predicts():
    sums = RunningMeans(("xy", "xx", "yy"))
    assert slope(sums) == 0.0  # nothing seen yet: the critic-free fallback
    x = torch.randn(1000)
    sums.update(torch.stack([(x * x).sum(), (x * x).sum(), (x * x).sum()]))
    assert slope(sums) == pytest.approx(1.0)  # values that are the returns
    noise = RunningMeans(("xy", "xx", "yy"))
    noise.update(torch.tensor([0.0, 5.0, 7.0]))  # uncorrelated with the returns
    assert slope(noise) == 0.0
    lagging = RunningMeans(("xy", "xx", "yy"))
    lagging.update(torch.tensor([10.0, 1.0, 100.0]))  # values that move a tenth as much as the returns
    assert slope(lagging) == MAX_CRITIC_WEIGHT
    flat = RunningMeans(("xy", "xx", "yy"))
    flat.update(torch.tensor([1e-12, 1e-12, 1.0]))  # an untrained critic's constant values
    assert slope(flat) == 0.0


def test_calibration_scales_the_weight_by_how_it_predicted_later_batches():
    check = RunningMeans(("zy", "zz"))
    assert calibration(check) == 0.0  # no prediction made yet
    check.update(torch.tensor([5.0, 5.0]))  # the weighted values predicted the next batch exactly
    assert calibration(check) == pytest.approx(1.0)
    overshooting = RunningMeans(("zy", "zz"))
    overshooting.update(torch.tensor([2.0, 8.0]))  # the fitted weight was four times too large out of sample
    assert calibration(overshooting) == pytest.approx(0.25)
    wrong = RunningMeans(("zy", "zz"))
    wrong.update(torch.tensor([-3.0, 4.0]))  # it predicted the opposite
    assert calibration(wrong) == 0.0


def test_weight_falls_within_20_batches_once_the_values_are_noise_while_the_critic_trains(tmp_path):
    """The toy's reward for 30 batches (the critic learns it and earns a weight), then rewards that are pure noise:
    the values the critic keeps learning explain nothing of them, and w must fall to 0.1 or less within 20 batches."""
    toy, noise, calls = EnumerableToy(), random.Random(0), []

    def reward(completions, **kwargs):
        calls.append(len(completions))
        if len(calls) <= 30:
            return toy.reward(completions)
        return [noise.gauss(0.0, 1.0) for _ in completions]

    args = run_args(
        tmp_path,
        max_completion_length=toy.horizon,
        max_steps=50,
        learning_rate=0.0,
        generation_kwargs={"suppress_tokens": toy.suppressed},
        seed=0,
    )
    trainer = ReinforceTrainer(
        model=toy.policy,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [toy.prompt] * 64}),
        processing_class=toy.tokenizer,
    )
    critic_before = {name: p.detach().clone() for name, p in trainer.value_model.named_parameters() if p.requires_grad}
    trainer.train()
    weights = logged(trainer, "critic/weight")
    assert len(weights) == 50 and len(calls) == 50
    print("w per batch:", " ".join(f"{w:.2f}" for w in weights))
    assert max(weights[:30]) > 0.3  # it had earned a weight before the rewards turned to noise
    assert min(weights[30:50]) <= 0.1 and weights[-1] <= 0.1
    trained = {name: p for name, p in trainer.value_model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(critic_before[name], trained[name]) for name in critic_before)


def test_values_come_before_the_critic_fits_and_the_weight_from_earlier_batches_only(tmp_path):
    """Per batch: the values are the critic's before it learns from the batch, w is read from the batches before
    it, then the critic learns and the batch joins the fit of w. Fails if any two of these swap."""
    toy = EnumerableToy()
    args = run_args(
        tmp_path,
        max_completion_length=toy.horizon,
        max_steps=4,
        generation_kwargs={"suppress_tokens": toy.suppressed},
    )
    trainer = ReinforceTrainer(
        model=toy.policy,
        reward_funcs=toy.reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [toy.prompt] * 64}),
        processing_class=toy.tokenizer,
    )
    critic, events = trainer.critic, []
    first_pass, weight, update, observe = critic.first_pass, critic.weight, critic.update, critic.observe

    def spy_first_pass(input_ids, attention_mask, returns, mask, layer_input=None):
        before = critic.values(input_ids, attention_mask, returns.size(1), layer_input)  # the critic as it is
        batch = first_pass(input_ids, attention_mask, returns, mask, layer_input)
        assert torch.allclose(batch.values * mask, before * mask, atol=1e-6)
        events.append("values")
        return batch

    def spy_weight(warming_up=False):
        events.append(("weight", events.count("observe")))
        return weight(warming_up)

    def spy_update(batch):
        events.append("update")
        return update(batch)

    def spy_observe(*args):
        events.append("observe")
        return observe(*args)

    critic.first_pass, critic.weight, critic.update, critic.observe = (
        spy_first_pass,
        spy_weight,
        spy_update,
        spy_observe,
    )
    trainer.train()
    steps = []
    for event in events:
        if event == "values":
            steps.append([])
        if not steps[-1] or steps[-1][-1] != event:
            steps[-1].append(event)
    assert steps == [["values", ("weight", step), "update", "observe"] for step in range(4)]


def test_decayed_means_forget_old_batches():
    means = RunningMeans(("a",), decay=0.5)
    means.update(torch.tensor([4.0]))
    assert means["a"] == pytest.approx(4.0)  # bias-corrected: the first batch is taken as it is
    means.update(torch.tensor([1.0]))
    assert means["a"] == pytest.approx((0.5 * 4 + 1) / 1.5)


REWARD_SCALES = (0.01, 1.0, 1000.0)


@pytest.fixture(scope="module")
def explained_variance_per_reward_scale(tmp_path_factory) -> dict[float, float]:
    """The critic's explained variance of the exact values after 40 steps, at each reward scale: every scale is
    trained here, whichever tests run and in whichever order."""
    results = {}
    for scale in REWARD_SCALES:
        toy = EnumerableToy()

        def scaled_reward(completions, scale=scale, toy=toy, **kwargs):
            return [scale * r for r in toy.reward(completions)]

        args = run_args(
            tmp_path_factory.mktemp(f"scale_{scale}"),
            max_completion_length=toy.horizon,
            max_steps=40,
            learning_rate=0.0,  # the policy stays put: only the critic learns
            generation_kwargs={"suppress_tokens": toy.suppressed},
            seed=0,
        )
        trainer = ReinforceTrainer(
            model=toy.policy,
            reward_funcs=scaled_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": [toy.prompt] * 64}),
            processing_class=toy.tokenizer,
        )
        trainer.train()
        exact, learned = toy.exact_values(), toy.critic_values(trainer.value_model)
        exact_values = torch.tensor([[scale * exact[state] for state in exact]])
        learned_values = torch.tensor([[learned[state] for state in exact]])
        results[scale] = explained_variance(learned_values, exact_values, torch.ones_like(exact_values)).item()
        print(f"reward scale {scale}: explained variance of the exact values after 40 steps {results[scale]:.3f}")
    return results


@pytest.mark.parametrize("scale", REWARD_SCALES)
def test_default_learning_rate_fits_rewards_of_any_scale(explained_variance_per_reward_scale, scale):
    assert explained_variance_per_reward_scale[scale] > 0.5


def test_the_fit_is_the_same_whatever_the_reward_scale(explained_variance_per_reward_scale):
    results = explained_variance_per_reward_scale.values()
    assert len(results) == len(REWARD_SCALES)
    assert max(results) - min(results) <= 0.05


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


def train_reward_model(base_model: str, pairs, output_dir, steps: int = 40, **kwargs) -> RewardTrainer:
    args = RewardConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=base_model, args=args, train_dataset=pairs, **kwargs)
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer


def last_token_values(trainer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's value at the last token of each text, and the reward model's score of it."""
    tokenizer = trainer.processing_class
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    last = inputs["attention_mask"].sum(1) - 1
    with torch.no_grad():
        values = trainer.value_model(inputs["input_ids"], inputs["attention_mask"])
        scores = trainer.reward_funcs[0].scores(inputs)
    return values[torch.arange(len(texts)), last], scores


TEXTS = ["bcd:aaab", "xyz:qwerty", "klm:banana"]


def test_critic_starts_as_the_full_precision_reward_model(tmp_path, tiny_paths):
    reward_model = train_reward_model(tiny_paths["policy"], make_preference_dataset(64), tmp_path / "rm").model
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"], reward_funcs=reward_model, args=run_args(tmp_path), train_dataset=PROMPTS
    )
    values, scores = last_token_values(trainer, TEXTS)
    torch.testing.assert_close(values, scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shares_base", [True, False])
def test_critic_starts_as_a_4bit_reward_adapter(tmp_path, tiny_paths, shares_base):
    """From a QLoRA reward model: its adapter and score head, on the policy's base or on a base of its own."""
    peft_config = LoraConfig(task_type="SEQ_CLS", **LORA_KWARGS)
    pairs = make_preference_dataset(64)
    train_reward_model(tiny_paths["policy"], pairs, tmp_path / "rm", quantization_config=NF4, peft_config=peft_config)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_paths["policy"], num_labels=1, quantization_config=NF4
    )
    reward_model = PeftModel.from_pretrained(base, tmp_path / "rm").eval()
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=reward_model,
        args=run_args(tmp_path, critic_shares_base=shares_base),
        train_dataset=PROMPTS,
        reward_processing_classes=AutoTokenizer.from_pretrained(tiny_paths["policy"]),
        quantization_config=NF4,
        peft_config=LORA,
    )
    assert (trainer.value_model.backbone is trainer.model) == shares_base
    values, scores = last_token_values(trainer, TEXTS)
    torch.testing.assert_close(values, scores, atol=1e-2, rtol=1e-2)  # 4-bit kernels of two models differ slightly
    # the copy trains, although the reward adapter was loaded frozen (PEFT's inference mode)
    critic_parameters = trainer.value_model.trainable_parameters()
    before = [parameter.detach().clone() for parameter in critic_parameters]
    trainer.train()
    assert all(not torch.equal(b, p) for b, p in zip(before, critic_parameters))


def test_a_head_only_critic_trains_its_head_on_the_frozen_reward_adapter(tmp_path, tiny_paths):
    """critic_head_only: the copied reward adapter stays as it was, no gradient reaches it, the head learns."""
    pairs = make_preference_dataset(64)
    peft_config = LoraConfig(task_type="SEQ_CLS", **LORA_KWARGS)
    train_reward_model(tiny_paths["policy"], pairs, tmp_path / "rm", quantization_config=NF4, peft_config=peft_config)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_paths["policy"], num_labels=1, quantization_config=NF4
    )
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=PeftModel.from_pretrained(base, tmp_path / "rm").eval(),
        args=run_args(tmp_path, critic_head_only=True),
        train_dataset=PROMPTS,
        reward_processing_classes=AutoTokenizer.from_pretrained(tiny_paths["policy"]),
        quantization_config=NF4,
        peft_config=LORA,
    )
    critic = trainer.value_model
    head = critic.value_head.weight
    backbone = [p for p in critic.trainable_parameters() if p is not head and p is not critic.value_head.bias]
    assert backbone and trainer.critic.optimizer is None
    before = [p.detach().clone() for p in [*backbone, head]]
    trainer.train()
    assert [p for group in trainer.critic.optimizer.param_groups for p in group["params"]] == [head]
    assert all(torch.equal(b, p) for b, p in zip(before, backbone))
    assert all(p.grad is None for p in backbone)
    assert not torch.equal(before[-1], head)
    assert logged(trainer, "critic/value_loss")


def test_a_head_only_critic_runs_its_frozen_backbone_once_per_batch_whatever_its_epochs(tmp_path, tiny_paths):
    """critic_head_only with critic_epochs=3: each extra epoch fits the head on the first pass's features, and the
    backbone's forward is not run again."""
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=lambda completions, **kwargs: [float(text.count("a")) for text in completions],
        args=run_args(tmp_path, critic_head_only=True, critic_epochs=3, max_steps=2),
        train_dataset=PROMPTS,
    )
    critic = trainer.value_model
    forwards, updates, update = [], [], trainer.critic.update
    critic._decoder().register_forward_hook(lambda *args: forwards.append(1))

    def counted_update(batch):
        before, result = len(forwards), update(batch)
        updates.append((before, len(forwards)))
        return result

    trainer.critic.update = counted_update
    head = critic.value_head.weight.detach().clone()
    trainer.train()
    assert len(updates) == 2 and all(before == after for before, after in updates)  # no forward while fitting
    assert len(forwards) == 2  # each step's first pass, one chunk of 16 rows
    assert not torch.equal(head, critic.value_head.weight)


@pytest.mark.parametrize(
    "top_layer_modules",
    [r".*layers\.1\.self_attn\.(q|k|v|o)_proj", ["layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"]],
)
def test_critic_from_a_top_layer_reward_adapter_starts_at_its_lowest_layer(tmp_path, tiny_paths, top_layer_modules):
    """A reward adapter on the top layer only (chosen by a regular expression or by names, not layers_to_transform):
    the critic copied from it runs that layer alone on the reference pass's hidden states, and scores as before."""
    peft_config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=top_layer_modules)
    pairs = make_preference_dataset(64)
    train_reward_model(tiny_paths["policy"], pairs, tmp_path / "rm", quantization_config=NF4, peft_config=peft_config)
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=str(tmp_path / "rm"),
        args=run_args(tmp_path),
        train_dataset=PROMPTS,
        quantization_config=NF4,
        peft_config=LORA,
    )
    critic = trainer.value_model
    assert critic.backbone is trainer.model and critic.first_trained_layer == 1
    values, scores = last_token_values(trainer, TEXTS)
    torch.testing.assert_close(values, scores, atol=1e-2, rtol=1e-2)
    before = [parameter.detach().clone() for parameter in critic.trainable_parameters()]
    trainer.train()
    assert all(not torch.equal(b, p) for b, p in zip(before, critic.trainable_parameters()))


def count_letters(completions, **kwargs) -> list[float]:
    return [float(len(completion)) for completion in completions]


@pytest.mark.parametrize("quantized", [False, True])
def test_a_critic_of_its_own_checkpoints_activations_as_the_policy_does(tmp_path, tiny_paths, quantized):
    """`activation_checkpointing` reaches a critic on a base of its own too, and changes none of its gradients."""
    trainer = ReinforceTrainer(
        model=tiny_paths["policy"],
        reward_funcs=count_letters,
        args=run_args(tmp_path, critic_shares_base=False, activation_checkpointing=True),
        train_dataset=PROMPTS,
        quantization_config=NF4 if quantized else None,
        peft_config=LORA,
    )
    critic = trainer.value_model
    decoder = critic.backbone.get_base_model()
    assert critic.backbone is not trainer.model and decoder.is_activation_checkpointing
    with torch.no_grad():  # LoRA's B and the head start at zero: some gradients would be zero whatever happened
        for parameter in critic.trainable_parameters():
            parameter.normal_(std=0.1)
    input_ids = AutoTokenizer.from_pretrained(tiny_paths["policy"])(TEXTS[1:2], return_tensors="pt")["input_ids"]

    def gradients() -> list[torch.Tensor]:
        critic.zero_grad(set_to_none=True)
        critic(input_ids).square().sum().backward()
        return [parameter.grad.clone() for parameter in critic.trainable_parameters()]

    checkpointed = gradients()
    decoder.activation_checkpointing_disable()
    for with_checkpoints, without in zip(checkpointed, gradients()):
        assert with_checkpoints.abs().sum() > 0
        torch.testing.assert_close(with_checkpoints, without)


def test_warm_start_from_the_reward_model_learns_faster_than_a_cold_start(tmp_path):
    """On a pretrained language model with a reward model trained on its own completions, as in the demo.

    A reward model learns to score complete texts (ending with EOS), not the prefixes a value model reads, so the
    warm start's first values explain the returns no better than a constant (on some CPUs worse: -1.0 at step 0 on an
    AVX2-only machine, where the cold start's 0.0 is a constant); its features are what pays: over the next nine
    updates the warm-started critic explains far more of the returns than the cold one does.
    """
    from hf_reinforce.examples.demo import label_pairs, pretrain_language_model, sample_completions, split_prompts

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    language_model, _ = pretrain_language_model(tokenizer, num_steps=150, seed=0)
    language_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    train_prompts, _ = split_prompts(64, seed=0)
    pair_prompts = train_prompts[:512]
    pairs = label_pairs(pair_prompts, sample_completions(language_model, tokenizer, pair_prompts, 2, seed=0))
    reward_model = train_reward_model(str(tmp_path / "base"), pairs, tmp_path / "rm", steps=150).model.eval()
    prompts = Dataset.from_dict({"prompt": train_prompts})
    explained = {}
    for warm in (True, False):
        args = run_args(tmp_path, seed=0, per_device_train_batch_size=32, max_completion_length=24, max_steps=10)
        trainer = ReinforceTrainer(
            model=str(tmp_path / "base"),
            reward_funcs=reward_model,
            args=args,
            train_dataset=prompts,
            value_model=None if warm else str(tmp_path / "base"),
        )
        trainer.train()
        explained[warm] = logged(trainer, "critic/explained_variance")
    warm, cold = (sum(explained[start][1:]) / 9 for start in (True, False))
    print(
        f"explained variance at step 0: warm start {explained[True][0]:.2f}, cold start {explained[False][0]:.2f}; "
        f"mean over steps 1-9: warm {warm:.2f}, cold {cold:.2f}"
    )
    assert warm > cold + 0.2
