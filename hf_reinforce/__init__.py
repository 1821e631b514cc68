"""hf_reinforce: REINFORCE with a value-head critic and Bradley-Terry reward models, as drop-in TRL trainers."""

import importlib
import logging
import warnings
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# The public names load on first use, so that `hf-reinforce --help` and the CLI's argument errors do not wait for
# torch, transformers and TRL to import.
_PUBLIC_NAMES = {
    "ReinforceConfig": ".reinforce_config",
    "ReinforceTrainer": ".reinforce_trainer",
    "RewardConfig": ".reward_config",
    "RewardTrainer": ".reward_trainer",
    "ValueHeadModel": ".value_head",
}
__all__ = ["ReinforceConfig", "ReinforceTrainer", "RewardConfig", "RewardTrainer", "ValueHeadModel", "__version__"]

if TYPE_CHECKING:
    from .reinforce_config import ReinforceConfig
    from .reinforce_trainer import ReinforceTrainer
    from .reward_config import RewardConfig
    from .reward_trainer import RewardTrainer
    from .value_head import ValueHeadModel


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC_NAMES[name], __name__), name)
    globals()[name] = value
    return value


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes announces on every CPU 4-bit load that an optional accelerated kernel (the `kernels` package) is
    not installed; its own CPU kernel is used instead and trains correctly, so the notice only hides real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())

# PEFT (0.21) still asks transformers 5 for `is_gradient_checkpointing`, which warns that the name is deprecated on
# every adapter load: a note for PEFT's authors, nothing a user of this package can act on.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
