"""The engine the command line and a serialize drive: `Engine` (a `vllm.LLM` started for one
job) with typed calls to the worker extension (`save`, `publish`, `commit`, `abort`, `lora_modules`,
`load_stats`), and vLLM's argument parser and `EngineArgs` for the command line.

It imports vLLM's public API (``vllm.LLM``, ``SamplingParams``, ``EngineArgs``,
``FlexibleArgumentParser``) inside its functions, and uses one internal: `Engine.close`
calls ``llm.llm_engine.engine_core.shutdown()`` (``LLM`` has no public shutdown in vLLM
0.32). It does not import the worker side (`worker`), so that `serialization` can drive an
engine without an import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import threading
from collections.abc import Sequence
from typing import Any

from ...core import errors
from ...core.errors import TensorizeError
from ...core.redaction import scrubbing
from ...read.base import LoadStats
from .messages import (
    CAPTURE_LOAD_FORMAT,
    WORKER_EXTENSION,
    LoraModules,
    SavedFile,
    SaveRequest,
    WorkerFailure,
    decode,
    encode,
)

__all__ = [
    "Engine",
    "make_parser",
    "engine_args_from_namespace",
    "parallel_sizes",
    "vllm_version",
    "raise_worker_errors",
    "check_checkpoint_pieces",
]

logger = scrubbing(f"vllm.{__name__}")


class Engine:
    """A vLLM engine (`vllm.LLM`) started for one job, shut down by `close()`.

    Raises (on start):
        ConfigError: vLLM refused the engine settings (its ``ValueError``, e.g. a
            tensor-parallel size that does not divide the model's attention heads), with
            vLLM's reason on one line.
    """

    def __init__(self, engine_args: Any, **overrides: Any):
        from vllm import LLM

        values = dict(vars(engine_args))
        values.update(overrides)
        try:
            self.llm: Any = LLM(**values)
        except TensorizeError:
            raise
        except ValueError as e:  # vLLM's config validation (pydantic's ValidationError is one)
            raise errors.ConfigError(f"vLLM refused the engine flags: {refusal_text(e)}") from e
        except OSError as e:  # transformers' "not a local folder nor a Hub id it can reach"
            raise model_not_found(values.get("model"), e) from e

    @classmethod
    def for_capture(cls, engine_args: Any, source_load_format: str) -> Engine:
        """An engine that loads the checkpoint with vLLM's `source_load_format` loader and
        keeps the weights for `save` (`loader.CaptureLoader`)."""
        return cls(
            engine_args,
            load_format=CAPTURE_LOAD_FORMAT,
            model_loader_extra_config={"source_load_format": source_load_format},
            worker_extension_cls=WORKER_EXTENSION,
        )

    def keep_model_info(self, sources: list[str], into: str) -> bool:
        """Write vLLM's model-info entries of the model's architectures, as this engine's
        vLLM cached them, into directory `into` (`compiled.write_model_info`; `sources`:
        the model's local directories): whether there were any."""
        from .compiled import write_model_info

        return write_model_info(sources, into)

    # -- the worker extension's calls, typed ----------------------------------------------

    def save(self, request: SaveRequest) -> list[SavedFile]:
        """Every worker writes its rank's captured weights to a staged file: what each
        staged, in global rank order."""
        return sorted(self.rpc("tensorize_vllm_model_save", request=encode(request)), key=_rank)

    def publish(self) -> None:
        """Phase one of a two-phase commit across ranks: every worker publishes its staged
        files, keeping aside what they replace. When any worker fails, `abort` puts back
        every name, those the other workers published included.

        Raises:
            TensorizeError: a worker's failure (see `rpc`); that worker's names are back
                already, the others' after `abort`.
        """
        self.rpc("tensorize_vllm_model_publish")

    def commit(self) -> None:
        """Phase two: every worker makes its published files final (after `publish` on
        every worker succeeded; nothing left can fail but dropping kept copies)."""
        self.rpc("tensorize_vllm_model_commit")

    def abort(self, within: float) -> None:
        """Every worker deletes its staged files and puts back every name it published;
        gives up after `within` seconds (the engine may already be shutting down)."""
        self.rpc_within(within, "tensorize_vllm_model_abort")

    def lora_modules(self) -> LoraModules:
        """The modules a LoRA adapter may target in the loaded model (rank 0's answer)."""
        return self.rpc("tensorize_vllm_model_lora_modules")[0]

    def load_stats(self) -> list[LoadStats]:
        """The figures of each worker's last tensorizer load (workers that did none left
        out)."""
        answers = self.rpc("tensorize_vllm_model_load_stats")
        return [stats for stats in answers if isinstance(stats, LoadStats)]

    # -- plain calls -----------------------------------------------------------------------

    def rpc(self, method: str, **kwargs: Any) -> list[Any]:
        """`method` on every worker (vLLM's ``collective_rpc``): their answers.

        Raises:
            TensorizeError: a worker's error from this package (as raised there), or
                `errors.WorkerError` for any other failure of the call, with vLLM's message.
        """
        try:
            answers = self.llm.collective_rpc(method, kwargs=kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM raises bare RuntimeError/Exception
            raise errors.WorkerError(f"the engine's {method} call failed: {e}") from e
        return raise_worker_errors(answers)

    def rpc_within(self, seconds: float, method: str, **kwargs: Any) -> list[Any] | None:
        """`rpc`, giving up after `seconds` (None then, or on error): for clean-up calls to
        an engine that may already be shutting down."""
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(self.rpc(method, **kwargs)), daemon=True
        )
        thread.start()
        thread.join(seconds)
        if thread.is_alive() or not result:
            logger.warning("the engine did not answer %s within %.0f s", method, seconds)
            return None
        return result[0]

    def generate(
        self, prompts: Sequence[str], *, max_tokens: int = 16
    ) -> list[tuple[str, list[int]]]:
        """Greedy completions of `prompts`: (text, token ids) each."""
        from vllm import SamplingParams

        outputs = self.llm.generate(
            list(prompts), SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False
        )
        return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outputs]

    def close(self) -> None:
        # "resource_tracker: There appear to be 2 leaked shared_memory objects" at exit is
        # vLLM's, not this package's, and it comes after an uninterrupted serialize too (seen
        # with vLLM 0.32 CPU): the multiprocessing executor's two shm_broadcast.MessageQueue
        # ring buffers (rpc_broadcast_mq made by the engine-core process, worker_response_mq by
        # the worker) are unlinked only in ShmRingBuffer.__del__, which does not run when
        # vLLM's shutdown terminates those processes. The package creates no shared memory;
        # the names live only in vLLM's processes. Python's resource tracker unlinks them as
        # it warns ("to clean up at shutdown").
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the engine may be half started
            logger.debug("engine shutdown failed", exc_info=True)
        del llm
        gc.collect()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refusal_text(error: Exception) -> str:
    """vLLM's reason for refusing its settings, on one line: each reason of a pydantic
    ``ValidationError`` (vLLM 0.32's configs are pydantic dataclasses) without pydantic's
    prefix and links, else the error's first line."""
    reasons = getattr(error, "errors", None)
    if callable(reasons):
        try:
            texts = [str(r.get("msg", "")).removeprefix("Value error, ") for r in reasons()]
        except Exception:  # noqa: BLE001 - any other ValueError with an errors attribute
            texts = []
        if any(texts):
            return "; ".join(t for t in texts if t)
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def raise_worker_errors(answers: list[Any]) -> list[Any]:
    """`answers` decoded (`messages.decode`), unless one is a `WorkerFailure`: then that
    error is raised again as its class (`TensorizeError` for a class this package does not
    have, and for `CorruptTensorError`, whose constructor takes more than a message)."""
    answers = [decode(answer) for answer in answers]
    for answer in answers:
        if isinstance(answer, WorkerFailure):
            kind = getattr(errors, answer.kind, None)
            if (
                not (isinstance(kind, type) and issubclass(kind, TensorizeError))
                or kind is errors.CorruptTensorError
            ):
                kind = TensorizeError
            raise kind(answer.message)
    return answers


def _rank(saved: SavedFile) -> int:
    return saved.rank


def make_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """vLLM's argument parser with every engine flag (``--model``, ``--dtype``...).

    Usage errors print one line, ``<prog>: error: <message>``, and exit with code 2.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class OneLineErrorParser(FlexibleArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message}\n")

    parser = OneLineErrorParser(**kwargs)
    return EngineArgs.add_cli_args(parser)


def engine_args_from_namespace(args: argparse.Namespace) -> Any:
    """The `EngineArgs` given on the command line."""
    from vllm.engine.arg_utils import EngineArgs

    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EngineArgs)
        if hasattr(args, f.name)
    }
    try:
        return EngineArgs(**values)
    except OSError as e:  # vLLM looks a Hub id up (huggingface_hub's errors are OSErrors)
        raise model_not_found(values.get("model"), e) from e


def model_not_found(model: object, error: OSError) -> errors.ConfigError:
    """The error for a model whose config vLLM cannot find (`error`: transformers' or
    huggingface_hub's, an ``OSError``): neither a local directory nor a Hub id reachable
    from here; the model named as the entry point in use takes it."""
    return errors.ConfigError(
        f"vLLM cannot find the model {errors.setting_hint('model', model)}: "
        f"{refusal_text(error)} Give a local model directory (config.json, tokenizer) or a "
        "Hub id this machine can download"
    )


def parallel_sizes(engine_args: Any) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of `engine_args` (1 when unset)."""
    return int(engine_args.tensor_parallel_size or 1), int(engine_args.pipeline_parallel_size or 1)


def vllm_version() -> str:
    """The installed vLLM's version."""
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_checkpoint_pieces(model: str) -> None:
    """Refuse a local checkpoint directory `model` missing part of a weight vLLM merges
    (`convert.pieces`: q/k/v, gate/up, an expert's projections) before vLLM starts: inside
    vLLM's engine (`loader.CaptureLoader`) the same refusal reaches the user only as
    vLLM's "Engine core initialization failed". The merged groups are those the
    architecture's vLLM class declares (its class-level ``packed_modules_mapping``, from
    vLLM's model registry); an architecture vLLM does not know is left to the engine.

    Raises:
        ModelMismatchError: one line naming `model` and the missing checkpoint tensor.
    """
    import json
    import os

    config_path = os.path.join(model, "config.json")
    if not os.path.isfile(config_path):
        return
    from vllm.model_executor.models import ModelRegistry

    from ...convert.checkpoint import open_checkpoint
    from ...convert.pieces import check_pieces

    with open(config_path) as f:
        config = json.load(f)
    packed = None
    for architecture in config.get("architectures") or []:
        registered = ModelRegistry.models.get(architecture)
        if registered is not None:
            packed = getattr(registered.load_model_cls(), "packed_modules_mapping", None)
            break
    if not isinstance(packed, dict):
        return
    names = (name for name, _ in open_checkpoint(model).shapes())
    check_pieces(names, packed, config, source=model)
