"""Peak memory and step time of the trainer layouts, measured one configuration per fresh process, next to the
estimate of `hf_reinforce.tools.memory`.

    python benchmarks/memory.py --sizes tiny --steps 2 --repeats 1 --threads 1   # a check of the harness, 90 s
    python benchmarks/memory.py --sizes 50M 200M 800M --output_dir outputs/memory # the comparison
    python benchmarks/memory.py --model_path path/to/SmolLM2-135M-Instruct       # a local model instead of sizes

Layouts (`hf_reinforce.tools.memory.LAYOUTS`), all with the same batch, prompt and completion lengths, LoRA
(r, alpha 2r) on every decoder Linear, beta 0.05, and generation forced to full length (`min_new_tokens`). The reward
model is always what the trainer makes of a reward recipe's output: a LoRA adapter, unmerged, on a base quantized as
the policy's.

* rloo: `trl.RLOOTrainer`, policy LoRA on a 4-bit base, the reference its base with adapters disabled, a separate
  4-bit reward model (scored over the whole generation batch in one forward).
* shared-critic: `ReinforceTrainer` as the recipes run it: the critic an adapter on the policy's base, a separate
  4-bit reward model (scored a micro-batch at a time).
* one-base: `ReinforceTrainer(reward_shares_base=True)`, the reward model a third adapter on the same base; skipped,
  with a message, while `ReinforceConfig` has no such field.
* separate-critic: `ReinforceTrainer(critic_shares_base=False)`: the critic on a 4-bit base of its own (loaded from
  the reward model's base with a copy of its adapter).
* ppo: PPO's four models, none quantized, in the model dtype: `ReinforceTrainer(critic_shares_base=False)` without a
  quantization config gives the policy (LoRA), the critic (its own decoder, LoRA) and the reward model; TRL makes no
  reference model for a LoRA policy, so a frozen copy of the policy is loaded and set as `trainer.ref_model`, which
  `ReinforceTrainer` then scores the reference log-probabilities with.

The models are random-weight Llamas shaped like Llama 3 (grouped-query attention with 4 query heads per key head,
SwiGLU width 3.5x, untied embeddings) with a 32,768-entry vocabulary (8,192 for `tiny`), saved once to a temporary
folder with a character-level tokenizer of that many single-character tokens, so that every generated token is one
character and the reward model reads exactly the generated length. The reward model has other random weights than
the policy, so a shared critic trains its `--critic_layers` rather than starting from the reward adapter. With
`--model_path` the reward model is the same model with a new score head: a shared critic then starts from the reward
adapter and trains every layer (the estimate is told so).

Each configuration runs in its own process (`--worker`), repeated `--repeats` times, interleaved over layouts and
sizes, with `--threads` torch threads. Memory is the process's own: on CUDA `torch.cuda.max_memory_allocated`
(`--card_gib` caps the process as a smaller card would); on CPU the peak resident set size (VmHWM, what
`getrusage(RUSAGE_SELF).ru_maxrss` reports) minus the resident size right after the imports (the "import floor",
reported apart), with glibc told to give every allocation of 64 KiB or more a mapping of its own (`--cpu_allocator
live-tensors`; see `CPU_ALLOCATORS`), so that memory freed by one pass is not counted again in the next. The peak is
also taken per phase of the step, the high-water mark being reset between phases (/proc/self/clear_refs after glibc's
malloc_trim, or `torch.cuda.reset_peak_memory_stats`). On CPU the process also holds memory that is no tensor
(libraries loaded on first use, allocator caches): this "runtime residue", measured at the start of the last
micro-step, is taken off the peaks before they are compared with the estimate. A configuration that runs out of memory,
is killed or times out is recorded with that status, not dropped. The step time is the trainer's own `step_time` over
steps 2..N. Written to --output_dir as the runs finish: measurements.json (every run, and the summary) and results.md
(the tables).
"""

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig
from trl import RLOOConfig, RLOOTrainer
from trl.trainer.utils import add_fused_lm_head

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.critic import Critic
from hf_reinforce.examples.tiny import (
    CHARACTERS,
    SPECIAL_TOKENS,
    build_tiny_causal_lm,
    build_tiny_reward_model,
    build_tiny_tokenizer,
)
from hf_reinforce.tools import memory


