"""The reward model scores exactly as it was trained, however it is handed to `ReinforceTrainer`
(`hf_reinforce.reward_models`): rewards equal `RewardTrainer`'s own scores of the same texts."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from hf_reinforce.reward_models import (
    REWARD_TRAINING_FILE,
    RewardModelScorer,
    SharedBaseRewardScorer,
    load_reward_adapter,
    unwrap_scorer,
)
from hf_reinforce.rollout import Rollout
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer, make_preference_dataset


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PROMPTS = ["bcd:", "xyz:", "klm:"]
COMPLETIONS = ["aabqa", "qqq", "banana"]


def save_base(directory, pad_is_eos: bool = False) -> str:
    tokenizer = build_tiny_tokenizer()
    if pad_is_eos:  # as real chat models such as SmolLM2
        tokenizer.pad_token = tokenizer.eos_token
    build_tiny_causal_lm(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def train_reward_model(base: str, output_dir, **kwargs) -> RewardTrainer:
    args = RewardConfig(
        output_dir=str(output_dir),
        max_steps=10,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=base, args=args, train_dataset=make_preference_dataset(64), **kwargs)
    trainer.train()
    trainer.save_model()
    return trainer


def own_scores(trainer: RewardTrainer, prompts, completions) -> torch.Tensor:
    """The reward trainer's scores of prompt + completion, through its own data pipeline (EOS, tokenization)."""
    rows = Dataset.from_dict({"prompt": prompts, "chosen": completions, "rejected": completions})
    rows = trainer._prepare_dataset(rows, trainer.processing_class, trainer.args, "scored")
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return logits[: len(prompts)]


def finished_ids(tokenizer, completions) -> list[list[int]]:
    return [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]


def trainer_scores(tmp_path, policy: str, reward_funcs, **kwargs) -> torch.Tensor:
    args = ReinforceConfig(
        output_dir=str(tmp_path / "policy"), per_device_train_batch_size=4, num_generations=2, report_to="none"
    )
    trainer = ReinforceTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        **kwargs,
    )
    scorer = trainer.reward_funcs[0]
    assert isinstance(scorer, RewardModelScorer)
    ids = finished_ids(scorer.tokenizer, COMPLETIONS)
    return torch.tensor(scorer(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids))


@pytest.fixture(scope="module")
def qlora_reward(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qlora_rm")
    base = save_base(directory / "base")
    trainer = train_reward_model(
        base, directory / "adapter", quantization_config=NF4, peft_config=LoraConfig(task_type="SEQ_CLS", **LORA)
    )
    return base, directory / "adapter", trainer


@pytest.fixture(scope="module")
def full_reward(tmp_path_factory):
    directory = tmp_path_factory.mktemp("full_rm")
    base = save_base(directory / "base")
    return base, directory / "model", train_reward_model(base, directory / "model")


def test_reward_adapter_path_goes_back_onto_its_4bit_base(tmp_path, qlora_reward):
    base, adapter, reward_trainer = qlora_reward
    assert (adapter / REWARD_TRAINING_FILE).is_file()
    # No quantization_config given to the trainer: the adapter's record says how its base was loaded
    scores = trainer_scores(tmp_path, base, str(adapter))
    torch.testing.assert_close(scores, own_scores(reward_trainer, PROMPTS, COMPLETIONS), atol=1e-4, rtol=0)


def test_loading_a_reward_adapter_reports_no_missing_head_and_keeps_the_trained_one(qlora_reward, capfd, caplog):
    _, adapter, reward_trainer = qlora_reward
    model, _ = load_reward_adapter(adapter)
    output = capfd.readouterr()
    assert "LOAD REPORT" not in output.out + output.err + caplog.text
    trained = reward_trainer.model.get_submodule("base_model.model.score.modules_to_save.default").weight
    loaded = model.get_submodule("base_model.model.score.modules_to_save.default").weight
    torch.testing.assert_close(loaded.float(), trained.float())


@pytest.mark.parametrize("quantized", [True, False])
def test_loaded_peft_reward_model_gets_its_tokenizer(tmp_path, qlora_reward, quantized):
    base, adapter, reward_trainer = qlora_reward
    kwargs = {"quantization_config": NF4} if quantized else {}
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, **kwargs)
    reward_model = PeftModel.from_pretrained(model, adapter).eval()
    scores = trainer_scores(tmp_path, base, reward_model)  # no reward_processing_classes
    expected = own_scores(reward_trainer, PROMPTS, COMPLETIONS)
    if quantized:
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    else:  # the adapter on a full-precision base: not what was trained, and visibly so
        assert not torch.allclose(scores, expected, atol=1e-4)


