"""The storage contract's fault cases, run the same way against every remote backend on its
real server (S3 on moto and SeaweedFS, Google Cloud Storage on fake-gcs-server, Azure Blob on
Azurite, HTTP), each reached through a proxy on loopback that drops, cuts, throttles or
stalls on cue (tests/support/servers.py): requests counted per retry, a dropped connection, a stall,
a change while reading, a failure in the middle of a publish (all or nothing) and a key
never overwritten even when another writer gets there between send and publish. Local
files: the cases that apply are in tests/contract/test_storage_backends.py (no connection to drop).

Where an emulator cannot show a case the test says so (fake-gcs-server: no credentials, so
no 403; that case runs on the others in tests/contract/test_storage_backends.py)."""

from __future__ import annotations

import os
import uuid

import pytest

from tensorize_vllm_model import AlreadyExists, StorageError, Unreachable, storage
from tensorize_vllm_model.core.errors import Throttled
from tensorize_vllm_model.storage.retry import RetryPolicy
from tests.support import BUCKET
from tests.support.places import Store, make_store
from tests.support.servers import ScriptedProxy

ATTEMPTS = 3
POLICY = RetryPolicy(attempts=ATTEMPTS, backoff=0.01)
DATA = os.urandom(512 * 1024)
WRITABLE = ["s3", "s3-seaweedfs", "gcs", "azure"]


@pytest.fixture(params=[*WRITABLE, "http-1.1"])
def remote(request) -> Store:
    return make_store(request, request.param)


def _options(remote: Store, endpoint: str | None = None, **extra) -> storage.StreamOptions:
    """`remote`'s options (through `endpoint` where given) with the retry policy `POLICY`."""
    return storage.StreamOptions(retry=POLICY, **{**remote.options_via(endpoint), **extra})


def _probe_gets(remote: Store) -> int:
    """Ranged GETs a read makes before its first byte range: HTTP's probe (bytes=0-0); a
    GCS object's metadata is a GET without a range, an Azure blob's properties a HEAD."""
    return 1 if remote.name.startswith("http") else 0


def _via(remote: Store, proxy_port: int, rel: str) -> tuple[str, storage.StreamOptions]:
    """`rel`'s URI and options that reach it through the proxy on `proxy_port`."""
    url = f"http://127.0.0.1:{proxy_port}"
    if remote.name.startswith("http"):
        return f"{url}/{remote.base.split('/', 3)[3]}/{rel}", _options(remote, url)
    return remote.uri(rel), _options(remote, url)


def _scripted(request, remote: Store, script: list[str]) -> ScriptedProxy:
    proxy = ScriptedProxy(
        remote.port,
        ["pass"] * _probe_gets(remote) + script,
        s3=remote.name.startswith("s3"),
        ranged_only=True,
    )
    request.addfinalizer(proxy.stop)
    return proxy


def test_requests_are_counted_per_retry(request, remote):
    """A range whose every attempt is hung up on is tried exactly `attempts` times (one
    budget, whatever layer retries), then `Unreachable` lists each attempt."""
    remote.put("blob.bin", DATA)
    proxy = _scripted(request, remote, ["close"] * (ATTEMPTS + 5))
    uri, options = _via(remote, proxy.port, "blob.bin")
    with pytest.raises(Unreachable) as failure:
        storage.read_bytes(uri, options)
    assert proxy.gets == _probe_gets(remote) + ATTEMPTS, failure.value
    assert str(ATTEMPTS) in str(failure.value)


def test_throttled_every_time_is_throttled(request, remote):
    remote.put("blob.bin", DATA)
    proxy = _scripted(request, remote, ["slowdown"] * (ATTEMPTS + 5))
    uri, options = _via(remote, proxy.port, "blob.bin")
    with pytest.raises(Throttled, match="503"):
        storage.read_bytes(uri, options)
    assert proxy.gets == _probe_gets(remote) + ATTEMPTS


def test_a_dropped_connection_is_retried_and_the_bytes_are_whole(request, remote):
    remote.put("blob.bin", DATA)
    proxy = _scripted(request, remote, ["cut"])
    uri, options = _via(remote, proxy.port, "blob.bin")
    assert storage.read_bytes(uri, options) == DATA
    assert proxy.gets == _probe_gets(remote) + 2


