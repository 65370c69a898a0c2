"""vLLM's Ray executor, the distributed engine multi-node users run, on a one-node Ray cluster.

vLLM's CPU build refuses Ray; tests/support/ray_shim/sitecustomize.py (test-only) gives it a Ray
device key. With it, at TP=2 in float32 (see test_vllm_parallel.py for why float32):
serialize through Ray workers writes rank files byte for byte those of the multiprocessing
executor, and a load through Ray workers generates the tokens of the original model.

The cluster is this module's: started here with ``ray.init`` and a ``vllm_cpu`` resource
per core, joined by each engine through RAY_ADDRESS, and stopped at the end, with the agent
processes Ray leaves behind and its session directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.support import ROOT, SUPPORT
from tests.support.commands import ENGINE_FLAGS, assert_ok, run_serialize
from tests.support.engines import run_engine

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

SHIM = SUPPORT / "ray_shim"
RANKS_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank
FLAGS = [f for f in ENGINE_FLAGS if f not in ("0.3", "--gpu-memory-utilization")] + [
    "--gpu-memory-utilization",
    "0.15",
    "--dtype",
    "float32",
    "--tensor-parallel-size",
    "2",
]


def _processes_under(directory: str) -> list[int]:
    """Pids of this user's processes whose command line names `directory` (the cluster's
    own temporary directory: only processes of this cluster do)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
        except OSError:
            continue
        if directory in command:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def ray_env():
    """A one-node Ray cluster advertising 2 ``vllm_cpu``; the environment that makes an
    engine join it through the shim. Everything it started is stopped afterwards."""
    # Short: Ray's socket paths live under it (a Unix socket path holds 107 bytes).
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    path = os.pathsep.join([str(SHIM), *filter(None, [os.environ.get("PYTHONPATH")])])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path  # the cluster's processes, and so its workers, get it
    try:
        info = ray.init(
            num_cpus=2,
            resources={"vllm_cpu": 2},
            include_dashboard=False,
            _temp_dir=temp,
            log_to_driver=False,
        )
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield {**RANKS_ENV, "PYTHONPATH": path, "RAY_ADDRESS": info.address_info["gcs_address"]}
    finally:
        ray.shutdown()
        for pid in _processes_under(temp):  # DashboardAgent, RuntimeEnvAgent, ...
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    assert _processes_under(temp) == []


def _serialize(model: Path, out: Path, env: dict[str, str], *backend: str) -> Path:
    proc = run_serialize(
        model, out, "tp2", engine_flags=[*FLAGS, *backend], env=env, separate_processes=True
    )
    assert_ok(proc)
    if "ray" in backend:  # vLLM's Ray executor ran, on this cluster (it logs its placement group)
        assert "placement group" in proc.stdout + proc.stderr
    return out / "vllm" / model.name / "tp2"


@pytest.fixture(scope="module")
def ray_serialized(tiny_llama, ray_env, tmp_path_factory):
    return _serialize(
        tiny_llama, tmp_path_factory.mktemp("ray"), ray_env, "--distributed-executor-backend", "ray"
    )


def test_serialize_through_ray_writes_the_mp_executors_rank_files(
    tiny_llama, ray_serialized, tmp_path_factory
):
    mp = _serialize(
        tiny_llama, tmp_path_factory.mktemp("mp"), RANKS_ENV, "--distributed-executor-backend", "mp"
    )
    for rank in (0, 1):
        name = f"model-rank-{rank:03d}.tensors"
        assert (ray_serialized / name).read_bytes() == (mp / name).read_bytes(), name
    assert sorted(p.name for p in ray_serialized.iterdir()) == sorted(p.name for p in mp.iterdir())


def test_load_through_ray_gives_the_original_tokens(ray_serialized, ray_env, float32_reference):
    result = run_engine(
        {
            "model": str(ray_serialized),
            "load_format": "tensorizer",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.15,
            "dtype": "float32",
            "distributed_executor_backend": "ray",
        },
        env=ray_env,
        separate_processes=True,
    )
    assert result["tokens"] == float32_reference["tokens"]


def test_the_shim_stays_out_of_the_package():
    """The package never carries the Ray device key: the shim is for these tests only."""
    package = ROOT / "src" / "tensorize_vllm_model"
    assert not any("vllm_cpu" in p.read_text() for p in package.rglob("*.py"))
