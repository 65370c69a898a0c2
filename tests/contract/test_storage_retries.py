"""The one retry policy (storage/retry.py) against real servers on loopback: every failing
request or byte range is tried exactly `RetryPolicy.attempts` times in all, counted at the
server, whichever layer (botocore for S3 requests, retry.py for bodies and HTTP(S)) retries
it; what cannot be helped is raised at once; the errors after the last attempt say what
each attempt ran into. Counts and messages only, never timings."""

from __future__ import annotations

import os
import uuid

import pytest

from tensorize_vllm_model import NotFound, StorageError, Unreachable, storage
from tensorize_vllm_model.core.errors import Throttled
from tensorize_vllm_model.storage.options import StreamOptions
from tensorize_vllm_model.storage.retry import RetryPolicy
from tests.support import BUCKET
from tests.support.servers import HangingUpListener, HTTPFileServer, ScriptedProxy

ATTEMPTS = 3
POLICY = RetryPolicy(attempts=ATTEMPTS, backoff=0.01)  # short pauses: counts, not timings


def s3_options(endpoint: str, server=None, **extra) -> StreamOptions:
    """Options for `endpoint` (a proxy in front of `server`), signed with `server`'s keys."""
    return StreamOptions(
        s3_access_key_id=server.access_key_id if server else "testing",
        s3_secret_access_key=server.secret_access_key if server else "testing",
        s3_endpoint=endpoint,
        force_http=True,
        retry=POLICY,
        **extra,
    )


def http_options(tls=None, **extra) -> StreamOptions:
    return StreamOptions(retry=POLICY, ca_bundle=str(tls.ca) if tls else None, **extra)


@pytest.fixture(params=["moto", "seaweed"])
def s3(request):
    """An S3 API server on loopback: moto, or SeaweedFS (which checks the signatures of the
    requests the proxy forwards)."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def s3_object(s3):
    key = f"{uuid.uuid4().hex}/model.tensors"
    data = os.urandom(256 * 1024)
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}", data


@pytest.fixture(params=["http", "https"])
def http_file(request, web_root, tls):
    """(a file's name, its bytes, the HTTP file server, the TLS files for HTTPS or None)."""
    name = f"{uuid.uuid4().hex}.bin"
    data = os.urandom(256 * 1024)
    (web_root / name).write_bytes(data)
    server = HTTPFileServer(web_root)
    yield name, data, server, tls if request.param == "https" else None
    server.stop()


@pytest.fixture
def proxied():
    """Starts a `ScriptedProxy` (same arguments), stopped after the test."""
    started: list[ScriptedProxy] = []

    def start(*args, **kwargs) -> ScriptedProxy:
        started.append(ScriptedProxy(*args, **kwargs))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def failure_of(uri: str, options: StreamOptions, kind: type = Unreachable) -> Exception:
    """The error of reading `uri`, which must be a `kind`."""
    with pytest.raises(kind) as failure:
        storage.read_bytes(uri, options)
    return failure.value


# -- S3: botocore retries requests, retry.py bodies; one budget -------------------------------


@pytest.mark.parametrize("throttled", range(ATTEMPTS))
def test_s3_slow_down_then_served(s3, s3_object, proxied, throttled):
    uri, data = s3_object
    proxy = proxied(s3.port, ["slowdown"] * throttled, s3=True)
    assert storage.read_bytes(uri, s3_options(proxy.url, s3)) == data
    assert proxy.gets == throttled + 1


def test_s3_slow_down_for_good_is_a_clear_throttled_error(s3, s3_object, proxied):
    uri, _ = s3_object
    proxy = proxied(s3.port, ["slowdown"] * 100, s3=True)
    error = failure_of(uri, s3_options(proxy.url, s3), Throttled)
    assert proxy.gets == ATTEMPTS
    text = str(error)
    assert f"reading {uri} (bytes 0-{256 * 1024 - 1})" in text
    assert f"kept answering HTTP 503 SlowDown to all {ATTEMPTS} attempts" in text
    assert isinstance(error, Unreachable)


def test_s3_hang_ups_are_tried_attempts_times_not_attempts_squared(s3, s3_object, proxied):
    """botocore retries a GET that gets no answer; retry.py must not retry it again."""
    uri, _ = s3_object
    proxy = proxied(s3.port, ["close"] * 100, s3=True)
    error = failure_of(uri, s3_options(proxy.url, s3))
    assert proxy.gets == ATTEMPTS
    text = str(error)
    assert f"reading {uri} failed at bytes 0-262143 after {ATTEMPTS} attempts" in text
    assert f'"http://127.0.0.1:{proxy.port}/{uri[5:]}". ({ATTEMPTS} times)' in text, text


def test_s3_bodies_that_drop_are_tried_attempts_times(s3, s3_object, proxied):
    uri, _ = s3_object
    proxy = proxied(s3.port, ["cut"] * 100, s3=True)
    with pytest.raises(Unreachable, match=rf"failed at bytes 0-262143 after {ATTEMPTS} attempts"):
        storage.read_bytes(uri, s3_options(proxy.url, s3))
    assert proxy.gets == ATTEMPTS


def test_s3_a_range_shares_one_budget_between_botocore_and_retry_py(s3, s3_object, proxied):
    """A dropped body (retry.py's), then "slow down" answers (botocore's): three GETs in all,
    each listed."""
    uri, data = s3_object
    proxy = proxied(s3.port, ["cut"] + ["slowdown"] * 100, s3=True)
    error = failure_of(uri, s3_options(proxy.url, s3))
    assert proxy.gets == ATTEMPTS
    assert not isinstance(error, Throttled)  # not every attempt was throttled
    assert str(error).endswith(
        f"131072 read, but total bytes expected is 262144.; HTTP 503 SlowDown ({ATTEMPTS - 1} times)"
    )
    # One drop, then served: the second GET reads the range.
    proxy = proxied(s3.port, ["cut", "slowdown"], s3=True)
    assert storage.read_bytes(uri, s3_options(proxy.url, s3)) == data
    assert proxy.gets == 3


def test_s3_dead_endpoint_is_tried_attempts_times():
    listener = HangingUpListener()
    try:
        error = failure_of(f"s3://{BUCKET}/model.tensors", s3_options(listener.url))
    finally:
        listener.stop()
    assert listener.accepted == ATTEMPTS
    text = str(error)
    assert f"cannot reach the S3 endpoint {listener.url} reading s3://{BUCKET}/model" in text
    assert f": no usable answer to {ATTEMPTS} attempts: ConnectionClosedError" in text
    assert f"({ATTEMPTS} times)" in text


def test_s3_missing_object_is_asked_for_once(s3, proxied):
    proxy = proxied(s3.port, [], s3=True)
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex}/absent.tensors"
    with pytest.raises(NotFound, match=rf"no such object: {uri}"):
        storage.read_bytes(uri, s3_options(proxy.url, s3))
    assert proxy.requests.count("HEAD") == 2  # the object's HEAD, then the bucket's


