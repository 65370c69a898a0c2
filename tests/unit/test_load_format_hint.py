"""A converted directory given to vLLM's default loader (no ``load_format="tensorizer"``)
is refused, before any engine starts, with the flag to give, instead of vLLM's bare "Cannot
find any model weights"; a model directory with Hugging Face weights goes on to vLLM. The
plug-in's hook on vLLM's real ``EngineArgs.create_engine_config`` is what runs; no engine."""

from __future__ import annotations

import pytest

from tensorize_vllm_model.cli import main
from tensorize_vllm_model.core.errors import ConfigError


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("hint")
    assert main(["--model", str(tiny_llama), "convert", "--serialized-directory", str(out),
                 "--suffix", "v1"]) == 0  # fmt: skip
    return out / "vllm" / "tiny-llama" / "v1"


def test_default_loader_on_a_converted_directory_names_the_load_format(converted):
    from vllm.engine.arg_utils import EngineArgs

    from tensorize_vllm_model.integrations.vllm.registration import register

    register()
    with pytest.raises(ConfigError, match=r'holds tensorized weights.*load_format="tensorizer"'):
        EngineArgs(model=str(converted)).create_engine_config()


def test_a_model_with_its_weights_is_left_to_vllm(tiny_llama, converted):
    from vllm.engine.arg_utils import EngineArgs

    from tensorize_vllm_model.integrations.vllm.registration import check_not_converted

    check_not_converted(EngineArgs(model=str(tiny_llama)))  # safetensors: vLLM's to load
    check_not_converted(EngineArgs(model=str(converted), load_format="dummy"))
