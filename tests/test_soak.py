"""A short soak in CI: nothing the trainers keep grows with the step count (`benchmarks/soak.py` runs it for hours).

Resident memory is not compared (the allocator's pages move on their own); the number of live tensors and the bytes
of the trainer's own caches are, at step N and 3N, both right after a log.
"""

import importlib.util
from pathlib import Path

import pytest


SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
N = 4


@pytest.fixture(scope="module")
def soak_module():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["shared_critic", "reward"])
def test_live_tensors_and_caches_stay_flat_from_step_n_to_3n(soak_module, tmp_path, config):
    records = soak_module.soak(config, steps=3 * N, workdir=str(tmp_path), logging_steps=N, interval=N)
    by_step = {record["step"]: record for record in records}
    assert set(by_step) == {N, 2 * N, 3 * N}
    assert by_step[3 * N]["live_tensors"] == by_step[N]["live_tensors"]
    assert by_step[3 * N]["cache_bytes"] == by_step[N]["cache_bytes"]
    if config == "shared_critic":
        assert by_step[N]["cache_bytes"] > 0  # the dequantised weights are counted: the check can see a cache grow
