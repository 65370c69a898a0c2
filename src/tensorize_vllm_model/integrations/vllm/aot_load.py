"""Let vLLM load its own AOT compile cache where its compiler backend is plain inductor.

Why it fails (vLLM 0.32 CPU build, torch 2.13; read in ``vllm/compilation/decorators.py``
and ``vllm/platforms/cpu.py``): the CPU platform turns ``VLLM_COMPILE`` into
``DYNAMO_TRACE_ONCE`` with ``backend="inductor"`` (a string), so ``torch.compile`` hands
the whole graph to inductor and the AOT artifact's ``compiled_fn`` is inductor's plain
compiled function. vLLM's load path, ``_try_load_aot_compiled_fn``, then calls
``loaded_fn._artifacts.compiled_fn.finalize_loading(vllm_config)`` unconditionally, a
method only vLLM's own backend result (``VllmSerializableFunction``, GPU's
``VLLM_COMPILE`` mode) has: "'function' object has no attribute 'finalize_loading'", and
vLLM compiles again. A plain inductor function needs no finalizing (it is whole once
unpickled), so giving it a ``finalize_loading`` that does nothing lets vLLM's load go on.

`install()` wraps ``_try_load_aot_compiled_fn`` (looked up by name at each call) so that,
during the load only, the function torch unpickles gets that no-op when it lacks the
method. Everything else (vLLM's source check, its guards, its fallback to compiling) is
vLLM's own. Off with ``TENSORIZE_VLLM_MODEL_AOT_FIX=0``.

The same wrapper is where the shipped compile cache (`compiled`) learns the exact AOT path
vLLM computed for a compiled module, as vLLM is about to read it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from ...core.settings import environment

__all__ = ["install"]


def _finalize_nothing(_vllm_config: Any) -> None:
    """A plain inductor function is whole once unpickled: nothing to finalize."""


@contextlib.contextmanager
def _plain_functions_finalizable() -> Iterator[None]:
    import torch

    original = torch.compiler.load_compiled_function

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            with contextlib.suppress(AttributeError, TypeError):
                compiled.finalize_loading = _finalize_nothing
        return loaded

    torch.compiler.load_compiled_function = load
    try:
        yield
    finally:
        torch.compiler.load_compiled_function = original


def install() -> None:
    """Wrap vLLM's AOT load once per process (idempotent; a no-op where vLLM has no such
    function). The wrapper first hands the module and path to
    `compiled.before_aot_load` (the shipped compile cache), then runs vLLM's load, with the
    fix above unless ``TENSORIZE_VLLM_MODEL_AOT_FIX=0``."""
    try:
        from vllm.compilation import decorators
    except ImportError:  # pragma: no cover - another vLLM layout
        return
    original = getattr(decorators, "_try_load_aot_compiled_fn", None)
    if original is None or getattr(original, "_tensorize_vllm_model", False):
        return

    @functools.wraps(original)
    def try_load(model: Any, aot_compilation_path: str, *args: Any, **kwargs: Any) -> Any:
        from .compiled import before_aot_load

        before_aot_load(model, aot_compilation_path)
        fix = environment().aot_fix
        with _plain_functions_finalizable() if fix else contextlib.nullcontext():
            return original(model, aot_compilation_path, *args, **kwargs)

    try_load._tensorize_vllm_model = True  # type: ignore[attr-defined]
    decorators._try_load_aot_compiled_fn = try_load
