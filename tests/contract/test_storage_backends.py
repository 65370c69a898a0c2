"""One set of storage cases, run against every backend through real servers on loopback:
local files, S3 (moto) over HTTP and over HTTPS with a private CA, S3 served by SeaweedFS (a
real object store that enforces credentials and serves byte ranges), and an HTTP file server
speaking HTTP/1.1 with byte ranges, HTTP/1.0 without them, and HTTPS."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import torch

from tensorize_vllm_model import (
    AccessDenied,
    AlreadyExists,
    NotFound,
    StorageError,
    TensorizerConfig,
    Unreachable,
    load_into_module,
    open_tensors,
    storage,
)
from tensorize_vllm_model.format.keys import generate_key
from tensorize_vllm_model.format.record import FileRecord
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.read.modules import meta_parameters
from tests.support import BUCKET

PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)


def test_read_bytes(place):
    place.put("blob.bin", PAYLOAD)
    assert storage.read_bytes(place.uri("blob.bin"), place.options) == PAYLOAD


def test_stream_with_seeks_and_small_chunks(place):
    place.put("blob.bin", PAYLOAD)
    options = {**place.options, "chunk_size": 64 * 1024, "workers": 3}
    with storage.open_read(place.uri("blob.bin"), options) as f:
        assert f.read(10) == PAYLOAD[:10]
        f.seek(1_000_000)
        assert f.read(100_000) == PAYLOAD[1_000_000:1_100_000]
        f.seek(5)
        assert f.read(70_000) == PAYLOAD[5:70_005]
        f.seek(-20, os.SEEK_END)
        assert f.read() == PAYLOAD[-20:]
        assert f.read(5) == b""


def test_missing_file_is_named(place):
    uri = place.uri("absent.tensors")
    with pytest.raises(StorageError, match=r"no such|not found") as info:
        storage.read_bytes(uri, place.options)
    assert storage.redact(uri) in str(info.value)
    assert not storage.exists(uri, place.options)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 512)
        self.b = torch.nn.Linear(512, 64, bias=False)


def _tensors_file(tmp_path: Path, key: bytes | None = None) -> tuple[Small, bytes]:
    torch.manual_seed(1)
    model = Small()
    path = tmp_path / "local-copy.tensors"
    write_tensors(
        str(path),
        [(n, p.detach(), False) for n, p in model.named_parameters()],
        record=FileRecord(architecture="Small"),
        key=key,
    ).commit()
    return model, path.read_bytes()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_tensors_stream_from_backend(place, tmp_path, encrypted):
    key = generate_key() if encrypted else None
    source, data = _tensors_file(tmp_path, key)
    place.put("model.tensors", data)
    values = {"tensorizer_uri": place.uri("model.tensors"), "stream_kwargs": {}}
    for name, value in place.options.items():
        if name.startswith("s3_") or name == "ca_bundle":
            values[name] = value
        else:
            values["stream_kwargs"][name] = value
    if key:
        place.put("keys/model.key", key)  # the key lives beside the model, on the same store
        values["encryption_keyfile"] = place.uri("keys/model.key")
    config = TensorizerConfig(**values, num_readers=2)
    with meta_parameters("cpu"):
        target = Small()
    with open_tensors(config.tensorizer_uri, config=config) as reader:
        assert reader.record.architecture == "Small"
        stats = load_into_module(target, reader)
    assert stats.tensors == 3
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_staged_write_published_only_on_commit(place):
    if not place.writable:
        with pytest.raises(Exception, match="read-only"):
            storage.transaction(place.options).stage(place.uri("out.bin"))
        return
    uri = place.uri("sub/out.bin")
    with storage.transaction(place.options) as tx:
        staged = tx.stage(uri)
        with open(staged.path, "wb") as f:
            f.write(PAYLOAD)
        assert not storage.exists(uri, place.options)
    assert storage.read_bytes(uri, place.options) == PAYLOAD
    assert not os.path.exists(staged.path)
    tx = storage.transaction(place.options)
    aborted = tx.stage(place.uri("sub/never.bin"))
    with open(aborted.path, "wb") as f:
        f.write(b"half")
    tx.rollback()
    assert not storage.exists(place.uri("sub/never.bin"), place.options)


def test_listing(place):
    place.put("dir/config.json", b"{}")
    place.put("dir/model.tensors", b"x")
    place.put("dir/deeper/inner.json", b"{}")
    names = storage.list_names(place.uri("dir"), place.options)
    if place.name.startswith("http"):
        assert names is None  # HTTP cannot list a directory
    else:
        assert names == ["config.json", "model.tensors"]


def test_recursive_listing(place):
    """Every file below a directory, as relative paths: what the remote model-files cache
    fetches (``additional_chat_templates/``, sentence-transformers module directories)."""
    place.put("rdir/config.json", b"{}")
    place.put("rdir/deeper/inner.json", b"{}")
    place.put("rdir/deeper/still/tool_use.jinja", b"x")
    place.put("rdir-sibling/other.json", b"{}")
    names = storage.list_names(place.uri("rdir"), place.options, recursive=True)
    if place.name.startswith("http"):
        assert names is None
    else:
        assert names == ["config.json", "deeper/inner.json", "deeper/still/tool_use.jinja"]


def test_sequential_reads_when_ranges_are_off(place):
    place.put("blob.bin", PAYLOAD)
    options = {**place.options, "ranges": False}
    with storage.open_read(place.uri("blob.bin"), options) as f:
        assert f.read(10) == PAYLOAD[:10]
        f.seek(2_000_000)
        assert f.read(100_000) == PAYLOAD[2_000_000:2_100_000]
        f.seek(0)
        assert f.read() == PAYLOAD


def test_seaweedfs_refuses_a_wrong_secret(seaweed):
    """moto accepts any signature by default; SeaweedFS checks it against its s3.json."""
    key = f"{uuid.uuid4().hex}/model.tensors"
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=b"x" * 100)
    uri = f"s3://{BUCKET}/{key}"
    good = {
        "s3_endpoint": seaweed.endpoint,
        "force_http": True,
        "s3_access_key_id": seaweed.access_key_id,
        "s3_secret_access_key": seaweed.secret_access_key,
    }
    assert storage.read_bytes(uri, good) == b"x" * 100
    bad = {**good, "s3_secret_access_key": "not-the-secret"}
    with pytest.raises(StorageError, match=rf"access denied reading {uri} \(HTTP 403") as info:
        storage.read_bytes(uri, bad)
    assert "not-the-secret" not in str(info.value)
    assert seaweed.secret_access_key not in str(info.value)
    with pytest.raises(StorageError, match="HTTP 403"):
        storage.read_bytes(uri, {**good, "s3_access_key_id": "nobody"})


def test_seaweedfs_parallel_range_reads(seaweed):
    """Many range GETs in flight at once, each answered with only its bytes: what moto
    cannot do at speed (it reads the whole object for every range)."""
    data = os.urandom(48 * 1024 * 1024 + 4321)
    key = f"{uuid.uuid4().hex}/big.bin"
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=data)
    options = {
        "s3_endpoint": seaweed.endpoint,
        "force_http": True,
        "s3_access_key_id": seaweed.access_key_id,
        "s3_secret_access_key": seaweed.secret_access_key,
        "chunk_size": 1024 * 1024,
        "workers": 8,
    }
    with storage.open_read(f"s3://{BUCKET}/{key}", options) as f:
        assert f.read() == data
        f.seek(17 * 1024 * 1024 + 5)
        assert f.read(9 * 1024 * 1024) == data[17 * 1024 * 1024 + 5 : 26 * 1024 * 1024 + 5]
    ranges = [
        (start, min(len(data), start + 4 * 1024 * 1024) - 1)
        for start in range(0, len(data), 4 * 1024 * 1024)
    ]
    client = seaweed.client()

    def get(span):
        reply = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={span[0]}-{span[1]}")
        assert reply["ContentRange"] == f"bytes {span[0]}-{span[1]}/{len(data)}"
        return reply["Body"].read()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        assert b"".join(pool.map(get, ranges)) == data


def test_one_response_reads_keep_the_first_bytes(web_root):
    from tensorize_vllm_model.storage.ranged import KEEP_BYTES
    from tests.support.servers import HTTPFileServer

    data = os.urandom(KEEP_BYTES + 2 * 1024 * 1024)
    (web_root / "kept.bin").write_bytes(data)
    server = HTTPFileServer(web_root, protocol="HTTP/1.0", ranges=False)
    try:
        with storage.open_read(f"{server.url}/kept.bin") as f:
            # Whole responses (the probe for the size and range support asks for byte 0).
            def gets():
                return sum(
                    1 for method, _, ask in server.requests if method == "GET" and ask is None
                )

            assert f.read(10) == data[:10]
            f.seek(0)  # a check, then the header from byte 0: the same response
            assert f.read(100) == data[:100]
            f.seek(0)
            assert f.read(KEEP_BYTES + 10) == data[: KEEP_BYTES + 10]
            f.seek(5)
            assert f.read(KEEP_BYTES - 5) == data[5:KEEP_BYTES]
            f.seek(KEEP_BYTES + 1024 * 1024)  # forward: read and dropped
            assert f.read(10) == data[KEEP_BYTES + 1024 * 1024 :][:10]
            assert gets() == 1
            f.seek(KEEP_BYTES + 20)  # back past the kept bytes: a new response
            assert f.read(30) == data[KEEP_BYTES + 20 : KEEP_BYTES + 50]
            assert gets() == 2
            f.seek(KEEP_BYTES - 4)  # straddles the kept end: the rest from the new response
            assert f.read(8) == data[KEEP_BYTES - 4 : KEEP_BYTES + 4]
            assert gets() == 3
    finally:
        server.stop()


def test_a_load_over_one_response_takes_one_request(web_root):
    from tests.support.servers import HTTPFileServer

    tensors = {"w": torch.randn(300, 500), "b": torch.arange(7)}
    write_tensors(
        str(web_root / "one.tensors"),
        [(n, t, False) for n, t in tensors.items()],
        record=FileRecord(),
    ).commit()
    server = HTTPFileServer(web_root, protocol="HTTP/1.0", ranges=False)
    whole = lambda: [r for r in server.requests if r[0] == "GET" and r[2] is None]  # noqa: E731
    try:
        with open_tensors(f"{server.url}/one.tensors") as reader:
            # The file check, the header and the index: one response (besides the size
            # probe), which then goes on with the tensors.
            assert len(whole()) == 1
            got = dict(reader.items())
            assert whole() == [("GET", "/one.tensors", None)]
            again = dict(reader.items())  # that response is spent: a new one
            assert whole() == [("GET", "/one.tensors", None)] * 2
        for name, tensor in tensors.items():
            assert torch.equal(got[name], tensor) and torch.equal(again[name], tensor)
    finally:
        server.stop()


# -- typed errors: the same kind of error from every backend ------------------------------


def test_missing_file_is_not_found(place):
    """NoSuchKey / HTTP 404 / ENOENT all arrive as `NotFound` naming the URI."""
    uri = place.uri("absent/model.tensors")
    with pytest.raises(NotFound, match=re.escape(storage.redact(uri))):
        storage.read_bytes(uri, place.options)
    with pytest.raises(NotFound, match=re.escape(storage.redact(uri))):
        storage.open_read(uri, place.options)
    assert not storage.exists(uri, place.options)


def test_missing_bucket_is_not_found(place):
    scheme = {"gcs": "gs", "azure": "az"}.get(place.name, "s3")
    if place.name == "local" or place.name.startswith("http"):
        pytest.skip("buckets (containers) are object stores'")
    what = "container" if scheme == "az" else "bucket"
    uri = f"{scheme}://no-such-bucket-here/model.tensors"
    with pytest.raises(NotFound, match=f"no such {what}: no-such-bucket-here"):
        storage.read_bytes(uri, place.options)
    with pytest.raises(NotFound, match=f"no such {what}: no-such-bucket-here"):
        storage.check_writable(f"{scheme}://no-such-bucket-here/dir", place.options)


def test_refused_access_is_access_denied(place, request):
    """HTTP 403 / S3 403 (a wrong secret) / EACCES all arrive as `AccessDenied`."""
    if place.name == "local":
        # sysfs refuses new files to everyone, root included
        with pytest.raises(AccessDenied, match="cannot write into /sys"):
            storage.transaction().stage("/sys/model.tensors")
        return
    if place.name.startswith("http"):
        place.put("forbidden-model.tensors", b"x")  # the test server answers 403 for it
        uri = place.uri("forbidden-model.tensors")
        with pytest.raises(
            AccessDenied, match=re.escape(f"access denied to {storage.redact(uri)}")
        ):
            storage.read_bytes(uri, place.options)
        return
    if place.name == "gcs":
        pytest.skip("fake-gcs-server checks no credentials: it cannot answer 403")
    if place.name == "azure":  # Azurite checks shared-key signatures: a wrong key is refused
        place.put("model.tensors", b"x")
        wrong = request.getfixturevalue("azurite").connection_string(key="d3Jvbmcta2V5" * 8)
        with pytest.raises(AccessDenied, match=r"access denied reading az://.*HTTP 403"):
            storage.read_bytes(place.uri("model.tensors"), {"azure_connection_string": wrong})
        return
    # moto accepts any signature (its shared server runs without auth): the S3 API's 403 is
    # taken from SeaweedFS, which checks every signature, whatever the place's server is.
    seaweed = request.getfixturevalue("seaweed")
    key = f"{uuid.uuid4().hex}/model.tensors"
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=b"x")
    options = {
        "s3_endpoint": seaweed.endpoint,
        "force_http": True,
        "s3_access_key_id": seaweed.access_key_id,
        "s3_secret_access_key": "not-the-secret",
    }
    with pytest.raises(AccessDenied, match=rf"access denied reading s3://{BUCKET}/{key}"):
        storage.read_bytes(f"s3://{BUCKET}/{key}", options)


def test_no_server_is_unreachable(place):
    """Nothing listening at the endpoint: `Unreachable`, naming it."""
    from tests.support.servers import free_port

    if place.name == "local":
        pytest.skip("a local file has no endpoint")
    port = free_port()
    if place.name.startswith("s3"):
        options = {**place.options, "s3_endpoint": f"http://127.0.0.1:{port}", "timeout": 2.0}
        options.pop("ca_bundle", None)
        options["force_http"] = True
        uri = place.uri("model.tensors")
    elif place.name == "gcs":
        options = {"gcs_endpoint": f"http://127.0.0.1:{port}", "timeout": 2.0}
        uri = place.uri("model.tensors")
    elif place.name == "azure":
        endpoint = place.options["azure_connection_string"]
        endpoint = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", endpoint)
        options = {"azure_connection_string": endpoint, "timeout": 2.0}
        uri = place.uri("model.tensors")
    else:
        options = {"timeout": 2.0}
        uri = f"http://127.0.0.1:{port}/model.tensors"
    with pytest.raises(Unreachable, match=f"127.0.0.1:{port}"):
        storage.read_bytes(uri, options)


def test_write_that_must_not_replace_is_already_exists(place):
    if not place.writable:
        pytest.skip("read-only")
    place.put("tx/model.key", b"theirs")
    uri = place.uri("tx/model.key")
    tx = storage.transaction(place.options)
    staged = tx.stage(uri, replace=False)
    with open(staged.path, "wb") as f:
        f.write(b"ours")
    with pytest.raises(AlreadyExists, match=re.escape(f"{uri} already exists")):
        tx.commit()
    assert storage.read_bytes(uri, place.options) == b"theirs"
    assert not os.path.exists(staged.path)


# -- transactions: everything published, or nothing changed --------------------------------


class Boom(Exception):
    pass


def _write(tx: storage.Transaction, uri: str, data: bytes, **kwargs) -> storage.StagedWrite:
    staged = tx.stage(uri, **kwargs)
    with open(staged.path, "wb") as f:
        f.write(data)
    return staged


@pytest.mark.parametrize("failure", [Boom, KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("when", ["before-publish", "after-publish"])
def test_transaction_rolls_back_on_any_failure(place, failure, when):
    """An exception, Ctrl-C or exit inside the block: the earlier file is back (same bytes),
    the new one is gone, no temporary or kept copy is left, and `on_rollback` ran."""
    if not place.writable:
        pytest.skip("read-only")
    place.put("tx/a.bin", b"earlier")
    undone: list[str] = []
    staged: list[storage.StagedWrite] = []
    with pytest.raises(failure):
        with storage.transaction(place.options) as tx:
            tx.on_rollback(lambda: undone.append("workers"))
            staged.append(_write(tx, place.uri("tx/a.bin"), b"replaced"))
            staged.append(_write(tx, place.uri("tx/b.bin"), b"new"))
            if when == "after-publish":
                tx.publish()
                assert storage.read_bytes(place.uri("tx/a.bin"), place.options) == b"replaced"
                assert storage.read_bytes(place.uri("tx/b.bin"), place.options) == b"new"
            raise failure()
    assert storage.read_bytes(place.uri("tx/a.bin"), place.options) == b"earlier"
    assert not storage.exists(place.uri("tx/b.bin"), place.options)
    assert storage.list_names(place.uri("tx"), place.options) == ["a.bin"]
    assert not [s.path for s in staged if os.path.exists(s.path)]
    assert undone == ["workers"] and tx.closed


def test_transaction_publishes_in_order_with_last_at_the_end(place, monkeypatch):
    if not place.writable:
        pytest.skip("read-only")
    published: list[str] = []
    real = storage.StagedWrite.commit

    def commit(self):
        published.append(self.uri)
        real(self)

    monkeypatch.setattr(storage.StagedWrite, "commit", commit)
    place.put("tx/config.json", b"old")
    with storage.transaction(place.options) as tx:
        _write(tx, place.uri("tx/model.tensors"), b"T", last=True)
        _write(tx, place.uri("tx/config.json"), b"C")
        _write(tx, place.uri("tx/model.key"), b"K" * 32, mode=0o600, replace=False)
    names = ["config.json", "model.key", "model.tensors"]
    assert published == tx.uris == [place.uri(f"tx/{n}") for n in names]
    assert storage.list_names(place.uri("tx"), place.options) == names  # kept copy dropped
    assert storage.read_bytes(place.uri("tx/config.json"), place.options) == b"C"


def test_transaction_left_open_is_rolled_back_at_exit(tmp_path):
    """A worker stages in one call and commits in another; if its process exits in between
    (an interrupted engine), the staged files are removed at exit."""
    import subprocess
    import sys

    from tests.support.commands import subprocess_env

    script = (
        "from tensorize_vllm_model import storage\n"
        f"tx = storage.transaction()\n"
        f"s = tx.stage({str(tmp_path / 'model.tensors')!r})\n"
        "open(s.path, 'wb').write(b'x')\n"
        "print(s.path)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(tmp_path))
    assert os.listdir(tmp_path) == []
