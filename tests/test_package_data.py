"""The package reads no file outside itself: what it reads at run time is package data that pyproject.toml declares,
the copies it ships of repository files (accelerate configs, model configs, the SmolLM2 recipes) equal those files byte
for byte, and a wheel installed away from the checkout finds them."""

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_reinforce import cli
from hf_reinforce.examples.real_demo import data as real_demo_data
from hf_reinforce.tools import memory


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_reinforce"
REPOSITORY_FILES = {  # the package's copy -> the repository's file, which users run or read
    **{
        cli.ACCELERATE_CONFIGS_DIR / path.name: path
        for path in sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml"))
    },
    **{
        memory.SHIPPED_MODEL_CONFIGS / path.parent.name / "config.json": path
        for path in sorted((ROOT / "benchmarks" / "model_configs").glob("*/config.json"))
    },
    real_demo_data.REWARD_RECIPE: ROOT / "recipes" / "smollm2-135m" / "reward" / "config_qlora.yaml",
    real_demo_data.REINFORCE_RECIPE: ROOT / "recipes" / "smollm2-135m" / "reinforce" / "config_qlora.yaml",
}
SHIPPED_COPIES = [
    *cli.ACCELERATE_CONFIGS_DIR.glob("*.yaml"),
    *memory.SHIPPED_MODEL_CONFIGS.glob("*/config.json"),
    *real_demo_data.RECIPES.glob("*.yaml"),
]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("copy", sorted(REPOSITORY_FILES), ids=relative)
def test_the_shipped_copy_equals_the_repository_file(copy):
    original = REPOSITORY_FILES[copy]
    assert copy.is_file() and copy.read_bytes() == original.read_bytes(), (
        f"{relative(copy)} differs from {relative(original)}; copy it again: cp {relative(original)} {relative(copy)}"
    )


def test_every_shipped_copy_has_its_repository_file():
    assert len(REPOSITORY_FILES) == 5 + 5 + 2
    assert sorted(SHIPPED_COPIES) == sorted(REPOSITORY_FILES)


def test_the_package_reads_its_data_from_inside_itself():
    for folder in (
        cli.ACCELERATE_CONFIGS_DIR,
        memory.SHIPPED_MODEL_CONFIGS,
        real_demo_data.RECIPES,
        cli.CACHED_HELP_DIR,
    ):
        assert folder.is_relative_to(PACKAGE), folder
    for source in PACKAGE.rglob("*.py"):
        assert "parent.parent" not in source.read_text(), f"{relative(source)} names a path outside the package"


def test_pyproject_declares_every_data_file_of_the_package():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = declared["hf_reinforce"]
    data_files = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert data_files
    undeclared = [name for name in data_files if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert not undeclared, f"add these to [tool.setuptools.package-data] in pyproject.toml: {undeclared}"


INSTALLED_CHECK = """
import json
from hf_reinforce import cli
from hf_reinforce.examples.real_demo import data
from hf_reinforce.tools import memory
print(json.dumps({
    "package": cli.__file__,
    "accelerate_configs": cli.shipped_accelerate_configs(),
    "ddp": str(cli.resolve_accelerate_config("ddp")),
    "model_config": str(memory.find_model_config("meta-llama/Llama-3.1-8B-Instruct")),
    "recipes": [str(data.REWARD_RECIPE), str(data.REINFORCE_RECIPE)],
}))
"""


def test_a_wheel_installed_away_from_the_checkout_finds_its_data(tmp_path):
    source = tmp_path / "source"  # built from a copy: the build writes nothing into the checkout
    shutil.copytree(PACKAGE, source / "hf_reinforce", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("hf_reinforce-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    )
    found = json.loads(result.stdout.splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert found["accelerate_configs"] == cli.shipped_accelerate_configs()
    for path in (found["ddp"], found["model_config"], *found["recipes"]):
        assert Path(path).is_relative_to(site) and Path(path).is_file(), path
