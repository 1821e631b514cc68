"""Step time and weight memory of ReinforceTrainer's baselines against trl.RLOOTrainer, on one CPU setup.

    python benchmarks/step_time.py                       # about 24 M parameters, 3 interleaved repeats
    python benchmarks/step_time.py --hidden_size 256 --num_layers 4 --steps 30
    python benchmarks/step_time.py --configurations "ReinforceTrainer critic, QLoRA, reward adapter (README setup)"

Every configuration trains the same random-weight Llama (saved to a temporary folder, no download) on the same
prompts with the same generation settings, every completion forced to full length. Configurations run one after the
other within each repeat (interleaved, as the machine may be shared), and the median of the trainers' own per-step
`step_time` over steps 2..N and repeats is reported, with ratios to `trl.RLOOTrainer` in the same precision and beta
taken within this one run. Where the time goes: seconds per step in generation, in the no-grad log-probability passes
(rollout and reference), in the critic's update, and in the policy's update (the rest). "Weights held" counts the
bytes of every distinct tensor held by policy, reference and critic.
"""

import argparse
import collections
import platform
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig
from trl import RLOOConfig, RLOOTrainer

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from hf_reinforce.critic import Critic
from hf_reinforce.scripts import cpu_threads_per_process
from hf_reinforce.speedups.dequantized import cached_tensors
from hf_reinforce.testing import make_preference_dataset, save_tiny_models


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
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }


