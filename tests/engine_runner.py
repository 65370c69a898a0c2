"""Runs one vLLM engine for a test, in its own process, and prints what it generated.

The test passes a JSON spec on stdin (never on the command line, so keys and credentials
stay out of process arguments):

    {"llm": {<LLM keyword arguments>}, "prompts": [...], "max_tokens": 16, "stats": true}

The last line of stdout is ``RESULT {"texts": [...], "tokens": [[...]], "stats": [...]}``.

``"lora": {"name": N, "path": P}`` generates with a LoRARequest for a PEFT directory;
``"tensorized_lora": {"model": M, "name": N, "config": {...}}`` with
`tensorize_vllm_model.tensorized_lora_request` (then ``"base_tokens"`` holds the tokens
without the adapter too). ``"stats": true`` adds each worker's load figures and the byte ranges it read of a
converted file (``"read_plan"``). ``"config_object": true`` passes ``model_loader_extra_config`` to `LLM` as a
`tensorize_vllm_model.TensorizerConfig` instead of a dict. A spec of the form
``{"serialize": {"engine": {<EngineArgs>}, "config": {<TensorizerConfig>}}}`` serializes
through the Python API (`tensorize_vllm_model`) instead and prints what was written.
``"progress": {"MIN_BYTES": 0, "LOG_EVERY": 0}`` sets those figures of
`tensorize_vllm_model.core.progress` first (with the engine in this process, the worker's too).
"""

import json
import sys


def main() -> None:
    spec = json.load(sys.stdin)
    if "progress" in spec:
        from tensorize_vllm_model.core import progress

        for name, value in spec["progress"].items():
            setattr(progress, name, value)
    from vllm import LLM, EngineArgs, SamplingParams

    from tensorize_vllm_model import TensorizerConfig, tensorize_vllm_model

    if "serialize" in spec:
        written = tensorize_vllm_model(
            EngineArgs(**spec["serialize"]["engine"]),
            TensorizerConfig(**spec["serialize"]["config"]),
        )
        print(
            "RESULT "
            + json.dumps(
                {
                    "files": written.files,
                    "directory": written.directory,
                    "tensors": written.tensors,
                    "bytes": written.bytes,
                }
            )
        )
        return
    kwargs = dict(spec["llm"])
    if spec.get("config_object"):
        kwargs["model_loader_extra_config"] = TensorizerConfig(
            **kwargs["model_loader_extra_config"]
        )
    llm = LLM(**kwargs)
    result = {}
    if spec.get("stats"):
        result["stats"] = llm.collective_rpc("tensorize_vllm_model_load_stats")
        result["read_plan"] = llm.collective_rpc("tensorize_vllm_model_read_plan")
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16))
    lora_request = None
    if "lora" in spec:
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest(spec["lora"]["name"], 1, spec["lora"]["path"])
    elif "tensorized_lora" in spec:
        from tensorize_vllm_model import tensorized_lora_request

        lora = spec["tensorized_lora"]
        lora_request = tensorized_lora_request(
            lora["model"], lora["name"], tensorizer_config=lora.get("config")
        )
    if lora_request is not None:
        base = llm.generate(spec["prompts"], params)
        result["base_tokens"] = [list(o.outputs[0].token_ids) for o in base]
    outputs = (
        llm.generate(  # no prompts: only load (see test_vllm_parallel's PP=2 test)
            spec["prompts"], params, lora_request=lora_request
        )
        if spec["prompts"]
        else []
    )
    result["texts"] = [o.outputs[0].text for o in outputs]
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    print("RESULT " + json.dumps(result), flush=True)
    llm.llm_engine.engine_core.shutdown()  # sooner than waiting for the interpreter's exit


if __name__ == "__main__":
    main()
