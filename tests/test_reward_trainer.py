import inspect
import json

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

from hf_reinforce import RewardConfig, RewardTrainer
from hf_reinforce.losses import bradley_terry_loss
from hf_reinforce.speedups.quantization import keep_4bit_layers_differentiable
from hf_reinforce.testing import (
    build_tiny_reward_model,
    build_tiny_tokenizer,
    gold_reward,
    make_preference_dataset,
    save_tiny_models,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def tiny_config(output_dir, config_class=RewardConfig, **overrides) -> RewardConfig:
    # TRL's default `bf16=True` needs a GPU (or `use_cpu=True`); checkpointing only slows tiny models down
    config = {
        "output_dir": str(output_dir),
        "bf16": False,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": 8,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }
    config.update(overrides)
    return config_class(**config)


def score_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Rewards of `texts` as the trainer sees them: EOS appended, padded on the right."""
    batch = tokenizer(
        [text + tokenizer.eos_token for text in texts], padding=True, return_tensors="pt", padding_side="right"
    )
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)


def pair_set(dataset: Dataset) -> set[tuple[str, str, str]]:
    return set(zip(dataset["prompt"], dataset["chosen"], dataset["rejected"]))


def pair_rewards(model, tokenizer, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = score_texts(model, tokenizer, [row["prompt"] + row["chosen"] for row in dataset])
    rejected = score_texts(model, tokenizer, [row["prompt"] + row["rejected"] for row in dataset])
    return chosen, rejected  # (num_pairs,) each


@pytest.mark.parametrize("soft", [False, True], ids=["hard_labels", "soft_labels"])
def test_learns_gold_preference_on_held_out_pairs(tokenizer, tmp_path, soft):
    train_dataset = make_preference_dataset(1000, seed=0, soft=soft)
    held_out = make_preference_dataset(200, seed=1)
    assert not pair_set(held_out) & pair_set(train_dataset)
    model = build_tiny_reward_model(tokenizer)
    args = tiny_config(
        tmp_path, max_steps=80, per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="constant"
    )
    RewardTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer).train()

    rewards_chosen, rewards_rejected = pair_rewards(model, tokenizer, held_out)
    gold_prefers_chosen = torch.tensor([gold_reward(row["chosen"]) > gold_reward(row["rejected"]) for row in held_out])
    accuracy = ((rewards_chosen > rewards_rejected) == gold_prefers_chosen).float().mean().item()
    print(f"held-out accuracy ({'soft' if soft else 'hard'} labels): {accuracy:.3f}")
    assert accuracy >= 0.9


def test_soft_labels_reach_the_loss_and_metrics(tokenizer, tmp_path):
    dataset = make_preference_dataset(8, seed=2).add_column("chosen_prob", [0.0, 0.1, 0.3, 0.5, 0.5, 0.8, 0.95, 1.0])
    model = build_tiny_reward_model(tokenizer)
    with torch.no_grad():
        model.score.weight.mul_(30)  # spread the initial rewards so that soft and hard losses differ
    rewards_chosen, rewards_rejected = pair_rewards(model, tokenizer, dataset)
    chosen_prob = torch.tensor(dataset["chosen_prob"])
    expected_loss = bradley_terry_loss(rewards_chosen, rewards_rejected, chosen_prob).item()
    hard_label_loss = bradley_terry_loss(rewards_chosen, rewards_rejected).item()
    assert abs(expected_loss - hard_label_loss) > 0.05

    # One step on the whole dataset: the logged loss is the loss of the initial model, whatever the row order
    args = tiny_config(tmp_path, max_steps=1, learning_rate=1e-2)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["chosen_prob"].tolist()) == pytest.approx(sorted(dataset["chosen_prob"]))
    weights_before = model.score.weight.clone()
    trainer.train()

    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)
    chosen_wins, rejected_wins = rewards_chosen > rewards_rejected, rewards_rejected > rewards_chosen
    expected_soft_accuracy = (chosen_prob * chosen_wins + (1 - chosen_prob) * rejected_wins).mean().item()
    assert logs["soft_accuracy"] == pytest.approx(expected_soft_accuracy, rel=1e-6)
    assert logs["accuracy"] == pytest.approx(chosen_wins.float().mean().item(), rel=1e-6)
    assert logs["mean_chosen_reward"] == pytest.approx(rewards_chosen.mean().item(), rel=1e-4, abs=1e-5)
    assert logs["mean_rejected_reward"] == pytest.approx(rewards_rejected.mean().item(), rel=1e-4, abs=1e-5)
    assert not torch.equal(model.score.weight, weights_before)


def test_margin_and_chosen_prob_combine_in_the_loss(tokenizer, tmp_path):
    dataset = make_preference_dataset(8, seed=3, soft=True).add_column("margin", [0.0, 0.5, 1.0, 2.0] * 2)
    model = build_tiny_reward_model(tokenizer)
    with torch.no_grad():
        model.score.weight.mul_(30)
    rewards_chosen, rewards_rejected = pair_rewards(model, tokenizer, dataset)
    margin, chosen_prob = torch.tensor(dataset["margin"]), torch.tensor(dataset["chosen_prob"])
    expected_loss = bradley_terry_loss(rewards_chosen, rewards_rejected, chosen_prob, margin).item()
    assert abs(expected_loss - bradley_terry_loss(rewards_chosen, rewards_rejected, chosen_prob).item()) > 0.05

    trainer = RewardTrainer(
        model=model, args=tiny_config(tmp_path, max_steps=1), train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected_loss, rel=1e-5)


def padded_share(trainer) -> float:
    """Share of the tokens of one epoch's batches that are padding."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        padded += batch["attention_mask"].numel()
        real += batch["attention_mask"].sum().item()
    return 1 - real / padded


def test_length_grouped_batches_pad_less_and_still_train(tokenizer, tmp_path):
    # Pairs of very different lengths: random batches pad the short ones to the long ones
    dataset = make_preference_dataset(64, seed=4, soft=True)
    dataset = dataset.map(
        lambda row, index: {"chosen": row["chosen"] * (1 + index % 8), "rejected": row["rejected"] * (1 + index % 8)},
        with_indices=True,
    )
    random_batches = RewardTrainer(
        model=build_tiny_reward_model(tokenizer),
        args=tiny_config(tmp_path, per_device_train_batch_size=8),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    model = build_tiny_reward_model(tokenizer)
    grouped = RewardTrainer(
        model=model,
        args=tiny_config(tmp_path, per_device_train_batch_size=8, train_sampling_strategy="group_by_length"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    lengths = grouped.train_dataset["length"]
    rows = grouped.train_dataset
    assert lengths == [max(len(c), len(r)) for c, r in zip(rows["chosen_ids"], rows["rejected_ids"], strict=True)]
    print(f"padding: {padded_share(random_batches):.3f} in random batches, {padded_share(grouped):.3f} grouped")
    assert padded_share(grouped) < 0.75 * padded_share(random_batches)
    batch = next(iter(grouped.get_train_dataloader()))
    assert "chosen_prob" in batch and "length" not in batch  # the collator keeps only what the loss reads
    score_before = model.score.weight.clone()
    grouped.train()
    assert not torch.equal(model.score.weight, score_before)


def test_same_constructor_as_trl():
    ours, theirs = inspect.signature(RewardTrainer.__init__), inspect.signature(trl.RewardTrainer.__init__)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [parameter.default for parameter in ours.parameters.values()] == [
        parameter.default for parameter in theirs.parameters.values()
    ]


def train_from_path(trainer_class, config_class, model_path, output_dir, dataset):
    # The same call a TRL user writes; only the two classes change
    args = tiny_config(output_dir, config_class=config_class, gradient_checkpointing=True)
    trainer = trainer_class(model=model_path, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    return trainer, [logs for logs in trainer.state.log_history if "loss" in logs]


@pytest.mark.parametrize("config_class", [RewardConfig, trl.RewardConfig], ids=["our_config", "trl_config"])
def test_drop_in_replacement_for_trl(model_paths, tmp_path, config_class):
    # Hard labels with TRL's `margin` column: ours must train exactly like TRL and log at least TRL's metrics
    dataset = make_preference_dataset(32, seed=4).add_column("margin", [0.5] * 32)
    model_path = model_paths["reward_model"]
    reference, reference_logs = train_from_path(
        trl.RewardTrainer, trl.RewardConfig, model_path, tmp_path / "trl", dataset
    )
    trainer, logs = train_from_path(RewardTrainer, config_class, model_path, tmp_path / "ours", dataset)

    assert len(logs) == len(reference_logs) == 3
    assert [step["loss"] for step in logs] == pytest.approx([step["loss"] for step in reference_logs], rel=1e-6)
    assert set(reference_logs[0]) < set(logs[0])
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(reference.evaluate()["eval_accuracy"])


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize(
    "compute_dtype, quantization",
    [
        (torch.float32, "trainer_argument"),
        (torch.bfloat16, "trainer_argument"),
        (torch.bfloat16, "model_init_kwargs"),
        (torch.float32, "loaded_model"),
    ],
    ids=["fp32_compute", "bf16_compute", "bf16_compute_model_init_kwargs", "fp32_compute_loaded_4bit_model"],
)
def test_qlora_trains_saves_and_reloads_with_its_head(model_paths, tmp_path, compute_dtype, quantization):
    base = model_paths["reward_model"]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # no `modules_to_save`
    model, model_init_kwargs, quantization_config = base, None, None
    if quantization == "trainer_argument":
        quantization_config = bnb_config
    elif quantization == "model_init_kwargs":
        model_init_kwargs = {"quantization_config": bnb_config}
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base, quantization_config=bnb_config)
    args = tiny_config(tmp_path, learning_rate=1e-2, model_init_kwargs=model_init_kwargs)
    dataset = make_preference_dataset(24, seed=5, soft=True)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        quantization_config=quantization_config,
        peft_config=peft_config,
    )
    assert trainer.model.is_loaded_in_4bit
    assert peft_config.modules_to_save is None  # the user's config is left as it was
    before = trainable_parameters(trainer.model)
    assert any(".score." in name for name in before) and any("lora_B" in name for name in before)
    # An evaluation first: bitsandbytes must not switch the 4-bit layers to its CPU inference kernel, which has no
    # backward and would leave the LoRA layers below them without gradient
    assert 0 <= trainer.evaluate(dataset)["eval_soft_accuracy"] <= 1
    trainer.train()
    after = trainable_parameters(trainer.model)
    assert [name for name in before if torch.equal(before[name], after[name])] == []

    trainer.save_model(tmp_path)
    modules_to_save = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert "score" in modules_to_save and len(modules_to_save) == len(set(modules_to_save))
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as adapter_file:
        assert any("score" in key for key in adapter_file.keys())
    texts = [row["prompt"] + row["chosen"] for row in dataset]
    trained_rewards = score_texts(trainer.model, trainer.processing_class, texts)
    reloaded = AutoModelForSequenceClassification.from_pretrained(base, quantization_config=bnb_config)
    # the same bitsandbytes kernel as the trainer's model: its CPU inference kernel rounds differently (~1e-3)
    reloaded = keep_4bit_layers_differentiable(PeftModel.from_pretrained(reloaded, tmp_path))
    reloaded_rewards = score_texts(reloaded, trainer.processing_class, texts)
    torch.testing.assert_close(reloaded_rewards, trained_rewards, atol=1e-4, rtol=0)
    with reloaded.disable_adapter():
        base_rewards = score_texts(reloaded, trainer.processing_class, texts)
    assert (base_rewards - trained_rewards).abs().max() > 1e-2  # so the check above would catch a lost adapter


def with_row(dataset: Dataset, index: int, **values) -> Dataset:
    rows = dataset.to_list()
    rows[index].update(values)
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.remove_columns("rejected"), r"no `rejected` column.*rename_column"),
        (lambda d: d.rename_column("chosen", "response_a"), r"no `chosen` column.*rename_column"),
        (lambda d: with_row(d, 2, chosen=""), r"Row 2 of the train dataset has an empty `chosen`.*filter"),
        (lambda d: with_row(d, 3, rejected="  "), r"Row 3 of the train dataset has an empty `rejected`"),
        (lambda d: with_row(d, 1, chosen_prob=1.5), r"Row 1 of the train dataset has `chosen_prob`=1.5.*\[0, 1\]"),
        (lambda d: with_row(d, 0, chosen_prob=-0.1), r"Row 0 .*`chosen_prob`=-0.1"),
        (lambda d: with_row(d, 4, chosen_prob=float("nan")), r"Row 4 .*`chosen_prob`=nan"),
    ],
    ids=["no_rejected", "no_chosen", "empty_chosen", "blank_rejected", "prob_above_1", "prob_below_0", "prob_nan"],
)
def test_bad_preference_data_fails_at_construction(tokenizer, tmp_path, corrupt, message):
    dataset = corrupt(make_preference_dataset(6, seed=6, soft=True))
    with pytest.raises(ValueError, match=message):
        RewardTrainer(
            model=build_tiny_reward_model(tokenizer),
            args=tiny_config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_bad_eval_data_names_the_eval_dataset(tokenizer, tmp_path):
    dataset = make_preference_dataset(6, seed=7, soft=True)
    with pytest.raises(ValueError, match=r"Row 5 of the eval dataset has `chosen_prob`"):
        RewardTrainer(
            model=build_tiny_reward_model(tokenizer),
            args=tiny_config(tmp_path),
            train_dataset=dataset,
            eval_dataset=with_row(dataset, 5, chosen_prob=2.0),
            processing_class=tokenizer,
        )


def test_streaming_dataset_is_checked_as_it_is_read(tokenizer, tmp_path):
    dataset = with_row(make_preference_dataset(16, seed=8, soft=True), 9, chosen_prob=float("nan"))
    trainer = RewardTrainer(
        model=build_tiny_reward_model(tokenizer),
        args=tiny_config(tmp_path, max_steps=4, per_device_train_batch_size=4),
        train_dataset=dataset.to_iterable_dataset(),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"Row 9 of the train dataset has `chosen_prob`=nan"):
        trainer.train()


@pytest.mark.parametrize(
    "field, value", [("max_length", 0), ("center_rewards_coefficient", -0.01)], ids=["max_length", "center"]
)
def test_config_rejects_values_that_cannot_train(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(tmp_path, **{field: value})


def test_shared_prefix_forward_trains_as_the_full_forward_on_fewer_tokens(tokenizer, tmp_path, monkeypatch):
    dataset = make_preference_dataset(32, seed=5, soft=True)
    dataset = dataset.map(lambda row: {"prompt": "rate it briefly. " + row["prompt"]})  # 17 shared tokens
    seen_lengths, runs = [], []
    forward = type(build_tiny_reward_model(tokenizer)).forward

    def recording_forward(model, input_ids=None, **kwargs):
        seen_lengths.append(input_ids.size(1))
        return forward(model, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(build_tiny_reward_model(tokenizer)), "forward", recording_forward)
    for shared in (False, True):
        model = build_tiny_reward_model(tokenizer)
        args = tiny_config(tmp_path / str(shared), learning_rate=1e-2, shared_prefix_forward=shared)
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        seen_lengths.clear()
        trainer.train()
        runs.append(([e["loss"] for e in trainer.state.log_history if "loss" in e], list(seen_lengths)))
    (plain_losses, plain_lengths), (shared_losses, shared_lengths) = runs
    assert shared_losses == pytest.approx(plain_losses, rel=1e-4)
    # one prefix pass and one pass of the rest per step, the rest at least 17 tokens shorter
    assert shared_lengths[0::2] == [17] * 3
    assert all(rest <= full - 17 for rest, full in zip(shared_lengths[1::2], plain_lengths, strict=True))


def test_shared_prefix_forward_refuses_activation_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="`shared_prefix_forward`.*activation_checkpointing: false"):
        tiny_config(tmp_path, shared_prefix_forward=True, gradient_checkpointing=True)
