"""vLLM engines in subprocesses: `run_engine` starts ``LLM(...)`` through engine_runner.py,
`run_builtin` runs vLLM's own tensorizer code through builtin_runner.py, and
`serve_and_complete` starts ``vllm serve`` (each engine start takes about 30 s on a 2-core
CPU, so tests share them through module-scoped fixtures)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from demo_models import MAX_TOKENS, PROMPTS

from tests.support import ROOT, SUPPORT
from tests.support.commands import ENGINE_FLAGS, ENGINE_TIMEOUT, engine_env, subprocess_env

RUNNER = SUPPORT / "engine_runner.py"
BUILTIN_RUNNER = SUPPORT / "builtin_runner.py"

# Engine settings that fit vLLM's CPU backend on a small machine: on the CPU the "GPU"
# memory fraction is the share of host memory kept for the KV cache.
ENGINE_KWARGS = {
    "dtype": "bfloat16",
    "max_model_len": 256,
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,
}
WORKER_EXTENSION = "tensorize_vllm_model.integrations.vllm.worker.WorkerExtension"


def run_runner(
    spec: dict, *, env: dict[str, str] | None = None, expect_ok: bool = True, runner: Path = RUNNER
) -> dict | subprocess.CompletedProcess:
    """Run tests/support/engine_runner.py (or `runner`) with `spec`; return its parsed RESULT (or,
    with expect_ok=False, the completed process)."""
    proc = subprocess.run(
        [sys.executable, str(runner)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        timeout=ENGINE_TIMEOUT,
        cwd=ROOT,
    )
    return result_of(proc, expect_ok)


def result_of(proc: subprocess.CompletedProcess, expect_ok: bool = True):
    """The parsed ``RESULT`` line of a runner's output (or, with expect_ok=False, `proc`)."""
    if not expect_ok:
        return proc
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"engine run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def run_builtin(*specs: dict) -> list[dict]:
    """Run tests/support/builtin_runner.py (vLLM's own tensorizer code, outside an engine) once per
    spec, all at once (the ranks of one layout meet through one gloo rendezvous), with this
    package's plug-in off (``VLLM_PLUGINS=""``); return each one's RESULT."""
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    specs = [{"init_method": f"tcp://127.0.0.1:{port}", **spec} for spec in specs]
    with ThreadPoolExecutor(len(specs)) as pool:
        return list(
            pool.map(
                lambda spec: run_runner(spec, env={"VLLM_PLUGINS": ""}, runner=BUILTIN_RUNNER),
                specs,
            )
        )


def run_engine(
    llm_kwargs: dict,
    *,
    prompts=PROMPTS,
    max_tokens=MAX_TOKENS,
    stats=False,
    config_object: bool = False,
    env: dict[str, str] | None = None,
    expect_ok: bool = True,
    separate_processes: bool = False,
    **lora: dict,
) -> dict | subprocess.CompletedProcess:
    """Start `LLM(**ENGINE_KWARGS, **llm_kwargs)` in a subprocess and generate greedily
    (``lora=...`` or ``tensorized_lora=...``: see engine_runner.py).

    By default vLLM runs its engine and worker inside that subprocess
    (`commands.IN_PROCESS`): about 15 s instead of 40 s here; with several ranks, the
    workers are still processes of their own. Tests about what happens across vLLM's
    engine-core process (the plug-in loading in a separate worker at one rank, credentials
    reaching it) pass separate_processes=True, vLLM's default.
    """
    spec = {
        "llm": {**ENGINE_KWARGS, **llm_kwargs},
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "stats": stats,
        "config_object": config_object,
        **lora,
    }
    return run_runner(spec, env=engine_env(env, separate_processes), expect_ok=expect_ok)


def serve_and_complete(
    serve_args: list[str],
    model_name: str,
    *,
    prompts=PROMPTS,
    env: dict[str, str] | None = None,
    output: list[str] | None = None,
) -> list[str]:
    """Start ``vllm serve SERVE_ARGS`` on a loopback port, send each prompt to
    /v1/completions (greedy), stop the server, and return the completions (the server's
    output, stdout and stderr, appended to `output` where given)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "vllm"),
            "serve",
            *serve_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *ENGINE_FLAGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(env),
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-6000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(1)
        texts = []
        for prompt in prompts:
            body = json.dumps(
                {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            ).encode()
            request = urllib.request.Request(
                f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as r:
                texts.append(json.load(r)["choices"][0]["text"])
        return texts
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        if output is not None:
            output.append(server.stdout.read())
