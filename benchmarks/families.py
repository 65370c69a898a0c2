"""The family matrix: every common model family through serialize and convert, against
vLLM's default loader (``make families``; it writes benchmarks/results/families-tokens.md,
and docs/families.md holds the tables of the runs the project took, with their dates).

For each family (`scripts/family_models.FAMILIES`: a tiny random checkpoint from
transformers' own config class) one process runs, one engine at a time:

* ``default`` at TP=1 and TP=2: vLLM's default loader on the checkpoint, the reference;
* ``serialize`` at TP=1: the package's ``serialize``, then that file loaded
  (``load_format="tensorizer"``);
* ``convert`` at TP=1 and TP=2: the package's ``convert`` (no engine), then loaded.

Each load's greedy tokens (4 prompts x 16 tokens; for the pooling model, its embeddings) are
compared with the default loader's at the same TP. A family the CPU build cannot run gets
vLLM's error in its row. Every engine takes /tmp/vllm-engine.lock (the project's one-engine-
at-a-time rule on a shared machine); the table is rewritten after each family.

    .venv/bin/python benchmarks/families.py [--families gpt2,qwen2] [--out benchmarks/results/families-tokens.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import glob
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from demo_models import MAX_TOKENS, PROMPTS  # noqa: E402

LOCK = "/tmp/vllm-engine.lock"
PATHS = [("default", 1), ("default", 2), ("serialize", 1), ("convert", 1), ("convert", 2)]
# Every family's TP=1 cells first, then every family's TP=2 cells: each family holds the
# engine lock for one phase only (a minute or two), so the machine's other work interleaves.
PHASES = {
    1: [("default", 1), ("convert", 1), ("serialize", 1)],
    2: [("default", 2), ("convert", 2)],
}
ENGINE_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager"]


@contextlib.contextmanager
def engine_lock():
    """The machine's one-engine lock, taken once for a whole family (its engines run one
    after another): re-entrant within this process."""
    global _held
    if _held or os.environ.get("FAMILIES_LOCK_HELD"):  # this process, or the parent, has it
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held = True
        try:
            yield
        finally:
            _held = False
            fcntl.flock(f, fcntl.LOCK_UN)


_held = False


@contextlib.contextmanager
def tp_env(tp: int):
    """TP=2 on the CPU: one core per rank (FIELD-NOTES). TP=1: the engine core in this
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as the tests run it: about half the start)."""
    settings = (
        {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    )
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_engine(model: str, tp: int, pooling: bool, **extra) -> list:
    """Greedy tokens (or embeddings) of one engine, started in a process of its own: a
    second vLLM engine in one process does not always repeat the first's tokens
    (deepseek_v2 at TP=2: vLLM's default loader twice in one process gave two token sets,
    so the reference was not stable)."""
    kwargs = {
        "model": model,
        "dtype": "bfloat16",
        "max_model_len": 256,
        "enforce_eager": True,
        "tensor_parallel_size": tp,
        # the KV cache's share of host memory: tiny models need a few MB of it
        "gpu_memory_utilization": 0.05,
        **extra,
    }
    if pooling:
        kwargs["runner"] = "pooling"
    spawn = multiprocessing.get_context("spawn")
    with engine_lock(), tp_env(tp), ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_engine_outputs, kwargs, pooling).result()


def _engine_outputs(kwargs: dict, pooling: bool) -> list:
    """`run_engine`'s child process: start the engine, generate (or embed), shut it down."""
    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    try:
        if pooling:
            return [list(o.outputs.embedding) for o in llm.embed(PROMPTS)]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    finally:
        llm.llm_engine.engine_core.shutdown()


