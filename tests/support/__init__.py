"""Helpers the tests import (``from tests.support.commands import run_cli``): the servers on
loopback, the stores of the storage suites, the command line and vLLM engines in
subprocesses, and the scripts those subprocesses run. Nothing here is collected as a test.

Importing this package puts scripts/ on ``sys.path``, where `demo_models` builds the small
random-weight models the tests start vLLM on.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
if str(ROOT / "scripts") not in sys.path:
    sys.path.append(str(ROOT / "scripts"))

# The bucket (or container) the session's S3, GCS and Azure servers are started with.
BUCKET = "models"
# The files of a converted tiny model's directory, sorted.
CONVERTED_FILES = [
    "config.json",
    "generation_config.json",
    "model.tensors",
    "tensorize_model_files.json",  # the list of the files carried (artifacts.MANIFEST)
    "tokenizer.json",
    "tokenizer_config.json",
]
# A serialized one's: the same, and vLLM's model info of the model's class, which the
# serialize's engine cached (artifacts.compile_cache.MODEL_INFO).
SERIALIZED_FILES = sorted([*CONVERTED_FILES, "vllm_modelinfos.json"])
