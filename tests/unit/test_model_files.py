"""The output directory is the whole model (`artifacts`), without an engine: convert and
serialize's staging carry every file of the model directory but the weights (remote code,
chat templates, sentence-transformers modules in sub-directories) and list what they leave
out; the remote cache fetches the same from S3 (moto) and HTTP. What is carried is what
transformers (remote code, ``trust_remote_code=True``) and vLLM (the sentence-transformers
pooling config) read from the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tensorize_vllm_model import storage
from tensorize_vllm_model.artifacts import model_files
from tensorize_vllm_model.artifacts.model_files import MANIFEST, stage_artifacts
from tensorize_vllm_model.artifacts.remote_files import fetch_model_files
from tensorize_vllm_model.cli import main
from tensorize_vllm_model.core.errors import StorageError
from tests.support import BUCKET
from tests.support.places import s3_options
from tests.support.servers import HTTPFileServer

REMOTE_CODE = """from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny"
"""
POOLING = {
    "modules.json": json.dumps(
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Dense",
                "type": "sentence_transformers.models.Dense",
            },
        ]
    ),
    # the projection vLLM's sentence-transformers loader reads from the model directory
    "2_Dense/config.json": json.dumps({"in_features": 256, "out_features": 64}),
    "2_Dense/model.safetensors": "dense weights",
    "1_Pooling/config.json": json.dumps(
        {"word_embedding_dimension": 256, "pooling_mode_mean_tokens": True}
    ),
}
# carried beside the tensors, besides the tiny Llama's own config and tokenizer files
EXTRA = {
    "configuration_tiny.py": REMOTE_CODE,
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "README.md": "# tiny\n",
    "additional_chat_templates/tool_use.jinja": "{{ tools }}",
    **POOLING,
}
NOT_CARRIED = {
    ".git/HEAD": "ref: refs/heads/main\n",
    "compile-cache-rank-000.tar": "a rank's compile cache, read from beside its tensors",
}
TOP_WEIGHTS = {"model.safetensors"}


@pytest.fixture(scope="module")
def whole_model(tiny_llama, tmp_path_factory):
    """The tiny Llama with remote code (``auto_map``), chat templates (one in a
    sub-directory), a README, sentence-transformers pooling and Dense modules and a .git
    directory."""
    model = tmp_path_factory.mktemp("whole") / "tiny-whole"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig"}
    (model / "config.json").write_text(json.dumps(config))
    for name, text in {**EXTRA, **NOT_CARRIED}.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text(text)
    return model


def files_under(directory) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/")
        for root, _, files in os.walk(directory)
        for f in files
    )


def test_convert_carries_everything_but_the_weights(whole_model, tmp_path, capsys):
    assert main(["--model", str(whole_model), "convert", "--serialized-directory",
                 str(tmp_path), "--suffix", "v1"]) == 0  # fmt: skip
    out = tmp_path / "vllm" / "tiny-whole" / "v1"
    source = set(files_under(whole_model)) - {*TOP_WEIGHTS, *NOT_CARRIED}
    assert files_under(out) == sorted(source | {"model.tensors", MANIFEST})
    assert json.loads((out / MANIFEST).read_text())["files"] == sorted(source)
    assert (out / "1_Pooling" / "config.json").read_text() == POOLING["1_Pooling/config.json"]
    assert (out / "2_Dense" / "model.safetensors").read_text() == "dense weights"
    printed = capsys.readouterr().out
    for left in ("model.safetensors (weights)", ".git/ (hidden)"):
        assert f"not carried: {left}" in printed
    assert "not carried: 2_Dense" not in printed

    # what transformers and vLLM read from the converted directory
    from transformers import AutoConfig
    from vllm.transformers_utils.config import get_pooling_config

    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "TinyConfig"
    pooling = get_pooling_config(str(out), revision=None)
    assert pooling is not None and "MEAN" in {str(v).upper() for v in pooling.values()}


def test_staging_into_the_models_own_directory_skips_the_output(whole_model, tmp_path):
    """A serialize whose output is inside the model directory does not copy earlier
    outputs into the new one."""
    model = tmp_path / "model"
    shutil.copytree(whole_model, model)
    earlier = model / "vllm" / "tiny" / "v1"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    with storage.transaction() as tx:
        left = stage_artifacts(tx, [str(model)], str(model / "vllm" / "tiny" / "v2"))
    assert "vllm/ (holds the output directory)" in [str(x) for x in left]
    assert files_under(model / "vllm" / "tiny" / "v2") == sorted(
        set(files_under(whole_model)) - {*TOP_WEIGHTS, *NOT_CARRIED} | {MANIFEST}
    )


def test_s3_cache_fetches_remote_code_and_pooling_modules(whole_model, moto, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    prefix = uuid.uuid4().hex
    client = moto.client()
    for name in files_under(whole_model):
        client.upload_file(str(whole_model / name), BUCKET, f"{prefix}/{name}")
    local = fetch_model_files(f"s3://{BUCKET}/{prefix}", s3_options(moto.endpoint))
    assert files_under(local) == sorted(
        set(files_under(whole_model)) - {*TOP_WEIGHTS, *NOT_CARRIED}
    )


def test_http_cache_asks_for_auto_map_code_and_modules(whole_model, tmp_path, monkeypatch):
    """An HTTP server cannot list: the cache asks for the usual names, the ``*.py`` files
    ``auto_map`` names and the files of ``modules.json``'s module directories."""
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    server = HTTPFileServer(whole_model)
    try:
        local = fetch_model_files(server.url)
    finally:
        server.stop()
    got = set(files_under(local))
    assert {"configuration_tiny.py", "modules.json", "1_Pooling/config.json",
            "2_Dense/config.json", "2_Dense/model.safetensors",
            "chat_template.jinja", "config.json", "tokenizer.json"} <= got  # fmt: skip
    assert not got & {*TOP_WEIGHTS, *NOT_CARRIED}


