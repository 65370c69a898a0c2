"""LoRA adapters: tensorize them beside a model, and hand them back to vLLM.

A serialized model directory holds its adapters in ``lora/<name>/``: the adapter's
``adapter_config.json`` and its weights as ``adapter_model.tensors`` (encrypted with the
model's key when there is one).

vLLM 0.32 loads adapter weights only from a local PEFT directory (safetensors). To load a
tensorized adapter, `materialize_adapter` deserializes its weights into CPU memory (never
onto a GPU) and writes them, with the config, to a private directory in RAM-backed storage
(``/dev/shm``), so decrypted weights never rest on disk; vLLM then reads them from there as
from any adapter directory. Those directories are removed when the process exits.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from . import storage
from .config import TensorizerConfig, environment
from .errors import ConfigError, StorageError, TensorizeError

__all__ = [
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
_created: list[str] = []


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


def read_adapter(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and weights of a local PEFT adapter directory.

    Raises:
        ConfigError: no ``adapter_config.json`` (or not valid JSON), or no weights file.
    """
    import torch

    config = read_adapter_config(path)
    safetensors_path = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(safetensors_path):
        from safetensors.torch import load_file

        tensors = load_file(safetensors_path)
    else:
        for name in ("adapter_model.bin", "adapter_model.pt"):
            if os.path.exists(os.path.join(path, name)):
                tensors = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
                break
        else:
            raise ConfigError(
                f"LoRA adapter {path}: no adapter_model.safetensors (or .bin/.pt) in it"
            )
    return config, {k: v.contiguous() for k, v in tensors.items()}


def check_adapter_fits(name: str, config: Mapping[str, Any], expected_modules: Iterable[str],
                       max_rank: int | None = None) -> None:
    """Refuse an adapter whose target modules the base model does not have, or whose rank
    is above the engine's ``--max-lora-rank`` (when known). The message names the adapter."""
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
    ranks = [int(config.get("r", 0)), *[int(r) for r in (config.get("rank_pattern") or {}).values()]]
    if max_rank is not None and max(ranks) > max_rank:
        raise ConfigError(
            f"LoRA adapter {name!r} has rank {max(ranks)}, above --max-lora-rank {max_rank}; "
            f"start the engine with --max-lora-rank {max(ranks)} or more"
        )


def stage_adapter(name: str, source: str, destination: str, *, key: bytes | None = None,
                  options: storage.Options = None) -> list[storage.StagedWrite]:
    """Stage adapter `name` (a local PEFT directory `source`) into ``destination/lora/name``:
    its config and its weights as a tensorizer file (encrypted with `key`)."""
    from .layout import FileRecord
    from .serialization import write_tensors

    config, tensors = read_adapter(source)
    target = adapter_uri(destination, name)
    staged = [storage.stage_write(storage.join(target, ADAPTER_CONFIG), options)]
    try:
        with open(staged[0].path, "w") as f:
            json.dump(config, f, indent=2)
        record = FileRecord(architecture="peft-lora", extra={"adapter": name})
        staged.append(write_tensors(storage.join(target, ADAPTER_TENSORS),
                                    [(k, v, False) for k, v in sorted(tensors.items())],
                                    record=record, key=key, options=options).staged)
    except BaseException:
        for item in staged:
            item.abort()
        raise
    return staged


def _ram_root() -> str:
    """A private directory in RAM-backed storage (else in the cache directory)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else environment().cache_dir
    root = os.path.join(base, f"tensorize_vllm_model-{os.getuid()}", "adapters")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(root), 0o700)
    return root


def materialize_adapter(uri: str, config: TensorizerConfig | None = None, *,
                        name: str | None = None) -> str:
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
    from safetensors.torch import save_file

    from .streaming import open_tensors

    name = name or storage.basename(uri)
    tensors_uri = storage.join(uri, ADAPTER_TENSORS)
    config = TensorizerConfig(**{**(config.to_serializable() if config else {}),
                                 "tensorizer_uri": tensors_uri})
    try:
        adapter_config = json.loads(
            storage.read_bytes(storage.join(uri, ADAPTER_CONFIG), config.stream_options(),
                               limit=1 << 20))
        with open_tensors(tensors_uri, device="cpu", config=config) as reader:
            tensors = dict(reader.items())  # each in its own memory: no copy needed
    except json.JSONDecodeError as e:
        raise ConfigError(f"LoRA adapter {name!r}: {ADAPTER_CONFIG} is not valid JSON ({e})") from None
    except StorageError as e:
        if "no such" in str(e) or "not found" in str(e):
            raise StorageError(f"LoRA adapter {name!r} not found at {storage.redact(uri)} ({e})") from None
        raise _rename(e, name) from None
    except TensorizeError as e:
        raise _rename(e, name) from None
    root = _ram_root()
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    final = os.path.join(root, f"{name}-{digest}-{os.getpid()}")
    temp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        with open(os.path.join(temp, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config, f)
        save_file(tensors, os.path.join(temp, "adapter_model.safetensors"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if not _created:
        atexit.register(_cleanup)
    _created.append(final)
    return final


def _cleanup() -> None:
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)
