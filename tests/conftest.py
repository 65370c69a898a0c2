"""Shared fixtures: tiny models built offline, and helpers that run vLLM engines and the
command line in subprocesses (each engine start takes about 30 s on a 2-core CPU, so tests
share them through module-scoped fixtures)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# scripts/demo_models.py builds the small random-weight models the tests start vLLM on
sys.path.append(str(ROOT / "scripts"))
RUNNER = Path(__file__).resolve().parent / "engine_runner.py"
BUILTIN_RUNNER = Path(__file__).resolve().parent / "builtin_runner.py"

from demo_models import MAX_TOKENS, PROMPTS  # noqa: E402

# Engine settings that fit vLLM's CPU backend on a small machine: on the CPU the "GPU"
# memory fraction is the share of host memory kept for the KV cache.
ENGINE_KWARGS = {
    "dtype": "bfloat16",
    "max_model_len": 256,
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,
}
ENGINE_FLAGS = [
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "256",
    "--enforce-eager",
    "--gpu-memory-utilization",
    "0.3",
]
ENGINE_TIMEOUT = 600
BUCKET = "models"
# The files of a serialized (or converted) tiny model's directory, sorted.
SERIALIZED_FILES = [
    "config.json",
    "generation_config.json",
    "model.tensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
WORKER_EXTENSION = "tensorize_vllm_model.integrations.vllm.worker.WorkerExtension"


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_runner(
    spec: dict, *, env: dict[str, str] | None = None, expect_ok: bool = True, runner: Path = RUNNER
) -> dict | subprocess.CompletedProcess:
    """Run tests/engine_runner.py (or `runner`) with `spec`; return its parsed RESULT (or,
    with expect_ok=False, the completed process)."""
    proc = subprocess.run(
        [sys.executable, str(runner)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        timeout=ENGINE_TIMEOUT,
        cwd=ROOT,
    )
    return result_of(proc, expect_ok)


def result_of(proc: subprocess.CompletedProcess, expect_ok: bool = True):
    """The parsed ``RESULT`` line of a runner's output (or, with expect_ok=False, `proc`)."""
    if not expect_ok:
        return proc
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"engine run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def run_builtin(*specs: dict) -> list[dict]:
    """Run tests/builtin_runner.py (vLLM's own tensorizer code, outside an engine) once per
    spec, all at once (the ranks of one layout meet through one gloo rendezvous), with this
    package's plug-in off (``VLLM_PLUGINS=""``); return each one's RESULT."""
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    specs = [{"init_method": f"tcp://127.0.0.1:{port}", **spec} for spec in specs]
    with ThreadPoolExecutor(len(specs)) as pool:
        return list(
            pool.map(
                lambda spec: run_runner(spec, env={"VLLM_PLUGINS": ""}, runner=BUILTIN_RUNNER),
                specs,
            )
        )


def run_engine(
    llm_kwargs: dict,
    *,
    prompts=PROMPTS,
    max_tokens=MAX_TOKENS,
    stats=False,
    config_object: bool = False,
    env: dict[str, str] | None = None,
    expect_ok: bool = True,
    separate_processes: bool = False,
    **lora: dict,
) -> dict | subprocess.CompletedProcess:
    """Start `LLM(**ENGINE_KWARGS, **llm_kwargs)` in a subprocess and generate greedily
    (``lora=...`` or ``tensorized_lora=...``: see engine_runner.py).

    By default vLLM runs its engine and worker inside that subprocess
    (VLLM_ENABLE_V1_MULTIPROCESSING=0): about 20 s instead of 45 s here. Tests about what
    happens across vLLM's processes (the plug-in loading in a separate worker, credentials
    reaching it, several ranks) pass separate_processes=True, vLLM's default.
    """
    spec = {
        "llm": {**ENGINE_KWARGS, **llm_kwargs},
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "stats": stats,
        "config_object": config_object,
        **lora,
    }
    processes = {} if separate_processes else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return run_runner(spec, env={**processes, **(env or {})}, expect_ok=expect_ok)


def run_python(
    *args, env: dict[str, str] | None = None, timeout: int = ENGINE_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in the repository's root and capture its output (text)."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        timeout=timeout,
        cwd=ROOT,
    )


