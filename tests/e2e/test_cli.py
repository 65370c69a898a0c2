"""The command line's refusals: one line naming the flag or file, exit code 2, no
traceback, and no engine started (these tests take seconds)."""

import signal
import socket
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.commands import run_cli, run_main, subprocess_env


def main_serialize(capsys, model, directory, *extra, command="serialize"):
    """`run_main` of ``--model MODEL COMMAND --serialized-directory DIRECTORY EXTRA...``."""
    return run_main(capsys, "--model", model, command, "--serialized-directory", directory, *extra)


def start_python(*args) -> subprocess.Popen:
    """Start ``python ARGS`` in the repository's root, its output piped (text)."""
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env({}),
        cwd=ROOT,
    )


@pytest.fixture
def moto_credentials(moto, monkeypatch):
    """The moto S3 server's endpoint and credentials in the environment, as a user sets them."""
    monkeypatch.setenv("S3_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("S3_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "testing")
    return moto


@pytest.fixture(scope="module")
def tensors_file(tmp_path_factory):
    import torch

    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    path = tmp_path_factory.mktemp("cli") / "model.tensors"
    write_tensors(str(path), [("w", torch.ones(2, 2), False)], record=FileRecord()).commit()
    return path


def test_missing_subcommand(capsys, tiny_llama):
    code, err = run_main(capsys, "--model", tiny_llama)
    assert code == 2
    assert err.endswith(
        "error: a command is required: serialize, deserialize, inspect, verify or convert"
    )


@pytest.mark.parametrize(
    "extra,expected",
    [
        ("{bad", "--model-loader-extra-config is not valid JSON"),
        ("[1, 2]", "--model-loader-extra-config must be a JSON object, got list"),
        ('{"num_reader": 2}', "unknown key(s) in --model-loader-extra-config: 'num_reader'"),
        (
            '{"deserialization_kwargs": {"dtype": "float16"}}',
            "deserialization_kwargs key(s) 'dtype' are not allowed",
        ),
    ],
)
def test_bad_extra_config(capsys, tiny_llama, tensors_file, extra, expected):
    code, err = run_main(
        capsys,
        "--model",
        tiny_llama,
        "--model-loader-extra-config",
        extra,
        "deserialize",
        "--path-to-tensors",
        tensors_file,
    )
    assert code == 2
    assert err.splitlines()[-1].startswith("error: ") and expected in err


def test_missing_tensors_file(capsys, tiny_llama, tmp_path):
    code, err = run_main(
        capsys,
        "--model",
        tiny_llama,
        "deserialize",
        "--path-to-tensors",
        tmp_path / "absent.tensors",
    )
    assert code == 2
    assert err.splitlines()[-1] == f"error: no such file: {tmp_path / 'absent.tensors'}"


def test_missing_model_directory(capsys, tmp_path):
    code, err = main_serialize(capsys, tmp_path / "no-model", tmp_path / "out")
    assert code == 2
    assert err.splitlines()[-1] == f"error: --model {tmp_path / 'no-model'}: no such directory"
    assert not (tmp_path / "out").exists()


def test_deserialize_needs_a_path(capsys, tiny_llama):
    code, err = run_main(capsys, "--model", tiny_llama, "deserialize")
    assert code == 2 and err.splitlines()[-1] == (
        "error: deserialize needs --serialized-directory or --path-to-tensors (or --tensorizer-uri)"
    )


