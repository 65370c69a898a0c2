"""LoRA adapters: tensorize them beside a model, and hand them back to vLLM.

A serialized model directory holds its adapters in ``lora/<name>/``: the adapter's
``adapter_config.json`` and its weights as ``adapter_model.tensors`` (encrypted with the
model's key when there is one).

vLLM 0.32 loads adapter weights only from a local PEFT directory (safetensors). To load a
tensorized adapter, `materialize_adapter` deserializes its weights into CPU memory (never
onto a GPU) and writes them, with the config, to a private directory in RAM-backed storage
(``/dev/shm``), so decrypted weights never rest on disk; vLLM then reads them from there as
from any adapter directory. Those directories are removed when the process exits (the
storage layer's temporary directories: `storage.temporary_directories`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import storage
from ..config import TensorizerConfig
from ..core.errors import ConfigError, NotFound, StorageError, TensorizeError
from ..core.redaction import scrubbing
from ..core.settings import environment

logger = scrubbing(__name__)

__all__ = [
    "AdapterSource",
    "prepare_adapters",
    "check_adapter_weights",
    "ADAPTERS_DIR",
    "ADAPTER_TENSORS",
    "adapter_name",
    "read_adapter",
    "read_adapter_config",
    "check_adapter_fits",
    "stage_adapter",
    "adapter_uri",
    "materialize_adapter",
]

ADAPTERS_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TENSORS = "adapter_model.tensors"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def adapter_name(path: str) -> str:
    """The directory name an adapter gets: the last component of its path or Hub id."""
    name = os.path.basename(os.path.normpath(path.rstrip("/")))
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"--lora-path {path!r}: cannot make an adapter name from it")
    return name


def adapter_uri(model: str, name: str) -> str:
    """Where adapter `name` of serialized model directory `model` lives."""
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"invalid LoRA adapter name {name!r}")
    return storage.join(model, ADAPTERS_DIR, name)


def _rename(error: TensorizeError, name: str) -> TensorizeError:
    return type(error)(f"LoRA adapter {name!r}: {error}")


def read_adapter_config(path: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of a local PEFT adapter directory.

    Raises:
        ConfigError: there is none, or it is not valid JSON.
    """
    config_path = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(config_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"LoRA adapter {path}: no {ADAPTER_CONFIG} in it") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"LoRA adapter {path}: cannot read {ADAPTER_CONFIG}: {e}") from None


_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


def _weights_file(path: str) -> str:
    for name in _WEIGHTS_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ConfigError(f"LoRA adapter {path}: no adapter_model.safetensors (or .bin/.pt) in it")


def _load_weights(weights: str, *, lazy: bool = False) -> Mapping[str, Any]:
    """The tensors of a PEFT weights file (with `lazy`, only what checking them needs:
    the safetensors header, or a memory-mapped torch file)."""
    import torch

    if weights.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        if lazy:
            with safe_open(weights, framework="pt") as f:
                return dict.fromkeys(f.keys(), True)
        return load_file(weights)
    try:
        return torch.load(weights, map_location="cpu", weights_only=True, mmap=lazy)
    except RuntimeError:
        if not lazy:
            raise
        # An old (non-zip) torch file cannot be memory-mapped: read it.
        return torch.load(weights, map_location="cpu", weights_only=True)


def check_adapter_weights(path: str) -> str:
    """Check that local PEFT adapter directory `path` has a weights file that holds tensors
    (safetensors: its header only; .bin/.pt: memory-mapped). Returns the file.

    Raises:
        ConfigError: no weights file, or one that cannot be read or holds no tensors.
    """
    weights = _weights_file(path)
    try:
        tensors = _load_weights(weights, lazy=True)
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise many kinds
        raise ConfigError(
            f"LoRA adapter {path}: cannot read {os.path.basename(weights)} "
            f"({type(e).__name__}: {e})"
        ) from None
    if not isinstance(tensors, Mapping) or not tensors:
        raise ConfigError(f"LoRA adapter {path}: {os.path.basename(weights)} holds no tensors")
    return weights


