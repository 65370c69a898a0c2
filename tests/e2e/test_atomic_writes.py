"""Writes are all-or-nothing: a serialize that fails or is interrupted leaves nothing at the
final names (``model.tensors``, the config/tokenizer files, the key file), and never damages
an earlier good model at the same destination.

Each file is written to a hidden temporary name beside its final name (``.NAME.XXXX.tmp-YYYY``,
see storage/local.py) and renamed into place only after everything has been written.

* The exception cases drive the real `tensorize_vllm_model` in this process, with a stand-in
  for the vLLM engine whose worker writes real (small) tensors through `write_tensors`: no
  engine start, so every failure point can be tried in milliseconds.
* The signal cases run a real command-line serialize (a real engine, in-process in the
  child) and interrupt it with SIGINT, SIGTERM or SIGKILL at the moment of its first
  commit, when every file has been written to its temporary name and none renamed yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT, SERIALIZED_FILES
from tests.support.commands import serialize_argv, subprocess_env
from tests.support.fake_engine import engine_args

# A serialize's files with the stand-in engine (a real engine's add vLLM's model info:
# tests.support.SERIALIZED_FILES).
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.tensors",
    "tensorize_model_files.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
# The model's files, copied; then the list of them the writer adds (artifacts.MANIFEST).
ARTIFACTS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
MANIFEST = "tensorize_model_files.json"


def temp_name_pattern(final: str) -> re.Pattern:
    """The hidden temporary name local staging uses for `final` (storage/local.make_temp)."""
    return re.compile(rf"^\.{re.escape(final)}\.[A-Za-z0-9_]+\.tmp-[0-9a-f]{{8}}$")


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (inode, mtime_ns, sha256) of every entry in `directory` (a rename into place
    changes the inode even when the new bytes happen to equal the old)."""
    if not directory.exists():
        return {}
    out = {}
    for path in sorted(directory.iterdir()):
        st = path.stat()
        out[path.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


# -- exception cases: the real tensorize_vllm_model, a stand-in engine -------------------


EARLIER = {name: f"earlier good {name}\n".encode() for name in MODEL_FILES}


def make_destination(root: Path, earlier: bool) -> tuple[Path, Path]:
    """(model directory, key file) under `root`; with `earlier`, an earlier model (and key)
    already there."""
    directory = root / "vllm" / "tiny-llama" / "v1"
    key = root / "keys" / "model.key"
    if earlier:
        directory.mkdir(parents=True)
        for name, data in EARLIER.items():
            (directory / name).write_bytes(data)
        key.parent.mkdir(parents=True)
        key.write_bytes(b"K" * 32)
        key.chmod(0o600)
    return directory, key


def serialize_in_process(
    tiny_llama: Path, directory: Path, key: Path, tensorizer_uri: str | None = None
):
    from tensorize_vllm_model import TensorizerConfig
    from tensorize_vllm_model.integrations.vllm.serialize import tensorize_vllm_model

    return tensorize_vllm_model(
        engine_args(tiny_llama),
        TensorizerConfig(
            tensorizer_uri=tensorizer_uri or str(directory / "model.tensors"),
            encryption_keyfile=str(key),
        ),
    )


def fail_commit_number(monkeypatch, number: int | None, seen: list[str]) -> None:
    """Make the `number`-th StagedWrite.commit raise (None: none fails); record the URIs
    committed."""
    from tensorize_vllm_model import storage

    original = storage.StagedWrite.commit

    def commit(self):
        if not self.done:
            seen.append(self.uri)
            if len(seen) == number:
                raise storage.StorageError(f"cannot write {self.uri}: Input/output error")
        return original(self)

    monkeypatch.setattr(storage.StagedWrite, "commit", commit)


def test_the_stand_in_serialize_succeeds(fake_engine, tiny_llama, tmp_path, monkeypatch):
    """The stand-in writes what a real serialize writes (so the failure cases below start
    from a serialize that works), and commits the tensors last."""
    seen: list[str] = []
    fail_commit_number(monkeypatch, None, seen)
    directory, key = make_destination(tmp_path, earlier=False)
    result = serialize_in_process(tiny_llama, directory, key)
    assert sorted(os.listdir(directory)) == MODEL_FILES
    assert os.listdir(key.parent) == ["model.key"]
    assert len(key.read_bytes()) == 32 and (key.stat().st_mode & 0o777) == 0o600
    assert seen == [str(directory / n) for n in [*ARTIFACTS, MANIFEST]] + [
        str(key),
        str(directory / "model.tensors"),
    ]
    assert result.files == [str(directory / "model.tensors")] + seen[:-1]
    assert result.tensors == 4 and result.bytes == 4 * 256 * 256 * 4
    for name in ARTIFACTS:
        assert (directory / name).read_bytes() == (tiny_llama / name).read_bytes()
    [engine] = fake_engine.instances
    assert engine.calls == [
        "tensorize_vllm_model_save",
        "tensorize_vllm_model_publish",
        "tensorize_vllm_model_commit",
    ]
    assert engine.closed


# Where the serialize fails. Every point is after the tensors were written to their staged
# file: while copying the tokenizer, at the first rename, at the second rename (config.json
# already renamed), when the worker renames the tensors (all artifacts and the key renamed).
FAILURES = [
    "copying tokenizer.json",
    "committing config.json",
    "committing generation_config.json",
    "committing model.tensors",
    "finalizing model.tensors",
]


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier-model"])
@pytest.mark.parametrize("failure", FAILURES)
def test_failed_serialize_leaves_nothing(
    fake_engine, tiny_llama, tmp_path, monkeypatch, failure, earlier
):
    from tensorize_vllm_model import StorageError

    directory, key = make_destination(tmp_path, earlier)
    before = (snapshot(directory), snapshot(key.parent))
    seen: list[str] = []
    if failure == "copying tokenizer.json":
        fail_commit_number(monkeypatch, None, seen)
        real_copy = shutil.copyfile

        def copyfile(src, dst, *args, **kwargs):
            if os.path.basename(src) == "tokenizer.json":
                # the tensors file is fully written by now
                [engine] = fake_engine.instances
                [staged] = engine.pending
                assert os.path.getsize(staged.staged.path) > 4 * 256 * 256 * 4
                raise OSError(28, "No space left on device", dst)
            return real_copy(src, dst, *args, **kwargs)

        monkeypatch.setattr(shutil, "copyfile", copyfile)
        expected: type[BaseException] = OSError
    elif failure == "committing model.tensors":  # the worker's publish (phase one)
        # after the artifacts, their list and the new key (an earlier key is used as it is)
        fail_commit_number(monkeypatch, len(ARTIFACTS) + (2 if earlier else 3), seen)
        expected = StorageError
    elif failure == "finalizing model.tensors":  # the workers' commit call (phase two)
        fail_commit_number(monkeypatch, None, seen)
        fake_engine.fail_tensors_commit = True
        expected = OSError
    else:
        name = failure.split()[-1]
        fail_commit_number(monkeypatch, ARTIFACTS.index(name) + 1, seen)
        expected = StorageError

    with pytest.raises(expected):
        serialize_in_process(tiny_llama, directory, key)

    [engine] = fake_engine.instances
    assert engine.calls[0] == "tensorize_vllm_model_save"
    assert engine.calls[-1] == "tensorize_vllm_model_abort"
    assert engine.closed and engine.pending == []
    after = (snapshot(directory), snapshot(key.parent))
    if earlier:
        # the earlier model and its key: the same files, bytes and inodes; no temporaries
        assert after == before
        assert sorted(after[0]) == MODEL_FILES and sorted(after[1]) == ["model.key"]
        for name, data in EARLIER.items():
            assert (directory / name).read_bytes() == data
        assert key.read_bytes() == b"K" * 32
    else:
        # nothing at the final names, and no temporary files either
        assert after == ({}, {}), after


RANK_FILES = ["model-rank-000.tensors", "model-rank-001.tensors"]


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier-model"])
def test_a_rank_that_fails_to_publish_leaves_no_rank_published(
    fake_engine, tiny_llama, tmp_path, monkeypatch, earlier
):
    """At TP=2, rank 1's tensors cannot be published (its rename fails) after rank 0's
    were: rank 0's file is put back too (the earlier model's, same bytes and inode, or
    nothing), with the artifacts and key. Cross-rank two-phase commit (engine.publish, then
    engine.commit)."""
    from tensorize_vllm_model import StorageError, storage

    fake_engine.world = 2
    directory, key = make_destination(tmp_path, earlier)
    if earlier:
        (directory / "model.tensors").unlink()
        for name in RANK_FILES:
            (directory / name).write_bytes(f"earlier good {name}\n".encode())
    before = (snapshot(directory), snapshot(key.parent))
    original = storage.StagedWrite.commit
    published: list[str] = []

    def commit(self):
        if self.uri.endswith(RANK_FILES[1]) and not self.done:
            assert published[-1].endswith(RANK_FILES[0])  # rank 0 is published by now
            raise StorageError(f"cannot write {self.uri}: Input/output error")
        original(self)
        published.append(self.uri)

    monkeypatch.setattr(storage.StagedWrite, "commit", commit)
    template = str(directory / "model-rank-%03d.tensors")
    with pytest.raises(StorageError, match="model-rank-001.tensors: Input/output error"):
        serialize_in_process(tiny_llama, directory, key, tensorizer_uri=template)
    [engine] = fake_engine.instances
    assert engine.calls[-2:] == ["tensorize_vllm_model_publish", "tensorize_vllm_model_abort"]
    assert (snapshot(directory), snapshot(key.parent)) == before


def test_two_ranks_publish_both_files(fake_engine, tiny_llama, tmp_path):
    fake_engine.world = 2
    directory, key = make_destination(tmp_path, earlier=False)
    template = str(directory / "model-rank-%03d.tensors")
    result = serialize_in_process(tiny_llama, directory, key, tensorizer_uri=template)
    assert sorted(os.listdir(directory)) == sorted([*ARTIFACTS, MANIFEST, *RANK_FILES])
    assert result.files[:2] == [str(directory / name) for name in RANK_FILES]
    first, second = ((directory / name).read_bytes() for name in RANK_FILES)
    assert first != second


# -- signal cases: a real command-line serialize in a child process ----------------------

# Pauses the first StagedWrite.commit (everything written to temporary names, nothing renamed
# yet), says so, and waits to be interrupted.
DRIVER = """
import sys, time
from tensorize_vllm_model import storage
from tensorize_vllm_model.cli import main

original = storage.StagedWrite.commit
paused = []

def commit(self):
    if not paused:
        paused.append(self.uri)
        print("PAUSED " + self.uri, flush=True)
        time.sleep(3600)
    return original(self)

storage.StagedWrite.commit = commit
sys.exit(main(sys.argv[1:]))
"""


class Child:
    """A child process whose stdout lines are collected by a thread (stderr to a file)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )  # its own process group, to clean up after it
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                self._thread.join(5)
                break
            time.sleep(0.1)
        raise AssertionError(
            f"no {prefix!r} line (exit {self.proc.poll()}):\n"
            + "\n".join(self.lines[-50:])
            + "\n"
            + self.stderr()[-6000:]
        )

    def stderr(self) -> str:
        self._stderr.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._thread.join(5)
        self._stderr.close()


EXIT_CODES = {
    signal.SIGINT: 128 + signal.SIGINT,
    signal.SIGTERM: 128 + signal.SIGTERM,
    signal.SIGKILL: -signal.SIGKILL,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_interrupted_serialize_keeps_the_earlier_model(
    signum, llama_serialized, tiny_llama, tmp_path
):
    good, _ = llama_serialized
    root = tmp_path / "out"
    directory = root / "vllm" / "tiny-llama" / "v1"  # where the serialize below writes
    shutil.copytree(good, directory)
    keys = tmp_path / "keys"
    keys.mkdir()
    keyfile = keys / "model.key"
    before = snapshot(directory)
    assert sorted(before) == SERIALIZED_FILES

    child = Child(
        [
            sys.executable,
            "-c",
            DRIVER,
            *serialize_argv(tiny_llama, root, "v1", "--keyfile", keyfile),
        ],
        subprocess_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),  # the patch reaches the save
        tmp_path / "stderr.log",
    )
    try:
        paused = child.wait_for_line("PAUSED ", timeout=400)
        assert paused == f"PAUSED {directory / 'config.json'}"

        # Everything is written, under temporary names only; nothing renamed yet. The file
        # about to be replaced is kept aside first (a hidden hard link to the earlier one).
        hidden = sorted(set(os.listdir(directory)) - set(SERIALIZED_FILES))
        [kept] = [n for n in hidden if re.fullmatch(r"\.config\.json\.kept-[0-9a-f]{8}", n)]
        assert os.path.samefile(directory / kept, directory / "config.json")
        staged = [n for n in hidden if n != kept]
        assert len(staged) == len(SERIALIZED_FILES), staged
        for name, temp in zip(SERIALIZED_FILES, staged):
            assert temp_name_pattern(name).match(temp), (name, temp)
        [tensors_temp] = [t for t in staged if t.startswith(".model.tensors.")]
        assert (directory / tensors_temp).stat().st_size > 3_000_000
        [key_temp] = os.listdir(keys)
        assert temp_name_pattern("model.key").match(key_temp)
        assert (keys / key_temp).stat().st_size == 32
        assert {n: before[n] for n in SERIALIZED_FILES} == {
            n: snapshot(directory)[n] for n in SERIALIZED_FILES
        }

        if signum == signal.SIGINT:
            os.killpg(child.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's process group
        else:
            os.kill(child.proc.pid, signum)  # `kill`
        try:
            code = child.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the serialize did not end within 120 s of {signum.name}:\n"
                + child.stderr()[-6000:]
            ) from None
        assert code == EXIT_CODES[signum], child.stderr()[-6000:]
        child._thread.join(10)
    finally:
        child.close()

    after = snapshot(directory)
    # The earlier model is untouched: same names, bytes and inodes (nothing renamed over it).
    assert {n: after[n] for n in SERIALIZED_FILES if n in after} == before
    for name in SERIALIZED_FILES:
        assert (directory / name).read_bytes() == (good / name).read_bytes()
    leftovers = sorted(set(after) - set(SERIALIZED_FILES))
    key_leftovers = sorted(os.listdir(keys))
    assert not keyfile.exists()  # no key was published
    if signum == signal.SIGKILL:
        # No chance to clean up: the temporaries may stay, but only under hidden names
        # that no reader takes for a model file.
        assert leftovers == hidden
        assert key_leftovers == [key_temp]
    else:
        assert leftovers == [] and key_leftovers == [], (leftovers, key_leftovers)
        # the interrupted serialize published nothing and printed no result
        assert not any(line.startswith(("Serialized", "  wrote")) for line in child.lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment",
    ["Initializing a V1 LLM engine", "Starting to load model"],
    ids=["engine-core-start", "weights-loading"],
)
def test_sigint_while_the_engine_starts_publishes_nothing(moment, tiny_llama, tmp_path):
    """`kill -INT` of the command while vLLM starts its engine (in its own process, as by
    default): vLLM drops a KeyboardInterrupt there, so the serialize used to carry on and
    publish. It must end with exit code 130, one line, and nothing written."""
    root = tmp_path / "out"
    child = Child(
        [
            sys.executable,
            "-m",
            "tensorize_vllm_model",
            *serialize_argv(tiny_llama, root, "s"),
        ],
        subprocess_env({}),
        tmp_path / "stderr.log",
    )
    try:
        deadline = time.monotonic() + 400
        while not any(moment in line for line in list(child.lines)):  # vLLM's log (stdout)
            assert child.proc.poll() is None and time.monotonic() < deadline, (
                "\n".join(child.lines[-50:]) + child.stderr()[-6000:]
            )
            time.sleep(0.2)
        os.kill(child.proc.pid, signal.SIGINT)
        try:
            code = child.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "no exit within 120 s of SIGINT:\n" + child.stderr()[-6000:]
            ) from None
        child._thread.join(10)
        stderr = child.stderr()
    finally:
        child.close()
    assert code == 130, stderr[-6000:]
    assert "interrupted (SIGINT)" in stderr.splitlines(), stderr[-6000:]
    assert "raise KeyboardInterrupt" not in stderr and "took over" not in stderr
    assert not any(line.startswith(("Serialized", "  wrote")) for line in child.lines)
    assert [files for _, _, files in os.walk(root) if files] == []
