"""Named arms for comparisons that change one thing at a time: each is a set of `ReinforceConfig` fields over a
recipe's. `real-demo --arm` and `benchmarks/baselines.py --arms` read them.

- `critic`: the value-head critic, recentred on the other completions, with its fitted weight w (the default).
- `critic-w0`: the isolated ablation of the critic: the same trainer, returns, critic and critic training, with
  w held at 0, so the baselines are the other completions' mean return G_t per token. The critic's worth is the
  difference between `critic` and this arm, and nothing else.
- `critic-1`: the critic with one completion per prompt (the others are the rest of the batch).
- `critic-head`: the critic's value head trained alone, on its frozen backbone (`critic_head_only`): with the
  recipe's critic, a head on the reward adapter's hidden states.
- `otb`: the optimal token baseline, critic-free (`advantages.optimal_token_baseline`).
- `rloo`: the leave-one-out mean with the KL summed into the sequence reward, as `trl.RLOOTrainer` does.
- `mean`, `none`: the batch mean, no baseline.
"""

ARMS = {
    "critic": {"baseline": "critic"},
    "critic-w0": {"baseline": "critic", "critic_weight": 0.0},
    "critic-1": {"baseline": "critic", "num_generations": 1},
    "critic-head": {"baseline": "critic", "critic_head_only": True},
    "otb": {"baseline": "otb"},
    "rloo": {"baseline": "rloo"},
    "mean": {"baseline": "mean"},
    "none": {"baseline": "none"},
}


def arm_flags(arm: str) -> list[str]:
    """The command-line flags of an arm, for a script parsed with `trl.TrlParser`."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is not one of {', '.join(ARMS)}.")
    return [item for name, value in ARMS[arm].items() for item in (f"--{name}", str(value))]
