"""prefetch's opt-in switch and map are read through settings (no engine)."""

from __future__ import annotations

import pytest

from tensorize_vllm_model.core import settings
from tensorize_vllm_model.core.errors import ConfigError
from tensorize_vllm_model.read import prefetch


@pytest.mark.parametrize("value", ["1", "true", "ON", " yes "])
def test_switch_on(monkeypatch, value):
    monkeypatch.setenv(settings.OVERLAP_ENV, value)
    assert prefetch.enabled()


@pytest.mark.parametrize("value", ["", "0", "False", "off", "no"])
def test_switch_off(monkeypatch, value):
    monkeypatch.setenv(settings.OVERLAP_ENV, value)
    assert not prefetch.enabled()


def test_bad_switch_names_the_variable(monkeypatch):
    monkeypatch.setenv(settings.OVERLAP_ENV, "sometimes")
    with pytest.raises(ConfigError, match="TENSORIZE_VLLM_MODEL_OVERLAP.*'sometimes'"):
        prefetch.enabled()


def test_bad_map_names_the_variable(monkeypatch):
    monkeypatch.setenv(settings.PREFETCH_ENV, "[1, 2]")
    with pytest.raises(ConfigError, match="TENSORIZE_VLLM_MODEL_PREFETCH"):
        prefetch.local_copy("s3://bucket/model.tensors")


def test_map_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.PREFETCH_ENV, "{}")  # restored after the test
    copy = tmp_path / "copy.tensors"
    copy.write_bytes(b"x")
    settings.set_prefetch_map({"s3://bucket/model.tensors": str(copy)})
    assert prefetch.local_copy("s3://bucket/model.tensors") == str(copy)
    prefetch.release("s3://bucket/model.tensors")
    assert not copy.exists() and settings.environment().prefetch_map == {}
