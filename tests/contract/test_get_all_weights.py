"""vLLM 0.34's ``BaseModelLoader.get_all_weights`` (its in-place reload and expert reload
call it) on this package's loader, without an engine: a converted file gives the
checkpoint's tensors by checkpoint name, column tiles put back; a Hugging Face model's
file gives its tensors, its buffers left out."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from vllm.config.load import LoadConfig

from tensorize_vllm_model.convert import convert_checkpoint
from tensorize_vllm_model.integrations.vllm.loader import TensorizerLoader


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    """The tiny Llama converted (in this process: under a second)."""
    out = tmp_path_factory.mktemp("converted")
    return Path(convert_checkpoint(str(tiny_llama), str(out), suffix="v1").directory)


def all_weights(uri: str) -> dict[str, torch.Tensor]:
    loader = TensorizerLoader(
        LoadConfig(load_format="tensorizer", model_loader_extra_config={"tensorizer_uri": uri})
    )
    return dict(loader.get_all_weights(None, None))  # type: ignore[arg-type]


def test_a_converted_file_gives_the_checkpoint(converted, tiny_llama):
    want = load_file(str(tiny_llama / "model.safetensors"))
    got = all_weights(str(converted / "model.tensors"))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # fresh tensors (vLLM 0.34's pooling adapters keep what a loader yields)
    pointers = [t.untyped_storage().data_ptr() for t in got.values()]
    assert len(set(pointers)) == len(pointers)


def test_a_hugging_face_models_file_leaves_out_buffers(tiny_llama, tmp_path):
    import transformers
    from tensorizer import TensorSerializer

    path = tmp_path / "hf.tensors"  # as a user writes a transformers model with tensorizer
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    serializer = TensorSerializer(str(path))
    serializer.write_module(model)
    serializer.close()
    want = load_file(str(tiny_llama / "model.safetensors"))
    got = all_weights(str(path))
    assert not [n for n in got if "inv_freq" in n]
    assert set(want) <= set(got)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_model_config_naming_another_model_reads_that_models_tensors(
    converted, tiny_llama, tiny_opt, tmp_path
):
    """vLLM 0.34's ``reload_weights(weights_path=NEW)`` sets ``model_config.model = NEW``
    and calls ``get_all_weights``: NEW's tensors come back, as from vLLM's default loader
    (before: those of the directory the engine started with). The engine's own model, or a
    directory without tensors (the local copy of a remote model's config), keeps the
    loader's file."""
    other = Path(convert_checkpoint(str(tiny_opt), str(tmp_path), suffix="v1").directory)
    loader = TensorizerLoader(
        LoadConfig(
            load_format="tensorizer",
            model_loader_extra_config={"tensorizer_dir": str(converted)},
        )
    )

    def names(model: str | None) -> set[str]:
        config = None if model is None else SimpleNamespace(model=model, revision=None)
        return {name for name, _ in loader.get_all_weights(config, None)}  # type: ignore[arg-type]

    llama, opt = (
        set(load_file(str(tiny_llama / "model.safetensors"))),
        set(load_file(str(tiny_opt / "model.safetensors"))),
    )
    assert names(str(other)) == opt
    assert names(str(other) + "/") == opt
    assert names(None) == llama
    assert names(str(converted)) == llama
    assert names(str(tiny_llama.parent / "no-such-model")) == llama
    (tmp_path / "config-only").mkdir()
    assert names(str(tmp_path / "config-only")) == llama
