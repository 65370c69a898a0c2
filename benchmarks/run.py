"""The load benchmark: every scenario on one random-weight model, side by side.

    .venv/bin/python benchmarks/run.py [--size-gb 0.75] [--repeats 3] [--vllm-repeats 2]
        [--scenarios local,http,s3,vllm,gpu] [--engine-lock /tmp/vllm-engine.lock]

(or ``make bench``, which installs nginx, matplotlib, SeaweedFS and runai-model-streamer
first). Each load runs in a fresh process (forked from one that did the imports); every
figure is the median of ``--repeats`` runs with min and max, methods alternating run by run.
Prints a table and writes ``benchmarks/results/latest.json`` and ``latest.png``.

Scenarios: local (file -> CPU memory, warm page cache, and cold where the page cache can be
dropped), http (nginx on loopback), s3 (SeaweedFS on loopback, see bucket.py: ours,
runai-model-streamer, download-then-load, the server's ceilings), vllm (LLM(...) end to end
on vLLM's backend, from a local file and from s3:// on the same SeaweedFS), gpu (file ->
cuda:0; skipped without an NVIDIA GPU). docs/performance.md gives the method.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.append(str(ROOT / "scripts"))  # scripts/demo_models.py builds the models
WORK = Path(os.environ.get("BENCH_WORK") or HERE / ".work")  # models, servers, scratch
RESULTS = HERE / "results"
METHODS = HERE / "methods.py"
SCENARIOS = ("local", "http", "s3", "vllm", "gpu")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the model ------------------------------------------------------------------------------


def model_shape(size_gb: float) -> dict:
    """Llama-like dimensions giving about `size_gb` GB of bfloat16 weights."""
    if size_gb < 0.05:
        return dict(
            hidden_size=256, num_heads=4, num_layers=2, intermediate_size=512, vocab_size=512
        )
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    layers = max(1, round((size_gb * 1e9 - 2 * 2 * vocab * hidden) / per_layer))
    return dict(
        hidden_size=hidden,
        num_heads=16,
        num_layers=layers,
        intermediate_size=inter,
        vocab_size=vocab,
    )


def prepare(size_gb: float) -> dict[str, str]:
    """Build (once) the model and every file format the methods read."""
    import torch
    from demo_models import build_model

    from tensorize_vllm_model.format.keys import generate_key, write_key
    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    work = WORK / f"model-{size_gb:g}gb"
    files = {
        "model_dir": str(work / "hf"),
        "safetensors": str(work / "hf" / "model.safetensors"),
        "pt": str(work / "model.pt"),
        "tensors": str(work / "model.tensors"),
        "encrypted": str(work / "model-enc.tensors"),
        "key": str(work / "model.key"),
        "vllm_dir": str(work / "vllm"),
        "work": str(work),
    }
    encrypted = os.path.exists(files["encrypted"]) or (work / "no-encryption").exists()
    if encrypted and all(os.path.exists(files[k]) for k in ("safetensors", "pt", "tensors")):
        return files
    log(f"building a {size_gb:g} GB random-weight model in {work} (once)")
    shutil.rmtree(work, ignore_errors=True)
    build_model(
        work / "hf", architecture="llama", max_position_embeddings=2048, **model_shape(size_gb)
    )
    from safetensors.torch import load_file

    state = load_file(files["safetensors"])
    torch.save(state, files["pt"])
    tensors = [(name, tensor, False) for name, tensor in state.items()]
    write_tensors(
        files["tensors"], tensors, record=FileRecord(architecture="LlamaForCausalLM")
    ).commit()
    try:
        key = generate_key()
        write_key(files["key"], key)
        write_tensors(
            files["encrypted"], tensors, record=FileRecord(encrypted=True), key=key
        ).commit()
    except Exception as e:  # noqa: BLE001 - e.g. no libsodium on a bare GPU machine
        log(f"  no encrypted copy ({type(e).__name__}: {e}); the encrypted case is left out")
        (work / "no-encryption").write_text(f"{type(e).__name__}: {e}\n")
    return files


# -- running measurements ---------------------------------------------------------------------


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def set_cache(state: str, paths: list[str]) -> None:
    if state == "cold":
        subprocess.run(["sync"], check=False)
        can_drop_caches()
    else:  # warm: read the files now (the page cache may have been paged out meanwhile)
        for path in paths:
            if os.path.isfile(path):
                with open(path, "rb", buffering=0) as f:
                    while f.read(64 << 20):
                        pass


_server: subprocess.Popen | None = None


def measure(method: str, **args) -> dict:
    """One load in a fresh process: a child forked by the measuring server (`methods.serve`,
    started once, its imports done), with this process's environment of now."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, str(METHODS), "--serve"],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        atexit.register(_server.stdin.close)
    # The environment of now (a scenario may have set its endpoint after the server started).
    line = _ask(_server, {"method": method, "args": args, "environ": dict(os.environ)})
    if not line:
        _server.kill()
        raise RuntimeError(f"{method}: no answer from the measuring process")
    reply = json.loads(line)
    if "error" in reply:
        raise RuntimeError(f"{method} failed:\n{reply['error']}")
    return reply["ok"]


