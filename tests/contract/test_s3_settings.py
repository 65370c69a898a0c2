"""S3 settings: the addressing style each endpoint gets, the settings that choose it, and
every S3 setting tensorizer 2.12's ``open_stream`` and its ``~/.s3cfg`` handling honour.

The unit tests read the URL botocore really builds: a ``before-send`` event hook records the
prepared request and stops it there (nothing reaches the network, least of all CoreWeave).
The loopback test sends a real virtual-hosted request to a real local HTTP server, through
the standard ``HTTP_PROXY`` variable, because ``BUCKET.localhost`` has no address here: the
server records the Host header the client sent.
"""

from __future__ import annotations

import http.server
import threading

import pytest

from tensorize_vllm_model import ConfigError, TensorizerConfig, storage
from tensorize_vllm_model.storage import s3 as s3_backend
from tensorize_vllm_model.storage.options import StreamOptions

BUCKET = "my-bucket"
KEYS = {
    "s3_access_key_id": "AKIDTEST",
    "s3_secret_access_key": "secret-for-tests",
    "s3_region_name": "us-east-1",
}


class _Sent(Exception):
    pass


def request_url(options: dict, key: str = "dir/model.tensors") -> str:
    """The URL of the HEAD request our client builds for ``s3://my-bucket/<key>``."""
    client, _ = s3_backend._client(StreamOptions.from_mapping(options))

    def stop(request, **_):
        raise _Sent(request.url)

    client.meta.events.register_first("before-send.s3", stop)
    try:
        client.head_object(Bucket=BUCKET, Key=key)
    except _Sent as sent:
        return str(sent)
    finally:
        client.meta.events.unregister("before-send.s3", stop)
    raise AssertionError("no request was sent")


def settings(options: dict):
    return s3_backend._client(StreamOptions.from_mapping(options))[1]


@pytest.mark.parametrize(
    "endpoint, url",
    [
        # CoreWeave's endpoints refuse path-style requests (tensorizer 2.12's special case).
        ("https://cwobject.com", "https://my-bucket.cwobject.com/dir/model.tensors"),
        ("cwlota.com", "https://my-bucket.cwlota.com/dir/model.tensors"),
        ("https://CWObject.com:443", "https://my-bucket.CWObject.com:443/dir/model.tensors"),
        # Any other custom endpoint: path style (MinIO, SeaweedFS, moto, Ceph).
        ("https://minio.example:9000", "https://minio.example:9000/my-bucket/dir/model.tensors"),
        (
            "https://object.ord1.coreweave.com",
            "https://object.ord1.coreweave.com/my-bucket/dir/model.tensors",
        ),
        # No endpoint: AWS, virtual-hosted (botocore's "auto").
        (None, "https://my-bucket.s3.amazonaws.com/dir/model.tensors"),
    ],
)
def test_default_addressing_per_endpoint(clean_env, endpoint, url):
    assert request_url({**KEYS, "s3_endpoint": endpoint}) == url


def test_plain_http_loopback_endpoint_is_path_style(clean_env):
    assert (
        request_url({**KEYS, "s3_endpoint": "http://127.0.0.1:9000", "force_http": True})
        == "http://127.0.0.1:9000/my-bucket/dir/model.tensors"
    )


@pytest.mark.parametrize(
    "endpoint, style, url",
    [
        ("https://cwobject.com", "path", "https://cwobject.com/my-bucket/dir/model.tensors"),
        ("https://minio.example", "virtual", "https://my-bucket.minio.example/dir/model.tensors"),
        (None, "path", "https://s3.amazonaws.com/my-bucket/dir/model.tensors"),
    ],
)
def test_stream_kwargs_addressing_style_wins(clean_env, endpoint, style, url):
    config = TensorizerConfig(
        tensorizer_uri=f"s3://{BUCKET}/dir/model.tensors",
        s3_endpoint=endpoint,
        stream_kwargs={**KEYS, "addressing_style": style},
    )
    assert request_url(config.options) == url
    assert settings(config.options).addressing_source == "stream_kwargs addressing_style"


def test_unknown_addressing_style_is_named():
    with pytest.raises(
        ConfigError,
        match=r"addressing_style must be one of auto, virtual, "
        r"path, got 'virtual-hosted'",
    ):
        TensorizerConfig(
            tensorizer_uri="s3://b/k", stream_kwargs={"addressing_style": "virtual-hosted"}
        )


