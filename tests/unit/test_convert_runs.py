"""Runs of derived experts read and checked as a whole (`convert.runs`), without an engine:
on a converted Qwen3-MoE skeleton (one tensor per expert projection, ``down_proj`` stored in
column tiles), the loader's steps (meta pass on two experts per layer, `plan_runs`, the
read, `check_runs`) fill a layer's stacked expert weights exactly as the weight loader fed
every checkpoint tensor does: at TP=1, on a TP rank (rows of gate/up, tiles of down's
columns), with expert parallelism; a file that must be read tensor by tensor (hashes
verified) is spelled out and gives the same; a parameter that differs from the file is
refused by name, and a file cut short names the tensor.

The "weight loader" is what vLLM's fused-MoE loader does for one unquantized expert tensor
(narrow to the rank's share, copy into the expert's slot of ``w13_weight`` / ``w2_weight``);
the engine side is tests/e2e/test_vllm_moe.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tensorize_vllm_model import TensorizerConfig, open_tensors
from tensorize_vllm_model.convert import convert_checkpoint
from tensorize_vllm_model.convert.experts import plan_experts
from tensorize_vllm_model.convert.loading import ConvertedFile
from tensorize_vllm_model.convert.regions import CopyWatch
from tensorize_vllm_model.convert.runs import check_runs, plan_runs
from tensorize_vllm_model.core.errors import FormatError, ModelMismatchError
from tensorize_vllm_model.read.parts import PartsRead
from tests.support.experts import load_expert

pytestmark = pytest.mark.unit

LAYERS, EXPERTS, HIDDEN, INTER = 2, 6, 32, 16


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from demo_models import build_moe_skeleton

    model = build_moe_skeleton(
        tmp_path_factory.mktemp("moe") / "qwen3-moe",
        num_layers=LAYERS,
        num_experts=EXPERTS,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
    )
    out = tmp_path_factory.mktemp("converted")
    return convert_checkpoint(str(model), str(out), suffix="v1").tensors_uri


class Experts(nn.Module):
    """One layer's stacked expert weights on one rank: `slots` (global -> local, -1:
    another rank's), TP rank `tp` of `tps`."""

    def __init__(self, slots: list[int], tp: int = 0, tps: int = 1):
        super().__init__()
        local = max(slots) + 1
        self.slots, self.tp, self.share = slots, tp, INTER // tps
        self.w13_weight = nn.Parameter(
            torch.zeros(local, 2 * self.share, HIDDEN, dtype=torch.bfloat16), False
        )
        self.w2_weight = nn.Parameter(
            torch.zeros(local, HIDDEN, self.share, dtype=torch.bfloat16), False
        )

    def load(self, name: str, tensor: torch.Tensor) -> None:
        load_expert(self.w13_weight, self.w2_weight, self.slots, self.tp, name, tensor)


def model_of(slots, tp, tps) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleDict({str(i): Experts(slots, tp, tps) for i in range(LAYERS)})
    return model


def prefix(i: int) -> str:
    return f"model.layers.{i}.mlp.experts"


def experts_of(model: nn.Module, name: str) -> Experts:
    return model.layers[name.split(".")[2]]


def expert_names(file: ConvertedFile) -> list[str]:
    return [n for n in file.entries if ".experts." in n]


def load(path: str, model: nn.Module, config: TensorizerConfig | None = None):
    """The loader's steps (`integrations.vllm.loader._load_converted`) on the experts of
    the file at `path`; returns the runs' reads and how many elements their guard compared."""
    with open_tensors(path) as reader:
        file = ConvertedFile(reader, path, config or TensorizerConfig(tensorizer_uri=path), 2)
        names = expert_names(file)
        slots = {prefix(i): experts_of(model, f"m.l.{i}").slots for i in range(LAYERS)}
        layout = plan_experts(names, slots.get)
        watch = CopyWatch()
        with watch:
            first = [n for n in names if n not in layout.derived | layout.elsewhere]
            for name, meta in file.meta_inputs(watch, first):
                experts_of(model, name).load(name, meta)
            assert layout.derive(watch, file.logical_shape) == []
        file.owners = {p.untyped_storage().data_ptr() for p in model.parameters()}
        reads = plan_runs(file, layout.runs, watch.needs)
        parts = file.parts(watch.needs)
        for name, tensor in file.tensors(parts, PartsRead(), reads):
            experts_of(model, name).load(name, tensor)
        try:
            compared = check_runs(reads, model, file.element_reader())
        finally:
            file.close_element_reader()
    return reads, compared