def test_a_peft_reward_model_without_any_tokenizer_is_refused_when_the_trainer_is_built(tmp_path, qlora_reward):
    base, adapter, _ = qlora_reward
    reward_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), adapter
    )
    reward_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="reward_processing_classes=tokenizer"):
        trainer_scores(tmp_path, base, reward_model)


def test_full_reward_model_as_a_path_and_as_a_model(tmp_path, full_reward):
    base, folder, reward_trainer = full_reward
    expected = own_scores(reward_trainer, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(trainer_scores(tmp_path, base, str(folder)), expected, atol=1e-4, rtol=0)
    reward_model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    torch.testing.assert_close(trainer_scores(tmp_path, base, reward_model), expected, atol=1e-4, rtol=0)


def test_pad_token_equal_to_eos_scores_as_trained(tmp_path):
    """With pad = EOS the model reads the token before the EOS, in training and in scoring alike."""
    base = save_base(tmp_path / "base", pad_is_eos=True)
    reward_trainer = train_reward_model(base, tmp_path / "rm")
    scores = trainer_scores(tmp_path, base, str(tmp_path / "rm"))
    torch.testing.assert_close(scores, own_scores(reward_trainer, PROMPTS, COMPLETIONS), atol=1e-4, rtol=0)


def test_conversational_completions_score_as_trained(tmp_path):
    base = save_base(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if not loop.last or not continue_final_message"
        " %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    tokenizer.save_pretrained(base)
    pairs = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in make_preference_dataset(64)
    ]
    args = RewardConfig(
        output_dir=str(tmp_path / "rm"),
        max_steps=5,
        per_device_train_batch_size=16,
        report_to="none",
        save_strategy="no",
    )
    reward_trainer = RewardTrainer(model=base, args=args, train_dataset=Dataset.from_list(pairs))
    reward_trainer.train()
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    scorer = RewardModelScorer(reward_trainer.model, tokenizer, [tokenizer.eos_token_id], name="rm")
    ids = finished_ids(tokenizer, COMPLETIONS)
    scores = torch.tensor(scorer(prompts=prompts, completions=completions, completion_ids=ids))
    rows = Dataset.from_dict({"prompt": prompts, "chosen": completions, "rejected": completions})
    rows = reward_trainer._prepare_dataset(rows, reward_trainer.processing_class, reward_trainer.args, "scored")
    batch = reward_trainer.data_collator([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        expected = reward_trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:3, 0]
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_a_cut_off_completion_is_scored_without_a_closing_eos(qlora_reward):
    _, adapter, reward_trainer = qlora_reward
    model = unwrap_scorer(reward_trainer.model)
    tokenizer = reward_trainer.processing_class
    scorer = RewardModelScorer(model, tokenizer, [tokenizer.eos_token_id], name="rm")
    cut_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]  # no EOS: cut off
    texts = scorer.texts(PROMPTS, COMPLETIONS, scorer.finished(cut_ids))
    assert texts == [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    cut = torch.tensor(scorer(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=cut_ids))
    finished = torch.tensor(
        scorer(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=finished_ids(tokenizer, COMPLETIONS))
    )
    torch.testing.assert_close(finished, own_scores(reward_trainer, PROMPTS, COMPLETIONS), atol=1e-4, rtol=0)
    assert not torch.allclose(cut, finished)


def test_missing_eos_penalty_lowers_only_cut_off_completions(tmp_path, qlora_reward):
    base, _, _ = qlora_reward
    args = ReinforceConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, missing_eos_penalty=2.0
    )
    trainer = ReinforceTrainer(
        model=base,
        reward_funcs=lambda completions, **kwargs: [1.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    eos, pad = trainer.processing_class.eos_token_id, trainer.processing_class.pad_token_id
    rollout = Rollout(
        prompt_ids=torch.ones(4, 1, dtype=torch.long),
        prompt_mask=torch.ones(4, 1, dtype=torch.long),
        completion_ids=torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [5, 6, 7, eos]]),
        completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]),
        rewards_per_func=torch.ones(4, 1),
        rollout_logps=None,
        reference_logps=None,
        critic_layer_input=None,
        local=slice(0, 4),
    )
    torch.testing.assert_close(trainer._rewards(rollout), torch.tensor([1.0, -1.0, 1.0, 1.0]))


