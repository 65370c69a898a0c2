"""Opening a tensors file for reading: `open_tensors` (from a config) or `open_request` (from
a `ReadRequest`) read the header, the index and the file's small record, check them against
the file's length (`format.header`), pick the read engine for the request (`choose_engine`,
the one place that decides) and return a `TensorReader`:

    with open_tensors("/models/opt/v1/model.tensors", device="cpu") as reader:
        stats = load_into_module(model, reader)        # read/modules.py

The reader yields tensors on demand and makes the load's `LoadStats` (`TensorReader.stats`).
Plain Python and torch (no vLLM): it serves vLLM's workers, the command line and any torch
model alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import storage
from ..config.plan import one_file_of_directory
from ..core.errors import EncryptionError, ModelMismatchError, key_hint
from ..format.compat import EmptyIndex, index_items, translate_errors
from ..format.header import FileFacts, check_index, read_preamble, stored_dtype_name
from ..format.record import MARKER_NAME, RECORD_NAME, RESERVED_NAMES, FileRecord
from ..storage.options import StreamOptions
from ..storage.ranged import DEFAULT_WORKERS, RangeStream
from .base import LoadStats, OpenFile, ReadEngine, ReadRequest, ReadTimes
from .request import request_from_config

if TYPE_CHECKING:
    from tensorizer import TensorDeserializer

    from ..config import TensorizerConfig

__all__ = [
    "TensorReader",
    "TensorEntry",
    "open_tensors",
    "open_request",
    "choose_engine",
    "default_num_readers",
]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the file's index describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    kind: str


def default_num_readers(uri: str, device: str | torch.device = "cpu") -> int:
    """Reader threads when the user sets none, as measured fastest (docs/performance.md):
    for a local file, four onto a GPU (each reader holds two 8 MiB page-locked staging
    buffers; on an H100 four beat two, and eight were no faster fresh and pin twice the host
    memory) and eight into CPU memory
    (a cold file reads faster with more requests in flight, even on two cores); the range
    reader's default for remote files."""
    if storage.local_path(uri) is not None:
        return 4 if torch.device(device).type == "cuda" else 8
    return DEFAULT_WORKERS


def choose_engine(request: ReadRequest) -> ReadEngine:
    """The engine that reads `request`'s tensors: our own readers where they are faster (no
    copies, tensors allocated by the loading thread) - a local file into CPU memory, or onto
    a GPU without hash checks (`read.local`); a remote file into CPU memory (`read.remote`)
    - and tensorizer's reader otherwise (other devices, settings only it knows)."""
    from .local import LocalEngine
    from .remote import RemoteEngine
    from .tensorizer import TensorizerEngine

    path = storage.local_path(request.uri)
    local = path is not None
    if set(request.deserialization_kwargs) <= {"num_readers", "verify_hash"}:
        target = torch.device(request.device).type
        if path is not None and (target == "cpu" or (target == "cuda" and not request.verify_hash)):
            return LocalEngine(path)
        if not local and target == "cpu":
            return RemoteEngine()
    return TensorizerEngine(remote=not local)


