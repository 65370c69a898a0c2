"""Signed query strings never reach a message, a log line or stderr (issue 30).

Each signed form is read through the backend that serves it, against the real loopback
servers, and made to fail as users see it fail: a missing object, access denied, a stall
(a proxy that stops forwarding mid-response). Every time, the secret values are looked for
in the exception (its text and repr, and those of every error it came from), in every log record at DEBUG (caplog) and
in what the command line prints (``inspect`` in-process: its stderr and stdout).

The forms: an https:// Azure blob URL with a SAS (Azurite checks the SAS: a SAS signed with
another key is refused, 403), an S3 presigned URL (SeaweedFS checks the signature, moto
serves a missing key and the stall), a GCS signed URL (fake-gcs-server serves the object's
download and checks no signature, so no 403 there: the query is the shape Google's
signing makes, not signed by a key), and az://, s3://, gs:// URIs with a signed query
pasted on (az:// refuses it; s3:// and gs:// report the missing object)."""

from __future__ import annotations

import datetime
import logging
import urllib.parse
import uuid
from collections.abc import Callable

import pytest

from tensorize_vllm_model import StorageError, TensorizeError, storage
from tensorize_vllm_model.cli.entry import main
from tensorize_vllm_model.core.redaction import redact_text, redact_uri
from tensorize_vllm_model.storage.retry import RetryPolicy
from tests.support import BUCKET
from tests.support.servers import AZURITE_ACCOUNT, AZURITE_KEY, CuttingProxy

POLICY = RetryPolicy(attempts=2, backoff=0.01)
DATA = b"x" * (256 * 1024)
GOOG_SIGNATURE = "9f3c" * 64
GOOG_CREDENTIAL = "signer%40project.iam.gserviceaccount.com%2F20261207%2Fauto%2Fstorage"
AMZ_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"


def assert_hidden(secrets: list[str], failing: Callable[[], object], caplog, capsys, cli=None):
    """`failing()` raises one of this package's errors; no secret is in it, in any log
    record, or in what ``inspect CLI`` prints (exit 2, one error line)."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TensorizeError) as failure:
        failing()
    shown, error = [], failure.value
    while error is not None:  # the error and every error it came from
        shown += [str(error), repr(error)]
        error = error.__cause__ or error.__context__
    if cli is not None:
        assert main(["inspect", cli]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1, err
        shown += [out, err]
    shown.append(caplog.text)
    for secret in secrets:
        for text in shown:
            assert secret not in text, (secret, text)
    return failure.value


def _options(**extra) -> storage.StreamOptions:
    return storage.StreamOptions(retry=POLICY, **extra)


# -- an Azure blob URL with a SAS (https:// form over Azurite's plain HTTP) ----------------


def _sas(blob: str, key: str = AZURITE_KEY) -> str:
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    return generate_blob_sas(
        AZURITE_ACCOUNT,
        BUCKET,
        blob,
        account_key=key,
        permission=BlobSasPermissions(read=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )


def _sig(sas: str) -> str:
    return next(p.split("=", 1)[1] for p in sas.split("&") if p.startswith("sig="))


def test_sas_url_missing_blob(azurite, caplog, capsys):
    blob = f"{uuid.uuid4().hex}/absent.tensors"
    sas = _sas(blob)
    url = f"{azurite.endpoint}/{BUCKET}/{blob}?{sas}"
    error = assert_hidden(
        [_sig(sas)], lambda: storage.read_bytes(url, _options()), caplog, capsys, cli=url
    )
    assert isinstance(error, storage.NotFound) and redact_uri(url) in str(error)


def test_sas_url_access_denied(azurite, caplog, capsys):
    blob = f"{uuid.uuid4().hex}/model.tensors"
    azurite.client().get_blob_client(BUCKET, blob).upload_blob(DATA)
    sas = _sas(blob, key="d3Jvbmcta2V5LW5vdC1henVyaXRlcy13ZWxsLWtub3duLW9uZQ==")
    url = f"{azurite.endpoint}/{BUCKET}/{blob}?{sas}"
    error = assert_hidden(
        [_sig(sas)], lambda: storage.read_bytes(url, _options()), caplog, capsys, cli=url
    )
    assert isinstance(error, storage.AccessDenied), error


def test_sas_url_stall(request, azurite, caplog, capsys):
    blob = f"{uuid.uuid4().hex}/model.tensors"
    azurite.client().get_blob_client(BUCKET, blob).upload_blob(DATA)
    proxy = CuttingProxy(azurite.port, cut_after=64 * 1024, stall=True)
    request.addfinalizer(proxy.stop)
    sas = _sas(blob)
    url = f"http://127.0.0.1:{proxy.port}/{AZURITE_ACCOUNT}/{BUCKET}/{blob}?{sas}"
    error = assert_hidden(
        [_sig(sas)], lambda: storage.read_bytes(url, _options(timeout=0.5)), caplog, capsys
    )
    assert isinstance(error, storage.Unreachable), error


# -- az:// with a SAS: pasted onto the URI (refused), or given as the credential ------------


def test_az_uri_with_a_sas_is_refused_without_showing_it(azurite, caplog, capsys):
    blob = f"{uuid.uuid4().hex}/model.tensors"
    sas = _sas(blob)
    uri = f"az://{BUCKET}/{blob}?{sas}"
    options = _options(azure_connection_string=azurite.connection_string())
    error = assert_hidden([_sig(sas)], lambda: storage.read_bytes(uri, options), caplog, capsys)
    assert f"az://{BUCKET}/{blob}: az:// URIs take no signed query string" in str(error)


@pytest.mark.parametrize("fault", ["missing", "denied", "stall"])
def test_az_with_a_sas_credential(request, azurite, caplog, capsys, fault):
    """The SAS given as the credential (``azure_sas_token``): its signature is in no
    message (azure-core's own DEBUG lines included)."""
    blob = f"{uuid.uuid4().hex}/model.tensors"
    if fault != "missing":
        azurite.client().get_blob_client(BUCKET, blob).upload_blob(DATA)
    key = AZURITE_KEY if fault != "denied" else "d3Jvbmcta2V5LW5vdC1henVyaXRlcw=="
    sas = _sas(blob, key=key)
    port = azurite.port
    if fault == "stall":
        proxy = CuttingProxy(azurite.port, cut_after=64 * 1024, stall=True)
        request.addfinalizer(proxy.stop)
        port = proxy.port
    options = _options(
        azure_account_name=AZURITE_ACCOUNT,
        azure_sas_token=sas,
        azure_endpoint=f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}",
        timeout=0.5 if fault == "stall" else 10.0,
    )
    error = assert_hidden(
        [_sig(sas)], lambda: storage.read_bytes(f"az://{BUCKET}/{blob}", options), caplog, capsys
    )
    expected = {
        "missing": storage.NotFound,
        "denied": storage.AccessDenied,
        "stall": storage.Unreachable,
    }
    assert isinstance(error, expected[fault]), error


