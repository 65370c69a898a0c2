"""Progress people can see: a tqdm bar on a terminal (a real pseudo-terminal here) for long
work, nothing for short work, periodic log lines when not on a terminal; and the reader's
hook reporting every byte it reads, by our own reads and by tensorizer's."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch

from tensorize_vllm_model import load_into_module, open_tensors
from tensorize_vllm_model.core.progress import progress
from tensorize_vllm_model.format.record import FileRecord
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.read.modules import meta_parameters
from tests.support import ROOT
from tests.support.commands import run_python, subprocess_env

GB = 1_000_000_000


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal (master, slave) 120 columns wide: a new one is 0 by 0, and tqdm
    draws nothing on a terminal without columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    return master, slave


def _on_pty(work) -> str:
    """Run work(stream) with `stream` a pseudo-terminal; return what reached the terminal."""
    master, slave = _terminal()
    stream = os.fdopen(slave, "w")
    try:
        work(stream)
    finally:
        stream.close()
    try:
        return _read_all(master)
    finally:
        os.close(master)


def test_bar_on_a_terminal_shows_bytes_rate_and_time_left():
    def work(stream):
        assert stream.isatty()
        with progress("Deserializing", 2 * GB, stream=stream, min_bytes=GB) as advance:
            for _ in range(4):
                advance(GB // 2)

    shown = _on_pty(work)
    assert "Deserializing" in shown
    assert "2.00G/2.00G" in shown  # bytes done of the total, in SI units (GB)
    assert "B/s" in shown  # the rate
    assert "<" in shown  # [elapsed<left]


def test_short_work_shows_nothing_on_a_terminal():
    def work(stream):
        with progress("Deserializing", GB - 1, stream=stream, min_bytes=GB) as advance:
            advance(GB - 1)

    assert _on_pty(work) == ""


def test_not_a_terminal_logs_lines_instead_of_a_bar(caplog):
    stream = io.StringIO()
    logger = logging.getLogger("tensorize_vllm_model.test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with progress(
            "Deserializing", 2 * GB, stream=stream, min_bytes=GB, log_every=0, logger=logger
        ) as advance:
            for _ in range(4):
                advance(GB // 2)
    assert stream.getvalue() == ""  # no bar
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Deserializing: 0.50 of 2.00 GB (25%), ")
    assert "GB/s, about " in lines[0] and lines[0].endswith(" s left")
    assert [line.split(" GB")[0] for line in lines] == [
        "Deserializing: 0.50 of 2.00",
        "Deserializing: 1.00 of 2.00",
        "Deserializing: 1.50 of 2.00",
    ]


def test_not_a_terminal_logs_nothing_before_the_interval(caplog):
    logger = logging.getLogger("tensorize_vllm_model.test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with progress(
            "Deserializing",
            2 * GB,
            stream=io.StringIO(),
            min_bytes=GB,
            log_every=3600,
            logger=logger,
        ) as advance:
            advance(GB)
    assert caplog.records == []


def test_disabled_shows_nothing():
    def work(stream):
        with progress(
            "Deserializing", 2 * GB, stream=stream, min_bytes=0, enabled=False
        ) as advance:
            advance(2 * GB)

    assert _on_pty(work) == ""


@pytest.fixture
def tensors_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 256))
    path = tmp_path / "model.tensors"
    write_tensors(
        str(path),
        [(n, p.detach(), False) for n, p in model.named_parameters()],
        record=FileRecord(architecture="Sequential"),
    ).commit()
    return model, path


@pytest.mark.parametrize("readers", ["local", "remote"])
def test_reader_reports_every_byte(tensors_file, readers, web_servers, web_root):
    """The hook the progress bar hangs on: the parallel reads of a local file report each
    piece from the reader threads, the reads of a remote file each tensor."""
    model, path = tensors_file
    if readers == "local":
        uri = str(path)
    else:
        (web_root / "progress.tensors").write_bytes(path.read_bytes())
        uri = f"{web_servers['http-1.1'].url}/progress.tensors"
    done = []
    with meta_parameters("cpu"):
        target = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 256))
    with open_tensors(uri) as reader:
        reader.on_bytes = done.append
        stats = load_into_module(target, reader)
        assert sum(done) == reader.total_tensor_bytes == stats.bytes
    assert len(done) >= 4
    for name, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], value)


def _python_on_terminal(code: str, *args, timeout: int) -> tuple[int, str, str]:
    """Run ``python -c CODE ARGS`` with its standard error on a pseudo-terminal:
    (exit code, what reached the terminal, standard output)."""
    master, slave = _terminal()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=subprocess_env(),
        cwd=ROOT,
        text=True,
    )
    os.close(slave)
    shown = _read_all(master)
    os.close(master)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, shown, out


VERIFY = (
    "import sys, tensorize_vllm_model.core.progress as p; p.MIN_BYTES = 0; p.LOG_EVERY = {every}; "
    "from tensorize_vllm_model.cli import main; sys.exit(main(['verify', sys.argv[1]]))"
)


def test_verify_command_draws_a_bar_on_a_terminal(tensors_file):
    """The command, with the threshold lowered to this small file: the bar on its terminal
    (standard error), the verdict on standard output as before."""
    _, path = tensors_file
    returncode, shown, out = _python_on_terminal(VERIFY.format(every=10), path, timeout=120)
    assert returncode == 0, shown
    assert "Verifying model.tensors: 100%" in shown and "B/s]" in shown
    assert out.startswith(f"OK {path}: 4 tensors")


def test_verify_command_logs_lines_when_not_on_a_terminal(tensors_file):
    _, path = tensors_file
    proc = run_python("-c", VERIFY.format(every=0), path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Verifying model.tensors: 0.00 of 0.00 GB (" in proc.stderr
    assert "\r" not in proc.stderr  # no bar
    assert proc.stdout.startswith(f"OK {path}: 4 tensors")


def test_resize_sets_the_total_the_bar_and_lines_count_to(caplog):
    """A rank that reads only its share of a converted file resizes the load's progress to
    that share: the bar ends at 100% of it, the log lines count to it."""

    def work(stream):
        with progress("Deserializing", 4 * GB, stream=stream, min_bytes=GB) as advance:
            advance.resize(2 * GB)
            for _ in range(4):
                advance(GB // 2)

    shown = _on_pty(work)
    assert "2.00G/2.00G" in shown and "100%" in shown
    logger = logging.getLogger("tensorize_vllm_model.test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with progress(
            "Deserializing", 4 * GB, stream=io.StringIO(), min_bytes=GB, log_every=0, logger=logger
        ) as advance:
            advance.resize(2 * GB)
            advance(GB)
    assert caplog.records[0].getMessage().startswith("Deserializing: 1.00 of 2.00 GB (50%)")


CONVERT = (
    "import sys, tensorize_vllm_model.core.progress as p; "
    "p.MIN_BYTES = 0; p.LOG_EVERY = {every}; "
    "import tensorize_vllm_model.format.writer as b; b.BATCH_BYTES = 1 << 20; "
    "sys.modules['vllm'] = None; "
    "from tensorize_vllm_model.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_convert_command_shows_progress(tiny_llama, tmp_path):
    """``convert`` as ``serialize``: a bar on a terminal (threshold and batch size lowered to
    this small checkpoint), log lines otherwise, each counting the checkpoint's tensor bytes."""
    args = ["--model", tiny_llama, "convert", "--serialized-directory"]
    returncode, shown, _ = _python_on_terminal(
        CONVERT.format(every=10), *args, tmp_path / "a", timeout=300
    )
    assert returncode == 0, shown
    assert "Converting: 100%" in shown and "B/s]" in shown
    proc = run_python("-c", CONVERT.format(every=0), *args, tmp_path / "b", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Converting: 0.00 of 0.00 GB (" in proc.stderr and "\r" not in proc.stderr
