"""End to end through the real vLLM (CPU build) with remote storage: serialize to S3 (moto on
loopback) with the command line, load ``s3://`` model directories with ``LLM`` and
``vllm serve``, an encrypted model whose key lives on S3, and tensors from HTTP(S) URLs."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support import BUCKET, SERIALIZED_FILES
from tests.support.commands import ENGINE_FLAGS, assert_ok, run_deserialize, run_serialize
from tests.support.engines import MAX_TOKENS, PROMPTS, run_engine, serve_and_complete

pytestmark = pytest.mark.slow

ALLOW_HTTP = {"stream_kwargs": {"force_http": True}}


@pytest.fixture(scope="module")
def s3_env(moto, tmp_path_factory):
    """The environment of every engine here: S3 credentials and endpoint (never on a command
    line), and its own cache and temporary directories to watch."""
    root = tmp_path_factory.mktemp("remote-env")
    env = {
        "S3_ACCESS_KEY_ID": "testing",
        "S3_SECRET_ACCESS_KEY": "testing",
        "S3_ENDPOINT_URL": moto.endpoint,
        "TENSORIZE_VLLM_MODEL_CACHE": str(root / "cache"),
        "TMPDIR": str(root / "tmp"),
    }
    (root / "tmp").mkdir()
    return env


def s3_objects(moto, prefix: str) -> dict[str, int]:
    listing = moto.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix) :]: item["Size"] for item in listing.get("Contents", [])}


@pytest.fixture(scope="module")
def s3_serialized(tiny_llama, moto, s3_env):
    prefix = f"runs/{uuid.uuid4().hex}"
    proc = run_serialize(
        tiny_llama,
        f"s3://{BUCKET}/{prefix}",
        "v1",
        "--allow-http",
        env=s3_env,
        separate_processes=True,  # credentials reach the worker that writes
    )
    assert_ok(proc)
    return f"s3://{BUCKET}/{prefix}/vllm/tiny-llama/v1", proc


def test_serialize_to_s3_writes_the_model_directory(s3_serialized, moto, s3_env):
    directory, proc = s3_serialized
    prefix = directory[len(f"s3://{BUCKET}/") :] + "/"
    objects = s3_objects(moto, prefix)
    assert sorted(objects) == SERIALIZED_FILES
    assert objects["model.tensors"] > 3_000_000
    assert proc.stdout.strip().splitlines()[-1] == directory
    assert os.listdir(s3_env["TMPDIR"]) == [] or all(
        not name.startswith("tensorize-vllm-model-") for name in os.listdir(s3_env["TMPDIR"])
    )


class DiskWatcher:
    """Polls directories while an engine runs; records the largest file ever seen."""

    def __init__(self, *directories: str):
        self.directories = directories
        self.largest = (0, "")
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for directory in self.directories:
                for root, _, files in os.walk(directory):
                    for name in files:
                        path = os.path.join(root, name)
                        try:
                            size = os.path.getsize(path)
                        except OSError:
                            continue
                        self.seen.add(path)
                        self.largest = max(self.largest, (size, path))
            time.sleep(0.02)

    def __enter__(self) -> DiskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_llm_loads_s3_directory_without_local_copy(s3_serialized, s3_env, llama_reference):
    directory, _ = s3_serialized
    with DiskWatcher(s3_env["TENSORIZE_VLLM_MODEL_CACHE"], s3_env["TMPDIR"]) as watcher:
        result = run_engine(
            {
                "model": directory,
                "load_format": "tensorizer",
                "model_loader_extra_config": ALLOW_HTTP,
            },
            env=s3_env,
            separate_processes=True,
        )  # credentials reach the worker
    assert result["tokens"] == llama_reference["tokens"]
    # The tensors (3.4 MB) never touched local disk: only the small files were cached.
    size, path = watcher.largest
    assert size < 1_000_000, f"{path} ({size} bytes) was written during the load"
    cached = {
        os.path.basename(p)
        for p in watcher.seen
        if p.startswith(s3_env["TENSORIZE_VLLM_MODEL_CACHE"])
    }
    assert cached == set(SERIALIZED_FILES) - {"model.tensors", "tensorize_model_files.json"}
    assert not any(p.endswith(".tensors") for p in watcher.seen)


def test_cli_deserialize_from_s3(s3_serialized, s3_env, llama_reference):
    directory, _ = s3_serialized
    proc = run_deserialize(
        directory,
        f"{directory}/model.tensors",
        "--prompt",
        PROMPTS[1],
        "--max-tokens",
        MAX_TOKENS,
        engine_flags=[
            *ENGINE_FLAGS,
            "--model-loader-extra-config",
            '{"stream_kwargs": {"force_http": true}}',
        ],
        env=s3_env,
    )
    assert_ok(proc)
    assert f"Generated: {llama_reference['texts'][1]!r}" in proc.stdout
    assert f"from {directory}/model.tensors" in proc.stdout


def test_vllm_serve_s3_directory(s3_serialized, s3_env, llama_reference):
    directory, _ = s3_serialized
    texts = serve_and_complete(
        [
            directory,
            "--load-format",
            "tensorizer",
            "--model-loader-extra-config",
            '{"stream_kwargs": {"force_http": true}}',
        ],
        directory,
        env=s3_env,
    )
    assert texts == llama_reference["texts"]


def test_encrypted_model_with_key_on_s3(tiny_llama, moto, s3_env, llama_reference):
    prefix = f"runs/{uuid.uuid4().hex}"
    key_uri = f"s3://{BUCKET}/{prefix}/keys/tiny-llama.key"
    proc = run_serialize(
        tiny_llama,
        f"s3://{BUCKET}/{prefix}",
        "enc",
        "--keyfile",
        key_uri,
        "--allow-http",
        env=s3_env,
    )
    assert_ok(proc)
    assert s3_objects(moto, f"{prefix}/keys/") == {"tiny-llama.key": 32}
    directory = f"s3://{BUCKET}/{prefix}/vllm/tiny-llama/enc"
    result = run_engine(
        {
            "model": directory,
            "load_format": "tensorizer",
            "model_loader_extra_config": {**ALLOW_HTTP, "encryption_keyfile": key_uri},
        },
        prompts=PROMPTS[:2],
        env=s3_env,
    )
    assert result["tokens"] == llama_reference["tokens"][:2]


@pytest.fixture(scope="module")
def served_copy(llama_serialized, web_root):
    """The locally serialized model, published under the test web servers' root."""
    directory, _ = llama_serialized
    target = web_root / "published" / "tiny-llama"
    target.mkdir(parents=True, exist_ok=True)
    for item in Path(directory).iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return "published/tiny-llama"


