"""The suite's part of the family matrix (the whole matrix: ``make families``,
docs/families.md): a GPT-2 checkpoint, whose ``Conv1D`` weights vLLM's ``load_weights``
transposes before its weight loaders copy them, converted and loaded at TP=1, gives the
default loader's greedy tokens (it loaded without an error and generated other tokens before
`convert.guard`)."""

from __future__ import annotations

import pytest
from conftest import run_engine
from family_models import build_family
from test_vllm_convert import convert

pytestmark = pytest.mark.slow


def test_gpt2_converted_gives_the_default_loaders_tokens(tmp_path):
    checkpoint = build_family(tmp_path / "tiny-gpt2", "gpt2")
    convert(checkpoint, tmp_path / "out")
    reference = run_engine({"model": str(checkpoint)})
    loaded = run_engine(
        {"model": str(tmp_path / "out" / "vllm" / "tiny-gpt2" / "v1"), "load_format": "tensorizer"}
    )
    assert loaded["tokens"] == reference["tokens"]
    assert len({tuple(t) for t in reference["tokens"]}) > 1  # prompts that differ
