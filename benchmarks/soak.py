"""Long runs: resident memory, the trainer's own caches, live tensors and step time over thousands of steps.

    python benchmarks/soak.py --config shared_critic --steps 5000     # one configuration per process
    python benchmarks/soak.py --config own_critic --steps 5000
    python benchmarks/soak.py --config reward --steps 5000
    accelerate launch --num_processes 2 --config_file recipes/accelerate_configs/ddp.yaml \\
        benchmarks/soak.py --config shared_critic --steps 5000 --workdir /tmp/soak-ddp   # two-process DDP (gloo)

Configurations, on the tiny recipes' models (`hf-reinforce make-tiny`, written to a temporary folder):
- `shared_critic`: REINFORCE, policy and critic adapters on one 4-bit base, `dequantize_for_inference`, the reward
  adapter (trained for a few steps on the same base) on that base too, answers of fixed length (`min_new_tokens`);
- `own_critic`: the same with a critic of its own (`critic_shares_base=False`);
- `reward`: the Bradley-Terry reward trainer, QLoRA, cycling over its pairs.

Every 1 % of the run it records, per process: resident memory now (`/proc/self/statm`, not the peak), the bytes held
by the trainer's own caches (dequantised weights, the metric lists and logs it keeps), the number of live tensors,
the length of `trainer.state.log_history`, and the median step time over the window. The table gives them at 10 %,
50 % and 100 % of the run, with the growth from the 10 % point; its times are the medians of the ten 1 % windows
around each point (the last ten at the end). `--output` writes every record as JSON, and
`python benchmarks/soak.py --table runs/*.json` prints the table of such files again.

A step time that grows can be the trainer's or the machine's (a shared or throttled CPU slows every phase of the step
alike). So each record also times a fixed workload — a small MLP's forward and backward passes, on one thread — in a
process of its own that was started with the run and does nothing else (`reference_ms`): the machine as one thread
finds it at that moment, whatever state the trainer has reached. `step / reference` is the step time in units of that
workload; it stays flat when all of the change is the machine's.
"""

import argparse
import gc
import itertools
import json
import math
import multiprocessing
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
DIGITS = {"step": 0, "reference": 1, "ratio": 2}


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


def reference_workload(repeats: int = 5) -> float:
    """Milliseconds of a fixed piece of work (20 forward and backward passes of a small MLP; median of `repeats`)."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    inputs = torch.randn(64, 256, generator=generator)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(20):
            model(inputs).square().mean().backward()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _time_reference_when_asked(connection, threads: int) -> None:
    torch.set_num_threads(threads)
    while connection.recv():
        connection.send(reference_workload())


class MachineReference:
    """A process of its own that times `reference_workload` when asked, while the trainer waits for the answer."""

    def __init__(self, threads: int):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_time_reference_when_asked, args=(child, threads), daemon=True)
        self.process.start()

    def milliseconds(self) -> float:
        self.connection.send(True)
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(False)
        self.process.join()


class Soak(TrainerCallback):
    """Records the run's footprint every `interval` steps (see the module docstring)."""

    def __init__(self, interval: int, reference: MachineReference | None = None):
        self.interval, self.records, self.step_times, self.started = interval, [], [], None
        self.trainer, self.reference = None, reference

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
                    "reference_ms": self.reference.milliseconds() if self.reference else None,
                    "time": time.time(),
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


