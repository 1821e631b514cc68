"""Estimate the peak GPU memory of a REINFORCE run by component, and what fits on a card, without loading a model.

examples:
  # a recipe as it stands, on a 24 GiB card
  hf-reinforce estimate --config recipes/llama-3.1-8b/reinforce/config_qlora.yaml --card_gib 24
  # the same settings for another model, with longer completions
  hf-reinforce estimate --config recipes/llama-3.1-8b/reinforce/config_qlora.yaml \\
      --model_config benchmarks/model_configs/Qwen2.5-14B/config.json --max_completion_length 512
  # no recipe: a model config and the flags
  hf-reinforce estimate --model_config benchmarks/model_configs/Qwen2.5-0.5B/config.json \\
      --per_device_train_batch_size 8 --steps_per_generation 4

The model config comes from --model_config, else from the recipe's model_name_or_path: a local folder, a config
shipped with the package (Llama-3.1-8B, Qwen2.5-0.5B/14B/32B, SmolLM2-135M; copies of benchmarks/model_configs) or
the Hugging Face cache. Every setting flag overrides the recipe. See hf_reinforce/tools/memory.py for what each
component counts.
"""

import argparse
import dataclasses
from pathlib import Path

import yaml

from hf_reinforce.scripts import HelpFormatter
from hf_reinforce.tools import memory
from hf_reinforce.tools.memory import LAYOUTS, PHASES, GiB, TrainingSetup


def str_to_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean; write true or false.")


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="A reinforce recipe (YAML) to read the model and the settings from.")
    parser.add_argument(
        "--model_config", help="The model's config.json; overrides the recipe's model_name_or_path (needed without)."
    )
    parser.add_argument("--card_gib", type=float, default=24.0, help="Memory of the card, in GiB.")
    parser.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        help="Arrange the models as one of the compared layouts instead of the recipe's: "
        + "; ".join(f"{name}: {text}" for name, text in LAYOUTS.items()),
    )
    add_setting_flags(parser.add_argument_group("settings (default: the recipe's, else the trainer's)"))
    grid = parser.add_argument_group("what fits")
    grid.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="Rows of the fit table.")
    grid.add_argument(
        "--completion_lengths", type=int, nargs="+", default=[128, 256, 512, 1024], help="Columns of the fit table."
    )
    return parser


def add_setting_flags(settings) -> None:
    """The flags of `TrainingSetup`'s fields, each overriding the recipe."""
    settings.add_argument("--per_device_train_batch_size", type=int, help="Completions per micro-batch.")
    settings.add_argument(
        "--steps_per_generation",
        type=int,
        help="Micro-batches generated at once: per_device_train_batch_size x this completions share the KV cache and "
        "the reward model's forward (TRL's default: gradient_accumulation_steps).",
    )
    settings.add_argument(
        "--prompt_length",
        type=int,
        default=512,
        help="Tokens of the longest prompt in a batch (RLOO does not truncate prompts; the recipes do not say).",
    )
    settings.add_argument("--max_completion_length", type=int, help="Completion tokens; all run to full length.")
    settings.add_argument("--lora_r", type=int, help="LoRA rank of the policy's and the critic's adapters.")
    settings.add_argument(
        "--lora_target_modules", nargs="+", help="Decoder Linears with LoRA (q_proj ... down_proj, or all-linear)."
    )
    settings.add_argument("--quantization", choices=memory.QUANTIZATIONS, help="4bit: NF4 bases (QLoRA); none.")
    settings.add_argument("--double_quant", type=str_to_bool, help="Quantize the 4-bit constants too (true/false).")
    settings.add_argument("--dtype", choices=list(memory.DTYPE_BYTES), help="Weights' and activations' dtype.")
    settings.add_argument("--activation_checkpointing", type=str_to_bool, help="Recompute activations (true/false).")
    settings.add_argument(
        "--critic", choices=memory.CRITICS, help="shared: an adapter on the policy's base; separate: its own base."
    )
    settings.add_argument(
        "--critic_layers", type=int, help="Top layers a shared critic trains (default a quarter; 0 = all)."
    )
    settings.add_argument(
        "--reward_model",
        choices=memory.REWARD_MODELS,
        help="separate: its own base; shared: an adapter on the policy's base; function: no model.",
    )
    settings.add_argument(
        "--reference",
        choices=memory.REFERENCES,
        help="adapters: the policy's base with adapters disabled; separate: a frozen copy; none: beta=0.",
    )
    settings.add_argument("--device", choices=memory.DEVICES, help="cuda, or cpu (no CUDA overhead).")
    settings.add_argument(
        "--dequantize_for_inference",
        type=str_to_bool,
        help="Keep 4-bit weights dequantised, adapters merged, for the passes without gradients (true/false).",
    )


SETTING_FLAGS = [field.name for field in dataclasses.fields(TrainingSetup)]


