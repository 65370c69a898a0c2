"""A converted checkpoint (``convert``, made without vLLM) loaded by the real vLLM (CPU
build) at several layouts, each rank reading only its share.

* TP=1: the same greedy tokens as vLLM's default loader on the original checkpoint
  (Llama-like and OPT-like models), through ``LLM(...)`` and ``vllm serve``; every byte of
  every tensor read once.
* TP=2 (float32, where vLLM's own TP=1 and TP=2 agree: see test_vllm_parallel): the same
  tokens as vLLM's default loader at TP=1 on the checkpoint (`float32_reference`, shared
  with test_vllm_parallel and test_vllm_ray); each rank reads about half the file, exactly
  the ranges the name-based read plan (`convert.placement`) predicts.
* Encrypted, on S3 (moto), at TP=2: the same tokens; each rank reads whole cipher chunks.
* From HTTP at TP=2: the bytes the server sent for the tensors file are counted by the
  server and match what the ranks planned to read.
* PP=2: vLLM 0.32's CPU build cannot generate with PP=2 (FIELD-NOTES), so each worker's
  read ranges are checked: the first stage reads the embeddings and the first layer, the
  second the last layer, the final norm and lm_head, and no tensor is read by both.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from tensorize_vllm_model import open_tensors
from tensorize_vllm_model.convert.placement import TensorShape, rank_reads, stored_shapes
from tests.support import BUCKET
from tests.support.commands import assert_ok, convert, run_cli
from tests.support.engines import PROMPTS, WORKER_EXTENSION, run_engine

pytestmark = pytest.mark.slow

RANKS_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
TWO_RANKS = {"gpu_memory_utilization": 0.15, "worker_extension_cls": WORKER_EXTENSION}


@pytest.fixture(scope="module")
def llama_bf16(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv-bf16")
    convert(tiny_llama, out)
    return out / "vllm" / "tiny-llama" / "v1"


@pytest.fixture(scope="module")
def llama_f32(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv-f32")
    convert(tiny_llama, out, "--dtype", "float32")
    return out / "vllm" / "tiny-llama" / "v1"


@pytest.fixture(scope="module")
def f32_tp2(llama_f32):
    return run_engine(
        {
            "model": str(llama_f32),
            "load_format": "tensorizer",
            "dtype": "float32",
            "tensor_parallel_size": 2,
            **TWO_RANKS,
        },
        stats=True,
        env=RANKS_ENV,
    )


def test_tp1_matches_the_default_loader_on_the_checkpoint(llama_bf16, llama_reference):
    result = run_engine(
        {
            "model": str(llama_bf16),
            "load_format": "tensorizer",
            "worker_extension_cls": WORKER_EXTENSION,
        },
        stats=True,
    )
    assert result["tokens"] == llama_reference["tokens"]
    # TP=1 reads every byte of every tensor, once
    _, _, total = file_tensors(llama_bf16 / "model.tensors")
    assert result["stats"][0]["bytes"] == total


def test_opt_tp1_matches_the_default_loader(tiny_opt, opt_reference, tmp_path):
    convert(tiny_opt, tmp_path)
    result = run_engine(
        {"model": str(tmp_path / "vllm" / "tiny-opt" / "v1"), "load_format": "tensorizer"}
    )
    assert result["tokens"] == opt_reference["tokens"]


def file_tensors(path) -> tuple[list[TensorShape], dict, int]:
    with open_tensors(str(path)) as reader:
        shapes = stored_shapes(reader.entries(), reader.record.column_tiles)
        offsets = {name: entry.data_offset for name, entry in reader.index.items()}
    return shapes, offsets, sum(s.bytes for s in shapes)


def test_tp2_same_tokens_as_tp1_reading_half(llama_f32, float32_reference, f32_tp2, tiny_llama):
    import json

    assert f32_tp2["tokens"] == float32_reference["tokens"]
    shapes, offsets, total = file_tensors(llama_f32 / "model.tensors")
    config = json.loads((tiny_llama / "config.json").read_text())
    for rank, (stats, plan) in enumerate(zip(f32_tp2["stats"], f32_tp2["read_plan"])):
        assert stats["bytes"] <= 0.6 * total
        expected = {
            (r.name, offsets[r.name] + r.start, offsets[r.name] + r.stop)
            for r in rank_reads(shapes, config, 2, rank)
        }
        assert {tuple(p) for p in plan} == expected


def test_encrypted_on_s3_at_tp2(tiny_llama, llama_f32, moto, float32_reference):
    prefix = f"convert/{uuid.uuid4().hex}"
    env = {
        **RANKS_ENV,
        "S3_ACCESS_KEY_ID": "testing",
        "S3_SECRET_ACCESS_KEY": "testing",
        "S3_ENDPOINT_URL": moto.endpoint,
    }
    key = f"s3://{BUCKET}/{prefix}/model.key"
    proc = run_cli(
        "--model",
        tiny_llama,
        "--dtype",
        "float32",
        "convert",
        "--serialized-directory",
        f"s3://{BUCKET}/{prefix}",
        "--suffix",
        "enc",
        "--keyfile",
        key,
        "--allow-http",
        env=env,
    )
    assert_ok(proc)
    result = run_engine(
        {
            "model": f"s3://{BUCKET}/{prefix}/vllm/tiny-llama/enc",
            "load_format": "tensorizer",
            "dtype": "float32",
            "tensor_parallel_size": 2,
            **TWO_RANKS,
            "model_loader_extra_config": {
                "encryption_keyfile": key,
                "stream_kwargs": {"force_http": True},
            },
        },
        stats=True,
        env=env,
    )
    assert result["tokens"] == float32_reference["tokens"]
    # The tiny model's tensors are smaller than one 2 MiB cipher chunk: read whole.
    assert all(s["bytes"] > 0 for s in result["stats"])


def test_overlap_reads_a_converted_file_from_s3_once(tiny_llama, moto, llama_reference, tmp_path):
    # With TENSORIZE_VLLM_MODEL_OVERLAP=1 the file is copied while the engine starts; the
    # loader read the converted file's parts from S3 again instead of from that copy (2.24x
    # the file through the network). The proxy counts the bytes S3 sent.
    from tests.support.servers import CuttingProxy

    prefix = f"convert/{uuid.uuid4().hex}"
    env = {
        "S3_ACCESS_KEY_ID": "testing",
        "S3_SECRET_ACCESS_KEY": "testing",
        "S3_ENDPOINT_URL": moto.endpoint,
    }
    directory = f"s3://{BUCKET}/{prefix}"
    convert(tiny_llama, directory, env=env, flags_after=("--allow-http",))
    key = f"{prefix}/vllm/tiny-llama/v1/model.tensors"
    size = moto.client().head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    proxy = CuttingProxy(moto.port, cut_after=1 << 40, for_good=True)
    try:
        result = run_engine(
            {
                "model": f"{directory}/vllm/tiny-llama/v1",
                "load_format": "tensorizer",
                "model_loader_extra_config": {"stream_kwargs": {"force_http": True}},
            },
            env={
                **env,
                "S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
                "TENSORIZE_VLLM_MODEL_OVERLAP": "1",
                "TENSORIZE_VLLM_MODEL_CACHE": str(tmp_path / "cache"),
            },
        )
    finally:
        proxy.stop()
    assert result["tokens"] == llama_reference["tokens"]
    # the copy, the config files and the header reads of the pre-engine check (4.49 MB of
    # S3 answers for this 3.41 MB file, against 7.65 MB before)
    assert size <= proxy.passed < 1.6 * size


def test_http_tp2_bytes_counted_by_the_server(llama_f32, web_root, web_servers, float32_reference):
    target = web_root / "converted" / uuid.uuid4().hex
    shutil.copytree(llama_f32, target)
    server = web_servers["http-1.1"]
    del server.requests[:]
    # vLLM takes no http(s):// --model: the config is local, the one tensors file remote,
    # named without a rank template (every rank reads it).
    url = f"{server.url}/{target.relative_to(web_root)}/model.tensors"
    result = run_engine(
        {
            "model": str(llama_f32),
            "load_format": "tensorizer",
            "dtype": "float32",
            "tensor_parallel_size": 2,
            **TWO_RANKS,
            "model_loader_extra_config": {"tensorizer_uri": url},
        },
        stats=True,
        env=RANKS_ENV,
    )
    assert result["tokens"] == float32_reference["tokens"]
    size = (target / "model.tensors").stat().st_size
    served = []
    for method, path, ranged in server.requests:
        if method == "GET" and path.endswith("/model.tensors") and ranged:
            start, stop = map(int, re.match(r"bytes=(\d+)-(\d+)", ranged).groups())
            served.append((start, stop + 1))
    planned = [(start, stop) for plan in result["read_plan"] for _, start, stop in plan]
    # every planned range was served as one request; the rest is the header (1 MiB reads)
    for piece in planned:
        assert piece in served
    others = [s for s in served if s not in planned]
    assert all(start == 0 or start % (1 << 20) == 0 for start, _ in others)
    for plan in result["read_plan"]:
        assert sum(stop - start for _, start, stop in plan) <= 0.6 * size


def test_pp2_each_stage_reads_its_layers(llama_bf16):
    result = run_engine(
        {
            "model": str(llama_bf16),
            "load_format": "tensorizer",
            "pipeline_parallel_size": 2,
            **TWO_RANKS,
        },
        prompts=[],
        stats=True,
        env=RANKS_ENV,
    )
    first, second = ({name for name, _, _ in plan} for plan in result["read_plan"])
    assert not first & second
    assert "model.embed_tokens.weight" in first and "lm_head.weight" in second
    assert all(".layers.0." in n for n in first - {"model.embed_tokens.weight"})
    assert all(".layers.1." in n for n in second - {"model.norm.weight", "lm_head.weight"})


def assert_layout_refused(model: Path, tensor_parallel_size: int, match: str) -> None:
    """vLLM's EngineArgs for `model` at `tensor_parallel_size` are refused by the plug-in's
    file check (before any engine starts) with a LayoutError matching `match`."""
    from vllm import EngineArgs

    from tensorize_vllm_model.core.errors import LayoutError
    from tensorize_vllm_model.integrations.vllm.registration import check_engine_files

    args = EngineArgs(
        model=str(model), load_format="tensorizer", tensor_parallel_size=tensor_parallel_size
    )
    with pytest.raises(LayoutError, match=match):
        check_engine_files(args)


def test_a_layout_the_model_does_not_allow_is_refused_before_the_engine(llama_bf16):
    assert_layout_refused(
        llama_bf16, 3, r"4 attention heads are not divisible by --tensor-parallel-size 3"
    )


def test_a_checkpoint_vllm_cannot_load_names_the_tensor(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "odd-llama"
    shutil.copytree(tiny_llama, source)
    state = load_file(str(source / "model.safetensors"))
    # a tensor the model has no parameter for (every merged weight's pieces are there, so
    # the missing-piece check lets it through to vLLM's loader)
    state["model.layers.0.mlp.extra_proj.weight"] = state[
        "model.layers.0.mlp.up_proj.weight"
    ].clone()
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    convert(source, tmp_path / "out")
    proc = run_engine(
        {"model": str(tmp_path / "out" / "vllm" / "odd-llama" / "v1"), "load_format": "tensorizer"},
        prompts=PROMPTS[:1],
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert re.search(
        r"ModelMismatchError: vLLM cannot load the checkpoint in \S+model.tensors "
        r"for this model: tensor model.layers.0.mlp.extra_proj.weight "
        r"\(shape \[512, 256\] in the file\) was refused "
        r"by vLLM's LlamaForCausalLM",
        proc.stderr,
    ), proc.stderr[-3000:]


def test_a_one_rank_serialized_file_is_not_shared_between_ranks(llama_bf16, tmp_path):
    import torch

    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    directory = tmp_path / "serialized-tp1"
    shutil.copytree(llama_bf16, directory)
    write_tensors(
        str(directory / "model.tensors"), [("w", torch.ones(2), False)], record=FileRecord()
    ).commit()  # as `serialize` writes it at TP=1
    assert_layout_refused(
        directory, 2, r"serialized for TP=1 x PP=1 but is being loaded with TP=2 x PP=1"
    )


def test_vllm_serve_loads_a_converted_file(llama_bf16, llama_reference):
    from tests.support.engines import serve_and_complete

    texts = serve_and_complete(
        [str(llama_bf16), "--load-format", "tensorizer"], str(llama_bf16), prompts=PROMPTS[:2]
    )
    assert texts == llama_reference["texts"][:2]
