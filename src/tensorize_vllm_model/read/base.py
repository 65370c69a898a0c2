"""What every read engine shares: the request that says what to read and how
(`ReadRequest`), the opened file the engines read from (`OpenFile`), the one protocol they
implement (`ReadEngine`) and the figures of a load (`LoadStats`).

The engines (each in its own module): `read.local` (a local file, parallel reads into CPU
memory or through staging buffers onto a GPU), `read.remote` (an S3/HTTP file streamed
into CPU memory), `read.tensorizer` (tensorizer's own `TensorDeserializer`: other devices,
settings only it knows); `read.decrypt` decrypts for the first two. `read.reader` opens a
file and picks the engine from the request, in one place (`choose_engine`). A converted
load's partial reads are `read.partial`. Our own engines share one read core: the memory
they read into (`read.memory`), where the bytes come from (`read.source`) and the checks
each tensor gets (`read.checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..format.compat import index_items, module_name
from ..format.record import RESERVED_NAMES
from ..storage.options import StreamOptions

if TYPE_CHECKING:
    import torch

    from ..format.header import FileFacts

__all__ = ["ReadRequest", "OpenFile", "ReadEngine", "LoadStats", "ReadTimes"]


@dataclass(frozen=True)
class ReadRequest:
    """One tensors file to read, and how.

    Built by `read.request.request_from_config` from a `TensorizerConfig` (or by the read
    plan); `read.reader.open_request` opens it.

    Attributes:
        uri: a local path or an ``s3://`` / ``http(s)://`` URI of one file (no rank template).
        device: where tensors land (``"cpu"``, ``"cuda:0"``...).
        decryption: tensorizer's ``DecryptionParams`` for an encrypted file, or None.
        keyfile: where the key came from, named in errors (never the key itself).
        stream_options: how to reach remote storage (`TensorizerConfig.options`: S3
            credentials, endpoint, ranges...).
        verify_hash: check every tensor against the hashes stored in the file.
        num_readers: reader threads (local) or range workers (remote); None: the measured
            default (`read.reader.default_num_readers`).
        deserialization_kwargs: further ``TensorDeserializer`` arguments; any besides
            ``num_readers``/``verify_hash`` send the read through tensorizer's reader.
        header_only: open an encrypted file without its key, to list its tensors.
    """

    uri: str
    device: str | torch.device = "cpu"
    decryption: Any = field(default=None, repr=False)
    keyfile: str | None = None
    stream_options: StreamOptions = field(default_factory=StreamOptions, repr=False)
    verify_hash: bool = False
    num_readers: int | None = None
    deserialization_kwargs: dict[str, Any] = field(default_factory=dict)
    header_only: bool = False


@dataclass
class OpenFile:
    """A file opened for reading: what the engines read from.

    `header` is the `TensorDeserializer` that read the index (with the key, if any);
    `reopen` gives a fresh stream of the file; `kwargs` are the ``TensorDeserializer``
    arguments (``verify_hash``, ``num_readers``, ``encryption``...)."""

    name: str  # the URI as shown in messages (credentials redacted)
    request: ReadRequest
    header: Any
    facts: FileFacts
    reopen: Callable[[], Any]
    kwargs: dict[str, Any]
    _every: list[tuple[str, Any]] | None = field(default=None, repr=False, compare=False)

    def entries(self, only: Collection[str] | None = None) -> list[tuple[str, Any]]:
        """(module name, tensorizer's index entry) of every tensor in file order, or of
        those named in `only`; the reserved record and marker left out."""
        if only is None:  # made once: asked for several times a load (18,867 for an MoE)
            if self._every is None:
                self._every = self._entries(None)
            return list(self._every)
        return self._entries(only)

    def _entries(self, only: Collection[str] | None) -> list[tuple[str, Any]]:
        return [
            (module_name(name), entry)
            for name, entry in index_items(self.header)
            if name not in RESERVED_NAMES and (only is None or module_name(name) in only)
        ]


class ReadEngine(Protocol):
    """Reads a chosen set of an open file's tensors onto the request's device."""

    # Where the reader threads spent their time in the last read (our own local reads).
    read_times: ReadTimes | None

    def items(
        self,
        file: OpenFile,
        chosen: list[tuple[str, Any]],
        on_bytes: Callable[[int], None] | None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (module name, tensor) for each of `chosen` ((name, index entry) pairs, in
        file order), calling `on_bytes` with the bytes of each piece read.

        Raises:
            FormatError, StorageError, EncryptionError, CorruptTensorError: naming the file
                (and the tensor at fault).
        """
        ...


@dataclass
class ReadTimes:
    """Where the reader threads of one `read_spans` spent their time, in seconds summed
    over the threads (so up to `readers` times the wall-clock seconds): making fresh pages
    present, reading the file into them (or into staging buffers), decrypting."""

    readers: int = 0
    populating: float = 0.0
    reading: float = 0.0
    decrypting: float = 0.0

    def add(self, other: ReadTimes) -> None:
        self.populating += other.populating
        self.reading += other.reading
        self.decrypting += other.decrypting

    def __str__(self) -> str:
        text = (
            f"{self.readers} readers: making pages present {self.populating:.2f} s, "
            f"reading {self.reading:.2f} s"
        )
        if self.decrypting:
            text += f", decrypting {self.decrypting:.2f} s"
        return text + " (summed over readers)"


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
