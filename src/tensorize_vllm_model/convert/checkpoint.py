"""Reading a Hugging Face checkpoint tensor by tensor, without vLLM: a local directory of
``*.safetensors`` or ``pytorch_model*.bin`` files (sharded with an index file or not).

Tensors come out one at a time (safetensors memory-maps each file; ``.bin`` files are
loaded with ``torch.load(mmap=True)``), so reading never holds more than one tensor's copy.
A sharded checkpoint is checked against its index before anything is read: a shard the
index names but the directory lacks is an error naming the file, and so are files that hold
no tensor (a ``.bin`` of a nested dict, say) or a tensor held by two of the files read (a
stray file beside the shards), which would be written twice.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import ConfigError, FormatError, StorageError

__all__ = ["Checkpoint", "open_checkpoint", "hub_weight_files"]

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_SAFETENSORS_DTYPES = {  # safetensors' dtype names (its header format)
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
}


@dataclass
class Checkpoint:
    """A checkpoint's weight files and what its ``config.json`` says.

    Attributes:
        directory: the local directory.
        files: the weight files, in the order their tensors are read.
        kind: ``"safetensors"`` or ``"bin"``.
        config: ``config.json`` as a dict.
    """

    directory: str
    files: list[str]
    kind: str
    config: dict = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [""])[0]

    @property
    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order of `tensors`, from the files'
        headers (safetensors) or memory-mapped state dicts (``.bin``): no data is read."""
        for path in self.files:
            if self.kind == "safetensors":
                with _safe_open(path) as f:
                    for name in f.keys():
                        yield name, tuple(f.get_slice(name).get_shape())
            else:
                for name, tensor in _bin_items(path):
                    yield name, tuple(tensor.shape)

    def tensor_bytes(self, target: torch.dtype | None = None) -> int:
        """The bytes of all tensors once floating-point ones are cast to `target` (None: as
        stored), from the headers (safetensors) or memory-mapped state dicts (``.bin``)."""
        total = 0
        for _, dtype, numel in self.dtypes():
            if target is not None and dtype.is_floating_point:
                dtype = target
            total += numel * dtype.itemsize
        return total

    def dtypes(self) -> Iterator[tuple[str, torch.dtype, int]]:
        """(name, dtype, element count) of every weight, in the order of `tensors`, from the
        headers (safetensors) or memory-mapped state dicts (``.bin``): no data is read."""
        for path in self.files:
            if self.kind == "safetensors":
                with _safe_open(path) as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        numel = 1
                        for d in piece.get_shape():
                            numel *= d
                        yield name, _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.uint8), numel
            else:
                for name, tensor in _bin_items(path):
                    yield name, tensor.dtype, tensor.numel()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every weight, file by file, each a CPU tensor (a view of the
        memory-mapped file where the format allows)."""
        for path in self.files:
            if self.kind == "safetensors":
                yield from _safetensors_items(path)
            else:
                yield from _bin_items(path)


@contextlib.contextmanager
def _safe_open(path: str) -> Iterator[Any]:
    """safetensors' `safe_open`, its errors naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (OSError, ValueError, SafetensorError) as e:
        raise FormatError(f"cannot read the checkpoint file {path}: {e}") from None


