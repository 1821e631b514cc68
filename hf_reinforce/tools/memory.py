"""Peak accelerator memory of a REINFORCE run, component by component, from a model config and the training settings.

Nothing is loaded: every component is a closed-form count of the tensors that `ReinforceTrainer` (or
`trl.RLOOTrainer`) holds, derived from the code paths of TRL 1.16, PEFT 0.21, bitsandbytes 0.50 and transformers 5:

* **Weights**: one base per distinct model in the layout. A 4-bit base stores each decoder Linear in NF4 (two codes a
  byte) plus its quantization constants; embeddings, LM head, norms and biases stay in the model's `dtype`.
* **Adapters**: LoRA A and B of every targeted Linear. TRL casts the policy's adapter of a quantized model to bf16
  (`ReinforceTrainer` casts it back where the activations are fp32); every other adapter (an unquantized policy's,
  the critic's, the reward model's) is fp32, as PEFT makes them.
* **Optimizer states and gradients**: `torch.optim.AdamW` keeps exp_avg and exp_avg_sq in the parameter's own dtype
  (so 2 x 2 bytes for a bf16 adapter, 2 x 4 for an fp32 one); a gradient per trainable parameter, same dtype.
* **Activations**: what a decoder layer saves for its backward, per token (`layer_activation_bytes`); with activation
  checkpointing only each layer's input is kept, plus one layer recomputed during the backward.
* **Log-probabilities**: TRL 1.16 never materialises the (batch, logits_to_keep, vocab) logits: its fused LM head
  scores the completion tokens in tiles of at most 4096 tokens x 32768 vocabulary entries (`fused_head_bytes`).
* **Generation**: the KV cache of the whole generation batch (per_device_train_batch_size x steps_per_generation
  completions are generated at once), the prefill's working set and the sampling distribution.
* **Layout**: which base each role sits on (`critic`, `reward_model`, `reference`) comes from the trainer's own
  `placement.plan_placement`, for a recipe (`recipe_placement`) and for each compared layout (`with_layout`).
* **Phases**: the step runs generation, reward scoring, the no-grad log-probability passes (rollout and reference),
  the critic's update and the policy's update one after the other. A component is alive in some of them; the peak is
  the largest phase total, and a fixed CUDA overhead is added on top.

What is approximate, and in which direction:

* Activation counts follow the ops' saved tensors for a Llama/Qwen2-style layer (RMSNorm, RoPE, SDPA without a
  sequence² term, SwiGLU MLP); gradients of activations are taken as one more layer's worth. Expect +-20 %.
* Keys and values are counted repeated to all query heads, as transformers does for padded batches; batches without
  padding run grouped-query SDPA and save less.
* The caching allocator's fragmentation, cuBLAS workspaces and the CUDA context are one constant,
  `CUDA_OVERHEAD_BYTES`, not a model.
* Prompts are not truncated by RLOO: `prompt_length` should be the longest prompt (in tokens) of a batch.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..placement import POLICY_BASE, PlacementPlan, critic_layer_indices, layer_of, plan_placement


GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# The CUDA context (about 0.5 GiB with lazily loaded kernels), cuBLAS workspaces and the caching allocator's
# fragmentation: memory the card loses that `torch.cuda.max_memory_allocated` does not report.
CUDA_OVERHEAD_BYTES = 1 * GiB
# bitsandbytes NF4: one absmax per block of 64 weights; with double quantization the absmaxes are themselves 8-bit,
# with one fp32 absmax per 256 of them and a 256-entry fp32 code book.
NF4_BLOCK, NESTED_BLOCK, NF4_CODE_ENTRIES, NESTED_CODE_ENTRIES = 64, 256, 16, 256
# Tile of TRL's fused log-probability kernel (trl.kernels.chunked_logprob): tokens x vocabulary entries.
FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK = 4096, 32768
# The value head's features in fp32 per token, in units of hidden_size: h_t, its square, the normalised h_t, the
# masked and accumulated sums and the 2h concatenation the head reads.
VALUE_HEAD_FEATURES = 6
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
PHASES = ("generation", "rewards", "log-prob passes", "critic", "policy update")
TRAINERS = ("reinforce", "rloo")
QUANTIZATIONS = ("4bit", "none")
CRITICS = ("shared", "separate", "none")
REWARD_MODELS = ("separate", "shared", "function")
REFERENCES = ("adapters", "separate", "none")
DEVICES = ("cuda", "cpu")
LAYOUTS = {
    "rloo": "trl.RLOOTrainer: policy LoRA on a 4-bit base, reference = adapters disabled, separate 4-bit reward model",
    "shared-critic": "ReinforceTrainer as today: critic adapter on the policy's base, separate 4-bit reward model",
    "one-base": "ReinforceTrainer(reward_shares_base=True): policy, critic and reward model as adapters on one base",
    "separate-critic": "ReinforceTrainer with a critic on a 4-bit base of its own (critic_shares_base=False)",
    "ppo": "PPO-style: separate policy (LoRA), reference, critic (LoRA) and reward model, none quantized",
}
# The config.json files of the models the recipes name (the Hub may be out of reach), shipped with the package: copies
# of benchmarks/model_configs, which documents them (a test keeps the two equal).
SHIPPED_MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


# ---- the model ----
@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Llama/Qwen2/Mistral-style decoder that memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each Linear of a decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def num_parameters(self) -> int:
        """Parameters of the causal LM (decoder layers, embeddings, norms and, when untied, the LM head)."""
        linears = sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())
        biases = self.bias_size() if self.attention_bias else 0
        norms = (2 * self.num_layers + 1) * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (linears + biases) + norms + embeddings

    def bias_size(self) -> int:
        shapes = self.linear_shapes()
        return sum(shapes[name][1] for name in ("q_proj", "k_proj", "v_proj"))


REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def shape_from_config(config) -> ModelShape:
    """A `ModelShape` from a config.json dict, a `transformers.PretrainedConfig` or the path of a config.json."""
    if isinstance(config, str | Path):
        config = json.loads(Path(config).read_text())
    elif not isinstance(config, dict):  # a transformers config; multimodal ones keep the decoder in text_config
        config = config.get_text_config().to_dict()
    config = config.get("text_config", config)
    missing = [key for key in REQUIRED_CONFIG_KEYS if config.get(key) is None]
    if missing:
        raise ValueError(
            f"The model config has no {', '.join(missing)}; estimates need a decoder-only config.json with "
            f"{', '.join(REQUIRED_CONFIG_KEYS)} (pass another one with --model_config)."
        )
    num_heads = config["num_attention_heads"]
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        tie_word_embeddings=config.get("tie_word_embeddings", True),
        # Qwen2 always has q/k/v biases; Llama and Mistral only with attention_bias
        attention_bias=config.get("attention_bias", config.get("model_type") == "qwen2"),
    )


def find_model_config(model_name_or_path: str) -> Path:
    """The config.json of a model: in its local folder, among the shipped ones (`SHIPPED_MODEL_CONFIGS`/<name>, an
    `-Instruct` variant falling back to its base), or in the local Hugging Face cache."""
    folder = Path(model_name_or_path)
    if (folder / "config.json").is_file():
        return folder / "config.json"
    name = folder.name
    for candidate in (name, name.removesuffix("-Instruct")):
        if (SHIPPED_MODEL_CONFIGS / candidate / "config.json").is_file():
            return SHIPPED_MODEL_CONFIGS / candidate / "config.json"
    from huggingface_hub import try_to_load_from_cache  # only here: a local lookup, no download

    cached = try_to_load_from_cache(model_name_or_path, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    shipped = sorted(path.parent.name for path in SHIPPED_MODEL_CONFIGS.glob("*/config.json"))
    raise FileNotFoundError(
        f"No config.json for model_name_or_path={model_name_or_path!r}: not a local folder, not shipped (shipped: "
        f"{', '.join(shipped)}) and not in the Hugging Face cache. Pass --model_config path/to/config.json."
    )


# ---- the training settings ----
@dataclass(frozen=True)
class TrainingSetup:
    """What memory depends on besides the model. Field names follow the trainer's flags where one exists.

    `steps_per_generation` x `per_device_train_batch_size` completions are generated and scored at once (TRL sets
    steps_per_generation to gradient_accumulation_steps by default); the passes with gradients run on one
    micro-batch of `per_device_train_batch_size` completions at a time.
    """

    per_device_train_batch_size: int = 2
    steps_per_generation: int = 1
    prompt_length: int = 512  # tokens of the longest prompt in a batch
    max_completion_length: int = 256  # tokens; every completion is taken to run to full length
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] = LINEAR_MODULES
    quantization: str = "4bit"  # "4bit": NF4 bases (QLoRA); "none": bases in `dtype`
    double_quant: bool = True  # bnb_4bit_use_double_quant (the recipes' use_bnb_nested_quant)
    dtype: str = "bfloat16"  # weights and activations; 16-bit dtypes run under autocast (the recipes' bf16: true)
    activation_checkpointing: bool = True
    critic: str = "shared"  # "shared": an adapter on the policy's base; "separate": its own base; "none"
    critic_layers: int | None = None  # shared critic: top layers it trains; None = a quarter, 0 = all
    reward_model: str = "separate"  # "separate": its own base + LoRA; "shared": an adapter on the policy's base
    reference: str = "adapters"  # "adapters": the base with adapters disabled; "separate": a frozen copy; "none"
    device: str = "cuda"  # "cpu" counts the log-probability kernel's torch fallback and no CUDA overhead
    trainer: str = "reinforce"  # "rloo": trl.RLOOTrainer, no critic, scores the generation batch in one forward
    dequantize_for_inference: bool = False  # 4-bit weights kept dequantised (and adapter-merged) for no-grad passes

    def __post_init__(self):
        if self.trainer == "rloo" and self.critic != "none":
            raise ValueError(f"trainer='rloo' (trl.RLOOTrainer) has no critic, but critic={self.critic!r}.")
        choices = {
            "trainer": TRAINERS,
            "quantization": QUANTIZATIONS,
            "dtype": tuple(DTYPE_BYTES),
            "critic": CRITICS,
            "reward_model": REWARD_MODELS,
            "reference": REFERENCES,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        for name in ("per_device_train_batch_size", "steps_per_generation", "prompt_length", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        unknown = [module for module in self.lora_target_modules if module not in LINEAR_MODULES]
        if unknown:
            raise ValueError(
                f"lora_target_modules holds {', '.join(unknown)}; the estimate knows the decoder Linears "
                f"{', '.join(LINEAR_MODULES)} (or 'all-linear')."
            )

    @property
    def generation_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.steps_per_generation

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.max_completion_length

    @property
    def reward_batch_size(self) -> int:
        """Texts per reward-model forward: ReinforceTrainer scores a micro-batch at a time, trl.RLOOTrainer the whole
        generation batch at once."""
        return self.generation_batch_size if self.trainer == "rloo" else self.per_device_train_batch_size

    @property
    def activation_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def autocast(self) -> bool:
        return self.activation_bytes < 4

    @property
    def policy_adapter_bytes(self) -> int:
        """TRL casts the adapter of a quantized policy to bf16, which ReinforceTrainer undoes for fp32 activations;
        PEFT makes an unquantized one's fp32."""
        return 2 if self.quantization == "4bit" and self.autocast else 4


