"""Seeded tiny REINFORCE runs whose per-step losses and final weights are recorded in `tests/data/reference_runs/`.

`python tests/reference_runs.py record` writes them; `tests/test_reference_runs.py` reruns every configuration and
requires the same losses and the same weights to the bit (one thread). They pin the training math across changes to
how the step is organised: a change that moves any number must come with a reason and a new recording.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_reward_model, build_tiny_tokenizer


RECORDINGS = Path(__file__).parent / "data" / "reference_runs"
PROMPTS = ["ab", "ba", "cab", "bc"] * 8


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


def qlora() -> dict:
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        "peft_config": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    }


# name: (ReinforceConfig overrides, model setup)
CONFIGURATIONS = {
    "critic_full": ({"beta": 0.05}, "full"),
    "critic_lam_warmup": ({"beta": 0.05, "lam": 0.9, "gamma": 0.95, "critic_warmup_steps": 2}, "full"),
    "critic_reward_model": ({"beta": 0.05, "critic_epochs": 2}, "reward_model"),
    "critic_one_generation": ({"beta": 0.05, "num_generations": 1}, "full"),
    "critic_qlora_shared": ({"beta": 0.05, "dequantize_for_inference": True}, "qlora"),
    "critic_qlora_own": ({"beta": 0.05, "critic_shares_base": False}, "qlora"),
    "rloo_reused_inverse_cdf": (
        {"baseline": "rloo", "beta": 0.05, "num_iterations": 2, "inverse_cdf_sampling": True},
        "full",
    ),
    "mean_whitened": ({"baseline": "mean", "whiten_advantages": True, "missing_eos_penalty": 1.0}, "full"),
    "none_qlora": ({"baseline": "none", "beta": 0.1}, "qlora"),
}


def run(name: str, output_dir: str):
    """Train configuration `name` for 4 steps; its per-step losses and its trainable weights (policy, critic)."""
    overrides, setup = CONFIGURATIONS[name]
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer(characters="abc")
    settings = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 4,
        "learning_rate": 3e-3,
        "critic_learning_rate": 3e-3,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 7,
        **overrides,
    }
    kwargs = qlora() if setup == "qlora" else {}
    reward_funcs = count_a
    model = str(Path(output_dir) / "policy")  # TRL loads the reference from the policy's path
    build_tiny_causal_lm(tokenizer, seed=1).save_pretrained(model)
    tokenizer.save_pretrained(model)
    if setup == "reward_model":
        reward_funcs = build_tiny_reward_model(tokenizer, seed=2)
    trainer = ReinforceTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=ReinforceConfig(**settings),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer if setup == "reward_model" else None,
        **kwargs,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {f"policy.{n}": p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    if trainer.value_model is not None:
        weights.update({f"critic.{n}": t.clone() for n, t in trainer.value_model.trainable_state_dict().items()})
    return losses, weights


def record(names, scratch: str) -> None:
    RECORDINGS.mkdir(parents=True, exist_ok=True)
    for name in names:
        losses, weights = run(name, str(Path(scratch) / name))
        (RECORDINGS / f"{name}.json").write_text(json.dumps({"losses": losses}, indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in weights.items()}, RECORDINGS / f"{name}.safetensors")
        print(name, losses)


def recorded(name: str):
    losses = json.loads((RECORDINGS / f"{name}.json").read_text())["losses"]
    return losses, load_file(RECORDINGS / f"{name}.safetensors")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:2] != ["record"]:
        sys.exit("usage: python tests/reference_runs.py record [NAME ...]")
    with tempfile.TemporaryDirectory() as scratch:
        record(sys.argv[2:] or list(CONFIGURATIONS), scratch)
