"""The compile cache shipped with a model (artifacts/compile_cache.py), engine-free: the archive, its
key, restoring into local directories, the no-weights check, the switch; and the AOT-load
fix's wrapping (integrations/vllm/aot_load.py). The end-to-end check (a serialize that
compiles, a load on empty caches that loads vLLM's AOT artifact instead of compiling) is
tests/e2e/test_vllm_compile_cache.py."""

from __future__ import annotations

import dataclasses
import logging
import os
import types

import pytest
import torch

from tensorize_vllm_model.artifacts import compile_cache
from tensorize_vllm_model.artifacts.compile_cache import CacheKey
from tensorize_vllm_model.core.errors import ConfigError

KEY = CacheKey(
    vllm="0.32.0",
    torch="2.13.0+cpu",
    device="cpu AVX512",
    dtype="bfloat16",
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
    rank=0,
    config_hash="abc",
)


def _tree(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _archive(tmp_path):
    _tree(tmp_path / "aot" / "inductor_cache", {"ab/kernel.py": b"code", "locks/x.lock": b""})
    _tree(tmp_path / "aot" / "rank_0_0", {"model": b"artifact"})
    files = compile_cache.collect(
        {
            "model.inductor_cache": str(tmp_path / "aot" / "inductor_cache"),
            "model.rank": str(tmp_path / "aot" / "rank_0_0"),
        }
    )
    return files, compile_cache.pack(KEY, files)


def test_archive_round_trip_restores_into_the_engine_directories(tmp_path):
    files, data = _archive(tmp_path)
    assert sorted(files) == ["model.inductor_cache/ab/kernel.py", "model.rank/model"]  # no lock
    key, read = compile_cache.read_archive(data, "x.tar")
    assert key == KEY and read == files
    target = tmp_path / "new"
    targets = {
        "model.inductor_cache": str(target / "inductor_cache"),
        "model.rank": str(target / "rank_0_0"),
    }
    assert compile_cache.restore(KEY, (key, read), targets) == 2
    assert (target / "rank_0_0" / "model").read_bytes() == b"artifact"
    assert (target / "inductor_cache" / "ab" / "kernel.py").read_bytes() == b"code"
    assert not [n for n in os.listdir(target / "rank_0_0") if n.startswith(".tmp-")]
    # A second restore keeps what is there (a node's own cache wins).
    (target / "rank_0_0" / "model").write_bytes(b"local")
    assert compile_cache.restore(KEY, (key, read), targets) == 0
    assert (target / "rank_0_0" / "model").read_bytes() == b"local"


@pytest.mark.parametrize(
    "field, value",
    [
        ("vllm", "0.33.0"),
        ("torch", "2.14.0"),
        ("dtype", "float16"),
        ("tensor_parallel_size", 2),
        ("device", "cuda NVIDIA H100 80GB HBM3 sm_90"),
        ("config_hash", "def"),
    ],
)
def test_a_cache_of_another_engine_is_ignored_and_said_once(tmp_path, caplog, field, value):
    files, data = _archive(tmp_path)
    archive = compile_cache.read_archive(data, "x.tar")
    other = dataclasses.replace(KEY, **{field: value})
    compile_cache._said.clear()
    target = tmp_path / "new"
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert compile_cache.restore(other, archive, {"model.rank": str(target)}) is None
    lines = [r.getMessage() for r in caplog.records if "compile cache" in r.getMessage()]
    assert len(lines) == 1
    assert f"{field}: {value} here, {getattr(KEY, field)} in the cache" in lines[0]
    assert not target.exists()


def test_an_archive_with_a_member_outside_its_entry_is_refused(tmp_path):
    data = compile_cache.pack(KEY, {"../../etc/passwd": b"x"})
    with pytest.raises(ValueError, match="x.tar is not a compile-cache archive.*outside"):
        compile_cache.read_archive(data, "x.tar")
    with pytest.raises(ValueError, match="not a compile-cache archive"):
        compile_cache.read_archive(b"not a tar", "x.tar")


def test_weight_bytes_in_the_artifacts_are_found():
    torch.manual_seed(0)
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    norm = torch.ones(64, dtype=torch.bfloat16)  # constant: found everywhere, not sampled
    raw = weight.view(torch.uint8).numpy().tobytes()
    clean = {"a/kernel.so": b"\0" * 4096 + norm.view(torch.uint8).numpy().tobytes()}
    tensors = [("norm.weight", norm), ("proj.weight", weight)]
    assert compile_cache.find_weight_bytes(clean, tensors) is None
    for part in (raw, raw[1000:3200]):  # the whole tensor, a quarter of it
        leaky = {**clean, "a/constants.bin": b"xx" + part + b"yy"}
        found = compile_cache.find_weight_bytes(leaky, tensors)
        assert found == ("proj.weight", "a/constants.bin")


def test_the_switch(monkeypatch):
    monkeypatch.delenv("TENSORIZE_VLLM_MODEL_COMPILE_CACHE", raising=False)
    assert compile_cache.enabled()
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_COMPILE_CACHE", "0")
    assert not compile_cache.enabled()
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_COMPILE_CACHE", "maybe")
    with pytest.raises(ConfigError, match="TENSORIZE_VLLM_MODEL_COMPILE_CACHE must be 1 or 0"):
        compile_cache.enabled()


def test_archive_sits_beside_the_tensors():
    assert compile_cache.archive_uri("s3://b/m/v1/model-rank-001.tensors", 1) == (
        "s3://b/m/v1/compile-cache-rank-001.tar"
    )


def test_aot_fix_gives_plain_inductor_functions_a_finalize_loading(monkeypatch):
    """Stand-in for torch's AOT unpickling (a real artifact needs a compile: the end-to-end
    test loads one): vLLM's load calls ``compiled_fn.finalize_loading``, which inductor's
    plain function lacks."""
    pytest.importorskip("vllm")
    from vllm.compilation import decorators

    from tensorize_vllm_model.integrations.vllm import aot_load

    def compiled_fn(*args):
        return args

    loaded = types.SimpleNamespace(_artifacts=types.SimpleNamespace(compiled_fn=compiled_fn))
    seen = []

    def vllm_load(model, path):  # what vLLM's _try_load_aot_compiled_fn does, in short
        fn = torch.compiler.load_compiled_function(None)
        fn._artifacts.compiled_fn.finalize_loading(None)
        seen.append(fn)
        return fn

    from tensorize_vllm_model.integrations.vllm import compiled

    told = []
    monkeypatch.setattr(compiled, "before_aot_load", lambda module, path: told.append(path))
    monkeypatch.setattr(torch.compiler, "load_compiled_function", lambda f: loaded)
    monkeypatch.setattr(decorators, "_try_load_aot_compiled_fn", vllm_load)
    aot_load.install()
    assert decorators._try_load_aot_compiled_fn(None, "p/rank_0_0/model") is loaded
    assert told == ["p/rank_0_0/model"]  # the shipped cache is put there first
    assert seen == [loaded]
    assert torch.compiler.load_compiled_function(None) is loaded  # unwrapped again after
    aot_load.install()  # idempotent
    assert decorators._try_load_aot_compiled_fn.__wrapped__ is vllm_load
