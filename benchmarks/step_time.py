"""Step time and weight memory of ReinforceTrainer's baselines against trl.RLOOTrainer, on one tiny CPU setup.

    python benchmarks/step_time.py --steps 30 --repeats 3

Every configuration trains the same tiny Llama (saved to a temp dir, no download) on the same prompts with the same
generation settings; the median of the trainers' own per-step `step_time` is reported, and ratios are taken within
this one run. "Weight memory" counts the bytes of every distinct tensor held by the policy, reference and critic.
"""

import argparse
import os
import platform
import statistics
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import RLOOConfig, RLOOTrainer

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.testing import save_tiny_models


def count_a(completions, **kwargs):
    return [float(text.count("a")) for text in completions]


def common_settings(output_dir: str, steps: int) -> dict:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": 16,
        "num_generations": 4,
        "max_completion_length": 32,
        # every completion runs to full length, so that step times compare equal amounts of work
        "generation_kwargs": {"min_new_tokens": 32},
        "max_steps": steps,
        "beta": 0.05,
        "learning_rate": 1e-4,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": False,  # the per-step log lines go to the progress bar on stderr, not into the table
    }


def weight_bytes(trainer) -> int:
    modules = [trainer.model, trainer.ref_model, getattr(trainer, "value_model", None)]
    tensors = {id(t): t for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(name: str, paths: dict, steps: int, qlora: bool, **config) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        kwargs = {}
        if qlora:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
            kwargs["peft_config"] = LoraConfig(
                r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            )
        if name.startswith("trl"):
            trainer_cls, args = RLOOTrainer, RLOOConfig(**{**common_settings(output_dir, steps), **config})
        else:
            trainer_cls, args = ReinforceTrainer, ReinforceConfig(**{**common_settings(output_dir, steps), **config})
        dataset = Dataset.from_dict({"prompt": ["the cat ", "a dog ", "an apple ", "one bee "] * 64})
        trainer = trainer_cls(model=paths["policy"], reward_funcs=count_a, args=args, train_dataset=dataset, **kwargs)
        trainer.train()
        step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
        return {"median_step_s": statistics.median(step_times[1:]), "weight_mb": weight_bytes(trainer) / 2**20}


CONFIGURATIONS = {
    # name: (qlora, extra config)
    "trl RLOOTrainer": (False, {}),
    "ReinforceTrainer rloo": (False, {"baseline": "rloo"}),
    "ReinforceTrainer critic": (False, {"baseline": "critic"}),
    "trl RLOOTrainer, beta=0": (False, {"beta": 0.0}),
    "ReinforceTrainer rloo, beta=0": (False, {"baseline": "rloo", "beta": 0.0}),
    "ReinforceTrainer critic, beta=0": (False, {"baseline": "critic", "beta": 0.0}),
    "trl RLOOTrainer, QLoRA": (True, {}),
    "ReinforceTrainer critic, QLoRA shared base": (True, {"baseline": "critic", "critic_shares_base": True}),
    "ReinforceTrainer critic, QLoRA separate critic": (True, {"baseline": "critic", "critic_shares_base": False}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median over all is kept")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as model_dir:
        paths = save_tiny_models(
            model_dir,
            hidden_size=args.hidden_size,
            intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        results = {}
        for name in args.configurations:
            qlora, config = CONFIGURATIONS[name]
            runs = [run(name, paths, args.steps, qlora, **config) for _ in range(args.repeats)]
            results[name] = {
                "median_step_s": statistics.median(r["median_step_s"] for r in runs),
                "weight_mb": runs[0]["weight_mb"],
            }
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"setup: Llama hidden {args.hidden_size}, 4 layers; 16 completions of 32 tokens per step; {args.steps} steps "
        f"x {args.repeats} runs per row\n"
    )
    reference = results["trl RLOOTrainer"]["median_step_s"]
    qlora_reference = results["trl RLOOTrainer, QLoRA"]["median_step_s"]
    beta0_reference = results["trl RLOOTrainer, beta=0"]["median_step_s"]
    print("| configuration | median step (s) | vs TRL RLOO (same precision and beta) | weights held (MB) |")
    print("|---|---|---|---|")
    for name, result in results.items():
        base = qlora_reference if "QLoRA" in name else beta0_reference if "beta=0" in name else reference
        print(
            f"| {name} | {result['median_step_s']:.3f} | {result['median_step_s'] / base:.2f}x | "
            f"{result['weight_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
