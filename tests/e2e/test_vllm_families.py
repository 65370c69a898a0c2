"""The suite's part of the family matrix (the whole matrix: ``make families``,
docs/families.md), the two families that once loaded without an error and generated other
tokens: a GPT-2 checkpoint, whose ``Conv1D`` weights vLLM's ``load_weights`` transposes before
its weight loaders copy them, converted and loaded at TP=1 (fixed by `convert.guard`); and a
gpt-oss checkpoint serialized and loaded at TP=1, whose attention backend keeps the layer's
``sinks`` parameter object (fixed by `modules.load_into_module` filling parameter objects in
place, and refusing a model left holding a meta tensor)."""

from __future__ import annotations

import pytest
from family_models import build_family

from tests.support.commands import assert_ok, convert, run_serialize
from tests.support.engines import run_engine

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


def test_gpt_oss_serialized_gives_the_default_loaders_tokens(tmp_path):
    checkpoint = build_family(tmp_path / "tiny-gpt-oss", "gpt_oss")
    serialized = run_serialize(checkpoint, tmp_path / "out", "v1")
    assert_ok(serialized)
    reference = run_engine({"model": str(checkpoint)})
    loaded = run_engine(
        {
            "model": str(tmp_path / "out" / "vllm" / "tiny-gpt-oss" / "v1"),
            "load_format": "tensorizer",
        }
    )
    assert loaded["tokens"] == reference["tokens"]
    assert len({tuple(t) for t in reference["tokens"]}) > 1
