"""`python -m hf_reinforce.examples.real_demo`: the same as `hf-reinforce real-demo`."""

import sys

from hf_reinforce.examples.real_demo.cli import main


sys.argv[0] = "python -m hf_reinforce.examples.real_demo"  # the usage line's program, not __main__.py
main()
