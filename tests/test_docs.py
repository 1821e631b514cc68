"""What the documentation shows runs as written: the README's library script (with a tiny local model in place of the
Hub model it names)."""

import re
import subprocess
import sys
from pathlib import Path

from hf_reinforce.testing import save_tiny_models


ROOT = Path(__file__).resolve().parent.parent
README_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def python_block_after(markdown: str, heading: str) -> str:
    section = markdown.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_library_script_runs_as_pasted(tmp_path):
    snippet = python_block_after((ROOT / "README.md").read_text(), "## Use it in your own script")
    assert f'model_name = "{README_MODEL}"' in snippet
    policy = save_tiny_models(tmp_path / "models")["policy"]
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(README_MODEL, policy))
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "my-reward-model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-reward-model" / "reward_training.json").is_file()
    assert (tmp_path / "my-policy" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-policy" / "value_model" / "value_head.safetensors").is_file()
