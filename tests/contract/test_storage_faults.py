"""Remote storage failures give clear errors in bounded time and leave nothing half-written;
credentials are found in the documented order; the artifact cache is safe."""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest

from tensorize_vllm_model import (
    ConfigError,
    Stalled,
    StorageError,
    TensorizerConfig,
    Unreachable,
    storage,
)
from tensorize_vllm_model.artifacts.remote_files import fetch_model_files
from tensorize_vllm_model.storage import s3 as s3_backend
from tensorize_vllm_model.storage import s3_upload
from tests.support import BUCKET
from tests.support.places import s3_options
from tests.support.servers import CuttingProxy, HTTPFileServer, MotoServer, free_port


def test_unreachable_s3_endpoint_fails_fast():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint {endpoint}"):
        storage.read_bytes(f"s3://{BUCKET}/model.tensors", s3_options(endpoint, timeout=2.0))
    assert time.monotonic() - start < 30


def test_unreachable_http_server_fails_fast():
    url = f"http://127.0.0.1:{free_port()}/model.tensors"
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach {url}"):
        storage.open_read(url, {"timeout": 2.0})
    assert time.monotonic() - start < 10


def test_wrong_credentials_are_a_clear_403(tmp_path):
    server = MotoServer()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        server.client().put_object(Bucket=BUCKET, Key="m/model.tensors", Body=b"x" * 100)
        key_id, secret = server.enforce_auth()
        uri = f"s3://{BUCKET}/m/model.tensors"
        good = {
            "s3_endpoint": server.endpoint,
            "force_http": True,
            "s3_access_key_id": key_id,
            "s3_secret_access_key": secret,
        }
        assert storage.read_bytes(uri, good) == b"x" * 100
        bad = {**good, "s3_secret_access_key": "not-the-secret"}
        with pytest.raises(
            StorageError,
            match=r"access denied reading s3://models/m/model.tensors "
            r"\(HTTP 403",
        ) as info:
            storage.read_bytes(uri, bad)
        assert "not-the-secret" not in str(info.value)
        assert secret not in str(info.value)
    finally:
        server.stop()


def test_missing_object_and_bucket(moto):
    options = s3_options(moto.endpoint)
    with pytest.raises(StorageError, match=rf"no such object: s3://{BUCKET}/nope/model.tensors"):
        storage.read_bytes(f"s3://{BUCKET}/nope/model.tensors", options)
    with pytest.raises(StorageError, match=r"no such bucket: no-such-bucket"):
        storage.read_bytes("s3://no-such-bucket/model.tensors", options)


def test_http_404(web_root):
    server = HTTPFileServer(web_root)
    try:
        with pytest.raises(StorageError, match=r"not found: .*/absent.tensors \(HTTP 404\)"):
            storage.open_read(f"{server.url}/absent.tensors")
    finally:
        server.stop()


