"""Every seeded tiny run of `reference_runs.py` reproduces its recorded per-step losses and final weights exactly."""

import pytest
import torch
from reference_runs import CONFIGURATIONS, recorded, run


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_reference_run_reproduces_its_recording(tmp_path, name):
    threads = torch.get_num_threads()
    try:
        losses, weights = run(name, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    expected_losses, expected_weights = recorded(name)
    assert losses == expected_losses
    assert sorted(weights) == sorted(expected_weights)
    differing = [key for key in weights if not torch.equal(weights[key], expected_weights[key])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