class TensorReader:
    """A tensors file opened for reading: its record and names now, tensors on demand.

    Opening reads only the header, the tensor index and the file's small record (so a load
    can be refused before any data moves); `items()` then reads every tensor onto the
    device with the engine `choose_engine` picked. Use `open_tensors` to make one.
    """

    def __init__(self, file: OpenFile, engine: ReadEngine | None, *, started: float):
        self._file = file
        self._header = file.header
        self._engine = engine  # None: opened without the key, to list the tensors only
        self.uri = file.name
        self.facts = file.facts
        self._started = started  # when opening began: load figures count the index reads too
        self._untimed = 0.0
        self._entries: list[TensorEntry] | None = None  # `entries`, made once
        # Called with the bytes of each piece or tensor items() finishes (see core/progress.py).
        self.on_bytes: Callable[[int], None] | None = None
        # Encrypted like every tensor: without the key, a file's record stays unknown.
        self.record = None if engine is None else _read_record(file)

    @property
    def vllm_tensorized(self) -> bool:
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
        return dict(self._file.entries())

    @property
    def file(self) -> OpenFile:
        """The opened file as the read engines see it (`read.base.OpenFile`)."""
        return self._file

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
        if self._entries is None:  # once: 0.3 s for 18,867 tensors, asked for twice a load
            self._entries = self._list_entries()
        return list(self._entries)

    def _list_entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                name=name,
                dtype=stored_dtype_name(entry.dtype),
                shape=tuple(int(d) for d in entry.shape),
                bytes=int(entry.deserialized_length),
                kind=entry.type.name,
            )
            for name, entry in self._file.entries()
        ]

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
        if self._engine is None:
            raise EncryptionError(f"{self.uri} is encrypted: give the key to read its tensors")
        if only is None and not self.entries():
            raise ModelMismatchError(
                f"{self.uri} holds no tensors (a valid tensorizer file with an empty index): "
                "there is nothing to load"
            )
        yield from self._engine.items(self._file, self._file.entries(only), self.on_bytes)

    @property
    def read_times(self) -> ReadTimes | None:
        """Where our own reader threads spent their time in the last `items()` (None when
        tensorizer's reader read the file)."""
        return None if self._engine is None else self._engine.read_times

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Time spent inside (building the model, say) is left out of `stats`' seconds."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - began

    def stats(self, *, tensors: int, nbytes: int) -> LoadStats:
        """The figures of a load that moved `tensors` tensors of `nbytes` bytes: seconds
        since opening began (the header and index reads included, `untimed` spans left
        out), and where our own reader threads spent their time."""
        return LoadStats(
            uri=self.uri,
            tensors=tensors,
            bytes=nbytes,
            seconds=time.perf_counter() - self._started - self._untimed,
            read_times=self.read_times,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._header.close()
        self._header = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_record(file: OpenFile) -> FileRecord | None:
    """The file's record (see `layout`): the bytes of vLLM's marker when it is a uint8
    tensor of JSON, or the separate STATE_DICT tensor of files written by earlier
    versions; None for files of other writers (vLLM's marker is an int64 ``[1]``)."""
    found = {name: entry for name, entry in index_items(file.header) if name in RESERVED_NAMES}
    if RECORD_NAME in found:
        name = RECORD_NAME
    elif MARKER_NAME in found and stored_dtype_name(found[MARKER_NAME].dtype) == "uint8":
        name = MARKER_NAME
    else:
        return None
    with translate_errors(file.name, keyfile=file.request.keyfile):
        data = bytes(file.header[name].detach().cpu().numpy())
    if name == MARKER_NAME and not data.startswith(b"{"):
        return None  # another writer's uint8 marker: no record
    return FileRecord.from_bytes(data, source=file.name)


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
        uri: a local path or an ``s3://`` / ``http(s)://`` URI (no rank template), or a
            model directory written by ``serialize`` or ``convert`` with one
            ``model.tensors`` (a directory of rank files is refused, naming rank 0's file).
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
        ConfigError: `uri` is a directory of rank files.
        FormatError: it is not a tensorizer file, or is truncated.
        EncryptionError: it is encrypted and no key was given, or a key was given for an
            unencrypted file.
    """
    request = request_from_config(
        uri, config, device=device, decryption=decryption, header_only=header_only
    )
    found = one_file_of_directory(request.uri, request.stream_options)
    if found is not None:
        request = dataclasses.replace(request, uri=found)
    return open_request(request)


def _tensorizer_kwargs(request: ReadRequest) -> dict[str, Any]:
    """``TensorDeserializer`` arguments of `request`, and the stream options of its tensor
    reads (a remote file's range workers set by ``num_readers``)."""
    kwargs: dict[str, Any] = {
        **request.deserialization_kwargs,
        "verify_hash": request.verify_hash,
    }
    if storage.local_path(request.uri) is not None:
        kwargs["num_readers"] = request.num_readers or default_num_readers(
            request.uri, request.device
        )
    else:
        # Remote files: our range reader fetches in parallel; tensorizer reads it in order.
        kwargs["num_readers"] = 1
    if request.decryption is not None:
        kwargs["encryption"] = request.decryption
    return kwargs


def open_request(request: ReadRequest) -> TensorReader:
    """Open the file of `request` (see `open_tensors` for what is read now and the errors)."""
    kwargs = _tensorizer_kwargs(request)
    options = request.stream_options
    if not (storage.local_path(request.uri) is not None) and request.num_readers:
        options = options.replace(workers=request.num_readers)
    name = storage.redact(request.uri)
    started = time.perf_counter()
    # The header needs no read-ahead: a small window, one worker.
    stream = storage.open_read(request.uri, options.replace(chunk_size=1 << 20, workers=1))
    try:
        facts = read_preamble(stream, name)
        keyless = facts.encrypted and request.decryption is None
        if keyless:
            if not request.header_only:
                raise EncryptionError(f"{name} is encrypted: {key_hint()}")
            # Listing needs no key: the index is not encrypted. A throwaway key gets
            # tensorizer past its check; no tensor is ever decrypted with it.
            from tensorizer import DecryptionParams

            kwargs["encryption"] = DecryptionParams.from_key(os.urandom(32))
        header = _read_index(stream, facts, name, request, kwargs)
        local = storage.local_path(request.uri) is not None
        check_index(header, facts, stream, name, local=local, up_front=request.header_only)
        file = OpenFile(
            name, request, header, facts, _reopener(request.uri, options, stream), kwargs
        )
        engine = None if keyless else choose_engine(request)
        return TensorReader(file, engine, started=started)
    except BaseException:
        stream.close()
        raise


def _read_index(
    stream: Any, facts: FileFacts, name: str, request: ReadRequest, kwargs: dict[str, Any]
) -> Any:
    """tensorizer's `TensorDeserializer` over the index only (``lazy_load``)."""
    if facts.tensors == 0:  # tensorizer refuses an empty index; the file is valid
        return EmptyIndex()
    from tensorizer import TensorDeserializer

    with translate_errors(name, keyfile=request.keyfile):
        return TensorDeserializer(
            stream,
            device="cpu",
            lazy_load=True,
            num_readers=1,
            **{k: v for k, v in kwargs.items() if k != "num_readers"},
        )


def _reopener(uri: str, options: StreamOptions, header_stream: Any) -> Callable[[], Any]:
    """Opens `uri` again for the tensors. A remote file read as one response hands over
    the stream its header came from, once: its first bytes are kept and the response goes
    on from there, so a load makes one request, not two (against the loopback S3 server
    each request of the 1.5 GB model waited about 1 s for its first byte). A file read by
    byte ranges is read again through the header stream's source: no second probe of the
    file (an S3 HEAD, 58 ms of each load from SeaweedFS on loopback in a fresh process);
    a file replaced meanwhile is refused by its ranged answers (`retry.RetryingSource`)."""
    handed = header_stream if getattr(header_stream, "one_response", False) else None
    ranged = isinstance(header_stream, RangeStream) and not header_stream.one_response

    def reopen() -> Any:
        nonlocal handed
        if ranged:
            return RangeStream(
                header_stream.source, chunk_size=options.chunk_size, workers=options.workers
            )
        stream, handed = handed, None
        if stream is None or stream.closed:
            return storage.open_read(uri, options)
        stream.seek(0)
        return stream

    return reopen
