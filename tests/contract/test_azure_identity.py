"""az:// reads through azure-identity's ``DefaultAzureCredential``: the account name only
(``AZURE_STORAGE_ACCOUNT_NAME``, no key, no SAS, no connection string) against Azurite with
``--oauth basic`` over HTTPS.

What is real: Azurite (HTTPS with the private CA's certificate, ``--oauth basic``: it
refuses a request without credentials, and checks each bearer token's issuer, audience and
lifetime), azure-identity's ``DefaultAzureCredential`` picking its managed identity
credential from the environment, msal's App Service token request, and this package's
client, ranged reads (`storage/azure_ranges.py`, signed by azure-core's bearer policy) and
error mapping.

What is simulated (nothing here can reach Microsoft Entra ID): the App Service managed
identity endpoint. ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` (the variables App Service
and Azure Functions set) point at a loopback server that answers as that endpoint does
(``access_token``, ``expires_on``, ``resource``, ``token_type``), with a JWT whose claims
Azurite checks (issuer ``https://sts.windows.net/<tenant>/``, audience
``https://storage.azure.com``, ``nbf``/``iat``/``exp``) and whose signature nobody checks
(Azurite's basic level does not; Entra ID's own tokens are signed with its keys).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
import urllib.parse
import uuid

import pytest

from tensorize_vllm_model import storage
from tensorize_vllm_model.core.errors import AccessDenied, StorageError
from tensorize_vllm_model.core.settings import STORAGE_VARIABLES
from tensorize_vllm_model.storage import azure as azure_backend
from tests.support import BUCKET

IDENTITY_HEADER = "loopback-identity-header"  # App Service's per-process secret, simulated
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(lifetime: float, audience: str = "https://storage.azure.com") -> str:
    """A JWT with the claims Azurite checks, HMAC-signed with a throwaway key (unchecked)."""
    now = int(time.time())
    claims = {
        "aud": audience,
        "iss": f"https://sts.windows.net/{TENANT}/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": int(now + lifetime),
        "oid": str(uuid.uuid4()),
        "tid": TENANT,
    }
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(b"unchecked", f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


class TokenServer:
    """The App Service managed identity endpoint, simulated on loopback: answers
    ``GET /msi/token?api-version=2019-08-01&resource=R`` carrying ``X-IDENTITY-HEADER`` with
    a token from `issue` (a function of the requested resource), and records each request's
    query."""

    def __init__(self):
        self.requests: list[dict[str, list[str]]] = []
        self.lifetime = 3600.0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                owner.requests.append(query)
                if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
                    self.send_error(401)
                    return
                token = make_token(owner.lifetime)
                body = json.dumps(
                    {
                        "access_token": token,
                        "expires_on": str(int(time.time() + max(owner.lifetime, 0))),
                        "resource": query["resource"][0],
                        "token_type": "Bearer",
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/msi/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def azurite_oauth(tls, tmp_path_factory):
    from tests.support.servers import AzuriteServer, azurite_program

    if azurite_program() is None:
        pytest.skip("Azurite is not installed (scripts/install.sh --test; needs npm)")
    server = AzuriteServer(tmp_path_factory.mktemp("azurite-oauth"), tls=tls, oauth=True)
    server.client().create_container(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def tokens():
    server = TokenServer()
    yield server
    server.stop()


@pytest.fixture
def identity_env(monkeypatch, tmp_path, azurite_oauth, tokens, tls):
    """The account name, the endpoint and the CA only; the identity from the environment
    App Service gives a process (simulated endpoint). No key, SAS or connection string;
    no Azure CLI login or shared token cache (HOME is empty)."""
    for name in (*STORAGE_VARIABLES, "AZURE_CLIENT_ID", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_SERVER_THUMBPRINT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET", "AZURE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):  # before SSL_CERT_FILE (settings)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1")
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", azurite_oauth.endpoint)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    monkeypatch.setenv("IDENTITY_ENDPOINT", tokens.url)
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
    azure_backend._client.clear()
    yield
    azure_backend._client.clear()


@pytest.fixture
def blob(azurite_oauth):
    """A 3 MiB blob put there with the account key (Azurite's): its URI and bytes."""
    data = bytes(range(256)) * (3 * 4096)
    name = f"identity/{uuid.uuid4().hex}/model.tensors"
    azurite_oauth.client().get_container_client(BUCKET).upload_blob(name, data)
    return f"az://{BUCKET}/{name}", data


def test_azurite_refuses_a_request_without_credentials(azurite_oauth, blob, tls):
    """The check below means something: this Azurite answers no anonymous read."""
    import ssl
    import urllib.error
    import urllib.request

    uri, _ = blob
    url = f"{azurite_oauth.endpoint}/{uri.split('/', 2)[2]}"
    context = ssl.create_default_context(cafile=str(tls.ca))
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, context=context, timeout=10)
    assert caught.value.code in (401, 403, 404)


def test_az_read_through_default_azure_credential(identity_env, blob, tokens):
    uri, data = blob
    assert storage.read_bytes(uri) == data
    source = storage.range_source(uri)
    assert source.size == len(data)
    assert source.read_range(1_000_000, 1_000_100) == data[1_000_000:1_000_100]
    with storage.open_read(uri) as f:  # the parallel ranged reader
        assert f.read() == data
    # The token came from the identity endpoint, for Azure Storage's resource.
    assert tokens.requests
    assert all(q["resource"] == ["https://storage.azure.com"] for q in tokens.requests)
    assert all(q["api-version"] == ["2019-08-01"] for q in tokens.requests)


def test_expired_token_is_refused_without_showing_it(identity_env, blob, tokens):
    """Azurite refuses an expired token (403): an `AccessDenied` naming the URI and how the
    credentials were found, never the token."""
    uri, _ = blob
    tokens.lifetime = -600.0  # already expired when issued
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(uri)
    message = str(caught.value)
    assert isinstance(caught.value, AccessDenied), message
    assert uri in message and "DefaultAzureCredential" in message
    assert "HTTP 403 AuthenticationFailed" in message
    assert "eyJ" not in message  # no JWT (its header's base64 starts so)