def test_cpu_defaults_build_configs_and_trainers(tmp_path, full_reward):
    base, folder, _ = full_reward
    assert RewardConfig(str(tmp_path)).bf16 is False and ReinforceConfig(str(tmp_path)).bf16 is False
    RewardTrainer(model=base, train_dataset=make_preference_dataset(8))
    ReinforceTrainer(model=base, reward_funcs=str(folder), train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def quantized_weights(model) -> set[int]:
    """The storage of every 4-bit weight a model holds."""
    return {p.data_ptr() for p in model.parameters() if p.__class__.__name__ == "Params4bit"}


def test_reward_adapter_on_the_policys_base_is_one_set_of_weights_scoring_alike(tmp_path, qlora_reward):
    base, adapter, reward_trainer = qlora_reward
    args = ReinforceConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=1, report_to="none"
    )
    trainer = ReinforceTrainer(
        model=base,
        reward_funcs=str(adapter),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        quantization_config=NF4,
        peft_config=LoraConfig(**LORA),
    )
    scorer, policy = trainer.reward_funcs[0], trainer.model
    assert isinstance(scorer, SharedBaseRewardScorer) and scorer.model is policy
    assert set(policy.peft_config) == {"default", "reward", "critic"}
    assert trainer.value_model.backbone is policy  # policy, reference (adapters off), critic and reward model
    assert len(quantized_weights(policy)) > 0 and quantized_weights(trainer.value_model) == quantized_weights(policy)
    ids = finished_ids(scorer.tokenizer, COMPLETIONS)
    shared = torch.tensor(scorer(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids))
    torch.testing.assert_close(shared, own_scores(reward_trainer, PROMPTS, COMPLETIONS), atol=1e-4, rtol=0)
    # the critic starts from the reward adapter, and the policy's own adapter is what trains
    reward_before = {n: p.clone() for n, p in policy.named_parameters() if ".reward." in n}
    trainer.train()
    assert all(torch.equal(p, reward_before[n]) for n, p in policy.named_parameters() if ".reward." in n)
    after = torch.tensor(scorer(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids))
    torch.testing.assert_close(after, shared)  # training the policy and critic leaves the reward model as it was


def test_reward_shares_base_can_be_refused_or_required(tmp_path, qlora_reward):
    base, adapter, _ = qlora_reward
    kwargs = {
        "model": base,
        "reward_funcs": str(adapter),
        "train_dataset": Dataset.from_dict({"prompt": PROMPTS}),
        "peft_config": LoraConfig(**LORA),
    }
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 2}
    separate = ReinforceTrainer(
        args=ReinforceConfig(**settings, reward_shares_base=False), quantization_config=NF4, **kwargs
    )
    assert not isinstance(separate.reward_funcs[0], SharedBaseRewardScorer)
    with pytest.raises(ValueError, match="reward_shares_base=True.*quantised otherwise"):
        ReinforceTrainer(args=ReinforceConfig(**settings, reward_shares_base=True), **kwargs)  # a full-precision base