def test_tensorizer_uri_is_path_to_tensors(tiny_llama, tensors_file):
    import argparse

    from tensorize_vllm_model.cli import deserialize_config

    ns = argparse.Namespace(
        path_to_tensors=None,
        tensorizer_uri=str(tensors_file),
        keyfile=None,
        encryption_keyfile=None,
        verify_hash=True,
        num_readers=2,
        s3_access_key_id=None,
        s3_secret_access_key=None,
        s3_endpoint=None,
        model_loader_extra_config={"deserialization_kwargs": {"num_readers": 1}},
    )
    config = deserialize_config(ns)
    assert config.tensorizer_uri == str(tensors_file)
    assert config.verify_hash is True and config.num_readers == 2
    assert config.deserialization_kwargs == {"num_readers": 1}


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ("{oops", "argument --serialization-kwargs: not valid JSON"),
        ('"text"', "argument --serialization-kwargs: must be a JSON object, got str"),
        (
            '{"limit_cpu_concurency": 2}',
            "--serialization-kwargs: unknown or reserved key(s) 'limit_cpu_concurency'",
        ),
        ('{"encryption": null}', "--serialization-kwargs: unknown or reserved key(s) 'encryption'"),
    ],
)
def test_bad_serialization_kwargs(capsys, tiny_llama, tmp_path, kwargs, expected):
    code, err = main_serialize(
        capsys, tiny_llama, tmp_path / "out", "--serialization-kwargs", kwargs
    )
    assert code == 2 and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["serialize", "convert"])
def test_compress_tensors_is_refused_before_anything_is_written(
    capsys, tiny_llama, tmp_path, command
):
    # tensorizer 2.12 ignores it but imports lz4 for it: a ModuleNotFoundError traceback.
    code, err = main_serialize(
        capsys,
        tiny_llama,
        tmp_path / "out",
        "--serialization-kwargs",
        '{"compress_tensors": true}',
        command=command,
    )
    assert code == 2 and "--serialization-kwargs: compress_tensors is not implemented" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ('{"limit_cpu_concurrency": 0}', "limit_cpu_concurrency parameter: must be positive"),
        ('{"limit_cpu_concurrency": "2"}', "limit_cpu_concurrency parameter: expected int"),
    ],
)
def test_a_value_tensorizer_refuses_names_the_flag(capsys, tiny_llama, tmp_path, kwargs, expected):
    # tensorizer's TypeError / ValueError was a traceback (exit 1).
    code, err = main_serialize(
        capsys, tiny_llama, tmp_path / "out", "--serialization-kwargs", kwargs, command="convert"
    )
    assert code == 2 and f"error: --serialization-kwargs: {expected}" in err
    assert not (tmp_path / "out").exists()


def test_bad_suffix(capsys, tiny_llama, tmp_path):
    code, err = main_serialize(capsys, tiny_llama, tmp_path / "out", "--suffix", "../../escape")
    assert code == 2 and "--suffix must be a single directory name" in err


def test_refusal_in_a_real_process_has_no_traceback(tiny_llama, tmp_path):
    proc = run_cli(
        "--model",
        tiny_llama,
        "--model-loader-extra-config",
        "{bad",
        "deserialize",
        "--path-to-tensors",
        tmp_path / "x.tensors",
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --model-loader-extra-config is not valid JSON")
    )


def _serialize_args(*argv):
    from tensorize_vllm_model.cli import parse_command_line

    return parse_command_line([str(a) for a in argv])


def test_stream_kwargs_and_transport_flags_reach_serialize(tiny_llama, tmp_path):
    from tensorize_vllm_model.cli import serialize_config

    args = _serialize_args(
        "--model",
        tiny_llama,
        "--model-loader-extra-config",
        '{"stream_kwargs": {"force_http": true, "workers": 3}}',
        "serialize",
        "--serialized-directory",
        "s3://bucket/models",
        "--suffix",
        "v2",
        "--s3-endpoint",
        "http://127.0.0.1:9",
        "--ca-bundle",
        "/etc/ca.pem",
    )
    config = serialize_config(args)
    assert config.tensorizer_uri == "s3://bucket/models/vllm/tiny-llama/v2/model.tensors"
    options = config.options
    assert options.get("force_http") is True and options.workers == 3
    assert options.get("s3_endpoint") == "http://127.0.0.1:9" and options.ca_bundle == "/etc/ca.pem"
    flagged = serialize_config(
        _serialize_args(
            "--model", tiny_llama, "serialize", "--serialized-directory", "s3://b", "--allow-http"
        ),
    )
    assert flagged.options.get("force_http") is True
    assert flagged.given_uri is None  # rank files: the write plan's (tests/unit/test_cli_plan.py)


