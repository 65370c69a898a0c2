"""The LoRA resolver of ``vllm serve gs://...`` (no engine): vLLM asks resolvers with its
engine's model path, which for a remote model is the local copy of the model's config
(`registration.resolve_remote_model`), not the served name; the adapter must still be found
in the remote directory's ``lora/``. Found by tests/e2e/test_vllm_cloud_uris.py's ``vllm
serve`` (HTTP 404 "LoRA adapter ... does not exist" before the fix). Real fake-gcs-server,
real `convert` and `lora.stage_adapter`, vLLM's own `EngineArgs` and resolver registry."""

from __future__ import annotations

import asyncio
import os
import uuid

from demo_models import build_lora_adapter

from tests.support import BUCKET


def test_resolver_finds_the_adapter_of_a_remote_served_model(
    fake_gcs, tiny_llama, tmp_path, monkeypatch
):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.resolver import LoRAResolverRegistry

    from tensorize_vllm_model import storage
    from tensorize_vllm_model.artifacts.lora import stage_adapter
    from tensorize_vllm_model.convert import convert_checkpoint
    from tensorize_vllm_model.integrations.vllm import registration

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.endpoint)
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    written = convert_checkpoint(str(tiny_llama), f"gs://{BUCKET}/{uuid.uuid4().hex}", suffix="v1")
    model = written.directory
    adapter = build_lora_adapter(tmp_path / "adapter-a", tiny_llama)
    with storage.transaction() as tx:
        stage_adapter(tx, "adapter-a", str(adapter), model)

    registration.register()
    args = EngineArgs(model=model, load_format="tensorizer")
    registration.resolve_remote_model(args)  # as vLLM's create_engine_config runs them
    registration.check_engine_files(args)
    assert args.model != model and storage.local_path(args.model) is not None

    resolver = LoRAResolverRegistry.get_resolver("tensorize_vllm_model")
    request = asyncio.run(resolver.resolve_lora(args.model, "adapter-a"))  # vLLM's call
    assert request is not None and request.lora_name == "adapter-a"
    assert os.path.exists(f"{request.lora_path}/adapter_model.safetensors")
    assert asyncio.run(resolver.resolve_lora(args.model, "not-there")) is None
