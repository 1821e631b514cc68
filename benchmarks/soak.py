"""Long runs: resident memory, the trainer's own caches, live tensors and step time over thousands of steps.

    python benchmarks/soak.py --config shared_critic --steps 5000     # one configuration per process
    python benchmarks/soak.py --config own_critic --steps 5000
    python benchmarks/soak.py --config reward --steps 5000
    accelerate launch --num_processes 2 --config_file recipes/accelerate_configs/ddp.yaml \\
        benchmarks/soak.py --config shared_critic --steps 5000     # two-process DDP (gloo on CPU)

Configurations, on the tiny recipes' models (`hf-reinforce make-tiny`, written to a temporary folder):
- `shared_critic`: REINFORCE, policy and critic adapters on one 4-bit base, `dequantize_for_inference`, the reward
  adapter (trained for a few steps on the same base) on that base too, answers of fixed length (`min_new_tokens`);
- `own_critic`: the same with a critic of its own (`critic_shares_base=False`);
- `reward`: the Bradley-Terry reward trainer, QLoRA, cycling over its pairs.

Every 1 % of the run it records, per process: resident memory now (`/proc/self/statm`, not the peak), the bytes held
by the trainer's own caches (dequantised weights, the metric lists and logs it keeps), the number of live tensors,
the length of `trainer.state.log_history`, and the median step time over the window. The table gives them at 10 %,
50 % and 100 % of the run, with the growth from the 10 % point; `--output` writes every record as JSON.
"""

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig, TrainerCallback

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from hf_reinforce.cli import make_tiny
from hf_reinforce.speedups.dequantized import cached_tensors


CONFIGS = ("shared_critic", "own_critic", "reward")
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPORTED_FRACTIONS = (0.1, 0.5, 1.0)


def resident_bytes() -> int:
    """This process's resident memory now (pages in RAM), not its peak."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(trainer) -> int:
    """What the trainer itself keeps and could grow with the steps: dequantised copies of 4-bit weights, and the
    entries of its metric lists and completion logs (8 bytes each)."""
    models = [trainer.model, getattr(trainer, "value_model", None)]
    for func in getattr(trainer, "reward_funcs", []):
        models.append(getattr(func, "model", None))
    tensors = {id(t): t for m in models if isinstance(m, torch.nn.Module) for t in cached_tensors(m)}
    entries = 0
    for metrics in getattr(trainer, "_metrics", {}).values():
        entries += sum(len(values) for values in metrics.values())
    for logs in getattr(trainer, "_logs", {}).values():
        entries += sum(len(v) for v in logs.values()) if isinstance(logs, dict) else len(logs)
    return tensor_bytes(tensors.values()) + 8 * entries


class Soak(TrainerCallback):
    """Records the run's footprint every `interval` steps (see the module docstring)."""

    def __init__(self, interval: int):
        self.interval, self.records, self.step_times, self.started = interval, [], [], None
        self.trainer = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.started)
        if state.global_step % self.interval == 0:
            gc.collect()
            self.records.append(
                {
                    "step": state.global_step,
                    "resident_mb": resident_bytes() / 2**20,
                    "cache_bytes": cache_bytes(self.trainer),
                    "live_tensors": live_tensors(),
                    "log_history": len(state.log_history),
                    "median_step_ms": 1000 * statistics.median(self.step_times[-self.interval :]),
                }
            )


def reinforce_trainer(config: str, tiny: dict, reward_adapter: str, output_dir: str, steps: int, logging: int):
    args = ReinforceConfig(
        output_dir=output_dir,
        baseline="critic",
        critic_shares_base=config == "shared_critic",
        dequantize_for_inference=True,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=12,
        generation_kwargs={"min_new_tokens": 12},
        learning_rate=5e-3,
        beta=0.01,
        max_steps=steps,
        logging_steps=logging,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        activation_checkpointing=False,
        bf16=False,
        use_cpu=True,
        seed=42,
    )
    prompts = load_dataset("json", data_files=f"{tiny['prompts']}/train.jsonl", split="train")
    return ReinforceTrainer(
        model=tiny["policy"],
        reward_funcs=reward_adapter,
        args=args,
        train_dataset=prompts,
        quantization_config=NF4,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS),
    )


def reward_trainer(tiny: dict, output_dir: str, steps: int, logging: int) -> RewardTrainer:
    args = RewardConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=steps,
        logging_steps=logging,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=42,
    )
    pairs = load_dataset("json", data_files=f"{tiny['preferences']}/train.jsonl", split="train")
    peft_config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    return RewardTrainer(
        model=tiny["policy"], args=args, train_dataset=pairs, quantization_config=NF4, peft_config=peft_config
    )


def soak(config: str, steps: int, workdir: str, logging_steps: int = 10, interval: int | None = None) -> list[dict]:
    """Run one configuration for `steps` optimizer steps; its records, one per `interval` steps (1 % of the run)."""
    tiny = make_tiny(f"{workdir}/tiny", num_train_pairs=256, seed=0)
    if config == "reward":
        trainer = reward_trainer(tiny, f"{workdir}/run", steps, logging_steps)
    else:
        adapter = reward_trainer(tiny, f"{workdir}/reward", 2, logging_steps)
        adapter.train()
        adapter.save_model(f"{workdir}/reward")
        trainer = reinforce_trainer(config, tiny, f"{workdir}/reward", f"{workdir}/run", steps, logging_steps)
    callback = Soak(interval=interval or max(1, steps // 100))
    callback.trainer = trainer
    trainer.add_callback(callback)
    trainer.train()
    return callback.records


def growth_table(records: list[dict], config: str, rank: int) -> str:
    steps = records[-1]["step"]
    chosen = [min(records, key=lambda r: abs(r["step"] - fraction * steps)) for fraction in REPORTED_FRACTIONS]
    reference = chosen[0]
    lines = []
    for record in chosen:
        memory = 100 * (record["resident_mb"] / reference["resident_mb"] - 1)
        time_growth = 100 * (record["median_step_ms"] / reference["median_step_ms"] - 1)
        lines.append(
            f"| {config} | {rank} | {record['step']} | {record['resident_mb']:.0f} ({memory:+.1f} %) | "
            f"{record['cache_bytes'] / 2**20:.2f} | {record['live_tensors']} | {record['log_history']} | "
            f"{record['median_step_ms']:.0f} ({time_growth:+.1f} %) |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, required=True)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--output", default=None, help="a JSON file for every record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", 0))
    with tempfile.TemporaryDirectory() as workdir:
        records = soak(args.config, args.steps, workdir)
    if args.output:
        path = Path(args.output)
        path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}") if "RANK" in os.environ else path
        path.write_text(json.dumps({"config": args.config, "rank": rank, "records": records}, indent=1) + "\n")
    header = "| config | process | step | resident MB (from 10 %) | cache MB | live tensors | log entries | step ms |"
    print(f"{header}\n|---|---|---|---|---|---|---|---|\n{growth_table(records, args.config, rank)}")


if __name__ == "__main__":
    main()
