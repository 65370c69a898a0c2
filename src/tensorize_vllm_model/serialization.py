"""Writing: tensors files, the model's small artifacts, and the whole serialize of a vLLM model.

`write_tensors` writes one file (vLLM's marker holding the file record first, then the
tensors) to a staged temporary name. `tensorize_vllm_model` drives a serialize end to end: it generates
the key, starts a vLLM engine that loads the checkpoint, has every worker write its rank's
file through ``collective_rpc``, copies the config/tokenizer files, and publishes everything
only when all of it has been written.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__, interrupts, storage
from .artifacts import resolve_model_files, stage_artifacts
from .config import TensorizerConfig, as_tensorizer_config
from .errors import ConfigError, StorageError
from .keys import encryption_params, prepare_key
from .layout import (
    MARKER_NAME,
    RECORD_NAME,
    FileRecord,
    ParallelLayout,
    rank_uri,
)
from .lora import prepare_adapters

# How long a failed serialize waits for the workers to delete their temporary files.
ABORT_SECONDS = 15.0

__all__ = [
    "StagedTensors",
    "SerializeResult",
    "write_tensors",
    "check_serialization_kwargs",
    "tensorize_vllm_model",
]


@dataclass
class StagedTensors:
    """A tensors file staged in a transaction, with what it holds.

    `commit()` / `abort()` finish the transaction `write_tensors` opened for the file when
    the caller gave none; a file staged in the caller's transaction is published with it.
    """

    staged: storage.StagedWrite
    tensors: int = 0
    bytes: int = 0
    transaction: storage.Transaction | None = None

    @property
    def uri(self) -> str:
        return self.staged.uri

    def commit(self) -> None:
        self._own().commit()

    def abort(self) -> None:
        self._own().rollback()

    def _own(self) -> storage.Transaction:
        if self.transaction is None:
            raise RuntimeError(f"{self.uri} is published with the transaction it was staged in")
        return self.transaction


@dataclass
class SerializeResult:
    """What a serialize wrote."""

    directory: str
    tensors_uri: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    keyfile: str | None = None
    # True when the key was already in `keyfile` (left unchanged); False for a new key.
    key_existing: bool = False


def check_serialization_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse, by name, keys that tensorizer's `TensorSerializer` does not take."""
    from tensorizer import TensorSerializer

    accepted = set(inspect.signature(TensorSerializer.__init__).parameters) - {"self", "file_obj"}
    refused = {"encryption"}  # set by --keyfile
    unknown = sorted(set(kwargs) - (accepted - refused))
    if unknown:
        raise ConfigError(
            f"--serialization-kwargs: unknown or reserved key(s) {', '.join(map(repr, unknown))}; "
            f"TensorSerializer takes {', '.join(sorted(accepted - refused))}"
        )


def write_tensors(
    uri: str,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    *,
    record: FileRecord,
    key: bytes | None = None,
    serialization_kwargs: Mapping[str, Any] | None = None,
    options: storage.Options = None,
    on_bytes: Callable[[int], None] | None = None,
    marker: bool = True,
    batch_bytes: int | None = None,
    tx: storage.Transaction | None = None,
) -> StagedTensors:
    """Write `tensors` to a file staged at `uri` in transaction `tx` (published after the
    transaction's other files), or, without `tx`, in a transaction of its own that the
    returned `StagedTensors.commit()` publishes.

    Args:
        uri: the final location of the file.
        tensors: (name, tensor, is_buffer) triples, in the order to write them.
        record: the file record, written first: as the bytes of vLLM's marker tensor (see
            `layout`, so that vLLM's built-in loader reads the file too), or, with
            ``marker=False``, as its own STATE_DICT tensor.
        key: a 32-byte key to encrypt with, or None.
        serialization_kwargs: extra keyword arguments for `TensorSerializer`.
        options: how to reach remote storage (for an ``s3://`` URI), when no `tx` is given.
        on_bytes: called with each tensor's size in bytes once it is written (progress.py).
        marker: write vLLM's ``.vllm_tensorized_marker`` (files of vLLM's own parameters);
            False for a checkpoint-form file (``convert``), which vLLM must not take for one.
        batch_bytes: write the tensors in batches of about this many bytes, hashed in
            parallel and prepared a batch ahead (`batched_write`), with tensorizer's
            ``STATE_DICT`` type; None writes them one by one as ``PARAM``/``BUFFER``.
        tx: the transaction to stage the file in.

    Returns:
        The staged file; nothing is at `uri` until its transaction commits.

    Raises:
        StorageError: the file cannot be written (named); nothing is left of it.
    """
    how: dict[str, Any] = dict(
        record=record,
        key=key,
        serialization_kwargs=serialization_kwargs,
        on_bytes=on_bytes,
        marker=marker,
        batch_bytes=batch_bytes,
    )
    if tx is not None:
        return _write_staged(StagedTensors(tx.stage(uri, last=True)), tensors, **how)
    own = storage.transaction(options)
    try:
        staged = _write_staged(StagedTensors(own.stage(uri, last=True)), tensors, **how)
    except BaseException:
        own.rollback()
        raise
    staged.transaction = own
    return staged


