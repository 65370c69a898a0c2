"""The guard of a converted load (`convert.guard`), without an engine: weight loaders that
copy a checkpoint tensor through a view other than its stored order (GPT-2's transposed
``Conv1D`` weights, strided or permuted views) get what vLLM's default loader would give,
and a parameter that does not is refused by name.

Each test runs what the vLLM loader runs (`integrations.vllm.loader._load_converted`): the
loader's copy on meta tensors under `CopyWatch`, the read plan, the read with the real
tensors handed back to the same copy, then `check_loaded`; the "weight loader" is the one
line vLLM's model code would run, on the tiny Llama's converted file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tensorize_vllm_model import TensorizerConfig, open_tensors
from tensorize_vllm_model.convert import convert_checkpoint, loading
from tensorize_vllm_model.convert.guard import check_loaded, direct_copy_ok, stored_index
from tensorize_vllm_model.convert.regions import CopyWatch, View
from tensorize_vllm_model.core.errors import ModelMismatchError
from tensorize_vllm_model.read.parts import PartsRead


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    """The tiny Llama converted (in this process: under a second)."""
    out = tmp_path_factory.mktemp("converted")
    return Path(convert_checkpoint(str(tiny_llama), str(out), suffix="v1").directory)


UNTILED = "model.layers.0.self_attn.q_proj.weight"  # [256, 256], stored as in the checkpoint
TILED = "model.layers.1.self_attn.o_proj.weight"  # [256, 256], stored in 8 column tiles


def load(converted, name, parameter, view_of, weight_loader=None):
    """The loader's three steps for one tensor copied as ``parameter.copy_(view_of(w))``
    (or by ``weight_loader(parameter, w)``) into the parameter ``proj`` of a module;
    returns (module, the read plan's part, how many elements the guard compared with the
    file)."""
    if weight_loader is None:

        def weight_loader(param, w):
            param.data.copy_(view_of(w))

    module = nn.Module()
    module.register_parameter("proj", nn.Parameter(parameter, requires_grad=False))
    path = str(converted / "model.tensors")
    with open_tensors(path) as reader:
        file = loading.ConvertedFile(reader, path, TensorizerConfig(tensorizer_uri=path), 2)
        watch = CopyWatch()
        with watch:
            meta = watch.meta_input(name, file.logical_shape(name), torch.bfloat16)
            weight_loader(module.proj, meta)
        owners = {p.untyped_storage().data_ptr() for p in module.parameters()}
        [part] = file.parts(watch.needs, owners)
        for _, tensor in file.tensors([part], PartsRead()):
            weight_loader(module.proj, tensor)
        try:
            compared = check_loaded(watch.results(), module, file.element_reader(), file.tiles)
        finally:
            file.close_element_reader()
    return module, part, compared


# view -> (the loader's view, whether it may go straight into the parameter: untiled, tiled)
VIEWS = {
    "transposed (GPT-2 Conv1D)": (lambda w: w.t(), (False, False)),
    "rows 0-127 transposed": (lambda w: w[:128].t(), (False, False)),
    "every other row": (lambda w: w[::2], (False, False)),
    "flattened": (lambda w: w.reshape(-1), (False, False)),
    "rows 128-255": (lambda w: w[128:], (True, False)),
    "column block": (lambda w: w.narrow(1, 128, 128), (False, True)),
}


@pytest.mark.parametrize("name", [UNTILED, TILED], ids=["untiled", "tiled"])
@pytest.mark.parametrize("view", list(VIEWS), ids=list(VIEWS))
def test_every_view_a_loader_copies_gives_the_default_loaders_values(converted, name, view):
    original = open_original(converted, name)
    view_of, direct = VIEWS[view]
    parameter = torch.empty_like(view_of(original).contiguous())
    module, part, compared = load(converted, name, parameter, view_of)
    assert torch.equal(module.proj, view_of(original))
    # sampled against the file, but for a view that is no box of the tensor: that tensor is
    # read whole and put in by the loader's own code
    assert compared > 0 or view == "flattened"
    assert bool(part.targets) == direct[name == TILED]  # straight in only in the file's order


def open_original(converted, name):
    """The checkpoint tensor, read back from the converted file as the checkpoint had it."""
    with open_tensors(str(converted / "model.tensors")) as reader:
        tensors = dict(reader.items())
    stored = tensors[name]
    if stored.dim() == 3:  # column tiles [T, out, in / T] -> [out, in]
        return torch.cat(list(stored), dim=1)
    return stored


def test_a_copy_into_a_loaders_scratch_tensor_is_left_to_the_loader(converted):
    """A loader that copies into a scratch tensor and then works on it (here: doubles it
    into the parameter) gets the real tensor: the bytes never go straight into the scratch,
    whose work the meta pass already ran on its old contents."""
    original = open_original(converted, UNTILED)

    def loader(w):
        scratch = torch.empty(w.shape, dtype=w.dtype)
        scratch.copy_(w)
        return scratch * 2

    module, part, _ = load(converted, UNTILED, torch.empty_like(original), loader)
    assert not part.targets
    assert torch.equal(module.proj, original * 2)


def test_a_tensor_changed_in_place_before_its_copy_is_left_to_the_loader(converted):
    """vLLM's gpt-oss zeroes ``w2_bias`` in place on every TP rank but 0, then copies it:
    the file's bytes must not go straight in (found by benchmarks/families_weights.py: TP=2
    rank 1 held the bias, the default loader zeros)."""
    original = open_original(converted, UNTILED)

    def loader(w):
        w.zero_()
        return w

    module, part, _ = load(converted, UNTILED, torch.empty_like(original), loader)
    assert not part.targets
    assert not module.proj.any()


def composed(fn):
    """vLLM's ``composed_weight_loader(default_weight_loader, fn)`` (weight_utils), its two
    lines: copy the checkpoint tensor, then rewrite the parameter in place from itself."""

    def loader(param, w):
        param.data.copy_(w)
        param.data.copy_(fn(param))

    return loader


REWRITES = {  # the kind of Mamba2's ``A`` (``-exp(A_log)``): written again after the copy
    "copy from a computed tensor (Mamba2's A)": composed(lambda x: -torch.exp(x.float())),
    "in-place op after the copy": lambda p, w: (p.data.copy_(w), p.data.mul_(3)),
    "out= op into the parameter": lambda p, w: (
        p.data.copy_(w),
        torch.neg(p.data.clone(), out=p.data),
    ),
    "second copy onto the first's bytes": lambda p, w: (
        p.data[:128].copy_(w[:128]),
        p.data[64:].copy_(w[128:]),
    ),
}


@pytest.mark.parametrize("rewrite", list(REWRITES), ids=list(REWRITES))
def test_a_parameter_written_again_after_its_copy_is_left_to_the_loader(converted, rewrite):
    """A weight loader that writes the parameter again after copying the file's bytes into
    it: vLLM's own loader runs on the real tensor (no bytes straight in), and the parameter
    holds what it gives. Before: the bytes went straight in, the rewrite never ran, and the
    guard compared the parameter with that first copy and agreed (a converted Mamba2 loaded
    ``A_log`` as ``A`` silently)."""
    name = "model.norm.weight"  # [256]
    weight_loader = REWRITES[rewrite]
    original = open_original(converted, name)
    expected = torch.empty(192 if rewrite.startswith("second") else 256, dtype=original.dtype)
    weight_loader(expected, original)
    module, part, _ = load(converted, name, torch.empty_like(expected), None, weight_loader)
    assert not part.targets
    assert torch.equal(module.proj, expected)


def test_writes_beside_a_copy_keep_the_direct_path(converted):
    """vLLM's padded vocabulary: the rows past the checkpoint's are zeroed after the copy,
    on bytes the copy did not write; the copy still goes straight in."""
    original = open_original(converted, UNTILED)
    parameter = torch.empty(384, 256, dtype=torch.bfloat16)

    def padded(param, w):
        param[: w.shape[0]].data.copy_(w)
        param[w.shape[0] :].data.fill_(0)

    module, part, compared = load(converted, UNTILED, parameter, None, padded)
    assert part.targets and compared > 0
    assert torch.equal(module.proj[:256], original) and not module.proj[256:].any()


def test_a_parameter_that_misses_its_values_is_refused_by_name(converted, monkeypatch):
    """The guard's last line: with the order check switched off (the behaviour before it:
    a transposed view's bytes put straight into the parameter in file order), the load is
    refused naming the parameter and the tensor."""
    monkeypatch.setattr(loading, "direct_copy_ok", lambda *args: True)
    parameter = torch.empty(256, 256, dtype=torch.bfloat16)
    with pytest.raises(ModelMismatchError, match=rf"parameter proj .*from tensor {UNTILED}"):
        load(converted, UNTILED, parameter, lambda w: w.t())


def test_direct_copy_ok_and_stored_index():
    dest = torch.empty(4, 6)
    assert direct_copy_ok(View(12, (4, 6), (6, 1)), (8, 6), dest, 12, 0)
    assert not direct_copy_ok(View(0, (4, 6), (1, 4)), (6, 4), dest, 0, 0)  # transposed
    assert not direct_copy_ok(View(0, (4, 6), (12, 1)), (8, 12), dest, 0, 0)  # strided rows
    assert not direct_copy_ok(View(0, (1, 6), (6, 1)), (8, 6), dest, 0, 0)  # broadcast
    assert direct_copy_ok(View(3, (4, 3), (12, 1)), (4, 12), torch.empty(4, 3), 3, 4)
    assert not direct_copy_ok(View(3, (4, 3), (1, 4)), (4, 12), torch.empty(4, 3), 3, 4)
    # [2, 8] in 4 column tiles of width 2: element (1, 5) is tile 2, row 1, column 1
    assert stored_index(1 * 8 + 5, (2, 8), 4) == 2 * 4 + 1 * 2 + 1
    assert stored_index(13, (2, 8), 0) == 13


def test_check_loaded_names_the_parameter_without_a_file():
    """check_loaded against a reader that gives other values: the parameter's name, the
    tensor's and the element are in the message."""
    watch = CopyWatch()
    module = nn.Module()
    module.register_parameter("w", nn.Parameter(torch.zeros(3, 2), requires_grad=False))
    with watch:
        module.w.data.copy_(watch.meta_input("ckpt.w", (2, 3), torch.float32).t())
    assert check_loaded(watch.results(), module, lambda name, i: torch.tensor(0.0), {}) > 0
    with pytest.raises(ModelMismatchError, match=r"parameter w .* tensor ckpt\.w"):
        check_loaded(watch.results(), module, lambda name, i: torch.tensor(float(i)), {})
    assert check_loaded(watch.results(), module, None, {}) == 0  # nothing to re-read


