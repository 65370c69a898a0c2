"""TensorizerConfig / TensorizerArgs: vLLM-compatible fields and semantics, validation."""

import argparse

import pytest

from tensorize_vllm_model import ConfigError, TensorizerArgs, TensorizerConfig


def test_dir_gives_default_tensors_file():
    cfg = TensorizerConfig(tensorizer_dir="/models/opt/v1/")
    assert cfg.tensorizer_uri == "/models/opt/v1/model.tensors"


def test_uri_wins_and_sets_dir():
    cfg = TensorizerConfig(tensorizer_uri="s3://b/vllm/m/v1/model.tensors", tensorizer_dir="/x")
    assert cfg.tensorizer_uri == "s3://b/vllm/m/v1/model.tensors"
    assert cfg.tensorizer_dir == "s3://b/vllm/m/v1"


def test_neither_uri_nor_dir_is_refused():
    with pytest.raises(ConfigError, match="tensorizer_uri"):
        TensorizerConfig()


def test_sharded_template_detected():
    assert TensorizerConfig(tensorizer_uri="/m/model-rank-%03d.tensors").is_sharded
    assert TensorizerConfig(tensorizer_uri="/m/model-rank-%03d.tensors")._is_sharded
    assert not TensorizerConfig(tensorizer_uri="/m/model.tensors").is_sharded


def test_to_serializable_round_trips():
    cfg = TensorizerConfig(
        tensorizer_uri="/m/model.tensors",
        num_readers=2,
        verify_hash=True,
        deserialization_kwargs={"num_readers": 3},
    )
    data = cfg.to_serializable()
    assert data == {
        "tensorizer_uri": "/m/model.tensors",
        "num_readers": 2,
        "verify_hash": True,
        "deserialization_kwargs": {"num_readers": 3},
    }
    assert TensorizerConfig(**data) == cfg


def test_mapping_access_like_vllm():
    cfg = TensorizerConfig(tensorizer_uri="/m/model.tensors")
    assert cfg["tensorizer_uri"] == "/m/model.tensors"
    cfg["num_readers"] = 4
    assert cfg.num_readers == 4
    assert "verify_hash" in cfg.keys()
    assert dict(cfg)["num_readers"] == 4
    with pytest.raises(KeyError):
        cfg["no_such_field"]
    with pytest.raises(KeyError):
        cfg["no_such_field"] = 1


def test_repr_hides_secret():
    cfg = TensorizerConfig(
        tensorizer_uri="s3://b/k",
        s3_access_key_id="AKIDEXAMPLE",
        s3_secret_access_key="TOPSECRET123",
    )
    assert "TOPSECRET123" not in repr(cfg)
    assert "TOPSECRET123" not in str(cfg)
    assert "***" in repr(cfg)