# The `plan_placement` inputs of our layouts, each with a reward adapter trained on the policy's base, quantised alike
# (trl.RLOOTrainer places its models as ours without a critic and without sharing the reward model's base)
PLANNED_LAYOUTS = {
    "rloo": {"critic": False, "reward_shares_base": False},
    "shared-critic": {"reward_shares_base": False},
    "one-base": {"reward_shares_base": True},
    "separate-critic": {"critic_shares_base": False, "reward_shares_base": False},
}


def layout_of(plan: PlacementPlan, reward_fits: bool | None) -> dict[str, str]:
    """The estimate's `critic`, `reward_model` and `reference` for a placement plan; `reward_fits` is None without a
    reward model, else whether the reward adapter was trained on the policy's base, quantised alike."""
    critic = "none" if plan.critic is None else "shared" if plan.critic.base == POLICY_BASE else "separate"
    reference = "none" if plan.reference is None else "adapters" if plan.reference.base == POLICY_BASE else "separate"
    reward = "function" if reward_fits is None else "shared" if plan.reward_joins(reward_fits) else "separate"
    return {"critic": critic, "reward_model": reward, "reference": reference}


def with_layout(setup: TrainingSetup, layout: str) -> TrainingSetup:
    """`setup` with the models arranged as one of `LAYOUTS` (everything else unchanged)."""
    if layout == "ppo":  # not a layout of ours: every model whole and of its own
        arrangement = {"quantization": "none", **dict.fromkeys(("critic", "reward_model", "reference"), "separate")}
    elif layout in PLANNED_LAYOUTS:
        arrangement = layout_of(plan_placement(policy_is_peft=True, **PLANNED_LAYOUTS[layout]), reward_fits=True)
    else:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}.")
    trainer = "rloo" if layout == "rloo" else "reinforce"
    return dataclasses.replace(setup, trainer=trainer, **arrangement)


