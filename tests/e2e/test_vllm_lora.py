"""LoRA end to end through the real vLLM (CPU build): an adapter serialized beside the model
(encrypted with its key) gives the same greedy tokens as the original PEFT adapter, offline
(`tensorized_lora_request`) and through ``vllm serve`` (the package's LoRA resolver)."""

from __future__ import annotations

import json

import pytest
from demo_models import build_lora_adapter

from tensorize_vllm_model import open_tensors
from tests.support.commands import ENGINE_FLAGS, assert_ok, run_serialize
from tests.support.engines import run_engine, serve_and_complete

pytestmark = pytest.mark.slow

LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "8"]
LORA_KWARGS = {"enable_lora": True, "max_lora_rank": 8}


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return build_lora_adapter(tmp_path_factory.mktemp("peft") / "adapter-a", tiny_llama)


@pytest.fixture(scope="module")
def lora_reference(tiny_llama, adapter):
    """The original model with the original PEFT adapter (vLLM's own loaders)."""
    return run_engine(
        {"model": str(tiny_llama), **LORA_KWARGS}, lora={"name": "adapter-a", "path": str(adapter)}
    )


@pytest.fixture(scope="module")
def serialized(tiny_llama, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("with-lora")
    key = out / "model.key"
    proc = run_serialize(
        tiny_llama,
        out,
        "v1",
        "--keyfile",
        key,
        "--lora-path",
        adapter,
        engine_flags=[*ENGINE_FLAGS, *LORA_FLAGS],
    )
    assert_ok(proc)
    return out / "vllm" / "tiny-llama" / "v1", key


def test_adapter_changes_the_output(lora_reference):
    assert lora_reference["tokens"] != lora_reference["base_tokens"]


def test_adapter_written_beside_the_model_encrypted(serialized, adapter):
    directory, key = serialized
    target = directory / "lora" / "adapter-a"
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.tensors",
    ]
    assert json.loads((target / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text()
    )
    from tensorize_vllm_model import EncryptionError

    with pytest.raises(EncryptionError, match="is encrypted"):
        open_tensors(str(target / "adapter_model.tensors"))


def test_tensorized_adapter_matches_original(serialized, lora_reference):
    directory, key = serialized
    result = run_engine(
        {
            "model": str(directory),
            "load_format": "tensorizer",
            **LORA_KWARGS,
            "model_loader_extra_config": {"encryption_keyfile": str(key)},
        },
        tensorized_lora={
            "model": str(directory),
            "name": "adapter-a",
            "config": {"encryption_keyfile": str(key)},
        },
    )
    assert result["tokens"] == lora_reference["tokens"]
    assert result["base_tokens"] == lora_reference["base_tokens"]


def test_vllm_serve_answers_for_the_adapter_by_name(serialized, lora_reference):
    directory, key = serialized
    texts = serve_and_complete(
        [
            str(directory),
            "--load-format",
            "tensorizer",
            *LORA_FLAGS,
            "--model-loader-extra-config",
            json.dumps({"encryption_keyfile": str(key)}),
        ],
        "adapter-a",
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    assert texts == lora_reference["texts"]


def test_adapter_that_does_not_fit_refused_and_nothing_written(tiny_llama, adapter, tmp_path):
    wrong = build_lora_adapter(tmp_path / "wrong-rank", tiny_llama, rank=16)
    out = tmp_path / "out"
    proc = run_serialize(
        tiny_llama,
        out,
        "v1",
        "--lora-path",
        adapter,
        "--lora-path",
        wrong,
        engine_flags=[*ENGINE_FLAGS, *LORA_FLAGS],
    )
    assert proc.returncode == 2
    assert "error: LoRA adapter 'wrong-rank' has rank 16, above --max-lora-rank 8" in proc.stderr
    assert not (out / "vllm" / "tiny-llama" / "v1").exists() or not any(
        p.name in ("model.tensors", "config.json") or p.name == "lora"
        for p in (out / "vllm" / "tiny-llama" / "v1").iterdir()
    )
