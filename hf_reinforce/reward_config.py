from dataclasses import dataclass, field

from trl import RewardConfig as TRLRewardConfig

from .config_defaults import overwrite_output_dir_field, resolve_device_defaults, resume_from_checkpoint_field


@dataclass
class RewardConfig(TRLRewardConfig):
    r"""
    Configuration class for the [`RewardTrainer`]: every [`trl.RewardConfig`] field, checked before training.

    This class lists only the parameters that this package adds to [`trl.RewardConfig`] or redefines; every other field
    of [`trl.RewardConfig`] and [`~transformers.TrainingArguments`] keeps its meaning. `max_length` must be positive
    or `None`, and `center_rewards_coefficient` non-negative.

    The trainer minimises the Bradley-Terry loss `−p·log σ(r_c − r_r − m) − (1−p)·log σ(r_r − r_c − m)`, where `p`
    is the dataset's optional `chosen_prob` column (1.0 when absent, which is TRL's loss) and `m` its optional
    `margin` column. Both are per-row data, so no field is needed to switch them on.

    Parameters:
        > Parameters that control the training

        shared_prefix_forward (`bool`, *optional*, defaults to `False`):
            Run the tokens that every sequence of a batch starts with (a chat template's system turn, an instruction
            every prompt shares) once per batch, their keys and values shared by every sequence: the same loss and
            gradients to float rounding, for that share of the tokens less compute. For decoder models in one
            process, and only with `activation_checkpointing=False` (which TRL's reward default turns on).

        > Parameters that control the training scripts (`hf-reinforce reward`)

        resume_from_checkpoint (`str`, *optional*):
            As in [`ReinforceConfig`]: a checkpoint folder, `true` (the newest complete one in `output_dir`) or `auto`.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            As in [`ReinforceConfig`]: replace a saved model in `output_dir` instead of refusing the folder.

    > [!NOTE]
    > These parameters have default values different from [`trl.RewardConfig`]:
    > - `bf16`: Defaults to `True` only on an accelerator that supports it, instead of whenever `fp16` is not set.
    > - `dataloader_pin_memory`: Always `False` without an accelerator, where there is nothing to pin memory for.
    """

    resume_from_checkpoint: str | None = resume_from_checkpoint_field()
    overwrite_output_dir: bool = overwrite_output_dir_field()
    shared_prefix_forward: bool = field(
        default=False,
        metadata={
            "help": "Run the tokens that every sequence of a batch starts with (a chat template's system turn, an "
            "instruction every prompt shares) once per batch, their keys and values shared by every sequence: the "
            "same loss and gradients to float rounding, for that share of the tokens less compute. For decoder "
            "models in one process, without activation checkpointing (which drops the shared keys and values)."
        },
    )

    def __post_init__(self):
        resolve_device_defaults(self)
        super().__post_init__()
        # TRL accepts these values and then fails, or trains on nothing, far from the line that set them
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None (no filtering), got {self.max_length}."
            )
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                "`center_rewards_coefficient` must be >= 0: a negative value rewards pushing every reward away "
                f"from zero, which has no minimum. Got {self.center_rewards_coefficient}."
            )
        if self.shared_prefix_forward and self.activation_checkpointing:
            raise ValueError(
                "`shared_prefix_forward` needs the shared tokens' keys and values kept between two forwards, which "
                "`activation_checkpointing` (TRL's default for reward models) turns off; set "
                "`activation_checkpointing: false`, or `shared_prefix_forward: false`."
            )

    # Why: `Trainer` pickles its arguments into training_args.bin beside every saved model and checkpoint, which
    # `push_to_hub` uploads; the Hub token stays in memory only
    def __getstate__(self):
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state
