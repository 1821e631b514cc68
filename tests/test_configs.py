"""The configs: their documentation, the warning for critic fields that another baseline ignores, the deprecated
`whiten_advantages` alias, the errors that name their fields, and the baseline's documented formula."""

import ast
import dataclasses
import math
import re
import warnings

import pytest
import torch
from transformers import HfArgumentParser
from trl import RewardConfig as TRLRewardConfig
from trl import RLOOConfig

from hf_reinforce import ReinforceConfig, RewardConfig
from hf_reinforce.advantages import critic_baseline, critic_weight_sums, leave_one_out_mean
from hf_reinforce.reinforce_config import CRITIC_ONLY_FIELDS


# A value other than the default for each field that only the critic reads.
CRITIC_FIELD_VALUES = {
    "critic_learning_rate": 1e-4,
    "critic_weight": 0.0,
    "critic_warmup_steps": 5,
    "critic_shares_base": False,
    "critic_layers": 2,
    "critic_epochs": 3,
    "critic_max_grad_norm": 0.5,
    "critic_pretraining_epochs": 2,
    "critic_head_only": True,
    "lam": 0.9,
}
OTHER_BASELINES = ("otb", "rloo", "mean", "none")
IGNORED = "is ignored with baseline="


def reinforce_config(tmp_path, **overrides) -> ReinforceConfig:
    settings = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "num_generations": 2}
    return ReinforceConfig(**{**settings, **overrides})


