"""Two-process runs exit cleanly: the tiny two-process REINFORCE run, launched five times beside a competing CPU-bound
process, finishes and exits every time (`benchmarks/stress_launch.py --launches 30` is the full stress run)."""

import importlib.util
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

STRESS_SCRIPT = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "stress_launch.py"


def load_stress_script():
    spec = importlib.util.spec_from_file_location("stress_launch", STRESS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_five_two_process_launches_beside_a_cpu_bound_process_all_exit(tmp_path):
    summary = load_stress_script().stress(tmp_path, launches=5, max_steps=4, timeout=240, compete=True)
    failures = [result for result in summary["results"] if result["status"] != "ok"]
    assert failures == [], failures