def test_llm_streams_tensors_from_http_1_0_server(
    served_copy, web_servers, tiny_llama, llama_reference
):
    url = f"{web_servers['http-1.0-no-ranges'].url}/{served_copy}/model.tensors"
    result = run_engine(
        {
            "model": str(tiny_llama),
            "load_format": "tensorizer",
            "model_loader_extra_config": {"tensorizer_uri": url},
        },
        prompts=PROMPTS[:2],
    )
    assert result["tokens"] == llama_reference["tokens"][:2]


def test_cli_deserialize_over_https_with_private_ca(
    served_copy, web_servers, tls, llama_serialized, llama_reference
):
    directory, _ = llama_serialized
    url = f"{web_servers['https'].url}/{served_copy}/model.tensors"
    proc = run_deserialize(
        directory,
        url,
        "--ca-bundle",
        tls.ca,
        "--prompt",
        PROMPTS[0],
        "--max-tokens",
        MAX_TOKENS,
    )
    assert_ok(proc)
    assert f"Generated: {llama_reference['texts'][0]!r}" in proc.stdout
    # Without the CA the certificate is refused before any engine starts.
    refused = run_deserialize(directory, url)
    assert refused.returncode == 2
    assert "TLS failed" in refused.stderr and "--ca-bundle" in refused.stderr
