"""Runs vLLM's own (built-in) tensorizer code outside an engine, in its own process, for
the tests of interchangeability (test_vllm_builtin.py).

Started with ``VLLM_PLUGINS=""`` so that this package's plug-in is not loaded: what runs is
stock vLLM 0.32. The JSON spec comes on stdin (keys stay out of process arguments):

    {"mode": "load" | "serialize", "model": DIR, "checkpoint": DIR, "dtype": "bfloat16",
     "tensorizer_config": {<vLLM TensorizerConfig fields>},
     "tp": 1, "rank": 0, "init_method": "tcp://127.0.0.1:PORT"}

* ``load``: vLLM's `TensorizerLoader.load_model` (the built-in ``load_format="tensorizer"``)
  of the serialized ``model`` directory, and vLLM's `DefaultModelLoader` on the original
  ``checkpoint``, in this rank; prints how every parameter compares.
* ``ours``: this package's `serialize_vllm_model`, `init_tensorizer_model` and
  `deserialize_tensorizer_model` (vLLM's names and signatures) round-trip the checkpoint.
* ``serialize``: the checkpoint loaded by `DefaultModelLoader` without the backend's weight
  post-processing (what a GPU worker holds: on the CPU backend post-processing empties the
  linear weights, see FIELD-NOTES), then written by vLLM's `serialize_vllm_model`.

The last line of stdout is ``RESULT {...}``.

Stand-ins, each for something that cannot run here:
* ``torch.accelerator.current_device_index`` returns 0: vLLM's loader asks for the
  accelerator's index, and this machine has none (FIELD-NOTES).
* ``serialize_extra_artifacts`` is skipped: vLLM's serializer downloads the config and
  tokenizer from the Hub, which cannot be reached (the test copies them itself).
"""

import json
import os
import sys


def engine_config(spec, model, load_format="auto", extra=None):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=model,
        dtype=spec.get("dtype", "bfloat16"),
        max_model_len=256,
        enforce_eager=True,
        tensor_parallel_size=spec.get("tp", 1),
        load_format=load_format,
        model_loader_extra_config=dict(extra or {}),
    ).create_engine_config()


def join_ranks(spec, vllm_config):
    """This process as rank `rank` of `tp` (gloo, as vLLM's CPU workers)."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    rank, tp = spec.get("rank", 0), spec.get("tp", 1)
    # vLLM's CPU worker names its shared-memory groups after the rendezvous port
    os.environ["VLLM_DIST_IDENT"] = spec["init_method"].split(":")[-1]
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=tp,
            rank=rank,
            local_rank=rank,
            backend="gloo",
            distributed_init_method=spec["init_method"],
        )
        initialize_model_parallel(tp, 1)
    torch.accelerator.current_device_index = lambda: 0  # no accelerator here (see above)


def default_loaded(vllm_config):
    """The checkpoint as vLLM's default loader loads it, before post-processing."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_config = vllm_config.model_config
    # A second model in this process: its attention layers register under the same names.
    vllm_config.compilation_config.static_forward_context.clear()
    with (
        set_current_vllm_config(vllm_config),
        set_default_torch_dtype(model_config.dtype),
        torch.device("cpu"),
    ):
        model = initialize_model(vllm_config=vllm_config, model_config=model_config)
        DefaultModelLoader(LoadConfig(load_format="auto")).load_weights(model, model_config)
    return model


def load(spec):
    import torch
    from vllm.model_executor.model_loader import get_model_loader

    vllm_config = engine_config(spec, spec["model"], "tensorizer", spec.get("tensorizer_config"))
    join_ranks(spec, vllm_config)
    loader = get_model_loader(vllm_config.load_config)
    loaded = loader.load_model(vllm_config=vllm_config, model_config=vllm_config.model_config)
    reference = dict(default_loaded(engine_config(spec, spec["checkpoint"])).named_parameters())
    params = dict(loaded.named_parameters())
    return {
        "loader": f"{type(loader).__module__}.{type(loader).__name__}",
        "compared": sorted(set(params) & set(reference)),
        "missing": sorted(set(reference) - set(params)),
        "extra": sorted(set(params) - set(reference)),
        "different": sorted(
            n
            for n in set(params) & set(reference)
            if params[n].dtype != reference[n].dtype
            or not torch.equal(params[n].detach().cpu(), reference[n].detach())
        ),
        "buffers": sorted(n for n, _ in loaded.named_buffers()),
        "has_marker": hasattr(loaded, "vllm_tensorized_marker"),
    }


def serialize(spec):
    import vllm.model_executor.model_loader.tensorizer as builtin

    vllm_config = engine_config(spec, spec["model"])
    join_ranks(spec, vllm_config)
    model = default_loaded(vllm_config)
    builtin.serialize_extra_artifacts = lambda *args, **kwargs: None  # the Hub (see above)
    config = builtin.TensorizerConfig(**spec["tensorizer_config"])
    builtin.serialize_vllm_model(model, config, vllm_config.model_config)
    return {"written": config.tensorizer_uri}


def ours(spec):
    """This package's `serialize_vllm_model`, then its `init_tensorizer_model` and
    `deserialize_tensorizer_model` (vLLM's signatures), against the default loader."""
    import torch

    from tensorize_vllm_model import (
        deserialize_tensorizer_model,
        init_tensorizer_model,
        serialize_vllm_model,
    )

    vllm_config = engine_config(spec, spec["model"])
    join_ranks(spec, vllm_config)
    reference = default_loaded(vllm_config)
    config = dict(spec["tensorizer_config"])
    returned = serialize_vllm_model(reference, config, vllm_config.model_config)
    vllm_config.compilation_config.static_forward_context.clear()
    model = init_tensorizer_model(config, vllm_config)
    on_meta = sorted(n for n, p in model.named_parameters() if p.device.type == "meta")
    deserialize_tensorizer_model(model, config)
    params, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    return {
        "returned_model": returned is reference,
        "on_meta_before": len(on_meta),
        "parameters": len(expected),
        "same_names": sorted(params) == sorted(expected),
        "different": sorted(
            n
            for n in expected
            if n in params and not torch.equal(params[n].detach(), expected[n].detach())
        ),
    }


MODES = {"load": load, "serialize": serialize, "ours": ours}


def main() -> None:
    spec = json.load(sys.stdin)
    result = MODES[spec["mode"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
