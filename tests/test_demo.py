"""The offline end-to-end demo, run as a user runs it: `hf-reinforce demo --output_dir DIR`."""

import json
import math
import sys
from pathlib import Path

import pytest

from hf_reinforce.cli import main as cli_main


# The contract of summary.json: what the demo reports, whatever else it adds
SUMMARY_KEYS = ("gold_reward_before", "gold_reward_after", "reward_model_accuracy", "critic_explained_variance")
# The models the demo leaves behind, each loadable on its own
SAVED_FILES = (
    "base_model/config.json",
    "base_model/tokenizer.json",
    "reward_model/adapter_config.json",
    "policy/adapter_config.json",
    "policy/value_model/value_head.safetensors",
    "policy/critic/adapter_config.json",  # the critic's adapter, beside the policy's on their shared base
)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "demo.md"


def run_demo(monkeypatch, output_dir: Path, *flags: str) -> dict:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the command rewrites sys.argv for the demo's parser
    assert cli_main(["demo", "--output_dir", str(output_dir), *flags]) == 0
    return json.loads((output_dir / "summary.json").read_text())


def check_outputs(output_dir: Path, summary: dict) -> None:
    for key in SUMMARY_KEYS:
        assert math.isfinite(summary[key]), key
    assert 0.0 <= summary["reward_model_accuracy"] <= 1.0
    assert (output_dir / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    for name in SAVED_FILES:
        assert (output_dir / name).is_file(), name


def results(summary: dict) -> dict:
    """What a run found, without how long it took or where it wrote."""
    return {key: value for key, value in summary.items() if key not in ("seconds_per_stage", "arguments")}


def test_quick_demo_writes_every_output_and_repeats_itself(tmp_path, monkeypatch):
    summary = run_demo(monkeypatch, tmp_path / "first", "--quick", "--seed", "3")
    check_outputs(tmp_path / "first", summary)
    repeated = run_demo(monkeypatch, tmp_path / "second", "--quick", "--seed", "3")
    assert results(repeated) == results(summary)


def documented_seed0() -> list[float]:
    """The seed-0 row of docs/demo.md's results table: gold before and after, RM accuracy, critic EV."""
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| 0 (default) |"))
    return [float(cell) for cell in row.strip("|").split("|")[1:5]]


@pytest.mark.slow
def test_demo_raises_the_gold_reward_as_documented(tmp_path, monkeypatch):
    summary = run_demo(monkeypatch, tmp_path)
    check_outputs(tmp_path, summary)
    print({key: summary[key] for key in SUMMARY_KEYS})
    assert summary["gold_reward_after"] > summary["gold_reward_before"]
    for key, documented in zip(SUMMARY_KEYS, documented_seed0(), strict=True):
        assert summary[key] == pytest.approx(documented, rel=0.1), f"docs/demo.md quotes {key}={documented}"