def _write_staged(
    staged: StagedTensors,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    *,
    record: FileRecord,
    key: bytes | None,
    serialization_kwargs: Mapping[str, Any] | None,
    on_bytes: Callable[[int], None] | None,
    marker: bool,
    batch_bytes: int | None,
) -> StagedTensors:
    """`write_tensors` into the temporary file of `staged`."""
    from tensorizer import TensorSerializer
    from tensorizer.serialization import TensorType

    try:
        with open(staged.staged.path, "wb+") as f:
            serializer = TensorSerializer(
                f,
                encryption=encryption_params(key) if key is not None else None,
                **dict(serialization_kwargs or {}),
            )
            # The record says whether the file is encrypted: set here, for every writer.
            record = dataclasses.replace(record, encrypted=key is not None)
            record_tensor = torch.frombuffer(bytearray(record.to_bytes()), dtype=torch.uint8)
            if marker:
                # vLLM's marker holds the record (see layout): vLLM's built-in loader reads it.
                serializer.write_tensor(0, MARKER_NAME, TensorType.PARAM, record_tensor)
            else:
                # No marker (vLLM must not take the file for its own parameters): the record
                # keeps its own STATE_DICT tensor, which this package reads.
                serializer.write_tensor(0, RECORD_NAME, TensorType.STATE_DICT, record_tensor)
            if batch_bytes is not None:
                _write_batched(serializer, tensors, batch_bytes, staged, on_bytes)
                tensors = ()
            for index, (name, tensor, is_buffer) in enumerate(tensors, start=1):
                kind = TensorType.BUFFER if is_buffer else TensorType.PARAM
                serializer.write_tensor(index, name, kind, tensor)
                staged.tensors += 1
                staged.bytes += tensor.numel() * tensor.element_size()
                if on_bytes is not None:
                    on_bytes(tensor.numel() * tensor.element_size())
            serializer.close()
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot write {staged.uri}: {e.strerror or e}") from e
    return staged


def _write_batched(
    serializer: Any,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    batch_bytes: int,
    staged: StagedTensors,
    on_bytes: Callable[[int], None] | None,
) -> None:
    from .format.writer import write_batches

    def written(count: int, nbytes: int) -> None:
        staged.tensors += count
        staged.bytes += nbytes
        if on_bytes is not None:
            on_bytes(nbytes)

    write_batches(
        serializer,
        ((name, tensor) for name, tensor, _ in tensors),
        batch_bytes=batch_bytes,
        on_batch=written,
    )


