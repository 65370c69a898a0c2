"""Secrets never leak: S3 credentials and encryption keys stay out of help texts, process
command lines (vLLM's engine-core and worker processes included), logs, error messages and
the command line's output.

The S3 server here is moto on loopback with authentication enforced (its own instance: the
session `moto` fixture accepts any credentials, and enforcing them there would lock out the
other modules' "testing" keys), so a wrong secret really is refused and the right one must
really reach every process that reads the model.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.support import BUCKET, ROOT, SERIALIZED_FILES
from tests.support.commands import ENGINE_FLAGS, ENGINE_TIMEOUT, serialize_argv, subprocess_env
from tests.support.engines import PROMPTS

PREFIX = f"secrets-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def auth_s3():
    """(server, access key id, secret) of a moto server that checks every signature."""
    from tests.support.servers import MotoServer

    server = MotoServer()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        key_id, secret = server.enforce_auth()
        assert len(key_id) >= 16 and len(secret) >= 30 and key_id != secret
        yield server, key_id, secret
    finally:
        server.stop()


def s3_env(server, key_id: str, secret: str, root) -> dict[str, str]:
    (root / "tmp").mkdir(exist_ok=True)
    return {
        "S3_ACCESS_KEY_ID": key_id,
        "S3_SECRET_ACCESS_KEY": secret,
        "S3_ENDPOINT_URL": server.endpoint,
        "TENSORIZE_VLLM_MODEL_CACHE": str(root / "cache"),
        "TMPDIR": str(root / "tmp"),
    }


def forms(value: bytes) -> list[bytes]:
    """The ways a secret could be printed: raw, hex, base64, Python's repr of the bytes."""
    out = [
        value,
        value.hex().encode(),
        value.hex().upper().encode(),
        base64.b64encode(value),
        base64.urlsafe_b64encode(value),
        base64.b64encode(value).rstrip(b"="),
        repr(value)[2:-1].encode(),
    ]
    return [f for f in out if f]


def assert_absent(secret: bytes, *texts: bytes | str, what: str = "secret") -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for form in forms(secret):
            assert form not in data, (
                f"the {what} appears (as {form[:6]!r}...) in:\n{data[-3000:]!r}"
            )


# -- a: help texts ----------------------------------------------------------------------


# `python -m tensorize_vllm_model COMMAND --help` for both commands in one child (each start
# imports vLLM, about 15 s): runpy runs the package's __main__ as `python -m` does.
HELP_DRIVER = """
import runpy, sys
for command in ("serialize", "deserialize"):
    sys.argv = ["tensorize_vllm_model", command, "--help"]
    try:
        runpy.run_module("tensorize_vllm_model", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        print(f"=== {command} exit {e.code} ===", flush=True)
"""


