"""The MoE case of ``make bench``: a Qwen3-30B-A3B-shaped checkpoint (48 layers x 128
experts, one tensor per expert projection as transformers saves it: 18,867 tensors), with
dimensions chosen so that it is about 1 GB, converted and loaded.

Reports: ``convert`` seconds; the converted file's weight seconds at TP=1 (this package's
"Deserialized ... in S s" line) against the serialized (vLLM-fused, 628 tensors) file's;
the meta pass (vLLM's ``load_weights`` on meta tensors, logged by the loader); ``inspect``
and ``verify`` seconds; and the per-tensor cost of convert/inspect/verify on files of tiny
tensors at two tensor counts (seconds per tensor; the same figure at both counts: no step
grows faster than the tensor count).

    .venv/bin/python benchmarks/moe.py [--repeats 2] [--engine-lock /tmp/vllm-engine.lock]
        [--sections files,tiny,engines] [--out DIR]

Writes ``DIR/moe-latest.json`` (default ``benchmarks/results/``).
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

from run import RESULTS, WORK, engine_kwargs, engine_lock, log, vllm_run

TARGETS = {"converted_vs_serialized_weights": 1.2}
INTERMEDIATE = 192  # 48 x 128 experts x 3 x 192 x 128 bf16: 0.91 GB of experts


def cli(*args: str) -> float:
    """Seconds of ``python -m tensorize_vllm_model ARGS`` (checked)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tensorize_vllm_model", *map(str, args)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def skeleton(name: str, **sizes) -> str:
    from demo_models import build_moe_skeleton

    path = WORK / name
    if not (path / "model.safetensors").exists():
        log(f"  building {name} {sizes}")
        build_moe_skeleton(path, **sizes)
    return str(path)


def convert(model: str, out: str) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    seconds = cli("--model", model, "convert", "--serialized-directory", out, "--suffix", "v1")
    return seconds, f"{out}/vllm/{os.path.basename(model)}/v1"


def _timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def per_tensor(sizes: list[tuple[int, int]]) -> list[dict]:
    """convert/inspect/verify seconds (in this process: no interpreter start counted) on
    skeletons of tiny tensors, and seconds per tensor."""
    from tensorize_vllm_model.convert import convert_checkpoint
    from tensorize_vllm_model.inspection.reports import inspect_tensors, verify_tensors

    rows = []
    for layers, experts in sizes:
        model = skeleton(
            f"moe-tiny-{layers}x{experts}",
            num_layers=layers,
            num_experts=experts,
            hidden_size=16,
            num_heads=1,
            intermediate_size=8,
        )
        out = str(WORK / "moe-tiny-out")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        uri = convert_checkpoint(model, out, suffix="v1").tensors_uri
        tensors = 3 + layers * (9 + 3 * experts)
        row = {"tensors": tensors, "convert": time.perf_counter() - start}
        row["inspect"] = _timed(inspect_tensors, uri)
        row["verify"] = _timed(verify_tensors, uri)
        row["per_tensor_ms"] = {k: 1e3 * row[k] / tensors for k in ("convert", "inspect", "verify")}
        log(f"  {tensors} tiny tensors: {row}")
        rows.append(row)
    return rows


def serialize(model: str, out: str) -> tuple[float, str]:
    engine = engine_kwargs()
    directory = f"{out}/vllm/{os.path.basename(model)}/v1"
    if os.path.exists(f"{directory}/model.tensors"):
        return 0.0, directory
    seconds = cli(
        "--model", model, "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager",
        "--gpu-memory-utilization", str(engine["gpu_memory_utilization"]),
        "serialize", "--serialized-directory", out, "--suffix", "v1",
    )  # fmt: skip
    return seconds, directory


def loads(converted: str, serialized: str, checkpoint: str, repeats: int) -> dict:
    """Weight seconds of each file at TP=1 (and of vLLM's default loader on the
    checkpoint), alternating, and the meta pass."""
    runs: dict[str, list] = {"converted": [], "serialized": [], "checkpoint": [], "meta_pass": []}
    cases = (
        ("converted", converted, "tensorizer"),
        ("serialized", serialized, "tensorizer"),
        ("checkpoint", checkpoint, "auto"),  # vLLM's default loader, for reference
    )
    for repeat in range(repeats):
        for label, directory, load_format in cases:
            kwargs = {**engine_kwargs(), "model": directory, "load_format": load_format}
            with_log = vllm_run(kwargs)
            runs[label].append(with_log["weights_seconds"])
            log(f"  {label} #{repeat}: weights {with_log['weights_seconds']} s")
            if with_log.get("meta_pass_seconds") is not None:
                runs["meta_pass"].append(with_log["meta_pass_seconds"])
            if with_log.get("converted_phases"):
                runs.setdefault("phases", []).append(with_log["converted_phases"])
                log(
                    f"    meta pass {with_log['meta_pass_seconds']} s, {with_log['converted_phases']}"
                )
    return runs


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine-lock", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--sections", default="files,tiny,engines")
    args = parser.parse_args()
    sections = args.sections.split(",")
    WORK.mkdir(exist_ok=True)
    started = time.perf_counter()
    model = skeleton("moe-qwen3-30b-a3b", intermediate_size=INTERMEDIATE)
    size = os.path.getsize(f"{model}/model.safetensors")
    report: dict = {"checkpoint_bytes": size, "tensors": 3 + 48 * (9 + 3 * 128)}
    converted = str(WORK / "moe-converted" / "vllm" / os.path.basename(model) / "v1")
    if "files" in sections:
        report["convert_seconds"], converted = convert(model, str(WORK / "moe-converted"))
        log(f"  convert {report['convert_seconds']:.1f} s ({size / 1e9:.2f} GB)")
        report["inspect_seconds"] = cli("inspect", f"{converted}/model.tensors")
        report["verify_seconds"] = cli("verify", f"{converted}/model.tensors")
    if "tiny" in sections:
        report["per_tensor"] = tiny = per_tensor([(12, 32), (48, 128)])
        (a, b) = tiny  # the added seconds per added tensor between the two files
        report["marginal_ms_per_tensor"] = {
            k: 1e3 * (b[k] - a[k]) / (b["tensors"] - a["tensors"])
            for k in ("convert", "inspect", "verify")
        }
    if "engines" in sections:
        with engine_lock(args.engine_lock):
            report["serialize_seconds"], serialized = serialize(model, str(WORK / "moe-serialized"))
            runs = loads(converted, serialized, model, args.repeats)
        report["weights_seconds"] = {
            k: spread(v) for k, v in runs.items() if k not in ("meta_pass", "phases")
        }
        report["converted_phases"] = runs.get("phases", [])  # each converted load's breakdown
        report["meta_pass_seconds"] = spread(runs["meta_pass"])
        conv, ser = report["weights_seconds"]["converted"], report["weights_seconds"]["serialized"]
        if conv and ser:
            report["converted_vs_serialized_weights"] = conv["median"] / ser["median"]
    report["targets"] = TARGETS
    report["seconds"] = time.perf_counter() - started
    out = os.path.join(args.out, "moe-latest.json")
    os.makedirs(args.out, exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
