"""Reading a remote file's tensors by parallel byte ranges straight into their memory.

The default read of an S3 object, or of an HTTP(S) URL whose server serves byte ranges,
into CPU memory (`read.remote` chooses it). Each range request's response lands in the
memory of the tensors it holds (`RangeSource.read_range_into` with a list of views: one
request, several destinations), so every byte is written once. Read through
`storage.ranged.RangeStream` instead, every byte landed twice (socket -> a read-ahead
buffer -> the tensor): 63% of one response's throughput against SeaweedFS on loopback
(round 2's first run: docs/archive/performance-rounds.md).

`plan_requests` cuts the file's bytes, from the first chosen tensor's header to the last
one's end, into requests of at most ``chunk_size`` bytes of tensor data (as many requests
as `RangeStream` makes for the same bytes). The tensor headers between the data ride
along in the request that reaches them, into small buffers of their own: they cost no
request. A request ends at a gap (a tensor not chosen), and before a tensor it could
not start without holding more than ``window`` bytes of tensors ahead of the one it starts
with.

`RangedRead` allocates each tensor in the calling thread (no memory from the fetch threads'
malloc arenas) as it enters the window, starts the requests whose tensors all exist, and
hands the tensors over in file order. Memory: the tensor handed over next, at most
``window`` bytes of tensors after it (``workers`` x ``chunk_size``, the read-ahead of
`RangeStream`), and the headers. Every tensor gets the checks of `read.remote.read_stream`:
its header's length field (`read.checks.header_length`); an encrypted tensor's
header parsed by tensorizer and its chunks checked and decrypted in the calling thread as
each request holding them completes (`read.decrypt`); with ``verify`` its stored hashes
(`format.hashes`). Failed or stalled requests are retried per request as
`storage.retry` says, as `RangeStream`'s were.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .checks import cipher_of, header_length, stored_hashes, truncated
from .memory import byte_view, populate

if TYPE_CHECKING:
    from .decrypt import TensorCipher
    from .remote import RemoteSpan
    from .source import RemoteSource

__all__ = ["Piece", "Request", "plan_requests", "RangedRead"]


class Piece(NamedTuple):
    """Bytes [lo, hi) of tensor `tensor`'s header (`header`) or data, in one request."""

    tensor: int  # index into the spans
    header: bool
    lo: int
    hi: int


@dataclass
class Request:
    """One ranged request: the file's bytes [start, stop), scattered over `pieces` in
    order."""

    start: int
    stop: int
    pieces: list[Piece] = field(default_factory=list)
    data: int = 0  # bytes of tensor data (headers not counted)

    @property
    def first(self) -> int:
        return self.pieces[0].tensor

    @property
    def last(self) -> int:
        return self.pieces[-1].tensor

    def add(self, piece: Piece) -> None:
        self.pieces.append(piece)
        self.stop += piece.hi - piece.lo
        if not piece.header:
            self.data += piece.hi - piece.lo


def plan_requests(spans: Sequence[RemoteSpan], *, chunk_size: int, window: int) -> list[Request]:
    """The requests that read `spans` (in file order): each at most `chunk_size` bytes of
    tensor data, with the headers it reaches; a new one at a gap and before a tensor that
    would put more than `window` bytes of tensors after the request's first tensor."""
    requests: list[Request] = []
    current: Request | None = None
    ahead = 0  # bytes of the current request's tensors after its first
    for index, span in enumerate(spans):
        entry = span.entry
        size = entry.data_length
        if current is None or current.stop != entry.offset or ahead + size > window:
            current = Request(entry.offset, entry.offset)
            requests.append(current)
            ahead = 0
        else:
            ahead += size
        current.add(Piece(index, True, 0, span.room))
        lo = 0
        while lo < size:
            if current.data >= chunk_size:
                current = Request(current.stop, current.stop)
                requests.append(current)
                ahead = 0
            hi = min(size, lo + chunk_size - current.data)
            current.add(Piece(index, False, lo, hi))
            lo = hi
    return requests