def test_http_cache_fetches_what_the_writer_listed(whole_model, tmp_path, monkeypatch):
    """A directory this package wrote lists what it carried (`MANIFEST`): over HTTP the
    cache fetches exactly those, ``additional_chat_templates/`` included."""
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    with storage.transaction() as tx:
        stage_artifacts(tx, [str(whole_model)], str(out))
    server = HTTPFileServer(out)
    try:
        local = fetch_model_files(server.url)
    finally:
        server.stop()
    assert files_under(local) == sorted(set(files_under(out)) - {MANIFEST})


def test_sub_directory_weights_over_the_cap_are_listed(whole_model, tmp_path, monkeypatch):
    """Weights of a sub-directory are carried up to the cap; over it they are listed with
    a reason that says vLLM will miss them; a module of ``modules.json`` (a ``2_Dense``
    projection, which vLLM reads) is carried whatever its size."""
    model = tmp_path / "model"
    shutil.copytree(whole_model, model)
    (model / "onnx").mkdir()
    (model / "onnx" / "model.safetensors").write_bytes(b"x" * 9)
    monkeypatch.setattr(model_files, "MAX_ARTIFACT_BYTES", 8)
    with storage.transaction() as tx:
        left = {x.path: x.reason for x in stage_artifacts(tx, [str(model)], str(tmp_path / "o"))}
    assert "vLLM" in left["onnx/model.safetensors"] and "miss" in left["onnx/model.safetensors"]
    assert not (tmp_path / "o" / "onnx" / "model.safetensors").exists()
    dense = "2_Dense/model.safetensors"
    assert dense not in left
    assert (tmp_path / "o" / dense).read_bytes() == (model / dense).read_bytes()


def test_linked_sub_directories_are_followed_once(whole_model, tmp_path):
    """A sub-directory that is a link (``1_Pooling -> elsewhere``) is carried, and so is a
    second name for it (``2_Pool -> 1_Pooling``); a link to a directory that holds the model
    or the directory being walked (a loop, a parent, ``/``: files from outside the model) is
    listed, not followed."""
    model = tmp_path / "models" / "model"
    shutil.copytree(whole_model, model)
    (tmp_path / "models" / "other").mkdir()
    (tmp_path / "models" / "other" / "secret.json").write_text("{}")
    real = tmp_path / "pooling"
    shutil.move(str(model / "1_Pooling"), real)
    (model / "1_Pooling").symlink_to(real, target_is_directory=True)
    (model / "2_Pool").symlink_to(model / "1_Pooling", target_is_directory=True)
    (real / "loop").symlink_to(model, target_is_directory=True)
    (model / "up").symlink_to("..", target_is_directory=True)
    (model / "root").symlink_to("/", target_is_directory=True)
    with storage.transaction() as tx:
        left = stage_artifacts(tx, [str(model)], str(tmp_path / "out"))
    out = tmp_path / "out"
    for name in ("1_Pooling", "2_Pool"):
        assert (out / name / "config.json").read_text() == POOLING["1_Pooling/config.json"]
    assert {"1_Pooling/loop/", "2_Pool/loop/", "up/", "root/"} <= {x.path for x in left}
    for name in ("1_Pooling/loop", "up", "root"):
        assert not (out / name).exists()


