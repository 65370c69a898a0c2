"""The stores the storage tests run their cases against, set up once for both suites
(tests/contract/test_storage_backends.py, tests/contract/test_storage_contract.py): a fresh prefix on each
server of the session's fixtures, how to put a file there directly (the store's own
client), and the options that reach it, straight or through a proxy's endpoint."""

from __future__ import annotations

import re
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensorize_vllm_model import storage
from tests.support import BUCKET

_S3_SERVERS = {"s3": "moto", "s3-https": "moto_tls", "s3-seaweedfs": "seaweed"}
HTTP_NAMES = ("http-1.1", "http-1.0-no-ranges", "https")
NAMES = ["local", *_S3_SERVERS, "gcs", "azure", *HTTP_NAMES]

# moto's credentials (any pair works) and plain HTTP: the options of an S3 server on loopback
S3_OPTIONS = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing", "force_http": True}


def s3_options(endpoint: str, **extra) -> dict:
    """`S3_OPTIONS` for the S3 server at `endpoint` (a URL), with `extra` options."""
    return {**S3_OPTIONS, "s3_endpoint": endpoint, **extra}


@dataclass
class Store:
    """A backend on its server. `options_via(None)` reaches the server; with an endpoint URL
    (a proxy in front of it, plain HTTP) the requests go there instead."""

    name: str
    base: str  # the URI of this test's prefix
    put: Callable[[str, bytes], None]  # relative name, bytes -> the file is there
    options_via: Callable[[str | None], dict]
    writable: bool
    port: int | None = None  # the server's loopback port (what a proxy forwards to)
    files: Path | None = None  # an HTTP server's directory of this prefix

    @property
    def options(self) -> dict:
        return self.options_via(None)

    def uri(self, rel: str) -> str:
        return storage.join(self.base, rel)


def _port(url: str) -> int:
    return urllib.parse.urlsplit(url).port or 80


def _file_put(directory: Path) -> Callable[[str, bytes], None]:
    def put(rel: str, data: bytes) -> None:
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return put


def _s3(request: pytest.FixtureRequest, name: str, prefix: str) -> Store:
    server = request.getfixturevalue(_S3_SERVERS[name])
    client = server.client()
    keys = {
        "s3_access_key_id": server.access_key_id,
        "s3_secret_access_key": server.secret_access_key,
    }

    def options_via(url: str | None) -> dict:
        if url is not None or not server.tls:
            return {"s3_endpoint": url or server.endpoint, "force_http": True, **keys}
        tls = request.getfixturevalue("tls")
        return {"s3_endpoint": server.endpoint, "ca_bundle": str(tls.ca), **keys}

    return Store(
        name,
        f"s3://{BUCKET}/{prefix}",
        lambda rel, data: client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data),
        options_via,
        True,
        _port(server.endpoint),
    )


def _gcs(request: pytest.FixtureRequest, prefix: str) -> Store:
    gcs = request.getfixturevalue("fake_gcs")
    bucket = gcs.client().bucket(BUCKET)
    return Store(
        "gcs",
        f"gs://{BUCKET}/{prefix}",
        lambda rel, data: bucket.blob(f"{prefix}/{rel}").upload_from_string(data),
        lambda url: {"gcs_endpoint": url or gcs.endpoint},
        True,
        _port(gcs.endpoint),
    )


def _azure(request: pytest.FixtureRequest, prefix: str) -> Store:
    azurite = request.getfixturevalue("azurite")
    container = azurite.client().get_container_client(BUCKET)

    def options_via(url: str | None) -> dict:
        connection = azurite.connection_string()
        if url is not None:
            connection = re.sub(r"http://127\.0\.0\.1:\d+", url.rstrip("/"), connection)
        return {"azure_connection_string": connection}

    return Store(
        "azure",
        f"az://{BUCKET}/{prefix}",
        lambda rel, data: container.upload_blob(f"{prefix}/{rel}", data, overwrite=True),
        options_via,
        True,
        azurite.port,
    )


def make_store(request: pytest.FixtureRequest, name: str) -> Store:
    """The store `name` (one of `NAMES`) under a fresh prefix."""
    prefix = uuid.uuid4().hex
    if name == "local":
        tmp_path = request.getfixturevalue("tmp_path")
        return Store(name, str(tmp_path), _file_put(tmp_path), lambda url: {}, True)
    if name.startswith("s3"):
        return _s3(request, name, prefix)
    if name == "gcs":
        return _gcs(request, prefix)
    if name == "azure":
        return _azure(request, prefix)
    server = request.getfixturevalue("web_servers")[name]
    web_root = request.getfixturevalue("web_root")
    ca = {"ca_bundle": str(request.getfixturevalue("tls").ca)} if name == "https" else {}
    return Store(
        name,
        f"{server.url}/{prefix}",
        _file_put(web_root / prefix),
        lambda url: {} if url is not None else ca,
        False,
        server.port,
        web_root / prefix,
    )
