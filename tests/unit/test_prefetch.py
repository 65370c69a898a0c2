"""The overlap of a remote model's download with vLLM's start-up (read/prefetch.py), without an
engine: a real HTTP server on loopback, the copy made by the background thread, the worker's
side finding it, and a failed copy falling back to the remote file."""

from __future__ import annotations

import os

import pytest

from tensorize_vllm_model import storage
from tensorize_vllm_model.read import prefetch
from tests.support.servers import CuttingProxy, HTTPFileServer


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(prefetch.ENV_MAP, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    data = os.urandom(3 * (1 << 20) + 12345)
    (root / "model.tensors").write_bytes(data)
    server = HTTPFileServer(root)
    try:
        yield server, data
    finally:
        server.stop()


def test_copy_is_found_whole_and_released(served):
    server, data = served
    uri = f"{server.url}/model.tensors"
    path = prefetch.start(uri)
    found = prefetch.local_copy(uri, timeout=60)
    assert found == path
    with open(found, "rb") as f:
        assert f.read() == data
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary left
    prefetch.release(uri)
    assert not os.path.exists(path)
    assert prefetch.local_copy(uri) is None  # forgotten: a reload streams the remote file


def test_failed_copy_falls_back_to_the_remote_file(served):
    server, _ = served
    uri = f"{server.url}/missing.tensors"
    path = prefetch.start(uri)
    assert prefetch.local_copy(uri, timeout=60) is None
    with open(path + ".failed") as f:
        assert "missing.tensors" in f.read()
    prefetch.release(uri)
    assert not os.path.exists(path + ".failed")


def test_copy_cut_mid_way_leaves_no_part_of_the_file(served, tmp_path):
    """The connection drops for good half way through the copy: the worker falls back,
    and the cache holds the failure report only, no partial tensors file."""
    server, _ = served
    big = os.urandom(40 << 20)
    (tmp_path / "served" / "big.tensors").write_bytes(big)
    proxy = CuttingProxy(server.port, cut_after=len(big) // 2, for_good=True)
    uri = f"http://127.0.0.1:{proxy.port}/big.tensors"
    path = prefetch.start(uri)
    try:
        assert prefetch.local_copy(uri, timeout=120) is None
    finally:
        proxy.stop()
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path) + ".failed"]
    assert not storage.being_written(path)
    prefetch.release(uri)
    assert os.listdir(os.path.dirname(path)) == []


def test_no_copy_without_start(served):
    server, _ = served
    assert prefetch.local_copy(f"{server.url}/model.tensors") is None


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv(prefetch.ENV_SWITCH, raising=False)
    assert not prefetch.enabled()
    monkeypatch.setenv(prefetch.ENV_SWITCH, "1")
    assert prefetch.enabled()