# -- an S3 presigned URL -----------------------------------------------------------------


def _presigned(client, key: str) -> tuple[str, list[str]]:
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    secrets = [query["X-Amz-Signature"], query["X-Amz-Credential"]]
    if "X-Amz-Security-Token" in query:
        secrets.append(query["X-Amz-Security-Token"])
    return url, secrets


def _moto_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
        aws_access_key_id="AKIAPRESIGNEDTEST",
        aws_secret_access_key="presign-secret",
        aws_session_token=AMZ_TOKEN,
    )


def test_presigned_url_missing_object(moto, caplog, capsys):
    url, secrets = _presigned(_moto_client(moto.endpoint), f"{uuid.uuid4().hex}/absent.tensors")
    assert AMZ_TOKEN in secrets
    error = assert_hidden(secrets, lambda: storage.read_bytes(url, _options()), caplog, capsys, url)
    assert isinstance(error, storage.NotFound), error


def test_presigned_url_access_denied(seaweed, caplog, capsys):
    key = f"{uuid.uuid4().hex}/model.tensors"
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=DATA)
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint,
        region_name="us-east-1",
        aws_access_key_id=seaweed.access_key_id,
        aws_secret_access_key="not-the-secret-0123456789",
        config=Config(signature_version="s3v4"),
    )
    url, secrets = _presigned(client, key)
    error = assert_hidden(secrets, lambda: storage.read_bytes(url, _options()), caplog, capsys, url)
    assert isinstance(error, storage.AccessDenied), error


def test_presigned_url_stall(request, moto, caplog, capsys):
    key = f"{uuid.uuid4().hex}/model.tensors"
    moto.client().put_object(Bucket=BUCKET, Key=key, Body=DATA)
    proxy = CuttingProxy(int(moto.endpoint.rsplit(":", 1)[1]), cut_after=64 * 1024, stall=True)
    request.addfinalizer(proxy.stop)
    url, secrets = _presigned(_moto_client(f"http://127.0.0.1:{proxy.port}"), key)
    error = assert_hidden(
        secrets, lambda: storage.read_bytes(url, _options(timeout=0.5)), caplog, capsys
    )
    assert isinstance(error, storage.Unreachable), error


# -- a GCS signed URL (fake-gcs-server's path-style downloads) ------------------------------


def _media(name: str) -> str:
    """The object's download path (fake-gcs-server serves path-style /BUCKET/NAME only to
    the storage.googleapis.com host name)."""
    return f"download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"


def _goog_signed(base: str) -> str:
    return (
        f"{base}&X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential={GOOG_CREDENTIAL}"
        f"&X-Goog-Date=20261207T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
        f"&X-Goog-Signature={GOOG_SIGNATURE}"
    )


