"""The compile cache travels with the model, end to end (two engine starts, compilation on):
a serialize whose engine compiles keeps vLLM's AOT compile cache beside the tensors, with no
weight bytes in it, and vLLM's model-info entry of the model's class; a load on a fresh node
(empty VLLM_CACHE_ROOT and inductor cache) puts both back, vLLM loads its AOT artifact
instead of compiling and reads the model info instead of inspecting the class in a process
of its own. Engine-free cases (keys,
mismatches, the switch, the archive) are in test_compile_cache.py; ready times in
benchmarks/compile_cache.py (docs/performance.md). The model is the tiny Llama with one
layer: vLLM's CPU build compiles the whole forward as one graph, so a second layer only
makes inductor's work longer (93 s against 64 s for the two starts here)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tensorize_vllm_model.artifacts import compile_cache
from tensorize_vllm_model.artifacts.model_files import MANIFEST
from tests.support.commands import ENGINE_FLAGS, run_serialize
from tests.support.engines import result_of, run_engine

pytestmark = pytest.mark.slow

COMPILED_FLAGS = [f for f in ENGINE_FLAGS if f != "--enforce-eager"]


def _caches(root) -> dict[str, str]:
    return {
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
    }


@pytest.fixture(scope="module")
def one_layer_llama(tmp_path_factory):
    from demo_models import build_model

    path = tmp_path_factory.mktemp("models") / "one-layer-llama"
    return build_model(path, architecture="llama", num_layers=1)


def test_a_fresh_node_loads_the_shipped_compile_cache(one_layer_llama, tmp_path):
    model = one_layer_llama
    proc = run_serialize(
        model,
        tmp_path / "out",
        "v1",
        engine_flags=COMPILED_FLAGS,
        env=_caches(tmp_path / "serialize-node"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    directory = tmp_path / "out" / "vllm" / model.name / "v1"
    archive = directory / "compile-cache-rank-000.tar"
    key, files = compile_cache.read_archive(archive.read_bytes(), str(archive))
    assert (key.dtype, key.tensor_parallel_size, key.rank) == ("bfloat16", 1, 0)
    assert "backbone.rank/model" in files
    assert any(n.startswith("backbone.inductor_cache/") for n in files)
    # No weight bytes: checked here against the checkpoint itself, not only by serialize.
    from safetensors.torch import load_file

    weights = load_file(str(model / "model.safetensors"))
    assert compile_cache.find_weight_bytes(files, weights.items()) is None
    assert "no weight bytes in them" in proc.stdout + proc.stderr  # vLLM logs to stdout

    shipped = json.loads((directory / compile_cache.MODEL_INFO).read_text())
    name = "vllm-model_executor-models-llama-LlamaForCausalLM.json"
    assert shipped[name]["modelinfo"]["architecture"] == "LlamaForCausalLM"
    assert compile_cache.MODEL_INFO in json.loads((directory / MANIFEST).read_text())["files"]

    fresh = tmp_path / "fresh-node"
    spec = {"model": str(directory), "load_format": "tensorizer", "enforce_eager": False}
    loaded = run_engine(spec, env=_caches(fresh), expect_ok=False)
    assert isinstance(loaded, subprocess.CompletedProcess)
    result = result_of(loaded)
    log = loaded.stdout + loaded.stderr
    assert "Put the shipped compile cache of" in log, log[-4000:]
    assert "Directly load AOT compilation" in log, log[-4000:]
    assert "Compiling model again" not in log
    assert "Put the shipped model info of vllm-model_executor-models-llama-LlamaForCausalLM" in log
    assert json.loads((fresh / "vllm" / "modelinfos" / name).read_text()) == shipped[name]
    # It generates (greedy; a prompt may end early at the end-of-sequence token).
    assert len(result["tokens"]) == 4 and all(0 < len(t) <= 16 for t in result["tokens"])