def test_serialize_to_plain_http_endpoint_refused_before_engine(
    capsys, tiny_llama, moto_credentials
):
    code, err = main_serialize(capsys, tiny_llama, "s3://models/refused", "--suffix", "v1")
    assert code == 2
    assert "plain http://" in err and "--allow-http" in err
    listing = moto_credentials.client().list_objects_v2(Bucket="models", Prefix="refused/")
    assert "Contents" not in listing


def test_serialize_to_missing_bucket_refused_before_engine(capsys, tiny_llama, moto_credentials):
    code, err = main_serialize(capsys, tiny_llama, "s3://no-such-bucket/x", "--allow-http")
    assert code == 2
    assert err.splitlines()[-1].startswith("error: no such bucket: no-such-bucket")


def test_serialize_to_unwritable_directory_refused(capsys, tiny_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = main_serialize(capsys, tiny_llama, blocker / "out")
    assert code == 2 and f"{blocker} is not a directory" in err


@pytest.mark.parametrize("command", ["serialize", "convert"])
def test_writing_to_an_uncreatable_directory_refused(capsys, tiny_llama, command):
    # /proc lets root pass os.access, but no directory can be made there: refused before
    # any engine starts, with the path named.
    code, err = main_serialize(capsys, tiny_llama, "/proc/nope", "--suffix", "s", command=command)
    assert code == 2, err
    assert err.splitlines() == [
        (
            f"error: cannot write under /proc/nope/vllm/{tiny_llama.name}/s: cannot create a "
            "directory in /proc (No such file or directory)"
        )
    ]


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_ctrl_c_on_a_stalled_read_prints_one_line(command):
    """A server that accepts the connection and never answers (a slow URL): Ctrl-C ends the
    command with one line and exit code 130, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/model.tensors"
        proc = start_python("-m", "tensorize_vllm_model", command, url)
        try:
            server.settimeout(60)
            connection, _ = server.accept()  # the command now waits for an answer
            connection.recv(1)  # ... and has sent its request
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        connection.close()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted (SIGINT)"], stderr


def test_worker_errors_come_back_as_the_package_errors():
    """A worker method's error comes back as an answer (vLLM would log its traceback and
    raise a bare RuntimeError) and is raised again in the command as the error it was."""
    from tensorize_vllm_model.core.errors import StorageError, TensorizeError
    from tensorize_vllm_model.integrations.vllm.engine import raise_worker_errors
    from tensorize_vllm_model.integrations.vllm.messages import WorkerFailure
    from tensorize_vllm_model.integrations.vllm.worker import worker_call

    class Worker:
        @worker_call
        def save(self, uri):
            raise StorageError(f"cannot write {uri}: No space left on device")

    answer = Worker().save("/full/model.tensors")
    with pytest.raises(StorageError, match="^cannot write /full/model.tensors: No space left"):
        raise_worker_errors([{"rank": 0}, answer])
    with pytest.raises(TensorizeError, match="^odd$"):
        raise_worker_errors([WorkerFailure(message="odd", kind="NotAnError")])
    assert raise_worker_errors([{"rank": 0}]) == [{"rank": 0}]


HANGING_CLEANUP = """
import sys, threading, time
from tensorize_vllm_model.core import interrupts
interrupts.GRACE_SECONDS = 1.0
interrupts.install()
# A thread that never ends, as an engine that does not shut down: it would hold the
# interpreter's exit forever.
threading.Thread(target=time.sleep, args=(3600,)).start()
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_hanging_clean_up_ends_after_the_grace_period(signum):
    proc = start_python("-c", HANGING_CLEANUP)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        returncode = proc.wait(timeout=30)
        stderr = proc.stderr.read()
    finally:
        proc.kill()
    assert returncode == 128 + signum, stderr
    assert f"the clean-up after {signum.name} took over 1 s; exiting" in stderr
