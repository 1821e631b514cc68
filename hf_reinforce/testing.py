"""Tiny offline models, tokenizers and datasets: kept importable here; they live in `hf_reinforce.examples.tiny`."""

from .examples.tiny import *  # noqa: F401,F403
