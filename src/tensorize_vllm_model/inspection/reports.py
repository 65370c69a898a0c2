"""Looking inside tensors files without vLLM: list what a file holds, prove it is intact.

`inspect_tensors` reads only headers and indexes (no tensor is read or allocated, and an
encrypted file can be listed without its key); `verify_tensors` reads every tensor, checks
its stored hashes (and that it decrypts with the key given) and names each bad one. Both
take a local path, an ``s3://`` or ``http(s)://`` URI, a rank template such as
``model-rank-%03d.tensors`` (every shard is then covered), or a model directory written by
``serialize`` or ``convert`` (its files found as a load finds them,
`plan.model_directory_tensors`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import TensorizerConfig, as_tensorizer_config
from ..config.plan import discover_rank_uris, model_directory_tensors
from ..core.errors import CorruptTensorError, EncryptionError
from ..core.progress import progress
from ..format.record import MARKER_NAME, RECORD_NAME, FileRecord
from ..read.reader import TensorEntry, open_tensors
from ..storage import redact
from .checks import check_shards

__all__ = ["FileReport", "VerifyReport", "inspect_tensors", "verify_tensors", "shard_uris"]

# Tensors verified per read: bounds the memory a verify holds at once.
VERIFY_BATCH_BYTES = 512 * 1024 * 1024


@dataclass
class FileReport:
    """What one tensors file holds, from its header and index."""

    uri: str
    size: int
    format_version: int
    encrypted: bool
    vllm_tensorized: bool
    record: dict[str, Any] | None
    tensors: list[TensorEntry] = field(default_factory=list)
    # the file holds a record (vLLM's marker or convert's own) that stays unread without
    # the key: like every tensor of an encrypted file, it is encrypted
    record_encrypted: bool = False

    @property
    def tensor_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "file_bytes": self.size,
            "tensorizer_format_version": self.format_version,
            "encrypted": self.encrypted,
            "vllm_tensorized": self.vllm_tensorized,
            "record": self.record,
            "record_encrypted": self.record_encrypted,
            "tensor_count": len(self.tensors),
            "tensor_bytes": self.tensor_bytes,
            "tensors": [{**dataclasses.asdict(t), "shape": list(t.shape)} for t in self.tensors],
        }


@dataclass
class VerifyReport:
    """What a verify of one file found."""

    uri: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bad: list[tuple[str, str]] = field(default_factory=list)
    # whether every tensor was decrypted (an encrypted file), and the layout the file's
    # record names ("TP=2 x PP=1, rank 0"; "" when it has none, "any" when converted)
    encrypted: bool = False
    layout: str = ""

    @property
    def intact(self) -> bool:
        return not self.bad

    def to_json(self) -> dict[str, Any]:
        """The report as ``verify --json`` prints it (bytes, seconds as floats)."""
        return {
            "uri": self.uri,
            "intact": self.intact,
            "tensor_count": self.tensors,
            "tensor_bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "hashes_checked": True,
            "decrypted": self.encrypted,
            "layout": self.layout or None,
            "bad": [{"tensor": name, "reason": reason} for name, reason in self.bad],
        }


def shard_uris(uri: str, config: TensorizerConfig | None = None) -> list[str]:
    """The files a URI stands for: itself, or every shard of a rank template (as many as
    rank 0's record says, else as many as exist from rank 0 on: `plan.discover_rank_uris`,
    with rank 0's record read from its header)."""
    config = as_tensorizer_config(config) if config else TensorizerConfig(tensorizer_uri=uri)
    return _shards(uri, config)[0]


def _shards(uri: str, config: TensorizerConfig) -> tuple[list[str], FileRecord | None]:
    """`shard_uris`, and rank 0's record where discovering them read it (a rank template)."""
    uri = model_directory_tensors(uri, config.options) or uri
    records: list[FileRecord | None] = []

    def read_record(first: str) -> FileRecord | None:
        with open_tensors(first, config=config, header_only=True) as reader:
            records.append(reader.record)
        return records[-1]

    shards = discover_rank_uris(dataclasses.replace(config, tensorizer_uri=uri), read_record)
    return shards, records[0] if records else None


def inspect_tensors(uri: str, config: TensorizerConfig | None = None) -> list[FileReport]:
    """Describe the file at `uri` (every shard of a rank template) from headers alone.

    Raises:
        StorageError, FormatError: as `open_tensors`, naming the file.
        EncryptionError: a key was given for an unencrypted file.
    """
    config = as_tensorizer_config(config) if config else TensorizerConfig(tensorizer_uri=uri)
    reports = []
    for shard in shard_uris(uri, config):
        with open_tensors(shard, config=config, header_only=True) as reader:
            reports.append(
                FileReport(
                    uri=redact(reader.uri),
                    size=reader.facts.size,
                    format_version=reader.facts.version,
                    encrypted=reader.facts.encrypted,
                    vllm_tensorized=reader.vllm_tensorized,
                    record=dataclasses.asdict(reader.record) if reader.record else None,
                    tensors=reader.entries(),
                    record_encrypted=_record_encrypted(reader),
                )
            )
    return reports


def _record_encrypted(reader: Any) -> bool:
    """Whether the file has a record that could not be read for want of the key."""
    header = reader.header_deserializer
    return (
        reader.record is None
        and reader.encrypted
        and any(name in header for name in (RECORD_NAME, MARKER_NAME))
    )


def verify_tensors(uri: str, config: TensorizerConfig | None = None) -> list[VerifyReport]:
    """Read every tensor of `uri` (every shard of a rank template), check its hashes and
    that it decrypts, and report each bad tensor by name.

    Raises:
        StorageError, FormatError: a file cannot be opened or its index is corrupt.
        EncryptionError: a file is encrypted and no key was given, or the key is wrong.
        LayoutError: a shard of a rank template was written for another rank or layout
            than rank 0's record says (the loader's `checks.check_shards` would refuse it).
    """
    config = dataclasses.replace(
        as_tensorizer_config(config) if config else TensorizerConfig(tensorizer_uri=uri),
        verify_hash=True,
    )
    uri = model_directory_tensors(uri, config.options) or uri
    shards, record = _shards(uri, config)
    if len(shards) > 1 and record is not None:
        # Each shard holds its own rank of the layout rank 0's record names, as a load at
        # that layout checks.
        check_shards(
            dataclasses.replace(config, tensorizer_uri=uri),
            record.tensor_parallel_size,
            record.pipeline_parallel_size,
        )
    return [_verify_file(shard, config) for shard in shards]


def _verify_file(uri: str, config: TensorizerConfig) -> VerifyReport:
    start = time.perf_counter()
    with (
        open_tensors(uri, config=config) as reader,
        progress(
            f"Verifying {_file_name(reader.uri)}", reader.total_tensor_bytes
        ) as reader.on_bytes,
    ):
        report = VerifyReport(uri=redact(reader.uri), encrypted=reader.encrypted)
        record = reader.record
        if record is not None:
            report.layout = (
                "any (converted)"
                if reader.checkpoint_form
                else f"{record.layout_text}, rank {record.rank}"
            )
        entries = reader.entries()
        if reader.encrypted and entries:
            _check_key(reader, entries[0].name)
        for batch in _batches(entries):
            pending = [e.name for e in batch]
            while pending:
                try:
                    for _, tensor in reader.items(only=set(pending)):
                        report.tensors += 1
                        report.bytes += tensor.numel() * tensor.element_size()
                    pending = []
                except CorruptTensorError as e:
                    if e.tensor not in pending:
                        _verify_singly(reader, pending, report)
                        break
                    # The read stopped at the bad tensor: the others are read again.
                    report.bad.append((e.tensor, "hash mismatch"))
                    report.tensors += 1
                    pending.remove(e.tensor)
                except EncryptionError:
                    _verify_singly(reader, pending, report)
                    break
    order = {e.name: i for i, e in enumerate(entries)}
    report.bad.sort(key=lambda bad: order.get(bad[0], len(order)))
    report.seconds = time.perf_counter() - start
    return report


def _file_name(uri: str) -> str:
    """The last part of `uri` (a local path or URL), short enough for a progress bar."""
    return uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def _check_key(reader: Any, first: str) -> None:
    """Decrypt one tensor first, so a wrong key is one clear error rather than every
    tensor reported bad."""
    try:
        for _ in reader.items(only={first}):
            pass
    except CorruptTensorError:
        pass  # decrypted; its hash is checked (and reported) with the rest


def _verify_singly(reader: Any, names: list[str], report: VerifyReport) -> None:
    """Read `names` one at a time, recording each that fails (a tensor that does not
    decrypt with a key that decrypts the others is corrupt)."""
    for name in names:
        report.tensors += 1
        try:
            for _, tensor in reader.items(only={name}):
                report.bytes += tensor.numel() * tensor.element_size()
        except CorruptTensorError:
            report.bad.append((name, "hash mismatch"))
        except EncryptionError:
            report.bad.append((name, "does not decrypt (corrupt data or authentication tag)"))


def _batches(entries: list[TensorEntry]) -> Iterator[list[TensorEntry]]:
    batch: list[TensorEntry] = []
    size = 0
    for entry in entries:
        if batch and size + entry.bytes > VERIFY_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.bytes
    if batch:
        yield batch