def resolve(args) -> tuple[str, Path, TrainingSetup, list[str]]:
    """The model's name, its config.json, the settings, and notes on what was assumed."""
    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    if overrides["lora_target_modules"] is not None:
        targets = overrides["lora_target_modules"]
        overrides["lora_target_modules"] = memory.LINEAR_MODULES if targets == ["all-linear"] else tuple(targets)
    if args.config is not None:
        recipe = yaml.safe_load(Path(args.config).read_text()) or {}
        name, setup, notes = memory.setup_from_recipe(recipe, **overrides)
    elif args.model_config is not None:
        name, notes = Path(args.model_config).parent.name, []
        setup = TrainingSetup(**{key: value for key, value in overrides.items() if value is not None})
    else:
        raise SystemExit("Pass --config RECIPE.yaml, --model_config path/to/config.json, or both.")
    if args.model_config is None and name is None:
        raise SystemExit(f"{args.config} has no model_name_or_path; pass --model_config path/to/config.json.")
    config_path = model_config_file(args.model_config) if args.model_config else memory.find_model_config(name)
    if args.model_config is not None or name is None:  # the model measured is the config's, not the recipe's
        name = config_path.parent.name
    if args.layout is not None:
        setup = memory.with_layout(setup, args.layout)
    return name, config_path, setup, notes


def model_config_file(path: str) -> Path:
    """--model_config as given: a config.json, or a model folder holding one."""
    config_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not config_path.is_file():
        raise SystemExit(f"--model_config {path}: no such file; pass a model's config.json or the folder holding it.")
    return config_path


def describe(setup: TrainingSetup, shape: memory.ModelShape) -> str:
    quantization = "unquantized"
    if setup.quantization == "4bit":
        quantization = "NF4 4-bit" + (" (double quant)" if setup.double_quant else "")
    critic = {
        "shared": f"an adapter on the policy's base ({memory.critic_layer_count(shape, setup)} top layers)",
        "separate": "its own base",
        "none": "none",
    }[setup.critic]
    return (
        f"{quantization} bases in {setup.dtype}, LoRA r={setup.lora_r} on {', '.join(setup.lora_target_modules)}; "
        f"{setup.per_device_train_batch_size} x {setup.steps_per_generation} = {setup.generation_batch_size} "
        f"completions of {setup.prompt_length} + {setup.max_completion_length} tokens generated at once, "
        f"micro-batches of {setup.per_device_train_batch_size}; activation checkpointing "
        f"{'on' if setup.activation_checkpointing else 'off'}; critic: {critic}; reward model: {setup.reward_model}; "
        f"reference: {setup.reference}; device: {setup.device}"
    )


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f}"


def component_table(estimate: memory.MemoryEstimate, card_gib: float) -> list[str]:
    peak = estimate.peak_phase
    lines = ["| component | GiB | alive during | in the peak | what it counts |", "|---|--:|---|---|---|"]
    for component in estimate.components:
        when = "throughout" if component.phases == PHASES else ", ".join(component.phases)
        counted = "yes" if peak in component.phases else ""
        lines.append(f"| {component.name} | {gib(component.bytes)} | {when} | {counted} | {component.note} |")
    spare = card_gib * GiB - estimate.total_bytes
    verdict = f"fits ({gib(spare)} GiB to spare)" if spare >= 0 else f"does not fit ({gib(-spare)} GiB short)"
    lines += [
        f"| **peak allocated** ({peak}) | **{gib(estimate.allocated_bytes)}** | | | |",
        f"| CUDA context and allocator overhead | {gib(estimate.overhead_bytes)} | | | a constant |",
        f"| **total** | **{gib(estimate.total_bytes)}** | | | {verdict} on {card_gib:g} GiB |",
    ]
    return lines


def fit_table(shape, setup: TrainingSetup, card_gib: float, batch_sizes, completion_lengths) -> list[str]:
    lines = [
        f"| batch \\ completion | {' | '.join(str(length) for length in completion_lengths)} |",
        f"|---|{'--:|' * len(completion_lengths)}",
    ]
    for batch in batch_sizes:
        cells = []
        for length in completion_lengths:
            varied = dataclasses.replace(setup, per_device_train_batch_size=batch, max_completion_length=length)
            result = memory.estimate(shape, varied)
            cells.append(f"{gib(result.total_bytes)} {'fits' if result.fits(card_gib) else '**no**'}")
        lines.append(f"| {batch} | {' | '.join(cells)} |")
    return lines


def main() -> int:
    args = make_parser(prog="hf-reinforce estimate").parse_args()
    try:
        name, config_path, setup, notes = resolve(args)
        shape = memory.shape_from_config(config_path)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from error
    result = memory.estimate(shape, setup)
    print(f"Model: {name} ({config_path}), {shape.num_parameters() / 1e9:.2f} B parameters")
    print(f"Settings: {describe(setup, shape)}\n")
    print("\n".join(component_table(result, args.card_gib)))
    phases = ", ".join(f"{phase} {gib(result.phase_bytes(phase))}" for phase in PHASES)
    print(f"\nAllocated at the peak of each phase (GiB): {phases}")
    print(
        f"\nTotal GiB by per_device_train_batch_size (rows) and max_completion_length (columns), "
        f"steps_per_generation {setup.steps_per_generation}, on {args.card_gib:g} GiB:\n"
    )
    print("\n".join(fit_table(shape, setup, args.card_gib, args.batch_sizes, args.completion_lengths)))
    layouts = []
    for layout in LAYOUTS:
        total = memory.estimate(shape, memory.with_layout(setup, layout)).total_bytes
        layouts.append(f"{layout} {gib(total)}{'' if total <= args.card_gib * GiB else ' (no)'}")
    print(f"\nTotal GiB of each layout at these settings: {', '.join(layouts)}")
    for note in notes:
        print(f"\nNote: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