def test_s3_cache_leaves_out_files_over_the_cap(whole_model, moto, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(model_files, "MAX_ARTIFACT_BYTES", 2048)
    monkeypatch.setattr("tensorize_vllm_model.artifacts.remote_files.MAX_ARTIFACT_BYTES", 2048)
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    prefix = uuid.uuid4().hex
    client = moto.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/2_Dense/model.safetensors", Body=b"x" * 4096)
    caplog.set_level("INFO", logger="tensorize_vllm_model")
    local = fetch_model_files(f"s3://{BUCKET}/{prefix}", s3_options(moto.endpoint))
    assert files_under(local) == ["config.json"]
    assert "2_Dense/model.safetensors (larger than" in caplog.text
    # named by modules.json: vLLM reads the module's weights, so they come whatever the size
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/modules.json", Body=POOLING["modules.json"])
    # copied to disk in pieces, never read into memory whole
    monkeypatch.setattr("tensorize_vllm_model.artifacts.remote_files.COPY_BYTES", 1000)
    whole = storage.read_bytes

    def read_bytes(uri, options=None, *, limit=None):
        assert limit is not None, f"{uri} read into memory whole"
        return whole(uri, options, limit=limit)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    local = fetch_model_files(f"s3://{BUCKET}/{prefix}", s3_options(moto.endpoint))
    assert files_under(local) == ["2_Dense/model.safetensors", "config.json", "modules.json"]
    assert (Path(local) / "2_Dense" / "model.safetensors").read_bytes() == b"x" * 4096


def test_vllm_finds_the_dense_projection_of_a_converted_model(tiny_llama, tmp_path):
    """A sentence-transformers ``2_Dense`` module's weights are carried, and vLLM's own
    projector loader (``_load_st_projector``, which reads ``2_Dense/model.safetensors`` from
    the model directory) builds the projection from the converted directory: without them
    it would silently skip it (embeddings of the model's width, not the module's)."""
    import torch
    from safetensors.torch import save_file
    from vllm.model_executor.models.adapters import _load_st_projector

    model = tmp_path / "embed"
    shutil.copytree(tiny_llama, model)
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    (model / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))  # fmt: skip
    (model / "2_Dense").mkdir()
    (model / "2_Dense" / "config.json").write_text(
        json.dumps({"in_features": hidden, "out_features": 8, "bias": False})
    )
    weight = torch.randn(8, hidden)
    save_file({"linear.weight": weight}, str(model / "2_Dense" / "model.safetensors"))
    assert main(["--model", str(model), "convert", "--serialized-directory", str(tmp_path),
                 "--suffix", "v1"]) == 0  # fmt: skip
    out = tmp_path / "vllm" / "embed" / "v1"

    class ModelConfig:  # the three fields _load_st_projector reads
        model, revision, head_dtype = str(out), None, torch.float32

    projector = _load_st_projector(ModelConfig())  # type: ignore[arg-type]
    assert projector is not None and len(projector) == 1
    assert torch.equal(projector[0].weight, weight)


def test_a_malformed_list_of_files_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "config.json").write_text("{}")
    (tmp_path / "served" / MANIFEST).write_text('{"files": "config.json"}')
    server = HTTPFileServer(tmp_path / "served")
    try:
        with pytest.raises(StorageError, match=rf"{MANIFEST} is not a JSON object"):
            fetch_model_files(server.url)
    finally:
        server.stop()
    assert not (tmp_path / "cache" / "models").exists() or not os.listdir(
        tmp_path / "cache" / "models"
    )
