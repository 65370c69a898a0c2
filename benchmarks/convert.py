"""The ``convert`` benchmark: convert throughput against a plain copy of the same bytes, the
bytes each rank reads (from the read plan, at TP=2/4/8, no engine), and optionally
(``--engines``) loads through vLLM at TP=1 and TP=2 against the vLLM-tensorized file and
runai-model-streamer on the safetensors checkpoint.

    .venv/bin/python benchmarks/convert.py [--size-gb 1.5] [--repeats 3] [--engines]

Uses the model and the vLLM runner of ``run.py`` (same random-weight Llama-shaped model,
engines started from a process that imported vLLM once). Figures are medians with min-max,
methods alternating run by run; writes ``benchmarks/results/convert-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import run
from run import RESULTS, WORK, log, prepare, serialize_for_vllm, set_cache, vllm_run

TARGETS = {
    "tp2_read": 0.6,
    "tp4_read": 0.35,
    "tp8_read": 0.2,
    "tp1_vs_vllm_file": 0.9,
    "convert_vs_copy": 0.7,
    "rss_vs_share": 1.1,
}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def evict(path: str) -> None:
    """Drop `path`'s pages from the page cache (written back first): its next read comes
    from the disk. ``posix_fadvise(POSIX_FADV_DONTNEED)`` works per file, without the root
    rights ``/proc/sys/vm/drop_caches`` needs (refused in this container)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_copy(source: str, destination: str) -> None:
    """The disk's copy of `source`: the kernel's copy (``shutil.copyfile``: sendfile, no
    pass through Python), made durable (``fsync``), as ``convert`` makes its file durable
    before publishing it."""
    shutil.copyfile(source, destination)
    fd = os.open(destination, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_vs_copy(files: dict, repeats: int) -> dict:
    """Convert the safetensors checkpoint and copy the same file, alternating, each from a
    cold source (`evict`) to durable bytes on the same disk (`disk_copy`; convert fsyncs
    its file before publishing it): the disk's copy speed is the baseline. A page-cache
    copy (``shutil.copyfile``: sendfile, warm source, no fsync) is reported beside it."""
    from tensorize_vllm_model.convert import convert_checkpoint

    source = files["safetensors"]
    nbytes = os.path.getsize(source)
    out, copy = WORK / "convert-speed", WORK / "copy.safetensors"
    methods = ("disk_copy", "convert", "page_cache_copy")
    rates: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(repeats):
        for method in methods:
            if method == "convert":  # the last one's output stays, for the sections after
                shutil.rmtree(out, ignore_errors=True)
            copy.unlink(missing_ok=True)
            if method == "page_cache_copy":
                set_cache("warm", [source])
            else:
                evict(source)
            used, start = _cpu_seconds(), time.perf_counter()
            if method == "page_cache_copy":
                shutil.copyfile(source, copy)
            elif method == "disk_copy":
                disk_copy(source, str(copy))
            else:
                convert_checkpoint(files["model_dir"], str(out), suffix="v1")
            rates[method].append(nbytes / (time.perf_counter() - start) / 1e9)
            cpu[method].append((_cpu_seconds() - used) / (nbytes / 1e9))
            log(
                f"  [convert] {method} #{repeat + 1}: {rates[method][-1]:.2f} GB/s, "
                f"{cpu[method][-1]:.2f} CPU-s per GB"
            )
    copy.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    result: dict = {m: spread(v) for m, v in rates.items()}
    # per repeat (alternating, so both saw the same machine load), then the median
    result["ratio"] = statistics.median(c / d for c, d in zip(rates["convert"], rates["disk_copy"]))
    result["ratio_vs_page_cache_copy"] = statistics.median(
        c / d for c, d in zip(rates["convert"], rates["page_cache_copy"])
    )
    result["cpu_seconds_per_gb"] = {m: spread(v) for m, v in cpu.items()}
    result["one_core_gb_per_s"] = hash_speeds()
    return result


def _cpu_seconds() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hash_speeds(size: int = 256 << 20) -> dict:
    """One core's speed (GB/s) at what convert must do per byte: tensorizer's SHA-256 and
    CRC32, and a memory copy (the write into the page cache is about one)."""
    import hashlib
    import zlib

    data = os.urandom(size)
    work = {
        "sha256": lambda: hashlib.sha256(data).digest(),
        "crc32": lambda: zlib.crc32(data),
        "memcpy": lambda: bytearray(data),
    }
    speeds = {}
    for name, run_once in work.items():
        start = time.perf_counter()
        for _ in range(3):
            run_once()
        speeds[name] = 3 * size / (time.perf_counter() - start) / 1e9
    return speeds


RSS_CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
from convert import rank_rss
print(json.dumps(rank_rss({path!r}, json.loads({config!r}), {tp}, {rank}, {mode!r}, {key!r})))
"""


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


def _stored_shapes(reader) -> list:
    from tensorize_vllm_model.convert.placement import stored_shapes

    return stored_shapes(reader.entries(), reader.record.column_tiles)


def rank_rss(path: str, config: dict, tp: int, rank: int, mode: str, key: str | None) -> dict:
    """In a fresh process: one rank's partial read of a converted file through the loader's
    `read_parts` into its parameters (one block per tensor of the rank's share, made
    before the read), as the vLLM loader hands them over (`loading.ConvertedFile._direct`):
    every part goes into its parameter, straight or piece by piece through a small buffer
    (decrypted, cast, transposed back). `mode`: ``plain``; ``cast`` (float16 parameters
    from the bfloat16 file: ``copy_`` casts each piece); ``encrypted`` (the file at `path`
    is encrypted with the key in file `key`). The memory the read adds over the process
    with its parameters made, at its peak, against the share."""
    import torch

    from tensorize_vllm_model import TensorizerConfig, open_tensors
    from tensorize_vllm_model.convert.placement import rank_reads
    from tensorize_vllm_model.read.partial import read_parts
    from tensorize_vllm_model.read.parts import Part

    tc = TensorizerConfig(tensorizer_uri=path, encryption_keyfile=key)
    with open_tensors(path, config=tc) as reader:
        tiles = reader.record.column_tiles
        index, entries = reader.index, {e.name: e for e in reader.entries()}
        shapes = _stored_shapes(reader)
        ciphers = {}
        if key:
            from tensorize_vllm_model.read.decrypt import ciphers as find

            names = list(index)
            found = find(path, [index[n] for n in names], reader.header_deserializer)
            ciphers = dict(zip(names, found))
    reads = rank_reads(shapes, config, tp, rank)
    logical = {s.name: s.shape for s in shapes}
    share = sum(r.stop - r.start for r in reads)
    parts = []
    for r in reads:  # parameters first (the rank's share, made before any read)
        stored = getattr(torch, entries[r.name].dtype)
        dtype = torch.float16 if mode == "cast" and stored.is_floating_point else stored
        count = tiles.get(r.name, 0)
        n = (r.stop - r.start) // stored.itemsize
        shape = logical[r.name]
        target = (
            torch.zeros(shape[0], n // shape[0], dtype=dtype)
            if count
            else torch.zeros(n, dtype=dtype)
        )
        targets = ((r.start, r.stop, target),)
        cipher = ciphers.get(r.name)
        parts.append(
            Part(r.name, index[r.name], r.start, r.stop, cipher, targets, stored, count, shape)
        )
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from VmRSS now
    for _, buffer in read_parts(path, parts, threads=2):
        assert buffer is None  # every part went into its parameter
    peak = _status("VmHWM")
    return {
        "share_gb": share / 1e9,
        "added_peak_gb": (peak - before) / 1e9,
        "ratio": (peak - before + share) / share,
    }


def rss_vs_share(tensors_path: str, config: dict, encrypted: tuple[str, str]) -> dict:
    """`rank_rss` of every rank at TP=1 and TP=2, each in its own process: plain, cast and
    encrypted (`encrypted`: the encrypted file and its key)."""
    bench = os.path.dirname(os.path.abspath(__file__))
    result = {}
    for mode in ("plain", "cast", "encrypted"):
        path, key = encrypted if mode == "encrypted" else (tensors_path, None)
        for tp in (1, 2):
            for rank in range(tp):
                code = RSS_CHILD.format(
                    bench=bench,
                    path=path,
                    tp=tp,
                    rank=rank,
                    config=json.dumps(config),
                    mode=mode,
                    key=key,
                )
                out = subprocess.run(
                    [sys.executable, "-c", code], check=True, capture_output=True, text=True
                ).stdout
                name = f"tp{tp}_rank{rank}_{mode}"
                result[name] = json.loads(out.strip().splitlines()[-1])
                log(f"  [rss] {name}: {result[name]}")
    return result


def encrypted_copy(files: dict) -> tuple[str, str]:
    """The checkpoint converted once more, encrypted with a new key: (file, key file)."""
    from tensorize_vllm_model.convert import convert_checkpoint

    out, key = WORK / "convert-enc", WORK / "convert-enc.key"
    shutil.rmtree(out, ignore_errors=True)
    key.unlink(missing_ok=True)
    result = convert_checkpoint(files["model_dir"], str(out), suffix="v1", keyfile=str(key))
    return result.tensors_uri, str(key)


def plan_ratios(tensors_path: str, config: dict) -> dict:
    """The largest share of the file any rank reads, from the read plan, per TP size."""
    from tensorize_vllm_model import open_tensors
    from tensorize_vllm_model.convert.placement import rank_reads

    with open_tensors(tensors_path) as reader:
        shapes = _stored_shapes(reader)
    total = sum(s.bytes for s in shapes)
    return {
        f"tp{tp}": max(
            sum(r.stop - r.start for r in rank_reads(shapes, config, tp, rank))
            for rank in range(tp)
        )
        / total
        for tp in (1, 2, 4, 8)
        if config["num_attention_heads"] % tp == 0
    }


def engines(files: dict, converted: str, repeats: int, only: str = "") -> dict:
    """vLLM loads (weights seconds, per-rank GB and peak memory): the converted file at TP=1
    and TP=2, the vLLM-tensorized file at TP=1, runai-model-streamer at TP=1 and TP=2."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    os.environ.setdefault("RUNAI_STREAMER_LOG_TO_STDERR", "1")  # its timing line, parsed
    engine = {
        "dtype": "bfloat16",
        "max_model_len": 256,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.15,
    }
    vllm_dir = serialize_for_vllm(files)
    cases = {
        "vLLM-tensorized file, TP=1": {"model": vllm_dir, "load_format": "tensorizer"},
        "converted file, TP=1": {"model": converted, "load_format": "tensorizer"},
        "converted file, TP=2": {
            "model": converted,
            "load_format": "tensorizer",
            "tensor_parallel_size": 2,
        },
    }
    try:
        import runai_model_streamer  # noqa: F401

        cases["runai_streamer (safetensors), TP=1"] = {
            "model": files["model_dir"],
            "load_format": "runai_streamer",
        }
        cases["runai_streamer (safetensors), TP=2"] = {
            "model": files["model_dir"],
            "load_format": "runai_streamer",
            "tensor_parallel_size": 2,
        }
    except ImportError:
        log("  runai-model-streamer is not installed: left out")
    cases = {label: kwargs for label, kwargs in cases.items() if only in label}
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    for repeat in range(repeats):
        for label, kwargs in cases.items():
            set_cache(
                "warm",
                [converted + "/model.tensors", vllm_dir + "/model.tensors", files["safetensors"]],
            )
            result = vllm_run({**kwargs, **engine})
            runs[label].append(result)
            log(
                f"  [engines] {label} #{repeat + 1}: weights {result['weights_seconds']} s, "
                f"per rank (GB, s) {result['rank_loads']}, worker peaks "
                f"{[round(p / 1e9, 2) for p in result['worker_peak_rss_each']]} GB"
            )
    return {
        label: {
            "weights_seconds": spread([r["weights_seconds"] or float("nan") for r in rs]),
            "rank_loads": rs[-1]["rank_loads"],
            "worker_peak_rss_each": rs[-1]["worker_peak_rss_each"],
        }
        for label, rs in runs.items()
    }


SECTIONS = ("convert", "plan", "rss", "engines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out",
        default="convert-latest.json",
        help="File name of the results under benchmarks/results/ (sections run now replace "
        "those already there).",
    )
    parser.add_argument(
        "--only", default="", help="With --engines: only the loads whose label contains this."
    )
    parser.add_argument(
        "--engines", action="store_true", help="Also load through vLLM (several engine start-ups)."
    )
    parser.add_argument(
        "--sections",
        default="convert,plan,rss",
        help=f"Comma-separated, of {', '.join(SECTIONS)} (--engines adds engines).",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(",")) | ({"engines"} if args.engines else set())
    files = prepare(args.size_gb)
    config = json.loads(open(os.path.join(files["model_dir"], "config.json")).read())
    path = RESULTS / args.out
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"size_gb": args.size_gb, "targets": TARGETS})
    converted = str(WORK / "convert-out" / "vllm" / "hf" / "v1")
    if "convert" in sections:
        results["convert"] = convert_vs_copy(files, args.repeats)
    if _stale(converted + "/model.tensors"):  # the file the other sections read
        from tensorize_vllm_model.convert import convert_checkpoint

        shutil.rmtree(WORK / "convert-out", ignore_errors=True)
        convert_checkpoint(files["model_dir"], str(WORK / "convert-out"), suffix="v1")
    results["file_gb"] = os.path.getsize(converted + "/model.tensors") / 1e9
    if "plan" in sections:
        results["read_plan_share"] = plan_ratios(converted + "/model.tensors", config)
    if "rss" in sections:
        results["rank_rss"] = rss_vs_share(
            converted + "/model.tensors", config, encrypted_copy(files)
        )
    if "engines" in sections:
        results["engines"] = engines(files, converted, args.repeats, args.only)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


