"""The compile cache shipped with a model (artifacts/compile_cache.py), engine-free: the archive, its
key, restoring into local directories, the no-weights check, the switch; and the AOT-load
fix's wrapping (integrations/vllm/aot_load.py). The end-to-end check (a serialize that
compiles, a load on empty caches that loads vLLM's AOT artifact instead of compiling) is
tests/e2e/test_vllm_compile_cache.py."""

from __future__ import annotations

import dataclasses
import json
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


INFO = {"hash": "d032877f", "modelinfo": {"architecture": "LlamaForCausalLM", "supports_pp": True}}
INFO_NAME = "vllm-model_executor-models-llama-LlamaForCausalLM.json"


def test_model_info_travels_and_never_replaces_a_local_entry(tmp_path):
    cache = tmp_path / "modelinfos"
    cache.mkdir()
    (cache / INFO_NAME).write_text(json.dumps(INFO))
    (cache / "broken.json").write_text("{not json")
    (cache / "other.json").write_text(json.dumps({"hash": 1}))  # not vLLM's form
    found = compile_cache.collect_model_info(
        str(cache), [INFO_NAME, "broken.json", "other.json", "absent.json"]
    )
    assert found == {INFO_NAME: INFO}

    shipped = tmp_path / compile_cache.MODEL_INFO
    local = {"hash": "local", "modelinfo": {"architecture": "OPTForCausalLM"}}
    shipped.write_text(json.dumps({**found, "opt.json": local}))
    node = tmp_path / "node" / "modelinfos"
    node.mkdir(parents=True)
    (node / "opt.json").write_text(json.dumps({"hash": "mine", "modelinfo": {}}))
    assert compile_cache.restore_model_info(str(shipped), str(node)) == [INFO_NAME]
    assert json.loads((node / INFO_NAME).read_text()) == INFO
    assert json.loads((node / "opt.json").read_text())["hash"] == "mine"  # kept
    assert sorted(os.listdir(node)) == sorted([INFO_NAME, "opt.json"])  # no temporary left


@pytest.mark.parametrize(
    "content",
    [
        [INFO],
        {"../escape.json": INFO},
        {"sub/dir.json": INFO},
        {INFO_NAME: {"hash": "x"}},
        {INFO_NAME: INFO, "bad.txt": INFO},
    ],
    ids=["a list", "a path outside", "a sub-directory", "no modelinfo", "not a .json name"],
)
def test_a_bad_model_info_file_writes_nothing(tmp_path, content):
    shipped = tmp_path / compile_cache.MODEL_INFO
    shipped.write_text(json.dumps(content))
    node = tmp_path / "node"
    node.mkdir()
    with pytest.raises(ValueError, match="is not a map of vLLM model-info entries"):
        compile_cache.restore_model_info(str(shipped), str(node))
    assert list(node.iterdir()) == []
    assert not (tmp_path / "escape.json").exists()


def test_model_info_names_are_vllms_own(tmp_path, monkeypatch):
    """The vLLM side: the file names vLLM's registry gives the model's architectures, read
    from the engine's cache and put back on a node whose cache lacks them; off with the
    switch."""
    from tensorize_vllm_model.integrations.vllm import compiled

    serialize_node, model, out = tmp_path / "a", tmp_path / "model", tmp_path / "out"
    model.mkdir()
    out.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (serialize_node / "modelinfos").mkdir(parents=True)
    (serialize_node / "modelinfos" / INFO_NAME).write_text(json.dumps(INFO))
    monkeypatch.setattr("vllm.envs.VLLM_CACHE_ROOT", str(serialize_node), raising=False)
    assert compiled.write_model_info([str(model)], str(out))
    assert json.loads((out / compile_cache.MODEL_INFO).read_text()) == {INFO_NAME: INFO}
    (out / "config.json").write_text((model / "config.json").read_text())  # as serialized

    fresh = tmp_path / "fresh"
    monkeypatch.setattr("vllm.envs.VLLM_CACHE_ROOT", str(fresh), raising=False)
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_COMPILE_CACHE", "0")
    compiled.put_back_model_info(str(out))
    assert not fresh.exists()
    monkeypatch.delenv("TENSORIZE_VLLM_MODEL_COMPILE_CACHE")
    compiled.put_back_model_info(str(out))
    assert json.loads((fresh / "modelinfos" / INFO_NAME).read_text()) == INFO


def test_a_hostile_model_info_file_never_stops_a_load_and_writes_only_its_own_classes(
    tmp_path, monkeypatch, caplog
):
    """Put back through the load's own call: entries of classes the model's config.json
    does not name are not written; a file nested past Python's recursion limit, one over
    the size limit, or a name ending in a newline write nothing and are one warning."""
    from tensorize_vllm_model.integrations.vllm import compiled

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cache = tmp_path / "cache"
    monkeypatch.setattr("vllm.envs.VLLM_CACHE_ROOT", str(cache), raising=False)
    shipped = model / compile_cache.MODEL_INFO
    other = "vllm-model_executor-models-qwen2-Qwen2ForCausalLM.json"
    shipped.write_text(json.dumps({INFO_NAME: INFO, other: INFO}))
    compiled.put_back_model_info(str(model))
    assert sorted(os.listdir(cache / "modelinfos")) == [INFO_NAME]

    for content in (
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"x": "y" * compile_cache.MODEL_INFO_LIMIT}),
        json.dumps({INFO_NAME + "\n": INFO}),
    ):
        (cache / "modelinfos" / INFO_NAME).unlink()
        shipped.write_text(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            compiled.put_back_model_info(str(model))  # no exception
        assert os.listdir(cache / "modelinfos") == []
        [record] = [r for r in caplog.records if "was not used" in r.getMessage()]
        assert "vLLM inspects the model's class itself" in record.getMessage()
        (cache / "modelinfos" / INFO_NAME).write_text(json.dumps(INFO))