def reference(path: str, slots, tp, tps) -> nn.Module:
    model = model_of(slots, tp, tps)
    with open_tensors(path) as reader:
        file = ConvertedFile(reader, path, TensorizerConfig(tensorizer_uri=path), 2)
        from tensorize_vllm_model.convert.loading import checkpoint_tensors

        for name, tensor in checkpoint_tensors(reader):
            if name in file.entries and ".experts." in name:
                experts_of(model, name).load(name, tensor)
    return model


LAYOUTS = {
    "TP=1": (list(range(EXPERTS)), 0, 1),
    "TP rank 1 of 2": (list(range(EXPERTS)), 1, 2),
    "expert parallel, experts 2-5": ([-1, -1, 0, 1, 2, 3], 0, 1),
    "expert parallel and TP": ([0, 1, 2, 3, -1, -1], 1, 2),
}
# slots out of order past the first two experts: gate/up still go as runs (in any slot
# order), the tiled down_proj (one copy per run, slots one stride apart) is spelled out
SHUFFLED = ([0, 1, 3, 2, 5, 4], 0, 1)
DESCENDING = ([0, 1, 5, 4, 3, 2], 0, 1)  # one stride apart, but descending


@pytest.mark.parametrize(
    "layout, pieces",
    [*((layout, 3) for layout in LAYOUTS.values()), (SHUFFLED, 2), (DESCENDING, 2)],
    ids=[*LAYOUTS, "slots out of order", "slots descending"],
)
def test_runs_fill_the_experts_as_the_weight_loader_does(converted, layout, pieces):
    slots, tp, tps = layout
    model = model_of(slots, tp, tps)
    reads, compared = load(converted, model)
    local = sum(s >= 0 for s in slots)
    derived = LAYERS * pieces * (local - 2)
    assert len(reads.names) == derived  # derived experts read as part of a run
    assert compared == derived  # and sampled
    expected = reference(converted, slots, tp, tps)
    for got, want in zip(model.parameters(), expected.parameters()):
        assert torch.equal(got, want)


def test_a_file_read_tensor_by_tensor_gives_the_same(converted):
    """verify_hash reads each tensor whole: the runs are spelled out, one Need each."""
    slots, tp, tps = LAYOUTS["TP rank 1 of 2"]
    model = model_of(slots, tp, tps)
    config = TensorizerConfig(tensorizer_uri=converted, verify_hash=True)
    reads, _ = load(converted, model, config)
    assert reads.names == []
    expected = reference(converted, slots, tp, tps)
    for got, want in zip(model.parameters(), expected.parameters()):
        assert torch.equal(got, want)


def test_a_parameter_that_differs_from_the_file_is_refused(converted):
    model = model_of(*LAYOUTS["TP=1"])
    reads, _ = load(converted, model)
    experts_of(model, "m.l.1").w2_weight.data[4].add_(1)
    with open_tensors(converted) as reader:
        file = ConvertedFile(reader, converted, TensorizerConfig(tensorizer_uri=converted), 2)
        with pytest.raises(ModelMismatchError) as e:
            check_runs(reads, model, file.element_reader())
        file.close_element_reader()
    assert "layers.1.w2_weight" in str(e.value)
    assert "model.layers.1.mlp.experts.4.down_proj.weight" in str(e.value)


def test_a_file_cut_short_names_the_tensor(converted, tmp_path):
    """The file ends inside the last run's read (it was cut after its index was checked)."""
    model = model_of(*LAYOUTS["TP=1"])
    copy = tmp_path / "model.tensors"
    copy.write_bytes(open(converted, "rb").read())
    with open_tensors(str(copy)) as reader:
        path = str(copy)
        file = ConvertedFile(reader, path, TensorizerConfig(tensorizer_uri=path), 2)
        names = expert_names(file)
        layout = plan_experts(names, lambda p: list(range(EXPERTS)))
        watch = CopyWatch()
        with watch:
            first = [n for n in names if n not in layout.derived]
            for name, meta in file.meta_inputs(watch, first):
                experts_of(model, name).load(name, meta)
            layout.derive(watch, file.logical_shape)
        file.owners = {p.untyped_storage().data_ptr() for p in model.parameters()}
        reads = plan_runs(file, layout.runs, watch.needs)
        last = reads.names[-1]
        os.truncate(path, int(reads.offsets[-1]) + 10)
        with pytest.raises(FormatError, match=f"truncated: tensor {last} ends past"):
            list(file.tensors([], PartsRead(), reads))