def soak(
    config: str,
    steps: int,
    workdir: str,
    logging_steps: int = 10,
    interval: int | None = None,
    reference: MachineReference | None = None,
) -> list[dict]:
    """Run one configuration for `steps` optimizer steps; its records, one per `interval` steps (1 % of the run)."""
    # Each process writes the same tiny models to a folder of its own; the reward adapter, trained by all of them
    # together and saved by the first, is read by all from the shared `workdir`
    tiny = make_tiny(f"{workdir}/tiny-{os.environ.get('RANK', 0)}", num_train_pairs=256, seed=0)
    if config == "reward":
        trainer = reward_trainer(tiny, f"{workdir}/run", steps, logging_steps)
    else:
        adapter = reward_trainer(tiny, f"{workdir}/reward", 2, logging_steps)
        adapter.train()
        adapter.save_model(f"{workdir}/reward")
        adapter.accelerator.wait_for_everyone()
        trainer = reinforce_trainer(config, tiny, f"{workdir}/reward", f"{workdir}/run", steps, logging_steps)
    callback = Soak(interval=interval or max(1, steps // 100), reference=reference)
    callback.trainer = trainer
    trainer.add_callback(callback)
    trainer.train()
    return callback.records


def window_median(records: list[dict], fraction: float, value) -> float:
    """The median of `value(record)` over the tenth of the run around `fraction` of it (the last tenth for the end):
    a 1 % window's median moves with the machine from one minute to the next, ten of them less."""
    steps = records[-1]["step"]
    low, high = max(0.0, fraction - 0.05), fraction + 0.05
    if fraction == 1.0:
        low = 0.9
    chosen = [value(r) for r in records if low * steps < r["step"] <= high * steps]
    return statistics.median(chosen)


def growth_table(records: list[dict], config: str, rank: int) -> str:
    """Per reported point of the run: the record there (memory, caches, tensors, logs), and the window medians of the
    step time, of the machine's reference time and of their ratio; each with its growth from the 10 % point."""
    steps = records[-1]["step"]
    measures = {"step": lambda r: r["median_step_ms"]}
    if records[0]["reference_ms"] is not None:
        measures.update(reference=lambda r: r["reference_ms"], ratio=lambda r: r["median_step_ms"] / r["reference_ms"])
    medians = {
        f: {name: window_median(records, f, value) for name, value in measures.items()} for f in REPORTED_FRACTIONS
    }
    first = REPORTED_FRACTIONS[0]
    start_memory = records_at(records, first * steps)["resident_mb"]
    lines = []
    for fraction in REPORTED_FRACTIONS:
        record = records_at(records, fraction * steps)
        memory = 100 * (record["resident_mb"] / start_memory - 1)
        cells = []
        for name in ("step", "reference", "ratio"):
            if name not in measures:
                cells.append("–")
                continue
            value, start = medians[fraction][name], medians[first][name]
            cells.append(f"{value:.{DIGITS[name]}f} ({100 * (value / start - 1):+.1f} %)")
        lines.append(
            f"| {config} | {rank} | {record['step']} | {record['resident_mb']:.0f} ({memory:+.1f} %) | "
            f"{record['cache_bytes'] / 2**20:.2f} | {record['live_tensors']} | {record['log_history']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def fitted_growth(records: list[dict], value) -> tuple[float, float]:
    """The growth of `value` from the 10 % point to the end of the run that a straight line through log(value) over
    every record from 10 % on gives, in %, and its standard error: all the windows at once, not three of them."""
    steps = records[-1]["step"]
    points = [(r["step"] / steps, math.log(value(r))) for r in records if r["step"] > 0.1 * steps]
    mean_x, mean_y = (statistics.fmean(column) for column in zip(*points))
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    residuals = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
    standard_error = math.sqrt(residuals / (len(points) - 2) / spread)
    return 100 * (math.exp(0.9 * slope) - 1), 100 * 0.9 * standard_error


def label(run: dict) -> str:
    processes = run.get("processes", 1)
    return f"{run['config']}, DDP × {processes}" if processes > 1 else run["config"]


def trend_table(runs: list[dict]) -> str:
    lines = ["| config | process | step ms | reference ms | step / reference |", "|---|---|---|---|---|"]
    for run in runs:
        records = run["records"]
        cells = [fitted_growth(records, lambda r: r["median_step_ms"])]
        if records[0]["reference_ms"] is not None:
            cells.append(fitted_growth(records, lambda r: r["reference_ms"]))
            cells.append(fitted_growth(records, lambda r: r["median_step_ms"] / r["reference_ms"]))
        shown = [f"{growth:+.1f} % ± {error:.1f}" for growth, error in cells] + ["–"] * (3 - len(cells))
        lines.append(f"| {label(run)} | {run['rank']} | {' | '.join(shown)} |")
    return "\n".join(lines)


def staggered_table(late: dict, early: dict) -> str:
    """Two runs of one configuration side by side, the second started when the first was half-way: at the same
    moments (so on the same machine), the first run's step time late in its run over the second's early in its own.
    Each record of the second run is paired with the first run's record nearest in time, if that is no further away
    than one window of the second run (pairs after the first run has ended would compare a shared machine with a free
    one)."""
    times = [r["time"] for r in early["records"]]
    window = statistics.median(later - earlier for earlier, later in itertools.pairwise(times))
    pairs = []
    for record in early["records"]:
        nearest = min(late["records"], key=lambda r: abs(r["time"] - record["time"]))
        if abs(nearest["time"] - record["time"]) <= window:
            pairs.append((nearest["step"], record["step"], nearest["median_step_ms"] / record["median_step_ms"]))
    ratios = [ratio for *_, ratio in pairs]
    halves = ratios[: len(ratios) // 2], ratios[len(ratios) // 2 :]
    medians = " | ".join(f"{statistics.median(part):.3f}" for part in (ratios, *halves))
    steps = f"steps {pairs[0][0]}–{pairs[-1][0]} against {pairs[0][1]}–{pairs[-1][1]}"
    return f"| {late['config']} | {len(pairs)} | {steps} | {medians} |"


def records_at(records: list[dict], step: float) -> dict:
    return min(records, key=lambda r: abs(r["step"] - step))


TABLE_HEADER = (
    "| config | process | step | resident MB (from 10 %) | cache MB | live tensors | log entries | step ms | "
    "reference ms | step / reference |\n|---|---|---|---|---|---|---|---|---|---|"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--output", default=None, help="a JSON file for every record")
    parser.add_argument(
        "--workdir", default=None, help="where the tiny models go (a temporary folder by default; needed by DDP)"
    )
    parser.add_argument("--table", nargs="+", default=None, help="print the table of JSON files --output wrote")
    parser.add_argument(
        "--staggered",
        nargs=2,
        default=None,
        metavar=("FIRST", "SECOND"),
        help="compare two runs' JSON files, the second started when the first was half-way through",
    )
    args = parser.parse_args()
    if args.staggered:
        late, early = (json.loads(Path(path).read_text()) for path in args.staggered)
        print("| config | pairs | the first run's steps against the second's | median step-time ratio | first half "
              "| second half |\n|---|---|---|---|---|---|")  # fmt: skip
        print(staggered_table(late, early))
        return
    if args.table:
        runs = [json.loads(Path(path).read_text()) for path in args.table]
        rows = [growth_table(run["records"], label(run), run["rank"]) for run in runs]
        print(TABLE_HEADER + "\n" + "\n".join(rows))
        print(f"\nGrowth from 10 % to the end, fitted over every record (± standard error):\n\n{trend_table(runs)}")
        return
    if args.config is None:
        parser.error("--config is required (or --table to print the table of earlier runs)")
    torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", 0))
    reference = MachineReference(args.threads)
    if args.workdir is not None:
        records = soak(args.config, args.steps, args.workdir, reference=reference)
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        parser.error("several processes share the reward adapter through a folder: give --workdir")
    else:
        with tempfile.TemporaryDirectory() as workdir:
            records = soak(args.config, args.steps, workdir, reference=reference)
    reference.close()
    run = {"config": args.config, "rank": rank, "processes": int(os.environ.get("WORLD_SIZE", 1)), "records": records}
    if args.output:
        path = Path(args.output)
        path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}") if "RANK" in os.environ else path
        path.write_text(json.dumps(run, indent=1) + "\n")
    print(TABLE_HEADER + "\n" + growth_table(records, label(run), rank))
    print(f"\nGrowth from 10 % to the end, fitted over every record (± standard error):\n\n{trend_table([run])}")


if __name__ == "__main__":
    main()
