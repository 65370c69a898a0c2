"""The torch side of a load: building a module with its parameters on the meta device
(`meta_parameters`) and filling a module's parameters and buffers with the tensors a
`read.reader.TensorReader` yields (`load_into_module`). Plain torch, no vLLM.

Tensors become the module's parameters as they are (no second copy). They keep their stored
dtype unless both they and the parameter they fill are floating point, in which case they
are cast to the parameter's dtype: integer (quantized) and complex tensors are never cast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.errors import ModelMismatchError

if TYPE_CHECKING:
    from .base import LoadStats
    from .reader import TensorReader

__all__ = ["meta_parameters", "load_into_module", "meta_references"]


class _EmptyOnMeta(TorchDispatchMode):
    """Sends ``torch.empty`` allocations on `device` to the meta device.

    vLLM's layers create their parameters with ``torch.empty``; on meta they cost no
    memory and are replaced by the deserialized tensors. Everything else (buffers such as
    rotary caches computed with ``arange``, ``ones``...) is created as usual.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten.empty.memory_format:
            target = kwargs.get("device")
            if target is None or _same_device(torch.device(target), self.device):
                kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def meta_parameters(device: str | torch.device) -> Iterator[None]:
    """Build a module with its ``torch.empty`` parameters on meta (no memory, no init)."""
    with _EmptyOnMeta(torch.device(device)):
        yield


def load_into_module(
    module: torch.nn.Module,
    reader: TensorReader,
    *,
    strict: bool = True,
) -> LoadStats:
    """Fill `module`'s parameters and buffers with the tensors of `reader`, by name.

    Each parameter is replaced by a new one holding the deserialized tensor (attributes
    that vLLM attaches to parameters are carried over, and parameters shared between
    modules stay shared). Floating-point tensors are cast to the parameter's dtype when it
    differs; other tensors keep their stored dtype.

    Args:
        module: the module; its parameters may be on meta (see `meta_parameters`).
        reader: an open `TensorReader`.
        strict: refuse a file whose tensors do not match the module (missing, extra or
            misshapen tensors, all named in one error). A buffer the module computed
            itself (not on meta) whose shape differs from the file's is kept as computed.

    Returns:
        `LoadStats` of the load (`TensorReader.stats`).

    A file made by ``convert`` (checkpoint form) loads into the checkpoint's own model (a
    transformers one, say): its row-parallel weights, stored in column tiles
    (``[T, out, in / T]``, `convert.placement`), are put back as ``[out, in]``.

    Raises:
        ModelMismatchError: naming every missing, unexpected or misshapen tensor, or an
            attribute still holding a meta tensor (`meta_references`).
    """
    fill = _Fill(_tensor_slots(module))
    tiled = reader.record.column_tiles if reader.checkpoint_form and reader.record else {}
    for name, tensor in reader.items():
        if name in tiled:  # tile j holds columns [j * in / T, (j + 1) * in / T)
            count, out, width = tensor.shape
            tensor = tensor.permute(1, 0, 2).reshape(out, count * width)
        fill.put(name, tensor)
    stats = reader.stats(tensors=fill.count, nbytes=fill.bytes)
    hint = ""
    if reader.vllm_tensorized and not reader.checkpoint_form:
        hint = (
            f"; {reader.uri} holds vLLM's own parameters (as serialize writes them, e.g. "
            "fused qkv_proj), which load into vLLM; the file that loads into the "
            "checkpoint's own (transformers) model is convert's output"
        )
    fill.check(reader.uri, type(module).__name__, strict=strict, hint=hint)
    held = meta_references(module)
    if held:
        raise ModelMismatchError(
            f"after loading {reader.uri}, {type(module).__name__} still holds tensors on the "
            f"meta device outside its parameters (it would compute with them): {_listed(held)}"
        )
    return stats


# How many names each part of a mismatch error lists (the rest are counted).
NAMES_SHOWN = 6


