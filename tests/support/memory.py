"""Host memory of a load in a fresh process: `probe` runs memory_probe.py (beside this
module) and returns its figures (tests/e2e/test_memory.py, tests/contract/test_file_checks.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import SUPPORT
from tests.support.commands import subprocess_env

PROBE = SUPPORT / "memory_probe.py"


def probe(uri: str, warmup_uri: str, config: dict, *, expect_error: bool = False) -> dict:
    """Memory figures of loading `uri` in a fresh process (see memory_probe.py); with
    `expect_error`, the load's error too."""
    proc = subprocess.run(
        [sys.executable, str(PROBE)],
        capture_output=True,
        text=True,
        input=json.dumps(
            {"uri": uri, "warmup_uri": warmup_uri, "config": config, "expect_error": expect_error}
        ),
        env=subprocess_env(),
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
