"""Reader threads and staging buffer sizes for a local file -> cuda:0 (run where an NVIDIA
GPU is present, after ``run.py --scenarios gpu`` built the model): prints one line per
setting, each the best of two warm loads."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402

files = run.prepare(float(sys.argv[1]) if len(sys.argv) > 1 else 1.5)
for threads in (1, 4, 8, 16):
    run.set_cache("warm", [files["tensors"]])
    r = run.measure("reused_read_ceiling", path=files["tensors"], threads=threads)
    print(
        f"file -> reused host buffers, {threads} threads: {r['bytes'] / r['seconds'] / 1e9:.2f} GB/s",
        flush=True,
    )
for readers in (2, 4, 8):
    for staging_mb in (4, 8, 16):
        rates = []
        for _ in range(2):
            run.set_cache("warm", [files["tensors"]])
            r = run.measure(
                "ours",
                path=files["tensors"],
                model_dir=files["model_dir"],
                device="cuda:0",
                num_readers=readers,
                staging_mb=staging_mb,
            )
            rates.append(r["bytes"] / r["seconds"] / 1e9)
        print(
            f"ours -> cuda:0, num_readers={readers}, staging {staging_mb} MiB: "
            f"{max(rates):.2f} GB/s, host RSS+ {(r['peak_rss'] - r['baseline_rss']) / 1e9:.2f} GB",
            flush=True,
        )
