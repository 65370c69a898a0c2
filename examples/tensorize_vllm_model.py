"""vLLM's example script ``tensorize_vllm_model.py``, as a thin wrapper over this package.

Same flags and behaviour as the script in vLLM's ``examples/others/``:

    python examples/tensorize_vllm_model.py --model facebook/opt-125m \
        serialize --serialized-directory /models --suffix v1
    python examples/tensorize_vllm_model.py --model facebook/opt-125m \
        deserialize --path-to-tensors /models/vllm/facebook/opt-125m/v1/model.tensors

Serialize and deserialize help: ``python examples/tensorize_vllm_model.py serialize --help``
and ``... deserialize --help`` (the "tensorizer options" group). ``--tensorizer-uri`` and
``--path-to-tensors`` are the same option. Loading a serialized model in your own code:

    from vllm import LLM
    from tensorize_vllm_model import TensorizerConfig
    llm = LLM(model="facebook/opt-125m", load_format="tensorizer",
              model_loader_extra_config=TensorizerConfig(
                  tensorizer_uri=path_to_tensors, num_readers=3))
"""

import os
import sys

# This script has the package's name: Python puts the script's directory first on sys.path,
# where this file would shadow the installed package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from tensorize_vllm_model.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
