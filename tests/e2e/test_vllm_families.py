"""The suite's part of the family matrix (the whole matrix: ``make families``,
docs/families.md), the two families that once loaded without an error and generated other
tokens: a GPT-2 checkpoint, whose ``Conv1D`` weights vLLM's ``load_weights`` transposes before
its weight loaders copy them, converted and loaded at TP=1 (fixed by `convert.guard`); and a
gpt-oss checkpoint serialized and loaded at TP=1, whose attention backend keeps the layer's
``sinks`` parameter object (fixed by `modules.load_into_module` filling parameter objects in
place, and refusing a model left holding a meta tensor). And the state-space families, whose
mixer's weight loader writes ``A`` again after copying ``A_log`` (``-exp``, in place): a
converted Mamba2 loaded ``A_log`` as ``A`` silently (fixed by `convert.regions.CopyWatch`
seeing the second write), checked without an engine (benchmarks/families_weights.py's weight
check: vLLM's model built and filled in a process of its own, every parameter against the
default loader's) and by tokens."""

from __future__ import annotations

import sys

import pytest
from family_models import build_family

from tests.support import ROOT
from tests.support.commands import assert_ok, convert, run_serialize
from tests.support.engines import run_engine


@pytest.mark.parametrize("family", ["mamba2", "granitemoehybrid"])
def test_a_converted_state_space_model_holds_the_default_loaders_weights(tmp_path, family):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from families_weights import check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    checkpoint = build_family(tmp_path / family, family)
    convert(checkpoint, tmp_path / "out")
    result = check(checkpoint, str(tmp_path / "out" / "vllm" / family / "v1"), 1, False)
    assert result.startswith("same"), result


@pytest.mark.slow
def test_mamba2_converted_gives_the_default_loaders_tokens(tmp_path):
    checkpoint = build_family(tmp_path / "tiny-mamba2", "mamba2")
    convert(checkpoint, tmp_path / "out")
    reference = run_engine({"model": str(checkpoint)})
    loaded = run_engine(
        {
            "model": str(tmp_path / "out" / "vllm" / "tiny-mamba2" / "v1"),
            "load_format": "tensorizer",
        }
    )
    assert loaded["tokens"] == reference["tokens"]
    assert len({tuple(t) for t in reference["tokens"]}) > 1


@pytest.mark.slow
def test_gpt2_converted_gives_the_default_loaders_tokens(tmp_path):
    checkpoint = build_family(tmp_path / "tiny-gpt2", "gpt2")
    convert(checkpoint, tmp_path / "out")
    reference = run_engine({"model": str(checkpoint)})
    loaded = run_engine(
        {"model": str(tmp_path / "out" / "vllm" / "tiny-gpt2" / "v1"), "load_format": "tensorizer"}
    )
    assert loaded["tokens"] == reference["tokens"]
    assert len({tuple(t) for t in reference["tokens"]}) > 1  # prompts that differ


@pytest.mark.slow
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
