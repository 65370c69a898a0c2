"""Every backend's credential faults are one line naming what is missing, exit code 2: an
access key without its secret (S3's own variables and AWS's), no Google credentials, an
Azure key without an account. Run through the command line's `main` in this process."""

from __future__ import annotations

import pytest

from tensorize_vllm_model.cli import main
from tensorize_vllm_model.core.errors import CredentialsError
from tensorize_vllm_model.core.settings import STORAGE_VARIABLES
from tensorize_vllm_model.storage import azure as azure_backend
from tensorize_vllm_model.storage import s3 as s3_backend

CLEARED = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    *STORAGE_VARIABLES,  # the gs:// and az:// backends' own
    "AZURE_CLIENT_ID",  # azure-identity's
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws, ~/.s3cfg, gcloud ADC file
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    s3_backend._clients.clear()
    azure_backend._client.clear()


CASES = {
    "aws-key-without-secret": (
        {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"},
        "s3://bucket/model.tensors",
        "error: incomplete S3 credentials from the env provider: AWS_SECRET_ACCESS_KEY is "
        "missing (set both, or neither)",
    ),
    "s3-key-without-secret": (
        {"S3_ACCESS_KEY_ID": "AKIAEXAMPLE"},
        "s3://bucket/model.tensors",
        "error: incomplete S3 credentials: s3_access_key_id / S3_ACCESS_KEY_ID is set but "
        "s3_secret_access_key / S3_SECRET_ACCESS_KEY is not (set both, or neither)",
    ),
    "gcs-credentials-file-missing": (
        {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"},
        "gs://bucket/model.tensors",
        "error: GOOGLE_APPLICATION_CREDENTIALS is not a usable credentials file: File "
        "/nonexistent/key.json was not found.",
    ),
    "azure-key-without-account": (
        {"AZURE_STORAGE_ACCOUNT_KEY": "a2V5"},
        "az://container/model.tensors",
        "error: no Azure storage account for az:// URIs (AZURE_STORAGE_ACCOUNT_KEY is set): "
        "set AZURE_STORAGE_ACCOUNT_NAME (with AZURE_STORAGE_ACCOUNT_KEY, "
        "AZURE_STORAGE_SAS_TOKEN or an identity DefaultAzureCredential finds), or "
        "AZURE_STORAGE_CONNECTION_STRING",
    ),
    # google-cloud-storage's variable includes the scheme; without one, every request was
    # retried and reported as "cannot reach ...: InvalidSchema" (3 times).
    "gcs-emulator-host-without-scheme": (
        {"STORAGE_EMULATOR_HOST": "localhost:4443"},
        "gs://bucket/model.tensors",
        "error: STORAGE_EMULATOR_HOST must be a URL with its scheme, e.g. "
        "http://127.0.0.1:4443 (got 'localhost:4443')",
    ),
    # An account and an http:// endpoint (Azurite's kind) but neither key nor SAS:
    # DefaultAzureCredential's token is refused over http by azure-storage-blob (a
    # ValueError that was a traceback, exit 1). Nothing is sent: port 1 is never reached.
    "azure-identity-over-http": (
        {
            "AZURE_STORAGE_ACCOUNT_NAME": "devstoreaccount1",
            "AZURE_STORAGE_BLOB_ENDPOINT": "http://127.0.0.1:1/devstoreaccount1",
        },
        "az://container/model.tensors",
        "error: Azure credentials (DefaultAzureCredential) cannot be used with the endpoint "
        "http://127.0.0.1:1/devstoreaccount1: Token credential is only supported with HTTPS. "
        "(set AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or an https:// "
        "AZURE_STORAGE_BLOB_ENDPOINT)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_credential_fault_is_one_line_exit_2(case, monkeypatch, capsys):
    env, uri, line = CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["inspect", uri]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [line]
    assert "AKIAEXAMPLE" not in err and "a2V5" not in err  # secrets never shown


def test_credentials_error_is_access_denied_and_config_error():
    from tensorize_vllm_model.core.errors import AccessDenied, ConfigError

    assert issubclass(CredentialsError, AccessDenied) and issubclass(CredentialsError, ConfigError)
