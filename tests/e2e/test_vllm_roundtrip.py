"""End to end through the real vLLM (CPU build), on local disk: serialize, load with
``load_format="tensorizer"``, and compare greedy tokens with the original model.

Each engine runs in its own subprocess (about 30 s each); the Llama reference and its
serialization are session fixtures (conftest.py) shared with the other end-to-end modules.
"""

import os
import stat
import time

import pytest

from tests.support import ROOT, SERIALIZED_FILES
from tests.support.commands import IN_PROCESS, assert_ok, run_deserialize, write_hf_tensors
from tests.support.engines import (
    ENGINE_KWARGS,
    MAX_TOKENS,
    PROMPTS,
    WORKER_EXTENSION,
    run_engine,
    run_runner,
    serve_and_complete,
)

pytestmark = pytest.mark.slow

WRAPPER = str(ROOT / "examples" / "tensorize_vllm_model.py")


def test_serialize_layout(llama_serialized):
    directory, stdout = llama_serialized
    names = sorted(p.name for p in directory.iterdir())
    assert names == SERIALIZED_FILES
    assert stdout.strip().splitlines()[-1] == str(directory)
    # nothing beside the final names (no temporary files left)
    assert not [p for p in directory.parent.rglob("*") if ".tmp-" in p.name]


def test_llama_tensorized_matches_original(llama_reference, llama_serialized):
    directory, _ = llama_serialized
    result = run_engine(
        {
            "model": str(directory),
            "load_format": "tensorizer",
            "worker_extension_cls": WORKER_EXTENSION,
        },
        stats=True,
        separate_processes=True,
    )  # the plug-in registers in the worker
    assert result["tokens"] == llama_reference["tokens"]
    assert all(len(t) == MAX_TOKENS for t in result["tokens"])
    [stats] = result["stats"]
    assert stats["uri"] == str(directory / "model.tensors")
    assert stats["bytes"] > 3_000_000 and stats["tensors"] > 15
    # the worker read the local file itself, and says where its readers spent their time
    assert stats["read_times"]["readers"] >= 1 and stats["read_times"]["reading"] > 0


def test_cli_deserialize_through_example_script(llama_reference, llama_serialized):
    directory, _ = llama_serialized
    proc = run_deserialize(
        directory,
        directory / "model.tensors",
        "--num-readers",
        "2",
        "--prompt",
        PROMPTS[0],
        "--max-tokens",
        MAX_TOKENS,
        script=WRAPPER,
    )
    assert_ok(proc)
    assert f"Generated: {llama_reference['texts'][0]!r}" in proc.stdout
    assert "GB/s" in proc.stdout and f"from {directory / 'model.tensors'}" in proc.stdout


def test_encrypted_key_file_and_ciphertext(llama_encrypted, llama_serialized):
    directory, key = llama_encrypted
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    plain = (llama_serialized[0] / "model.tensors").read_bytes()
    secret = (directory / "model.tensors").read_bytes()
    # the largest weights of the plain file do not appear in the encrypted one
    assert plain[-4096:] not in secret
    assert key.read_bytes() not in secret


def test_encrypted_load_with_key_matches(llama_reference, llama_encrypted):
    """With the key, given as a tensorize_vllm_model.TensorizerConfig object (not a dict)."""
    directory, key = llama_encrypted
    result = run_engine(
        {
            "model": str(directory),
            "load_format": "tensorizer",
            "model_loader_extra_config": {
                "tensorizer_uri": str(directory / "model.tensors"),
                "encryption_keyfile": str(key),
                "num_readers": 1,
            },
        },
        config_object=True,
    )
    assert result["tokens"] == llama_reference["tokens"]


def test_encrypted_without_key_cli_refuses_before_engine(llama_encrypted):
    directory, _ = llama_encrypted
    start = time.monotonic()
    proc = run_deserialize(directory, directory / "model.tensors")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {directory / 'model.tensors'} is encrypted: give the key with --keyfile KEYFILE"
    )
    assert time.monotonic() - start < 25  # refused before any engine started


def test_encrypted_with_wrong_key_cli_refuses(llama_encrypted, tmp_path):
    directory, _ = llama_encrypted
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    proc = run_deserialize(directory, directory / "model.tensors", "--keyfile", wrong)
    assert proc.returncode == 2
    assert (
        f"error: cannot decrypt {directory / 'model.tensors'} with the key in {wrong}"
        in proc.stderr
    )


def test_encrypted_without_key_llm_fails_clearly(llama_encrypted):
    directory, _ = llama_encrypted
    proc = run_engine(
        {"model": str(directory), "load_format": "tensorizer"},
        expect_ok=False,
        separate_processes=True,
    )
    assert proc.returncode != 0
    assert (
        f"{directory / 'model.tensors'} is encrypted: give the key as encryption_keyfile in "
        "model_loader_extra_config" in proc.stdout + proc.stderr
    )


def test_hugging_face_tensorized_file_loads(llama_reference, tiny_llama, tmp_path):
    """A file written by plain TensorSerializer.write_module(hf_model) (not vLLM's layout,
    with buffers such as rotary_emb.inv_freq) loads through the weights-iterator path."""
    hf_file = tmp_path / "hf.tensors"
    write_hf_tensors(tiny_llama, hf_file, "bfloat16")
    result = run_engine(
        {
            "model": str(tiny_llama),
            "load_format": "tensorizer",
            "model_loader_extra_config": {"tensorizer_uri": str(hf_file)},
        }
    )
    assert result["tokens"] == llama_reference["tokens"]


def test_vllm_serve_answers_completions(llama_reference, llama_serialized):
    directory, _ = llama_serialized
    texts = serve_and_complete([str(directory), "--load-format", "tensorizer"], str(directory))
    assert texts == llama_reference["texts"]


def test_opt_serialized_with_python_api_matches(opt_reference, tiny_opt, tmp_path):
    """OPT (tied embeddings), serialized with `tensorize_vllm_model(engine_args, config)`
    and loaded with `tensorizer_dir` left to default to --model."""
    target = tmp_path / "opt" / "v1"
    spec = {
        "serialize": {
            "engine": {"model": str(tiny_opt), **ENGINE_KWARGS},
            "config": {"tensorizer_uri": str(target / "model.tensors")},
        }
    }
    written = run_runner(spec, env=IN_PROCESS)
    assert written["files"][0] == str(target / "model.tensors")
    assert (target / "config.json").exists() and (target / "tokenizer.json").exists()
    result = run_engine({"model": str(target), "load_format": "tensorizer"})
    assert result["tokens"] == opt_reference["tokens"]
    assert result["tokens"] != []


def test_the_load_log_reports_the_worker_memory():
    import re

    from tensorize_vllm_model.integrations.vllm.loader import memory_text

    before = memory_text()
    kept = b"\x01" * (300 << 20)  # every page written: resident
    after = memory_text()
    numbers = [
        re.fullmatch(r"resident (\d+\.\d\d) GB, peak (\d+\.\d\d) GB", text)
        for text in (before, after)
    ]
    assert all(numbers), (before, after)
    (now0, peak0), (now1, peak1) = ((float(m[1]), float(m[2])) for m in numbers)
    assert peak0 >= now0 and peak1 >= now1
    assert now1 - now0 >= 0.25 and peak1 >= now1
    del kept
