"""vLLM's compile cache, shipped beside a model's tensors and put back before vLLM compiles.

A serialize's capture engine compiles the model (vLLM's default, compilation on); each of its
workers then packs what vLLM and inductor wrote for it into one tar archive per rank,
``compile-cache-rank-<rank:03d>.tar`` beside the tensors, staged in the same transaction
(published with them or not at all). The archive's first member, ``manifest.json``, holds
the `CacheKey` (what the artifacts depend on: vLLM and torch versions, device, dtype,
parallel layout and rank, and the hash of the engine configuration, the model's path left
out); the others are the files, under ``<entry>/...`` (one entry per compiled module: vLLM's
``torch_aot_compile/<hash>/`` directory, that is ``rank_<i>_<j>/model`` and the
``inductor_cache/`` vLLM points ``TORCHINDUCTOR_CACHE_DIR`` at).

At load, each rank reads its archive (any storage backend, through `storage.read_bytes`),
compares the key with its own engine's and, only when every field is equal, writes the files
into its local cache directories, leaving files already there as they are. A mismatch
is logged once per process, naming the field, and nothing is written. The vLLM side (which
directories, which key) is `integrations.vllm.compiled`; this module reads no vLLM.

The artifacts hold no weights: `find_weight_bytes` looks for samples of every tensor's bytes
in every file before an archive is written, and the cache is not shipped if one is found.
Compiled code depends on the config (shapes, dtypes), which ``config.json`` holds in the
clear, not on weight values, so archives are written unencrypted even for an encrypted
model. Off with ``TENSORIZE_VLLM_MODEL_COMPILE_CACHE=0`` (`settings.environment`).

vLLM's model-info cache (``$VLLM_CACHE_ROOT/modelinfos/<module>-<class>.json``, what vLLM
0.32-0.34 otherwise learns by inspecting the model's class in a process of its own) travels
the same way: a serialize keeps its engine's entries in `MODEL_INFO` beside ``config.json``
(`collect_model_info`), and a load writes them where vLLM reads them (`restore_model_info`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import storage
from ..core.redaction import scrubbing
from ..core.settings import environment

__all__ = [
    "ARCHIVE_LIMIT",
    "MODEL_INFO",
    "CacheKey",
    "archive_uri",
    "enabled",
    "find_weight_bytes",
    "pack",
    "read_archive",
    "restore",
    "collect_model_info",
    "restore_model_info",
    "MODEL_INFO_LIMIT",
]

logger = scrubbing(f"vllm.{__name__}")

# An archive larger than this is not read back (a cache is MBs; this bounds a bad file).
ARCHIVE_LIMIT = 4 << 30
MANIFEST = "manifest.json"
# vLLM's model-info cache entries of the model's architectures, beside config.json
MODEL_INFO = "vllm_modelinfos.json"
_INFO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.json")  # fullmatch
MODEL_INFO_LIMIT = 1 << 20  # bytes: a few entries of about 1 KB each
FORMAT = 1
_SAMPLE = 32  # bytes per weight sample
_said: set[str] = set()


def enabled() -> bool:
    """Whether compile caches are shipped and restored (``TENSORIZE_VLLM_MODEL_COMPILE_CACHE``)."""
    return environment().compile_cache


def archive_uri(tensors_uri: str, rank: int) -> str:
    """Where rank `rank`'s archive lives: beside its tensors file `tensors_uri`."""
    return storage.join(storage.parent(tensors_uri), f"compile-cache-rank-{rank:03d}.tar")


@dataclass(frozen=True)
class CacheKey:
    """What compiled artifacts depend on. Two engines whose keys are equal compile the same
    code (vLLM hashes the same factors, the model's path aside)."""

    vllm: str
    torch: str
    device: str  # "cpu AVX512" (torch's CPU capability), "cuda NVIDIA H100 80GB HBM3 sm_90"
    dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    rank: int
    config_hash: str  # vLLM's config and compile-environment hashes, the model path left out

    def mismatch(self, other: CacheKey) -> str | None:
        """The first field that differs, as ``"torch: 2.13.0 here, 2.14.0 in the cache"``,
        or None when the keys are equal."""
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                return f"{field.name}: {mine} here, {theirs} in the cache"
        return None


def find_weight_bytes(
    files: Mapping[str, bytes], tensors: Iterable[tuple[str, Any]]
) -> tuple[str, str] | None:
    """(tensor, file) for the first tensor whose bytes appear in one of `files` (name ->
    content), else None.

    Each tensor of 64 bytes or more is sampled at 4 to 16 evenly spaced places (32 bytes
    each; a quarter of a tensor or more copied into a file is found, a whole tensor always);
    samples with fewer than 8 distinct byte values (zeros, a constant such as a norm's 1.0)
    are skipped, since they occur anywhere."""
    names = list(files)
    haystack = b"\x00".join(files[n] for n in names)
    ends = []
    position = 0
    for name in names:
        position += len(files[name]) + 1
        ends.append(position)
    for tensor_name, tensor in tensors:
        for sample in _samples(tensor):
            at = haystack.find(sample)
            if at >= 0:
                return tensor_name, names[next(i for i, end in enumerate(ends) if at < end)]
    return None


