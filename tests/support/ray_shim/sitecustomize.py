"""Test-only shim (never part of the package): lets vLLM's CPU build run on Ray.

vLLM 0.32/0.33 refuse Ray on the CPU platform ("current platform cpu does not support ray":
its ``ray_device_key`` is empty). tests/e2e/test_vllm_ray.py puts this directory first on
PYTHONPATH of the engine, the Ray cluster and so of every Ray worker, where Python imports
this module at start-up. It changes nothing until vLLM's own modules are imported, then:

- gives ``CpuPlatform`` the Ray device key ``vllm_cpu``, a custom resource the test's
  one-node cluster advertises (``ray.init(resources={"vllm_cpu": 2})``), so vLLM's
  placement group asks for one ``vllm_cpu`` per rank;
- makes each Ray worker report its rank as its device id (Ray knows no accelerator ids for
  a custom resource, where vLLM asks it for them).
"""

import importlib.abc
import importlib.util
import sys

RAY_DEVICE_KEY = "vllm_cpu"


def _patch_cpu_platform(module):
    module.CpuPlatform.ray_device_key = RAY_DEVICE_KEY


def _patch_ray_executor_v2(module):
    def get_node_and_physical_gpu_ids(self):
        import ray

        return ray.get_runtime_context().get_node_id(), [self._init_kwargs["rank"]]

    module.RayWorkerProc.get_node_and_physical_gpu_ids = get_node_and_physical_gpu_ids


def _patch_ray_utils(module):
    wrapper = getattr(module, "RayWorkerWrapper", None)
    if wrapper is None:
        return

    def get_node_and_physical_gpu_ids(self):
        import ray

        return ray.get_runtime_context().get_node_id(), [self.rpc_rank]

    wrapper.get_node_and_physical_gpu_ids = get_node_and_physical_gpu_ids


PATCHES = {
    "vllm.platforms.cpu": _patch_cpu_platform,
    "vllm.v1.executor.ray_executor_v2": _patch_ray_executor_v2,
    "vllm.v1.executor.ray_utils": _patch_ray_utils,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the modules above as usual, then patches each once it has run."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, PATCHES[name])
        return spec


sys.meta_path.insert(0, _Finder())