def _safetensors_items(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    with _safe_open(path) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _bin_items(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise FormatError(f"cannot read the checkpoint file {path}: {e}") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path} does not hold a state dict (found {type(state).__name__})")
    for name in list(state):
        tensor = state.pop(name)
        if isinstance(tensor, dict):  # a training checkpoint's {"model": state_dict, ...}
            raise FormatError(
                f"{path} holds a nested dict under {name!r}, not a model's state dict of "
                "tensors: save the model's state_dict() itself"
            )
        if isinstance(tensor, torch.Tensor):
            yield name, tensor


def open_checkpoint(directory: str) -> Checkpoint:
    """The checkpoint in local `directory`: safetensors preferred over ``.bin``.

    Raises:
        StorageError: no such directory, no ``config.json``, no weight files, or a shard
            named by the index file that is missing (named).
        ConfigError: ``config.json`` names no architecture.
        FormatError: a weight file cannot be read or holds a nested dict, the files
            hold no tensor, or two of them hold the same tensor (both files and the
            tensor named).
    """
    if not os.path.isdir(directory):
        raise StorageError(f"--model {directory}: no such directory")
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise StorageError(
            f"{config_path} is missing: is {directory} a Hugging Face checkpoint?"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"cannot read {config_path}: {e}") from None
    if not config.get("architectures"):
        raise ConfigError(
            f"{config_path} names no architecture ('architectures' is empty): "
            "vLLM would not know which model to build"
        )
    for kind, index, pattern in (
        ("safetensors", _SAFETENSORS_INDEX, ".safetensors"),
        ("bin", _BIN_INDEX, ".bin"),
    ):
        files = _files_of(directory, index, pattern)
        if files:
            _check_names(directory, files, kind)
            return Checkpoint(directory=directory, files=files, kind=kind, config=config)
    if any(name.endswith(".tensors") for name in os.listdir(directory)):
        raise StorageError(
            f"{directory} holds no weights to convert: it looks already converted (it holds "
            "model.tensors); load it with --load-format tensorizer (load_format='tensorizer')"
        )
    raise StorageError(
        f"{directory} holds no weights (no *.safetensors or pytorch_model*.bin files); "
        "--model takes the checkpoint directory (config.json beside its weights)"
    )


def _check_names(directory: str, files: list[str], kind: str) -> None:
    """Refuse weight files that hold no tensor at all, or the same tensor twice, from the
    headers (safetensors) or memory-mapped state dicts (``.bin``): of a tensor in two
    files, which copy a file keeps would depend on the order the files are read in and on
    how tensors are batched (tensorizer 2.12 refuses a name written twice, except within
    one ``write_state_dict`` batch, where the last wins)."""
    seen: dict[str, str] = {}
    for path in files:
        if kind == "safetensors":
            with _safe_open(path) as f:
                names = list(f.keys())
        else:
            names = [name for name, _ in _bin_items(path)]
        for name in names:
            if name in seen:
                raise FormatError(
                    f"tensor {name} is in two files of the checkpoint: {seen[name]} and "
                    f"{path}; remove the file that is not part of it (or add the index "
                    "file that names the checkpoint's shards)"
                )
            seen[name] = path
    if not seen:
        raise FormatError(
            f"the checkpoint in {directory} holds no tensors "
            f"({', '.join(os.path.basename(f) for f in files)})"
        )


def hub_weight_files(model: str, revision: str | None, cache_dir: str | None) -> list[str] | None:
    """The files of Hugging Face Hub repository `model` that `open_checkpoint` reads once
    downloaded: the files its index names (the index downloaded first) and the index, else
    every weight file of the preferred format, all at the repository's top level; so a
    repository's other copies of the weights (``original/*.pth``, ``consolidated.*``, the
    other format) are not downloaded. None when the Hub cannot list the repository
    (offline: the cached snapshot is taken as it is)."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        names = [n for n in list_repo_files(model, revision=revision) if "/" not in n]
        for index, suffix in ((_SAFETENSORS_INDEX, ".safetensors"), (_BIN_INDEX, ".bin")):
            if index in names:
                path = hf_hub_download(model, index, revision=revision, cache_dir=cache_dir)
                with open(path) as f:
                    return [*sorted(set(json.load(f)["weight_map"].values())), index]
            if _weight_names(names, suffix):
                return _weight_names(names, suffix)
    except Exception:  # noqa: BLE001 - the Hub raises many kinds; the download then decides
        return None
    return None


def _weight_names(names: Iterable[str], suffix: str) -> list[str]:
    """The weight files of one format among the file `names` of a directory, sorted:
    ``*.safetensors``, or ``pytorch_model*.bin`` (not ``training_args.bin`` and the like);
    hidden files left out."""
    return sorted(
        n
        for n in names
        if n.endswith(suffix)
        and not n.startswith(".")
        and (suffix != ".bin" or n.startswith("pytorch_model"))
    )


def _files_of(directory: str, index: str, suffix: str) -> list[str]:
    """The weight files of one format: those the index names (each must exist), else every
    file with `suffix` in the directory."""
    index_path = os.path.join(directory, index)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"cannot read the checkpoint index {index_path}: {e}") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise StorageError(
                f"the checkpoint in {directory} is incomplete: {', '.join(missing)} "
                f"(named in {index}) missing"
            )
        return [os.path.join(directory, n) for n in names]
    return [os.path.join(directory, n) for n in _weight_names(os.listdir(directory), suffix)]
