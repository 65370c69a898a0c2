"""The streaming core: open a tensors file, deserialize it onto a device, load a torch module.

Plain Python and torch (no vLLM), so it serves vLLM's workers, the command line and any
torch model alike:

    with open_tensors("/models/opt/v1/model.tensors", device="cpu") as reader:
        stats = load_into_module(model, reader)

Tensors are read by tensorizer's `TensorDeserializer` straight onto the target device and
become the module's parameters as they are (no second copy). They keep their stored dtype
unless both they and the parameter they fill are floating point, in which case they are
cast to the parameter's dtype: integer (quantized) and complex tensors are never cast.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import storage
from .config import TensorizerConfig
from .storage.ranged import DEFAULT_WORKERS
from .errors import (
    EncryptionError,
    FormatError,
    ModelMismatchError,
    StorageError,
    TensorizeError,
)
from .layout import MARKER_NAME, RECORD_NAME, RESERVED_NAMES, FileRecord, ParallelLayout, rank_uri

if TYPE_CHECKING:
    from tensorizer import TensorDeserializer

__all__ = [
    "TensorReader",
    "LoadStats",
    "open_tensors",
    "load_into_module",
    "meta_parameters",
    "default_num_readers",
    "is_vllm_tensorized",
    "check_shards",
]


@dataclass
class LoadStats:
    """What a load moved and how long it took."""

    uri: str
    tensors: int
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def default_num_readers(uri: str) -> int:
    """Reader threads when the user sets none: one per core (at most 8) for local files,
    the range reader's default for remote ones."""
    if storage.is_local(uri):
        return max(1, min(8, os.cpu_count() or 1))
    return DEFAULT_WORKERS


