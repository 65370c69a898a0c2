"""Files both ways between this package and vLLM's built-in tensorizer code (vLLM 0.32).

* Stock vLLM reads our files: with this package's plug-in off (``VLLM_PLUGINS=""``), vLLM's
  own `TensorizerLoader.load_model` loads what `serialize` wrote, and every parameter equals
  what vLLM's `DefaultModelLoader` loads from the checkpoint (plain and encrypted here; TP=2
  in test_vllm_parallel.py).
* We read stock vLLM's files: vLLM's own `serialize_vllm_model`, run outside an engine on a
  default-loaded model as a GPU worker runs it, writes a file that this package loads with
  the default loader's greedy tokens (plain and encrypted).
* This package's `serialize_vllm_model`, `init_tensorizer_model` and
  `deserialize_tensorizer_model` (vLLM's names) round-trip a model.
* ``deserialize --serialized-directory DIR --deserialization-kwargs JSON``.

vLLM's code runs in tests/support/builtin_runner.py (it says what it stands in for, and why).
"""

import os
import shutil

import pytest

from tests.support.commands import ENGINE_FLAGS, IN_PROCESS, assert_ok, run_cli
from tests.support.engines import MAX_TOKENS, PROMPTS, run_builtin, run_engine

pytestmark = pytest.mark.slow

BUILTIN_LOADER = "vllm.model_executor.model_loader.tensorizer_loader.TensorizerLoader"


def assert_same_as_default_loader(result: dict) -> None:
    assert result["loader"] == BUILTIN_LOADER  # stock vLLM's loader, not this package's
    assert len(result["compared"]) > 10
    assert result["missing"] == [] and result["extra"] == [] and result["different"] == []
    assert not result["has_marker"]  # vLLM deleted its marker (which holds our record)
    assert not [b for b in result["buffers"] if "tensorize" in b or "marker" in b]


def test_stock_vllm_loads_our_file(llama_serialized, tiny_llama):
    directory, _ = llama_serialized
    [result] = run_builtin({"mode": "load", "model": str(directory), "checkpoint": str(tiny_llama)})
    assert_same_as_default_loader(result)


def test_stock_vllm_loads_our_encrypted_file(llama_encrypted, tiny_llama):
    directory, key = llama_encrypted
    [result] = run_builtin(
        {
            "mode": "load",
            "model": str(directory),
            "checkpoint": str(tiny_llama),
            "tensorizer_config": {"encryption_keyfile": str(key)},
        }
    )
    assert_same_as_default_loader(result)


@pytest.fixture(scope="module")
def vllm_written(tiny_llama, tmp_path_factory):
    """Files written by vLLM's own serialize_vllm_model: {"plain": (file, None),
    "encrypted": (file, key)}, beside copies of the model's config and tokenizer."""
    out = tmp_path_factory.mktemp("vllm-written")
    for name in os.listdir(tiny_llama):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny_llama / name, out / name)
    key = out / "model.key"
    key.write_bytes(os.urandom(32))
    files = {"plain": (out / "plain.tensors", None), "encrypted": (out / "encrypted.tensors", key)}
    for path, keyfile in files.values():
        config = {"tensorizer_uri": str(path)}
        if keyfile:
            config["encryption_keyfile"] = str(keyfile)
        [written] = run_builtin(
            {"mode": "serialize", "model": str(tiny_llama), "tensorizer_config": config}
        )
        assert written["written"] == str(path)
    return files


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_vllm_written_file_loads_here(kind, vllm_written, llama_reference):
    path, key = vllm_written[kind]
    config = {"tensorizer_uri": str(path)}
    if key:
        config["encryption_keyfile"] = str(key)
    result = run_engine(
        {
            "model": str(path.parent),
            "load_format": "tensorizer",
            "model_loader_extra_config": config,
        }
    )
    assert result["tokens"] == llama_reference["tokens"]
    assert all(len(t) == MAX_TOKENS for t in result["tokens"])


def test_our_vllm_named_functions_round_trip(tiny_llama, tmp_path):
    """serialize_vllm_model, init_tensorizer_model and deserialize_tensorizer_model, with
    vLLM's signatures and a dict config, outside an engine."""
    target = tmp_path / "ours"
    [result] = run_builtin(
        {
            "mode": "ours",
            "model": str(tiny_llama),
            "tensorizer_config": {"tensorizer_uri": str(target / "model.tensors")},
        }
    )
    assert result["returned_model"] and result["same_names"] and result["different"] == []
    # the weights were built on meta (norms, made with torch.ones, are not), then filled
    assert result["parameters"] > result["on_meta_before"] >= 10
    assert (target / "config.json").exists() and (target / "tokenizer.json").exists()


def test_deserialize_serialized_directory_and_kwargs(llama_serialized, llama_reference):
    """The two flags of vLLM's script: the directory's model.tensors and its config (no
    --model), and TensorDeserializer arguments as JSON ("true" as a string too)."""
    directory, _ = llama_serialized
    proc = run_cli(
        *ENGINE_FLAGS,
        "deserialize",
        "--serialized-directory",
        directory,
        "--deserialization-kwargs",
        '{"verify_hash": "true", "num_readers": 2}',
        "--prompt",
        PROMPTS[0],
        "--max-tokens",
        MAX_TOKENS,
        env=IN_PROCESS,
    )
    assert_ok(proc)
    assert f"Generated: {llama_reference['texts'][0]!r}" in proc.stdout
    assert f"from {directory / 'model.tensors'}" in proc.stdout
