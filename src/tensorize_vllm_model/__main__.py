"""``python -m tensorize_vllm_model``: the command line (see `tensorize_vllm_model.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
