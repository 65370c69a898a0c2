"""The GPU read sweep (benchmarks/gpu_sweep.py) runs end to end: no GPU here, so with
``--device cpu`` (plain buffers and copies instead of page-locked ones and CUDA streams),
the same code paths and its check that every load's bytes equal the file's. No figure is
checked: speed is the benchmark's to print (it runs on a GPU machine; docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT
from tests.support.commands import subprocess_env


def test_gpu_sweep_runs_on_the_cpu(tmp_path):
    out = tmp_path / "sweep.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_sweep.py"), "--device", "cpu"]
    argv += ["--size-gb", "0.03", "--quick", "--repeats", "1", "--work", str(tmp_path)]
    proc = subprocess.run(
        [*argv, "--out", str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["h2d_ceiling"]) == {"1", "2", "4"}
    assert [(e["buffers"], e["streams"]) for e in report["warm"]] == [(2, 1), (3, 2)]
    assert len(report["cold"]) == 2 and report["cold"][0]["evicted_by"] == "fadvise"
    assert report["best_warm_vs_h2d_ceiling"] > 0 and report["cold_ceiling"] > 0
    assert not (tmp_path / "gpu-sweep.bin").exists()
