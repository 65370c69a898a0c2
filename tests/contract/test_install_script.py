"""scripts/install.sh on a nearly full disk: it warns before pip starts, naming the place and
the space it needs, and keeps pip's download cache out of the way (a CI run once stopped in
pip with "No space left on device" and nothing before it said why).

Runs the real script in a copy of the repository's install inputs; only `df` (to report a
nearly full disk) and the virtual environment's python (so that nothing is installed) are
stand-ins, put first on PATH or in .venv."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

FAKE_DF = """#!/bin/sh
echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
echo "/dev/fake 262144000 259000000 {free_kb} 99% /"
"""
# Records pip's arguments and answers every other call (the script's checks) with success.
FAKE_PYTHON = """#!/bin/sh
if [ "$2" = pip ]; then echo "$*" >> "$(dirname "$0")/pip-calls"; fi
cat > /dev/null 2>&1 || true
exit 0
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", repo / "scripts" / "install.sh")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    (repo / ".venv" / "bin").mkdir(parents=True)
    _executable(repo / ".venv" / "bin" / "python", FAKE_PYTHON)
    (repo / ".models" / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (repo / ".models" / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    return repo


def _run_install(repo: Path, **environ: str) -> tuple[str, str]:
    """scripts/install.sh run in `repo` with `environ` added; (its stderr, the pip calls
    the stand-in venv python recorded)."""
    env = {
        **os.environ,
        "PYTHON": str(repo / ".venv" / "bin" / "python"),
        "VLLM_BUILD": "cpu",
        **environ,
    }
    done = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr, (repo / ".venv" / "bin" / "pip-calls").read_text()


def _install(repo: Path, tmp_path: Path, free_kb: int) -> tuple[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "df", FAKE_DF.format(free_kb=free_kb))
    return _run_install(repo, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))


def test_a_nearly_full_disk_is_named_before_pip_starts(fake_repo: Path, tmp_path: Path) -> None:
    stderr, calls = _install(fake_repo, tmp_path, free_kb=2 * 1024 * 1024)
    warning = [line for line in stderr.splitlines() if "GB free on" in line]
    assert warning, stderr
    assert f"2 GB free on {fake_repo}" in warning[0]
    assert "needs about 6 GB" in warning[0] and "No space left on device" in warning[0]
    assert stderr.index("GB free on") < stderr.index("installing the package")
    installs = [call for call in calls.splitlines() if " install " in call]
    assert installs and all("--no-cache-dir" in call for call in installs), calls


def test_plenty_of_space_says_nothing_and_keeps_the_cache(fake_repo: Path, tmp_path: Path) -> None:
    stderr, calls = _install(fake_repo, tmp_path, free_kb=100 * 1024 * 1024)
    assert "GB free on" not in stderr
    assert calls and "--no-cache-dir" not in calls


def test_a_tmpdir_df_cannot_read_is_no_reason_to_stop(fake_repo: Path, tmp_path: Path) -> None:
    """A $TMPDIR that does not exist (Python falls back to /tmp, so pip works): the real df
    fails there, and the script goes on without a word about it."""
    stderr, calls = _run_install(fake_repo, TMPDIR=str(tmp_path / "missing" / "dir"))
    assert "missing" not in stderr
    assert calls