def _listed(names: list[str]) -> str:
    """`names` for a message: the first `NAMES_SHOWN`, then how many more (of how many)."""
    shown = ", ".join(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        return f"{shown} and {len(names) - NAMES_SHOWN} more ({len(names)} in all)"
    return shown


class _Fill:
    """One load into a module's slots: what was put, and what did not fit."""

    def __init__(self, slots: dict[str, _Slot]):
        self.slots = slots
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.misshapen: list[str] = []
        self.count = 0
        self.bytes = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.count += 1
        self.bytes += tensor.numel() * tensor.element_size()
        slot = self.slots.get(name)
        if slot is None:
            self.unexpected.append(name)
            return
        current = slot.current()
        if tuple(current.shape) != tuple(tensor.shape):
            if slot.is_buffer and not current.is_meta:
                # Derived from the engine's settings at init (e.g. a rotary cache): the
                # module's own value is right for this engine.
                self.loaded.update(slot.aliases)
                return
            self.misshapen.append(
                f"{name} (file {tuple(tensor.shape)}, model {tuple(current.shape)})"
            )
            return
        self.loaded.update(slot.aliases)
        if (
            tensor.is_floating_point()
            and current.is_floating_point()
            and tensor.dtype != current.dtype
        ):
            tensor = tensor.to(current.dtype)
        slot.replace(tensor)

    def check(self, uri: str, model: str, *, strict: bool, hint: str = "") -> None:
        """Raises ModelMismatchError naming what did not match (`strict`; the first few
        names of each kind, and how many), then `hint`; or what is still on meta
        (always)."""
        misshapen = {entry.split(" ", 1)[0] for entry in self.misshapen}
        still_meta = sorted(
            name
            for name, slot in self.slots.items()
            if slot.current().is_meta and name not in self.loaded and name not in misshapen
        )
        if strict and (self.unexpected or self.misshapen or still_meta):
            problems = []
            if still_meta:
                problems.append(f"missing from the file: {_listed(still_meta)}")
            if self.unexpected:
                problems.append(f"not in the model: {_listed(self.unexpected)}")
            if self.misshapen:
                problems.append(f"wrong shape: {_listed(self.misshapen)}")
            raise ModelMismatchError(
                f"{uri} does not match the model being loaded ({model}): "
                + "; ".join(problems)
                + hint
            )
        if still_meta:
            raise ModelMismatchError(
                f"after loading {uri}, these tensors are still on the meta device (not "
                f"loaded): {_listed(still_meta)}{hint}"
            )


class _Slot:
    """Every (module, attribute) place where one parameter or buffer object is held."""

    def __init__(self, is_buffer: bool):
        self.is_buffer = is_buffer
        self.places: list[tuple[torch.nn.Module, str]] = []
        self.aliases: list[str] = []

    def current(self) -> torch.Tensor:
        owner, attr = self.places[0]
        tensor = (owner._buffers if self.is_buffer else owner._parameters)[attr]
        assert tensor is not None  # slots are made of set tensors only
        return tensor

    def replace(self, tensor: torch.Tensor) -> None:
        """Put `tensor` in the slot, in the same tensor object where torch allows it.

        vLLM's layers hand their parameters to other objects as they are built (gpt-oss's
        attention gives its ``sinks`` to the attention backend, which keeps it): a new
        object in the module's table would leave those holding the meta tensor, and the
        model computing with it, silently (gpt-oss serialized: other tokens). The slot's
        object takes the new contents (`torch.utils.swap_tensors`); where torch refuses
        (the object has views or weak references), a new object goes in its places and
        `meta_references` finds a holder left on meta."""
        old = self.current()
        if self.is_buffer:
            new: torch.Tensor = tensor
        else:
            new = torch.nn.Parameter(tensor, requires_grad=False)
            # vLLM hangs loader hooks and sharding facts on its parameters.
            for key, value in vars(old).items():
                if key not in vars(new):
                    setattr(new, key, value)
        try:
            torch.utils.swap_tensors(old, new)  # `old` now holds `tensor` (and attributes)
            return
        except RuntimeError:
            pass
        for owner, attr in self.places:
            if self.is_buffer:
                owner._buffers[attr] = new
            else:
                owner._parameters[attr] = new  # type: ignore[assignment]  # a Parameter


def _tensor_slots(module: torch.nn.Module) -> dict[str, _Slot]:
    """Map every name (tied aliases included) of every parameter and buffer to its slot."""
    by_identity: dict[int, _Slot] = {}
    slots: dict[str, _Slot] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table, is_buffer in ((owner._parameters, False), (owner._buffers, True)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                slot = by_identity.setdefault(id(tensor), _Slot(is_buffer))
                if (owner, attr) not in [(o, a) for o, a in slot.places]:
                    slot.places.append((owner, attr))
                name = f"{prefix}.{attr}" if prefix else attr
                if name not in slots:
                    slot.aliases.append(name)
                    slots[name] = slot
    return slots


def meta_references(module: torch.nn.Module) -> list[str]:
    """Where a tensor still on the meta device is held outside the module's parameter and
    buffer tables, after a load into a module built with `meta_parameters`: an attribute of
    a submodule (``layers.0.attn.cache``) or of an object a submodule holds
    (``layers.0.attn.impl.sinks``: vLLM's attention backend keeps its layer's sinks).
    A model computing with one gives wrong outputs without an error; the loader refuses it.
    """
    found = []
    for prefix, owner in module.named_modules():
        tables = (owner._parameters, owner._buffers, owner._modules)
        for attr, value in vars(owner).items():
            if attr.startswith("__") or any(attr in table for table in tables):
                continue
            where = f"{prefix}.{attr}" if prefix else attr
            found += _meta_in(value, where, depth=1)
    return found


def _meta_in(value: object, where: str, *, depth: int) -> list[str]:
    if isinstance(value, torch.Tensor):
        return [where] if value.is_meta else []
    if isinstance(value, (list, tuple)):
        return [w for i, v in enumerate(value) for w in _meta_in(v, f"{where}[{i}]", depth=0)]
    if depth and not isinstance(value, (torch.nn.Module, type)) and hasattr(value, "__dict__"):
        return [
            w
            for attr, v in vars(value).items()
            if not attr.startswith("__")
            for w in _meta_in(v, f"{where}.{attr}", depth=depth - 1)
        ]
    return []