def test_gcs_signed_url_missing_object(fake_gcs, caplog, capsys):
    url = _goog_signed(f"{fake_gcs.endpoint}/{_media(f'{uuid.uuid4().hex}/absent.tensors')}")
    error = assert_hidden(
        [GOOG_SIGNATURE, GOOG_CREDENTIAL],
        lambda: storage.read_bytes(url, _options()),
        caplog,
        capsys,
        url,
    )
    assert isinstance(error, storage.NotFound), error


def test_gcs_signed_url_stall(request, fake_gcs, caplog, capsys):
    name = f"{uuid.uuid4().hex}/model.tensors"
    fake_gcs.client().bucket(BUCKET).blob(name).upload_from_string(DATA)
    proxy = CuttingProxy(int(fake_gcs.endpoint.rsplit(":", 1)[1]), cut_after=64 * 1024, stall=True)
    request.addfinalizer(proxy.stop)
    url = _goog_signed(f"http://127.0.0.1:{proxy.port}/{_media(name)}")
    error = assert_hidden(
        [GOOG_SIGNATURE, GOOG_CREDENTIAL],
        lambda: storage.read_bytes(url, _options(timeout=0.5)),
        caplog,
        capsys,
    )
    assert isinstance(error, storage.Unreachable), error


# -- s3:// and gs:// URIs with a signed query pasted on -------------------------------------


def test_s3_uri_with_a_signed_query_is_refused_without_showing_it(moto, caplog, capsys):
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex}/m.tensors?X-Amz-Signature=S3URISECRET"
    options = _options(
        s3_endpoint=moto.endpoint,
        force_http=True,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    error = assert_hidden(["S3URISECRET"], lambda: storage.read_bytes(uri, options), caplog, capsys)
    assert "s3:// URIs take no signed query string" in str(error)


def test_gs_uri_with_a_signed_query_is_refused_without_showing_it(fake_gcs, caplog, capsys):
    uri = f"gs://{BUCKET}/{uuid.uuid4().hex}/m.tensors?X-Goog-Signature={GOOG_SIGNATURE}"
    options = _options(gcs_endpoint=fake_gcs.endpoint)
    error = assert_hidden(
        [GOOG_SIGNATURE], lambda: storage.read_bytes(uri, options), caplog, capsys
    )
    assert "gs:// URIs take no signed query string" in str(error)


# -- the redaction itself ---------------------------------------------------------------------


def test_redact_uri_keeps_the_path_and_drops_query_and_user_info():
    assert redact_uri("https://u:p@host:9/c/b.tensors?sv=1&sig=S") == "https://host:9/c/b.tensors"
    assert redact_uri("az://c/b?sig=S") == "az://c/b"
    assert redact_uri("/local/dir/model.tensors") == "/local/dir/model.tensors"
    assert storage.redact("gs://b/o?X-Goog-Signature=S") == "gs://b/o"
    assert "SECRET" not in redact_text("GET /o/absent.tensors%3FX-Goog-Signature%3DSECRET")


def test_redact_text_finds_secrets_in_any_text():
    text = (
        'GET "/c/b?sv=2024&sig=PATHSECRET" failed for https://h/x?X-Amz-Credential=C1 '
        "(AccountName=a;AccountKey=KEYSECRET==;SharedAccessSignature=sv=1&sig=SASSECRET)"
    )
    clean = redact_text(text)
    for secret in ("PATHSECRET", "C1", "KEYSECRET", "SASSECRET"):
        assert secret not in clean, clean
    assert "https://h/x" in clean and "AccountName=a" in clean


def test_an_error_made_with_a_signed_url_shows_none_of_it():
    error = StorageError("cannot read https://h/b?X-Goog-Signature=ERRSECRET: HTTP 500")
    assert "ERRSECRET" not in str(error) and "ERRSECRET" not in repr(error)
    assert str(error) == "cannot read https://h/b HTTP 500"  # the query runs to the space


def test_vllm_log_lines_are_redacted_once_the_plugin_is_registered(caplog, capfd):
    """vLLM's own lines (its engine config names the model URI) go to the ``vllm`` logger's
    handler where vLLM configures its logging, else to the root's: the plug-in redacts
    every ``vllm.*`` record as it is made, for both."""
    from vllm.logger import init_logger

    from tensorize_vllm_model.integrations.vllm import registration

    registration.register()
    init_logger("vllm.engine.redaction_test").warning(
        "config: model='https://h/m?sv=2024&sig=VLLMSECRET', tokenizer='x'"
    )
    out, err = capfd.readouterr()
    shown = out + err + caplog.text
    assert "VLLMSECRET" not in shown
    assert "config: model='https://h/m', tokenizer='x'" in shown
