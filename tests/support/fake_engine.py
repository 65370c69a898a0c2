"""A stand-in for the vLLM engine of a serialize (no vLLM import, no engine start): its
worker side writes real (small) tensors through `write_tensors`, as the real WorkerExtension
does, so every failure point of a serialize can be tried in milliseconds. Installed by the
``fake_engine`` and ``cli_with_fake_engine`` fixtures (tests/conftest.py,
tests/unit/conftest.py)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import ClassVar

from tensorize_vllm_model.integrations.vllm.engine import Engine
from tensorize_vllm_model.integrations.vllm.messages import SavedFile, decode


class FakeEngine(Engine):
    """What `tensorize_vllm_model` needs of `integrations.vllm.engine.Engine` (its typed calls
    are the real ones, over this `rpc`), with the workers' side done as the real
    WorkerExtension does it, for `world` ranks: each rank's `write_tensors` to a file staged
    in that rank's own transaction, published, committed or rolled back by the publish,
    commit and abort RPCs (every rank in turn, as ``collective_rpc`` reaches every worker;
    the call raises when one rank fails)."""

    instances: ClassVar[list[FakeEngine]] = []
    fail_tensors_commit = False
    world = 1

    def __init__(self):
        self.llm = object()
        self.pending = []
        self.transactions = {}  # rank -> that worker's transaction
        self.closed = False
        self.calls: list[str] = []
        FakeEngine.instances.append(self)

    @classmethod
    def for_capture(cls, engine_args, source_load_format):
        return cls()

    def keep_model_info(self, sources, into):
        return False  # no vLLM ran: its model-info cache says nothing of this engine

    def rpc(self, method, **kwargs):
        self.calls.append(method)
        if method == "tensorize_vllm_model_save":
            request = decode(kwargs["request"])  # as the worker does (messages)
            assert len(request.rank_uris) == self.world
            return [self._save(rank, request) for rank in range(self.world)]
        if method == "tensorize_vllm_model_publish":
            return self._each(lambda tx: tx.publish(), keep=True)
        if method == "tensorize_vllm_model_commit":
            if FakeEngine.fail_tensors_commit:
                raise OSError(28, "No space left on device")
            answers = self._each(lambda tx: tx.commit(), keep=False)
            self.pending.clear()
            return answers
        if method == "tensorize_vllm_model_abort":
            answers = self._each(lambda tx: tx.rollback(), keep=False)
            self.pending.clear()
            return answers
        raise AssertionError(f"unexpected rpc {method}")

    def _save(self, rank, request):
        import torch

        from tensorize_vllm_model import storage
        from tensorize_vllm_model.format.record import FileRecord
        from tensorize_vllm_model.format.writer import write_tensors

        tensors = [
            (f"layers.{i}.weight", torch.full((256, 256), float(i + rank)), False) for i in range(4)
        ]
        tx = self.transactions[rank] = storage.transaction(request.stream_options)
        staged = write_tensors(
            request.rank_uris[rank],
            tensors,
            record=FileRecord(encrypted=request.key is not None),
            key=request.key,
            tx=tx,
        )
        self.pending.append(staged)
        return SavedFile(rank=rank, uri=staged.uri, tensors=staged.tensors, bytes=staged.bytes)

    def _each(self, action, *, keep):
        """`action` on every rank's transaction; the first failure raised after every rank
        was called (as collective_rpc does)."""
        failure = None
        for rank in sorted(self.transactions):
            tx = self.transactions[rank] if keep else self.transactions.pop(rank)
            try:
                action(tx)
            except Exception as e:  # noqa: BLE001
                failure = failure or e
        if failure is not None:
            raise failure
        return [None] * self.world

    def rpc_within(self, seconds, method, **kwargs):
        return self.rpc(method, **kwargs)

    def close(self):
        self.closed = True


def engine_args(model: Path):
    return types.SimpleNamespace(
        model=str(model),
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        load_format="auto",
        revision=None,
        download_dir=None,
        tokenizer=None,
        tokenizer_revision=None,
    )
