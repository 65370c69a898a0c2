"""The streaming core: open a tensors file, deserialize it onto a device, load a torch module.

Plain Python and torch (no vLLM), so it serves vLLM's workers, the command line and any
torch model alike:

    with open_tensors("/models/opt/v1/model.tensors", device="cpu") as reader:
        stats = load_into_module(model, reader)

Tensors are read by tensorizer's `TensorDeserializer` straight onto the target device (a
local file into CPU or CUDA memory by `local_read`, which is faster there) and become the
module's parameters as they are (no second copy). They keep their stored dtype
unless both they and the parameter they fill are floating point, in which case they are
cast to the parameter's dtype: integer (quantized) and complex tensors are never cast.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import storage
from .config import TensorizerConfig, as_tensorizer_config
from .errors import (
    CorruptTensorError,
    EncryptionError,
    FormatError,
    ModelMismatchError,
    StorageError,
    TensorizeError,
)
from .format.names import has_rank_template, rank_uri
from .format.record import MARKER_NAME, RECORD_NAME, RESERVED_NAMES, FileRecord, ParallelLayout
from .plan import check_shared_file
from .remote_read import HEADER_LENGTH, check_header_length
from .storage.ranged import DEFAULT_WORKERS

if TYPE_CHECKING:
    from tensorizer import TensorDeserializer

    from .local_read import ReadTimes, Span

__all__ = [
    "TensorReader",
    "TensorEntry",
    "FileFacts",
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
    # Where the reader threads spent their time (this package's own reads of a local file).
    read_times: ReadTimes | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the file's index describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    kind: str


def _dtype_name(stored: str) -> str:
    """The torch name of a stored dtype: numpy's name, or the torch name tensorizer keeps
    after its separator for dtypes numpy lacks (bfloat16...)."""
    numpy_name, _, torch_name = stored.partition("\0")
    if torch_name:
        return torch_name.removeprefix("torch.")
    try:
        import numpy

        return numpy.dtype(numpy_name).name
    except TypeError:
        return numpy_name


def default_num_readers(uri: str, device: str | torch.device = "cpu") -> int:
    """Reader threads when the user sets none, as measured fastest (README, Performance):
    for a local file, four onto a GPU (each reader holds two 8 MiB page-locked staging
    buffers; on an H100 four beat two, and eight were no faster fresh and pin twice the host
    memory) and eight into CPU memory
    (a cold file reads faster with more requests in flight, even on two cores); the range
    reader's default for remote files."""
    if storage.local_path(uri) is not None:
        return 4 if torch.device(device).type == "cuda" else 8
    return DEFAULT_WORKERS