@pytest.mark.parametrize("key", ["device", "dtype", "mode"])
def test_forbidden_deserialization_kwargs_named(key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TensorizerConfig(tensorizer_uri="/m/model.tensors", deserialization_kwargs={key: "x"})


@pytest.mark.parametrize("value", [0, -1, "2", 1.5, True])
def test_num_readers_must_be_positive_int(value):
    with pytest.raises(ConfigError, match="num_readers"):
        TensorizerConfig(tensorizer_uri="/m/model.tensors", num_readers=value)


def test_from_extra_config_merges_vllm_nesting():
    # What vLLM's EngineArgs.create_load_config hands the loader.
    extra = {
        "deserialization_kwargs": {"num_readers": 2},
        "tensorizer_config": {
            "tensorizer_dir": "/serialized/v1",
            "deserialization_kwargs": {"num_readers": 2},
        },
    }
    cfg = TensorizerConfig.from_extra_config(extra)
    assert cfg.tensorizer_uri == "/serialized/v1/model.tensors"
    assert cfg.deserialization_kwargs == {"num_readers": 2}


def test_from_extra_config_uri_beats_model_dir():
    extra = {
        "tensorizer_uri": "/a/model.tensors",
        "tensorizer_config": {"tensorizer_dir": "org/model", "tensorizer_uri": "/a/model.tensors"},
    }
    assert TensorizerConfig.from_extra_config(extra).tensorizer_uri == "/a/model.tensors"


def test_from_extra_config_names_unknown_keys():
    with pytest.raises(
        ConfigError, match=r"'num_reader'.*'tensorizer_urii'|'tensorizer_urii'.*'num_reader'"
    ):
        TensorizerConfig.from_extra_config({"num_reader": 2, "tensorizer_urii": "/x"})


def test_args_use_environment_credentials(monkeypatch):
    monkeypatch.setenv("S3_ACCESS_KEY_ID", "env-id")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://s3.example")
    args = TensorizerArgs(TensorizerConfig(tensorizer_uri="s3://b/k", s3_access_key_id="flag-id"))
    assert args.s3_access_key_id == "flag-id"
    assert args.s3_secret_access_key == "env-secret"
    assert args.stream_kwargs["s3_endpoint"] == "https://s3.example"
    assert "env-secret" not in repr(args)


def test_args_deserialization_kwargs_override_flags():
    args = TensorizerArgs(
        TensorizerConfig(
            tensorizer_uri="/m/model.tensors",
            num_readers=2,
            deserialization_kwargs={"num_readers": 5},
        )
    )
    assert args.deserialization_kwargs["num_readers"] == 5


def test_cli_group_has_the_seed_flags():
    parser = TensorizerArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(
        [
            "--tensorizer-uri",
            "/m/x.tensors",
            "--verify-hash",
            "--num-readers",
            "3",
            "--encryption-keyfile",
            "/k",
            "--s3-access-key-id",
            "a",
            "--s3-secret-access-key",
            "b",
            "--s3-endpoint",
            "https://e",
        ]
    )
    assert (ns.tensorizer_uri, ns.verify_hash, ns.num_readers, ns.encryption_keyfile) == (
        "/m/x.tensors",
        True,
        3,
        "/k",
    )
    assert (ns.s3_access_key_id, ns.s3_secret_access_key, ns.s3_endpoint) == ("a", "b", "https://e")
    ns.encryption_keyfile = None
    args = TensorizerArgs.from_cli_args(ns)
    assert args.tensorizer_uri == "/m/x.tensors"
    assert args.deserialization_kwargs["verify_hash"] is True
    assert args.deserialization_kwargs["num_readers"] == 3


def test_cli_group_missing_keyfile_is_named(tmp_path):
    parser = TensorizerArgs.add_cli_args(argparse.ArgumentParser())
    missing = tmp_path / "no.key"
    ns = parser.parse_args(
        ["--tensorizer-uri", "/m/x.tensors", "--encryption-keyfile", str(missing)]
    )
    from tensorize_vllm_model import EncryptionError

    with pytest.raises(EncryptionError, match=str(missing)):
        TensorizerArgs.from_cli_args(ns)


# -- the typed options: built at the edge, once per distinct settings ----------------------


def test_options_are_built_once_and_again_when_a_setting_changes(monkeypatch):
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    cfg = TensorizerConfig(tensorizer_uri="s3://b/m/model.tensors", stream_kwargs={"workers": 3})
    options = cfg.options
    assert cfg.options is options and options.workers == 3
    cfg["stream_kwargs"] = {"workers": 5}  # vLLM's dict-style access
    assert cfg.options.workers == 5
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://s3-env.example")  # the field is unset
    assert cfg.options.get("s3_endpoint") == "https://s3-env.example"
    cfg.s3_endpoint = "https://field.example"
    assert cfg.options.get("s3_endpoint") == "https://field.example"


def test_string_booleans_of_stream_kwargs_are_parsed_once_into_booleans():
    cfg = TensorizerConfig(
        tensorizer_uri="s3://b/m/model.tensors",
        stream_kwargs={"force_http": "True", "ranges": "false"},
    )
    assert cfg.stream_kwargs == {"force_http": True, "ranges": False}
    assert cfg.options.get("force_http") is True and cfg.options.ranges is False
    assert TensorizerArgs(cfg).stream_kwargs["force_http"] is True


def test_options_cross_to_vllms_workers_as_plain_data():
    """vLLM's RPC to its workers carries plain data only (msgpack, no pickle): the save
    request holds the options' plain form, which gives the same options back."""
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from tensorize_vllm_model.integrations.vllm.messages import SaveRequest
    from tensorize_vllm_model.storage.options import StreamOptions

    cfg = TensorizerConfig(
        tensorizer_uri="s3://b/m/model.tensors",
        s3_access_key_id="id",
        s3_secret_access_key="SECRET",
        stream_kwargs={"workers": 2, "addressing_style": "path", "force_http": "true"},
    )
    request = SaveRequest(
        rank_uris=["s3://b/m/model.tensors"], stream_options=cfg.options.as_mapping()
    )
    sent = MsgpackDecoder(SaveRequest).decode(MsgpackEncoder().encode(request))
    assert StreamOptions.from_mapping(sent.stream_options) == cfg.options
    assert "SECRET" not in repr(sent) and "SECRET" not in repr(cfg.options)


def test_a_read_request_carries_the_configs_options(tmp_path):
    from tensorize_vllm_model.read.request import request_from_config

    cfg = TensorizerConfig(tensorizer_uri=str(tmp_path / "model.tensors"))
    request = request_from_config(cfg.tensorizer_uri or "", cfg)
    assert request.stream_options is cfg.options
