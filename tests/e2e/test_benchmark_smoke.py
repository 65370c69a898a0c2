"""The load benchmark still runs after code it uses has moved: its local scenario on a
tiny model (no engine), every method answering with a result. No figure is checked (speed
is the benchmark's to print, never a test's); what can fail is the benchmark itself, e.g. a
call into the package with an old signature."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT
from tests.support.commands import subprocess_env


def test_local_scenario_runs_every_method(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--size-gb",
            "0.01",
            "--repeats",
            "1",
            "--scenarios",
            "local",
            "--out",
            str(out),
        ],
        env=subprocess_env({"BENCH_WORK": str(tmp_path / "work")}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "latest.json").read_text())
    methods = {r["method"] for r in report["results"] if r["cache"] == "warm"}
    assert {"ours", "ours, encrypted", "safetensors.torch.load_file"} <= methods
    assert "no encrypted copy" not in proc.stdout + proc.stderr
    assert all(r["gb_per_s"] > 0 for r in report["results"]), report["results"]