def cli(*argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tensorize_vllm_model", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(last_error(proc.stderr))


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[-300:]
    return (lines[-1] if lines else "failed")[-300:]


def compare(got: list, want: list, pooling: bool) -> str:
    if pooling:
        import torch

        diff = max(
            float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(got, want)
        )
        return "same" if diff <= 1e-5 else f"DIFFERENT (max abs diff {diff:.3g})"
    same = sum(a == b for a, b in zip(got, want))
    return "same" if same == len(want) else f"DIFFERENT ({same}/{len(want)} prompts same)"


def one_family(family: str, work: Path, phase: int) -> dict:
    """The paths of one family in one phase: {"<path> TP=<n>": result text}."""
    from family_models import build_family

    pooling = family == "embedding"
    checkpoint = build_family(work / family, family)
    results: dict[str, str] = {}
    reference: dict[int, list] = {}
    with engine_lock():
        for path, tp in PHASES[phase]:
            _cell(family, checkpoint, work, path, tp, pooling, reference, results)
    return results


def _cell(
    family: str,
    checkpoint: Path,
    work: Path,
    path: str,
    tp: int,
    pooling: bool,
    reference: dict,
    results: dict,
) -> None:
    """Run one path of one family into `results` (whatever it raised, as its text)."""
    key = f"{path} TP={tp}"
    started = time.time()
    try:
        results[key] = one_path(checkpoint, work / f"{family}-{path}", path, tp, pooling, reference)
    except Exception as e:  # noqa: BLE001 - the row records whatever vLLM raised
        results[key] = "ERROR: " + " ".join(f"{type(e).__name__}: {e}".split())[:300]
    print(
        f"[families] {family} {key}: {results[key]} ({time.time() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def one_path(
    checkpoint: Path, out: Path, path: str, tp: int, pooling: bool, reference: dict
) -> str:
    """One cell: the default loader's run (kept in `reference`), or a path's comparison."""
    flags = [*ENGINE_FLAGS, *(["--runner", "pooling"] if pooling else [])]
    if path == "default":
        reference[tp] = run_engine(str(checkpoint), tp, pooling)
        return "ran"
    if tp not in reference:
        return "-"
    out_dir = ["--serialized-directory", str(out), "--suffix", "v1"]
    if path == "serialize":
        with engine_lock():
            cli(
                "--model",
                str(checkpoint),
                *flags,
                "--gpu-memory-utilization",
                "0.05",
                "serialize",
                *out_dir,
            )
    elif not glob.glob(str(out / "vllm" / "*" / "v1")):
        cli("--model", str(checkpoint), "convert", *out_dir)
    directory = glob.glob(str(out / "vllm" / "*" / "v1"))[0]
    got = run_engine(directory, tp, pooling, load_format="tensorizer")
    return compare(got, reference[tp], pooling)


def table(rows: dict[str, dict], version: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"{p} TP={t}" for p, t in PATHS]
    lines = [
        "# Model families: serialize and convert against vLLM's default loader",
        "",
        f"Run {date}, vLLM {version} (CPU build), `make families` (benchmarks/families.py).",
        "Each family is a tiny random checkpoint from transformers' config class "
        "(scripts/family_models.py). `default` is vLLM's default loader on the checkpoint "
        '("ran": its greedy tokens are the reference); every other cell compares that '
        "path's greedy tokens (4 prompts x 16; embeddings for `embedding`, a Qwen3 decoder "
        "with a sentence-transformers mean-pooling config) with the default loader's at the "
        'same TP. "-": not run, the default loader itself failed at that TP.',
        "",
        "| family | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    for family, results in rows.items():
        cells = [results.get(h, "not run").replace("|", "/") for h in head]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def jobs(families: list[str], phases: list[int]) -> list[tuple[str, int]]:
    """(family, phase) in run order: the first family's phases, then every other family's
    TP=1 cells, then their TP=2 cells (so a short run still has whole rows for the first
    family and the TP=1 column for all)."""
    first, rest = families[:1], families[1:]
    return [(f, p) for f in first for p in phases] + [(f, p) for p in phases for f in rest]


def run_family(family: str, work: str, phase: int, timeout: int) -> dict:
    """One family's phase in a process of its own: its cells, or the failure of that
    process in its first cell."""
    first = f"{PHASES[phase][0][0]} TP={PHASES[phase][0][1]}"
    argv = [sys.executable, __file__, "--one", family, "--work", work, "--phase", str(phase)]
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {first: f"ERROR: over {timeout} s"}
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not found:
        return {first: f"ERROR: process exited {proc.returncode}"}
    return json.loads(found[-1][7:])


def main(argv: list[str] | None = None) -> int:
    from family_models import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "families-tokens.md")
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--phase", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--phases", default="1,2", help="1: the TP=1 cells, 2: the TP=2 cells (default both)"
    )
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per family")
    parser.add_argument(
        "--hold", type=int, default=480, help="seconds to hold the engine lock at a time"
    )
    args = parser.parse_args(argv)
    if args.one:
        result = one_family(args.one, Path(args.work) / f"tp{args.phase}", args.phase)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import vllm

    rows: dict[str, dict] = {family: {} for family in args.families.split(",")}
    todo = jobs(list(rows), [int(p) for p in args.phases.split(",")])
    with tempfile.TemporaryDirectory(prefix="families-") as work:
        while todo:
            # hold the machine's engine lock for a few families at a time (about as long as
            # one test module's engines), then let the other work in
            with engine_lock():
                os.environ["FAMILIES_LOCK_HELD"] = "1"
                began = time.time()
                while todo and time.time() - began < args.hold:
                    family, phase = todo.pop(0)
                    rows[family].update(run_family(family, work, phase, args.timeout))
                    Path(args.out).write_text(table(rows, vllm.__version__))
                del os.environ["FAMILIES_LOCK_HELD"]
            time.sleep(2)
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