def recipe_placement(recipe: dict, engine: str | None = None) -> tuple[PlacementPlan, bool | None]:
    """The placement plan of a reinforce recipe (a YAML file's dict), as the trainer makes it, launched under `engine`
    (see `engines.launched_engine`), and whether its reward adapter fits the policy's base (None without a reward
    model; False when it is not on disk to read)."""
    plan = plan_placement(
        policy_is_peft=bool(recipe.get("use_peft", False)),
        critic=recipe.get("baseline", "critic") == "critic",
        critic_shares_base=recipe.get("critic_shares_base", True),
        reward_shares_base=recipe.get("reward_shares_base"),
        reference=recipe.get("beta", 0.05) != 0,
        engine=engine,
    )
    reward = recipe.get("reward_model_name_or_path")
    if not reward:
        return plan, None
    if not (Path(reward) / "adapter_config.json").is_file():
        return plan, False
    from trl import ModelConfig, get_quantization_config  # only here: reading an adapter needs torch

    from ..reward_models import reward_adapter_fits

    model_fields = {field.name for field in dataclasses.fields(ModelConfig)}
    model_args = ModelConfig(**{key: value for key, value in recipe.items() if key in model_fields})
    fits, _ = reward_adapter_fits(reward, recipe.get("model_name_or_path"), get_quantization_config(model_args))
    return plan, fits


