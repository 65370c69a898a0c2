"""The vLLM plug-in entry point (``vllm.general_plugins``).

vLLM calls `register()` in every process it starts (API server, engine core, workers), so
installing this package is enough for ``load_format="tensorizer"`` to use its loader. What
registration installs in vLLM, touchpoint by touchpoint: `integrations.vllm.registration`.
"""


def register() -> None:
    """Install this package's model loaders into vLLM (safe to call more than once)."""
    from .integrations.vllm.registration import register as _register

    _register()