class TensorReader:
    """A tensors file opened for reading: its record and names now, tensors on demand.

    Opening reads only the header, the tensor index and the file's small record (so a load
    can be refused before any data moves); `items()` then reads every tensor onto the
    device with tensorizer's parallel readers. Use `open_tensors` to make one.
    """

    def __init__(
        self,
        uri: str,
        header: TensorDeserializer,
        facts: FileFacts,
        reopen: Callable[[], Any],
        kwargs: dict[str, Any],
        device: str | torch.device,
        *,
        keyfile: str | None,
        started: float,
        keyless: bool,
        own_reads: str | None = None,
        remote: bool = False,
    ):
        self.uri = uri
        self._remote = remote
        self.facts = facts
        self._keyless = keyless
        self._own_reads = own_reads
        self._header = header
        self._reopen = reopen
        self._kwargs = kwargs
        self._device = device
        self._keyfile = keyfile
        # When opening began: load figures count the header and index reads too.
        self.started = started
        self.read_times: ReadTimes | None = None  # of the last items(), by our own reads
        # Called with the bytes of each piece or tensor items() finishes (see progress.py).
        self.on_bytes: Callable[[int], None] | None = None
        # Encrypted like every tensor: without the key, a file's record stays unknown.
        self.record = None if keyless else _read_record(header, uri, keyfile)

    @property
    def is_vllm_tensorized(self) -> bool:
        """Whether the file holds a vLLM model's own parameters (vs. a Hugging Face one)."""
        if self.checkpoint_form:
            return False
        return self.record is not None or MARKER_NAME in self._header

    @property
    def checkpoint_form(self) -> bool:
        """Whether the file was written by ``convert``: a checkpoint's own tensors, for any
        parallel layout (see `convert`)."""
        return self.record is not None and self.record.is_checkpoint_form

    @property
    def index(self) -> dict[str, Any]:
        """tensorizer's index entry of every tensor by module name (``data_offset``,
        ``data_length``, ``offset`` of its header), the reserved record and marker left
        out."""
        return dict(self._index())

    @property
    def header_deserializer(self) -> TensorDeserializer:
        """The `TensorDeserializer` that read the index (with the key, if any)."""
        return self._header

    @property
    def encrypted(self) -> bool:
        return self.facts.encrypted

    def entries(self) -> list[TensorEntry]:
        """Every tensor in file order (the reserved record and marker left out), from the
        index alone: nothing is read or allocated."""
        return [
            TensorEntry(
                name=name,
                dtype=_dtype_name(entry.dtype),
                shape=tuple(int(d) for d in entry.shape),
                bytes=int(entry.deserialized_length),
                kind=entry.type.name,
            )
            for name, entry in self._index()
        ]

    def _index(self) -> Iterator[tuple[str, Any]]:
        """(module name, tensorizer's index entry) of every tensor in file order, the
        reserved record and marker left out."""
        for path, entry in self._header._metadata.items():
            name = _entry_name(path)
            if name not in RESERVED_NAMES:
                yield _module_name(name), entry

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def tensor_types(self) -> dict[str, str]:
        """Each tensor's kind as written (PARAM, BUFFER or STATE_DICT), by name."""
        return {e.name: e.kind for e in self.entries()}

    @property
    def total_tensor_bytes(self) -> int:
        """Bytes of the model's tensors (the file record and marker left out)."""
        return sum(e.bytes for e in self.entries())

    def items(self, only: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Read every tensor (the reserved record and marker left out), or those named in
        `only`, onto the device, and yield them in file order.

        Raises:
            ModelMismatchError: the file holds no tensors (and `only` is not given).
            FormatError, StorageError, EncryptionError: as `open_tensors`, naming the
                file (and the tensor at fault).
        """
        if self._keyless:
            raise EncryptionError(f"{self.uri} is encrypted: give the key to read its tensors")
        if only is None and not self.entries():
            raise ModelMismatchError(
                f"{self.uri} holds no tensors (a valid tensorizer file with an empty index): "
                "there is nothing to load"
            )
        if self._own_reads == REMOTE:
            yield from self._remote_items(only)
            return
        spans = self._spans(only) if self._own_reads else None
        if spans is not None:
            from .local_read import ReadTimes, read_spans
            from .tensor_decryption import DecryptionFailed

            self.read_times = ReadTimes()
            try:
                tensors = read_spans(
                    self._own_reads,
                    spans,
                    self._kwargs["num_readers"],
                    name=self.uri,
                    device=self._device,
                    times=self.read_times,
                    on_bytes=self.on_bytes,
                )
            except DecryptionFailed:
                raise _wrong_key(self.uri, self._keyfile) from None
            if self._kwargs["verify_hash"]:
                self._check_hashes(spans, tensors)
            for span, tensor in zip(spans, tensors):
                yield span.name, tensor
            return
        yield from self._tensorizer_items(only)

    def _check_hashes(self, spans: list[Span], tensors: list[torch.Tensor]) -> None:
        """Check tensors read by `local_read` (into CPU memory) against their stored hashes.

        Raises:
            CorruptTensorError: naming the first tensor that fails.
        """
        from .local_read import pread_each
        from .tensor_hashes import stored_hashes

        entries = dict(self._index())
        places = [
            (entries[s.name].offset, entries[s.name].data_offset - entries[s.name].offset)
            for s in spans
        ]
        fd = os.open(self._own_reads, os.O_RDONLY)
        try:
            raws = pread_each(fd, places)
        finally:
            os.close(fd)
        for span, tensor, raw in zip(spans, tensors, raws):
            try:
                hashes = stored_hashes(raw, self._header)
            except Exception as e:  # noqa: BLE001 - tensorizer's parser rejects it
                raise FormatError(
                    f"{self.uri} is corrupt: the header of tensor {span.name} "
                    f"cannot be read ({type(e).__name__}: {e})"
                ) from None
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if span.length else b""
            hashes.check(data, tensor=span.name, uri=self.uri)

    def _tensorizer_items(self, only: Collection[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors through tensorizer's reader (see `_own_reads` for when); a remote
        stream's tensor headers are checked as they pass (`remote_read.HeaderGuard`)."""
        from tensorizer import TensorDeserializer

        from .remote_read import HeaderGuard

        stream = self._reopen()
        if self._remote:  # no up-front check of its tensor headers was made
            stream = HeaderGuard(
                stream,
                {
                    entry.offset: (name, entry.data_offset - entry.offset)
                    for name, entry in self._index()
                },
                self.uri,
            )
        try:
            with _translate_errors(self.uri, keyfile=self._keyfile):
                deserializer = TensorDeserializer(
                    stream,
                    device=self._device,
                    lazy_load=False,
                    filter_func=lambda name: (
                        name not in RESERVED_NAMES and (only is None or _module_name(name) in only)
                    ),
                    **self._kwargs,
                )
                tensors = []
                for name, tensor in deserializer.items():
                    tensors.append((name, tensor))
                    if self.on_bytes is not None:
                        self.on_bytes(tensor.numel() * tensor.element_size())
                deserializer.close()
                del deserializer  # its cache would keep every tensor alive
            for name, tensor in tensors:
                yield _module_name(name), tensor.detach()
        finally:
            stream.close()

    def _remote_items(self, only: Collection[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        """A remote file's tensors read by `remote_read` into CPU memory."""
        from .remote_read import RemoteSpan, read_stream
        from .tensor_decryption import DecryptionFailed

        spans = []
        for name, entry in self._index():
            if only is None or name in only:
                dtype = getattr(torch, _dtype_name(entry.dtype), None)
                if not isinstance(dtype, torch.dtype):  # numpy-only dtype: tensorizer reads it
                    yield from self._tensorizer_items(only)
                    return
                spans.append(
                    RemoteSpan(
                        name=name,
                        entry=entry,
                        dtype=dtype,
                        shape=tuple(int(d) for d in entry.shape),
                    )
                )
        stream = self._reopen()
        try:
            for name, tensor in read_stream(
                stream,
                spans,
                uri=self.uri,
                index=self._header,
                encrypted=self.encrypted,
                verify=bool(self._kwargs["verify_hash"]),
            ):
                if self.on_bytes is not None:
                    self.on_bytes(tensor.numel() * tensor.element_size())
                yield name, tensor
        except DecryptionFailed:
            raise _wrong_key(self.uri, self._keyfile) from None
        finally:
            stream.close()

    def _spans(self, only: Collection[str] | None) -> list[Span] | None:
        """The tensors to read as file spans, for `local_read`, each with its cipher in an
        encrypted file; None when a dtype has no torch equivalent or an encrypted tensor's
        header is not as expected (tensorizer's reader then takes the file)."""
        from .local_read import Span

        chosen = [(name, entry) for name, entry in self._index() if only is None or name in only]
        ciphers: list[Any] = [None] * len(chosen)
        if self.encrypted:
            from .tensor_decryption import ciphers as read_ciphers

            found = read_ciphers(self._own_reads, [e for _, e in chosen], self._header)
            if found is None:
                return None
            ciphers = found
        spans = []
        for (name, entry), cipher in zip(chosen, ciphers):
            dtype = getattr(torch, _dtype_name(entry.dtype), None)
            if not isinstance(dtype, torch.dtype):
                return None
            spans.append(
                Span(
                    name=name,
                    offset=entry.data_offset,
                    length=entry.data_length,
                    dtype=dtype,
                    shape=tuple(int(d) for d in entry.shape),
                    cipher=cipher,
                )
            )
        return spans

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._header.close()
        self._header = None  # type: ignore[assignment]

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_record(header: TensorDeserializer, uri: str, keyfile: str | None) -> FileRecord | None:
    """The file's record (see `layout`): the bytes of vLLM's marker when it is a uint8
    tensor of JSON, or the separate STATE_DICT tensor of files written by earlier
    versions; None for files of other writers (vLLM's marker is an int64 ``[1]``)."""
    found = {
        _entry_name(path): entry
        for path, entry in header._metadata.items()
        if _entry_name(path) in RESERVED_NAMES
    }
    if RECORD_NAME in found:
        name = RECORD_NAME
    elif MARKER_NAME in found and _dtype_name(found[MARKER_NAME].dtype) == "uint8":
        name = MARKER_NAME
    else:
        return None
    with _translate_errors(uri, keyfile=keyfile):
        data = bytes(header[name].detach().cpu().numpy())
    if name == MARKER_NAME and not data.startswith(b"{"):
        return None  # another writer's uint8 marker: no record
    return FileRecord.from_bytes(data, source=uri)


def open_tensors(
    uri: str,
    *,
    device: str | torch.device = "cpu",
    config: TensorizerConfig | Mapping[str, Any] | None = None,
    decryption: Any = None,
    header_only: bool = False,
) -> TensorReader:
    """Open a tensors file for streaming onto `device` (only its header is read now).

    Args:
        uri: a local path or an ``s3://`` / ``http(s)://`` URI (no rank template).
        device: where tensors land (``"cpu"``, ``"cuda:0"``...).
        config: read settings (``verify_hash``, ``num_readers``, S3 credentials,
            ``stream_kwargs``, ``deserialization_kwargs``, ``encryption_keyfile``): this
            package's `TensorizerConfig`, vLLM's, or a dict of its fields.
        decryption: tensorizer ``DecryptionParams``; read from ``config.encryption_keyfile``
            when not given.
        header_only: open an encrypted file without its key, to list its tensors (the
            reader's `items()` must then not be used).

    Raises:
        StorageError: the file cannot be opened.
        FormatError: it is not a tensorizer file, or is truncated.
        EncryptionError: it is encrypted and no key was given, or a key was given for an
            unencrypted file.
    """
    from tensorizer import TensorDeserializer

    config = (
        as_tensorizer_config(config) if config is not None else TensorizerConfig(tensorizer_uri=uri)
    )
    if decryption is None and config.encryption_keyfile:
        from .keys import read_decryption_params

        decryption = read_decryption_params(config.encryption_keyfile, config)
    readers = config.deserialization_kwargs.get("num_readers", config.num_readers)
    kwargs: dict[str, Any] = {
        "verify_hash": bool(config.verify_hash),
        **config.deserialization_kwargs,
    }
    options = config.stream_options()
    if storage.local_path(uri) is not None:
        kwargs["num_readers"] = readers or default_num_readers(uri, device)
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
        facts = read_preamble(stream, name)
        keyless = facts.encrypted and decryption is None
        if keyless:
            if not header_only:
                raise EncryptionError(
                    f"{name} is encrypted: give the key with --keyfile / encryption_keyfile"
                )
            # Listing needs no key: the index is not encrypted. A throwaway key gets
            # tensorizer past its check; no tensor is ever decrypted with it.
            from tensorizer import DecryptionParams

            kwargs["encryption"] = DecryptionParams.from_key(os.urandom(32))
        if facts.tensors == 0:  # tensorizer refuses an empty index; the file is valid
            header: Any = _EmptyIndex()
        else:
            with _translate_errors(name, keyfile=config.encryption_keyfile):
                header = TensorDeserializer(
                    stream,
                    device="cpu",
                    lazy_load=True,
                    num_readers=1,
                    **{k: v for k, v in kwargs.items() if k != "num_readers"},
                )
        _check_index(
            header,
            facts,
            stream,
            name,
            local=storage.local_path(uri) is not None,
            up_front=header_only,
        )
        own_reads = None if keyless else _own_reads(uri, device, config, kwargs["verify_hash"])
        return TensorReader(
            name,
            header,
            facts,
            _reopener(uri, options, stream),
            kwargs,
            device,
            keyfile=config.encryption_keyfile,
            started=started,
            keyless=keyless,
            own_reads=own_reads,
            remote=storage.local_path(uri) is None,
        )
    except BaseException:
        stream.close()
        raise


REMOTE = "remote"  # TensorReader's own_reads for a remote file (remote_read)


def _own_reads(
    uri: str, device: str | torch.device, config: TensorizerConfig, verify_hash: bool
) -> str | None:
    """Where our own readers take the file (faster, no copies, tensors allocated by the
    loading thread): its local path (`local_read`: into CPU memory, or onto a GPU without
    hash checks), REMOTE (`remote_read`: a remote file into CPU memory), or None
    (tensorizer's reader: other devices, settings only it knows)."""
    if not set(config.deserialization_kwargs) <= {"num_readers", "verify_hash"}:
        return None
    target = torch.device(device).type
    path = storage.local_path(uri)
    if path is not None:
        local = target == "cpu" or (target == "cuda" and not verify_hash)
        return path if local else None
    return REMOTE if target == "cpu" else None


class _EmptyIndex:
    """The index of a valid tensorizer file that holds no tensors (tensorizer's reader
    refuses to open one: "Tensor index in the file is empty")."""

    _metadata: dict = {}

    def __contains__(self, name: object) -> bool:
        return False

    def close(self) -> None:
        pass


def _reopener(uri: str, options: dict[str, Any], header_stream: Any) -> Callable[[], Any]:
    """Opens `uri` again for the tensors. A remote file read as one response hands over
    the stream its header came from, once: its first bytes are kept and the response goes
    on from there, so a load makes one request, not two (against the loopback S3 server
    each request of the 1.5 GB model waited about 1 s for its first byte)."""
    handed = header_stream if getattr(header_stream, "one_response", False) else None

    def reopen() -> Any:
        nonlocal handed
        stream, handed = handed, None
        if stream is None or stream.closed:
            return storage.open_read(uri, options)
        stream.seek(0)
        return stream

    return reopen


@dataclass(frozen=True)
class FileFacts:
    """What the first bytes of a tensorizer file say: its size, format version, and
    whether its tensors are encrypted."""

    size: int
    version: int
    encrypted: bool
    index_bytes: int
    tensors: int = -1  # as the preamble counts them (the record and marker included)


_MAGIC = b"|TZR|"
# magic, data version, feature flags, nominal data size, (unused), tensor count, index size
_PREAMBLE = struct.Struct("<5sI32sQ8xQQ")
_FLAG_ENCRYPTED = 1
_ENCRYPTION_VERSION = 3
_FLAGGED_VERSION = 4


def read_preamble(stream: Any, name: str) -> FileFacts:
    """Check the start of an open tensors file against its size, before tensorizer reads
    it: a file that is empty, of another format, or truncated in its index is refused here,
    and no size read from the file is trusted beyond the file's own length."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    if size == 0:
        raise FormatError(f"{name} is not a tensorizer file (it is empty)")
    head = stream.read(_PREAMBLE.size)
    stream.seek(0)
    if not head.startswith(_MAGIC[: len(head)]) or len(head) < len(_MAGIC):
        raise FormatError(f"{name} is not a tensorizer file{_guess_format(head)}")
    if len(head) < _PREAMBLE.size:
        raise FormatError(f"{name} is truncated: {size} bytes, too short for a header")
    _, version, flags, _, count, index_bytes = _PREAMBLE.unpack(head)
    encrypted = version == _ENCRYPTION_VERSION or (
        version >= _FLAGGED_VERSION and bool(int.from_bytes(flags, "little") & _FLAG_ENCRYPTED)
    )
    if _PREAMBLE.size + index_bytes > size:
        raise FormatError(
            f"{name} is truncated or corrupt: its tensor index claims {index_bytes} bytes, "
            f"but the file has {size} bytes in all"
        )
    if count > index_bytes:  # every index entry takes several bytes
        raise FormatError(
            f"{name} is corrupt: {count} tensors cannot fit in a {index_bytes}-byte index"
        )
    return FileFacts(
        size=size, version=version, encrypted=encrypted, index_bytes=index_bytes, tensors=count
    )


def _guess_format(head: bytes) -> str:
    if len(head) >= 9 and head[8:9] == b"{":
        return " (it looks like a safetensors file: load it with vLLM's default loader)"
    if head.startswith(b"PK\x03\x04"):
        return " (it looks like a zip file, e.g. a torch.save checkpoint)"
    return ""


def _check_index(
    header: Any, facts: FileFacts, stream: Any, name: str, *, local: bool, up_front: bool
) -> None:
    """Refuse an index whose entries point outside the file (truncated or forged sizes) or
    whose sizes disagree with their shapes and dtypes, and a tensor header whose length field
    claims more than the index leaves for it: no allocation is ever sized by a number the
    file's length does not back.

    The header length fields are read here for a local file, and for a remote one when
    `up_front` (listing a file) and it is read by byte ranges (8 bytes per tensor, in
    parallel); otherwise a remote file's are checked as the stream reaches each one
    (`remote_read`), before anything is sized by them.
    """
    entries = []
    for path, entry in header._metadata.items():
        tensor = _module_name(_entry_name(path))
        end = entry.data_offset + entry.data_length
        if (
            not (0 < entry.offset < entry.data_offset <= end <= facts.size)
            or entry.deserialized_length > facts.size
        ):
            what = (
                "ends past the end of the file"
                if end > facts.size
                else "has an impossible location or size"
            )
            raise FormatError(
                f"{name} is truncated or corrupt: tensor {tensor} {what} (bytes "
                f"{entry.data_offset}-{end} of a {facts.size}-byte file)"
            )
        _check_size(entry, tensor, name)
        entries.append((tensor, entry))
    fields = _header_fields(stream, [entry for _, entry in entries], local=local, up_front=up_front)
    for (tensor, entry), raw in zip(entries, fields or ()):
        check_header_length(raw, entry.data_offset - entry.offset, tensor, name)


def _check_size(entry: Any, tensor: str, name: str) -> None:
    """The entry's byte counts against its shape and dtype (a dtype unknown to torch and
    numpy is left to tensorizer)."""
    dtype = getattr(torch, _dtype_name(entry.dtype), None)
    if isinstance(dtype, torch.dtype):
        itemsize = dtype.itemsize
    else:
        try:
            import numpy

            itemsize = numpy.dtype(entry.dtype.partition("\0")[0]).itemsize
        except TypeError:
            return
    shape = tuple(int(d) for d in entry.shape)
    need = math.prod(shape) * itemsize
    if entry.deserialized_length != need or entry.data_length not in (0, need):
        raise FormatError(
            f"{name} is corrupt: tensor {tensor} holds {entry.data_length} bytes where its "
            f"shape {shape} and dtype {_dtype_name(entry.dtype)} need {need}"
        )


def _header_fields(
    stream: Any, entries: list[Any], *, local: bool, up_front: bool
) -> list[bytes] | None:
    """The 8-byte length field of each entry's tensor header, where reading them now is
    cheap; None where they are checked as the stream passes them."""
    places = [(entry.offset, HEADER_LENGTH.size) for entry in entries]
    if local:
        from .local_read import pread_each

        return pread_each(stream.fileno(), places)
    if not up_front or getattr(stream, "one_response", True) or not places:
        return None
    from concurrent.futures import ThreadPoolExecutor

    source = stream.source
    with ThreadPoolExecutor(min(16, len(places))) as pool:
        return list(
            pool.map(lambda place: source.read_range(place[0], place[0] + place[1]), places)
        )


def _wrong_key(uri: str, keyfile: str | None) -> EncryptionError:
    return EncryptionError(
        f"cannot decrypt {uri}"
        + (f" with the key in {keyfile}" if keyfile else "")
        + ": wrong key (or corrupted data)"
    )


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
        raise _wrong_key(uri, keyfile) from None
    except HashMismatchError as e:
        found = re.search(r"Tensor '([^']*)'", str(e))
        tensor = _module_name(found.group(1)) if found else "?"
        raise CorruptTensorError(
            f"{uri}: tensor {tensor} failed its hash check (the data is corrupt)", tensor=tensor
        ) from None
    except (struct.error, EOFError, AssertionError) as e:
        raise FormatError(f"{uri} is truncated or corrupt ({type(e).__name__}: {e})") from None
    except ValueError as e:  # read_preamble has refused empty and non-tensorizer files
        text = str(e)
        if "too small" in text or "empty" in text or "Unsupported version" in text:
            raise FormatError(f"{uri} is truncated or corrupt: {text}") from None
        raise FormatError(f"{uri} is corrupt: {text}") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None
    except (KeyError, IndexError, TypeError, OverflowError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "out of memory" in str(e):
            raise  # a device too small, not a bad file
        raise FormatError(f"{uri} is corrupt ({type(e).__name__}: {e})") from None


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
        if (
            tensor.is_floating_point()
            and current.is_floating_point()
            and tensor.dtype != current.dtype
        ):
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
    return LoadStats(
        uri=reader.uri, tensors=count, bytes=nbytes, seconds=seconds, read_times=reader.read_times
    )


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


def is_vllm_tensorized(tensorizer_config: TensorizerConfig | Mapping[str, Any]) -> bool:
    """Whether the file of `tensorizer_config` holds a vLLM model's parameters.

    True for files written by this package or by vLLM's own serializer (they carry a
    marker); False for a Hugging Face model written with ``write_module``. Only the header
    is read. For a rank template, the file of rank 0 is checked. `tensorizer_config` may be
    this package's `TensorizerConfig`, vLLM's, or a dict of its fields.
    """
    tensorizer_config = as_tensorizer_config(tensorizer_config)
    if tensorizer_config.vllm_tensorized:
        return True
    uri = tensorizer_config.tensorizer_uri
    assert uri is not None
    if tensorizer_config.is_sharded:
        uri = uri % 0
    with open_tensors(uri, device="cpu", config=tensorizer_config) as reader:
        return reader.is_vllm_tensorized


def check_shards(
    config: TensorizerConfig | Mapping[str, Any],
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> int:
    """Check every rank's file before any engine work: it opens, it is a tensorizer file, it
    decrypts with the key given, and it was written for this layout and rank.

    Only headers (and each file's small record) are read. A ``tensorizer_uri`` without rank
    template is one file every rank reads: allowed, at any layout, for a file that is not
    vLLM-tensorized (a Hugging Face model, a converted checkpoint; see
    `layout.check_shared_file`).

    Returns:
        The total tensor bytes of all ranks (of the one shared file).

    Raises:
        ConfigError: a vLLM-tensorized file, more than one rank and no rank template.
        StorageError: a shard is missing (named) or unreachable.
        LayoutError: a shard was written for another layout (both are named).
        EncryptionError, FormatError: as `open_tensors`.
    """
    config = as_tensorizer_config(config)
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    uri = config.tensorizer_uri
    assert uri is not None
    if not has_rank_template(uri):
        with open_tensors(uri, device="cpu", config=config) as reader:
            check_shared_file(
                uri,
                ParallelLayout(tp, pp),
                vllm_tensorized=reader.is_vllm_tensorized,
                record=reader.record,
            )
            if reader.record is not None and not reader.checkpoint_form:
                reader.record.check_layout(ParallelLayout(tp, pp), source=reader.uri)
            return reader.total_tensor_bytes
    total = 0
    for rank in range(tp * pp):
        layout = ParallelLayout(tp, pp, tp_rank=rank % tp, pp_rank=rank // tp)
        with open_tensors(rank_uri(uri, layout), device="cpu", config=config) as reader:
            if reader.record is not None:
                reader.record.check_layout(layout, source=reader.uri)
            total += reader.total_tensor_bytes
    return total