def reward_config(tmp_path, **overrides) -> RewardConfig:
    return RewardConfig(**{"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, **overrides})


def construct(factory, tmp_path, **overrides):
    """The config and every warning its construction raised, whatever the warning filters say."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = factory(tmp_path, **overrides)
    return config, caught


def ignored_field_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and IGNORED in str(w.message)]


def added_fields(config_class, parent) -> list[str]:
    """Fields the package adds to the TRL config, or redeclares with help of its own."""
    parent_help = {f.name: f.metadata.get("help") for f in dataclasses.fields(parent)}
    return [
        f.name
        for f in dataclasses.fields(config_class)
        if f.name not in parent_help or f.metadata.get("help") != parent_help[f.name]
    ]


def documented_groups(config_class) -> dict[str, list[str]]:
    """The `Parameters:` section of a TRL-style docstring: {group heading: [parameter names]}."""
    doc = config_class.__doc__
    section = doc[doc.index("    Parameters:\n") :]
    groups, heading = {}, None
    for line in section.splitlines()[1:]:
        if line.startswith("        > "):
            heading = line.removeprefix("        > ")
            groups[heading] = []
        elif heading is not None and (match := re.match(r"^        (\w+)( \(`|:$)", line)):
            groups[heading].append(match.group(1))
    return groups


def test_the_added_fields_are_the_expected_ones():
    """Guards the docstring test below against an empty or stale list of fields."""
    assert CRITIC_ONLY_FIELDS == tuple(CRITIC_FIELD_VALUES)
    assert set(CRITIC_ONLY_FIELDS) | {"baseline", "gamma", "whiten_advantages", "normalize_advantages"} <= set(
        added_fields(ReinforceConfig, RLOOConfig)
    )
    assert {"shared_prefix_forward", "resume_from_checkpoint", "overwrite_output_dir"} <= set(
        added_fields(RewardConfig, TRLRewardConfig)
    )


@pytest.mark.parametrize(("config_class", "parent"), [(ReinforceConfig, RLOOConfig), (RewardConfig, TRLRewardConfig)])
def test_every_added_field_is_documented_once_with_its_help(config_class, parent):
    documented = [name for names in documented_groups(config_class).values() for name in names]
    for name in added_fields(config_class, parent):
        assert documented.count(name) == 1, f"{name} is documented {documented.count(name)} times"
        assert config_class.__dataclass_fields__[name].metadata["help"], f"{name} has no --help text"
    # Each entry names its default as the field declares it (None defaults are only *optional*).
    for name in documented:
        default = config_class.__dataclass_fields__[name].default
        entry = re.search(rf"^        {name}( \(.*\)|):$", config_class.__doc__, re.MULTILINE).group(0)
        shown = re.search(r"defaults to `(.*)`", entry)
        if default is None or name == "whiten_advantages":  # the deprecated alias's entry is TRL's bare `name:`
            assert shown is None, entry
        else:
            assert shown is not None and ast.literal_eval(shown.group(1)) == default, entry


def test_the_critic_group_holds_exactly_the_fields_that_warn():
    groups = documented_groups(ReinforceConfig)
    (critic_group,) = [heading for heading in groups if 'only used when `baseline="critic"`' in heading]
    assert sorted(groups[critic_group]) == sorted(CRITIC_ONLY_FIELDS)


def test_the_docs_give_the_recentred_baseline_not_v():
    text = ReinforceConfig.__doc__ + ReinforceConfig.__dataclass_fields__["baseline"].metadata["help"]
    assert "b_t^i = w·V(s_t^i) + mean_{j≠i}(G_t^j − w·V(s_t^j))" in text
    assert "[0, 2]" in text and "earlier training batches" in text
    for config_class in (ReinforceConfig, RewardConfig):
        helps = " ".join(f.metadata.get("help", "") for f in dataclasses.fields(config_class))
        assert "the seed" not in config_class.__doc__ + helps
        assert "design note" not in config_class.__doc__ + helps


@pytest.mark.parametrize("baseline", OTHER_BASELINES)
@pytest.mark.parametrize("name", CRITIC_ONLY_FIELDS)
def test_a_critic_field_set_under_another_baseline_warns(tmp_path, name, baseline):
    value = CRITIC_FIELD_VALUES[name]
    config, caught = construct(reinforce_config, tmp_path, baseline=baseline, **{name: value})
    messages = ignored_field_warnings(caught)
    assert messages == [
        f"{name}={value!r} is ignored with baseline={baseline!r}: it only acts on the critic, which only "
        "baseline='critic' trains; leave it unset or set `baseline: critic`."
    ]
    # The warning points at the line that built the config, not at the config's own code.
    (record,) = [w for w in caught if IGNORED in str(w.message)]
    assert record.filename == __file__
    assert getattr(config, name) == value  # warned about, not changed


def test_critic_fields_warn_once_each_together(tmp_path):
    _, caught = construct(reinforce_config, tmp_path, baseline="mean", **CRITIC_FIELD_VALUES)
    messages = ignored_field_warnings(caught)
    assert [message.split("=", 1)[0] for message in messages] == list(CRITIC_ONLY_FIELDS)


def test_critic_fields_do_not_warn_under_the_critic_baseline(tmp_path):
    _, caught = construct(reinforce_config, tmp_path, baseline="critic", **CRITIC_FIELD_VALUES)
    assert ignored_field_warnings(caught) == []


@pytest.mark.parametrize("baseline", ("critic", *OTHER_BASELINES))
def test_defaults_and_fields_of_every_baseline_do_not_warn(tmp_path, baseline):
    """gamma discounts every baseline's returns and reward_shares_base places any reward model: neither is ignored."""
    _, caught = construct(reinforce_config, tmp_path, baseline=baseline)
    assert ignored_field_warnings(caught) == []
    _, caught = construct(reinforce_config, tmp_path, baseline=baseline, gamma=0.9, reward_shares_base=False)
    assert ignored_field_warnings(caught) == []


@pytest.mark.parametrize("value", [True, False])
def test_whiten_advantages_is_a_deprecated_alias_of_normalize_advantages(tmp_path, value):
    config, caught = construct(reinforce_config, tmp_path, whiten_advantages=value)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "whiten" in str(w.message)]
    assert future == [
        "`whiten_advantages` is deprecated and will be removed; use `normalize_advantages: "
        f"{str(value).lower()}` instead (set to that value now)."
    ]
    assert config.normalize_advantages is value
    assert config.whiten_advantages is value  # still readable by code that reads the old name


@pytest.mark.parametrize("value", [True, False])
def test_normalize_advantages_alone_does_not_warn_and_is_read_back_by_the_old_name(tmp_path, value):
    config, caught = construct(reinforce_config, tmp_path, normalize_advantages=value)
    assert not [w for w in caught if "whiten_advantages" in str(w.message)]
    assert config.normalize_advantages is value
    assert config.whiten_advantages is value


def test_whiten_advantages_agreeing_with_normalize_advantages_is_accepted(tmp_path):
    config = reinforce_config(tmp_path, whiten_advantages=True, normalize_advantages=True)
    assert config.normalize_advantages is config.whiten_advantages is True


def test_whiten_advantages_contradicting_normalize_advantages_is_refused(tmp_path):
    with pytest.raises(ValueError, match="whiten_advantages=False contradicts normalize_advantages=True"):
        reinforce_config(tmp_path, whiten_advantages=False, normalize_advantages=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], False), (["--whiten_advantages"], True), (["--whiten_advantages", "false"], False)],
)
def test_whiten_advantages_on_the_command_line(tmp_path, argv, expected):
    """The bare flag still means true, as when the field was a plain bool."""
    parser = HfArgumentParser(ReinforceConfig)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", *argv]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (config,) = parser.parse_args_into_dataclasses(base)
    assert config.normalize_advantages is config.whiten_advantages is expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"baseline": "ppo"}, "baseline='ppo' is not supported; set `baseline`"),
        ({"baseline": "rloo", "num_generations": 1}, "baseline='rloo' needs at least two .*num_generations=1"),
        ({"baseline": "mean", "num_generations": 0}, "num_generations=0"),
        ({"critic_learning_rate": math.nan}, "critic_learning_rate=nan"),
        ({"critic_learning_rate": 0.0}, "critic_learning_rate=0.0"),
        ({"critic_warmup_steps": -1}, "critic_warmup_steps=-1"),
        ({"critic_layers": -1}, "critic_layers=-1"),
        ({"critic_epochs": 0}, "critic_epochs=0"),
        ({"critic_pretraining_epochs": 0}, "critic_pretraining_epochs=0"),
        ({"critic_max_grad_norm": -1.0}, "critic_max_grad_norm=-1.0"),
        ({"gamma": 0.0}, "gamma=0.0"),
        ({"gamma": 1.5}, "gamma=1.5"),
        ({"lam": 1.5}, "lam=1.5"),
        ({"lam": -0.1}, "lam=-0.1"),
        ({"missing_eos_penalty": math.inf}, "missing_eos_penalty=inf"),
        ({"num_iterations": 0}, "num_iterations=0"),
        ({"inverse_cdf_sampling": True, "top_p": 0.9}, "inverse_cdf_sampling .* but top_p=0.9; reset `top_p`"),
    ],
)
def test_reinforce_config_errors_name_their_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        reinforce_config(tmp_path, **overrides)


