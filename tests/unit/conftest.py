"""Fixtures of the unit tests shared by several modules."""

from __future__ import annotations

import pytest

from tests.support.fake_engine import FakeEngine


@pytest.fixture
def cli_with_fake_engine(monkeypatch):
    """The real command line (vLLM's parser and EngineArgs), with the stand-in engine.

    The real vLLM side is imported for good (one module for the whole session: vLLM's
    registries hold its loaders and resolver) and only its `Engine` is replaced."""
    from tensorize_vllm_model.cli import main
    from tensorize_vllm_model.integrations.vllm import engine, loader

    assert hasattr(loader, "TensorizerLoader")  # the real module, not a stand-in
    monkeypatch.setattr(engine, "Engine", FakeEngine)
    FakeEngine.instances = []
    yield main
    FakeEngine.instances = []
