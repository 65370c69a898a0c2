"""Writing: tensors files, the model's small artifacts, and the whole serialize of a vLLM model.

`write_tensors` writes one file (vLLM's marker holding the file record first, then the
tensors) to a staged temporary name. `tensorize_vllm_model` drives a serialize end to end: it generates
the key, starts a vLLM engine that loads the checkpoint, has every worker write its rank's
file through ``collective_rpc``, copies the config/tokenizer files, and publishes everything
only when all of it has been written.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ... import __version__, storage
from ...artifacts.lora import prepare_adapters
from ...artifacts.model_files import artifact_files, resolve_model_files, stage_artifacts
from ...config import TensorizerConfig, as_tensorizer_config
from ...config.plan import WritePlan, resolve_write
from ...core import interrupts
from ...core.errors import ConfigError
from ...format.keys import EncryptionKey, prepare_key
from ...format.record import ParallelLayout
from ...format.writer import SerializeResult, check_serialization_kwargs

# How long a failed serialize waits for the workers to delete their temporary files.
ABORT_SECONDS = 15.0

__all__ = ["SerializeResult", "tensorize_vllm_model"]


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
    start = time.perf_counter()
    config = as_tensorizer_config(tensorizer_config)
    job = _prepare(engine_args, config)
    adapters = prepare_adapters(
        lora_paths,
        download_dir=engine_args.download_dir,
        max_rank=engine_args.max_lora_rank if getattr(engine_args, "enable_lora", False) else None,
    )
    if job.plan.keyfile:
        job.encryption = prepare_key(job.plan.keyfile, config, generate=generate_keyfile)
    written, published = _run_engine(job, engine_args, adapters)
    caches = [w.compile_cache for w in written if w.compile_cache]
    return SerializeResult(
        directory=job.plan.directory,
        tensors_uri=job.plan.template,
        files=[w.uri for w in written] + caches + published,
        tensors=sum(w.tensors for w in written),
        bytes=sum(w.bytes for w in written),
        seconds=time.perf_counter() - start,
        keyfile=job.plan.keyfile,
        key_existing=bool(job.encryption and job.encryption.existing),
        left_out=_left_out(engine_args),
    )


@dataclass
class _Job:
    """A serialize under way: its write plan, its source format and its key."""

    plan: WritePlan
    source_format: str
    encryption: EncryptionKey | None = None

    @property
    def key(self) -> bytes | None:
        return self.encryption.key if self.encryption else None


def _prepare(engine_args: Any, config: TensorizerConfig) -> _Job:
    """Every check that needs no engine: the rank template, the serialization kwargs, the
    source format, a writable destination."""
    from .engine import parallel_sizes
    from .messages import CAPTURE_LOAD_FORMAT

    tp, pp = parallel_sizes(engine_args)
    plan = resolve_write(config, ParallelLayout(tp, pp))  # refuses a missing rank template now
    check_serialization_kwargs(plan.serialization_kwargs)
    source_format = str(engine_args.load_format or "auto")
    if source_format in ("tensorizer", CAPTURE_LOAD_FORMAT):
        raise ConfigError(
            "--load-format tensorizer cannot be the source of a serialize; serialize from "
            "the model's own checkpoint"
        )
    storage.check_writable(plan.directory, plan.options)
    return _Job(plan=plan, source_format=source_format)


def _run_engine(job: _Job, engine_args: Any, adapters: list[Any]) -> tuple[list[Any], list[str]]:
    """Start the capture engine, have every worker stage its rank's file, stage the
    artifacts, key and adapters in one transaction, then publish everything (each rank's
    tensors last), or put every name back on failure: (what each rank wrote, the other
    files published)."""
    from .engine import Engine

    engine = None
    try:
        with storage.transaction(job.plan.options) as tx:
            engine = Engine.for_capture(engine_args, job.source_format)
            # On any failure the workers delete their staged files too. The engine may be
            # gone (Ctrl-C reaches its processes too): do not wait long.
            tx.on_rollback(_aborter(engine))
            written = engine.save(_save_request(job))
            _stage_model_files(tx, engine, engine_args, job.plan.directory)
            if job.encryption is not None:
                job.encryption.stage(tx)
            if adapters:
                _stage_adapters(tx, engine, adapters, job.plan.directory, job.key)
            # A Ctrl-C that some code swallowed (vLLM drops KeyboardInterrupt while its
            # engine starts) still stops the serialize here, before anything is published.
            interrupts.check()
            # All or nothing, across ranks too: the artifacts and key first, then every
            # rank's tensors (so a tensors file that exists is complete), each replaced name
            # kept aside; only when every rank has published is anything made final. Any
            # failure before that puts every name back, on every rank.
            tx.publish()
            engine.publish()
            engine.commit()
    finally:
        if engine is not None:
            engine.close()
    return written, tx.uris


def _stage_model_files(
    tx: storage.Transaction, engine: Any, engine_args: Any, directory: str
) -> None:
    """The model's config/tokenizer files, and vLLM's model info of its class as `engine`'s
    vLLM cached it (`Engine.keep_model_info`), staged in `tx`."""
    sources = _artifact_sources(engine_args)
    with tempfile.TemporaryDirectory(prefix="tensorize-vllm-model-info-") as extra:
        if engine.keep_model_info(sources, extra):
            sources.append(extra)  # last: a file of the model's own comes first
        stage_artifacts(tx, sources, directory)


def _save_request(job: _Job) -> Any:
    from .engine import vllm_version
    from .messages import SaveRequest

    return SaveRequest(
        rank_uris=job.plan.rank_uris(),
        key=job.key,
        serialization_kwargs=job.plan.serialization_kwargs,
        stream_options=job.plan.options.as_mapping(),
        producer=f"tensorize_vllm_model {__version__}, vllm {vllm_version()}",
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


def _left_out(engine_args: Any) -> list[str]:
    """The files of the model's directories not carried beside the tensors (the weights,
    hidden files; `artifacts.artifact_files`), as "path (why)"."""
    return [str(item) for s in _artifact_sources(engine_args) for item in artifact_files(s)[1]]


def _aborter(engine: Any) -> Callable[[], None]:
    """Has the workers of `engine` delete their staged files (a transaction's rollback)."""

    def abort() -> None:
        if engine.llm is not None:
            engine.abort(within=ABORT_SECONDS)

    return abort


def _stage_adapters(
    tx: storage.Transaction,
    engine: Any,
    adapters: Sequence[Any],
    destination: str,
    key: bytes | None,
) -> None:
    """Check every adapter against the loaded model, then stage them all in `tx`."""
    from ...artifacts.lora import check_adapter_fits, stage_adapter

    fit = engine.lora_modules()
    for adapter in adapters:
        check_adapter_fits(adapter.name, adapter.config, fit.modules, fit.max_rank)
    for adapter in adapters:
        stage_adapter(tx, adapter.name, adapter.path, destination, key=key)
