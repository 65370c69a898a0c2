"""``gs://`` and ``az://`` wherever a URI works, end to end on fake-gcs-server and Azurite
(loopback): ``convert`` to gs:// and to az:// (each with a LoRA adapter beside it, as
``serialize --lora-path`` writes it), the adapter read back from az://, ``LLM(...)`` loading the az:// conversion with the adapter read from gs://, ``vllm serve``
of the gs:// conversion answering for the adapter by name (the package's LoRA resolver
reading ``lora/<name>`` on gs://), both with the prefetch (``TENSORIZE_VLLM_MODEL_OVERLAP=1``)
copying the tensors file during the engine start-up through a counting proxy.

Credentials come from each ecosystem's variables (``STORAGE_EMULATOR_HOST``,
``AZURE_STORAGE_CONNECTION_STRING``). Two engines of its own (one ``LLM``, one ``vllm
serve``; the session's default-loader reference besides); the ``LLM`` also generates with
the original PEFT adapter, the reference both adapters' outputs are held to.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from demo_models import build_lora_adapter

from tests.support import BUCKET, CONVERTED_FILES
from tests.support.commands import assert_ok, run_cli
from tests.support.engines import WORKER_EXTENSION, result_of, run_engine, serve_and_complete

pytestmark = pytest.mark.slow  # every test here starts engines

LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "8"]
ADAPTER = "adapter-a"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.tensors"]


@pytest.fixture(scope="module")
def env(fake_gcs, azurite, tmp_path_factory):
    return {
        "STORAGE_EMULATOR_HOST": fake_gcs.endpoint,
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(),
        "TENSORIZE_VLLM_MODEL_CACHE": str(tmp_path_factory.mktemp("cloud-cache")),
    }


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    return build_lora_adapter(tmp_path_factory.mktemp("peft") / ADAPTER, tiny_llama)


def az_names(azurite, uri: str) -> list[str]:
    prefix = uri.split("/", 3)[3] + "/"
    container = azurite.client().get_container_client(BUCKET)
    return sorted(b.name[len(prefix) :] for b in container.list_blobs(name_starts_with=prefix))


def gs_names(fake_gcs, uri: str) -> list[str]:
    prefix = uri.split("/", 3)[3] + "/"
    blobs = fake_gcs.client().list_blobs(BUCKET, prefix=prefix)
    return sorted(b.name[len(prefix) :] for b in blobs)


def convert_to(tiny_llama, scheme: str, env: dict) -> str:
    directory = f"{scheme}://{BUCKET}/conv/{uuid.uuid4().hex}"
    argv = ["--model", tiny_llama, "convert", "--serialized-directory", directory]
    assert_ok(run_cli(*argv, "--suffix", "v1", env=env))
    return f"{directory}/vllm/tiny-llama/v1"


@pytest.fixture(scope="module")
def converted(tiny_llama, adapter, env, fake_gcs, azurite):
    """``convert`` (no engine) to gs:// and to az://, then the adapter written into each
    directory's ``lora/`` as ``serialize --lora-path`` writes it (`lora.stage_adapter` in a
    transaction on that store; ``convert`` takes no adapter): the two directories."""
    from tensorize_vllm_model import storage
    from tensorize_vllm_model.artifacts.lora import stage_adapter

    uris = {scheme: convert_to(tiny_llama, scheme, env) for scheme in ("gs", "az")}
    options = {
        "gs": {"gcs_endpoint": fake_gcs.endpoint},
        "az": {"azure_connection_string": azurite.connection_string()},
    }
    for scheme, uri in uris.items():
        with storage.transaction(options[scheme]) as tx:
            stage_adapter(tx, ADAPTER, str(adapter), uri)
    return uris


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_convert_to_the_cloud_publishes_the_directory(converted, fake_gcs, azurite, scheme):
    names = (gs_names if scheme == "gs" else az_names)(
        fake_gcs if scheme == "gs" else azurite, converted[scheme]
    )
    assert names == sorted(CONVERTED_FILES + [f"lora/{ADAPTER}/{n}" for n in ADAPTER_FILES])


def test_adapter_read_back_from_az(converted, adapter, azurite, monkeypatch):
    """The adapter on az:// read back as a PEFT directory (what `tensorized_lora_request`
    hands vLLM) holds the original adapter's tensors, bit for bit."""
    from safetensors.torch import load_file

    from tensorize_vllm_model.artifacts.lora import adapter_uri, materialize_adapter
    from tensorize_vllm_model.storage import azure as azure_backend

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string())
    azure_backend._client.clear()
    try:
        path = Path(materialize_adapter(adapter_uri(converted["az"], ADAPTER)))
    finally:
        azure_backend._client.clear()  # its client read this test's variable
    original = load_file(str(adapter / "adapter_model.safetensors"))
    read = load_file(str(path / "adapter_model.safetensors"))
    assert read.keys() == original.keys()
    assert all(read[k].equal(original[k]) for k in original)


