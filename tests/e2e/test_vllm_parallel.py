"""Tensor and pipeline parallelism on vLLM's CPU backend (two ranks on two cores): every
rank writes and reads only its own shard.

TP=2: serialize, both rank files exist and differ, load with TP=2, same greedy tokens as the
original model at TP=1. In float32: the tiny test model has large random weights, and in
bfloat16 vLLM's own TP=2 (default loader, original checkpoint) already parts from its TP=1
after the first token, because each rank's partial sums are rounded to bfloat16 before the
all-reduce (seen here: TP=2 by the default loader and TP=2 by this loader gave the same
tokens; TP=1 other ones). In float32 TP=1 and TP=2 agree. PP=2 (encrypted, on S3): vLLM 0.32's CPU build starts a PP=2 engine
and loads its weights, but its first generate fails inside vLLM (an assertion in the model
runner), so the shards are checked by what each worker loaded, as reported through
``collective_rpc``, and by what each file holds.
"""

from __future__ import annotations

import uuid

import pytest

from tensorize_vllm_model import TensorizerConfig, open_tensors
from tests.support import BUCKET
from tests.support.commands import ENGINE_FLAGS, assert_ok, run_serialize, write_hf_tensors
from tests.support.engines import WORKER_EXTENSION, run_builtin, run_engine

pytestmark = pytest.mark.slow

# One core per rank; a smaller KV cache per rank (the CPU backend reserves host memory).
RANKS_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
FLAGS = [f for f in ENGINE_FLAGS if f != "0.3" and f != "--gpu-memory-utilization"] + [
    "--gpu-memory-utilization",
    "0.15",
]
FLOAT32 = ["--dtype", "float32"]  # after FLAGS: the last --dtype wins


