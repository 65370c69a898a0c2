"""Shared fixtures: tiny models built offline, and helpers that run vLLM engines and the
command line in subprocesses (each engine start takes about 30 s on a 2-core CPU, so tests
share them through module-scoped fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "engine_runner.py"

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time there was",
    "The future of computing is",
]
MAX_TOKENS = 16

# Engine settings that fit vLLM's CPU backend on a small machine: on the CPU the "GPU"
# memory fraction is the share of host memory kept for the KV cache.
ENGINE_KWARGS = {
    "dtype": "bfloat16",
    "max_model_len": 256,
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,
}
ENGINE_FLAGS = [
    "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager",
    "--gpu-memory-utilization", "0.3",
]
ENGINE_TIMEOUT = 600


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_runner(spec: dict, *, env: dict[str, str] | None = None,
               expect_ok: bool = True) -> dict | subprocess.CompletedProcess:
    """Run tests/engine_runner.py with `spec`; return its parsed RESULT (or, with
    expect_ok=False, the completed process)."""
    proc = subprocess.run(
        [sys.executable, str(RUNNER)], input=json.dumps(spec), capture_output=True, text=True,
        env=subprocess_env(env), timeout=ENGINE_TIMEOUT, cwd=ROOT,
    )
    if not expect_ok:
        return proc
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"engine run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT "):])


def run_engine(llm_kwargs: dict, *, prompts=PROMPTS, max_tokens=MAX_TOKENS, stats=False,
               config_object: bool = False, env: dict[str, str] | None = None,
               expect_ok: bool = True) -> dict | subprocess.CompletedProcess:
    """Start `LLM(**ENGINE_KWARGS, **llm_kwargs)` in a subprocess and generate greedily."""
    spec = {"llm": {**ENGINE_KWARGS, **llm_kwargs}, "prompts": list(prompts),
            "max_tokens": max_tokens, "stats": stats, "config_object": config_object}
    return run_runner(spec, env=env, expect_ok=expect_ok)


def run_cli(*args: str, env: dict[str, str] | None = None, script: str | None = None,
            timeout: int = ENGINE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m tensorize_vllm_model ARGS`` (or a script) and capture its output."""
    command = [sys.executable, script] if script else [sys.executable, "-m", "tensorize_vllm_model"]
    return subprocess.run(
        command + [str(a) for a in args], capture_output=True, text=True,
        env=subprocess_env(env), timeout=timeout, cwd=ROOT,
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tensorize_vllm_model.demo_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", architecture="llama")


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    from tensorize_vllm_model.demo_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-opt", architecture="opt")