class TensorReader:
    """A tensors file opened for reading: its record and names now, tensors on demand.

    Opening reads only the header, the tensor index and the file's small record (so a load
    can be refused before any data moves); `items()` then reads every tensor onto the
    device with tensorizer's parallel readers. Use `open_tensors` to make one.
    """

    def __init__(self, uri: str, header: TensorDeserializer, reopen: Callable[[], Any],
                 kwargs: dict[str, Any], device: str | torch.device,
                 keyfile: str | None = None, started: float | None = None):
        self.uri = uri
        self._header = header
        self._reopen = reopen
        self._kwargs = kwargs
        self._device = device
        self._keyfile = keyfile
        # When opening began: load figures count the header and index reads too.
        self.started = time.perf_counter() if started is None else started
        self.record: FileRecord | None = None
        if RECORD_NAME in header:
            with _translate_errors(uri, keyfile=keyfile):
                data = bytes(header[RECORD_NAME].detach().cpu().numpy())
            self.record = FileRecord.from_bytes(data, source=uri)

    @property
    def is_vllm_tensorized(self) -> bool:
        """Whether the file holds a vLLM model's own parameters (vs. a Hugging Face one)."""
        return self.record is not None or MARKER_NAME in self._header

    def names(self) -> list[str]:
        return [_module_name(k) for k in self._header.keys() if k not in RESERVED_NAMES]

    def tensor_types(self) -> dict[str, str]:
        """Each tensor's kind as written (PARAM, BUFFER or STATE_DICT), by name."""
        return {_module_name(_entry_name(path)): entry.type.name
                for path, entry in self._header._metadata.items()}

    @property
    def total_tensor_bytes(self) -> int:
        """Bytes of the model's tensors (the file record and marker left out)."""
        return sum(int(entry.deserialized_length)
                   for path, entry in self._header._metadata.items()
                   if _entry_name(path) not in RESERVED_NAMES)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Read every tensor (the reserved record and marker left out) onto the device,
        with parallel readers, and yield them in file order."""
        from tensorizer import TensorDeserializer

        stream = self._reopen()
        try:
            with _translate_errors(self.uri, keyfile=self._keyfile):
                deserializer = TensorDeserializer(
                    stream, device=self._device, lazy_load=False,
                    filter_func=lambda name: name not in RESERVED_NAMES, **self._kwargs)
                tensors = list(deserializer.items())
                deserializer.close()
                del deserializer  # its cache would keep every tensor alive
            for name, tensor in tensors:
                yield _module_name(name), tensor.detach()
        finally:
            stream.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._header.close()
        self._header = None  # type: ignore[assignment]

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tensors(
    uri: str,
    *,
    device: str | torch.device = "cpu",
    config: TensorizerConfig | None = None,
    decryption: Any = None,
) -> TensorReader:
    """Open a tensors file for streaming onto `device` (only its header is read now).

    Args:
        uri: a local path or an ``s3://`` / ``http(s)://`` URI (no rank template).
        device: where tensors land (``"cpu"``, ``"cuda:0"``...).
        config: read settings (``verify_hash``, ``num_readers``, S3 credentials,
            ``stream_kwargs``, ``deserialization_kwargs``, ``encryption_keyfile``).
        decryption: tensorizer ``DecryptionParams``; read from ``config.encryption_keyfile``
            when not given.

    Raises:
        StorageError: the file cannot be opened.
        FormatError: it is not a tensorizer file, or is truncated.
        EncryptionError: it is encrypted and no key was given, or a key was given for an
            unencrypted file.
    """
    from tensorizer import TensorDeserializer

    config = config or TensorizerConfig(tensorizer_uri=uri)
    if decryption is None and config.encryption_keyfile:
        from .keys import read_decryption_params

        decryption = read_decryption_params(config.encryption_keyfile, config)
    readers = config.deserialization_kwargs.get("num_readers", config.num_readers)
    kwargs: dict[str, Any] = {"verify_hash": bool(config.verify_hash),
                              **config.deserialization_kwargs}
    options = config.stream_options()
    if storage.is_local(uri):
        kwargs["num_readers"] = readers or default_num_readers(uri)
    else:
        # Remote files: our range reader fetches in parallel; tensorizer reads it in order.
        kwargs["num_readers"] = 1
        if readers:
            options["workers"] = readers
    if decryption is not None:
        kwargs["encryption"] = decryption
    name = storage.redact(uri)
    started = time.perf_counter()
    # The header needs no read-ahead: a small window, one worker.
    stream = storage.open_read(uri, {**options, "chunk_size": 1 << 20, "workers": 1})
    try:
        with _translate_errors(name, keyfile=config.encryption_keyfile):
            header = TensorDeserializer(stream, device="cpu", lazy_load=True,
                                        **{k: v for k, v in kwargs.items() if k != "num_readers"},
                                        num_readers=1)
        return TensorReader(name, header, lambda: storage.open_read(uri, options), kwargs,
                            device, keyfile=config.encryption_keyfile, started=started)
    except BaseException:
        stream.close()
        raise


def _entry_name(path: Any) -> str:
    return path[0] if isinstance(path, tuple) and len(path) == 1 else str(path)


def _module_name(name: str) -> str:
    """Tensorizer names tensors of the root module ``.name``; torch calls them ``name``."""
    return name[1:] if name.startswith(".") else name


@contextlib.contextmanager
def _translate_errors(uri: str, *, keyfile: str | None = None) -> Iterator[None]:
    """Turn tensorizer's exceptions into this package's, naming the file."""
    from tensorizer.serialization import CryptographyError, HashMismatchError

    try:
        yield
    except TensorizeError:
        raise
    except CryptographyError as e:
        text = str(e)
        if "decryption was not requested" in text:
            raise EncryptionError(
                f"{uri} is encrypted: give the key with --keyfile / encryption_keyfile"
            ) from None
        if "not flagged as encrypted" in text or "predating encryption" in text:
            raise EncryptionError(
                f"{uri} is not encrypted, but a key was given ({keyfile}); leave the key out"
            ) from None
        raise EncryptionError(
            f"cannot decrypt {uri}"
            + (f" with the key in {keyfile}" if keyfile else "")
            + ": wrong key (or corrupted data)"
        ) from None
    except HashMismatchError as e:
        raise FormatError(f"{uri}: hash check failed: {e}") from None
    except (struct.error, EOFError, AssertionError) as e:
        raise FormatError(f"{uri} is truncated or corrupt ({type(e).__name__}: {e})") from None
    except ValueError as e:
        text = str(e)
        if "Not a tensorizer file" in text:
            raise FormatError(f"{uri} is not a tensorizer file") from None
        if "too small" in text or "empty" in text or "Unsupported version" in text:
            raise FormatError(f"{uri} is truncated or corrupt: {text}") from None
        raise
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None


class _EmptyOnMeta(TorchDispatchMode):
    """Sends ``torch.empty`` allocations on `device` to the meta device.

    vLLM's layers create their parameters with ``torch.empty``; on meta they cost no
    memory and are replaced by the deserialized tensors. Everything else (buffers such as
    rotary caches computed with ``arange``, ``ones``...) is created as usual.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten.empty.memory_format:
            target = kwargs.get("device")
            if target is None or _same_device(torch.device(target), self.device):
                kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def meta_parameters(device: str | torch.device) -> Iterator[None]:
    """Build a module with its ``torch.empty`` parameters on meta (no memory, no init)."""
    with _EmptyOnMeta(torch.device(device)):
        yield