def _ask(server: subprocess.Popen, request: dict, timeout: float = 900) -> str:
    """Send one JSON request line to a measuring server; its answer line, or "" when none
    came within `timeout` seconds."""
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    return server.stdout.readline() if ready else ""


def run_cases(
    scenario: str,
    cases: list[tuple[str, str, dict]],
    repeats: int,
    cache: str,
    files_to_warm: list[str],
    results: list[dict],
) -> None:
    """Run every case `repeats` times, alternating cases run by run, each round in an order
    rotated by one: on a virtual disk a cold read runs faster or slower by what was read
    just before it (the host's own cache; a cold 2-thread read of the local file ran at 2.08
    GB/s after the 1-thread read of the same file and at 1.17 after other loads, 2026-12-07),
    so no case always follows the same neighbour."""
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in cases}
    for repeat in range(repeats):
        turn = repeat % max(1, len(cases))
        for label, method, args in cases[turn:] + cases[:turn]:
            # Warm only what this case reads (when it names its file).
            set_cache(cache, [args["path"]] if "path" in args else files_to_warm)
            result = measure(method, **args)
            runs[label].append(result)
            log_run(f"{scenario}/{cache}", label, repeat, result)
    for label, _, _ in cases:
        results.append(summarize(scenario, cache, label, runs[label]))


def log_run(where: str, label: str, repeat: int, result: dict) -> None:
    log(
        f"  [{where}] {label} #{repeat + 1}: {result['seconds']:.2f} s, "
        f"{result['bytes'] / result['seconds'] / 1e9:.2f} GB/s{read_times(result)}"
    )


def read_times(result: dict) -> str:
    """Where our loader's reader threads spent their time in one run, as the loader says
    it (`read.base.ReadTimes`), when it does."""
    if not result.get("read_times"):
        return ""
    from tensorize_vllm_model.read.base import ReadTimes

    return f" ({ReadTimes(**result['read_times'])})"