MiB = 2**20
# name: (hidden, intermediate, layers, attention heads, key/value heads, vocabulary)
SIZES = {
    "tiny": (256, 896, 4, 4, 1, 8192),
    "50M": (512, 1792, 6, 8, 2, 32768),
    "200M": (1024, 3584, 10, 16, 4, 32768),
    "800M": (2048, 7168, 12, 16, 4, 32768),
}
FIRST_EXTRA_CHARACTER = 0x4E00  # CJK ideographs: thousands of single characters before the surrogates at 0xD800
LOADING, OUTSIDE = "loading", "optimizer step and the rest"
# glibc's malloc serves a freed tensor's memory to later, smaller tensors and keeps it resident, and from the first
# large free on it raises its mmap threshold to 32 MiB: the peak resident set then depends on the order of past
# allocations more than on the tensors alive at the peak. A fixed threshold of 64 KiB gives every tensor of that size
# a mapping of its own, returned to the system when freed, so that the peak resident set follows the live tensors
# as CUDA's max_memory_allocated does.
CPU_ALLOCATORS = {"live-tensors": {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}, "glibc": {}}
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")
HELD_GROUPS = ("frozen weights", "trainable weights", "optimizer states")
PHASE_METHODS = {
    # phase: (class, method); the log-probability passes count only without gradients (the policy's own forward
    # belongs to its update)
    "generation": (RLOOTrainer, "_generate"),
    "rewards": (RLOOTrainer, "_calculate_rewards"),
    "log-prob passes": (RLOOTrainer, "_get_per_token_logps_and_entropies"),
    "critic": (Critic, "first_pass"),  # its forward and backward; `update` only steps the optimizer
    "policy update": (RLOOTrainer, "training_step"),
}


# ---- models ----
def size_config(size: str) -> dict:
    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
    }


def sized_tokenizer(vocab_size: int):
    """A character-level tokenizer of exactly vocab_size tokens, one character each."""
    extra = vocab_size - len(SPECIAL_TOKENS) - len(CHARACTERS)
    return build_tiny_tokenizer(CHARACTERS + "".join(chr(FIRST_EXTRA_CHARACTER + i) for i in range(extra)))


MODEL_ROLES = ("policy", "reward_model", "reward_adapter")


def save_models(size: str, directory: Path, dtype: str, max_positions: int, lora_r: int) -> dict[str, str]:
    """A random-weight policy and reward model of a size, with their tokenizer, under `directory`."""
    config = size_config(size)
    tokenizer = sized_tokenizer(config["vocab_size"])
    overrides = {**config, "max_position_embeddings": max_positions}
    paths = {role: directory / f"{size}-{role}" for role in MODEL_ROLES}
    # other weights than the policy's: the shared critic does not start from the reward adapter
    for role, model in (
        ("policy", lambda: build_tiny_causal_lm(tokenizer, seed=0, **overrides)),
        ("reward_model", lambda: build_tiny_reward_model(tokenizer, seed=1, **overrides)),
    ):
        model().to(getattr(torch, dtype)).save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    save_reward_adapter(paths, lora_r, dtype)
    return {role: str(path) for role, path in paths.items()}


