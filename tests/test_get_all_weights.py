"""vLLM 0.34's ``BaseModelLoader.get_all_weights`` (its in-place reload and expert reload
call it) on this package's loader, without an engine: a converted file gives the
checkpoint's tensors by checkpoint name, column tiles put back; a Hugging Face model's
file gives its tensors, its buffers left out."""

from __future__ import annotations

import torch
from conftest import write_hf_tensors
from safetensors.torch import load_file
from test_convert import converted  # noqa: F401 - the module-scoped converted tiny Llama
from vllm.config.load import LoadConfig

from tensorize_vllm_model.vllm_integration.loader import TensorizerLoader


def all_weights(uri: str) -> dict[str, torch.Tensor]:
    loader = TensorizerLoader(
        LoadConfig(load_format="tensorizer", model_loader_extra_config={"tensorizer_uri": uri})
    )
    return dict(loader.get_all_weights(None, None))  # type: ignore[arg-type]


def test_a_converted_file_gives_the_checkpoint(converted, tiny_llama):  # noqa: F811
    want = load_file(str(tiny_llama / "model.safetensors"))
    got = all_weights(str(converted / "model.tensors"))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # fresh tensors (vLLM 0.34's pooling adapters keep what a loader yields)
    pointers = [t.untyped_storage().data_ptr() for t in got.values()]
    assert len(set(pointers)) == len(pointers)


def test_a_hugging_face_models_file_leaves_out_buffers(tiny_llama, tmp_path):
    path = tmp_path / "hf.tensors"
    write_hf_tensors(tiny_llama, path, "bfloat16")
    want = load_file(str(tiny_llama / "model.safetensors"))
    got = all_weights(str(path))
    assert not [n for n in got if "inv_freq" in n]
    assert set(want) <= set(got)
    assert all(torch.equal(got[n], want[n]) for n in want)