def _gaps(start: int, stop: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, stop) less the disjoint ranges `covered`."""
    gaps, at = [], start
    for a, b in sorted(covered):
        if a > at:
            gaps.append((at, min(a, stop)))
        at = max(at, b)
    if at < stop:
        gaps.append((at, stop))
    return [(a, b) for a, b in gaps if b > a]


class RangedRead:
    """The tensors of `spans` read from `source` by parallel ranged requests (see the
    module docstring); `tensors()` yields (name, CPU tensor) in file order.

    Args:
        source: the remote file (`read.source.RemoteSource`).
        spans: the tensors, their sizes checked against the file (`format.header`).
        uri: the file's name in messages.
        index: the `TensorDeserializer` that read the index (with the key, if any).
        encrypted, verify: decrypt each tensor; check it against its stored hashes.
        chunk_size: tensor bytes per request. workers: requests in flight.
    """

    def __init__(
        self,
        source: RemoteSource,
        spans: Sequence[RemoteSpan],
        *,
        uri: str,
        index: Any,
        encrypted: bool,
        verify: bool,
        chunk_size: int,
        workers: int,
    ):
        self.spans = sorted(spans, key=lambda s: s.entry.offset)
        self.source, self.uri, self.index = source, uri, index
        self.encrypted, self.verify = encrypted, verify
        self.window = workers * chunk_size
        self.requests = plan_requests(self.spans, chunk_size=chunk_size, window=self.window)
        self.workers = workers
        count = len(self.spans)
        self._of: list[list[int]] = [[] for _ in range(count)]  # requests of each tensor
        for number, request in enumerate(self.requests):
            for tensor in sorted({piece.tensor for piece in request.pieces}):
                self._of[tensor].append(number)
        self._sizes = [0, *accumulate(s.entry.data_length for s in self.spans)]
        self._headers = [bytearray(s.room) for s in self.spans]
        self._memory: list[torch.Tensor | None] = [None] * count
        self._futures: list[Future[None]] = []
        self._ciphers: dict[int, TensorCipher | None] = {}
        # per request: the (tensor, start, stop) its fetch thread decrypted
        self._decrypted: list[list[tuple[int, int, int]]] = [[] for _ in self.requests]
        self._allocated = 0
        self.requests_made = 0

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of every span in file order.

        Raises:
            FormatError: the file is shorter than its index says (it changed since it was
                opened), or a header is forged or corrupt (naming the tensor).
            StorageError: a request fails after its retries (`storage.retry`).
            CorruptTensorError: a tensor fails its hash check (with ``verify``).
            format.compat.DecryptionFailed: an encrypted tensor fails its check.
        """
        self._check_length()
        pool = ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="tvm-range")
        try:
            for head, span in enumerate(self.spans):
                self._advance(pool, head)
                yield span.name, self._finish(head)
        finally:
            for future in self._futures:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            self._memory = [None] * len(self.spans)

    def _check_length(self) -> None:
        if not self.spans:
            return
        last = max(self.spans, key=lambda s: s.entry.data_offset + s.entry.data_length)
        if last.entry.data_offset + last.entry.data_length > self.source.size:
            raise truncated(self.uri, last.name, self.source.size)

    def _advance(self, pool: ThreadPoolExecutor, head: int) -> None:
        """Allocate the tensors the window holds after `head` (and those `head`'s requests
        reach), and start every request whose tensors all exist."""
        needed = self.requests[self._of[head][-1]].last
        while self._allocated < len(self.spans):
            ahead = self._sizes[self._allocated + 1] - self._sizes[head + 1]
            if self._allocated > max(head, needed) and ahead > self.window:
                break
            size = self.spans[self._allocated].entry.data_length
            if size:
                self._memory[self._allocated] = torch.empty(size, dtype=torch.uint8)
            self._allocated += 1
        while len(self._futures) < len(self.requests):
            request = self.requests[len(self._futures)]
            if request.last >= self._allocated:
                break
            views, fresh = self._destinations(request)
            self._futures.append(pool.submit(self._fetch, len(self._futures), views, fresh))
            self.requests_made += 1

    def _destinations(self, request: Request) -> tuple[list[memoryview], list]:
        """The views a request fills, and the (address, length) of its tensor memory."""
        views, fresh = [], []
        for piece in request.pieces:
            if piece.header:
                views.append(memoryview(self._headers[piece.tensor])[piece.lo : piece.hi])
                continue
            memory = self._memory[piece.tensor]
            assert memory is not None
            views.append(byte_view(memory)[piece.lo : piece.hi])
            fresh.append((memory.data_ptr() + piece.lo, piece.hi - piece.lo))
        return views, fresh

    def _fetch(self, number: int, views: list[memoryview], fresh: list) -> None:
        """Request `number`, in a fetch thread: its tensors' pages made present, filled,
        and, encrypted, the cipher chunks it holds whole checked and decrypted (the fetch
        threads decrypt in parallel; the calling thread decrypts the chunks cut by a
        request's ends)."""
        for address, length in fresh:
            populate(address, length)
        request = self.requests[number]
        self.source.read_into(request.start, views)
        if not self.encrypted:
            return
        for piece, view in zip(request.pieces, views):
            cipher = None if piece.header else self._cipher(piece.tensor, number)
            if cipher is None:
                continue
            size = cipher.chunk_size
            a = -(-piece.lo // size) * size
            length = self.spans[piece.tensor].entry.data_length
            b = piece.hi if piece.hi == length else piece.hi // size * size
            if b > a:
                cipher.decrypt(view[a - piece.lo : b - piece.lo], a)
                self._decrypted[number].append((piece.tensor, a, b))

    def _cipher(self, tensor: int, number: int | None = None) -> TensorCipher | None:
        """The cipher of `tensor`, from its header once the request holding it (`number`
        if it is this one) has arrived; its length field checked first."""
        if tensor in self._ciphers:
            return self._ciphers[tensor]
        first = self._of[tensor][0]
        if first != number:
            self._futures[first].result()
        span = self.spans[tensor]
        cipher = cipher_of(span.entry, self._header(tensor), self.index, self.uri, span.name)
        return self._ciphers.setdefault(tensor, cipher)

    def _header(self, tensor: int) -> bytes:
        """The header of `tensor` (its request has arrived), its length field checked."""
        span = self.spans[tensor]
        header = bytes(self._headers[tensor])
        header_length(header, span.room, self.uri, span.name)
        return header

    def _finish(self, head: int) -> torch.Tensor:
        """Wait for `head`'s requests, checking its header and decrypting the chunks its
        fetch threads left as they complete; the tensor."""
        span = self.spans[head]
        numbers = self._of[head]
        self._futures[numbers[0]].result()  # the header's request
        header = self._header(head)
        hashes = stored_hashes(header, self.index, self.uri, span.name) if self.verify else None
        memory, self._memory[head] = self._memory[head], None
        if memory is None:  # stored without data: reads back as zeros
            if hashes:
                hashes.check(b"", tensor=span.name, uri=self.uri)
            return torch.zeros(span.shape, dtype=span.dtype)
        cipher = self._cipher(head) if self.encrypted else None
        view = byte_view(memory)
        done, covered = 0, []
        for number in numbers:
            self._futures[number].result()
            if cipher is None:
                continue
            pieces = self.requests[number].pieces
            arrived = max((p.hi for p in pieces if p.tensor == head and not p.header), default=0)
            if arrived < len(view):
                arrived -= arrived % cipher.chunk_size
            covered += [(a, b) for t, a, b in self._decrypted[number] if t == head]
            for a, b in _gaps(done, arrived, covered):
                cipher.decrypt(view[a:b], a)
            done = max(done, arrived)
        if hashes:
            hashes.check(view, tensor=span.name, uri=self.uri)
        del view
        return memory.view(span.dtype).reshape(span.shape)