def tensorize_vllm_model(
    engine_args: Any,
    tensorizer_config: TensorizerConfig | Mapping[str, Any],
    generate_keyfile: bool = True,
    *,
    lora_paths: Sequence[str] = (),
) -> SerializeResult:
    """Load a model with vLLM and serialize it with tensorizer, as vLLM loads it.

    Every worker writes the weights of its own rank (``tensorizer_uri`` formatted with the
    global rank when the layout has more than one), as they are after loading and before
    vLLM's backend-specific post-processing. The model's config, tokenizer and generation
    files are copied beside the tensors, so the directory can be passed to
    ``LLM(..., load_format="tensorizer")`` or ``vllm serve``. Nothing appears at the final
    names until everything has been written.

    Args:
        engine_args: `vllm.EngineArgs` of the model to serialize.
        tensorizer_config: where to write (``tensorizer_uri``) and how
            (``encryption_keyfile``, ``serialization_kwargs``): this package's
            `TensorizerConfig`, vLLM's, or a dict of its fields.
        generate_keyfile: with ``encryption_keyfile`` set: when the file holds a key,
            encrypt with it (the file is never overwritten, whatever this says); when there
            is no file, True generates a random key and writes it there (mode 0600, published
            with the model) and False is an error. (vLLM's function overwrites the file.)
        lora_paths: LoRA adapters (local PEFT directories, or Hub ids where a Hub is
            reachable) to serialize into ``lora/<name>/`` beside the model, encrypted with
            the same key. Each is checked against the model first.

    Returns:
        A `SerializeResult` naming what was written.

    Example:
        >>> from vllm import EngineArgs  # doctest: +SKIP
        >>> tensorize_vllm_model(EngineArgs(model="/models/opt"),
        ...                      TensorizerConfig(tensorizer_uri="/out/model.tensors"))
    """
    from .vllm_adapter import CAPTURE_LOAD_FORMAT, Engine, parallel_sizes, vllm_version

    start = time.perf_counter()
    tensorizer_config = as_tensorizer_config(tensorizer_config)
    tp, pp = parallel_sizes(engine_args)
    uri = tensorizer_config.tensorizer_uri
    assert uri is not None
    rank_uri(uri, ParallelLayout(tp, pp))  # refuses a missing rank template now
    check_serialization_kwargs(tensorizer_config.serialization_kwargs)
    source_format = str(engine_args.load_format or "auto")
    if source_format in ("tensorizer", CAPTURE_LOAD_FORMAT):
        raise ConfigError(
            "--load-format tensorizer cannot be the source of a serialize; serialize from "
            "the model's own checkpoint"
        )
    destination = tensorizer_config.tensorizer_dir or storage.parent(uri)
    options = tensorizer_config.stream_options()
    storage.check_writable(destination, options)
    adapters = prepare_adapters(
        lora_paths,
        download_dir=engine_args.download_dir,
        max_rank=engine_args.max_lora_rank if getattr(engine_args, "enable_lora", False) else None,
    )

    keyfile = tensorizer_config.encryption_keyfile
    encryption = (
        prepare_key(keyfile, tensorizer_config, generate=generate_keyfile) if keyfile else None
    )
    key = encryption.key if encryption else None

    engine = None
    try:
        with storage.transaction(options) as tx:
            engine = Engine.for_capture(engine_args, source_format)
            # On any failure the workers delete their staged files too. The engine may be
            # gone (Ctrl-C reaches its processes too): do not wait long.
            tx.on_rollback(_aborter(engine))
            written = engine.rpc(
                "tensorize_vllm_model_save",
                request={
                    "tensorizer_uri": uri,
                    "key": key,
                    "serialization_kwargs": dict(tensorizer_config.serialization_kwargs),
                    "stream_options": options,
                    "producer": f"tensorize_vllm_model {__version__}, vllm {vllm_version()}",
                },
            )
            stage_artifacts(tx, _artifact_sources(engine_args), destination)
            if encryption is not None:
                encryption.stage(tx)
            if adapters:
                _stage_adapters(tx, engine, adapters, destination, key)
            # A Ctrl-C that some code swallowed (vLLM drops KeyboardInterrupt while its
            # engine starts) still stops the serialize here, before anything is published.
            interrupts.check()
            # All or nothing: the artifacts and key first, each rank's tensors last (so a
            # tensors file that exists is complete); any failure puts every name back.
            tx.publish()
            engine.rpc("tensorize_vllm_model_commit")
    finally:
        if engine is not None:
            engine.close()

    written = sorted(written, key=lambda w: w["rank"])
    return SerializeResult(
        directory=destination,
        tensors_uri=uri,
        files=[w["uri"] for w in written] + tx.uris,
        tensors=sum(w["tensors"] for w in written),
        bytes=sum(w["bytes"] for w in written),
        seconds=time.perf_counter() - start,
        keyfile=keyfile,
        key_existing=bool(encryption and encryption.existing),
    )


def _artifact_sources(engine_args: Any) -> list[str]:
    """The local directories of the model's config/tokenizer files (the tokenizer's too,
    when it is another model's)."""
    sources = [
        resolve_model_files(
            engine_args.model, revision=engine_args.revision, download_dir=engine_args.download_dir
        )
    ]
    tokenizer = getattr(engine_args, "tokenizer", None)
    if tokenizer and tokenizer != engine_args.model:
        sources.append(
            resolve_model_files(
                tokenizer,
                revision=engine_args.tokenizer_revision,
                download_dir=engine_args.download_dir,
            )
        )
    return sources


def _aborter(engine: Any) -> Callable[[], None]:
    """Has the workers of `engine` delete their staged files (a transaction's rollback)."""

    def abort() -> None:
        if engine.llm is not None:
            engine.rpc_within(ABORT_SECONDS, "tensorize_vllm_model_abort")

    return abort


def _stage_adapters(
    tx: storage.Transaction,
    engine: Any,
    adapters: Sequence[Any],
    destination: str,
    key: bytes | None,
) -> None:
    """Check every adapter against the loaded model, then stage them all in `tx`."""
    from .lora import check_adapter_fits, stage_adapter

    [fit] = engine.rpc("tensorize_vllm_model_lora_modules")[:1]
    for adapter in adapters:
        check_adapter_fits(adapter.name, adapter.config, fit["modules"], fit["max_rank"])
    for adapter in adapters:
        stage_adapter(tx, adapter.name, adapter.path, destination, key=key)