# ---- weights ----
def quantized_linear_bytes(num_weights: int, double_quant: bool) -> int:
    """One NF4 Linear weight: num_weights / 2 bytes of codes, plus per block of 64 weights an absmax of 4 bytes
    (fp32), or with double quantization 1 byte (uint8) plus 4 bytes per 256 blocks and a 256 x 4-byte code book;
    and a 16 x 4-byte NF4 code book. About 0.56 byte a weight, 0.52 with double quantization."""
    blocks = math.ceil(num_weights / NF4_BLOCK)
    constants = 4 * NF4_CODE_ENTRIES
    if double_quant:
        constants += blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * NESTED_CODE_ENTRIES
    else:
        constants += 4 * blocks
    return num_weights // 2 + constants


def base_weight_bytes(shape: ModelShape, quantized: bool, double_quant: bool, dtype_bytes: int, head: str) -> int:
    """One base model: the decoder Linears (NF4 when `quantized`, else dtype_bytes each), q/k/v biases, embeddings
    V x h, the RMSNorm weights (2L + 1) x h — all in dtype_bytes — and the head: "lm_head" (V x h unless tied to
    the embeddings), "score" (a reward model's 1 x h) or "none" (a bare decoder, as a critic of its own)."""
    h = shape.hidden_size
    per_layer = 0
    for fan_in, fan_out in shape.linear_shapes().values():
        n = fan_in * fan_out
        per_layer += quantized_linear_bytes(n, double_quant) if quantized else n * dtype_bytes
    if shape.attention_bias:
        per_layer += shape.bias_size() * dtype_bytes
    head_size = {"lm_head": 0 if shape.tie_word_embeddings else shape.vocab_size * h, "score": h, "none": 0}[head]
    unquantized = shape.vocab_size * h + (2 * shape.num_layers + 1) * h + head_size
    return shape.num_layers * per_layer + unquantized * dtype_bytes


def lora_parameters(shape: ModelShape, target_modules: tuple[str, ...], r: int, num_layers: int) -> int:
    """LoRA A (r x in) and B (out x r) of each targeted Linear, on num_layers layers: Σ r·(in + out)."""
    shapes = shape.linear_shapes()
    return num_layers * sum(r * (shapes[name][0] + shapes[name][1]) for name in target_modules)


def value_head_bytes(shape: ModelShape) -> int:
    """The critic's fp32 head: 2h weights + a bias, and its two running statistics."""
    return 4 * (2 * shape.hidden_size + 1 + 2)


# ---- activations ----
def lora_input_copy_bytes(fan_in: int, adapter_bytes: int, activation_bytes: int, autocast: bool) -> int:
    """Per token, the copy of a Linear's input its LoRA A keeps for the backward when the adapter's dtype is not the
    activations': PEFT casts the input to the adapter's dtype, and under autocast the matmul casts it back (a copy in
    the activations' dtype); without autocast the cast copy itself is kept."""
    if adapter_bytes == activation_bytes:
        return 0
    return fan_in * (activation_bytes if autocast else adapter_bytes)


# The Linears of a decoder layer by the tensor they read: the attention norm's output, the SDPA output (which
# o_proj reads as a view, already kept by SDPA), the MLP norm's output, and the SwiGLU product.
INPUT_GROUPS = (
    (("q_proj", "k_proj", "v_proj"), "hidden"),
    (("o_proj",), "sdpa"),
    (("gate_proj", "up_proj"), "hidden"),
    (("down_proj",), "intermediate"),
)


def layer_activation_bytes(
    shape: ModelShape, c: int, autocast: bool, lora_r: int, target_modules: tuple[str, ...], adapter_bytes: int
) -> int:
    """Bytes one decoder layer saves for its backward, per token, activations in c bytes:

    * 2 RMSNorms: the fp32 upcast of the input, 4h each;
    * attention: rotated q, k and v repeated to all heads, and the SDPA output, H·d·c each, plus SDPA's fp32
      log-sum-exp per head: 4·H·d·c + 4·H;
    * SwiGLU MLP: gate, SiLU(gate) and up, 3·I·c;
    * the inputs of the Linears, once per tensor read (q/k/v share the normalised hidden state, gate/up too, down_proj
      reads the product, o_proj the SDPA output): c x width — except that LoRA adapters whose dtype is not the
      activations' each keep their own cast copy instead (`lora_input_copy_bytes`);
    * LoRA A's output, r x (c under autocast, else the adapter's bytes), per targeted Linear.

    Checked against the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks) for a 4-bit Llama with
    bf16 LoRA under autocast and with fp32 LoRA without it: within 3 %.
    """
    h, hd, i = shape.hidden_size, shape.num_heads * shape.head_dim, shape.intermediate_size
    saved = 2 * 4 * h + 4 * hd * c + 4 * shape.num_heads + 3 * i * c
    widths = {"hidden": h, "sdpa": hd, "intermediate": i}
    kept_anyway = {"hidden": c * h, "sdpa": 0, "intermediate": c * i}  # what is saved when no adapter copies it
    active = target_modules if lora_r > 0 else ()
    for modules, read in INPUT_GROUPS:
        targeted = [name for name in modules if name in active]
        copy = lora_input_copy_bytes(widths[read], adapter_bytes, c, autocast)
        if copy and targeted:
            saved += len(targeted) * copy + (kept_anyway[read] if len(targeted) < len(modules) else 0)
        else:
            saved += kept_anyway[read]
    return saved + len(active) * lora_r * (c if autocast else adapter_bytes)


