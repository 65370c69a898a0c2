"""Overlap a remote model's weights download with vLLM's engine start-up.

For ``LLM("s3://.../v1", load_format="tensorizer")`` (one rank), the API process starts
copying the remote tensors file into a local cache file in a background thread as soon as
the engine is configured (`start`), while vLLM spawns its engine and worker processes and
builds the model. The worker's loader then reads the local copy (`local_copy`), which is
in the page cache by then, instead of streaming the file after the start-up; it deletes the
copy once loaded (`release`).

Memory stays bounded: the copy goes through this package's ranged reader (its read-ahead
window, 4 x 16 MiB by default) into a file, in 16 MiB pieces; the file's pages are page
cache, which the kernel may reclaim. The cost is disk space for one copy of the file in
the cache directory (``TENSORIZE_VLLM_MODEL_CACHE``, see `settings.environment`) until the
worker has loaded it, and the copy's CPU time during the start-up.

The two processes meet through files and one environment variable, set in the API process
before vLLM spawns the others (spawned processes inherit the environment):
``TENSORIZE_VLLM_MODEL_PREFETCH`` maps each remote URI to its local path. The copy is
written in a `storage.transaction` (a temporary file beside `path`, renamed when whole), so
`path` exists only once complete and a failed or interrupted copy leaves no part of it; a
failed copy leaves ``<path>.failed`` (written the same way) and the worker streams the
remote file as without the overlap. The overlap is opt-in:
``TENSORIZE_VLLM_MODEL_OVERLAP=1`` (without it no byte of the tensors touches local disk).
Both variables are read (and the map written) through `settings`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time

from .. import storage
from ..core.redaction import scrubbing
from ..core.settings import OVERLAP_ENV, PREFETCH_ENV, environment, set_prefetch_map

__all__ = ["enabled", "start", "local_copy", "release", "ENV_MAP", "ENV_SWITCH"]

logger = scrubbing(__name__)

ENV_MAP = PREFETCH_ENV
ENV_SWITCH = OVERLAP_ENV
PIECE = 16 << 20


def enabled() -> bool:
    """Whether the overlap is on: ``TENSORIZE_VLLM_MODEL_OVERLAP=1`` (default off, since it
    writes the tensors to local disk, which a remote load otherwise never does).

    Raises:
        ConfigError: the variable is set to something other than on/off values.
    """
    return environment().overlap


def start(uri: str, options: storage.Options = None) -> str:
    """Start copying remote `uri` into a fresh local file in a background thread, and
    record it for the processes vLLM starts next.

    Returns:
        The local path the copy will have once whole (``<cache>/prefetch/...``).
    """
    env = environment()
    directory = os.path.join(env.cache_dir, "prefetch")
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    path = os.path.join(directory, f"{digest}-{os.getpid()}-{time.monotonic_ns()}.tensors")
    set_prefetch_map({**env.prefetch_map, uri: path})
    threading.Thread(
        target=_copy, args=(uri, options, path), name="tensorizer-prefetch", daemon=True
    ).start()
    return path


def _copy(uri: str, options: storage.Options, path: str) -> None:
    started = time.perf_counter()
    try:
        with storage.transaction() as tx:
            staged = tx.stage(path)
            with storage.open_read(uri, options) as source, open(staged.path, "wb") as target:
                shutil.copyfileobj(source, target, PIECE)
        logger.info(
            "Prefetched %s during the engine start-up: %.2f GB in %.2f s",
            storage.redact(uri),
            os.path.getsize(path) / 1e9,
            time.perf_counter() - started,
        )
    except BaseException as e:  # noqa: BLE001 - reported to the worker through a file
        with storage.transaction() as tx:
            report = tx.stage(_failed(path))
            with open(report.path, "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
        logger.warning("Prefetching %s failed (%s); it is streamed", storage.redact(uri), e)


def _failed(path: str) -> str:
    """The file that says the copy to `path` failed (and why)."""
    return path + ".failed"


def local_copy(uri: str, timeout: float = 600.0) -> str | None:
    """The whole local copy of `uri` started by `start` (in this or a parent process),
    waiting for it to finish; None when there is none, it failed, or `timeout` seconds
    passed (the caller then reads `uri` itself)."""
    path = environment().prefetch_map.get(uri)
    if not path:
        return None
    begun = time.monotonic()
    while not os.path.exists(path):
        waited = time.monotonic() - begun
        if os.path.exists(_failed(path)) or waited > timeout:
            return None
        if waited > 30 and not storage.being_written(path):
            return None  # no copy under way after 30 s: the process copying it is gone
        time.sleep(0.02)
    return path


def release(uri: str) -> None:
    """Delete the local copy of `uri` once its tensors are loaded, and forget it in this
    process (a later reload streams `uri`)."""
    mapping = environment().prefetch_map
    path = mapping.pop(uri, None)
    if path:
        set_prefetch_map(mapping)
    for name in (path, _failed(path)) if path else ():
        if os.path.exists(name):
            os.unlink(name)
