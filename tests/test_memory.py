"""The memory estimate: components against real tensors and hand counts, its monotonicity, recipes, the CLI, and the
measurement harness's worker."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_reinforce import cli
from hf_reinforce.examples.tiny import build_tiny_causal_lm, build_tiny_tokenizer
from hf_reinforce.speedups.dequantized import cached_tensors, dequantize_for_inference
from hf_reinforce.tools import memory


ROOT = Path(__file__).resolve().parent.parent
LLAMA_RECIPE = ROOT / "recipes" / "llama-3.1-8b" / "reinforce" / "config_qlora.yaml"
SMOLLM2_RECIPE = ROOT / "recipes" / "smollm2-135m" / "reinforce" / "config_qlora.yaml"
TINY_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
}


def load_harness():
    spec = importlib.util.spec_from_file_location("memory_harness", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    build_tiny_causal_lm(build_tiny_tokenizer(), **TINY_SHAPE).to(torch.bfloat16).save_pretrained(directory)
    return directory


def tensor_bytes(model) -> int:
    """Parameters, buffers and the constants of 4-bit weights, each storage once."""
    tensors = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        tensors[tensor.untyped_storage().data_ptr()] = tensor
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            constants = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            tensors.update({c.untyped_storage().data_ptr(): c for c in constants})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def llama_8b_setup(**changes) -> tuple[memory.ModelShape, memory.TrainingSetup]:
    _, setup, _ = memory.setup_from_recipe(yaml.safe_load(LLAMA_RECIPE.read_text()))
    shape = memory.shape_from_config(memory.find_model_config("meta-llama/Llama-3.1-8B-Instruct"))
    return shape, dataclasses.replace(setup, **changes)


# ---- components against the tensors of a real model ----
def test_unquantized_weights_are_the_parameter_bytes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    shape = memory.shape_from_config(model.config)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.base_weight_bytes(shape, False, False, 2, "lm_head") == parameter_bytes
    assert shape.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_weights_are_the_bytes_bitsandbytes_holds(tiny_model_dir, double_quant):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    estimated = memory.base_weight_bytes(memory.shape_from_config(model.config), True, double_quant, 2, "lm_head")
    assert estimated == pytest.approx(tensor_bytes(model), rel=0.03)


def test_lora_parameters_are_those_peft_creates(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    created = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    shape = memory.shape_from_config(model.config)
    assert memory.lora_parameters(shape, ("q_proj", "v_proj", "down_proj"), 8, 2) == created


def test_dequantized_copies_are_what_dequantize_for_inference_keeps(tiny_model_dir):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization)
    targets = ("q_proj", "v_proj", "down_proj")
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets)))
    dequantize_for_inference(model)
    with torch.no_grad():
        model(torch.randint(4, 50, (1, 6)))
    kept = sum(t.numel() * t.element_size() for t in cached_tensors(model))
    c = model.get_base_model().dtype.itemsize  # copies in the activations' dtype (bfloat16 here)
    assert memory.dequantized_copies_bytes(memory.shape_from_config(model.config), targets, c) == kept
    _, setup, _ = memory.setup_from_recipe(yaml.safe_load(SMOLLM2_RECIPE.read_text()))
    assert setup.dequantize_for_inference and setup.quantization == "4bit"


def test_layer_activations_are_what_autograd_saves(tiny_model_dir):
    """Policy forward on a 4-bit base with a bf16 adapter under autocast, as TRL runs it: the tensors saved for the
    backward, per token and layer, against the formula (the model adds a final norm, the mask and RoPE tables)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(memory.LINEAR_MODULES))).train()
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)  # TRL's cast of QLoRA adapters
    batch, length = 2, 64
    input_ids = torch.randint(4, 50, (batch, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # padding: keys and values are repeated to every head
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", torch.bfloat16):
        model.get_base_model().model(input_ids=input_ids, attention_mask=attention_mask)
    shape = memory.shape_from_config(model.config)
    per_layer_token = sum(saved.values()) / (batch * length * shape.num_layers)
    formula = memory.layer_activation_bytes(shape, 2, True, 8, memory.LINEAR_MODULES, 2)
    assert formula == pytest.approx(per_layer_token, rel=0.1)


# ---- components by hand ----
def test_components_by_hand():
    shape = memory.ModelShape(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    # 4096 weights: 2048 bytes of codes, 64 fp32 absmaxes, a 16-entry fp32 code book
    assert memory.quantized_linear_bytes(4096, double_quant=False) == 2048 + 64 * 4 + 16 * 4
    assert memory.kv_cache_bytes(shape, batch=3, sequence=10, c=2) == 3 * 10 * 4 * 2 * 2 * 16 * 2
    # q: 64 -> 64, k and v: 64 -> 32, o: 64 -> 64, gate/up: 64 -> 256, down: 256 -> 64
    assert memory.lora_parameters(shape, memory.LINEAR_MODULES, 2, 4) == 4 * 2 * (128 + 96 + 96 + 128 + 3 * 320)
    # 2 norms x 4h + 4 x H x d x c + 4 x H + 3 x I x c + the inputs of q/k/v, gate/up (h x c) and down (I x c)
    no_lora = 2 * 4 * 64 + 4 * 64 * 2 + 4 * 4 + 3 * 256 * 2 + 2 * 64 * 2 + 256 * 2
    assert memory.layer_activation_bytes(shape, 2, True, 0, (), 2) == no_lora
    setup = memory.TrainingSetup(per_device_train_batch_size=2, prompt_length=30, max_completion_length=20)
    layer = memory.layer_activation_bytes(shape, 2, True, 16, memory.LINEAR_MODULES, 2)
    result = memory.estimate(shape, setup)
    assert result.component_bytes("policy activations") == 2 * 50 * (4 * 2 * 64 + 2 * layer + 6 * 64)
    assert result.total_bytes == result.allocated_bytes + memory.CUDA_OVERHEAD_BYTES
    assert result.fits(result.total_bytes / memory.GiB) and not result.fits(result.total_bytes / memory.GiB - 0.01)


# ---- monotonicity ----
@pytest.mark.parametrize(
    "field", ["per_device_train_batch_size", "steps_per_generation", "prompt_length", "max_completion_length"]
)
def test_more_tokens_need_more_memory(field):
    shape, setup = llama_8b_setup()
    larger = dataclasses.replace(setup, **{field: getattr(setup, field) * 2})
    assert memory.estimate(shape, larger).allocated_bytes > memory.estimate(shape, setup).allocated_bytes


def test_activation_checkpointing_saves_activation_memory():
    shape, setup = llama_8b_setup()
    with_checkpointing = memory.estimate(shape, dataclasses.replace(setup, activation_checkpointing=True))
    without = memory.estimate(shape, dataclasses.replace(setup, activation_checkpointing=False))
    for name in ("policy activations", "critic activations"):
        assert with_checkpointing.component_bytes(name) < without.component_bytes(name)


def test_layouts_from_one_base_to_ppo_need_ever_more_memory():
    shape, setup = llama_8b_setup()
    totals = [
        memory.estimate(shape, memory.with_layout(setup, layout)).allocated_bytes
        for layout in ("one-base", "shared-critic", "separate-critic", "ppo")
    ]
    assert totals == sorted(totals) and len(set(totals)) == 4


def test_a_shared_critic_on_fewer_layers_needs_less():
    shape, setup = llama_8b_setup()
    quarter = memory.estimate(shape, dataclasses.replace(setup, critic_layers=None))
    everything = memory.estimate(shape, dataclasses.replace(setup, critic_layers=0))
    assert quarter.phase_bytes("critic") < everything.phase_bytes("critic")
    assert (
        quarter.component_bytes("cached critic layer input")
        > 0
        == everything.component_bytes("cached critic layer input")
    )


# ---- recipes and configs ----
def test_the_llama_recipe_reads_as_its_settings():
    name, setup, notes = memory.setup_from_recipe(yaml.safe_load(LLAMA_RECIPE.read_text()))
    assert name == "meta-llama/Llama-3.1-8B-Instruct"
    assert (setup.per_device_train_batch_size, setup.steps_per_generation, setup.generation_batch_size) == (2, 16, 32)
    assert (setup.max_completion_length, setup.lora_r, setup.lora_target_modules) == (256, 16, memory.LINEAR_MODULES)
    assert (setup.quantization, setup.double_quant, setup.dtype) == ("4bit", True, "bfloat16")
    assert (setup.activation_checkpointing, setup.critic, setup.reward_model) == (True, "shared", "separate")
    assert "--critic_layers 0" in notes[0]  # its reward adapter is not on disk: the warm start is pointed out
    overridden = memory.setup_from_recipe(yaml.safe_load(LLAMA_RECIPE.read_text()), per_device_train_batch_size=8)
    assert overridden[1].per_device_train_batch_size == 8


@pytest.mark.parametrize("top_layers", [None, r".*layers\.1\.self_attn\.(q|v)_proj"])
def test_a_warm_started_critic_trains_the_layers_its_reward_adapter_holds(tmp_path, tiny_model_dir, top_layers):
    """All of them, or only those its weights name when a regular expression chose its modules."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=top_layers or ["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "reward")
    recipe = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": True,
        "reward_model_name_or_path": str(tmp_path / "reward"),
    }
    _, setup, notes = memory.setup_from_recipe(recipe)
    assert setup.critic_layers == (1 if top_layers else base.config.num_hidden_layers)
    assert "trains its layers" in notes[0]


def test_a_hub_id_finds_the_shipped_config_of_its_base():
    path = memory.find_model_config("meta-llama/Llama-3.1-8B-Instruct")
    assert path.parent.name == "Llama-3.1-8B"
    assert memory.shape_from_config(path).num_parameters() == 8_030_261_248  # the published count


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"critic": "both"}, "critic='both' is not one of shared, separate, none"),
        ({"lora_target_modules": ("lm_head",)}, "lora_target_modules holds lm_head"),
        ({"trainer": "rloo"}, "has no critic"),
    ],
)
def test_bad_settings_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        memory.TrainingSetup(**change)


def test_a_config_without_architecture_numbers_names_them():
    with pytest.raises(ValueError, match="intermediate_size.*--model_config"):
        memory.shape_from_config(
            {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
        )


# ---- the CLI ----
def test_estimate_prints_components_and_what_fits(capsys):
    assert cli.main(["estimate", "--config", str(LLAMA_RECIPE), "--card_gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3.1-8B" in out and "8.03 B parameters" in out
    for row in ("| policy base weights |", "| KV cache |", "| critic activations |", "| **total** |"):
        assert row in out
    assert "fits (" in out and "on 24 GiB" in out
    assert "| batch \\ completion | 128 | 256 | 512 | 1024 |" in out
    assert "one-base" in out and "ppo" in out


def test_estimate_takes_a_model_config_and_overrides(capsys):
    config = memory.SHIPPED_MODEL_CONFIGS / "Qwen2.5-32B" / "config.json"
    argv = ["estimate", "--config", str(LLAMA_RECIPE), "--model_config", str(config), "--card_gib", "24"]
    assert cli.main([*argv, "--per_device_train_batch_size", "1", "--batch_sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert "32.76 B parameters" in out and "1 x 16 = 16 completions" in out and "short) on 24 GiB" in out


def test_estimate_without_a_model_says_what_to_pass():
    with pytest.raises(SystemExit, match="--model_config"):
        cli.main(["estimate"])


# ---- the measurement harness ----
def test_the_harness_worker_measures_one_configuration(tmp_path):
    harness = load_harness()
    paths = harness.save_models("tiny", tmp_path, "float32", max_positions=32, lora_r=4)
    spec = {
        "task": "run",
        "layout": "one-base",
        "size": "tiny",
        "repeat": 0,
        "paths": paths,
        "prompt_tokens": 8,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_generations": 2,
        "max_completion_length": 8,
        "prompt_length": 8,
        "num_prompts": 2,
        "steps": 1,
        "lora_r": 4,
        "critic_layers": None,
        "dtype": "float32",
        "activation_checkpointing": True,
        "threads": 1,
        "card_gib": None,
        "cpu_allocator": "live-tensors",
    }
    result = harness.run_subprocess(spec, tmp_path, timeout=120)
    assert result["status"] == "ok" and result["device"] in ("cpu", "cuda")
    assert result["allocator_env"] == harness.CPU_ALLOCATORS["live-tensors"]  # the worker ran with glibc so told
    assert result["import_floor_mb"] > 0 and result["peak_mb"] > 0 and len(result["step_times"]) == 1
    assert set(memory.PHASES) <= set(result["phase_peaks_mb"])
    assert set(result["measured_mb"]) == {"frozen weights", "trainable weights", "optimizer states"}
    assert result["measured_mb"]["frozen weights"] == pytest.approx(result["estimate_mb"]["frozen weights"], rel=0.05)
    assert set(result["estimate_mb"]["phases"]) == set(memory.PHASES)
    assert result["critic_checkpointing"] is True  # a shared critic is the policy's own, checkpointed, model


@pytest.mark.parametrize("tied", [False, True])
def test_the_harness_copies_weights_out_of_the_mapped_model_file(tmp_path, tied):
    """Tensors left as views of a loaded safetensors file get memory of their own, tied ones stay tied, and the model
    computes the same."""
    harness = load_harness()
    build_tiny_causal_lm(build_tiny_tokenizer(), tie_word_embeddings=tied, **TINY_SHAPE).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    input_ids = torch.arange(12).unsqueeze(0)
    logits = model(input_ids).logits

    def mapped_bytes() -> int:
        ranges = harness.model_file_mappings()
        return sum(t.numel() * t.element_size() for t in model.parameters() if harness.in_model_file(t, ranges))

    before = mapped_bytes()
    assert before > 0  # transformers loads CPU tensors as views of the file: the case the harness handles
    assert harness.copy_out_of_model_files([model, model]) == before  # each tensor once, however often it is met
    assert mapped_bytes() == 0
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(model(input_ids).logits, logits, rtol=0, atol=0)