def stack_activation_bytes(tokens: int, num_layers: int, layer_bytes: int, c: int, h: int, checkpointing: bool) -> int:
    """Activations of a forward + backward through num_layers layers on `tokens` tokens (batch x sequence).

    With checkpointing each layer keeps only its input (c·h per token) and one layer at a time is recomputed, its
    activations and their gradients alive together: tokens·(num_layers·c·h + 2·layer_bytes). Without, every layer
    keeps its activations, plus one layer's gradients: tokens·(num_layers + 1)·layer_bytes. Both add the final
    RMSNorm's (4 + c)·h per token.
    """
    final_norm = (4 + c) * h
    if checkpointing:
        return tokens * (num_layers * c * h + 2 * layer_bytes + final_norm)
    return tokens * ((num_layers + 1) * layer_bytes + final_norm)


def forward_working_bytes(
    shape: ModelShape, tokens: int, c: int, adapter_bytes: int = 0, autocast: bool = False, targets: tuple = ()
) -> int:
    """Transient memory of a no-grad forward, which frees each layer's tensors before the next, per token: the
    residual stream and hidden state (2·c·h) and RMSNorm's fp32 temporaries (8h), next to the MLP's largest moment:

    * at the product: SiLU(gate), up and the product, 3·I·c;
    * at up_proj with an active adapter (`adapter_bytes`, 0 = none) on it: SiLU(gate), the base output and the LoRA
      output with its scaled copy, (2c + 2a)·I, a = the adapter's bytes (c under autocast);
    * at down_proj with an adapter whose dtype is not the activations': the product and PEFT's cast of it to the
      adapter's dtype (plus autocast's copy back), (c + adapter_bytes [+ c])·I.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    moments = [3 * c]
    if adapter_bytes and {"gate_proj", "up_proj"} & set(targets):
        moments.append(2 * c + 2 * (c if autocast else adapter_bytes))
    if adapter_bytes and adapter_bytes != c and "down_proj" in targets:
        moments.append(c + adapter_bytes + (c if autocast else 0))
    return tokens * (max(moments) * i + (2 * c + 8) * h)


def dequantized_weight_bytes(shape: ModelShape, c: int) -> int:
    """bitsandbytes multiplies a 4-bit weight by more than one token by dequantizing it first: the largest decoder
    Linear in c bytes, one at a time."""
    return max(fan_in * fan_out for fan_in, fan_out in shape.linear_shapes().values()) * c


def dequantized_copies_bytes(shape: ModelShape, targets: tuple[str, ...], c: int) -> int:
    """`dequantize_for_inference`: every decoder Linear dequantised once in c bytes, and a second copy of each one
    with an adapter (the active adapters merged in), kept from the first pass without gradients on."""
    shapes = shape.linear_shapes()
    merged = sum(fan_in * fan_out for name, (fan_in, fan_out) in shapes.items() if name in targets)
    return shape.num_layers * (sum(fan_in * fan_out for fan_in, fan_out in shapes.values()) + merged) * c


def fused_head_bytes(num_rows: int, shape: ModelShape, c: int, device: str, backward: bool) -> int:
    """TRL's fused LM head on num_rows scored positions: a (min(rows, 4096) x min(V, 32768)) logits tile in c bytes
    (recomputed in the backward), the masked copy of the hidden states it reads (rows·h·c), about ten fp32 vectors of
    rows (running max, sums, outputs), and in the backward the fp32 gradient of the hidden states (rows·h·4). On CPU
    the torch fallback adds fp32 temporaries of the tile: 5 forward (its fp32 copy, the scaled logits, the
    exponentials and their products), 8 backward (log-probabilities, probabilities, the gradient and its factors,
    the fp32 copies of the matmul operands)."""
    tile = min(num_rows, FUSED_TOKEN_CHUNK) * min(shape.vocab_size, FUSED_VOCAB_CHUNK)
    temporaries = 0 if device == "cuda" else (8 if backward else 5)
    total = tile * (c + 4 * temporaries) + num_rows * (shape.hidden_size * c + 40)
    if backward:
        total += num_rows * shape.hidden_size * 4
    return total


def scored_rows(setup: TrainingSetup, batch: int) -> int:
    """Positions the fused head scores: on CUDA (Triton) only the completion tokens; the CPU fallback scores every
    position of the padded rows (all but the last)."""
    if setup.device == "cuda":
        return batch * setup.max_completion_length
    return batch * (setup.sequence_length - 1)


def kv_cache_bytes(shape: ModelShape, batch: int, sequence: int, c: int) -> int:
    """Keys and values of every layer for every generated position: batch·sequence·L·2·K·d·c."""
    return batch * sequence * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * c


def generation_working_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Besides the cache: the prefill's forward working set over G·P tokens, or during decoding one layer's keys and
    values repeated to all heads (G·S·2·H·d·c), whichever is larger; and the sampling distribution of the last
    position (G·V in c bytes, its fp32 copy and two fp32 derivatives)."""
    g, c = setup.generation_batch_size, setup.activation_bytes
    adapter = setup.policy_adapter_bytes
    prefill = forward_working_bytes(shape, g * setup.prompt_length, c, adapter, False, setup.lora_target_modules)
    repeated_kv = g * setup.sequence_length * 2 * shape.num_heads * shape.head_dim * c
    return max(prefill, repeated_kv) + g * shape.vocab_size * (c + 12)


