"""End to end with Google Cloud Storage (fake-gcs-server) and Azure Blob (Azurite) on
loopback: the command line's ``inspect`` / ``verify`` read ``gs://`` and ``az://`` models,
and one ``LLM`` loads an encrypted model directory from ``gs://`` whose key lives on
``az://``, credentials from each ecosystem's own variables (``STORAGE_EMULATOR_HOST``,
``AZURE_STORAGE_CONNECTION_STRING``), never on a command line.

The models are the suite's serialized tiny Llama, copied up with each store's own client
(serializing to a bucket is the same transaction the backend cases of
tests/contract/test_storage_backends.py check on both emulators)."""

from __future__ import annotations

import uuid

import pytest

from tests.support import BUCKET, SERIALIZED_FILES
from tests.support.commands import assert_ok, run_cli, run_serialize
from tests.support.engines import run_engine


@pytest.fixture(scope="module")
def cloud_env(fake_gcs, azurite, tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud-env")
    return {
        "STORAGE_EMULATOR_HOST": fake_gcs.endpoint,
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(),
        "TENSORIZE_VLLM_MODEL_CACHE": str(root / "cache"),
    }


@pytest.fixture(scope="module")
def cloud_models(llama_encrypted, fake_gcs, azurite):
    """The encrypted tiny Llama's directory on gs:// and on az://, its key on az://."""
    directory, key = llama_encrypted
    prefix = f"runs/{uuid.uuid4().hex}"
    bucket = fake_gcs.client().bucket(BUCKET)
    container = azurite.client().get_container_client(BUCKET)
    for name in SERIALIZED_FILES:
        data = (directory / name).read_bytes()
        bucket.blob(f"{prefix}/enc/{name}").upload_from_string(data)
        container.upload_blob(f"{prefix}/enc/{name}", data)
    container.upload_blob(f"{prefix}/keys/model.key", key.read_bytes())
    return {
        "gs": f"gs://{BUCKET}/{prefix}/enc",
        "az": f"az://{BUCKET}/{prefix}/enc",
        "key": f"az://{BUCKET}/{prefix}/keys/model.key",
    }


@pytest.mark.parametrize("scheme", ["gs", "az"])
@pytest.mark.slow  # cloud_models serializes with a vLLM engine
def test_cli_verify_and_inspect_a_cloud_model(cloud_models, cloud_env, scheme):
    tensors = f"{cloud_models[scheme]}/model.tensors"
    proc = run_cli("verify", tensors, "--keyfile", cloud_models["key"], env=cloud_env)
    assert_ok(proc)
    assert tensors in proc.stdout
    proc = run_cli("inspect", tensors, env=cloud_env)
    assert_ok(proc)
    assert "24 tensors" in proc.stdout and "encrypted" in proc.stdout


@pytest.mark.slow  # cloud_models serializes with a vLLM engine
def test_cli_names_missing_azure_credentials(cloud_models):
    """No account anywhere: one line naming what to set, exit 2 (no traceback)."""
    proc = run_cli("inspect", f"{cloud_models['az']}/model.tensors", env={})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: no Azure storage account for az:// URIs: set AZURE_STORAGE_ACCOUNT_NAME "
        "(with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or an identity "
        "DefaultAzureCredential finds), or AZURE_STORAGE_CONNECTION_STRING"
    ]


@pytest.mark.slow
def test_llm_loads_gs_directory_with_key_on_az(cloud_models, cloud_env, llama_reference):
    result = run_engine(
        {
            "model": cloud_models["gs"],
            "load_format": "tensorizer",
            "model_loader_extra_config": {"encryption_keyfile": cloud_models["key"]},
        },
        env=cloud_env,
        separate_processes=True,  # the credentials reach vLLM's worker through its env
    )
    assert result["tokens"] == llama_reference["tokens"]


@pytest.fixture(scope="module")
def serialized_to_gs(tiny_llama, cloud_env):
    """The tiny Llama serialized straight to gs:// by the command line (its capture engine;
    the emulator from STORAGE_EMULATOR_HOST): the model directory's URI."""
    directory = f"gs://{BUCKET}/runs/{uuid.uuid4().hex}"
    assert_ok(run_serialize(tiny_llama, directory, "v1", env=cloud_env))
    return f"{directory}/vllm/tiny-llama/v1"


@pytest.mark.slow
def test_serialize_to_gs_then_llm_loads_it_from_gs(
    serialized_to_gs, cloud_env, fake_gcs, llama_reference
):
    """``serialize`` to gs:// publishes the whole directory; ``LLM(gs://...,
    load_format="tensorizer")`` loads it from there and generates the default loader's
    tokens."""
    prefix = serialized_to_gs.split("/", 3)[3] + "/"
    names = sorted(
        b.name[len(prefix) :] for b in fake_gcs.client().list_blobs(BUCKET, prefix=prefix)
    )
    assert names == SERIALIZED_FILES
    result = run_engine({"model": serialized_to_gs, "load_format": "tensorizer"}, env=cloud_env)
    assert result["tokens"] == llama_reference["tokens"]
