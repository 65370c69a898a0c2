"""HTTP(S) through urllib3: ``HTTP_PROXY`` / ``HTTPS_PROXY`` (a CONNECT tunnel) and
``NO_PROXY`` honoured, and the CA bundle variables honoured the same way by S3 and HTTPS
(``--ca-bundle`` / ``ca_bundle``, else ``AWS_CA_BUNDLE``, ``REQUESTS_CA_BUNDLE``,
``SSL_CERT_FILE``). A real forward proxy and servers with a private CA on loopback."""

from __future__ import annotations

import os
import uuid

import pytest

from tensorize_vllm_model import Unreachable, storage
from tensorize_vllm_model.core.settings import CA_BUNDLE_VARIABLES
from tensorize_vllm_model.storage import http as http_backend
from tensorize_vllm_model.storage import s3 as s3_backend
from tests.support import BUCKET
from tests.support.servers import ForwardProxy, HTTPFileServer

DATA = os.urandom(300_000)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


@pytest.fixture
def clean(monkeypatch):
    for name in (*PROXY_VARIABLES, *CA_BUNDLE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    http_backend._pools.clear()
    s3_backend._clients.clear()
    yield monkeypatch
    http_backend._pools.clear()
    s3_backend._clients.clear()


@pytest.fixture
def served(web_root, tls):
    name = f"{uuid.uuid4().hex}.bin"
    (web_root / name).write_bytes(DATA)
    plain, secure = HTTPFileServer(web_root), HTTPFileServer(web_root, tls=tls)
    proxy = ForwardProxy()
    yield name, plain, secure, proxy
    for server in (plain, secure, proxy):
        server.stop()


def test_http_goes_through_http_proxy(clean, served):
    name, plain, _, proxy = served
    clean.setenv("HTTP_PROXY", proxy.url)
    clean.setenv("NO_PROXY", "example.invalid")  # a list that does not name the server
    assert storage.read_bytes(f"{plain.url}/{name}") == DATA
    assert proxy.seen and all(s.startswith(f"GET {plain.url}/{name}") for s in proxy.seen)


def test_https_goes_through_a_connect_tunnel(clean, served, tls):
    name, _, secure, proxy = served
    clean.setenv("https_proxy", proxy.url)  # lower case too, as curl reads it
    assert storage.read_bytes(f"{secure.url}/{name}", {"ca_bundle": str(tls.ca)}) == DATA
    assert proxy.seen and set(proxy.seen) == {f"CONNECT 127.0.0.1:{secure.port}"}


@pytest.mark.parametrize("entry", ["127.0.0.1", "host:port"])
def test_no_proxy_hosts_are_reached_directly(clean, served, entry):
    # host:port (as botocore and the standard library match it) once went to the proxy
    name, plain, _, proxy = served
    clean.setenv("HTTP_PROXY", proxy.url)
    host = f"127.0.0.1:{plain.port}" if entry == "host:port" else entry
    clean.setenv("NO_PROXY", f"localhost,{host}")
    assert storage.read_bytes(f"{plain.url}/{name}") == DATA
    assert proxy.seen == []


def test_a_dead_proxy_is_unreachable_not_a_hang(clean, served):
    from tests.support.servers import free_port

    name, plain, _, _ = served
    clean.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unreachable):
        storage.read_bytes(f"{plain.url}/{name}", {"timeout": 2.0})


@pytest.mark.parametrize("variable", CA_BUNDLE_VARIABLES)
@pytest.mark.parametrize("backend", ["https", "s3-https"])
def test_ca_variables_are_honoured_by_https_and_s3(clean, served, tls, moto_tls, variable, backend):
    name, _, secure, _ = served
    if backend == "https":
        uri, options = f"{secure.url}/{name}", {}
    else:
        key = f"{uuid.uuid4().hex}/blob.bin"
        moto_tls.client().put_object(Bucket=BUCKET, Key=key, Body=DATA)
        uri = f"s3://{BUCKET}/{key}"
        options = {
            "s3_endpoint": moto_tls.endpoint,
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }
    with pytest.raises(Unreachable, match="TLS|SSL|certificate"):
        storage.read_bytes(uri, {**options, "timeout": 5.0})
    clean.setenv(variable, str(tls.ca))
    s3_backend._clients.clear()
    assert storage.read_bytes(uri, options) == DATA


def test_ca_bundle_option_wins_over_the_variables(clean, served, tls, tmp_path):
    name, _, secure, _ = served
    clean.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    assert storage.read_bytes(f"{secure.url}/{name}", {"ca_bundle": str(tls.ca)}) == DATA
