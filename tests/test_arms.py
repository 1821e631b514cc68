"""The named arms (`hf_reinforce.examples.arms`): each parses into the config it names, through the recipe parser."""

import dataclasses
from pathlib import Path

import pytest

from hf_reinforce.examples.arms import ARMS, arm_flags
from hf_reinforce.examples.real_demo.arguments import RealDemoArguments
from hf_reinforce.examples.real_demo.data import REINFORCE_RECIPE
from hf_reinforce.examples.real_demo.training import recipe_args
from hf_reinforce.scripts import reinforce as reinforce_script


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_arm_sets_its_fields_over_the_recipe(arm):
    _, training_args, _ = recipe_args(reinforce_script, REINFORCE_RECIPE, arm_flags(arm))
    for name, value in ARMS[arm].items():
        assert getattr(training_args, name) == value, name
    recipe = recipe_args(reinforce_script, REINFORCE_RECIPE, [])[1]
    differing = {
        f.name for f in dataclasses.fields(recipe) if getattr(recipe, f.name) != getattr(training_args, f.name)
    }
    assert differing <= set(ARMS[arm])  # nothing else moves


def test_the_isolated_ablation_differs_from_the_critic_in_its_weight_only():
    assert {**ARMS["critic"], "critic_weight": 0.0} == ARMS["critic-w0"]


def test_an_unknown_arm_is_named():
    with pytest.raises(ValueError, match="arm='critic-2' is not one of"):
        arm_flags("critic-2")
    with pytest.raises(ValueError, match="arm='critic-2' is not one of"):
        RealDemoArguments(arm="critic-2")


def test_reinforce_settings_reach_the_trainer_config(monkeypatch):
    from hf_reinforce.examples.real_demo import training

    captured = {}
    monkeypatch.setattr(training, "ReinforceTrainer", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setattr(training, "with_metrics_on_progress_bar", lambda trainer, metrics: trainer)
    monkeypatch.setattr(training, "read_jsonl", lambda path: [{"prompt": "a"}])
    monkeypatch.setattr(training, "model_init_kwargs", lambda *args: {})
    args = RealDemoArguments(arm="critic-w0", reinforce_settings="critic_learning_rate=1e-4 critic_epochs=2")
    training.build_reinforce_trainer("model", Path("data"), Path("out"), args, seed=10)
    config = captured["args"]
    assert (config.critic_learning_rate, config.critic_epochs, config.critic_weight) == (1e-4, 2, 0.0)
    with pytest.raises(ValueError, match="reinforce_settings: 'critic_epochs' is not `name=value`"):
        RealDemoArguments(reinforce_settings="critic_epochs")