def tensors_size(azurite, uri: str) -> int:
    blob = azurite.client().get_blob_client(BUCKET, uri.split("/", 3)[3] + "/model.tensors")
    return blob.get_blob_properties().size


@pytest.fixture(scope="module")
def az_load(converted, adapter, env, azurite):
    """``LLM`` on the az:// conversion through a proxy that counts Azurite's bytes, the
    prefetch on, the tensorized adapter from gs://, the PEFT adapter as the reference:
    (runner result, bytes the proxy passed, size of the tensors file, its output)."""
    from tests.support.servers import CuttingProxy

    proxy = CuttingProxy(azurite.port, cut_after=1 << 40, for_good=True)
    proxied = re.sub(
        r"http://127\.0\.0\.1:\d+",
        f"http://127.0.0.1:{proxy.port}",
        env["AZURE_STORAGE_CONNECTION_STRING"],
    )
    try:
        proc = run_engine(
            {
                "model": converted["az"],
                "load_format": "tensorizer",
                "enable_lora": True,
                "max_lora_rank": 8,
                "worker_extension_cls": WORKER_EXTENSION,
            },
            stats=True,
            lora={"name": f"peft-{ADAPTER}", "path": str(adapter)},
            tensorized_lora={"model": converted["gs"], "name": ADAPTER},
            env={
                **env,
                "AZURE_STORAGE_CONNECTION_STRING": proxied,
                "TENSORIZE_VLLM_MODEL_OVERLAP": "1",
            },
            expect_ok=False,
        )
    finally:
        proxy.stop()
    output = proc.stdout + proc.stderr
    return result_of(proc), proxy.passed, tensors_size(azurite, converted["az"]), output


def test_llm_loads_az_conversion_with_adapter_from_gs(az_load, llama_reference):
    result = az_load[0]
    assert result["base_tokens"] == llama_reference["tokens"]
    assert result["reference_tokens"] != result["base_tokens"]  # the adapter matters
    assert result["tokens"] == result["reference_tokens"]


def test_prefetch_copies_the_az_tensors_once(az_load, converted, env):
    """The loader read the local copy made during the start-up (its path under the cache
    directory), and Azurite sent the tensors file about once: the copy, plus the config
    files and the pre-engine header check."""
    result, passed, size, output = az_load
    [stats] = result["stats"]
    assert f"Loading tensors from {converted['az']}/model.tensors (its local copy" in output
    assert stats["uri"].startswith(str(Path(env["TENSORIZE_VLLM_MODEL_CACHE"]) / "prefetch"))
    assert size <= passed < 1.6 * size
    assert not list((Path(env["TENSORIZE_VLLM_MODEL_CACHE"]) / "prefetch").iterdir())


def test_vllm_serve_gs_conversion_answers_for_the_adapter(converted, env, fake_gcs, az_load):
    """``vllm serve gs://...`` (its own processes), the prefetch on through a proxy in front
    of fake-gcs-server; the adapter is found by name in the model's ``lora/`` on gs://."""
    from tests.support.servers import CuttingProxy

    proxy = CuttingProxy(fake_gcs.port, cut_after=1 << 40, for_good=True)
    served_env = {
        **env,
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}",
        "TENSORIZE_VLLM_MODEL_OVERLAP": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    output: list[str] = []
    try:
        texts = serve_and_complete(
            [converted["gs"], "--load-format", "tensorizer", *LORA_FLAGS],
            ADAPTER,
            env=served_env,
            output=output,
        )
    finally:
        proxy.stop()
    assert texts == az_load[0]["reference_texts"]
    # The worker read the local copy made while vLLM started (the loader says so).
    copied = f"Loading tensors from {converted['gs']}/model.tensors (its local copy, made "
    assert copied in output[0], output[0][-3000:]
    bucket = fake_gcs.client().bucket(BUCKET)
    blob = bucket.get_blob(converted["gs"].split("/", 3)[3] + "/model.tensors")
    assert blob.size <= proxy.passed < 1.6 * blob.size
