"""pytest plug-in for scripts/other_vllm.sh: stand-ins a CUDA vLLM wheel needs on a machine
without a GPU, for the engine-free tests only.

vLLM 0.34 builds an engine config only when Triton is importable
(``vllm.triton_utils.HAS_TRITON``); with no GPU it is False, so the stand-in sets it True.
Nothing here runs in the package or in the main suite.
"""

from __future__ import annotations


def pytest_configure(config: object) -> None:
    try:
        import vllm.triton_utils as triton_utils
    except ImportError:  # vLLM without that module: nothing to stand in for
        return
    triton_utils.HAS_TRITON = True  # type: ignore[attr-defined]