def test_http_connection_dropped_mid_file(web_root):
    (web_root / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    server = HTTPFileServer(web_root)
    proxy = CuttingProxy(server.port, cut_after=1024 * 1024)  # every connection dies at 1 MiB
    try:
        start = time.monotonic()
        with storage.open_read(
            f"http://127.0.0.1:{proxy.port}/big.bin", {"chunk_size": 4 * 1024 * 1024}
        ) as f:
            with pytest.raises(StorageError, match=r"failed at bytes 0-4194303 after 3 attempts"):
                f.read()
        assert time.monotonic() - start < 30
        assert proxy.cuts >= 3
    finally:
        proxy.stop()
        server.stop()


def test_connection_dropped_in_the_middle_of_the_tensors(web_root):
    """A real tensors file over HTTP; the link dies after its header: a StorageError naming
    the URL, not a decoding error, a hang or a half-loaded module."""
    import torch

    from tensorize_vllm_model import load_into_module, open_tensors
    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors
    from tensorize_vllm_model.read.modules import meta_parameters

    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    path = web_root / "cut.tensors"
    write_tensors(
        str(path),
        [(n, p.detach(), False) for n, p in model.named_parameters()],
        record=FileRecord(),
    ).commit()
    server = HTTPFileServer(web_root)
    proxy = CuttingProxy(server.port, cut_after=path.stat().st_size // 2, for_good=True)
    url = f"http://127.0.0.1:{proxy.port}/cut.tensors"
    try:
        start = time.monotonic()
        with meta_parameters("cpu"):
            target = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
        with pytest.raises(StorageError, match=rf"reading {url} failed at bytes"):
            with open_tensors(
                url,
                config=TensorizerConfig(
                    tensorizer_uri=url, stream_kwargs={"chunk_size": 2 * 1024 * 1024}
                ),
            ) as reader:
                load_into_module(target, reader)
        assert time.monotonic() - start < 30
    finally:
        proxy.stop()
        server.stop()


def test_http_1_0_connection_dropped_mid_file(web_root):
    (web_root / "big10.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    server = HTTPFileServer(web_root, protocol="HTTP/1.0", ranges=False)
    proxy = CuttingProxy(server.port, cut_after=1024 * 1024)
    try:
        with storage.open_read(f"http://127.0.0.1:{proxy.port}/big10.bin") as f:
            with pytest.raises(StorageError, match=r"the connection ended at byte"):
                f.read()
    finally:
        proxy.stop()
        server.stop()


def test_s3_connection_dropped_mid_object(moto):
    key = f"{uuid.uuid4().hex}/big.bin"
    moto.client().put_object(Bucket=BUCKET, Key=key, Body=os.urandom(5 * 1024 * 1024))
    proxy = CuttingProxy(moto.port, cut_after=2 * 1024 * 1024)
    try:
        start = time.monotonic()
        with storage.open_read(
            f"s3://{BUCKET}/{key}", s3_options(f"http://127.0.0.1:{proxy.port}", timeout=5.0)
        ) as f:
            with pytest.raises(StorageError, match=rf"reading s3://{BUCKET}/{key} failed at bytes"):
                f.read()
        assert time.monotonic() - start < 60
    finally:
        proxy.stop()


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 12 * 1024 * 1024], ids=["single", "multipart"])
def test_failed_upload_leaves_no_object(moto, monkeypatch, size):
    monkeypatch.setattr(s3_upload, "_PART_SIZE", 5 * 1024 * 1024)  # moto's minimum part size
    key = f"{uuid.uuid4().hex}/model.tensors"
    proxy = CuttingProxy(moto.port, cut_after=size // 2, direction="up", for_good=True)
    options = s3_options(f"http://127.0.0.1:{proxy.port}", timeout=5.0)
    try:
        tx = storage.transaction(options)
        staged = tx.stage(f"s3://{BUCKET}/{key}")
        with open(staged.path, "wb") as f:
            f.write(os.urandom(size))
        with pytest.raises(StorageError, match=rf"s3://{BUCKET}/{key}") as info:
            tx.commit()  # a failed commit rolls back: the staged file is removed
        assert not os.path.exists(staged.path)
    finally:
        proxy.stop()
    client = moto.client()
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=key)
    pending = [
        u
        for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if u["Key"] == key
    ]
    if size > 5 * 1024 * 1024:
        # The link stayed down, so the abort could not reach the server either: say so.
        assert len(pending) == 1
        assert f"aborting the incomplete multipart upload {pending[0]['UploadId']} failed" in str(
            info.value
        )
        client.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=pending[0]["UploadId"])


