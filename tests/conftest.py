"""Fixtures shared by the suite's modules (unit/, contract/, e2e/): tiny models built offline,
engines and serializations shared through session-scoped fixtures (each engine start takes
about 30 s on a 2-core CPU), the servers on loopback, a clean environment; and the markers
each test gets from where it lives and what it uses (`pytest_collection_modifyitems`).
The helpers the tests import are in tests/support/."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support import BUCKET
from tests.support.commands import assert_ok, run_serialize
from tests.support.engines import run_engine
from tests.support.fake_engine import FakeEngine

TESTS = Path(__file__).resolve().parent
# The directory a test module is in gives it its group's marker.
GROUPS = ("unit", "contract", "e2e")
# Fixtures that start an emulator; a test that uses one (directly or through another fixture)
# is marked `cloud`.
EMULATORS = {"moto", "moto_tls", "seaweed", "fake_gcs", "azurite"}
# The stores of tests/support/places.py that live on an emulator, for tests parametrized
# over stores (they reach the server through request.getfixturevalue).
EMULATED_STORES = {"s3", "s3-https", "s3-seaweedfs", "gcs", "azure"}
# Session fixtures that start a vLLM engine: a test using one is marked `slow` too, so that
# `-m "not slow"` starts no engine even where a test forgot its marker.
ENGINE_FIXTURES = {
    "llama_reference",
    "float32_reference",
    "opt_reference",
    "llama_serialized",
    "llama_encrypted",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test `unit`, `contract` or `e2e` by its directory, `cloud` when it needs
    an emulator, and `slow` when it uses an engine-starting fixture."""
    for item in items:
        path = Path(item.path).resolve()
        group = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        if group in GROUPS:
            item.add_marker(group)
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        stores = {p for p in params if isinstance(p, str)} & EMULATED_STORES
        if names & EMULATORS or stores:
            item.add_marker("cloud")
        if names & ENGINE_FIXTURES and item.get_closest_marker("slow") is None:
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The command line installs SIGINT and SIGTERM handlers; put pytest's back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from demo_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", architecture="llama")


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    from demo_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-opt", architecture="opt")


@pytest.fixture(scope="session")
def llama_reference(tiny_llama):
    """Greedy tokens of the original tiny Llama, loaded by vLLM's default loader."""
    return run_engine({"model": str(tiny_llama)})


@pytest.fixture(scope="session")
def float32_reference(tiny_llama):
    """Greedy tokens of the original tiny Llama at TP=1 in float32 (vLLM's default loader):
    what TP=2 loads are compared with (vLLM's own TP=1 and TP=2 agree in float32)."""
    return run_engine({"model": str(tiny_llama), "dtype": "float32"})


@pytest.fixture(scope="session")
def opt_reference(tiny_opt):
    """Greedy tokens of the original tiny OPT (tied embeddings), vLLM's default loader."""
    return run_engine({"model": str(tiny_opt)})


@pytest.fixture(scope="session")
def llama_serialized(tiny_llama, tmp_path_factory):
    """The tiny Llama serialized to local disk with the command line: (directory, stdout)."""
    out = tmp_path_factory.mktemp("serialized")
    proc = run_serialize(tiny_llama, out, "v1")
    assert_ok(proc)
    return out / "vllm" / "tiny-llama" / "v1", proc.stdout


@pytest.fixture(scope="session")
def llama_encrypted(tiny_llama, tmp_path_factory):
    """The tiny Llama serialized with a generated key: (directory, key file)."""
    out = tmp_path_factory.mktemp("encrypted")
    key = out / "keys" / "model.key"
    proc = run_serialize(tiny_llama, out, "enc", "--keyfile", key)
    assert_ok(proc)
    return out / "vllm" / "tiny-llama" / "enc", key


@pytest.fixture
def fake_engine(monkeypatch):
    """Replace the vLLM side of a serialize (no vLLM import, no engine start)."""
    from tensorize_vllm_model.integrations.vllm import engine

    monkeypatch.setattr(engine, "Engine", FakeEngine)
    monkeypatch.setattr(engine, "parallel_sizes", lambda args: (FakeEngine.world, 1))
    monkeypatch.setattr(engine, "vllm_version", lambda: "0.0-test")
    FakeEngine.instances = []
    FakeEngine.fail_tensors_commit = False
    FakeEngine.world = 1
    yield FakeEngine
    FakeEngine.instances = []
    FakeEngine.fail_tensors_commit = False
    FakeEngine.world = 1


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """A private CA and a server certificate for 127.0.0.1 it signed."""
    from tests.support.servers import make_tls_files

    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def moto():
    """An S3 API server (moto) on loopback, plain HTTP, with bucket BUCKET."""
    from tests.support.servers import MotoServer

    server = MotoServer()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_tls(tls):
    """The same over HTTPS, with a certificate from the private CA."""
    from tests.support.servers import MotoServer

    server = MotoServer(tls=tls)
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """SeaweedFS's S3 gateway on loopback (plain HTTP), enforcing its own credentials
    (``seaweed.access_key_id`` / ``seaweed.secret_access_key``), with bucket BUCKET.
    Stopped, with every process it started, at the end of the session."""
    from tests.support.servers import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory):
    """fake-gcs-server (Google Cloud Storage's JSON API) on loopback with bucket BUCKET."""
    from tests.support.servers import FakeGCSServer

    server = FakeGCSServer(tmp_path_factory.mktemp("fake-gcs"), buckets=(BUCKET,))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite (Azure Blob) on loopback with container BUCKET; skipped where Azurite is not
    installed (scripts/install.sh --test installs it with npm)."""
    from tests.support.servers import AzuriteServer, azurite_program

    if azurite_program() is None:
        pytest.skip("Azurite is not installed (scripts/install.sh --test; needs npm)")
    server = AzuriteServer(tmp_path_factory.mktemp("azurite"))
    server.client().create_container(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def web_root(tmp_path_factory):
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="session")
def web_servers(web_root, tls):
    """HTTP file servers on loopback serving web_root."""
    from tests.support.servers import HTTPFileServer

    servers = {
        "http-1.1": HTTPFileServer(web_root),
        "http-1.0-no-ranges": HTTPFileServer(web_root, protocol="HTTP/1.0", ranges=False),
        "https": HTTPFileServer(web_root, tls=tls),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No AWS/S3 variables or config files but those a test writes (HOME is `tmp_path`)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "S3_")) or name.lower() in (
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "all_proxy",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


@pytest.fixture(autouse=True)
def fresh_s3_clients():
    """boto3 clients are cached per options; tests that change the environment need new ones."""
    from tensorize_vllm_model.storage import s3 as s3_backend

    s3_backend._clients.clear()
    yield
    s3_backend._clients.clear()