def weight_bytes(trainer) -> int:
    modules = [trainer.model, trainer.ref_model, getattr(trainer, "value_model", None)]
    tensors = {id(t): t for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]}
    tensors.update({id(t): t for m in modules if m is not None for t in cached_tensors(m)})  # dequantize_for_inference
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PhaseTimer:
    """Seconds spent in a few methods, patched on their classes for the duration of one run."""

    PHASES = {
        "generation": (RLOOTrainer, "_generate"),
        "log-prob passes": (RLOOTrainer, "_get_per_token_logps_and_entropies"),
        "critic update": (Critic, "first_pass"),
        "critic optimizer steps": (Critic, "update"),
        "step": (RLOOTrainer, "training_step"),
    }

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.originals = {}

    def __enter__(self):
        for phase, (cls, name) in self.PHASES.items():
            original = self.originals[phase] = getattr(cls, name)
            setattr(cls, name, self._timed(phase, original))
        return self

    def __exit__(self, *exc):
        for phase, (cls, name) in self.PHASES.items():
            setattr(cls, name, self.originals[phase])

    def _timed(self, phase, method):
        def timed(trainer, *args, **kwargs):
            grad = phase == "log-prob passes" and torch.is_grad_enabled()  # the policy's own forward, with grad
            started = time.perf_counter()
            result = method(trainer, *args, **kwargs)
            if not grad:
                self.seconds[phase] += time.perf_counter() - started
            return result

        return timed

    def per_step(self, steps: int) -> dict[str, float]:
        seconds = {phase: self.seconds[phase] / steps for phase in ("generation", "log-prob passes", "critic update")}
        seconds["critic update"] += self.seconds["critic optimizer steps"] / steps
        seconds["policy update and the rest"] = self.seconds["step"] / steps - sum(seconds.values())
        return seconds


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def train_reward_adapter(paths: dict, directory: str) -> str:
    """A QLoRA reward adapter on the policy's 4-bit base (two steps: its time matters here, not its scores)."""
    pairs = make_preference_dataset(32)
    args = RewardConfig(
        output_dir=directory,
        max_steps=2,
        per_device_train_batch_size=16,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    peft_config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    trainer = RewardTrainer(
        model=paths["policy"], args=args, train_dataset=pairs, quantization_config=NF4, peft_config=peft_config
    )
    trainer.train()
    trainer.save_model(directory)
    return directory


def reward_funcs(reward: str, paths: dict, trl: bool) -> dict:
    """The reward as each trainer takes it: `count_a`, or the reward adapter (its folder for ReinforceTrainer, which
    puts it on the policy's base; the loaded 4-bit model with its adapter for trl.RLOOTrainer)."""
    if reward == "count_a":
        return {"reward_funcs": count_a}
    if not trl:
        return {"reward_funcs": paths["reward_adapter"]}
    base = AutoModelForSequenceClassification.from_pretrained(paths["policy"], num_labels=1, quantization_config=NF4)
    model = PeftModel.from_pretrained(base, paths["reward_adapter"]).eval()
    return {"reward_funcs": model, "reward_processing_classes": AutoTokenizer.from_pretrained(paths["policy"])}


def run(name: str, paths: dict, steps: int, qlora: bool, reward: str, **config) -> dict:
    with tempfile.TemporaryDirectory() as output_dir, PhaseTimer() as timer:
        kwargs = {}
        if qlora:
            kwargs["quantization_config"] = NF4
            kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
        trl = name.startswith("trl")
        if trl:
            trainer_cls, args = RLOOTrainer, RLOOConfig(**{**common_settings(output_dir, steps), **config})
        else:
            trainer_cls, args = ReinforceTrainer, ReinforceConfig(**{**common_settings(output_dir, steps), **config})
        dataset = Dataset.from_dict({"prompt": ["the cat ", "a dog ", "an apple ", "one bee "] * 64})
        kwargs.update(reward_funcs(reward, paths, trl))
        trainer = trainer_cls(model=paths["policy"], args=args, train_dataset=dataset, **kwargs)
        trainer.train()
        step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
        return {
            "step_times": step_times[1:],
            "weight_mb": weight_bytes(trainer) / 2**20,
            "phases": timer.per_step(steps),
        }


# The setup the README and the SmolLM2 recipes give: the critic copied from a reward adapter on the policy's 4-bit
# base (every layer the adapter trained), the reward model on that base too, dequantised passes, inverse-CDF draws
HEADLINE = {
    "baseline": "critic",
    "critic_shares_base": True,
    "dequantize_for_inference": True,
    "inverse_cdf_sampling": True,
}
CONFIGURATIONS = {
    # name: (qlora, reward, extra config)
    "trl RLOOTrainer": (False, "count_a", {}),
    "ReinforceTrainer rloo": (False, "count_a", {"baseline": "rloo"}),
    "ReinforceTrainer critic": (False, "count_a", {"baseline": "critic"}),
    "trl RLOOTrainer, beta=0": (False, "count_a", {"beta": 0.0}),
    "ReinforceTrainer rloo, beta=0": (False, "count_a", {"baseline": "rloo", "beta": 0.0}),
    "ReinforceTrainer critic, beta=0": (False, "count_a", {"baseline": "critic", "beta": 0.0}),
    "trl RLOOTrainer, QLoRA": (True, "count_a", {}),
    "ReinforceTrainer critic, QLoRA shared base": (
        True,
        "count_a",
        {"baseline": "critic", "critic_shares_base": True},
    ),
    "ReinforceTrainer critic, QLoRA shared base, all layers": (
        True,
        "count_a",
        {"baseline": "critic", "critic_shares_base": True, "critic_layers": 0},
    ),
    "ReinforceTrainer critic, QLoRA separate critic": (
        True,
        "count_a",
        {"baseline": "critic", "critic_shares_base": False},
    ),
    "ReinforceTrainer critic, QLoRA shared base, dequantized inference": (
        True,
        "count_a",
        {"baseline": "critic", "critic_shares_base": True, "dequantize_for_inference": True},
    ),
    "trl RLOOTrainer, QLoRA, reward adapter": (True, "adapter", {}),
    "ReinforceTrainer rloo, QLoRA, reward adapter": (True, "adapter", {"baseline": "rloo"}),
    "ReinforceTrainer critic, QLoRA, reward adapter (README setup)": (True, "adapter", HEADLINE),
    "ReinforceTrainer critic, QLoRA, reward adapter, head only": (
        True,
        "adapter",
        {**HEADLINE, "critic_head_only": True},
    ),
}


def reference_for(name: str) -> str:
    if "reward adapter" in name:
        return "trl RLOOTrainer, QLoRA, reward adapter"
    if "QLoRA" in name:
        return "trl RLOOTrainer, QLoRA"
    return "trl RLOOTrainer, beta=0" if "beta=0" in name else "trl RLOOTrainer"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument(
        "--threads", type=int, default=cpu_threads_per_process(), help="torch CPU threads (default: cores less one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configurations = list(dict.fromkeys([reference_for(name) for name in args.configurations] + args.configurations))
    with tempfile.TemporaryDirectory() as model_dir:
        paths = save_tiny_models(
            model_dir,
            hidden_size=args.hidden_size,
            intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        if any(CONFIGURATIONS[name][1] == "adapter" for name in configurations):
            paths["reward_adapter"] = train_reward_adapter(paths, f"{model_dir}/reward-adapter")
        num_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(paths["policy"]).parameters())
        runs = collections.defaultdict(list)
        for _ in range(args.repeats):
            for name in configurations:
                qlora, reward, config = CONFIGURATIONS[name]
                runs[name].append(run(name, paths, args.steps, qlora, reward, **config))
    print(f"machine: {platform.platform()}, {args.threads} torch threads, torch {torch.__version__}")
    print(
        f"setup: Llama hidden {args.hidden_size}, {args.num_layers} layers, {num_parameters / 1e6:.1f} M parameters; "
        f"16 completions of 32 tokens per step; {args.steps} steps x {args.repeats} interleaved runs per row\n"
    )
    medians = {name: statistics.median(t for r in runs[name] for t in r["step_times"]) for name in configurations}
    print("| configuration | median step (s) | vs TRL RLOO (same precision and beta) | weights held (MB) |")
    print("|---|---|---|---|")
    for name in configurations:
        ratio = medians[name] / medians[reference_for(name)]
        print(f"| {name} | {medians[name]:.3f} | {ratio:.2f}x | {runs[name][0]['weight_mb']:.1f} |")
    phases = list(runs[configurations[0]][0]["phases"])
    print("\nWhere the time goes (seconds per step, median over runs):\n")
    print(f"| configuration | {' | '.join(phases)} |\n|---|{'---|' * len(phases)}")
    for name in configurations:
        seconds = [statistics.median(r["phases"][phase] for r in runs[name]) for phase in phases]
        print(f"| {name} | {' | '.join(f'{s:.3f}' for s in seconds)} |")


if __name__ == "__main__":
    main()