def test_validation_runs_before_the_ignored_field_warning(tmp_path):
    """A bad value under another baseline is an error, not a warning that it is ignored."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="lam=1.5"):
        warnings.simplefilter("always")
        reinforce_config(tmp_path, baseline="mean", lam=1.5)
    assert ignored_field_warnings(caught) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 0}, "`max_length` must be a positive number of tokens or None"),
        ({"center_rewards_coefficient": -0.1}, "`center_rewards_coefficient` must be >= 0"),
        ({"shared_prefix_forward": True, "activation_checkpointing": True}, "`shared_prefix_forward` needs"),
    ],
)
def test_reward_config_errors_name_their_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        reward_config(tmp_path, **overrides)


def test_the_documented_baseline_formula_is_the_computed_one():
    """b_t^i = w·V(s_t^i) + mean_{j≠i}(G_t^j − w·V(s_t^j)), a shorter completion standing in with its last token."""
    values = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 0.0], [2.0, 0.0, 1.0], [4.0, 1.0, 2.0]])
    returns = torch.tensor([[3.0, 2.0, 1.0], [1.0, 4.0, 0.0], [0.0, 2.0, 5.0], [6.0, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # row 1 ends at t=1
    w = 0.7
    # Row 1 stands in at t=2 with its last token's G − w·V = 4 − 0.7·1.
    residual = returns - w * values
    residual[1, 2] = 4.0 - w * 1.0
    for group_size in (2, 4):  # two prompts of two completions; one prompt each (the others are the whole batch)
        expected = torch.empty_like(values)
        for i in range(4):
            start = i // group_size * group_size
            others = [j for j in range(start, start + group_size) if j != i]
            expected[i] = w * values[i] + residual[others].mean(dim=0)
        computed = critic_baseline(values, returns, mask, group_size, weight=w)
        torch.testing.assert_close(computed[mask.bool()], expected[mask.bool()])
    # w = 0, as during critic_warmup_steps: the leave-one-out mean of the other completions' returns.
    fallback = critic_baseline(values, returns, torch.ones_like(mask), 2, weight=0.0)
    torch.testing.assert_close(fallback, leave_one_out_mean(returns, 2))


def test_the_documented_slope_is_the_regression_of_recentred_returns_on_recentred_values():
    """w fits G_t − mean_{j≠i} G_t^j on V(s_t) − mean_{j≠i} V(s_t^j); with two completions that is y = ±(G_1 − G_2)."""
    values = torch.tensor([[1.0], [3.0], [0.0], [1.0]])
    returns = torch.tensor([[2.0], [5.0], [1.0], [4.0]])
    sums = critic_weight_sums(values, returns, torch.ones_like(values), 2)
    x = torch.tensor([-2.0, 2.0, -1.0, 1.0])  # V_i − V_other
    y = torch.tensor([-3.0, 3.0, -3.0, 3.0])  # G_i − G_other
    torch.testing.assert_close(sums, torch.stack([(x * y).sum(), x.square().sum(), y.square().sum()]))
    assert (sums[0] / sums[1]).item() == pytest.approx(18 / 10)