def prompts(tokenizer, prompt_length: int, count: int) -> list[str]:
    """`count` prompts of exactly prompt_length tokens (for a character tokenizer; about that for another one)."""
    words = "the cat sat on the mat and looked at the dog who ran to the park ".split()
    text = " ".join(words * (1 + prompt_length // len(words) + 1))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_length]
    base = tokenizer.decode(ids)
    return [base[: len(base) - len(str(i))] + str(i) for i in range(count)]  # distinct prompts, same length


# ---- the trainers ----
def quantization(dtype: str) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def lora(spec: dict, task_type: str | None = None) -> LoraConfig:
    return LoraConfig(
        r=spec["lora_r"],
        lora_alpha=2 * spec["lora_r"],
        lora_dropout=0.0,
        target_modules=list(memory.LINEAR_MODULES),
        task_type=task_type,
    )


def load_reward_model(spec: dict, device: str, quantized: bool):
    """The reward model as the trainer loads a reward recipe's output: a LoRA adapter (fp32), unmerged, on a base
    quantized as the policy's."""
    kwargs = {"num_labels": 1, "dtype": getattr(torch, spec["dtype"])}
    if quantized:
        kwargs.update(quantization_config=quantization(spec["dtype"]), device_map={"": device})
    model = AutoModelForSequenceClassification.from_pretrained(spec["paths"]["reward_model"], **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec["paths"]["reward_model"])
    model.config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if not quantized:
        model.to(device)
    return get_peft_model(model, lora(spec, task_type="SEQ_CLS")).eval().requires_grad_(False)


def save_reward_adapter(paths: dict[str, Path], lora_r: int, dtype: str) -> None:
    """A reward adapter on the policy's own base, saved as `RewardTrainer` saves one (with the record of its base's
    4-bit quantization): what the one-base layout puts on the policy's base instead of loading a second base."""
    from hf_reinforce.reward_models import record_reward_training

    base = AutoModelForSequenceClassification.from_pretrained(paths["policy"], num_labels=1)
    model = get_peft_model(base, lora({"lora_r": lora_r}, task_type="SEQ_CLS"))
    model.save_pretrained(paths["reward_adapter"])
    AutoTokenizer.from_pretrained(paths["policy"]).save_pretrained(paths["reward_adapter"])
    base.config.quantization_config = quantization(dtype)  # the base's loading, as a recorded training had it
    record_reward_training(model, paths["reward_adapter"])


def training_config(spec: dict, device: str, output_dir: str, config_class, **fields):
    return config_class(
        output_dir=output_dir,
        per_device_train_batch_size=spec["per_device_train_batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"],
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_completion_length"],
        generation_kwargs={"min_new_tokens": spec["max_completion_length"]},  # every completion runs to full length
        max_steps=spec["steps"],
        beta=0.05,
        learning_rate=1e-5,
        bf16=spec["dtype"] == "bfloat16",
        use_cpu=device == "cpu",
        activation_checkpointing=spec["activation_checkpointing"],
        model_init_kwargs={"dtype": getattr(torch, spec["dtype"])},
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **fields,
    )


def has_shared_reward_option() -> bool:
    return "reward_shares_base" in {field.name for field in dataclasses.fields(ReinforceConfig)}


def build_trainer(spec: dict, device: str, output_dir: str):
    layout, dtype = spec["layout"], spec["dtype"]
    quantized = layout != "ppo"
    tokenizer = AutoTokenizer.from_pretrained(spec["paths"]["policy"])
    dataset = Dataset.from_dict({"prompt": prompts(tokenizer, spec["prompt_length"], spec["num_prompts"])})
    kwargs = {
        "model": spec["paths"]["policy"],
        # one-base: an adapter on the policy's base, given as its folder, as a reward recipe leaves it
        "reward_funcs": spec["paths"]["reward_adapter"]
        if layout == "one-base"
        else load_reward_model(spec, device, quantized),
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "reward_processing_classes": tokenizer,
        "peft_config": lora(spec),
        "quantization_config": quantization(dtype) if quantized else None,
    }
    if layout == "rloo":
        return RLOOTrainer(args=training_config(spec, device, output_dir, RLOOConfig), **kwargs)
    fields = {"baseline": "critic", "critic_layers": spec["critic_layers"]}
    fields["critic_shares_base"] = layout in ("shared-critic", "one-base")
    fields["reward_shares_base"] = layout == "one-base"
    trainer = ReinforceTrainer(args=training_config(spec, device, output_dir, ReinforceConfig, **fields), **kwargs)
    if layout == "ppo":
        reference = AutoModelForCausalLM.from_pretrained(spec["paths"]["policy"], dtype=getattr(torch, dtype))
        add_fused_lm_head(reference, temperature=trainer.temperature)
        trainer.ref_model = reference.to(device).eval().requires_grad_(False)
    return trainer


# ---- measuring ----
def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; the CPU measurement needs Linux.")


class PeakMemory:
    """The peak memory since the last `take`, which starts a new interval: on CUDA the allocator's peak, on CPU the
    resident set's high-water mark (reset by writing 5 to /proc/self/clear_refs). On CPU each interval starts after
    glibc's malloc_trim, so that heap memory freed by the previous phase does not count as the next one's."""

    def __init__(self, device: str):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device == "cpu" else None
        self.floor = self.current()

    def current(self) -> int:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return status_kib("VmRSS") * 1024

    def take(self) -> int:
        """Bytes above the floor at the peak of the interval that ends now."""
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = status_kib("VmHWM") * 1024
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        return peak - self.floor


class PhasePeaks:
    """Peak memory per phase of the step, by patching the methods of `PHASE_METHODS` for the duration: each interval
    between two phase boundaries counts towards the innermost phase running (nested phases are not double counted)."""

    def __init__(self, meter: PeakMemory):
        self.meter, self.stack, self.peaks, self.originals = meter, [LOADING], {}, {}
        self.last_step_start = None  # bytes above the floor when the last micro-step began

    def _switch(self, push: str | None = None) -> None:
        phase = self.stack[-1]
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.meter.take())
        if push == "policy update":
            self.last_step_start = self.meter.current() - self.meter.floor
        if push is None:
            self.stack.pop()
        else:
            self.stack.append(push)

    def start_training(self) -> None:
        self._switch(push=OUTSIDE)

    def __enter__(self):
        for phase, (cls, name) in PHASE_METHODS.items():
            original = self.originals[phase] = getattr(cls, name)
            setattr(cls, name, self._tracked(phase, original))
        return self

    def __exit__(self, *exc):
        for phase, (cls, name) in PHASE_METHODS.items():
            setattr(cls, name, self.originals[phase])
        self._switch()

    def _tracked(self, phase, method):
        def tracked(*args, **kwargs):
            if phase == "log-prob passes" and torch.is_grad_enabled():
                return method(*args, **kwargs)
            self._switch(push=phase)
            try:
                return method(*args, **kwargs)
            finally:
                self._switch()

        return tracked

    @property
    def current(self) -> str:
        return self.stack[-1]


def distinct_tensors(modules) -> dict[int, torch.Tensor]:
    """Every parameter and buffer of the modules, and the constants of 4-bit weights, once each (by storage)."""
    tensors = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            tensors[tensor.untyped_storage().data_ptr()] = tensor
            state = getattr(tensor, "quant_state", None)
            for constant in quant_state_tensors(state):
                tensors[constant.untyped_storage().data_ptr()] = constant
    return tensors


def quant_state_tensors(state) -> list[torch.Tensor]:
    if state is None:
        return []
    constants = [state.absmax, state.code]
    if getattr(state, "nested", False):
        constants += [state.state2.absmax, state.state2.code]
    return [tensor for tensor in constants if isinstance(tensor, torch.Tensor)]


def trainer_modules(trainer) -> list[torch.nn.Module]:
    """Every model the trainer holds: policy, reference, critic and reward models."""
    modules = [trainer.model, trainer.ref_model, getattr(trainer, "value_model", None)]
    # ReinforceTrainer wraps reward models in a scorer that holds the model as `.model`
    modules += [getattr(f, "model", f) for f in trainer.reward_funcs]
    return [module for module in modules if isinstance(module, torch.nn.Module)]


def model_file_mappings() -> list[tuple[int, int]]:
    """The address ranges of the safetensors files this process has mapped."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def in_model_file(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)


@torch.no_grad()
def copy_out_of_model_files(modules) -> int:
    """Give every tensor that is still a view of a mapped safetensors file memory of its own; returns their bytes.

    transformers maps the files it loads, and on CPU keeps the tensors it does not quantize (embeddings, norms, the
    LM head) as views of that mapping, which keeps the whole mapping alive and every page read while quantizing
    resident (1.3 GB of a 1.6 GB file at 800M), although only those tensors are in use. A GPU holds none of it, and
    the kernel may drop it at will: copied out, the tensors are counted once, as anonymous memory, and the file's
    pages leave the resident set when the mapping closes. Every layout goes through this alike."""
    ranges, copied, seen = model_file_mappings(), 0, set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen or not in_model_file(tensor, ranges):
                continue
            seen.add(id(tensor))  # a tied weight is one Parameter: copied once, it stays tied
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def held_bytes(trainer) -> dict[str, int]:
    """Bytes of the weights the run holds, trainable (what an optimizer updates: adapters, value head) and frozen
    (bases, the reward adapter), and of the optimizers' states."""
    optimizers = [trainer.optimizer] + ([trainer.critic.optimizer] if getattr(trainer, "critic", None) else [])
    trained = {p.untyped_storage().data_ptr() for o in optimizers for group in o.param_groups for p in group["params"]}
    tensors = distinct_tensors(trainer_modules(trainer))
    trainable = sum(t.numel() * t.element_size() for key, t in tensors.items() if key in trained)
    frozen = sum(t.numel() * t.element_size() for key, t in tensors.items() if key not in trained)
    states = [value for o in optimizers for state in o.state.values() for value in state.values()]
    optimizer = sum(t.numel() * t.element_size() for t in states if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"frozen weights": frozen, "trainable weights": trainable, "optimizer states": optimizer}


def estimated(spec: dict, device: str) -> dict:
    """The estimate of hf_reinforce.tools.memory for this configuration, in MB, grouped as the measurements are."""
    shape = memory.shape_from_config(Path(spec["paths"]["policy"]) / "config.json")
    # a reward model on the policy's own weights hands its adapter (on every layer) to a shared critic
    warm_start = spec["paths"]["reward_model"] == spec["paths"]["policy"]
    setup = memory.TrainingSetup(
        per_device_train_batch_size=spec["per_device_train_batch_size"],
        steps_per_generation=spec["gradient_accumulation_steps"],
        prompt_length=spec["prompt_tokens"],
        max_completion_length=spec["max_completion_length"],
        lora_r=spec["lora_r"],
        dtype=spec["dtype"],
        activation_checkpointing=spec["activation_checkpointing"],
        critic_layers=0 if warm_start else spec["critic_layers"],
        device=device,
    )
    result = memory.estimate(shape, memory.with_layout(setup, spec["layout"]))
    frozen = ("policy base weights", "reference weights", "critic base weights", "reward model weights")
    groups = {
        "frozen weights": (*frozen, "reward adapter"),
        "trainable weights": ("policy adapter", "critic adapter + value head"),
        "optimizer states": ("optimizer states",),
    }
    return {
        **{group: sum(result.component_bytes(name) for name in names) / MiB for group, names in groups.items()},
        "phases": {phase: result.phase_bytes(phase) / MiB for phase in memory.PHASES},
        "peak": result.allocated_bytes / MiB,
        "peak_phase": result.peak_phase,
        "components": {component.name: component.bytes / MiB for component in result.components},
    }


def run_configuration(spec: dict) -> dict:
    """One configuration, in this process: train, and measure."""
    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.init()
        if spec.get("card_gib"):  # behave as a card of that size
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["card_gib"] * 2**30 / total))
    meter = PeakMemory(device)
    result = {"spec": spec, "device": device, "import_floor_mb": meter.floor / MiB, "status": "ok"}
    result["allocator_env"] = {name: os.environ[name] for name in ALLOCATOR_VARIABLES if name in os.environ}
    if spec["layout"] == "one-base" and not has_shared_reward_option():
        return {**result, "status": "skipped: ReinforceConfig has no reward_shares_base field yet"}
    with tempfile.TemporaryDirectory() as output_dir, PhasePeaks(meter) as phases:
        try:
            trainer = build_trainer(spec, device, output_dir)
            if device == "cpu":
                result["copied_out_of_model_files_mb"] = copy_out_of_model_files(trainer_modules(trainer)) / MiB
                gc.collect()
            phases.start_training()
            trainer.train()
        except (torch.OutOfMemoryError, MemoryError):
            result["status"] = f"out of memory in {phases.current}"
        except RuntimeError as error:  # the CPU allocator's failure is a RuntimeError
            if "allocate" not in str(error):
                raise
            result["status"] = f"out of memory in {phases.current}"
    peaks = {phase: peak / MiB for phase, peak in phases.peaks.items()}
    result["phase_peaks_mb"] = peaks
    result["peak_mb"] = max((peak for phase, peak in peaks.items() if phase != LOADING), default=None)
    result["peak_with_loading_mb"] = max(peaks.values())
    if result["status"] == "ok":
        step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
        result["step_times"] = step_times[1:] or step_times
        result["measured_mb"] = {name: size / MiB for name, size in held_bytes(trainer).items()}
        # What the process holds besides tensors at the start of the last micro-step: libraries loaded on first use,
        # allocator caches, Python objects; on CPU it is taken off the peak before comparing with the estimate.
        residue = phases.last_step_start / MiB - sum(result["measured_mb"].values())
        result["runtime_residue_mb"] = residue
        result["comparable_peak_mb"] = result["peak_mb"] - (residue if device == "cpu" else 0.0)
        critic = getattr(trainer, "value_model", None)
        result["critic_checkpointing"] = None if critic is None else critic.backbone.is_gradient_checkpointing
    result["estimate_mb"] = estimated(spec, device)
    return result


