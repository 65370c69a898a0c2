"""The read engine of tensorizer's own `TensorDeserializer`: for devices and settings our own
engines do not cover (a GPU with hash checks, ``deserialization_kwargs`` only tensorizer
knows, dtypes torch lacks). A remote stream is wrapped in `format.header.HeaderGuard`, which
checks each tensor header's length field as it passes, before tensorizer sizes a buffer by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..format.compat import translate_errors
from ..format.header import HeaderGuard
from .base import OpenFile, ReadTimes

__all__ = ["TensorizerEngine"]


class TensorizerEngine:
    """Reads through tensorizer's `TensorDeserializer` (``lazy_load=False``), its tensors
    detached; errors translated by `format.compat.translate_errors`."""

    read_times: ReadTimes | None = None

    def __init__(self, remote: bool):
        self.remote = remote  # no up-front check of its tensor headers was made

    def items(
        self,
        file: OpenFile,
        chosen: list[tuple[str, Any]],
        on_bytes: Callable[[int], None] | None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        from tensorizer import TensorDeserializer

        from ..format.compat import module_name

        wanted = {name for name, _ in chosen}
        stream = file.reopen()
        if self.remote:
            stream = HeaderGuard(
                stream,
                {e.offset: (name, e.data_offset - e.offset) for name, e in file.entries()},
                file.name,
            )
        try:
            with translate_errors(file.name, keyfile=file.request.keyfile):
                deserializer = TensorDeserializer(
                    stream,
                    device=file.request.device,
                    lazy_load=False,
                    filter_func=lambda name: module_name(name) in wanted,
                    **file.kwargs,
                )
                tensors = []
                for name, tensor in deserializer.items():
                    tensors.append((name, tensor))
                    if on_bytes is not None:
                        on_bytes(tensor.numel() * tensor.element_size())
                deserializer.close()
                del deserializer  # its cache would keep every tensor alive
            for name, tensor in tensors:
                yield module_name(name), tensor.detach()
        finally:
            stream.close()
