"""Engine-ready time with compilation on (vLLM's default; no ``enforce_eager``): a fresh node
(empty caches) without the shipped compile cache, a fresh node with it, and a warm node
(caches already local); plus one eager start for scale. Same greedy tokens required.

    .venv/bin/python benchmarks/compile_cache.py [--model .models/SmolLM2-135M-Instruct]
        [--repeats 2] [--work /tmp/compile-cache-bench] [--out results/compile-cache.json]

The model is serialized once (its capture engine compiles, so the cache is kept beside the
tensors); each start then runs in a fresh process, ``LLM(dir, load_format="tensorizer")``,
with its own ``VLLM_CACHE_ROOT`` and ``TORCHINDUCTOR_CACHE_DIR``: empty for a fresh node
(``TENSORIZE_VLLM_MODEL_COMPILE_CACHE=0`` for "without"), the one a shipped start filled for
a warm node. "Ready" is from the process's first line (imports included) to ``LLM(...)``
returning. The modes alternate within each repeat; each engine start takes the machine's
engine lock (``flock /tmp/vllm-engine.lock``) when ``flock`` is present, unless
``--no-lock`` (run the whole benchmark under the lock instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = "/tmp/vllm-engine.lock"
PROMPTS = ["The capital of France is", "Once upon a time there was"]
ENGINE = {"dtype": "bfloat16", "max_model_len": 512, "gpu_memory_utilization": 0.3}
ENGINE_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--gpu-memory-utilization", "0.3"]

CHILD = """
import json, sys, time
start = time.perf_counter()
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    spec = json.loads(sys.argv[1])
    llm = LLM(**spec["llm"])
    ready = time.perf_counter() - start
    outputs = llm.generate(spec["prompts"], SamplingParams(max_tokens=16, temperature=0))
    print("RESULT " + json.dumps({"ready_s": ready,
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "text": [o.outputs[0].text for o in outputs]}), flush=True)
"""


_LOCKING = True  # off with --no-lock (the caller holds the machine's engine lock already)


def _locked(argv: list[str]) -> list[str]:
    return ["flock", LOCK, *argv] if _LOCKING and shutil.which("flock") else argv


def _env(cache: Path, switch: bool) -> dict[str, str]:
    src = str(ROOT / "src")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TENSORIZE_VLLM_MODEL_COMPILE_CACHE": "1" if switch else "0",
    }


def serialize(model: str, work: Path) -> Path:
    directory = work / "serialized"
    target = directory / "vllm" / Path(model).name / "v1"
    if (target / "compile-cache-rank-000.tar").exists():
        return target
    cache = work / "cache-serialize"
    shutil.rmtree(cache, ignore_errors=True)
    argv = [sys.executable, "-m", "tensorize_vllm_model", "--model", model, *ENGINE_FLAGS]
    argv += ["serialize", "--serialized-directory", str(directory), "--suffix", "v1"]
    began = time.perf_counter()
    subprocess.run(_locked(argv), env=_env(cache, True), check=True)
    print(f"serialized (capture engine compiling) in {time.perf_counter() - began:.0f} s")
    return target


def start(target: Path, cache: Path, *, switch: bool, eager: bool = False) -> dict:
    spec = {
        "llm": {"model": str(target), "load_format": "tensorizer", **ENGINE},
        "prompts": PROMPTS,
    }
    if eager:
        spec["llm"]["enforce_eager"] = True
    argv = [sys.executable, "-c", CHILD, json.dumps(spec)]
    proc = subprocess.run(
        _locked(argv), env=_env(cache, switch), capture_output=True, text=True, timeout=1200
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    log = proc.stdout + proc.stderr  # vLLM logs to stdout by default
    result["aot_loaded"] = "Directly load AOT compilation" in log
    result["restored"] = "Put the shipped compile cache" in log
    result["compiled_again"] = "Compiling model again" in log
    result["model_info_restored"] = "Put the shipped model info" in log
    return result


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / ".models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--work", default=os.path.join(tempfile.gettempdir(), "compile-cache-bench")
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "compile-cache.json")
    )
    parser.add_argument("--no-lock", action="store_true", help="the caller holds the lock")
    args = parser.parse_args(argv)
    global _LOCKING
    _LOCKING = not args.no_lock
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target = serialize(args.model, work)
    runs: dict[str, list[dict]] = {
        "fresh, no shipped cache": [],
        "fresh, shipped cache": [],
        "warm node": [],
    }
    for repeat in range(args.repeats):
        fresh = work / f"fresh-{repeat}"
        for mode, cache, switch in (
            ("fresh, shipped cache", fresh, True),
            ("warm node", fresh, False),  # the caches the shipped start filled, now local
            ("fresh, no shipped cache", work / f"cold-{repeat}", False),
        ):
            if mode != "warm node":
                shutil.rmtree(cache, ignore_errors=True)
            result = start(target, cache, switch=switch)
            runs[mode].append(result)
            print(
                f"repeat {repeat}: {mode}: ready {result['ready_s']:.1f} s "
                f"(AOT loaded: {result['aot_loaded']}, restored: {result['restored']}, "
                f"model info put back: {result['model_info_restored']})",
                flush=True,
            )
    eager = start(target, work / "eager", switch=False, eager=True)
    print(f"eager: ready {eager['ready_s']:.1f} s", flush=True)
    tokens = {json.dumps(r["tokens"]) for rs in runs.values() for r in rs}
    summary = {mode: _summary([r["ready_s"] for r in rs]) for mode, rs in runs.items()}
    cold, shipped, warm = (summary[m]["median"] for m in runs)
    report = {
        "model": args.model,
        "engine": ENGINE,
        "summary": summary,
        "eager_ready_s": eager["ready_s"],
        "shipped_vs_warm": shipped / warm,
        "shipped_sooner_than_cold": 1 - shipped / cold,
        "same_tokens": len(tokens) == 1,
        "eager_same_tokens": json.dumps(eager["tokens"]) in tokens,
        "text": runs["fresh, shipped cache"][0]["text"],
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for mode, s in summary.items():
        print(f"{mode:26s} ready {s['median']:6.1f} s (min {s['min']:.1f}, max {s['max']:.1f})")
    print(f"eager (for scale)          ready {eager['ready_s']:6.1f} s")
    print(
        f"shipped / warm {shipped / warm:.2f} (target <= 1.15); shipped sooner than cold by "
        f"{100 * (1 - shipped / cold):.0f}% (target >= 40%); same tokens: {report['same_tokens']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