def test_interleaved_copies_into_one_parameter_are_told_apart():
    """Fused experts' gate and up halves (``w13[:, :I]`` and ``w13[:, I:]``: strided views
    whose byte spans interleave) do not meet: each may still go straight in; a copy onto
    some of the same elements does."""
    watch = CopyWatch()
    w13 = torch.zeros(4, 6, 8)
    with watch:
        gate = watch.meta_input("gate", (4, 3, 8), torch.float32)
        up = watch.meta_input("up", (4, 3, 8), torch.float32)
        w13[:, :3].copy_(gate)
        w13[:, 3:].copy_(up)
    assert not watch.needs["gate"].whole and not watch.needs["up"].whole
    with watch:
        again = watch.meta_input("again", (4, 2, 8), torch.float32)
        w13[:, 2:4].copy_(again)
    assert all(watch.needs[n].whole for n in ("gate", "up", "again"))


def test_a_computed_copy_onto_another_tensors_copy_leaves_both_to_the_loader():
    watch = CopyWatch()
    parameter = torch.zeros(4, 8)
    with watch:
        first = watch.meta_input("first", (4, 8), torch.float32)
        parameter.copy_(first)
        second = watch.meta_input("second", (4, 8), torch.float32)
        parameter[2:].copy_(second[2:] * 2)
    assert watch.needs["first"].whole and watch.needs["second"].whole