def _samples(tensor: Any) -> list[bytes]:
    import torch

    if tensor.device.type == "meta":
        return []
    raw = tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8)
    nbytes = raw.numel()
    if nbytes < 2 * _SAMPLE:
        return []
    count = min(16, max(4, nbytes // 65536))
    samples = []
    for i in range(count):
        start = ((nbytes - _SAMPLE) * i // (count - 1)) & ~7
        sample = raw[start : start + _SAMPLE].numpy().tobytes()
        if len(set(sample)) >= 8:
            samples.append(sample)
    return samples


def collect(entries: Mapping[str, str]) -> dict[str, bytes]:
    """The files under each entry's directory (entry name -> local directory), read, as
    ``<entry>/<relative path>`` -> bytes; lock files and links left out."""
    files: dict[str, bytes] = {}
    for entry, directory in entries.items():
        for root, _dirs, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                if os.path.islink(path) or name.endswith(".lock"):
                    continue
                relative = os.path.relpath(path, directory)
                with open(path, "rb") as f:
                    files[f"{entry}/{relative}"] = f.read()
    return files


def pack(key: CacheKey, files: Mapping[str, bytes]) -> bytes:
    """One archive: ``manifest.json`` (the key, the file list), then every file."""
    manifest = {"format": FORMAT, "key": dataclasses.asdict(key), "files": sorted(files)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(tar, MANIFEST, json.dumps(manifest, indent=1).encode())
        for name in sorted(files):
            _add(tar, name, files[name])
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_archive(data: bytes, source: str) -> tuple[CacheKey, dict[str, bytes]]:
    """The key and files of an archive written by `pack`.

    Raises:
        ValueError: not such an archive (another format, a member outside its entry, a
            missing or unreadable manifest), naming `source`.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            manifest = json.loads(_read(tar, members[MANIFEST]))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
            key = CacheKey(**manifest["key"])
            files = {n: _read(tar, members[n]) for n in manifest["files"] if _safe(n)}
    except (tarfile.TarError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{storage.redact(source)} is not a compile-cache archive: {e}") from e
    return key, files


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise ValueError(f"{member.name} is not a file")
    return f.read()


def _safe(name: str) -> bool:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or len(parts) < 2:
        raise ValueError(f"member {name!r} is outside its entry")
    return True


def restore(
    key: CacheKey, archive: tuple[CacheKey, dict[str, bytes]], targets: Mapping[str, str]
) -> int | None:
    """Write an archive's files into the local directories of its entries (entry name ->
    directory), if its key equals `key`: the number of files written (files already there
    are kept), or None on a mismatch, which is logged once per process.

    Each file is written under a temporary name and renamed into place, so a vLLM process
    reading the cache at the same time never sees part of a file.
    """
    cached_key, files = archive
    mismatch = key.mismatch(cached_key)
    if mismatch is not None:
        _say_once(f"The shipped compile cache does not match this engine ({mismatch}): not used")
        return None
    written = 0
    for name, data in files.items():
        entry, relative = name.split("/", 1)
        if entry not in targets:
            continue
        path = os.path.join(targets[entry], relative)
        if os.path.exists(path):
            continue
        _write_whole(path, data)
        written += 1
    return written


def _write_whole(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


# -- vLLM's model-info cache ---------------------------------------------------------------


def collect_model_info(directory: str, names: Iterable[str]) -> dict[str, Any]:
    """The entries `names` of vLLM's model-info cache `directory`
    (``$VLLM_CACHE_ROOT/modelinfos``: ``{"hash": <the model class file's hash>,
    "modelinfo": {...}}`` per model class) that exist and have that form, by file name."""
    found: dict[str, Any] = {}
    for name in names:
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if _INFO_NAME.fullmatch(name) and _is_model_info(entry):
            found[name] = entry
    return found


def _is_model_info(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("hash"), str)
        and isinstance(entry.get("modelinfo"), dict)
    )


def restore_model_info(path: str, directory: str, names: Iterable[str] | None = None) -> list[str]:
    """Write the entries of a shipped `MODEL_INFO` file (`path`; ``{file name: entry}``)
    into vLLM's model-info cache `directory`, each only where the cache has no file of that
    name (a local entry is kept), under a temporary name then renamed: the names written.
    Only the entries named in `names` (the model's own classes), when given, are written.
    vLLM checks each entry's hash against its own model class file before using it, so an
    entry of another vLLM is recomputed, as without it.

    Raises:
        ValueError: the file is larger than `MODEL_INFO_LIMIT` or not such a mapping
            (nothing is written).
        OSError: the file cannot be read or the cache written.
    """
    if os.path.getsize(path) > MODEL_INFO_LIMIT:
        raise ValueError(f"it is larger than {MODEL_INFO_LIMIT} bytes")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, dict) or not all(
        isinstance(name, str) and _INFO_NAME.fullmatch(name) and _is_model_info(entry)
        for name, entry in entries.items()
    ):
        raise ValueError("it is not a map of vLLM model-info entries")
    wanted = None if names is None else set(names)
    written = []
    for name, entry in entries.items():
        if wanted is not None and name not in wanted:
            continue
        target = os.path.join(directory, name)
        if not os.path.exists(target):
            _write_whole(target, json.dumps(entry, indent=2).encode())
            written.append(name)
    return written