def test_a_stall_gives_up_after_the_timeout(request, remote):
    """The server sends part of a range, then nothing: each attempt waits `timeout`, the
    range is asked for exactly `attempts` times, and the read ends as `Unreachable` (never
    hangs)."""
    remote.put("blob.bin", DATA)
    proxy = _scripted(request, remote, ["stall"] * (ATTEMPTS + 5))
    uri, options = _via(remote, proxy.port, "blob.bin")
    options = _options(remote, f"http://127.0.0.1:{proxy.port}", timeout=0.5)
    with pytest.raises(Unreachable) as failure:
        storage.read_bytes(uri, options)
    assert proxy.gets == _probe_gets(remote) + ATTEMPTS, failure.value


def test_a_change_while_reading_is_refused(remote):
    """The object is replaced (same size) between two ranges: the second range is refused,
    naming the object, never served from the new one."""
    remote.put("blob.bin", DATA)
    options = _options(remote, chunk_size=128 * 1024, workers=1)
    with storage.open_read(remote.uri("blob.bin"), options) as stream:
        assert stream.read(1000) == DATA[:1000]
        remote.put("blob.bin", os.urandom(len(DATA)))
        if remote.files is not None:  # a new mtime, so a new ETag even within 1 s
            os.utime(remote.files / "blob.bin", (1, 1))
        with pytest.raises(StorageError, match="changed while it was read"):
            stream.read()


@pytest.mark.parametrize("remote", WRITABLE, indirect=True)
def test_a_failure_in_the_middle_of_a_publish_changes_nothing(remote):
    """Three files; the second cannot be published (a key that must not be replaced is
    there): the first is back as it was, the third never appears, nothing else is left."""
    remote.put("m/config.json", b"earlier config")
    remote.put("m/model.key", b"their key")
    options = _options(remote)
    with pytest.raises(AlreadyExists):
        with storage.transaction(options) as tx:
            for rel, data, kwargs in [
                ("m/config.json", b"new config", {}),
                ("m/model.key", b"our key", {"replace": False}),
                ("m/model.tensors", DATA, {"last": True}),
            ]:
                staged = tx.stage(remote.uri(rel), **kwargs)
                with open(staged.path, "wb") as f:
                    f.write(data)
    assert storage.read_bytes(remote.uri("m/config.json"), options) == b"earlier config"
    assert storage.read_bytes(remote.uri("m/model.key"), options) == b"their key"
    assert storage.list_names(remote.uri("m"), options) == ["config.json", "model.key"]


@pytest.mark.parametrize("remote", WRITABLE, indirect=True)
def test_a_key_is_never_overwritten_even_when_it_appears_after_the_send(remote):
    """Another writer puts a key between our send and our publish: the store's own
    precondition (S3 If-None-Match, GCS ifGenerationMatch=0, Azure If-None-Match) refuses
    ours, and theirs stays."""
    options = _options(remote)
    tx = storage.transaction(options)
    staged = tx.stage(remote.uri("k/model.key"), replace=False)
    with open(staged.path, "wb") as f:
        f.write(b"K" * 32)
    tx.send_ahead()
    remote.put("k/model.key", b"theirs")
    with pytest.raises(AlreadyExists, match="already exists"):
        tx.commit()
    assert storage.read_bytes(remote.uri("k/model.key"), options) == b"theirs"


def test_an_interrupt_as_a_gcs_send_ends_leaves_no_hidden_object(fake_gcs, monkeypatch):
    """Ctrl-C arriving as the upload of a hidden ``.NAME.sending-`` object completes (its
    handle never reaches the transaction): the object once stayed in the bucket, a whole
    model's size, for good (`python -m tensorize_vllm_model convert` to gs:// interrupted
    after 4 s left 235 MB). The interrupt is raised by a wrapper around the real upload
    (a signal cannot be timed to that instant)."""
    from google.cloud.storage import Blob

    from tensorize_vllm_model.core.interrupts import Interrupted
    from tensorize_vllm_model.storage import gcs

    monkeypatch.setattr(gcs, "_SINGLE", 1024)  # send ahead from 1 KiB on (16 MiB in use)
    upload = Blob.upload_from_filename

    def upload_then_interrupt(self, *args, **kwargs):
        upload(self, *args, **kwargs)
        raise Interrupted(2)

    monkeypatch.setattr(Blob, "upload_from_filename", upload_then_interrupt)
    prefix = f"gs://{BUCKET}/{uuid.uuid4().hex}"
    options = storage.StreamOptions(retry=POLICY, gcs_endpoint=fake_gcs.endpoint)
    with pytest.raises(Interrupted):
        with storage.transaction(options) as tx:
            staged = tx.stage(f"{prefix}/model.tensors")
            with open(staged.path, "wb") as f:
                f.write(DATA)
    left = list(fake_gcs.client().list_blobs(BUCKET, prefix=prefix.split("/", 3)[3]))
    assert [b.name for b in left] == []