@pytest.mark.parametrize("link", ["down for good", "up"])
def test_a_failed_upload_publishes_nothing_of_its_transaction(moto, monkeypatch, link):
    """A model's small files (config) are published before its tensors file, but every
    file's bytes are sent first (the tensors' multipart parts, not completed): when the
    tensors' upload fails, nothing of the transaction was published, even with the store
    unreachable afterwards (no rollback is needed), and the earlier model is intact.

    Stand-in (link "up"): a disk I/O error cannot be made to happen for real, so reading
    the staged file's second part is made to fail; the S3 server and its requests are real.
    """
    monkeypatch.setattr(s3_upload, "_PART_SIZE", 5 * 1024 * 1024)  # moto's minimum part
    prefix = f"{uuid.uuid4().hex}/vllm/m/v1"
    client = moto.client()
    before = {"config.json": b'{"old": true}', "model.tensors": os.urandom(1024)}
    for name, body in before.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    size = 12 * 1024 * 1024
    proxy = CuttingProxy(moto.port, cut_after=size // 2, direction="up", for_good=True)
    port = proxy.port if link == "down for good" else moto.port
    tx = storage.transaction(s3_options(f"http://127.0.0.1:{port}", timeout=5.0))
    try:
        config = tx.stage(f"s3://{BUCKET}/{prefix}/config.json")
        with open(config.path, "wb") as f:
            f.write(b'{"new": true}')
        tensors = tx.stage(f"s3://{BUCKET}/{prefix}/model.tensors", last=True)
        with open(tensors.path, "wb") as f:
            f.write(os.urandom(size))
        if link == "up":
            real_open = open

            def failing_open(path, *args, **kwargs):
                if path == tensors.path and "rb" in args and failing_open.calls >= 1:
                    raise OSError(5, "Input/output error")
                failing_open.calls += path == tensors.path
                return real_open(path, *args, **kwargs)

            failing_open.calls = 0
            monkeypatch.setattr("builtins.open", failing_open)
        with pytest.raises(StorageError, match=rf"s3://{BUCKET}/{prefix}/model.tensors"):
            tx.commit()
        monkeypatch.undo()
    finally:
        proxy.stop()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"{prefix}/{n}" for n in sorted(before)]
    for name, body in before.items():
        assert client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read() == body
    assert not os.path.exists(config.path) and not os.path.exists(tensors.path)
    pending = [
        u
        for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if u["Key"].startswith(prefix)
    ]
    # with the link down the abort cannot reach the store either (the error says so)
    assert len(pending) == (1 if link == "down for good" else 0)
    for upload in pending:
        client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


def test_failed_multipart_upload_is_aborted(moto, monkeypatch):
    """A part fails while the server stays reachable: the upload is aborted, nothing is left.

    Stand-in: a disk I/O error cannot be made to happen here for real, so reading the staged
    file's third part is made to fail; the S3 server and every request to it are real.
    """
    monkeypatch.setattr(s3_upload, "_PART_SIZE", 5 * 1024 * 1024)
    key = f"{uuid.uuid4().hex}/model.tensors"
    tx = storage.transaction(s3_options(moto.endpoint))
    staged = tx.stage(f"s3://{BUCKET}/{key}")
    with open(staged.path, "wb") as f:
        f.write(os.urandom(11 * 1024 * 1024))
    sent = []
    real_open = open

    def failing_open(path, *args, **kwargs):  # the third part's read fails (a disk error)
        if path == staged.path and len(sent) >= 2:
            raise OSError(5, "Input/output error")
        sent.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/{key}") as info:
        tx.commit()
    monkeypatch.undo()
    assert "aborting" not in str(info.value)
    client = moto.client()
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=key)
    assert not [
        u
        for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if u["Key"] == key
    ]


def test_plain_http_endpoint_refused_unless_allowed(moto):
    uri = f"s3://{BUCKET}/x"
    options = {k: v for k, v in s3_options(moto.endpoint).items() if k != "force_http"}
    with pytest.raises(ConfigError, match=r'plain http://.*--allow-http.*"force_http": true'):
        storage.read_bytes(uri, options)
    config = TensorizerConfig(
        tensorizer_uri=uri, s3_endpoint=moto.endpoint, stream_kwargs={"force_http": True}
    )
    assert config.options.get("force_http") is True


def test_tls_without_the_private_ca(tls, web_root):
    (web_root / "tls.bin").write_bytes(b"secret bytes")
    server = HTTPFileServer(web_root, tls=tls)
    try:
        with pytest.raises(
            StorageError, match=r"TLS failed for https://127.0.0.1:\d+/tls.bin.*--ca-bundle"
        ):
            storage.read_bytes(f"{server.url}/tls.bin")
        assert (
            storage.read_bytes(f"{server.url}/tls.bin", {"ca_bundle": str(tls.ca)})
            == b"secret bytes"
        )
    finally:
        server.stop()