def test_aws_config_addressing_style_is_honoured(clean_env):
    (clean_env / "aws-config").write_text("[default]\ns3 =\n    addressing_style = virtual\n")
    options = {**KEYS, "s3_endpoint": "https://minio.example"}
    assert request_url(options) == "https://my-bucket.minio.example/dir/model.tensors"
    assert settings(options).addressing_source == "s3.addressing_style in the AWS config file"
    s3_backend._clients.clear()
    # stream_kwargs beat the config file.
    assert (
        request_url({**options, "addressing_style": "path"})
        == "https://minio.example/my-bucket/dir/model.tensors"
    )


def test_aws_config_profile_is_the_one_selected(clean_env, monkeypatch):
    (clean_env / "aws-config").write_text(
        "[default]\ns3 =\n    addressing_style = virtual\n"
        "[profile minio]\ns3 =\n    addressing_style = path\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "minio")
    assert (
        request_url({**KEYS, "s3_endpoint": "https://cwobject.com"})
        == "https://cwobject.com/my-bucket/dir/model.tensors"
    )


def test_aws_config_bad_addressing_style_is_named(clean_env):
    (clean_env / "aws-config").write_text("[default]\ns3 =\n    addressing_style = sideways\n")
    with pytest.raises(ConfigError, match="s3.addressing_style 'sideways' in the AWS config"):
        settings({**KEYS, "s3_endpoint": "https://minio.example"})


@pytest.mark.parametrize(
    "config_text, url, source",
    [
        (
            "[default]\nendpoint_url = https://cwobject.com\n",
            "https://my-bucket.cwobject.com/dir/model.tensors",
            "the AWS config file",
        ),
        (
            "[default]\nservices = mine\n[services mine]\ns3 =\n    endpoint_url = https://minio.example\n",
            "https://minio.example/my-bucket/dir/model.tensors",
            "the AWS config file",
        ),
        # tensorizer reads the profile's own nested s3 section too.
        (
            "[default]\ns3 =\n    endpoint_url = https://minio.example\n",
            "https://minio.example/my-bucket/dir/model.tensors",
            "the AWS config file",
        ),
    ],
)
def test_aws_config_endpoint(clean_env, config_text, url, source):
    (clean_env / "aws-config").write_text(config_text)
    assert request_url(KEYS) == url
    assert settings(KEYS).endpoint_source == source


def test_ignore_configured_endpoint_urls(clean_env, monkeypatch):
    (clean_env / "aws-config").write_text("[default]\nendpoint_url = https://minio.example\n")
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert request_url(KEYS) == "https://my-bucket.s3.amazonaws.com/dir/model.tensors"


def test_aws_config_http_endpoint_needs_force_http(clean_env):
    (clean_env / "aws-config").write_text("[default]\nendpoint_url = http://minio.example\n")
    with pytest.raises(ConfigError, match="http://minio.example is plain http://"):
        settings(KEYS)


def test_endpoint_order(clean_env, monkeypatch):
    (clean_env / "aws-config").write_text("[default]\nendpoint_url = https://from-aws-config\n")
    assert settings(KEYS).endpoint == "https://from-aws-config"
    (clean_env / ".s3cfg").write_text("[default]\nhost_base = from-s3cfg.example\n")
    s3_backend._clients.clear()
    assert settings(KEYS).endpoint == "https://from-s3cfg.example"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://aws-global.example")
    s3_backend._clients.clear()
    assert settings(KEYS).endpoint == "https://aws-global.example"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://aws-s3.example")
    s3_backend._clients.clear()
    assert settings(KEYS).endpoint == "https://aws-s3.example"
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://s3-env.example")
    s3_backend._clients.clear()
    config = TensorizerConfig(tensorizer_uri="s3://b/k", stream_kwargs=KEYS)
    assert settings(config.options).endpoint == "https://s3-env.example"
    s3_backend._clients.clear()
    config = TensorizerConfig(
        tensorizer_uri="s3://b/k", s3_endpoint="https://flag.example", stream_kwargs=KEYS
    )
    assert settings(config.options).endpoint == "https://flag.example"


# -- ~/.s3cfg, as s3cmd writes it --------------------------------------------------------------

S3CMD_FILE = """[default]
access_key = AKIDS3CFG
secret_key = s3cfg-secret
host_base = cwobject.com
host_bucket = {host_bucket}
use_https = {use_https}
signature_v2 = False
"""


@pytest.mark.parametrize(
    "host_bucket, url",
    [
        ("%(bucket)s.cwobject.com", "https://my-bucket.cwobject.com/dir/model.tensors"),
        # s3cmd's way of asking for path style: a host_bucket without %(bucket)s.
        ("cwobject.com", "https://cwobject.com/my-bucket/dir/model.tensors"),
    ],
)
def test_s3cfg_as_s3cmd_writes_it(clean_env, host_bucket, url):
    (clean_env / ".s3cfg").write_text(S3CMD_FILE.format(host_bucket=host_bucket, use_https="True"))
    assert request_url({}) == url
    resolved = settings({})
    assert (
        resolved.credentials == "~/.s3cfg" and resolved.endpoint_source == "host_base of ~/.s3cfg"
    )


def test_s3cfg_use_https_false_allows_its_plain_http_endpoint(clean_env):
    (clean_env / ".s3cfg").write_text(
        S3CMD_FILE.format(host_bucket="%(bucket)s.cwobject.com", use_https="False")
    )
    assert request_url({}) == "http://my-bucket.cwobject.com/dir/model.tensors"


def test_explicit_s3_config_path(clean_env, monkeypatch):
    path = clean_env / "secrets" / "s3cfg"
    path.parent.mkdir()
    path.write_text(
        "[default]\naccess_key = AKIDMOUNTED\nsecret_key = mounted-secret\n"
        "host_base = minio.example\n"
    )
    # An explicitly named file wins over the AWS chain (the default ~/.s3cfg does not).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-aws-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    client, resolved = s3_backend._client(StreamOptions.from_mapping({"s3_config_path": str(path)}))
    assert client._request_signer._credentials.access_key == "AKIDMOUNTED"  # botocore's, read-only
    assert resolved.endpoint == "https://minio.example" and resolved.addressing_style == "path"
    missing = str(clean_env / "nowhere" / "s3cfg")
    with pytest.raises(ConfigError, match=f"s3_config_path {missing}: no such file"):
        settings({"s3_config_path": missing})


# -- a real request on loopback -----------------------------------------------------------------


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Answers any HEAD/GET with a 5-byte object and records (request line, Host)."""

    protocol_version = "HTTP/1.1"
    seen: list
    body = b"hello"

    def log_message(self, *args):
        pass

    def _answer(self, with_body: bool) -> None:
        self.seen.append((self.requestline, self.headers.get("Host")))
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Content-Type", "application/octet-stream")
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes 0-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        if with_body:
            self.wfile.write(self.body)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)


@pytest.fixture
def recording_server():
    seen: list = []
    handler = type("Handler", (_RecordingHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "style, host, path",
    [
        ("virtual", "my-bucket.localhost:{port}", "/dir/obj.bin"),
        ("path", "localhost:{port}", "/my-bucket/dir/obj.bin"),
    ],
)
def test_virtual_hosted_request_carries_the_bucket_in_host(
    clean_env, monkeypatch, recording_server, style, host, path
):
    port, seen = recording_server
    # my-bucket.localhost has no address here: the request goes through the server as an
    # HTTP proxy (botocore honours HTTP_PROXY), which sees the Host header as sent.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    options = {
        **KEYS,
        "s3_endpoint": f"http://localhost:{port}",
        "force_http": True,
        "addressing_style": style,
    }
    assert storage.read_bytes(f"s3://{BUCKET}/dir/obj.bin", options) == b"hello"
    assert seen, "no request reached the server"
    for request_line, sent_host in seen:
        assert sent_host == host.format(port=port)
        assert f"{host.format(port=port)}{path} HTTP/1.1" in request_line


def test_missing_aws_profile_is_named(clean_env, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(
        ConfigError,
        match=r"The config profile \(nope\) could not be found "
        r"\(AWS_PROFILE names a profile",
    ):
        settings({**KEYS, "s3_endpoint": "https://minio.example"})
