"""Print a results JSON of run.py as the Markdown tables of docs/performance.md.

.venv/bin/python benchmarks/markdown.py [benchmarks/results/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def gb(value: float | None) -> str:
    return f"{value / 1e9:.2f}" if value is not None else "-"


def loads(results: list[dict]) -> list[str]:
    lines = [
        "| scenario | cache | method | GB/s median (min–max) | s | RSS+ GB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["scenario"] == "vllm":
            continue
        lines.append(
            f"| {r['scenario']} | {r['cache']} | {r['method']} | {r['gb_per_s']:.2f} "
            f"({r['gb_per_s_min']:.2f}–{r['gb_per_s_max']:.2f}) | {r['seconds']:.2f} | "
            f"{gb(r.get('peak_rss_over_baseline'))} |"
        )
    return lines


def engines(results: list[dict]) -> list[str]:
    lines = [
        "| loader | engine ready s, median (min–max) | weights s, median (min–max) "
        "| worker peak RSS GB | engine RSS at ready GB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r["scenario"] != "vllm":
            continue
        weights = (
            f"{r['weights_seconds']:.2f} ({r['weights_seconds_min']:.2f}–"
            f"{r['weights_seconds_max']:.2f})"
            if "weights_seconds" in r
            else "not logged"
        )
        lines.append(
            f"| {r['method']} | {r['ready_seconds']:.1f} ({r['ready_seconds_min']:.1f}–"
            f"{r['ready_seconds_max']:.1f}) | {weights} | {gb(r.get('worker_peak_rss'))} | "
            f"{gb(r.get('engine_rss_ready'))} |"
        )
    return lines


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest.json")
    report = json.loads(path.read_text())
    print("\n".join(loads(report["results"])))
    print()
    print("\n".join(engines(report["results"])))


if __name__ == "__main__":
    main()
