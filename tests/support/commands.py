"""The command line and Python in subprocesses, as the tests run them: the environment they
get (offline Hugging Face), the engine flags that fit vLLM's CPU backend on a small machine,
and `assert_ok`, which shows a failed run's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

# The command line's engine flags that fit vLLM's CPU backend on a small machine (as
# engines.ENGINE_KWARGS for ``LLM(...)``).
ENGINE_FLAGS = [
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "256",
    "--enforce-eager",
    "--gpu-memory-utilization",
    "0.3",
]
ENGINE_TIMEOUT = 600
# vLLM runs its engine core (and, at one rank, its worker) in the calling process with this:
# one interpreter importing vLLM and torch instead of two (a serialize of the tiny Llama took
# 15 s here against 42 s with vLLM's default of an engine-core process).
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def engine_env(env: dict[str, str] | None, separate_processes: bool) -> dict[str, str]:
    """`env` for a command that starts a vLLM engine: with vLLM's engine core in the calling
    process unless `separate_processes` (vLLM's default; what tests about crossing vLLM's
    engine-core process need: the plug-in in a worker of its own at one rank, credentials
    reaching it). With several ranks each worker is a process of its own either way
    (test_vllm_parallel's TP=2 and PP=2 engines took 23-33 s here so, 35-44 s before,
    the small `KV_CACHE` included)."""
    return {**({} if separate_processes else IN_PROCESS), **(env or {})}


# vLLM's CPU backend sizes its KV cache by the memory fraction (--gpu-memory-utilization:
# about 5 GB here, zeroed at every start) unless given in GiB by this variable; the tests'
# 256-token contexts need a few MB. The tiny Llama's engine started in 11.6 s with it,
# 14.2 s without, with the same tokens.
KV_CACHE = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: Hugging Face offline, unbuffered output, the
    small KV cache (`KV_CACHE`), then `extra`."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(KV_CACHE)
    env.update(extra or {})
    return env


def run_python(
    *args, env: dict[str, str] | None = None, timeout: int = ENGINE_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in the repository's root and capture its output (text)."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        timeout=timeout,
        cwd=ROOT,
    )


def run_cli(
    *args,
    env: dict[str, str] | None = None,
    script: str | None = None,
    timeout: int = ENGINE_TIMEOUT,
) -> subprocess.CompletedProcess:
    """Run ``python -m tensorize_vllm_model ARGS`` (or a script) and capture its output."""
    command = [script] if script else ["-m", "tensorize_vllm_model"]
    return run_python(*command, *args, env=env, timeout=timeout)


def run_deserialize(
    model,
    tensors,
    *flags,
    engine_flags=ENGINE_FLAGS,
    env: dict[str, str] | None = None,
    separate_processes: bool = False,
    **run_cli_kwargs,
) -> subprocess.CompletedProcess:
    """`run_cli` of ``--model MODEL ENGINE_FLAGS deserialize --path-to-tensors TENSORS
    FLAGS...`` (vLLM's engine core in that process unless `separate_processes`)."""
    return run_cli(
        "--model",
        model,
        *engine_flags,
        "deserialize",
        "--path-to-tensors",
        tensors,
        *flags,
        env=engine_env(env, separate_processes),
        **run_cli_kwargs,
    )


HF_TENSORIZE = (
    "import sys, torch, transformers\n"
    "from tensorizer import TensorSerializer\n"
    "dtype = getattr(torch, sys.argv[3])\n"
    "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)\n"
    "s = TensorSerializer(sys.argv[2]); s.write_module(m); s.close()\n"
)


def write_hf_tensors(model: Path, path: Path, dtype: str) -> None:
    """Write the Hugging Face model at `model` (loaded in torch's `dtype`, e.g. "float32")
    to `path` with plain ``TensorSerializer.write_module`` (not vLLM's layout), in a child."""
    assert_ok(run_python("-c", HF_TENSORIZE, model, path, dtype, timeout=300))


def serialize_argv(model, directory, suffix: str, *flags, engine_flags=ENGINE_FLAGS) -> list[str]:
    """The command line's ``--model MODEL ENGINE_FLAGS serialize --serialized-directory
    DIRECTORY --suffix SUFFIX FLAGS...``, as strings."""
    argv = [*engine_flags, "serialize", "--serialized-directory", directory, "--suffix", suffix]
    return [str(a) for a in ["--model", model, *argv, *flags]]


def run_serialize(
    model,
    directory,
    suffix: str,
    *flags,
    engine_flags=ENGINE_FLAGS,
    env: dict[str, str] | None = None,
    separate_processes: bool = False,
) -> subprocess.CompletedProcess:
    """`run_cli` of `serialize_argv` (the serialize command, which starts a vLLM engine; its
    engine core in that process unless `separate_processes`, as `engine_env`)."""
    argv = serialize_argv(model, directory, suffix, *flags, engine_flags=engine_flags)
    return run_cli(*argv, env=engine_env(env, separate_processes))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def run_main(capsys, *argv):
    """The command line's `main(ARGV)` in this process: (exit code, its stderr stripped)."""
    from tensorize_vllm_model.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


# Runs the command line with vLLM made unimportable in that process.
NO_VLLM = (
    "import sys; sys.modules['vllm'] = None; "
    "from tensorize_vllm_model.cli import main; sys.exit(main(sys.argv[1:]))"
)


def convert_without_vllm(*args) -> subprocess.CompletedProcess:
    """`run_python` of the command line ARGS in an interpreter where vLLM cannot be imported."""
    return run_python("-c", NO_VLLM, *args, timeout=300)


def convert(model, out, *flags, env=None, flags_after=()):
    """``--model MODEL FLAGS convert --serialized-directory OUT --suffix v1 FLAGS_AFTER``,
    without vLLM (or, given `env`, with it and that environment); asserted to succeed."""
    argv = ("--model", model, *flags, "convert", "--serialized-directory", out, "--suffix", "v1")
    argv += tuple(flags_after)
    proc = convert_without_vllm(*argv) if env is None else run_cli(*argv, env=env)
    assert_ok(proc)
    return proc
