"""`hf-reinforce from-gguf`: a GGUF file (llama.cpp's format) as a transformers model folder that the training
scripts load, in full precision or re-quantised to 4 bits with bitsandbytes. Needs the `real` extra
(`pip install "hf_reinforce[real]"`).

example:
  hf-reinforce from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --output_dir outputs/smollm2-135m-instruct
"""

import argparse

from hf_reinforce.tools.gguf import convert_gguf, run_command


def main() -> None:
    # Called by `hf-reinforce from-gguf`, which leaves the command's flags in sys.argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf_path", metavar="gguf_file", help="The .gguf file of a llama-family model.")
    parser.add_argument("--output_dir", required=True, help="Folder to write the model and its tokenizer to.")
    run_command("from-gguf", parser, convert_gguf, done="Converted model written to {output}")


if __name__ == "__main__":
    main()