def rollout_batch_bytes(setup: TrainingSetup) -> int:
    """The generation batch the trainer keeps for its micro-steps: token ids and masks of prompt + completion (int64)
    and per-token advantages, log-probabilities and masks (4 bytes each): G·(S·24 + C·16)."""
    return setup.generation_batch_size * (24 * setup.sequence_length + 16 * setup.max_completion_length)


# ---- the estimate ----
@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    phases: tuple[str, ...]  # when it is alive; PHASES for what the run holds throughout
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    components: tuple[Component, ...]
    overhead_bytes: int  # not allocated by torch: see CUDA_OVERHEAD_BYTES

    def phase_bytes(self, phase: str) -> int:
        return sum(component.bytes for component in self.components if phase in component.phases)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def allocated_bytes(self) -> int:
        """The peak that `torch.cuda.max_memory_allocated` would report."""
        return self.phase_bytes(self.peak_phase)

    @property
    def total_bytes(self) -> int:
        """What the card must hold: the peak plus the CUDA overhead."""
        return self.allocated_bytes + self.overhead_bytes

    def fits(self, card_gib: float) -> bool:
        return self.total_bytes <= card_gib * GiB

    def component_bytes(self, name: str) -> int:
        return sum(component.bytes for component in self.components if component.name == name)


def critic_layer_count(shape: ModelShape, setup: TrainingSetup) -> int:
    """Decoder layers the critic runs with its adapter: the top `critic_layers` of a shared base (a quarter by
    default; 0, or as many as the model has, means all); all of them for a critic of its own, and for a shared critic
    beside a reward adapter on the same base, which starts from a copy of that adapter (on every layer)."""
    layers = shape.num_layers
    if setup.critic != "shared" or setup.reward_model == "shared":
        return layers
    return len(critic_layer_indices(layers, setup.critic_layers))


