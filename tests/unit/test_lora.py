"""LoRA adapters without an engine: tensorize, materialize (local, S3, HTTP), keys, the
checks against a base model, and the resolver `vllm serve` uses."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import uuid

import pytest
import torch
from demo_models import build_lora_adapter
from safetensors.torch import load_file

from tensorize_vllm_model import (
    ConfigError,
    EncryptionError,
    StorageError,
    TensorizerConfig,
    storage,
)
from tensorize_vllm_model.artifacts.lora import (
    check_adapter_fits,
    materialize_adapter,
    read_adapter,
    stage_adapter,
)
from tensorize_vllm_model.format.keys import generate_key, write_key
from tests.support import BUCKET
from tests.support.fake_engine import FakeEngine, engine_args

LLAMA_MODULES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return build_lora_adapter(tmp_path_factory.mktemp("adapters") / "adapter-a", tiny_llama)


def serialized(adapter, destination, key=None, options=None):
    with storage.transaction(options) as tx:
        stage_adapter(tx, "adapter-a", str(adapter), str(destination), key=key)
    return f"{destination}/lora/adapter-a"


def test_round_trip_through_ram_backed_directory(adapter, tmp_path):
    uri = serialized(adapter, tmp_path / "model")
    assert sorted(os.listdir(uri)) == ["adapter_config.json", "adapter_model.tensors"]
    path = materialize_adapter(uri)
    assert path.startswith("/dev/shm/")
    assert stat.S_IMODE(os.stat(os.path.dirname(os.path.dirname(path))).st_mode) == 0o700
    original_config, original = read_adapter(str(adapter))
    config, tensors = read_adapter(path)
    assert config == original_config
    assert tensors.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(tensors[name], value), name


def test_adapter_larger_than_dev_shm_goes_to_a_private_directory_on_disk(
    adapter, tmp_path, monkeypatch, caplog
):
    """A /dev/shm too small for the adapter (Docker's 64 MB): written to a private (0700)
    directory in the cache on disk instead, saying so. The small /dev/shm is a stand-in
    (its free space reported as 1 MB): a tmpfs of that size cannot be mounted here."""
    import logging

    from tensorize_vllm_model.artifacts import lora

    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lora, "_free_bytes", lambda path: 1 << 20)
    uri = serialized(adapter, tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="tensorize_vllm_model.artifacts.lora"):
        path = materialize_adapter(uri)
    assert path.startswith(str(tmp_path / "cache"))
    private = os.path.dirname(os.path.dirname(path))
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    assert "does not fit in /dev/shm" in caplog.text and "private (0700)" in caplog.text
    assert read_adapter(path)[1].keys() == read_adapter(str(adapter))[1].keys()


def test_encrypted_adapter(adapter, tmp_path):
    key = generate_key()
    key_path = tmp_path / "k.key"
    write_key(str(key_path), key)
    uri = serialized(adapter, tmp_path / "model", key=key)
    raw = open(f"{uri}/adapter_model.tensors", "rb").read()
    assert (
        load_file(str(adapter / "adapter_model.safetensors"))[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ]
        .numpy()
        .tobytes()[:64]
        not in raw
    )
    path = materialize_adapter(
        uri, TensorizerConfig(tensorizer_uri=uri, encryption_keyfile=str(key_path))
    )
    assert (
        load_file(f"{path}/adapter_model.safetensors").keys()
        == load_file(str(adapter / "adapter_model.safetensors")).keys()
    )

    wrong = tmp_path / "wrong.key"
    write_key(str(wrong), generate_key())
    with pytest.raises(
        EncryptionError,
        match=rf"LoRA adapter 'adapter-a': cannot decrypt .* with the key in {wrong}",
    ):
        materialize_adapter(
            uri, TensorizerConfig(tensorizer_uri=uri, encryption_keyfile=str(wrong))
        )
    with pytest.raises(EncryptionError, match=r"LoRA adapter 'adapter-a': .* is encrypted"):
        materialize_adapter(uri)


def test_materialized_directory_is_the_storage_layers_temporary(adapter, tmp_path):
    """The RAM-backed directory is published whole by a transaction and listed by the
    storage layer for removal at exit; artifacts/lora.py keeps no list of its own."""
    from tensorize_vllm_model.artifacts import lora

    path = materialize_adapter(serialized(adapter, tmp_path / "model"))
    assert path in storage.temporary_directories()
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    state = [
        name
        for name, value in vars(lora).items()
        if not name.startswith("__") and isinstance(value, (list, dict, set))
    ]
    assert state == []  # no module global (a list of created directories, say)


def test_failed_materialize_leaves_no_directory(tmp_path):
    """A write that fails after the config is written (safetensors refuses tensors that
    share memory) leaves nothing in the RAM-backed root and nothing listed for exit."""
    from tensorize_vllm_model.artifacts import lora

    root = lora._ram_root()
    before = set(os.listdir(root))
    listed = storage.temporary_directories()
    weight = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="share memory"):
        lora._write_peft_directory(
            str(tmp_path / "lora" / "x"), "x", {"r": 8}, {"a": weight, "b": weight}
        )
    assert set(os.listdir(root)) == before
    assert storage.temporary_directories() == listed


def test_missing_adapter_config_named(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(
        ConfigError, match=rf"LoRA adapter {tmp_path / 'broken'}: no adapter_config.json"
    ):
        read_adapter(str(tmp_path / "broken"))


def test_missing_tensorized_adapter_named(tmp_path):
    with pytest.raises(StorageError, match=r"LoRA adapter 'nope' not found"):
        materialize_adapter(str(tmp_path / "lora" / "nope"))


def test_adapter_that_does_not_fit_is_named():
    with pytest.raises(
        ConfigError,
        match=r"LoRA adapter 'a' targets module\(s\) c_attn that the base "
        r"model does not have",
    ):
        check_adapter_fits("a", {"r": 8, "target_modules": ["q_proj", "c_attn"]}, LLAMA_MODULES)
    with pytest.raises(
        ConfigError, match=r"LoRA adapter 'a' has rank 32, above --max-lora-rank 16"
    ):
        check_adapter_fits("a", {"r": 32, "target_modules": ["q_proj"]}, LLAMA_MODULES, 16)
    check_adapter_fits("a", {"r": 8, "target_modules": ["q_proj", "v_proj"]}, LLAMA_MODULES, 16)
    check_adapter_fits("a", {"r": 8, "target_modules": ".*(q|v)_proj"}, LLAMA_MODULES, 16)


def test_adapter_on_s3(adapter, moto):
    options = {
        "s3_endpoint": moto.endpoint,
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        "force_http": True,
    }
    model = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    uri = serialized(adapter, model, options=options)
    config = TensorizerConfig(
        tensorizer_uri=f"{uri}/x",
        s3_endpoint=moto.endpoint,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        stream_kwargs={"force_http": True},
    )
    path = materialize_adapter(uri, config)
    assert (
        load_file(f"{path}/adapter_model.safetensors").keys()
        == load_file(str(adapter / "adapter_model.safetensors")).keys()
    )


def test_adapter_over_http(adapter, web_root, web_servers):
    prefix = uuid.uuid4().hex
    serialized(adapter, web_root / prefix)
    path = materialize_adapter(f"{web_servers['http-1.1'].url}/{prefix}/lora/adapter-a")
    assert os.path.exists(f"{path}/adapter_model.safetensors")


def test_resolver_serves_adapters_of_the_served_model(adapter, tmp_path):
    from vllm.lora.resolver import LoRAResolverRegistry

    from tensorize_vllm_model.integrations.vllm import registration

    registration.register()
    serialized(adapter, tmp_path / "served")
    resolver = LoRAResolverRegistry.get_resolver("tensorize_vllm_model")
    registration.served["my-model"] = TensorizerConfig(tensorizer_dir=str(tmp_path / "served"))
    request = asyncio.run(resolver.resolve_lora("my-model", "adapter-a"))
    assert request.lora_name == "adapter-a" and request.lora_int_id > 0
    assert os.path.exists(f"{request.lora_path}/adapter_model.safetensors")
    assert asyncio.run(resolver.resolve_lora("my-model", "not-there")) is None


# -- adapters are checked before any engine starts (serialize --lora-path) ------------------


def _adapter_without(tmp_path, adapter, *, weights: bytes | None = None, name: str = "broken"):
    """A copy of `adapter` whose weights file is missing (or holds `weights`)."""
    broken = tmp_path / name
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    if weights is not None:
        (broken / "adapter_model.safetensors").write_bytes(weights)
    return broken


def _empty_safetensors() -> bytes:
    from safetensors.torch import save

    return save({})


@pytest.mark.parametrize(
    "weights, message",
    [
        (None, r"no adapter_model.safetensors \(or .bin/.pt\) in it"),
        (b"", r"cannot read adapter_model.safetensors"),
        (
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
            r"cannot read adapter_model.safetensors",
        ),
        (_empty_safetensors(), r"adapter_model.safetensors holds no tensors"),
    ],
    ids=["missing", "empty-file", "corrupt", "no-tensors"],
)
def test_serialize_refuses_an_adapter_without_usable_weights_before_any_engine(
    cli_with_fake_engine, tiny_llama, adapter, tmp_path, capsys, weights, message
):
    broken = _adapter_without(tmp_path, adapter, weights=weights)
    out = tmp_path / "out"
    code = cli_with_fake_engine(
        [
            "--model",
            str(tiny_llama),
            "serialize",
            "--serialized-directory",
            str(out),
            "--suffix",
            "v1",
            "--lora-path",
            str(adapter),
            "--lora-path",
            str(broken),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    # re.M: vLLM's argument parser warns about the repeated --lora-path through a logger
    # whose stream an earlier test's capture closed, so "--- Logging error ---" may come first.
    assert re.search(rf"^error: LoRA adapter {re.escape(str(broken))}: {message}", err, re.M), err
    assert FakeEngine.instances == []  # no engine was started
    assert not out.exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("duplicate", r"two --lora-path values are both named 'adapter-a'"),
        ("not-a-directory", r"--lora-path {path}: not a directory"),
        ("no-config", r"LoRA adapter {path}: no adapter_config.json in it"),
    ],
)
def test_other_adapter_inputs_checked_before_any_engine(
    fake_engine, tiny_llama, adapter, tmp_path, case, message
):
    from tensorize_vllm_model.integrations.vllm.serialize import tensorize_vllm_model

    if case == "duplicate":
        other = tmp_path / "x" / "adapter-a"
        other.parent.mkdir()
        import shutil

        shutil.copytree(adapter, other)
        path = str(other)
    elif case == "not-a-directory":
        path = str(tmp_path / "nowhere" / "adapter")
    else:
        (tmp_path / "no-config").mkdir()
        path = str(tmp_path / "no-config")
    with pytest.raises(ConfigError, match=message.format(path=re.escape(path))):
        tensorize_vllm_model(
            engine_args(tiny_llama),
            TensorizerConfig(tensorizer_uri=str(tmp_path / "out" / "model.tensors")),
            lora_paths=[str(adapter), path],
        )
    assert fake_engine.instances == []


def test_adapter_rank_checked_before_any_engine_when_lora_is_enabled(
    fake_engine, tiny_llama, adapter, tmp_path
):
    from tensorize_vllm_model.integrations.vllm.serialize import tensorize_vllm_model

    args = engine_args(tiny_llama)
    args.enable_lora, args.max_lora_rank = True, 4
    with pytest.raises(
        ConfigError,
        match=r"LoRA adapter 'adapter-a' has rank 8, above "
        r"--max-lora-rank 4",
    ):
        tensorize_vllm_model(
            args,
            TensorizerConfig(tensorizer_uri=str(tmp_path / "model.tensors")),
            lora_paths=[str(adapter)],
        )
    assert fake_engine.instances == []


def test_adapter_weights_in_torch_files_are_accepted(adapter, tmp_path):
    from tensorize_vllm_model.artifacts.lora import check_adapter_weights, prepare_adapters

    copy = _adapter_without(tmp_path, adapter, name="as-bin")
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), copy / "adapter_model.bin")
    assert check_adapter_weights(str(copy)) == str(copy / "adapter_model.bin")
    [prepared] = prepare_adapters([str(copy)])
    assert prepared.name == "as-bin" and prepared.config["r"] == 8
    config, tensors = read_adapter(str(copy))
    assert set(tensors) == set(load_file(str(adapter / "adapter_model.safetensors")))
