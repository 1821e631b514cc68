"""Every recipe parses through the parser of its script, so a recipe cannot drift from the config classes."""

import importlib
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from hf_reinforce import cli


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate_configs"
# recipes/<model>/<task>/<name>.yaml: the task folder names the script that reads the recipe.
TRAINING_RECIPES = sorted(path for path in RECIPES.rglob("*.yaml") if ACCELERATE_CONFIGS not in path.parents)
SCRIPTS = ("reward", "reinforce")


def recipe_id(path: Path) -> str:
    return str(path.relative_to(RECIPES))


def parse_recipe(path: Path, *extra_args: str):
    script = importlib.import_module(f"hf_reinforce.scripts.{path.parent.name}")
    # The GPU recipes set bf16, which TrainingArguments refuses on a machine without a bf16-capable GPU unless
    # `use_cpu` is set. Overriding only that flag on the command line keeps every other check: a key that is no field
    # of the script's dataclasses raises, each value goes through its field's type and choices, and the configs'
    # __post_init__ validation runs.
    return script.make_parser().parse_args_and_config(["--config", str(path), "--use_cpu", "true", *extra_args])


def test_the_expected_recipes_are_found():
    expected = {
        f"{model}/{task}/config_qlora.yaml" for model in ("tiny", "qwen2.5-0.5b", "llama-3.1-8b") for task in SCRIPTS
    }
    assert expected <= {recipe_id(path) for path in TRAINING_RECIPES}


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=recipe_id)
def test_recipe_parses_with_its_script(recipe):
    assert recipe.parent.name in SCRIPTS, f"{recipe_id(recipe)} is not under a folder named after a script"
    values = yaml.safe_load(recipe.read_text())
    script_args, training_args, model_args = parse_recipe(recipe)
    parsed = {**vars(script_args), **vars(model_args)}
    # Spot checks that the recipe's values, not the defaults, were parsed.
    assert training_args.output_dir == values["output_dir"]
    assert parsed["model_name_or_path"] == values["model_name_or_path"]
    assert parsed["dataset_name"] == values["dataset_name"]


def test_a_recipe_key_that_is_no_field_fails(tmp_path):
    recipe = tmp_path / "reward" / "config_qlora.yaml"
    recipe.parent.mkdir()
    recipe.write_text((RECIPES / "tiny" / "reward" / "config_qlora.yaml").read_text() + "lora_rank: 8\n")
    with pytest.raises(ValueError, match="lora_rank"):
        parse_recipe(recipe)


@pytest.mark.parametrize("model", sorted({path.parent.parent.name for path in TRAINING_RECIPES}))
def test_reinforce_recipe_reads_the_output_of_its_reward_recipe(model):
    reward_recipe = yaml.safe_load((RECIPES / model / "reward" / "config_qlora.yaml").read_text())
    reinforce_recipe = yaml.safe_load((RECIPES / model / "reinforce" / "config_qlora.yaml").read_text())
    assert reinforce_recipe["reward_model_name_or_path"] == reward_recipe["output_dir"]
    # The reward model is trained from the policy's model, so both read text with the same tokenizer and template.
    assert reinforce_recipe["model_name_or_path"] == reward_recipe["model_name_or_path"]


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=recipe_id)
def test_recipe_folder_readme_gives_the_command(recipe):
    readme = recipe.parent / "README.md"
    assert readme.is_file()
    assert f"--config {recipe.relative_to(RECIPES.parent)}" in readme.read_text()


def test_recipes_index_links_every_recipe_folder():
    index = (RECIPES / "README.md").read_text()
    for recipe in TRAINING_RECIPES:
        assert f"({recipe.parent.relative_to(RECIPES)}/README.md)" in index


EXPECTED_ACCELERATE_CONFIGS = {
    "single_gpu": (DistributedType.NO, {}),
    "ddp": (DistributedType.MULTI_GPU, {}),
    "zero2": (DistributedType.DEEPSPEED, {"zero_stage": 2}),
    "zero3": (DistributedType.DEEPSPEED, {"zero_stage": 3}),
    "fsdp2": (DistributedType.FSDP, {"fsdp_version": 2}),
}


def test_the_cli_knows_every_shipped_accelerate_config():
    assert cli.shipped_accelerate_configs() == sorted(EXPECTED_ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ACCELERATE_CONFIGS))
def test_accelerate_config_loads_with_accelerate(name):
    # accelerate's own loader refuses unknown keys and unknown values of `distributed_type`.
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    distributed_type, settings = EXPECTED_ACCELERATE_CONFIGS[name]
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == "bf16"
    for key, value in settings.items():
        assert {**(config.deepspeed_config or {}), **(config.fsdp_config or {})}[key] == value
