"""``convert``: one tensorizer artifact from a Hugging Face checkpoint, for every parallel
layout, made without vLLM or a GPU.

* `checkpoint`: reads the checkpoint's files tensor by tensor.
* `placement`: how tensors are laid out (row-parallel weights in column tiles) and the read plan
  of a rank from names and shapes alone.
* `writer`: `convert_checkpoint`, the staged, all-or-nothing write.
* `regions` and `loading`: the loading side, used by the vLLM loader: which bytes of
  each tensor a rank needs (reading only those is `read.partial`).

Nothing here imports vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert_checkpoint"]


def __getattr__(name: str) -> Any:
    # The writer (and the checkpoint readers, keys, artifacts it needs) is imported on
    # first use: the vLLM loader imports only the loading side, inside a timed load.
    if name == "convert_checkpoint":
        from .writer import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
