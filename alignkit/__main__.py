"""`python -m alignkit`: the command line, as launchers start it (`torchrun --nproc_per_node 2 -m
alignkit sft ...`, `accelerate launch -m alignkit ...`)."""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
