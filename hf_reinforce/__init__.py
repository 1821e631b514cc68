"""hf_reinforce: REINFORCE with a value-head critic and Bradley-Terry reward models, as drop-in TRL trainers."""

__version__ = "0.1.0"

from .reinforce_config import ReinforceConfig  # noqa: E402
from .reinforce_trainer import ReinforceTrainer  # noqa: E402
from .reward_config import RewardConfig  # noqa: E402
from .reward_trainer import RewardTrainer  # noqa: E402
from .value_head import ValueHeadModel  # noqa: E402


__all__ = ["RewardConfig", "RewardTrainer", "ReinforceConfig", "ReinforceTrainer", "ValueHeadModel", "__version__"]