@pytest.fixture(scope="module")
def tp2_serialized(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    proc = run_serialize(
        tiny_llama,
        out,
        "tp2",
        engine_flags=[*FLAGS, *FLOAT32, "--tensor-parallel-size", "2"],
        env=RANKS_ENV,
    )
    assert_ok(proc)
    return out / "vllm" / "tiny-llama" / "tp2"


def test_tp2_writes_one_file_per_rank(tp2_serialized):
    names = sorted(p.name for p in tp2_serialized.iterdir())
    assert "model-rank-000.tensors" in names and "model-rank-001.tensors" in names
    assert "model.tensors" not in names and "config.json" in names
    first = (tp2_serialized / "model-rank-000.tensors").read_bytes()
    second = (tp2_serialized / "model-rank-001.tensors").read_bytes()
    assert first != second
    for rank in (0, 1):
        path = str(tp2_serialized / f"model-rank-{rank:03d}.tensors")
        with open_tensors(path) as reader:
            assert (reader.record.tensor_parallel_size, reader.record.rank) == (2, rank)
            assert reader.record.dtype == "float32"
            names = reader.names()
        # each rank holds half of the attention heads: the same names, half the rows
        assert "model.layers.0.self_attn.qkv_proj.weight" in names


def test_stock_vllm_loads_our_tp2_files(tp2_serialized, tiny_llama):
    """vLLM's built-in loader (plug-in off), in two processes (ranks 0 and 1): each rank's
    parameters equal what vLLM's default loader gives that rank from the checkpoint."""
    spec = {
        "mode": "load",
        "model": str(tp2_serialized),
        "checkpoint": str(tiny_llama),
        "dtype": "float32",
        "tp": 2,
        "tensorizer_config": {"tensorizer_uri": str(tp2_serialized / "model-rank-%03d.tensors")},
    }
    results = run_builtin({**spec, "rank": 0}, {**spec, "rank": 1})
    for result in results:
        assert result["loader"].startswith("vllm.model_executor.model_loader.")
        assert len(result["compared"]) > 10
        assert result["missing"] == result["extra"] == result["different"] == []
        assert not result["has_marker"]


def test_tp2_load_matches_unsharded_model(tp2_serialized, float32_reference):
    result = run_engine(
        {
            "model": str(tp2_serialized),
            "load_format": "tensorizer",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.15,
            "dtype": "float32",
            "worker_extension_cls": WORKER_EXTENSION,
        },
        stats=True,
        env=RANKS_ENV,
    )
    assert result["tokens"] == float32_reference["tokens"]
    assert sorted(s["uri"] for s in result["stats"]) == [
        str(tp2_serialized / "model-rank-000.tensors"),
        str(tp2_serialized / "model-rank-001.tensors"),
    ]


def test_tp2_loads_a_hugging_face_file_from_one_uri(tiny_llama, float32_reference, tmp_path):
    """A file of a Hugging Face model (``TensorSerializer.write_module``, not vLLM-tensorized)
    holds whole weights: at TP=2 both ranks read the one file and vLLM's weight loaders take
    each rank's half. Same tokens as TP=1."""
    hf_file = tmp_path / "hf.tensors"
    write_hf_tensors(tiny_llama, hf_file, "float32")
    result = run_engine(
        {
            "model": str(tiny_llama),
            "load_format": "tensorizer",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.15,
            "dtype": "float32",
            "worker_extension_cls": WORKER_EXTENSION,
            "model_loader_extra_config": {"tensorizer_uri": str(hf_file)},
        },
        stats=True,
        env=RANKS_ENV,
    )
    assert result["tokens"] == float32_reference["tokens"]
    assert [s["uri"] for s in result["stats"]] == [str(hf_file), str(hf_file)]


@pytest.fixture(scope="module")
def pp2_on_s3(tiny_llama, moto, tmp_path_factory):
    prefix = f"pp2/{uuid.uuid4().hex}"
    env = {
        **RANKS_ENV,
        "S3_ACCESS_KEY_ID": "testing",
        "S3_SECRET_ACCESS_KEY": "testing",
        "S3_ENDPOINT_URL": moto.endpoint,
        "TENSORIZE_VLLM_MODEL_CACHE": str(tmp_path_factory.mktemp("pp2-cache")),
    }
    key = f"s3://{BUCKET}/{prefix}/keys/pp2.key"
    proc = run_serialize(
        tiny_llama,
        f"s3://{BUCKET}/{prefix}",
        "pp2",
        "--keyfile",
        key,
        "--allow-http",
        engine_flags=[*FLAGS, "--pipeline-parallel-size", "2"],
        env=env,
    )
    assert_ok(proc)
    return f"s3://{BUCKET}/{prefix}/vllm/tiny-llama/pp2", key, env


def _config(uri, key, moto):
    return TensorizerConfig(
        tensorizer_uri=uri,
        encryption_keyfile=key,
        s3_endpoint=moto.endpoint,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        stream_kwargs={"force_http": True},
    )


def test_pp2_shards_split_the_layers(pp2_on_s3, moto):
    directory, key, _ = pp2_on_s3
    held = {}
    for rank in (0, 1):
        uri = f"{directory}/model-rank-{rank:03d}.tensors"
        with open_tensors(uri, config=_config(uri, key, moto)) as reader:
            record = reader.record
            assert (record.pipeline_parallel_size, record.rank, record.encrypted) == (2, rank, True)
            held[rank] = set(reader.names())
    assert (
        "model.embed_tokens.weight" in held[0] and "model.layers.0.mlp.down_proj.weight" in held[0]
    )
    assert "lm_head.weight" in held[1] and "model.layers.1.mlp.down_proj.weight" in held[1]
    weights = {r: {n for n in held[r] if n.endswith(".weight")} for r in held}
    assert not weights[0] & weights[1]  # no layer is written twice


def test_pp2_each_rank_loads_its_own_shard(pp2_on_s3, moto):
    directory, key, env = pp2_on_s3
    result = run_engine(
        {
            "model": directory,
            "load_format": "tensorizer",
            "pipeline_parallel_size": 2,
            "gpu_memory_utilization": 0.15,
            "worker_extension_cls": WORKER_EXTENSION,
            "model_loader_extra_config": {
                "encryption_keyfile": key,
                "stream_kwargs": {"force_http": True},
            },
        },
        prompts=[],
        stats=True,
        env=env,
    )
    by_uri = {s["uri"]: s for s in result["stats"]}
    assert sorted(by_uri) == [
        f"{directory}/model-rank-000.tensors",
        f"{directory}/model-rank-001.tensors",
    ]
    for uri, stats in by_uri.items():
        with open_tensors(uri, config=_config(uri, key, moto)) as reader:
            assert stats["tensors"] == len(reader.names())