def read_adapter(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and weights of a local PEFT adapter directory.

    Raises:
        ConfigError: no ``adapter_config.json`` (or not valid JSON), or no weights file.
    """
    config = read_adapter_config(path)
    tensors = _load_weights(_weights_file(path))
    return config, {k: v.contiguous() for k, v in tensors.items()}


@dataclass(frozen=True)
class AdapterSource:
    """A checked ``--lora-path``: its name in ``lora/<name>/``, its local PEFT directory
    and its ``adapter_config.json``."""

    name: str
    path: str
    config: dict[str, Any]


def prepare_adapters(
    lora_paths: Sequence[str], *, download_dir: str | None = None, max_rank: int | None = None
) -> list[AdapterSource]:
    """Check every adapter that needs no model before any engine starts: unique names, a
    local directory (or a Hub id resolved now), a readable ``adapter_config.json``, a
    weights file that holds tensors, and (when known) a rank within ``--max-lora-rank``.
    What needs the loaded model (its target modules) is `check_adapter_fits`.

    Raises:
        ConfigError, StorageError: naming the adapter and what is wrong.
    """
    from .model_files import resolve_model_files

    adapters: list[AdapterSource] = []
    for path in lora_paths:
        name = adapter_name(path)
        if name in [a.name for a in adapters]:
            raise ConfigError(f"two --lora-path values are both named {name!r}")
        if os.path.isdir(path):
            local = path
        elif os.path.exists(path) or os.path.isabs(path) or path.startswith("."):
            raise ConfigError(
                f"--lora-path {path}: not a directory (a PEFT adapter directory "
                "holds adapter_config.json and adapter_model.safetensors)"
            )
        else:
            local = resolve_model_files(path, download_dir=download_dir, weights=True)
        config = read_adapter_config(local)
        check_adapter_weights(local)
        check_adapter_fits(name, config, None, max_rank)
        adapters.append(AdapterSource(name, local, config))
    return adapters


def check_adapter_fits(
    name: str,
    config: Mapping[str, Any],
    expected_modules: Iterable[str] | None,
    max_rank: int | None = None,
) -> None:
    """Refuse an adapter whose target modules the base model does not have (when
    `expected_modules` is given), or whose rank is above the engine's ``--max-lora-rank``
    (when known). The message names the adapter."""
    ranks = [
        int(config.get("r", 0)),
        *[int(r) for r in (config.get("rank_pattern") or {}).values()],
    ]
    if max_rank is not None and max(ranks) > max_rank:
        raise ConfigError(
            f"LoRA adapter {name!r} has rank {max(ranks)}, above --max-lora-rank {max_rank}; "
            f"start the engine with --max-lora-rank {max(ranks)} or more"
        )
    if expected_modules is None:
        return
    expected = set(expected_modules)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression over module paths
        targets = [t for t in expected if re.search(targets, t)] or [targets]
    missing = sorted(t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] not in expected)
    if missing:
        raise ConfigError(
            f"LoRA adapter {name!r} targets module(s) {', '.join(missing)} that the base model "
            f"does not have; it has {', '.join(sorted(expected))}"
        )


def stage_adapter(
    tx: storage.Transaction,
    name: str,
    source: str,
    destination: str,
    *,
    key: bytes | None = None,
) -> None:
    """Stage adapter `name` (a local PEFT directory `source`) into ``destination/lora/name``
    in transaction `tx`: its config and its weights as a tensorizer file (encrypted with
    `key`)."""
    from ..format.record import FileRecord
    from ..format.writer import write_tensors

    config, tensors = read_adapter(source)
    target = adapter_uri(destination, name)
    staged = tx.stage(storage.join(target, ADAPTER_CONFIG))
    with open(staged.path, "w") as f:
        json.dump(config, f, indent=2)
    write_tensors(
        storage.join(target, ADAPTER_TENSORS),
        [(k, v, False) for k, v in sorted(tensors.items())],
        record=FileRecord(architecture="peft-lora", extra={"adapter": name}),
        key=key,
        tx=tx,
    )


RAM_DIR = "/dev/shm"


def _ram_root(need: int = 0) -> str:
    """A private (0700) directory for an adapter of `need` bytes: in RAM-backed storage
    (`RAM_DIR`) when it is writable and has room for it, else in the cache directory on disk
    (Docker gives ``/dev/shm`` 64 MB), saying so.

    Raises:
        StorageError: the directory's name is taken by a link, a file, or a directory of
            another user (in a shared ``/dev/shm`` anyone may create it first); nothing is
            written into it then.
    """
    base = environment().cache_dir
    if os.access(RAM_DIR, os.W_OK):
        free = _free_bytes(RAM_DIR)
        if need * 1.05 + (1 << 20) <= free:
            base = RAM_DIR
        else:
            logger.warning(
                "The LoRA adapter (%.1f MB) does not fit in %s (%.1f MB free): it is written "
                "to a private (0700) directory on disk under %s instead, removed at exit",
                need / 1e6,
                RAM_DIR,
                free / 1e6,
                base,
            )
    return _private_directory(base)


def _free_bytes(path: str) -> int:
    """Bytes free for this user on the filesystem of `path`."""
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def _private_directory(base: str) -> str:
    private = os.path.join(base, f"tensorize_vllm_model-{os.getuid()}")
    try:
        os.makedirs(private, mode=0o700, exist_ok=True)
        info = os.lstat(private)
    except OSError as e:
        raise StorageError(
            f"cannot create the private directory {private}: {e.strerror or e}"
        ) from e
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StorageError(
            f"{private} is not a directory of this user (a link, a file, or another user's "
            "directory), so no adapter is written there; remove it and try again"
        )
    os.chmod(private, 0o700)
    root = os.path.join(private, "adapters")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def materialize_adapter(
    uri: str, config: TensorizerConfig | None = None, *, name: str | None = None
) -> str:
    """Deserialize the tensorized adapter at `uri` (a ``lora/<name>`` directory: local, S3 or
    HTTP(S)) into CPU memory and write it as a PEFT directory vLLM can load.

    Args:
        uri: the adapter's directory.
        config: how to read it: ``encryption_keyfile``, S3 credentials, ``stream_kwargs``.
        name: the adapter's name, for messages (default: the last part of `uri`).

    Returns:
        The local directory (private, in RAM-backed storage, removed at process exit).

    Raises:
        StorageError, EncryptionError, FormatError, ConfigError: naming the adapter.
    """
    name = name or storage.basename(uri)
    adapter_config, tensors = _read_tensorized_adapter(uri, config, name)
    return _write_peft_directory(uri, name, adapter_config, tensors)


def _read_tensorized_adapter(
    uri: str, config: TensorizerConfig | None, name: str
) -> tuple[Any, dict[str, Any]]:
    """The adapter's config and its tensors (in CPU memory), errors naming the adapter."""
    from ..read.reader import open_tensors

    tensors_uri = storage.join(uri, ADAPTER_TENSORS)
    config = TensorizerConfig(
        **{**(config.to_serializable() if config else {}), "tensorizer_uri": tensors_uri}
    )
    try:
        adapter_config = json.loads(
            storage.read_bytes(storage.join(uri, ADAPTER_CONFIG), config.options, limit=1 << 20)
        )
        with open_tensors(tensors_uri, device="cpu", config=config) as reader:
            tensors = dict(reader.items())  # each in its own memory: no copy needed
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"LoRA adapter {name!r}: {ADAPTER_CONFIG} is not valid JSON ({e})"
        ) from None
    except NotFound as e:
        raise NotFound(f"LoRA adapter {name!r} not found at {storage.redact(uri)} ({e})") from None
    except TensorizeError as e:
        raise _rename(e, name) from None
    return adapter_config, tensors


def _write_peft_directory(uri: str, name: str, adapter_config: Any, tensors: dict[str, Any]) -> str:
    """A private PEFT directory in RAM-backed storage holding the adapter, written whole or
    not at all (a directory staged in a `storage.transaction`) and deleted at process exit
    (``temporary=True``: the storage layer keeps the list)."""
    from safetensors.torch import save_file

    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    final = os.path.join(_ram_root(need), f"{name}-{digest}-{os.getpid()}")
    with storage.transaction() as tx:
        staged = tx.stage_directory(final, temporary=True)
        with open(os.path.join(staged.path, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config, f)
        save_file(tensors, os.path.join(staged.path, "adapter_model.safetensors"))
    return final
