"""Hub pushes, offline: what `push_to_hub` uploads loads back into the trained models and comes with a model card.

No machine here reaches the Hub, so the upload is intercepted at huggingface_hub's API boundary: `Trainer.push_to_hub`
calls `HfApi.create_repo` and `HfApi.upload_folder`, and the stand-ins below copy the folder (with the same
`ignore_patterns` filtering as the Hub) to a local "captured" repository instead.
"""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer, ValueHeadModel
from hf_reinforce.speedups.quantization import keep_4bit_layers_differentiable
from hf_reinforce.testing import make_preference_dataset, save_tiny_models


REPO_ID = "someone/tiny-test"
DATASET_NAME = "someone/tiny-data"
BNB_CONFIG = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
PROMPTS = Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8})
INPUT_IDS = torch.tensor([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]])


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in for the Hub: a repository's uploads land in `hub.root / repo_id`; calls are recorded."""
    hub = SimpleNamespace(root=tmp_path / "hub", created=[], commits=[])

    def create_repo(self, repo_id, **kwargs):
        hub.created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        folder_path = Path(folder_path)
        files = [path.relative_to(folder_path).as_posix() for path in folder_path.rglob("*") if path.is_file()]
        for relative_path in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            destination = hub.root / repo_id / relative_path
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder_path / relative_path, destination)
        hub.commits.append(commit_message)
        oid = f"{len(hub.commits):040x}"
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=commit_message,
            commit_description="",
            oid=oid,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return hub


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


def last_logged(trainer, key) -> float:
    return [entry[key] for entry in trainer.state.log_history if entry.get(key) is not None][-1]


def card_of(folder: Path) -> tuple[ModelCard, str]:
    card = ModelCard.load(folder / "README.md")
    return card, card.text


def check_citations(text: str, keys: list[str]) -> None:
    for key in keys:
        assert f"{{{key}," in text, key