def load_into_module(
    module: torch.nn.Module,
    reader: TensorReader,
    *,
    strict: bool = True,
) -> LoadStats:
    """Fill `module`'s parameters and buffers with the tensors of `reader`, by name.

    Each parameter is replaced by a new one holding the deserialized tensor (attributes
    that vLLM attaches to parameters are carried over, and parameters shared between
    modules stay shared). Floating-point tensors are cast to the parameter's dtype when it
    differs; other tensors keep their stored dtype.

    Args:
        module: the module; its parameters may be on meta (see `meta_parameters`).
        reader: an open `TensorReader`.
        strict: refuse a file whose tensors do not match the module (missing, extra or
            misshapen tensors, all named in one error). A buffer the module computed
            itself (not on meta) whose shape differs from the file's is kept as computed.

    Returns:
        `LoadStats` of the load.

    Raises:
        ModelMismatchError: naming every missing, unexpected or misshapen tensor.
    """
    slots = _tensor_slots(module)
    loaded: set[str] = set()
    unexpected: list[str] = []
    misshapen: list[str] = []
    nbytes = 0
    count = 0
    for name, tensor in reader.items():
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
        slot = slots.get(name)
        if slot is None:
            unexpected.append(name)
            continue
        current = slot.current()
        if tuple(current.shape) != tuple(tensor.shape):
            if slot.is_buffer and not current.is_meta:
                # Derived from the engine's settings at init (e.g. a rotary cache): the
                # module's own value is right for this engine.
                loaded.update(slot.aliases)
                continue
            misshapen.append(f"{name} (file {tuple(tensor.shape)}, model {tuple(current.shape)})")
            continue
        loaded.update(slot.aliases)
        if tensor.is_floating_point() and current.is_floating_point() and tensor.dtype != current.dtype:
            tensor = tensor.to(current.dtype)
        slot.replace(tensor)
    seconds = time.perf_counter() - reader.started

    still_meta = sorted(
        name for name, slot in slots.items() if slot.current().is_meta and name not in loaded
    )
    if strict and (unexpected or misshapen or still_meta):
        problems = []
        if still_meta:
            problems.append(f"missing from the file: {', '.join(still_meta)}")
        if unexpected:
            problems.append(f"not in the model: {', '.join(unexpected)}")
        if misshapen:
            problems.append(f"wrong shape: {', '.join(misshapen)}")
        raise ModelMismatchError(
            f"{reader.uri} does not match the model being loaded "
            f"({type(module).__name__}): " + "; ".join(problems)
        )
    if still_meta:
        raise ModelMismatchError(
            f"after loading {reader.uri}, these tensors are still on the meta device (not "
            f"loaded): {', '.join(still_meta)}"
        )
    return LoadStats(uri=reader.uri, tensors=count, bytes=nbytes, seconds=seconds)


class _Slot:
    """Every (module, attribute) place where one parameter or buffer object is held."""

    def __init__(self, is_buffer: bool):
        self.is_buffer = is_buffer
        self.places: list[tuple[torch.nn.Module, str]] = []
        self.aliases: list[str] = []

    def current(self) -> torch.Tensor:
        owner, attr = self.places[0]
        return (owner._buffers if self.is_buffer else owner._parameters)[attr]

    def replace(self, tensor: torch.Tensor) -> None:
        old = self.current()
        if self.is_buffer:
            new: torch.Tensor = tensor
        else:
            new = torch.nn.Parameter(tensor, requires_grad=False)
            # vLLM hangs loader hooks and sharding facts on its parameters.
            for key, value in vars(old).items():
                if key not in vars(new):
                    setattr(new, key, value)
        for owner, attr in self.places:
            (owner._buffers if self.is_buffer else owner._parameters)[attr] = new


def _tensor_slots(module: torch.nn.Module) -> dict[str, _Slot]:
    """Map every name (tied aliases included) of every parameter and buffer to its slot."""
    by_identity: dict[int, _Slot] = {}
    slots: dict[str, _Slot] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table, is_buffer in ((owner._parameters, False), (owner._buffers, True)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                slot = by_identity.setdefault(id(tensor), _Slot(is_buffer))
                if (owner, attr) not in [(o, a) for o, a in slot.places]:
                    slot.places.append((owner, attr))
                name = f"{prefix}.{attr}" if prefix else attr
                if name not in slots:
                    slot.aliases.append(name)
                    slots[name] = slot
    return slots


def is_vllm_tensorized(tensorizer_config: TensorizerConfig) -> bool:
    """Whether the file of `tensorizer_config` holds a vLLM model's parameters.

    True for files written by this package or by vLLM's own serializer (they carry a
    marker); False for a Hugging Face model written with ``write_module``. Only the header
    is read. For a rank template, the file of rank 0 is checked.
    """
    if tensorizer_config.vllm_tensorized:
        return True
    uri = tensorizer_config.tensorizer_uri
    assert uri is not None
    if tensorizer_config.is_sharded:
        uri = uri % 0
    with open_tensors(uri, device="cpu", config=tensorizer_config) as reader:
        return reader.is_vllm_tensorized


def check_shards(config: TensorizerConfig, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1) -> int:
    """Check every rank's file before any engine work: it opens, it is a tensorizer file, it
    decrypts with the key given, and it was written for this layout and rank.

    Only headers (and each file's small record) are read.

    Returns:
        The total tensor bytes of all ranks.

    Raises:
        ConfigError: more than one rank and no rank template in ``tensorizer_uri``.
        StorageError: a shard is missing (named) or unreachable.
        LayoutError: a shard was written for another layout (both are named).
        EncryptionError, FormatError: as `open_tensors`.
    """
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    uri = config.tensorizer_uri
    assert uri is not None
    rank_uri(uri, ParallelLayout(tp, pp))  # refuses a missing template, naming the URI
    total = 0
    for rank in range(tp * pp):
        layout = ParallelLayout(tp, pp, tp_rank=rank % tp, pp_rank=rank // tp)
        with open_tensors(rank_uri(uri, layout), device="cpu", config=config) as reader:
            if reader.record is not None:
                reader.record.check_layout(layout, source=reader.uri)
            total += reader.total_tensor_bytes
    return total