def test_help_does_not_show_credentials_from_the_environment():
    secret, key_id = f"help-SECRET-{uuid.uuid4().hex}", f"HELPAKID{uuid.uuid4().hex[:12].upper()}"
    env = subprocess_env(
        {
            "S3_SECRET_ACCESS_KEY": secret,
            "S3_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ACCESS_KEY_ID": key_id,
            "COLUMNS": "200",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER],
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.decode()
    parts = re.split(r"^=== (serialize|deserialize) exit (\S+) ===$", out, flags=re.MULTILINE)
    assert parts[-1].strip() == "" and parts[2::3] == ["0", "0"], out[-3000:]
    helps = dict(zip(parts[1::3], (p.lstrip("\n") for p in parts[0::3])))
    assert sorted(helps) == ["deserialize", "serialize"]
    for command, text in helps.items():
        assert text.startswith(f"usage: python -m tensorize_vllm_model {command} "), text[:200]
        # the credential flags are documented, with the variables' names but no values
        assert "--s3-secret-access-key" in text and "--s3-access-key-id" in text
        assert "S3_SECRET_ACCESS_KEY" in text and "S3_ACCESS_KEY_ID" in text
    assert "--serialized-directory" in helps["serialize"]
    assert "--path-to-tensors" in helps["deserialize"]
    assert_absent(secret.encode(), proc.stdout, proc.stderr)
    assert_absent(key_id.encode(), proc.stdout, proc.stderr, what="access key id")


# -- b, d: a real serialize to S3 and a deserialize with vLLM's separate processes --------


@pytest.fixture(scope="module")
def encrypted_on_s3(tiny_llama, auth_s3, tmp_path_factory):
    """The tiny Llama serialized by the command line to the authenticated S3, encrypted with
    a key written locally; credentials only in the environment."""
    server, key_id, secret = auth_s3
    root = tmp_path_factory.mktemp("secrets")
    env = s3_env(server, key_id, secret, root)
    keyfile = root / "keys" / "model.key"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorize_vllm_model",
            *serialize_argv(
                tiny_llama, f"s3://{BUCKET}/{PREFIX}", "enc", "--keyfile", keyfile, "--allow-http"
            ),
        ],
        capture_output=True,
        env=subprocess_env({**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
        timeout=ENGINE_TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    directory = f"s3://{BUCKET}/{PREFIX}/vllm/tiny-llama/enc"
    return {
        "directory": directory,
        "keyfile": keyfile,
        "key": keyfile.read_bytes(),
        "env": env,
        "root": root,
        "serialize": proc,
    }


def deserialize_argv(encrypted_on_s3: dict) -> list[str]:
    """The command line's arguments to deserialize the model of `encrypted_on_s3` from S3
    (over plain HTTP) with its key file."""
    directory = encrypted_on_s3["directory"]
    return [
        "--model",
        directory,
        *ENGINE_FLAGS,
        "--model-loader-extra-config",
        '{"stream_kwargs": {"force_http": true}}',
        "deserialize",
        "--path-to-tensors",
        f"{directory}/model.tensors",
        "--keyfile",
        str(encrypted_on_s3["keyfile"]),
    ]


@pytest.mark.slow  # its fixture serializes with a vLLM engine
def test_serialize_output_holds_no_credentials_or_key(encrypted_on_s3, auth_s3):
    server, key_id, secret = auth_s3
    proc, key = encrypted_on_s3["serialize"], encrypted_on_s3["key"]
    directory = encrypted_on_s3["directory"]
    assert len(key) == 32
    out = proc.stdout.decode()
    assert out.strip().splitlines()[-1] == directory
    assert f"  wrote {directory}/model.tensors" in out.splitlines()
    assert (
        f"  key saved to {encrypted_on_s3['keyfile']} (mode 0600): keep it to load the model" in out
    )
    listing = server.client(key_id, secret).list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    assert sorted(o["Key"] for o in listing["Contents"]) == [
        f"{PREFIX}/vllm/tiny-llama/enc/{name}" for name in SERIALIZED_FILES
    ]
    assert_absent(key, proc.stdout, proc.stderr, what="encryption key")
    assert_absent(secret.encode(), proc.stdout, proc.stderr)
    assert_absent(key_id.encode(), proc.stdout, proc.stderr, what="access key id")


class ProcessWatcher:
    """Polls /proc while a process runs: every descendant's command line, as it changes
    (vLLM renames its processes, e.g. ``VLLM::EngineCore``)."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.seen: dict[int, set[bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(b")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, stack = [], [self.root_pid]
        while stack:
            pid = stack.pop()
            out.append(pid)
            stack.extend(children.get(pid, []))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._descendants():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if cmdline:
                    self.seen.setdefault(pid, set()).add(cmdline)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.slow
def test_deserialize_from_s3_keeps_secrets_out_of_processes_and_logs(encrypted_on_s3, auth_s3):
    _, key_id, secret = auth_s3
    directory, key = encrypted_on_s3["directory"], encrypted_on_s3["key"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorize_vllm_model",
            *deserialize_argv(encrypted_on_s3),
            "--prompt",
            PROMPTS[1],
            "--max-tokens",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=subprocess_env(encrypted_on_s3["env"]),
    )  # vLLM's default: engine core in a child
    watcher = ProcessWatcher(proc.pid)
    try:
        out, err = proc.communicate(timeout=ENGINE_TIMEOUT)
    finally:
        watcher.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == 0, (out[-3000:], err[-6000:])
    stdout = out.decode()
    assert re.search(
        rf"^Deserialized 3\.\d MB from {re.escape(directory)}/model\.tensors in ",
        stdout,
        re.MULTILINE,
    ), stdout
    assert f"Prompt: {PROMPTS[1]!r}" in stdout.splitlines()
    [generated] = [line for line in stdout.splitlines() if line.startswith("Generated: ")]
    assert re.fullmatch(r"Generated: '.+'", generated), generated

    # The engine ran in processes of its own, and the watcher saw them.
    cmdlines = [c for pid, seen in watcher.seen.items() for c in seen]
    others = {pid for pid in watcher.seen if pid != proc.pid}
    assert others, watcher.seen
    assert any(b"EngineCore" in c or b"spawn_main" in c for c in cmdlines), cmdlines
    # ... and no command line, output or log line holds the credentials or the key.
    for cmdline in cmdlines:
        assert_absent(secret.encode(), cmdline)
        assert_absent(key_id.encode(), cmdline, what="access key id")
        assert_absent(key, cmdline, what="encryption key")
    assert_absent(secret.encode(), out, err)
    assert_absent(key_id.encode(), out, err, what="access key id")
    assert_absent(key, out, err, what="encryption key")
    # vLLM did log its engine arguments, the loader's config among them (so the checks
    # above looked at that line): the config it logged holds no credentials.
    [logged] = [line for line in (out + err).decode().splitlines() if "non-default args:" in line]
    assert (
        f"'model_loader_extra_config': {{'tensorizer_uri': '{directory}/model.tensors', "
        f"'encryption_keyfile': '{encrypted_on_s3['keyfile']}', "
        "'stream_kwargs': {'force_http': True}}"
    ) in logged, logged


# -- c: a wrong secret ------------------------------------------------------------------


WRONG = "WRONG-secret-" + uuid.uuid4().hex


def test_wrong_secret_serialize_error_names_the_bucket_not_the_secret(
    auth_s3, tiny_llama, monkeypatch, capsys, caplog
):
    """Refused before any engine starts (in this process)."""
    from tensorize_vllm_model.cli import main

    server, key_id, secret = auth_s3
    monkeypatch.setenv("S3_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", WRONG)
    monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint)
    caplog.set_level(logging.DEBUG)
    code = main(
        [
            "--model",
            str(tiny_llama),
            *ENGINE_FLAGS,
            "serialize",
            "--serialized-directory",
            f"s3://{BUCKET}/{PREFIX}-wrong",
            "--suffix",
            "v1",
            "--allow-http",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    # (a HEAD request's 403 has no body, so no error code beyond the status)
    assert re.fullmatch(
        rf"error: access denied writing s3://{BUCKET}/{PREFIX}-wrong/vllm/tiny-llama/v1 "
        rf"\(HTTP 403( \w+)?\) at {re.escape(server.endpoint)}; credentials: the configured "
        r"access key\. Check the S3 access key and secret",
        captured.err.strip().splitlines()[-1],
    ), captured.err
    assert_absent(WRONG.encode(), captured.out, captured.err, caplog.text)
    assert_absent(secret.encode(), captured.out, captured.err, caplog.text)


@pytest.mark.slow  # its fixture serializes with a vLLM engine
def test_wrong_secret_deserialize_error_names_the_object_not_the_secret(
    auth_s3, encrypted_on_s3, monkeypatch, capsys, caplog
):
    """The files are checked (and refused) before any engine starts, in this process."""
    from tensorize_vllm_model.cli import main

    server, key_id, secret = auth_s3
    directory = encrypted_on_s3["directory"]
    for name, value in {**encrypted_on_s3["env"], "S3_SECRET_ACCESS_KEY": WRONG}.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    code = main(deserialize_argv(encrypted_on_s3))
    captured = capsys.readouterr()
    assert code == 2, captured
    assert re.fullmatch(
        rf"error: access denied listing {re.escape(directory)} \(HTTP 403( \w+)?\) at "
        rf"{re.escape(server.endpoint)}; credentials: the configured access key\. Check the "
        r"S3 access key and secret",
        captured.err.strip().splitlines()[-1],
    ), captured.err
    assert time.monotonic() - start < 60
    assert_absent(key_id.encode(), captured.err, what="access key id")
    assert_absent(WRONG.encode(), captured.out, captured.err, caplog.text)
    assert_absent(secret.encode(), captured.out, captured.err, caplog.text)
    assert_absent(
        encrypted_on_s3["key"], captured.out, captured.err, caplog.text, what="encryption key"
    )


def exception_chain_text(error: BaseException) -> str:
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts += [str(error), repr(error), repr(getattr(error, "args", ()))]
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


@pytest.mark.slow  # its fixture serializes with a vLLM engine
@pytest.mark.parametrize("api", ["open_read", "open_tensors"])
def test_wrong_secret_in_process_error_and_debug_logs(api, auth_s3, encrypted_on_s3, caplog):
    from tensorize_vllm_model import (
        StorageError,
        TensorizerConfig,
        open_tensors,
        storage,
    )

    server, key_id, secret = auth_s3
    uri = f"{encrypted_on_s3['directory']}/model.tensors"
    config = TensorizerConfig(
        tensorizer_uri=uri,
        s3_access_key_id=key_id,
        s3_secret_access_key=WRONG,
        s3_endpoint=server.endpoint,
        stream_kwargs={"force_http": True},
    )
    caplog.set_level(logging.DEBUG)  # botocore logs every request at DEBUG
    with pytest.raises(StorageError) as info:
        if api == "open_read":
            storage.open_read(uri, config.options)
        else:
            open_tensors(uri, config=config)
    message = str(info.value)
    assert re.fullmatch(
        rf"access denied reading {re.escape(uri)} \(HTTP 403( \w+)?\) at "
        rf"{re.escape(server.endpoint)}; credentials: the configured access key\. Check the "
        r"S3 access key and secret",
        message,
    ), message
    assert f"s3://{BUCKET}/{PREFIX}/vllm/tiny-llama/enc/model.tensors" in message
    assert "botocore" in caplog.text  # the DEBUG capture did see the S3 traffic
    assert_absent(WRONG.encode(), exception_chain_text(info.value), caplog.text, repr(config))
    assert_absent(secret.encode(), exception_chain_text(info.value), caplog.text)
    # the package's own log lines do not name the access key either (botocore's DEBUG
    # request dump shows it in the Authorization header: an id, not a secret)
    ours = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(("tensorize_vllm_model", "vllm.tensorize_vllm_model"))
    )
    assert key_id not in ours