def test_signed_url_query_never_in_messages(web_root):
    server = HTTPFileServer(web_root)
    try:
        url = f"{server.url}/absent.tensors?X-Amz-Signature=SECRETSIGNATURE&X-Amz-Credential=AKID"
        with pytest.raises(StorageError) as info:
            storage.open_read(url)
        assert "SECRETSIGNATURE" not in str(info.value) and "AKID" not in str(info.value)
    finally:
        server.stop()


# -- credentials order -------------------------------------------------------------------------


def resolved(config: TensorizerConfig):
    client, how = s3_backend._client(config.options)
    credentials = client._request_signer._credentials  # botocore's; read for the test only
    return how, credentials


def resolved_after_setting(monkeypatch, config: TensorizerConfig, **env: str):
    """`resolved` once the environment variables `env` are set (and cached clients dropped)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3_backend._clients.clear()
    return resolved(config)


def test_credentials_order(clean_env, monkeypatch):
    home = clean_env
    (home / ".s3cfg").write_text(
        "[default]\naccess_key = from-s3cfg\nsecret_key = s3cfg-secret\n"
        "host_base = s3cfg.example.com\n"
    )
    base = {"tensorizer_uri": "s3://b/k"}

    how, creds = resolved(TensorizerConfig(**base))
    assert creds.access_key == "from-s3cfg" and how.credentials == "~/.s3cfg"
    assert how.endpoint == "https://s3cfg.example.com"

    how, creds = resolved_after_setting(
        monkeypatch,
        TensorizerConfig(**base),
        AWS_ACCESS_KEY_ID="from-aws-env",
        AWS_SECRET_ACCESS_KEY="aws-secret",
        AWS_SESSION_TOKEN="sts-token",
    )
    assert (creds.access_key, creds.token) == ("from-aws-env", "sts-token")
    assert how.credentials == "the AWS credential chain"

    how, creds = resolved_after_setting(
        monkeypatch,
        TensorizerConfig(**base),
        S3_ACCESS_KEY_ID="from-s3-env",
        S3_SECRET_ACCESS_KEY="s3-env-secret",
        S3_ENDPOINT_URL="https://s3-env.example.com",
    )
    assert creds.access_key == "from-s3-env" and how.endpoint == "https://s3-env.example.com"

    s3_backend._clients.clear()
    how, creds = resolved(
        TensorizerConfig(**base, s3_access_key_id="from-flag", s3_secret_access_key="flag-secret")
    )
    assert creds.access_key == "from-flag"

    s3_backend._clients.clear()
    how, creds = resolved(TensorizerConfig(**base, s3_access_key_id="", s3_secret_access_key=""))
    assert creds is None and how.credentials.startswith("anonymous")


# -- the artifact cache --------------------------------------------------------------------------


def test_fetch_takes_only_artifacts_and_stays_in_the_cache(moto, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    prefix = uuid.uuid4().hex
    client = moto.client()
    for key, body in {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "model.tensors": b"weights",
        "model.safetensors": b"weights",
        ".hidden.json": b"{}",
        "sub/inner.json": b"{}",
        "../escape.json": b"{}",
        "..json": b"{}",
        "a\\..\\b.json": b"{}",
        "model.key": b"k" * 32,
    }.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    local = fetch_model_files(f"s3://{BUCKET}/{prefix}", s3_options(moto.endpoint))
    assert sorted(os.listdir(local)) == ["config.json", "sub", "tokenizer.json"]
    assert os.path.dirname(local) == str(tmp_path / "cache" / "models")
    everything = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert sorted(everything) == sorted(
        os.path.join(local, n) for n in ("config.json", "sub/inner.json", "tokenizer.json")
    )


def test_fetch_failure_leaves_no_partial_cache(moto, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    prefix = uuid.uuid4().hex
    moto.client().put_object(Bucket=BUCKET, Key=f"{prefix}/tokenizer.json", Body=b"{}")
    with pytest.raises(StorageError, match=r"holds no config.json"):
        fetch_model_files(f"s3://{BUCKET}/{prefix}", s3_options(moto.endpoint))
    assert not (tmp_path / "cache" / "models").exists() or not os.listdir(
        tmp_path / "cache" / "models"
    )


def test_fetch_failing_mid_way_leaves_the_cache_as_it_was(tmp_path, monkeypatch):
    """A fetch that fails after some files were written (a file the writer's list names is
    gone, over real HTTP) leaves no partial directory, and an earlier whole copy stays as it
    was."""
    from tensorize_vllm_model.artifacts.model_files import MANIFEST

    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    (served / "config.json").write_bytes(b'{"model_type": "llama"}')
    (served / "tokenizer.json").write_bytes(b"{}")
    (served / MANIFEST).write_text('{"files": ["config.json", "tokenizer.json"]}')
    server = HTTPFileServer(served)
    try:
        local = fetch_model_files(server.url)
        assert sorted(os.listdir(local)) == ["config.json", "tokenizer.json"]
        (served / "config.json").write_bytes(b'{"model_type": "changed"}')
        (served / "tokenizer.json").unlink()  # fetched after config.json
        with pytest.raises(StorageError, match=r"tokenizer.json"):
            fetch_model_files(server.url)
    finally:
        server.stop()
    assert os.listdir(tmp_path / "cache" / "models") == [os.path.basename(local)]
    assert sorted(os.listdir(local)) == ["config.json", "tokenizer.json"]
    assert (tmp_path / "cache" / "models" / local / "config.json").read_bytes() == (
        b'{"model_type": "llama"}'
    )


@pytest.mark.parametrize("ranges", [False, True], ids=["one-response", "ranges"])
@pytest.mark.parametrize("store", ["http", "s3"])
def test_a_stall_after_data_says_how_many_bytes_arrived(web_root, moto, store, ranges):
    """A server that stops sending after 2 MiB (and answers nothing after that) is reported
    as a stall after so many bytes, not as unreachable: HTTP and S3, one response and
    parallel ranges."""
    data = os.urandom(6 * 1024 * 1024)
    name = f"{uuid.uuid4().hex}.bin"
    server = None
    if store == "http":
        (web_root / name).write_bytes(data)
        server = HTTPFileServer(web_root)
        proxy = CuttingProxy(server.port, cut_after=2 * 1024 * 1024, for_good=True, stall=True)
        uri, options = f"http://127.0.0.1:{proxy.port}/{name}", {}
    else:
        moto.client().put_object(Bucket=BUCKET, Key=name, Body=data)
        proxy = CuttingProxy(moto.port, cut_after=2 * 1024 * 1024, for_good=True, stall=True)
        uri, options = f"s3://{BUCKET}/{name}", s3_options(f"http://127.0.0.1:{proxy.port}")
    options.update(timeout=1.0, ranges=ranges, chunk_size=4 * 1024 * 1024, workers=1)
    try:
        with storage.open_read(uri, options) as f, pytest.raises(StorageError) as failure:
            f.read()
    finally:
        proxy.stop()
        if server:
            server.stop()
    text = str(failure.value)
    assert "cannot reach" not in text
    # A stall is in transit: one response reports it as such; ranges give up after retries.
    assert isinstance(failure.value, Unreachable)
    assert isinstance(failure.value, Stalled) != ranges
    if ranges:
        # The first 4 MiB range stalls part-way; the retries find no answer.
        found = re.search(
            r"failed at bytes 0-4194303 after 3 attempts \(the connection[^)]* "
            r"dropped or timed out\): the (server|endpoint) stalled after sending (\d+) of "
            r"4194304 bytes \(no data for 1 s\)",
            text,
        )
    else:
        found = re.search(
            r": the transfer stalled after (\d+) of 6291456 bytes \(no data for "
            r"1 s\)",
            text,
        )
    assert found, text
    assert 0 < int(found.groups()[-1]) <= 2 * 1024 * 1024, text