def _stale(path: str) -> bool:
    """Whether the converted file at `path` is missing or was written in an earlier layout
    (row-parallel weights transposed, before column tiles)."""
    from tensorize_vllm_model import open_tensors

    if not os.path.exists(path):
        return True
    with open_tensors(path) as reader:
        return bool(reader.record.transposed)


def report(results: dict) -> None:
    c = results.get("convert")
    if c:
        print(
            f"convert {c['convert']['median']:.2f} GB/s vs the disk's copy "
            f"{c['disk_copy']['median']:.2f} GB/s ({c['ratio']:.2f}; target >= "
            f"{TARGETS['convert_vs_copy']}); a page-cache copy {c['page_cache_copy']['median']:.2f}"
            f" GB/s ({c['ratio_vs_page_cache_copy']:.2f})"
        )
        cpu = c["cpu_seconds_per_gb"]
        print(
            "CPU-s per GB: "
            + ", ".join(f"{m} {v['median']:.2f}" for m, v in cpu.items())
            + "; one core: "
            + ", ".join(f"{k} {v:.2f} GB/s" for k, v in c["one_core_gb_per_s"].items())
        )
    for key, r in results.get("rank_rss", {}).items():
        print(
            f"rank memory {key}: {r['added_peak_gb']:.3f} GB at peak for a share of "
            f"{r['share_gb']:.3f} GB ({r['ratio']:.2f}; target <= {TARGETS['rss_vs_share']})"
        )
    for tp, share in results.get("read_plan_share", {}).items():
        print(f"read plan {tp}: the busiest rank reads {share:.3f} of the file")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run.WORK.mkdir(parents=True, exist_ok=True)
    main()
