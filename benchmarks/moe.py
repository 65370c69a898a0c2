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

Writes ``benchmarks/results/moe-latest.json``.
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


def per_tensor(sizes: list[tuple[int, int]]) -> list[dict]:
    """convert/inspect/verify seconds per tensor on skeletons of tiny tensors."""
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
        seconds, directory = convert(model, str(WORK / "moe-tiny-out"))
        tensors = 3 + layers * (9 + 3 * experts)
        row = {"tensors": tensors, "convert": seconds}
        row["inspect"] = cli("inspect", f"{directory}/model.tensors")
        row["verify"] = cli("verify", f"{directory}/model.tensors")
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


def loads(converted: str, serialized: str, repeats: int) -> dict:
    """Weight seconds of each file at TP=1, alternating, and the meta pass."""
    runs: dict[str, list] = {"converted": [], "serialized": [], "meta_pass": []}
    for repeat in range(repeats):
        for label, directory in (("converted", converted), ("serialized", serialized)):
            kwargs = {**engine_kwargs(), "model": directory, "load_format": "tensorizer"}
            with_log = vllm_run(kwargs)
            runs[label].append(with_log["weights_seconds"])
            log(f"  {label} #{repeat}: weights {with_log['weights_seconds']} s")
            if with_log.get("meta_pass_seconds") is not None:
                runs["meta_pass"].append(with_log["meta_pass_seconds"])
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
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    started = time.perf_counter()
    model = skeleton("moe-qwen3-30b-a3b", intermediate_size=INTERMEDIATE)
    size = os.path.getsize(f"{model}/model.safetensors")
    convert_s, converted = convert(model, str(WORK / "moe-converted"))
    log(f"  convert {convert_s:.1f} s ({size / 1e9:.2f} GB)")
    inspect_s = cli("inspect", f"{converted}/model.tensors")
    verify_s = cli("verify", f"{converted}/model.tensors")
    tiny = per_tensor([(12, 32), (48, 128)])
    with engine_lock(args.engine_lock):
        serialize_s, serialized = serialize(model, str(WORK / "moe-serialized"))
        runs = loads(converted, serialized, args.repeats)
    report = {
        "checkpoint_bytes": size,
        "tensors": 3 + 48 * (9 + 3 * 128),
        "convert_seconds": convert_s,
        "serialize_seconds": serialize_s,
        "inspect_seconds": inspect_s,
        "verify_seconds": verify_s,
        "weights_seconds": {k: spread(v) for k, v in runs.items() if k != "meta_pass"},
        "meta_pass_seconds": spread(runs["meta_pass"]),
        "per_tensor": tiny,
        "targets": TARGETS,
        "seconds": time.perf_counter() - started,
    }
    conv, ser = report["weights_seconds"]["converted"], report["weights_seconds"]["serialized"]
    if conv and ser:
        report["converted_vs_serialized_weights"] = conv["median"] / ser["median"]
    out = os.path.join(args.out, "moe-latest.json")
    os.makedirs(args.out, exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