def run_cli(
    *args,
    env: dict[str, str] | None = None,
    script: str | None = None,
    timeout: int = ENGINE_TIMEOUT,
) -> subprocess.CompletedProcess:
    """Run ``python -m tensorize_vllm_model ARGS`` (or a script) and capture its output."""
    command = [script] if script else ["-m", "tensorize_vllm_model"]
    return run_python(*command, *args, env=env, timeout=timeout)


def run_deserialize(
    model, tensors, *flags, engine_flags=ENGINE_FLAGS, **run_cli_kwargs
) -> subprocess.CompletedProcess:
    """`run_cli` of ``--model MODEL ENGINE_FLAGS deserialize --path-to-tensors TENSORS
    FLAGS...``."""
    return run_cli(
        "--model",
        model,
        *engine_flags,
        "deserialize",
        "--path-to-tensors",
        tensors,
        *flags,
        **run_cli_kwargs,
    )


HF_TENSORIZE = (
    "import sys, torch, transformers\n"
    "from tensorizer import TensorSerializer\n"
    "dtype = getattr(torch, sys.argv[3])\n"
    "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)\n"
    "s = TensorSerializer(sys.argv[2]); s.write_module(m); s.close()\n"
)


def write_hf_tensors(model: Path, path: Path, dtype: str) -> None:
    """Write the Hugging Face model at `model` (loaded in torch's `dtype`, e.g. "float32")
    to `path` with plain ``TensorSerializer.write_module`` (not vLLM's layout), in a child."""
    assert_ok(run_python("-c", HF_TENSORIZE, model, path, dtype, timeout=300))


def serialize_argv(model, directory, suffix: str, *flags, engine_flags=ENGINE_FLAGS) -> list[str]:
    """The command line's ``--model MODEL ENGINE_FLAGS serialize --serialized-directory
    DIRECTORY --suffix SUFFIX FLAGS...``, as strings."""
    argv = [*engine_flags, "serialize", "--serialized-directory", directory, "--suffix", suffix]
    return [str(a) for a in ["--model", model, *argv, *flags]]


def run_serialize(
    model,
    directory,
    suffix: str,
    *flags,
    engine_flags=ENGINE_FLAGS,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`run_cli` of `serialize_argv` (the serialize command, which starts a vLLM engine)."""
    argv = serialize_argv(model, directory, suffix, *flags, engine_flags=engine_flags)
    return run_cli(*argv, env=env)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


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


def serve_and_complete(
    serve_args: list[str], model_name: str, *, prompts=PROMPTS, env: dict[str, str] | None = None
) -> list[str]:
    """Start ``vllm serve SERVE_ARGS`` on a loopback port, send each prompt to
    /v1/completions (greedy), stop the server, and return the completions."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "vllm"),
            "serve",
            *serve_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *ENGINE_FLAGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(env),
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-6000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(1)
        texts = []
        for prompt in prompts:
            body = json.dumps(
                {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            ).encode()
            request = urllib.request.Request(
                f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as r:
                texts.append(json.load(r)["choices"][0]["text"])
        return texts
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """A private CA and a server certificate for 127.0.0.1 it signed."""
    from servers import make_tls_files

    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def moto():
    """An S3 API server (moto) on loopback, plain HTTP, with bucket BUCKET."""
    from servers import MotoServer

    server = MotoServer()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_tls(tls):
    """The same over HTTPS, with a certificate from the private CA."""
    from servers import MotoServer

    server = MotoServer(tls=tls)
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """SeaweedFS's S3 gateway on loopback (plain HTTP), enforcing its own credentials
    (``seaweed.access_key_id`` / ``seaweed.secret_access_key``), with bucket BUCKET.
    Stopped, with every process it started, at the end of the session."""
    from servers import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory):
    """fake-gcs-server (Google Cloud Storage's JSON API) on loopback with bucket BUCKET."""
    from servers import FakeGCSServer

    server = FakeGCSServer(tmp_path_factory.mktemp("fake-gcs"), buckets=(BUCKET,))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite (Azure Blob) on loopback with container BUCKET; skipped where Azurite is not
    installed (scripts/install.sh --test installs it with npm)."""
    from servers import AzuriteServer, azurite_program

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
    from servers import HTTPFileServer

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