def test_botocore_is_configured_from_the_policy(moto):
    from tensorize_vllm_model.storage import s3 as s3_backend

    client, _ = s3_backend._client(s3_options(moto.endpoint))
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": ATTEMPTS}


# -- HTTP(S): retry.py retries requests and bodies ----------------------------------------------


@pytest.mark.parametrize("throttled", range(ATTEMPTS))
def test_http_slow_down_then_served(http_file, proxied, throttled):
    name, data, server, tls = http_file
    # The first GET is the size probe (bytes=0-0); the second reads the file.
    proxy = proxied(server.port, ["slowdown"] * throttled, s3=False, tls=tls)
    assert storage.read_bytes(f"{proxy.url}/{name}", http_options(tls)) == data
    assert proxy.gets == throttled + 2


def test_http_slow_down_for_good_is_a_clear_throttled_error(http_file, proxied):
    name, _, server, tls = http_file
    proxy = proxied(server.port, ["slowdown"] * 100, s3=False, tls=tls)
    error = failure_of(f"{proxy.url}/{name}", http_options(tls), Throttled)
    assert proxy.gets == ATTEMPTS
    assert (
        f"reading {proxy.url}/{name}: the server kept answering 503 Service Unavailable "
        f"to all {ATTEMPTS} attempts" in str(error)
    )


@pytest.mark.parametrize("fault", ["close", "cut", "slowdown"])
def test_http_a_failing_range_is_tried_attempts_times(http_file, proxied, fault):
    name, _, server, tls = http_file
    proxy = proxied(server.port, ["pass"] + [fault] * 100, s3=False, tls=tls)
    error = failure_of(f"{proxy.url}/{name}", http_options(tls))
    assert proxy.gets == 1 + ATTEMPTS  # the probe, then the range
    text = str(error)
    if fault == "slowdown":
        assert isinstance(error, Throttled)
        assert f"kept answering 503 Service Unavailable to all {ATTEMPTS} attempts" in text
    else:
        assert f"{name} failed at bytes 0-262143 after {ATTEMPTS} attempts" in text
    if fault == "cut":
        assert f"the response ended after 131072 of 262144 bytes ({ATTEMPTS} times)" in text


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http_dead_endpoint_is_tried_attempts_times(tls, scheme):
    listener = HangingUpListener(tls=scheme == "https")
    url = f"{listener.url}/model.tensors?X-Amz-Signature=SECRET"
    try:
        error = failure_of(url, http_options(tls if scheme == "https" else None))
    finally:
        listener.stop()
    assert listener.accepted == ATTEMPTS
    text = str(error)
    assert text.startswith(f"cannot reach {listener.url}/model.tensors: no usable answer to ")
    assert f"to {ATTEMPTS} attempts: " in text
    assert "SECRET" not in text


def test_http_404_is_asked_for_once(http_file, proxied):
    _, _, server, tls = http_file
    proxy = proxied(server.port, [], s3=False, tls=tls)
    with pytest.raises(NotFound, match=r"not found: .*/absent.bin \(HTTP 404\)"):
        storage.read_bytes(f"{proxy.url}/absent.bin", http_options(tls))
    assert proxy.gets == 1


def test_the_policy_refuses_nonsense():
    from tensorize_vllm_model import ConfigError

    with pytest.raises(ConfigError, match="attempts must be a positive integer"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError, match="backoff must be >= 0"):
        RetryPolicy(backoff=-1)
    assert isinstance(Throttled("x"), StorageError)