def summarize(scenario: str, cache: str, label: str, runs: list[dict]) -> dict:
    rates = [r["bytes"] / r["seconds"] / 1e9 for r in runs]
    seconds = [r["seconds"] for r in runs]
    extra = [max(0, r["peak_rss"] - r["baseline_rss"]) for r in runs if "peak_rss" in r]
    entry = {
        "scenario": scenario,
        "cache": cache,
        "method": label,
        "runs": runs,
        "bytes": runs[0]["bytes"],
        "gb_per_s": statistics.median(rates),
        "gb_per_s_min": min(rates),
        "gb_per_s_max": max(rates),
        "seconds": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
    }
    if extra:
        entry["peak_rss_over_baseline"] = statistics.median(extra)
    timed = [r["read_times"] for r in runs if r.get("read_times")]
    if timed:
        entry["read_times"] = {
            key: statistics.median(t[key] for t in timed)
            for key in ("readers", "populating", "reading", "decrypting")
        }
    for key in ("weights_seconds", "worker_peak_rss"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            entry[key] = statistics.median(values)
            entry[key + "_min"], entry[key + "_max"] = min(values), max(values)
    return entry


def round_ratios(results: list[dict], scenario: str, ours: str, against: str) -> list[dict]:
    """Ours against another method, round by round (the cases alternate within a round, so
    each pair ran under the same disk and machine load): the median, min and max of
    `against`'s seconds over ours, per cache state. On a disk whose cold speed moves up to
    2x from one run to the next, this pairs each load with its neighbour instead of
    comparing two medians taken at different moments."""
    found = []
    for cache in sorted({r["cache"] for r in results if r["scenario"] == scenario}):
        by = {
            r["method"]: r["runs"]
            for r in results
            if (r["scenario"], r["cache"]) == (scenario, cache)
        }
        if ours not in by or against not in by:
            continue
        ratios = [a["seconds"] / o["seconds"] for o, a in zip(by[ours], by[against])]
        found.append(
            {
                "scenario": scenario,
                "cache": cache,
                "ours": ours,
                "against": against,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": ratios,
            }
        )
    return found


LOCAL_PAIRS = [
    ("ours", "ceiling: readinto fresh memory, 2 threads"),
    ("ours", "tensorizer TensorDeserializer defaults"),
]


# -- scenarios -------------------------------------------------------------------------------


def scenario_local(files, repeats, caches, results):
    cases = [
        (
            "ceiling: readinto fresh memory, 1 thread",
            "ceiling",
            {"path": files["tensors"], "threads": 1},
        ),
        (
            "ceiling: readinto fresh memory, 2 threads",
            "ceiling",
            {"path": files["tensors"], "threads": 2},
        ),
        ("safetensors.torch.load_file", "safetensors_load", {"path": files["safetensors"]}),
        ("torch.load", "torch_load", {"path": files["pt"]}),
        (
            "tensorizer TensorDeserializer defaults",
            "tensorizer_default",
            {"path": files["tensors"]},
        ),
        ("ours", "ours", {"path": files["tensors"], "model_dir": files["model_dir"]}),
        (
            "ours, encrypted",
            "ours",
            {"path": files["encrypted"], "model_dir": files["model_dir"], "keyfile": files["key"]},
        ),
        (
            "ceiling: decrypt in memory, 2 threads",
            "decrypt_ceiling",
            {"path": files["encrypted"], "keyfile": files["key"], "threads": 2},
        ),
    ]
    if not os.path.exists(files["encrypted"]):  # see prepare: no libsodium, e.g.
        cases = [c for c in cases if "keyfile" not in c[2]]
    try:
        import runai_model_streamer  # noqa: F401

        cases.append(
            ("runai-model-streamer (safetensors)", "runai", {"path": files["safetensors"]})
        )
    except ImportError:
        log("  runai-model-streamer is not installed: left out")
    paths = [files[k] for k in ("tensors", "encrypted", "safetensors", "pt")]
    for cache in caches:
        # The cipher's speed does not depend on the page cache (its input is read first).
        run_cases(
            "local",
            [c for c in cases if cache == "warm" or c[1] != "decrypt_ceiling"],
            repeats,
            cache,
            paths,
            results,
        )


def start_nginx(root: str) -> tuple[subprocess.Popen, str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise RuntimeError("nginx is not installed (apt-get install nginx; `make bench` does it)")
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf_dir = tempfile.mkdtemp(prefix="bench-nginx-")
    conf = os.path.join(conf_dir, "nginx.conf")
    # As root, nginx's worker would run as nobody, who may not reach files under a private
    # directory (mktemp's, a home): it runs as root then, like the rest of the benchmark.
    user = "user root;" if os.geteuid() == 0 else ""
    Path(conf).write_text(f"""
{user} daemon off; worker_processes 1; pid {conf_dir}/nginx.pid; error_log {conf_dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {conf_dir}; proxy_temp_path {conf_dir}; fastcgi_temp_path {conf_dir};
  uwsgi_temp_path {conf_dir}; scgi_temp_path {conf_dir};
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}""")
    process = subprocess.Popen(
        [nginx, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    return process, f"http://127.0.0.1:{port}"


def scenario_http(files, repeats, results):
    process, url = start_nginx(files["work"])
    try:
        cases = [
            ("ceiling: curl -o /dev/null", "curl", {"url": f"{url}/model.tensors"}),
            (
                "ceiling: one response into fresh memory",
                "response_ceiling",
                {"url": f"{url}/model.tensors"},
            ),
            (
                "ours, streaming (default: parallel ranges)",
                "ours",
                {"path": f"{url}/model.tensors", "model_dir": files["model_dir"]},
            ),
            (
                "ours, streaming one response (ranges: false)",
                "ours",
                {
                    "path": f"{url}/model.tensors",
                    "model_dir": files["model_dir"],
                    "options": {"stream_kwargs": {"ranges": False}},
                },
            ),
            (
                "download, then safetensors load",
                "download_then_load",
                {"url": f"{url}/hf/model.safetensors"},
            ),
        ]
        run_cases("http", cases, repeats, "warm", [files["tensors"], files["safetensors"]], results)
    finally:
        process.terminate()


def scenario_s3(files, repeats, results, bucket):
    """S3 on SeaweedFS on loopback: the server's ceilings, ours (default parallel ranges and
    one response, plain and encrypted), download-then-load and runai-model-streamer, all
    reading the same bucket."""
    force_http = {"force_http": True}  # loopback SeaweedFS speaks plain HTTP
    ours = {"model_dir": files["model_dir"]}
    cases = [
        ("ceiling: curl -o /dev/null", "curl", {"url": bucket.presigned("model.tensors")}),
        (
            "ceiling: one response into fresh memory (botocore)",
            "response_ceiling",
            {"url": bucket.url("model.tensors")},
        ),
        (
            "ours (default: parallel ranges)",
            "ours",
            {**ours, "path": bucket.url("model.tensors"), "options": {"stream_kwargs": force_http}},
        ),
        (
            "ours, one response (ranges: false)",
            "ours",
            {
                **ours,
                "path": bucket.url("model.tensors"),
                "options": {"stream_kwargs": {**force_http, "ranges": False}},
            },
        ),
        (
            "ours, encrypted (default: parallel ranges)",
            "ours",
            {
                **ours,
                "path": bucket.url("model-enc.tensors"),
                "keyfile": files["key"],
                "options": {"stream_kwargs": force_http},
            },
        ),
        (
            "download (boto3), then safetensors load",
            "download_then_load",
            {"url": bucket.url("hf/model.safetensors")},
        ),
    ]
    try:
        import runai_model_streamer_s3  # noqa: F401

        cases.append(
            (
                "runai-model-streamer (safetensors, defaults)",
                "runai",
                {"path": bucket.url("hf/model.safetensors")},
            )
        )
    except ImportError:
        log("  runai-model-streamer-s3 is not installed: runai's S3 row is left out")
    run_cases("s3", cases, repeats, "warm", [], results)


VLLM_SCRIPT = r'''
"""Starts LLM(**kwargs) for the benchmark: one engine per request line on stdin, each in a
child forked after vLLM's import (its own process group, output to the file named in the
request). Answers each request with the child's pid, then "ended" once it is gone."""
import json, os, sys, time
if __name__ == "__main__":
    from vllm import LLM
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.environ.update(request.get("environ") or {})
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            start = time.perf_counter()
            llm = LLM(**request["kwargs"])
            print("READY", time.perf_counter() - start, flush=True)
            time.sleep(600)  # until the benchmark kills every process of the engine
            os._exit(0)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("ended", flush=True)
'''

_vllm_server: subprocess.Popen | None = None


def _vllm_child(kwargs: dict, log: str, environ: dict | None = None) -> int:
    """Start one engine through the vLLM server (started once: vLLM's import, about 10 s,
    is paid once, not at every start) and return its process's pid."""
    global _vllm_server
    if _vllm_server is None or _vllm_server.poll() is not None:
        script = WORK / "vllm_ready.py"
        script.write_text(VLLM_SCRIPT)
        _vllm_server = subprocess.Popen(
            [sys.executable, str(script)],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # a 1 GiB KV cache (vLLM's CPU default is 4 GiB), so that the weights show in
            # the worker's peak memory
            env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        )
        atexit.register(_vllm_server.kill)
    answer = _ask(_vllm_server, {"kwargs": kwargs, "log": log, "environ": environ}, timeout=60)
    if not answer.strip().isdigit():
        raise RuntimeError(f"the vLLM server did not start an engine: {answer!r}")
    return int(answer)


def _tree(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _shared_memory() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def vllm_run(kwargs: dict, environ: dict | None = None) -> dict:
    """Start LLM(**kwargs) in a fresh process; seconds to ready, the weights-load seconds
    vLLM (or this loader) logs, and the largest resident memory of any of its processes.

    Each engine's first process is a child forked from one that has imported vLLM (vLLM's
    own engine and worker processes are new interpreters, as always). Once the engine is
    ready its processes are killed, not shut down: vLLM's shutdown took 5-8 s a start here
    (its process manager waits 5 s, then kills the engine anyway). The next start begins
    only once every one of them is gone, and the shared-memory files they leave are
    removed."""
    import signal

    import psutil

    shared_before = _shared_memory()
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        pid = _vllm_child(kwargs, log.name, environ)
        peak: dict[int, int] = {}
        tree: dict[int, psutil.Process] = {}
        text = ""
        started = time.monotonic()
        try:
            while "READY" not in text and _alive(pid) and time.monotonic() - started < 900:
                for child in _tree(pid):
                    tree.setdefault(child.pid, child)
                    with contextlib.suppress(psutil.Error):
                        peak[child.pid] = max(peak.get(child.pid, 0), child.memory_info().rss)
                text += log.read()
                time.sleep(0.05)
            # what the engine's processes hold once it is ready (the host's memory for it)
            ready_rss = sum(_rss(child) for child in _tree(pid)) + _rss(psutil.Process(pid))
        finally:  # ready, failed or interrupted: no engine outlives its run
            tree.update((child.pid, child) for child in _tree(pid))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            psutil.wait_procs(list(tree.values()), timeout=60)
        if _vllm_server.stdout.readline().strip() != "ended":
            raise RuntimeError("the vLLM server lost track of its engine")
        text += log.read()
    for name in _shared_memory() - shared_before:
        if name.startswith(("psm_", "vllm", "sem.mp-")):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
    result = parse_vllm_log(text)
    result["worker_peak_rss"] = max(peak.values()) if peak else None
    result["worker_peak_rss_each"] = sorted(peak.values())
    result["engine_rss_ready"] = ready_rss
    return result


def _rss(process) -> int:
    import psutil

    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def parse_vllm_log(text: str) -> dict:
    """Seconds to ready, the weights-load seconds each loader logs in the worker, vLLM's
    own "Model loading took" seconds (every loader, post-processing included), and our
    loader's reader times and memory lines."""
    ready = re.search(r"READY ([\d.]+)", text)
    if not ready:
        raise RuntimeError(f"vLLM run failed: {text[-3000:]}")
    model_loading = re.search(r"Model loading took ([\d.]+) GiB memory and ([\d.]+) seconds", text)
    weights = (
        re.search(r"Loading weights took ([\d.]+) seconds", text)  # default
        or re.search(r"Deserialized [\d.]+ GB in ([\d.]+) s", text)  # ours
        or re.search(r"Overall time to stream .*?: ([\d.]+)s", text)
    )  # runai (its logger made to print by the benchmark's sitecustomize)
    result = {
        "seconds": float(ready.group(1)),
        "weights_seconds": float(weights.group(1)) if weights else None,
        "model_loading_seconds": float(model_loading.group(2)) if model_loading else None,
        # every worker's own load line (one per rank): GB read and seconds
        "rank_loads": [
            (float(gb), float(s))
            for gb, s in re.findall(r"Deserialized ([\d.]+) GB in ([\d.]+) s", text)
        ],
    }
    meta = re.search(r"Meta pass over \d+ tensors took ([\d.]+) s", text)  # converted files
    result["meta_pass_seconds"] = float(meta.group(1)) if meta else None
    phases = re.search(  # the rest of a converted load (`TensorizerLoader._load_converted`)
        r"names and pieces ([\d.]+) s; after: read plan ([\d.]+) s, reads ([\d.]+) s, "
        r"guard ([\d.]+) s",
        text,
    )
    if phases:
        keys = ("names_and_pieces", "read_plan", "reads", "guard")
        result["converted_phases"] = dict(zip(keys, map(float, phases.groups())))
        opened = re.search(r"the file's index opened in ([\d.]+) s", text)
        if opened:
            result["converted_phases"]["index_opened"] = float(opened.group(1))
        through = re.search(r"\((\d+) through vLLM's loaders", text)
        if through:
            result["converted_phases"]["meta_inputs"] = int(through.group(1))
    # Ours logs the worker's memory once the tensors are in and after vLLM's post-processing.
    times = re.search(
        r"(\d+) readers: making pages present ([\d.]+) s, reading ([\d.]+) s"
        r"(?:, decrypting ([\d.]+) s)?",
        text,
    )
    if times:
        result["read_times"] = {
            "readers": int(times.group(1)),
            "populating": float(times.group(2)),
            "reading": float(times.group(3)),
            "decrypting": float(times.group(4) or 0),
        }
    memory = re.findall(r"worker memory: resident ([\d.]+) GB, peak ([\d.]+) GB", text)
    if len(memory) >= 2:
        result["worker_rss_with_tensors"] = float(memory[0][0]) * 1e9
        result["worker_peak_with_tensors"] = float(memory[0][1]) * 1e9
        result["worker_peak_after_postprocessing"] = float(memory[1][1]) * 1e9
    return result


ENGINE = {"dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True}
SITE = WORK / "site"


def engine_kwargs() -> dict:
    from vllm.platforms import current_platform

    return {**ENGINE, "gpu_memory_utilization": 0.3 if current_platform.is_cpu() else 0.9}


def serialize_for_vllm(files: dict) -> str:
    """The model serialized by this package's vLLM integration (once); its directory."""
    vllm_dir = files["vllm_dir"] + "/vllm/hf/v1"
    if os.path.exists(vllm_dir + "/model.tensors"):
        return vllm_dir
    log("  serializing the model for vLLM (once)")
    engine = engine_kwargs()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorize_vllm_model",
            "--model",
            files["model_dir"],
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "256",
            "--enforce-eager",
            "--gpu-memory-utilization",
            str(engine["gpu_memory_utilization"]),
            "serialize",
            "--serialized-directory",
            files["vllm_dir"],
            "--suffix",
            "v1",
        ],
        check=True,
        capture_output=True,
    )
    return vllm_dir


def runai_logging() -> None:
    """runai-model-streamer logs its own load time ("Overall time to stream ...") through a
    logger no handler prints in vLLM's worker: a ``sitecustomize`` on the engine's
    PYTHONPATH gives it one, so the worker's log carries runai's own figure."""
    SITE.mkdir(parents=True, exist_ok=True)
    (SITE / "sitecustomize.py").write_text(
        "import logging\n"
        "_handler = logging.StreamHandler()\n"
        "_logger = logging.getLogger('runai_model_streamer')\n"
        "_logger.setLevel(logging.INFO)\n"
        "_logger.addHandler(_handler)\n"
    )
    paths = [str(SITE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def vllm_cases(files: dict, vllm_dir: str, bucket) -> list[tuple[str, dict, str]]:
    """(label, LLM kwargs, file to warm) of every vLLM case; "download" in kwargs means the
    Hugging Face directory is downloaded from the bucket first (and timed)."""
    cases = [
        (
            "default loader, local (safetensors)",
            {"model": files["model_dir"]},
            files["safetensors"],
        ),
        (
            "tensorizer (this package), local",
            {"model": vllm_dir, "load_format": "tensorizer"},
            vllm_dir + "/model.tensors",
        ),
    ]
    if bucket is None:
        return cases
    cases += [
        (
            "tensorizer (this package), s3://",
            {
                "model": bucket.url("vllm/vllm/hf/v1"),
                "load_format": "tensorizer",
                "model_loader_extra_config": {"stream_kwargs": {"force_http": True}},
            },
            "",
        ),
        (
            "tensorizer (this package), s3://, overlap",
            {
                "model": bucket.url("vllm/vllm/hf/v1"),
                "load_format": "tensorizer",
                "model_loader_extra_config": {"stream_kwargs": {"force_http": True}},
                "environ": {"TENSORIZE_VLLM_MODEL_OVERLAP": "1"},
            },
            "",
        ),
        (
            "default loader after a download from s3:// (boto3)",
            {"download": "hf"},
            "",
        ),
    ]
    try:
        import runai_model_streamer_s3  # noqa: F401

        cases.append(
            (
                "runai_streamer, s3:// (safetensors)",
                {"model": bucket.url("hf"), "load_format": "runai_streamer"},
                "",
            )
        )
    except ImportError:
        log("  runai-model-streamer-s3 is not installed: runai_streamer from s3:// left out")
    return cases


def vllm_case(kwargs: dict, bucket, engine: dict) -> dict:
    """One engine start for one case (after a timed download where the case asks)."""
    if "environ" in kwargs:  # the engine's own environment variables
        kwargs = dict(kwargs)
        environ = kwargs.pop("environ")
        return vllm_run({**kwargs, **engine}, environ=environ)
    if "download" not in kwargs:
        return vllm_run({**kwargs, **engine})
    target = WORK / "downloaded"
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    bucket.download(kwargs["download"], str(target))
    download = time.perf_counter() - start
    result = vllm_run({"model": str(target), **engine})
    result["download_seconds"] = download
    result["seconds"] += download
    if result["weights_seconds"] is not None:
        result["weights_seconds"] += download
    if result["model_loading_seconds"] is not None:
        result["model_loading_seconds"] += download
    shutil.rmtree(target, ignore_errors=True)
    return result


def log_vllm(label: str, repeat: int, result: dict) -> None:
    log(
        f"  [vllm] {label} #{repeat + 1}: ready {result['seconds']:.1f} s, weights "
        f"{result['weights_seconds']} s, model loading {result['model_loading_seconds']} s, "
        f"worker peak {result['worker_peak_rss'] / 1e9:.2f} GB, "
        f"engine RSS at ready {result['engine_rss_ready'] / 1e9:.2f} GB" + read_times(result)
    )


def scenario_vllm(files, repeats, results, bucket=None):
    """vLLM end to end, each case an engine start, cases alternating repeat by repeat."""
    engine = engine_kwargs()
    vllm_dir = serialize_for_vllm(files)
    runai_logging()
    cases = vllm_cases(files, vllm_dir, bucket)
    if os.environ.get("BENCH_VLLM_CASES"):  # e.g. "tensorizer": the cases whose label has it
        cases = [c for c in cases if os.environ["BENCH_VLLM_CASES"] in c[0]]
    base = (
        vllm_run({"model": str(WORK / "baseline-model"), **engine})
        if (WORK / "baseline-model").exists()
        else None
    )
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in cases}
    beside_label, beside = "ours, between the vLLM engines", []
    for repeat in range(repeats):
        # The same load as the local scenario's "ours", at this point of the run: tells
        # the state of the machine apart from the worker's own.
        set_cache("warm", [files["tensors"]])
        beside.append(measure("ours", path=files["tensors"], model_dir=files["model_dir"]))
        log_run("local/warm", beside_label, repeat, beside[-1])
        for label, kwargs, warm in cases:
            set_cache("warm", [warm] if warm else [])
            result = vllm_case(kwargs, bucket, engine)
            result["bytes"] = os.path.getsize(files["safetensors"])
            runs[label].append(result)
            log_vllm(label, repeat, result)
    for label, _, _ in cases:
        results.append(summarize_vllm(label, runs[label], base))
    results.append(summarize("local", "warm", beside_label, beside))


def summarize_vllm(label: str, runs: list[dict], base: dict | None) -> dict:
    for run in runs:  # rate the weights load, not the engine start-up
        run["ready_seconds"] = run["seconds"]
        weights = run["weights_seconds"]
        run["seconds"] = weights if weights is not None else float("nan")
    entry = summarize("vllm", "warm", label, runs)
    entry["ready_seconds"] = statistics.median(r["ready_seconds"] for r in runs)
    entry["ready_seconds_min"] = min(r["ready_seconds"] for r in runs)
    entry["ready_seconds_max"] = max(r["ready_seconds"] for r in runs)
    for key in ("model_loading_seconds", "engine_rss_ready", "download_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            entry[key] = statistics.median(values)
    if base:
        entry["worker_baseline_rss"] = base["worker_peak_rss"]
    return entry


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def scenario_gpu(files, repeats, caches, results):
    import torch

    if not torch.cuda.is_available():
        log("gpu: skipped (no NVIDIA GPU on this machine)")
        return
    log(f"gpu: {torch.cuda.get_device_name(0)}")
    cases = [
        ("ceiling: pinned host -> cuda:0 copy", "h2d_ceiling", {"path": files["tensors"]}),
        (
            "ceiling: file -> reused host buffers, 8 threads",
            "reused_read_ceiling",
            {"path": files["tensors"], "threads": 8},
        ),
        (
            "safetensors.torch.load_file(device='cuda:0')",
            "safetensors_cuda",
            {"path": files["safetensors"]},
        ),
        (
            "ours -> cuda:0",
            "ours",
            {"path": files["tensors"], "model_dir": files["model_dir"], "device": "cuda:0"},
        ),
    ]
    for cache in caches:
        run_cases("gpu", cases, repeats, cache, [files["tensors"], files["safetensors"]], results)


# -- report ----------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    lines = [
        f"{'scenario':<8} {'cache':<5} {'method':<52} {'GB/s (min-max)':>20} {'s':>7} {'RSS+':>8}"
    ]
    for r in results:
        rss = r.get("peak_rss_over_baseline")
        extra = f"{rss / 1e9:7.2f}G" if rss is not None else ""
        if r["scenario"] == "vllm":
            loading = r.get("model_loading_seconds")
            extra = (
                f"ready {r['ready_seconds']:.1f} s"
                + (f", model loading {loading:.2f} s" if loading is not None else "")
                + f", worker peak {r.get('worker_peak_rss', 0) / 1e9:.2f} GB"
                + f", engine RSS at ready {r.get('engine_rss_ready', 0) / 1e9:.2f} GB"
                + (
                    f" (tiny-model baseline {r['worker_baseline_rss'] / 1e9:.2f} GB)"
                    if r.get("worker_baseline_rss")
                    else ""
                )
            )
        if r.get("read_times"):
            extra += read_times(r)
        lines.append(
            f"{r['scenario']:<8} {r['cache']:<5} {r['method']:<52} "
            f"{r['gb_per_s']:6.2f} ({r['gb_per_s_min']:.2f}-{r['gb_per_s_max']:.2f})"
            f" {r['seconds']:7.2f} {extra}"
        )
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart")
        return
    rows = [r for r in results if r["scenario"] != "vllm"]
    labels = [f"{r['scenario']}/{r['cache']}: {r['method']}" for r in rows]
    values = [r["gb_per_s"] for r in rows]
    errors = [
        [v - r["gb_per_s_min"] for v, r in zip(values, rows)],
        [r["gb_per_s_max"] - v for v, r in zip(values, rows)],
    ]
    figure, axes = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.5))
    colours = [
        "tab:green" if "ours" in label else "tab:gray" if "ceiling" in label else "tab:blue"
        for label in labels
    ]
    axes.barh(range(len(rows)), values, xerr=errors, color=colours)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("GB/s (median of runs, min-max bars)")
    axes.set_title(f"Loading a {results[0]['bytes'] / 1e9:.2f} GB model ({platform.node()})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


@contextlib.contextmanager
def engine_lock(path: str | None):
    """Hold an exclusive flock on `path` (when given) for the engine starts."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        log(f"waiting for the engine lock {path}")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-repeats", type=int, default=2, help="engine starts per vLLM case")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--engine-lock",
        default=None,
        help="a file to flock while the vLLM engines run (machines shared with others)",
    )
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    WORK.mkdir(exist_ok=True)
    started = time.perf_counter()
    files = prepare(args.size_gb)
    if "vllm" in scenarios and not (WORK / "baseline-model").exists():
        from demo_models import build_model

        build_model(WORK / "baseline-model")
    caches = ["warm", "cold"] if can_drop_caches() else ["warm"]
    results: list[dict] = []
    if "local" in scenarios:
        scenario_local(files, args.repeats, caches, results)
    if "http" in scenarios:
        scenario_http(files, args.repeats, results)
    bucket = None
    if "vllm" in scenarios:
        serialize_for_vllm(files)  # before the upload: the bucket holds it too
    if "s3" in scenarios or "vllm" in scenarios:
        from bucket import Bucket

        shutil.rmtree(WORK / "seaweed", ignore_errors=True)
        bucket = Bucket(WORK / "seaweed", files)
        os.environ.update(bucket.environment())
    try:
        if "s3" in scenarios:
            scenario_s3(files, args.repeats, results, bucket)
        if "vllm" in scenarios:
            with engine_lock(args.engine_lock):
                scenario_vllm(files, args.vllm_repeats, results, bucket)
    finally:
        if bucket is not None:
            bucket.stop()
    if "gpu" in scenarios:
        scenario_gpu(files, args.repeats, caches, results)
    pairs = [
        p for ours, against in LOCAL_PAIRS for p in round_ratios(results, "local", ours, against)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "size_gb": args.size_gb,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "gpu": _gpu_name(),
        },
        "caches": caches,
        "seconds": time.perf_counter() - started,
        "results": results,
        "round_ratios": pairs,
    }
    (out / "latest.json").write_text(json.dumps(report, indent=1))
    chart(results, out / "latest.png")
    print(table(results))
    for pair in pairs:
        print(
            f"{pair['scenario']} {pair['cache']}: {pair['ours']} at {pair['ratio_median']:.2f}x "
            f"the speed of {pair['against']}, median of {len(pair['ratios'])} rounds "
            f"({pair['ratio_min']:.2f}-{pair['ratio_max']:.2f})"
        )
    print(
        f"\n{time.perf_counter() - started:.0f} s in all; {out / 'latest.json'}, {out / 'latest.png'}"
    )


if __name__ == "__main__":
    main()
