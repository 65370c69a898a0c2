"""The worker extension: methods vLLM mixes into its worker class (``worker_extension_cls``,
`WORKER_EXTENSION`), called in every worker through ``collective_rpc``.

Their arguments and answers are the small dataclasses of `messages`; what a worker keeps
between calls is `runtime.STATE`. The load figures (``tensorize_vllm_model_load_stats``) are
a `LoadStats` message, whose wire form is a plain dict that users read through
``llm.collective_rpc`` (examples/quickstart.py); ``tensorize_vllm_model_read_plan`` stays plain
tuples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from vllm.logger import init_logger

from ...core.errors import TensorizeError
from ...core.progress import progress
from ...core.redaction import scrubbing
from ...format.record import FileRecord
from ...format.writer import write_tensors
from .compiled import pack_for_save
from .messages import (
    CAPTURE_LOAD_FORMAT,
    WORKER_EXTENSION,
    LoadStats,
    LoraModules,
    SavedFile,
    SaveRequest,
    WorkerFailure,
    decode,
    encode,
)
from .runtime import STATE, current_layout, expert_parallel

__all__ = ["WORKER_EXTENSION", "WorkerExtension", "worker_call"]

logger = scrubbing(init_logger(f"vllm.{__name__}"))

_Method = TypeVar("_Method", bound=Callable[..., Any])


def worker_call(method: _Method) -> _Method:
    """A worker method's side of the wire (see `messages`): its keyword arguments decoded
    into their dataclasses, its answer encoded; and one of this package's errors answered
    as a `WorkerFailure` instead of raised: vLLM logs a worker's exception with its
    traceback and re-raises it in the caller as a bare RuntimeError; `engine.Engine.rpc`
    raises the answer again, as the error it was."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            answer = method(self, *args, **{k: decode(v) for k, v in kwargs.items()})
        except TensorizeError as e:
            answer = WorkerFailure(message=str(e), kind=type(e).__name__)
        return encode(answer)

    return wrapper  # type: ignore[return-value]


class WorkerExtension:
    """Methods vLLM mixes into its worker class, called through ``collective_rpc``."""

    vllm_config: Any  # the worker's, set by vLLM

    @worker_call
    def tensorize_vllm_model_save(self, request: SaveRequest) -> SavedFile:
        """Write this rank's captured weights to a staged file; return what was written."""
        captured = STATE.captured
        if captured is None:
            raise RuntimeError(
                "no captured weights in this worker: the engine was not started with "
                f"load_format={CAPTURE_LOAD_FORMAT!r}"
            )
        layout = current_layout(self.vllm_config)
        if len(request.rank_uris) != layout.world_size:
            raise RuntimeError(
                f"the save request names {len(request.rank_uris)} files for "
                f"{layout.world_size} ranks"
            )
        uri = request.rank_uris[layout.rank]
        record = FileRecord(
            architecture=captured.architecture,
            dtype=captured.dtype,
            tensor_parallel_size=layout.tensor_parallel_size,
            pipeline_parallel_size=layout.pipeline_parallel_size,
            rank=layout.rank,
            producer=request.producer,
            extra={"expert_parallel": True} if expert_parallel(self.vllm_config) else {},
        )
        total = sum(t.numel() * t.element_size() for _, t, _ in captured.tensors)
        tx = STATE.open_transaction(request.stream_options)
        with progress("Serializing", total, logger=logger, enabled=layout.rank == 0) as advance:
            staged = write_tensors(
                uri,
                captured.tensors,
                record=record,
                key=request.key,
                serialization_kwargs=request.serialization_kwargs,
                on_bytes=advance,
                tx=tx,
            )
        archive = pack_for_save(((name, t) for name, t, _ in captured.tensors), uri, tx)
        tx.send_ahead()  # S3: the parts uploaded now, before the driver publishes anything
        STATE.captured = None
        return SavedFile(
            rank=layout.rank,
            uri=uri,
            tensors=staged.tensors,
            bytes=staged.bytes,
            compile_cache=archive,
        )

    @worker_call
    def tensorize_vllm_model_publish(self) -> list[str]:
        """Phase one of the engine's two-phase commit (`engine.Engine.publish`): publish
        this worker's staged files under their final names, keeping aside what they
        replace, so that an abort still puts every name back. On failure this worker's
        own names are put back at once and the error is answered."""
        tx = STATE.transaction
        if tx is None:
            return []
        tx.publish()
        return tx.uris

    @worker_call
    def tensorize_vllm_model_commit(self) -> list[str]:
        """Phase two: make this worker's published files final (drop the kept copies);
        publishes first what is not published yet."""
        tx = STATE.take_transaction()
        if tx is None:
            return []
        tx.commit()
        return tx.uris

    def tensorize_vllm_model_abort(self) -> None:
        """Delete this worker's staged files and put back every name it published."""
        tx = STATE.take_transaction()
        if tx is not None:
            tx.rollback()

    @worker_call
    def tensorize_vllm_model_lora_modules(self) -> LoraModules:
        """The module names a LoRA adapter may target in this model (PEFT's names, packed
        modules unpacked), and the engine's --max-lora-rank when LoRA is enabled."""
        from vllm.lora.utils import get_supported_lora_modules

        model = self.get_model()  # type: ignore[attr-defined]
        packed = getattr(model, "packed_modules_mapping", {}) or {}
        # With --enable-lora vLLM has already wrapped each layer (".../qkv_proj.base_layer").
        supported = set(get_supported_lora_modules(model)) - {"base_layer"}
        supported |= {
            name.rsplit(".", 2)[-2]
            for name, _ in model.named_modules()
            if name.endswith(".base_layer")
        }
        expected: set[str] = set()
        for module in supported:
            expected.update(packed.get(module, [module]))
        lora_config = self.vllm_config.lora_config
        return LoraModules(
            modules=sorted(expected),
            max_rank=lora_config.max_lora_rank if lora_config else None,
        )

    def tensorize_vllm_model_read_plan(self) -> list[tuple[str, int, int]]:
        """(tensor, first byte, end byte) in the file of every range the last load of a
        converted file read on this rank."""
        return list(STATE.last_parts)

    @worker_call
    def tensorize_vllm_model_load_stats(self) -> LoadStats | None:
        """Figures of the last tensorizer load in this worker (None before any): on the wire
        the dict of `messages.encode` (``uri``, ``tensors``, ``bytes``, ``seconds``,
        ``read_times``)."""
        return STATE.last_load
