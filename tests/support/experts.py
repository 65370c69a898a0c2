"""What vLLM's fused-MoE weight loader does with one unquantized expert tensor of a checkpoint
(``<layer>.experts.<e>.<gate_proj|up_proj|down_proj>.weight``), for the engine-free expert
tests: narrow it to the TP rank's share and copy it into the expert's slot of the layer's
stacked ``w13`` (gate, then up) or ``w2``; another expert-parallel rank's expert is skipped."""

from __future__ import annotations

import torch

__all__ = ["load_expert"]


def load_expert(
    w13: torch.Tensor,
    w2: torch.Tensor,
    slots: list[int],
    tp: int,
    name: str,
    tensor: torch.Tensor,
) -> None:
    """Copy checkpoint tensor `name` into `w13` ``[local experts, 2 * share, hidden]`` or `w2`
    ``[local experts, hidden, share]`` of TP rank `tp`; `slots`: global expert -> local slot
    (-1: another rank's)."""
    expert, rest = int(name.split(".")[5]), name.split(".", 6)[6]
    slot = slots[expert]
    if slot < 0:
        return
    share = w2.shape[-1]
    lo = tp * share
    if rest == "down_proj.weight":
        w2[slot].copy_(tensor.narrow(1, lo, share))
        return
    half = 0 if rest == "gate_proj.weight" else share
    w13[slot].narrow(0, half, share).copy_(tensor.narrow(0, lo, share))
