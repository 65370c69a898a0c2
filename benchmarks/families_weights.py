"""The family matrix's weight check, without an engine: for each family, what a converted
file puts in every parameter of vLLM's model, against what vLLM's default loader puts there
from the checkpoint, at TP=1 and TP=2 (``make families-weights``; docs/families.md).

Each rank is a process of its own that builds vLLM's model (no engine: no scheduler, no KV
cache, no worker processes; gloo between the ranks, as tests/support/builtin_runner.py does), fills
it with this package's loader from the converted file (the same `_fill` the engine runs,
before vLLM's weight post-processing), builds it again with vLLM's `DefaultModelLoader` on
the checkpoint, and compares every parameter bit for bit. Seconds per family: it runs where
the engine matrix (`benchmarks/families.py`) cannot get engine time.

    .venv/bin/python benchmarks/families_weights.py [--families gpt2,qwen2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "support"))


def rank_main(spec: dict) -> dict:
    """One rank: every parameter of our load of the converted file against the default
    loader's of the checkpoint."""
    import torch
    from builtin_runner import default_loaded, join_ranks
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from tensorize_vllm_model.integrations.vllm.loader import TensorizerLoader

    def config(model: str, load_format: str):
        extra = {"runner": "pooling"} if spec["pooling"] else {}
        return EngineArgs(
            model=model,
            dtype="bfloat16",
            max_model_len=256,
            enforce_eager=True,
            tensor_parallel_size=spec["tp"],
            load_format=load_format,
            **extra,
        ).create_engine_config()

    vllm_config = config(spec["converted"], "tensorizer")
    join_ranks(spec, vllm_config)
    loader = TensorizerLoader(vllm_config.load_config)
    model_config = vllm_config.model_config
    with (
        set_current_vllm_config(vllm_config),
        set_default_torch_dtype(model_config.dtype),
        torch.device("cpu"),
    ):
        model = initialize_model(vllm_config=vllm_config, model_config=model_config)
        _, source, reader = loader._open_checked(vllm_config, "cpu")
        with reader:
            loader._fill(model, reader, source, torch.device("cpu"))
    ours = dict(model.named_parameters())
    reference = dict(default_loaded(config(spec["checkpoint"], "auto")).named_parameters())
    different = sorted(
        n
        for n in set(ours) & set(reference)
        if ours[n].dtype != reference[n].dtype or not torch.equal(ours[n], reference[n])
    )
    return {
        "compared": len(set(ours) & set(reference)),
        "missing": sorted(set(reference) - set(ours)),
        "different": different,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(checkpoint: Path, converted: str, tp: int, pooling: bool) -> str:
    """One cell: every rank's comparison, in processes of their own."""
    init = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    procs = []
    for rank in range(tp):
        spec = {"checkpoint": str(checkpoint), "converted": converted, "tp": tp, "rank": rank,
                "init_method": init, "pooling": pooling}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, __file__, "--rank-spec", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        procs.append(proc)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not found:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            error = next(
                (ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else ""
            )
            return "ERROR: " + error.strip()[-300:]
        results.append(json.loads(found[-1][7:]))
    different = sorted({n for r in results for n in r["different"]})
    missing = sorted({n for r in results for n in r["missing"]})
    if different or missing:
        return f"DIFFERENT: {', '.join(different[:4])}{' missing: ' + ', '.join(missing[:4]) if missing else ''}"
    return f"same ({sum(r['compared'] for r in results)} parameters over {tp} rank(s))"


def main(argv: list[str] | None = None) -> int:
    from family_models import FAMILIES, build_family

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "families-weights.json")
    )
    parser.add_argument(
        "--layers", type=int, help="decoder layers per checkpoint (the families' own: 2)"
    )
    parser.add_argument("--rank-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_spec:
        print("RESULT " + json.dumps(rank_main(json.loads(args.rank_spec))), flush=True)
        return 0
    from tensorize_vllm_model.convert import convert_checkpoint

    rows: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="families-weights-") as work:
        for family in args.families.split(","):
            checkpoint = build_family(Path(work) / family, family, layers=args.layers)
            converted = convert_checkpoint(str(checkpoint), f"{work}/out-{family}", suffix="v1")
            rows[family] = {}
            for tp in (1, 2):
                rows[family][f"convert TP={tp}"] = check(
                    checkpoint, converted.directory, tp, family == "embedding"
                )
                print(f"[weights] {family} TP={tp}: {rows[family][f'convert TP={tp}']}",
                      file=sys.stderr, flush=True)  # fmt: skip
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