def estimate(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Every component of the peak, with the phases it is alive in."""
    critic_layers = critic_layer_count(shape, setup)
    parts = held_components(shape, setup, critic_layers)
    parts += generation_components(shape, setup)
    parts += no_grad_pass_components(shape, setup, critic_layers)
    parts += critic_components(shape, setup, critic_layers)
    parts += policy_update_components(shape, setup)
    return MemoryEstimate(tuple(parts), CUDA_OVERHEAD_BYTES if setup.device == "cuda" else 0)


def policy_adapter_size(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes of the policy's LoRA adapter (and of its gradients)."""
    return (
        lora_parameters(shape, setup.lora_target_modules, setup.lora_r, shape.num_layers) * setup.policy_adapter_bytes
    )


def critic_trainable_size(shape: ModelShape, setup: TrainingSetup, critic_layers: int) -> int:
    """Bytes of the critic's fp32 adapter and value head (and of their gradients)."""
    return lora_parameters(shape, setup.lora_target_modules, setup.lora_r, critic_layers) * 4 + value_head_bytes(shape)


def held_components(shape: ModelShape, setup: TrainingSetup, critic_layers: int) -> list[Component]:
    """What the run holds throughout (weights, adapters, optimizer states, the rollout batch) and the 4-bit
    dequantization of every forward."""
    c, quantized = setup.activation_bytes, setup.quantization == "4bit"
    targets, r = setup.lora_target_modules, setup.lora_r
    policy_adapter_bytes = setup.policy_adapter_bytes

    def base(head: str) -> int:
        return base_weight_bytes(shape, quantized, setup.double_quant, c, head)

    forward_phases = ("generation", "log-prob passes", "critic", "policy update")
    parts = [Component("policy base weights", base("lm_head"), PHASES, _base_note(quantized))]
    if setup.reference == "separate":
        parts.append(Component("reference weights", base("lm_head"), PHASES, "a frozen copy of the policy"))
    if setup.critic == "separate":
        parts.append(Component("critic base weights", base("none"), PHASES, "a bare decoder of its own"))
    if setup.reward_model == "separate":
        parts.append(Component("reward model weights", base("score"), PHASES, "a sequence classifier"))
        forward_phases += ("rewards",)
    elif setup.reward_model == "shared":
        forward_phases += ("rewards",)

    policy_lora = policy_adapter_size(shape, setup)
    parts.append(Component("policy adapter", policy_lora, PHASES, f"LoRA r={r}, {policy_adapter_bytes}-byte"))
    trainable = policy_lora
    if setup.critic != "none":
        critic_trainable = critic_trainable_size(shape, setup, critic_layers)
        parts.append(
            Component("critic adapter + value head", critic_trainable, PHASES, f"fp32, {critic_layers} layers")
        )
        trainable += critic_trainable
    if setup.reward_model != "function":  # the reward recipes' LoRA adapter, loaded unmerged (PEFT makes it fp32)
        reward_adapter = lora_parameters(shape, targets, r, shape.num_layers) * 4
        parts.append(Component("reward adapter", reward_adapter, PHASES, "fp32, inference only"))
    parts.append(Component("optimizer states", 2 * trainable, PHASES, "AdamW exp_avg + exp_avg_sq, param dtype"))
    parts.append(
        Component("rollout batch", rollout_batch_bytes(setup), PHASES, f"{setup.generation_batch_size} completions")
    )

    if quantized:
        parts.append(
            Component("4-bit dequantization", dequantized_weight_bytes(shape, c), forward_phases, "largest Linear")
        )
    if quantized and setup.dequantize_for_inference:
        copies = dequantized_copies_bytes(shape, targets, c)
        parts.append(Component("dequantized weights", copies, PHASES, "dequantize_for_inference: base + merged"))
    return parts


def generation_components(shape: ModelShape, setup: TrainingSetup) -> list[Component]:
    """The KV cache and working set of generation, and the reward model's forward."""
    c, g, s = setup.activation_bytes, setup.generation_batch_size, setup.sequence_length
    parts = [
        Component("KV cache", kv_cache_bytes(shape, g, s, c), ("generation",), f"{g} x {s} tokens"),
        Component("generation working set", generation_working_bytes(shape, setup), ("generation",)),
    ]
    if setup.reward_model != "function":
        rows = setup.reward_batch_size
        reward_working = forward_working_bytes(shape, rows * (s + 1), c, 4, setup.autocast, setup.lora_target_modules)
        parts.append(Component("reward forward", reward_working, ("rewards",), f"{rows} x {s + 1} tokens, no grad"))
    return parts


def no_grad_pass_components(shape: ModelShape, setup: TrainingSetup, critic_layers: int) -> list[Component]:
    """The log-probability passes without gradients, and the layer input a shared critic reuses from them."""
    c, h, targets = setup.activation_bytes, shape.hidden_size, setup.lora_target_modules
    b, g, s = setup.per_device_train_batch_size, setup.generation_batch_size, setup.sequence_length
    rows = scored_rows(setup, b)
    passes = forward_working_bytes(shape, b * s, c, setup.policy_adapter_bytes, setup.autocast, targets)
    passes += fused_head_bytes(rows, shape, c, setup.device, backward=False)
    parts = [Component("no-grad passes", passes, ("log-prob passes",), f"micro-batches of {b}, log-prob tiles")]
    reuses_reference = setup.critic == "shared" and critic_layers < shape.num_layers and setup.reference == "adapters"
    if reuses_reference:
        cache = g * s * h * c
        parts.append(Component("cached critic layer input", cache, ("log-prob passes", "critic"), f"{g} x {s} x {h}"))
    return parts


def critic_components(shape: ModelShape, setup: TrainingSetup, critic_layers: int) -> list[Component]:
    """The critic's update: its activations and gradients."""
    if setup.critic == "none":
        return []
    c, h, tokens = setup.activation_bytes, shape.hidden_size, setup.per_device_train_batch_size * setup.sequence_length
    # the critic runs outside autocast
    critic_layer = layer_activation_bytes(shape, c, False, setup.lora_r, setup.lora_target_modules, 4)
    # every critic follows the run's checkpointing, one of its own as well as one on the shared base
    acts = stack_activation_bytes(tokens, critic_layers, critic_layer, c, h, setup.activation_checkpointing)
    acts += tokens * VALUE_HEAD_FEATURES * 4 * h
    note = f"{critic_layers} layers, {critic_layer / 1024:.0f} KiB/layer/token"
    note += f", checkpointing {setup.activation_checkpointing}"
    return [
        Component("critic activations", acts, ("critic",), note),
        Component("critic gradients", critic_trainable_size(shape, setup, critic_layers), ("critic",)),
    ]


def policy_update_components(shape: ModelShape, setup: TrainingSetup) -> list[Component]:
    """The policy's update: its activations, the fused LM head's log-probability tiles and its gradients."""
    c, h, b = setup.activation_bytes, shape.hidden_size, setup.per_device_train_batch_size
    policy_layer = layer_activation_bytes(
        shape, c, setup.autocast, setup.lora_r, setup.lora_target_modules, setup.policy_adapter_bytes
    )
    acts = stack_activation_bytes(
        b * setup.sequence_length, shape.num_layers, policy_layer, c, h, setup.activation_checkpointing
    )
    note = f"{policy_layer / 1024:.0f} KiB/layer/token, checkpointing {setup.activation_checkpointing}"
    rows = scored_rows(setup, b)
    head = fused_head_bytes(rows, shape, c, setup.device, backward=True)
    return [
        Component("policy activations", acts, ("policy update",), note),
        Component("log-prob tiles", head, ("policy update",), f"fused LM head over {rows} positions"),
        Component("policy gradients", policy_adapter_size(shape, setup), ("policy update",)),
    ]


def _base_note(quantized: bool) -> str:
    return "NF4 decoder Linears, embeddings/head/norms in dtype" if quantized else "all in dtype"


# ---- recipes ----
def setup_from_recipe(
    recipe: dict, engine: str | None = None, **overrides
) -> tuple[str | None, TrainingSetup, list[str]]:
    """model_name_or_path (None when the recipe has none), the `TrainingSetup` of a reinforce recipe (a YAML file's
    dict) with `overrides` applied, and notes on what the estimate assumed. Fields the recipe leaves out take the
    trainer's defaults; the models sit where the trainer puts them (`recipe_placement`), launched under `engine`."""
    if recipe.get("load_in_8bit"):
        raise ValueError(
            "The recipe sets load_in_8bit; the estimate models 4-bit (load_in_4bit) or unquantized bases."
        )
    if not recipe.get("use_peft", False):
        raise ValueError("The recipe trains the full model (use_peft is not true); the estimate models LoRA training.")
    targets = recipe.get("lora_target_modules") or ["q_proj", "v_proj"]  # PEFT's default for Llama and Qwen2
    targets = LINEAR_MODULES if targets in ("all-linear", ["all-linear"]) else tuple(targets)
    batch = recipe.get("per_device_train_batch_size", 8)
    if recipe.get("steps_per_generation"):
        steps = recipe["steps_per_generation"]
    elif recipe.get("generation_batch_size"):
        steps = recipe["generation_batch_size"] // batch
    else:
        steps = recipe.get("gradient_accumulation_steps", 1)
    checkpointing = recipe.get("activation_checkpointing", recipe.get("gradient_checkpointing", True))
    dtype = recipe.get("dtype", "bfloat16")
    fields = {
        "per_device_train_batch_size": batch,
        "steps_per_generation": steps,
        "max_completion_length": recipe.get("max_completion_length", 512),  # RLOOConfig's default
        "lora_r": recipe.get("lora_r", 16),
        "lora_target_modules": targets,
        "quantization": "4bit" if recipe.get("load_in_4bit") else "none",
        "double_quant": bool(recipe.get("use_bnb_nested_quant", False)),
        "dtype": dtype if dtype in DTYPE_BYTES else "bfloat16",
        "activation_checkpointing": bool(checkpointing),
        "critic_layers": recipe.get("critic_layers"),
        **layout_of(*recipe_placement(recipe, engine)),
        "device": "cpu" if recipe.get("use_cpu") else "cuda",
        "dequantize_for_inference": bool(recipe.get("dequantize_for_inference", False)),
    }
    fields.update({key: value for key, value in overrides.items() if value is not None})
    notes = []
    if "critic_layers" not in overrides or overrides["critic_layers"] is None:
        fields["critic_layers"], note = _warm_started_critic_layers(recipe, fields)
        notes += [note] if note else []
    return recipe.get("model_name_or_path"), TrainingSetup(**fields), notes


def _warm_started_critic_layers(recipe: dict, fields: dict) -> tuple[int | None, str]:
    """A shared critic starts from a reward adapter on the same base and then trains that adapter's layers (all of
    them unless it sets layers_to_transform), whatever critic_layers says. Read from the adapter when it is on disk."""
    reward, policy = recipe.get("reward_model_name_or_path"), recipe.get("model_name_or_path", "")
    if fields["critic"] != "shared" or not reward:
        return fields["critic_layers"], ""
    adapter_config = Path(reward) / "adapter_config.json"
    if not adapter_config.is_file():
        return fields["critic_layers"], (
            f"If {reward} is a LoRA adapter on {policy} (as the reward recipes write), the "
            "critic starts from it and trains all the layers it trains: add --critic_layers 0 to estimate that."
        )
    config = json.loads(adapter_config.read_text())
    if Path(config.get("base_model_name_or_path", "")).name != Path(policy).name:
        return fields["critic_layers"], ""
    layers = config.get("layers_to_transform")  # the top layers, as a shared critic's own adapter takes them
    if not isinstance(layers, list):  # chosen by module names or a regular expression: the layers its weights name
        layers = adapted_layers(Path(reward) / "adapter_model.safetensors")
    return len(layers), f"The critic starts from the reward adapter {reward} on the same base and trains its layers."


def adapted_layers(adapter_weights: Path) -> list[int]:
    """The decoder layers (`layers.<i>`) an adapter file holds weights for; empty when it names none or is absent."""
    if not adapter_weights.is_file():
        return []
    with safe_open(str(adapter_weights), framework="pt") as weights:
        return sorted({layer for layer in map(layer_of, weights.keys()) if layer is not None})