# ---- orchestration ----
def run_subprocess(spec: dict, work_dir: Path, timeout: float) -> dict:
    spec_path = work_dir / f"spec-{time.monotonic_ns()}.json"
    result_path = spec_path.with_suffix(".result.json")
    spec_path.write_text(json.dumps(spec))
    env = {name: value for name, value in os.environ.items() if name not in ALLOCATOR_VARIABLES}
    env.update(OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1", **CPU_ALLOCATORS[spec["cpu_allocator"]])
    command = [sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)]
    try:
        process = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "status": f"timed out after {timeout:.0f} s"}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        reason = " (the kernel's OOM killer, most likely)" if name == "SIGKILL" else ""
        return {"spec": spec, "status": f"killed by {name}{reason}"}
    return {"spec": spec, "status": f"failed (exit {process.returncode}): {process.stderr.strip()[-2000:]}"}


def median_or_none(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarize(results: list[dict], layouts: list[str], sizes: list[str]) -> dict:
    """Per (layout, size): the statuses, and over the runs that finished the median peaks and step time."""
    summary = {}
    for size in sizes:
        for layout in layouts:
            runs = [r for r in results if r["spec"]["layout"] == layout and r["spec"]["size"] == size]
            done = [r for r in runs if r["status"] == "ok"]
            entry = {"status": sorted({r["status"] for r in runs}), "runs": len(runs)}
            if done:
                entry.update(
                    {
                        key: median_or_none(r[key] for r in done)
                        for key in ("peak_mb", "comparable_peak_mb", "runtime_residue_mb", "import_floor_mb")
                    }
                )
                entry["step_s"] = median_or_none(t for r in done for t in r["step_times"])
                entry["phase_peaks_mb"] = {
                    phase: median_or_none(r["phase_peaks_mb"].get(phase) for r in done) for phase in memory.PHASES
                }
                entry["measured_mb"], entry["estimate_mb"] = done[0]["measured_mb"], done[0]["estimate_mb"]
                entry["device"] = done[0]["device"]
            summary[f"{layout} / {size}"] = entry
    return summary


def error(estimate: float, measured: float | None) -> str:
    if not measured:
        return "-"
    return f"{100 * (estimate - measured) / measured:+.0f}%"


def comparison_cells(entry: dict) -> list[str]:
    """Measured / estimated MB and the estimate's error: the peak, the held tensors and each phase's peak (on CPU
    the peaks less the runtime residue)."""
    residue = entry["runtime_residue_mb"] if entry["device"] == "cpu" else 0.0
    estimate, cells = entry["estimate_mb"], []
    pairs = [(entry["comparable_peak_mb"], estimate["peak"])]
    pairs += [(entry["measured_mb"][group], estimate[group]) for group in HELD_GROUPS]
    for phase in memory.PHASES:
        peak = entry["phase_peaks_mb"][phase]
        pairs.append((None if peak is None else peak - residue, estimate["phases"][phase]))
    for measured, predicted in pairs:
        shown = "-" if measured is None else f"{measured:.0f}"
        cells.append(f"{shown} / {predicted:.0f} ({error(predicted, measured)})")
    return cells


def markdown(summary: dict, layouts: list[str], sizes: list[str], header: str) -> str:
    lines = [header, "", "Peak MB above the import floor (step time relative to rloo of the same size):", ""]
    lines += [f"| layout | {' | '.join(sizes)} |", f"|---|{'---|' * len(sizes)}"]
    for layout in layouts:
        cells = []
        for size in sizes:
            entry, reference = summary[f"{layout} / {size}"], summary.get(f"rloo / {size}", {})
            if "peak_mb" not in entry:
                cells.append(", ".join(entry["status"]))
                continue
            ratio = f"{entry['step_s'] / reference['step_s']:.2f}x" if reference.get("step_s") else "no rloo"
            cells.append(f"{entry['peak_mb']:.0f} MB ({ratio})")
        lines.append(f"| {layout} | {' | '.join(cells)} |")
    columns = ["peak", *HELD_GROUPS, *memory.PHASES]
    lines += [
        "",
        "Measured / estimated MB (error of the estimate). On CPU the peaks are taken less the runtime residue: the "
        "resident memory besides tensors at the start of the last micro-step (column 2).",
        "",
        f"| layout / size | runtime residue | {' | '.join(columns)} |",
        f"|---|---|{'---|' * len(columns)}",
    ]
    for key, entry in summary.items():
        if "peak_mb" in entry:
            lines.append(f"| {key} | {entry['runtime_residue_mb']:.0f} | {' | '.join(comparison_cells(entry))} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["50M", "200M", "800M"], choices=list(SIZES), help="Models.")
    parser.add_argument(
        "--model_path", help="A local causal LM folder (with its tokenizer) to measure instead of --sizes."
    )
    parser.add_argument(
        "--layouts", nargs="+", default=list(memory.LAYOUTS), choices=list(memory.LAYOUTS), help="Layouts."
    )
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps per run; step 1 is not timed.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per configuration, interleaved.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="Completions per micro-batch.")
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=2,
        help="Micro-batches per step; also the generation batch's (TRL's steps_per_generation).",
    )
    parser.add_argument("--num_generations", type=int, default=4, help="Completions per prompt.")
    parser.add_argument("--prompt_length", type=int, default=64, help="Prompt tokens.")
    parser.add_argument("--max_completion_length", type=int, default=128, help="Completion tokens (all of them).")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha = 2r) on every decoder Linear.")
    parser.add_argument("--critic_layers", type=int, help="Top layers of a shared critic (default: a quarter).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="Weights, activations.")
    parser.add_argument(
        "--activation_checkpointing", default="true", choices=["true", "false"], help="As the recipes: true."
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per process.")
    parser.add_argument(
        "--cpu_allocator",
        default="live-tensors",
        choices=list(CPU_ALLOCATORS),
        help="On CPU: live-tensors (glibc with a fixed 64 KiB mmap threshold: freed tensors leave the resident set) "
        "or glibc (its defaults).",
    )
    parser.add_argument("--card_gib", type=float, help="On CUDA: cap each process to this many GiB.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds before a run counts as timed out.")
    parser.add_argument("--output_dir", default="outputs/memory", help="Where measurements.json, results.md go.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration, from a spec file
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        if spec["task"] == "save":
            torch.set_num_threads(spec["threads"])
            save_models(spec["size"], Path(spec["directory"]), spec["dtype"], spec["max_positions"], spec["lora_r"])
            result = {"spec": spec, "status": "ok"}
        else:
            result = run_configuration(spec)
        Path(args.result).write_text(json.dumps(result, indent=2))
        return

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:
        models = prepare_models(args, Path(work_dir))
        sizes = list(models)
        results = []
        for repeat in range(args.repeats):
            for size, paths in models.items():
                for layout in args.layouts:
                    spec = {**base_spec(args), "task": "run", "layout": layout, "size": size, "repeat": repeat}
                    result = run_subprocess({**spec, **paths}, Path(work_dir), args.timeout)
                    print(f"[{repeat + 1}/{args.repeats}] {size} {layout}: {result['status']}", flush=True)
                    results.append(result)
                    summary = summarize(results, args.layouts, sizes)  # written as it goes: a long run may be cut
                    write_outputs(output_dir, summary, results, markdown(summary, args.layouts, sizes, header(args)))
    print(markdown(summary, args.layouts, sizes, header(args)))


def base_spec(args) -> dict:
    """What every configuration of this invocation shares."""
    return {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "prompt_length": args.prompt_length,
        "num_prompts": args.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "steps": args.steps,
        "lora_r": args.lora_r,
        "critic_layers": args.critic_layers,
        "dtype": args.dtype,
        "activation_checkpointing": args.activation_checkpointing == "true",
        "threads": args.threads,
        "card_gib": args.card_gib,
        "cpu_allocator": args.cpu_allocator,
    }


def prepare_models(args, work_dir: Path) -> dict[str, dict]:
    """Per size (or the local model): the paths of policy and reward model and the prompts' length in tokens."""
    if args.model_path:
        reward_adapter = work_dir / "reward_adapter"
        paths = {"policy": args.model_path, "reward_model": args.model_path, "reward_adapter": reward_adapter}
        save_reward_adapter(paths, args.lora_r, args.dtype)
        named = {Path(args.model_path).name: {role: str(path) for role, path in paths.items()}}
    else:
        named = {}
        for size in args.sizes:  # in a process of its own, so that building it leaves no memory behind here
            spec = {
                "task": "save",
                "size": size,
                "directory": str(work_dir),
                "dtype": args.dtype,
                "lora_r": args.lora_r,
            }
            spec.update(max_positions=args.prompt_length + args.max_completion_length + 8, threads=args.threads)
            spec["cpu_allocator"] = args.cpu_allocator
            saved = run_subprocess(spec, work_dir, args.timeout)
            if saved["status"] != "ok":
                raise SystemExit(f"Building the {size} models failed: {saved['status']}")
            named[size] = {role: str(work_dir / f"{size}-{role}") for role in MODEL_ROLES}
    models = {}
    for name, paths in named.items():
        tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
        prompt_tokens = len(tokenizer(prompts(tokenizer, args.prompt_length, 1)[0])["input_ids"])
        models[name] = {"paths": paths, "prompt_tokens": prompt_tokens}
    return models


def header(args) -> str:
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    return (
        f"# Memory by layout\n\n{device}, {args.threads} threads, torch {torch.__version__}, {args.dtype}, "
        f"{'CPU allocator ' + args.cpu_allocator + '; ' if device == 'CPU' else ''}"
        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} completions of "
        f"{args.prompt_length} + {args.max_completion_length} tokens per step; {args.steps} steps x {args.repeats} "
        "interleaved runs per configuration."
    )


def write_outputs(output_dir: Path, summary: dict, results: list[dict], text: str) -> None:
    (output_dir / "measurements.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    (output_dir / "results.md").write_text(text)


if __name__ == "__main__":
    main()