def train_reinforce(output_dir: Path, policy_path: str, setup: str) -> ReinforceTrainer:
    """A few REINFORCE steps with a critic: QLoRA with the critic on the policy's base or on its own, or full."""
    args = ReinforceConfig(
        output_dir=str(output_dir),
        hub_model_id=REPO_ID,
        baseline="critic",
        critic_shares_base=setup == "qlora_shared_critic",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=1e-2,
        critic_learning_rate=1e-2,
        beta=0.05,
        gamma=0.9,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    qlora = {
        "quantization_config": BNB_CONFIG,
        "peft_config": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    }
    trainer = ReinforceTrainer(
        model=policy_path,
        reward_funcs=count_a,
        args=args,
        train_dataset=PROMPTS,
        **(qlora if setup.startswith("qlora") else {}),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("setup", ["qlora_shared_critic", "full_fine_tuning"])
def test_reinforce_push_uploads_a_loadable_policy_and_a_model_card(tmp_path, tiny_paths, hub, setup):
    trainer = train_reinforce(tmp_path / "run", tiny_paths["policy"], setup)
    trainer.push_to_hub(dataset_name=DATASET_NAME)

    assert hub.created == [REPO_ID] and len(hub.commits) == 1
    captured = hub.root / REPO_ID
    is_adapter = setup != "full_fine_tuning"
    weights = "adapter_model.safetensors" if is_adapter else "model.safetensors"
    for name in (weights, "tokenizer.json", "README.md", "value_model/value_head.safetensors"):
        assert (captured / name).is_file(), name

    policy = trainer.model.eval()
    with torch.no_grad():
        if is_adapter:
            base = AutoModelForCausalLM.from_pretrained(tiny_paths["policy"], quantization_config=BNB_CONFIG)
            reloaded = keep_4bit_layers_differentiable(PeftModel.from_pretrained(base, captured)).eval()
            # TRL trains a QLoRA adapter in bf16 (which loads back as fp32): compute in the dtypes of training
            trained_dtypes = {name: param.dtype for name, param in policy.named_parameters()}
            for name, param in reloaded.named_parameters():
                param.data = param.data.to(trained_dtypes[name])
            with reloaded.disable_adapter():
                base_logits = reloaded(INPUT_IDS).logits
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(captured).eval()
            base_logits = AutoModelForCausalLM.from_pretrained(tiny_paths["policy"])(INPUT_IDS).logits
        logits = policy(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, logits, atol=1e-5, rtol=0)
        assert not torch.allclose(base_logits, logits, atol=1e-3)  # the check above would catch a lost update

    card, text = card_of(captured)
    assert {"hf_reinforce", "reinforce", "trl"} <= set(card.data.tags)
    assert card.data.library_name == ("peft" if is_adapter else "transformers")
    assert card.data.datasets == [DATASET_NAME]
    assert tiny_paths["policy"] in text and DATASET_NAME in text
    assert "value-head critic" in text and "| baseline | critic |" in text
    for setting in ("| num_generations | 4 |", "| gamma | 0.9 |", "| beta (KL coefficient) | 0.05 |"):
        assert setting in text, setting
    if is_adapter:
        assert "| LoRA r / alpha | 8 / 16 |" in text and "4-bit nf4" in text
        assert f'PeftModel.from_pretrained(base, "{REPO_ID}")' in text
    else:
        assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in text
    assert f'folder = Path(snapshot_download("{REPO_ID}"))' in text
    assert 'ValueHeadModel.from_pretrained(folder / "value_model"' in text
    for key in ("reward", "critic/explained_variance", "kl"):
        assert f"| {key} | {last_logged(trainer, key):.4g} |" in text, key
    check_citations(text, ["williams1992simple", "ahmadian2024back", "vonwerra2020trl"])


@pytest.mark.parametrize(
    "setup",
    [
        "qlora_shared_critic",
        "qlora_own_critic",
        "full_fine_tuning",
    ],
)
def test_pushed_critic_reloads_with_the_same_values(tmp_path, tiny_paths, hub, setup):
    trainer = train_reinforce(tmp_path / "run", tiny_paths["policy"], setup)
    trainer.push_to_hub()
    value_model = hub.root / REPO_ID / "value_model"
    if setup == "full_fine_tuning":
        reloaded = ValueHeadModel.from_pretrained(value_model)
    else:
        reloaded = ValueHeadModel.from_pretrained(
            value_model, base_model=tiny_paths["policy"], quantization_config=BNB_CONFIG
        )
        keep_4bit_layers_differentiable(reloaded)
    with torch.no_grad():
        values = trainer.value_model.eval()(INPUT_IDS)
        torch.testing.assert_close(reloaded.eval()(INPUT_IDS), values, atol=1e-5, rtol=0)
    assert values.abs().max() > 1e-3  # the critic trained away from its zero-initialised head


@pytest.mark.parametrize("use_qlora", [True, False], ids=["qlora", "full_fine_tuning"])
def test_reward_push_uploads_a_loadable_reward_model_and_card(tmp_path, tiny_paths, hub, use_qlora):
    pairs = make_preference_dataset(32, seed=3, soft=True)
    args = RewardConfig(
        output_dir=str(tmp_path / "run"),
        hub_model_id=REPO_ID,
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    qlora = {
        "quantization_config": BNB_CONFIG,
        "peft_config": LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    trainer = RewardTrainer(
        model=tiny_paths["reward_model"],
        args=args,
        train_dataset=pairs,
        eval_dataset=make_preference_dataset(16, seed=4),
        **(qlora if use_qlora else {}),
    )
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub(dataset_name=DATASET_NAME)

    captured = hub.root / REPO_ID
    weights = "adapter_model.safetensors" if use_qlora else "model.safetensors"
    for name in (weights, "tokenizer.json", "README.md"):
        assert (captured / name).is_file(), name

    tokenizer = trainer.processing_class
    texts = [row["prompt"] + row["chosen"] + tokenizer.eos_token for row in pairs.select(range(8))]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        if use_qlora:
            base = AutoModelForSequenceClassification.from_pretrained(
                tiny_paths["reward_model"], num_labels=1, quantization_config=BNB_CONFIG
            )
            reloaded = keep_4bit_layers_differentiable(PeftModel.from_pretrained(base, captured))
        else:
            reloaded = AutoModelForSequenceClassification.from_pretrained(captured, num_labels=1)
        base_rewards = AutoModelForSequenceClassification.from_pretrained(tiny_paths["reward_model"])(**inputs).logits
        rewards = trainer.model.eval()(**inputs).logits
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, rewards, atol=1e-5, rtol=0)
        assert not torch.allclose(base_rewards, rewards, atol=1e-3)  # training moved the rewards

    card, text = card_of(captured)
    assert {"hf_reinforce", "reward-model", "trl"} <= set(card.data.tags)
    assert card.data.library_name == ("peft" if use_qlora else "transformers")
    assert tiny_paths["reward_model"] in text and "Bradley-Terry" in text
    assert "AutoModelForSequenceClassification.from_pretrained" in text
    for key in ("accuracy", "eval_accuracy", "eval_loss"):
        assert f"| {key} | {last_logged(trainer, key):.4g} |" in text, key
    check_citations(text, ["bradley1952rank", "vonwerra2020trl"])
    assert "williams1992simple" not in text  # a reward model cites what it is, not the policy-gradient papers
