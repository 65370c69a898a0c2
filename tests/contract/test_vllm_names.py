"""Interchangeability with vLLM 0.32's tensorizer module, without an engine: every public
name of ``vllm.model_executor.model_loader.tensorizer`` exists here with vLLM's signature
and meaning, vLLM's own `TensorizerConfig` (or its dict) works in every entry point, the
strings "true"/"false" work as booleans, and files written by earlier versions of this
package (the record as its own STATE_DICT tensor) still load.

(Names that need a vLLM model: test_vllm_builtin.py.)"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os

import pytest
import torch
import vllm.model_executor.model_loader.tensorizer as vllm_tensorizer
from tensorizer import TensorSerializer
from tensorizer.serialization import TensorType

import tensorize_vllm_model as ours
from tensorize_vllm_model import ConfigError, TensorizerArgs, TensorizerConfig
from tensorize_vllm_model.format.keys import generate_key, write_key
from tensorize_vllm_model.format.record import FileRecord, ParallelLayout
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.inspection.checks import check_shards

VLLM_CONFIG = vllm_tensorizer.TensorizerConfig


def vllm_public_names() -> list[str]:
    """Names vLLM's module defines or lists in __all__, not starting with '_'."""
    return sorted(
        n
        for n in dir(vllm_tensorizer)
        if not n.startswith("_")
        and (
            n in vllm_tensorizer.__all__
            or getattr(getattr(vllm_tensorizer, n), "__module__", None) == vllm_tensorizer.__name__
        )
    )


def test_the_list_of_vllm_names_is_complete():
    assert set(vllm_public_names()) >= {
        "serialize_vllm_model",
        "deserialize_tensorizer_model",
        "tensorizer_weights_iterator",
        "is_valid_deserialization_uri",
        "serialize_extra_artifacts",
        "is_vllm_tensorized",
        "tensorize_vllm_model",
        "init_tensorizer_model",
        "meta_tensor_mode",
        "MetaTensorMode",
        "tensorizer_kwargs_arg",
        "TensorizerConfig",
        "TensorizerArgs",
        "TensorSerializer",
    }


RE_EXPORTS = [
    "EncryptionParams",
    "DecryptionParams",
    "TensorDeserializer",
    "TensorSerializer",
    "open_stream",
    "convert_bytes",
    "get_mem_usage",
    "no_init_or_tensor",
]


def test_one_table_gives_the_lazy_names_and_type_checkers_see_each():
    """`__init__.py`'s `_LAZY` table drives `__all__` and `__getattr__`; each name in it
    resolves to its module's object, and is imported under TYPE_CHECKING (tensorizer's
    own objects aside: vLLM re-exports them untyped)."""
    import ast

    tree = ast.parse(inspect.getsource(ours))
    [guarded] = [
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    ]
    typed = {
        alias.name
        for node in ast.walk(guarded)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == set(ours._LAZY) - set(RE_EXPORTS)
    assert set(ours._LAZY) <= set(ours.__all__)
    for name, module in ours._LAZY.items():
        assert getattr(ours, name) is getattr(
            importlib.import_module(f"tensorize_vllm_model.{module}"), name
        )


def assert_vllm_signature(theirs, mine) -> None:
    """vLLM's parameters, in vLLM's order; anything more has a default."""
    expected = list(inspect.signature(theirs).parameters)
    params = list(inspect.signature(mine).parameters.values())
    assert [p.name for p in params[: len(expected)]] == expected
    assert all(extra.default is not extra.empty for extra in params[len(expected) :])


@pytest.mark.parametrize("name", sorted(set(vllm_public_names()) - set(RE_EXPORTS)))
def test_vllm_name_here_with_vllm_signature(name):
    assert name in ours.__all__
    assert_vllm_signature(getattr(vllm_tensorizer, name), getattr(ours, name))


@pytest.mark.parametrize(
    "method",
    [
        "open_stream",
        "verify_with_parallel_config",
        "verify_with_model_config",
        "to_serializable",
        "keys",
        "_construct_tensorizer_args",
    ],
)
def test_config_methods_with_vllm_signatures(method):
    assert_vllm_signature(getattr(VLLM_CONFIG, method), getattr(TensorizerConfig, method))


@pytest.mark.parametrize("name", RE_EXPORTS)
def test_tensorizer_re_exports_are_tensorizers_own(name):
    assert getattr(ours, name) is getattr(vllm_tensorizer, name)


# -- files --------------------------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


@pytest.fixture
def written(tmp_path):
    """An encrypted file of a Small module: (uri, key file, module)."""
    torch.manual_seed(0)
    module = Small()
    key = generate_key()
    keyfile = tmp_path / "k.key"
    write_key(str(keyfile), key)
    uri = str(tmp_path / "model.tensors")
    write_tensors(
        uri,
        [(n, p.detach(), False) for n, p in module.named_parameters()],
        record=FileRecord(architecture="Small"),
        key=key,
    ).commit()
    return uri, str(keyfile), module


def test_legacy_record_file_still_loads(tmp_path):
    """A file as earlier versions wrote it: the record as a STATE_DICT tensor, then an int64
    marker, then the tensors."""
    torch.manual_seed(0)
    module = Small()
    path = str(tmp_path / "old.tensors")
    serializer = TensorSerializer(path)
    record = FileRecord(architecture="Small", tensor_parallel_size=2, rank=1)
    serializer.write_tensor(
        0,
        ".tensorize_vllm_model_record",
        TensorType.STATE_DICT,
        torch.frombuffer(bytearray(record.to_bytes()), dtype=torch.uint8),
    )
    serializer.write_tensor(
        1, ".vllm_tensorized_marker", TensorType.PARAM, torch.ones(1, dtype=torch.int64)
    )
    for index, (name, p) in enumerate(module.named_parameters(), start=2):
        serializer.write_tensor(index, name, TensorType.PARAM, p.detach())
    serializer.close()
    with ours.open_tensors(path) as reader:
        assert reader.record.architecture == "Small" and reader.record.rank == 1
        assert reader.names() == ["proj.weight", "proj.bias"]
        target = Small()
        ours.load_into_module(target, reader)
    assert torch.equal(target.proj.weight, module.proj.weight)
    with ours.open_tensors(path) as reader:
        reader.record.check_written_for(ParallelLayout(2, 1, tp_rank=1), source=path)


def test_new_files_keep_the_record_in_vllms_marker(written):
    """No STATE_DICT entry (tensorizer's load_into_module refuses those): the record is the
    marker's bytes, a PARAM of the root module, as vLLM's serializer writes its marker."""
    uri, keyfile, module = written
    deserializer = ours.TensorDeserializer(
        uri, encryption=ours.DecryptionParams.from_key(open(keyfile, "rb").read()), lazy_load=True
    )
    kinds = {
        str(p[0] if isinstance(p, tuple) else p): e.type.name
        for p, e in deserializer._metadata.items()
    }
    assert kinds == {
        ".vllm_tensorized_marker": "PARAM",
        "proj.weight": "PARAM",
        "proj.bias": "PARAM",
    }
    record = json.loads(bytes(deserializer[".vllm_tensorized_marker"].numpy()))
    assert record["architecture"] == "Small" and record["encrypted"] is True
    target = Small()
    assert deserializer.load_into_module(target) == 3  # tensorizer's own, no filter
    assert torch.equal(target.proj.weight, module.proj.weight)


# -- vLLM's config object and dict in every entry point -----------------------------------


def vllm_config(uri, keyfile, form):
    config = VLLM_CONFIG(tensorizer_uri=uri, encryption_keyfile=keyfile, num_readers=1)
    return config if form == "object" else config.to_serializable()


ENTRY_POINTS = {
    "is_vllm_tensorized": lambda cfg, uri: ours.is_vllm_tensorized(cfg) is True,
    "open_tensors": lambda cfg, uri: (
        ours.open_tensors(uri, config=cfg).record.architecture == "Small"
    ),
    "check_shards": lambda cfg, uri: check_shards(cfg) > 0,
    "TensorizerArgs": lambda cfg, uri: "encryption" in TensorizerArgs(cfg).deserialization_kwargs,
    "inspect_tensors": lambda cfg, uri: (
        __import__("tensorize_vllm_model.inspection.reports", fromlist=["x"])
        .inspect_tensors(uri, cfg)[0]
        .record["architecture"]
        == "Small"
    ),
    "verify_tensors": lambda cfg, uri: (
        __import__("tensorize_vllm_model.inspection.reports", fromlist=["x"])
        .verify_tensors(uri, cfg)[0]
        .intact
    ),
    "tensorizer_weights_iterator": lambda cfg, uri: (
        [n for n, _ in ours.tensorizer_weights_iterator(TensorizerArgs(cfg))]
        == ["proj.weight", "proj.bias"]
    ),
    "deserialize_tensorizer_model": lambda cfg, uri: _deserialized(cfg),
    "TensorizerLoader": lambda cfg, uri: _loader(cfg).tensorizer_config.tensorizer_uri == uri,
}


def _deserialized(cfg) -> bool:
    target = Small()
    ours.deserialize_tensorizer_model(target, cfg)
    return target.proj.weight.shape == (4, 4)


def _loader(cfg):
    from vllm.config.load import LoadConfig

    from tensorize_vllm_model.integrations.vllm.loader import TensorizerLoader

    return TensorizerLoader(LoadConfig(load_format="tensorizer", model_loader_extra_config=cfg))


@pytest.mark.parametrize("form", ["object", "dict"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_vllm_config_in_every_entry_point(entry, form, written):
    uri, keyfile, _ = written
    assert ENTRY_POINTS[entry](vllm_config(uri, keyfile, form), uri)


@pytest.mark.parametrize("form", ["object", "dict"])
def test_vllm_config_in_tensorize_vllm_model(form, tmp_path):
    """Taken (no AttributeError): refused for its content, before any engine starts."""
    from vllm import EngineArgs

    config = VLLM_CONFIG(tensorizer_uri=str(tmp_path / "model.tensors"))
    with pytest.raises(ConfigError, match="no rank template"):
        ours.tensorize_vllm_model(
            EngineArgs(model="m", tensor_parallel_size=2),
            config if form == "object" else config.to_serializable(),
        )


def test_vllm_config_with_load_time_fields(written):
    """vLLM's loader sets model_class, hf_config and dtype on its config; they are not
    settings and are left out."""
    uri, keyfile, _ = written
    config = VLLM_CONFIG(tensorizer_uri=uri, encryption_keyfile=keyfile)
    config.model_class, config.dtype = Small, torch.bfloat16
    assert ours.is_vllm_tensorized(config)


def test_vllm_config_in_tensorized_lora_request(tiny_llama, tmp_path):
    from demo_models import build_lora_adapter

    from tensorize_vllm_model import storage
    from tensorize_vllm_model.artifacts.lora import stage_adapter

    adapter = build_lora_adapter(tmp_path / "a", tiny_llama)
    with storage.transaction() as tx:
        stage_adapter(tx, "a", str(adapter), str(tmp_path / "model"))
    request = ours.tensorized_lora_request(
        str(tmp_path / "model"),
        "a",
        tensorizer_config=VLLM_CONFIG(tensorizer_dir=str(tmp_path / "model"), num_readers=1),
    )
    assert os.path.exists(f"{request.lora_path}/adapter_model.safetensors")


# -- "true"/"false" strings ---------------------------------------------------------------


def test_string_booleans_of_vllms_docs_example():
    """The JSON of vLLM's docs: stream_kwargs {"force_http": "False"},
    deserialization_kwargs {"verify_hash": "True", "num_readers": 8}."""
    config = TensorizerConfig.from_extra_config(
        {
            "tensorizer_uri": "s3://b/m/model.tensors",
            "stream_kwargs": {"force_http": "False"},
            "deserialization_kwargs": {"verify_hash": "True", "num_readers": 8},
        }
    )
    assert config.stream_kwargs == {"force_http": False}
    assert config.deserialization_kwargs == {"verify_hash": True, "num_readers": 8}
    assert TensorizerArgs(config).deserialization_kwargs["verify_hash"] is True


@pytest.mark.parametrize(
    "text,value", [("true", True), ("TRUE", True), ("False", False), ("fAlSe", False)]
)
def test_string_booleans_any_case(text, value):
    config = TensorizerConfig(
        tensorizer_uri="/m/model.tensors",
        verify_hash=text,
        vllm_tensorized=text,
        stream_kwargs={"ranges": text},
        serialization_kwargs={"compress_tensors": text},
        deserialization_kwargs={"plaid_mode": text},
    )
    assert config.verify_hash is value and config.vllm_tensorized is value
    assert config.stream_kwargs["ranges"] is value
    assert config.serialization_kwargs["compress_tensors"] is value
    assert config.deserialization_kwargs["plaid_mode"] is value


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"verify_hash": "yes"}, "verify_hash"),
        ({"vllm_tensorized": "1"}, "vllm_tensorized"),
        ({"stream_kwargs": {"force_http": "no"}}, "stream_kwargs force_http"),
        ({"deserialization_kwargs": {"verify_hash": "on"}}, "deserialization_kwargs verify_hash"),
        (
            {"serialization_kwargs": {"compress_tensors": "0"}},
            "serialization_kwargs compress_tensors",
        ),
    ],
)
def test_other_strings_for_booleans_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be true or false, got '"):
        TensorizerConfig(tensorizer_uri="/m/model.tensors", **fields)


def test_stream_options_take_string_booleans_too():
    from tensorize_vllm_model.storage.options import StreamOptions

    assert StreamOptions.from_mapping({"force_http": "True"}).get("force_http") is True
    with pytest.raises(ConfigError, match="stream_kwargs ranges must be true or false"):
        StreamOptions.from_mapping({"ranges": "maybe"})


# -- the names, one by one ----------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["s3://b/k", "HTTPS://h/x", "http://h/x", "ftp://h/x", "", None, "/no/such/file", __file__],
)
def test_is_valid_deserialization_uri_as_vllms(uri):
    assert ours.is_valid_deserialization_uri(uri) == vllm_tensorizer.is_valid_deserialization_uri(
        uri
    )


def test_tensorizer_kwargs_arg():
    assert ours.tensorizer_kwargs_arg('{"num_readers": 2}') == {"num_readers": 2}
    for text in ("[1]", "{bad"):
        with pytest.raises(argparse.ArgumentTypeError):
            ours.tensorizer_kwargs_arg(text)


META_CASES = {
    "aten empty, no device": lambda: torch.ops.aten.empty.memory_format([3]),
    "torch.empty": lambda: torch.empty(3),
    "nn.Linear weight": lambda: torch.nn.Linear(4, 4).weight,
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_tensor_mode_as_vllms(case):
    """Both forms, against vLLM's own: an ``empty`` that names no device goes to meta."""
    with vllm_tensorizer.meta_tensor_mode():
        expected = META_CASES[case]().is_meta
    with ours.meta_tensor_mode():
        assert META_CASES[case]().is_meta is expected
    assert ours.meta_tensor_mode(META_CASES[case]).is_meta is expected
    with ours.MetaTensorMode():
        assert META_CASES[case]().is_meta is expected


def test_meta_tensor_mode_moves_deviceless_empty():
    with ours.meta_tensor_mode():
        assert torch.ops.aten.empty.memory_format([3]).is_meta
    assert not torch.ops.aten.empty.memory_format([3]).is_meta
    with pytest.raises(TypeError, match="expected a callable"):
        ours.meta_tensor_mode(3)


def test_tensorizer_weights_iterator_with_vllms_args(written):
    uri, keyfile, module = written
    args = vllm_tensorizer.TensorizerArgs(
        VLLM_CONFIG(tensorizer_uri=uri, encryption_keyfile=keyfile)
    )
    tensors = dict(ours.tensorizer_weights_iterator(args))
    assert list(tensors) == ["proj.weight", "proj.bias"]  # the marker and record left out
    assert torch.equal(tensors["proj.weight"], module.proj.weight.detach())


def test_serialize_extra_artifacts_from_a_local_model(tiny_llama, tmp_path):
    args = TensorizerArgs(TensorizerConfig(tensorizer_dir=str(tmp_path / "out")))
    ours.serialize_extra_artifacts(args, str(tiny_llama))
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        "generation_config.json",
        "tensorize_model_files.json",  # the list of the files carried
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with pytest.raises(ValueError, match="served_model_name must be a str"):
        ours.serialize_extra_artifacts(args, ["a", "b"])


def test_config_open_stream(written):
    uri, keyfile, _ = written
    with TensorizerConfig(tensorizer_uri=uri).open_stream() as stream:
        assert stream.read(5) == b"|TZR|"
    with pytest.raises(ours.StorageError, match="no such file"):
        TensorizerConfig(tensorizer_uri=uri + ".absent").open_stream()


def test_config_verify_with_parallel_config():
    from vllm.config import ParallelConfig

    two = ParallelConfig(tensor_parallel_size=2)
    TensorizerConfig(tensorizer_uri="/m/model-rank-%03d.tensors").verify_with_parallel_config(two)
    TensorizerConfig(tensorizer_uri="/m/model.tensors").verify_with_parallel_config(
        ParallelConfig()
    )
    with pytest.raises(ValueError, match=r"TP=2 x PP=1 .*'/m/model.tensors' has no rank template"):
        TensorizerConfig(tensorizer_uri="/m/model.tensors").verify_with_parallel_config(two)


def test_config_verify_with_model_config(caplog):
    class Quantized:
        quantization = "awq"

    with caplog.at_level(logging.WARNING):
        TensorizerConfig(tensorizer_uri="/m/model.tensors").verify_with_model_config(Quantized())
    assert "quantization on vLLM is unstable" in caplog.text


# -- the two deserialize flags, parsed ----------------------------------------------------


def deserialize_args(tiny_llama, *flags):
    from tensorize_vllm_model.cli import parse_command_line

    return parse_command_line(["--model", str(tiny_llama), *flags])


def test_serialized_directory_gives_the_tensors(tiny_llama, tmp_path):
    from tensorize_vllm_model.cli import deserialize_config

    config = deserialize_config(
        deserialize_args(tiny_llama, "deserialize", "--serialized-directory", "s3://b/vllm/m/v1/")
    )
    assert config.tensorizer_uri == "s3://b/vllm/m/v1/model.tensors"
    config = deserialize_config(
        deserialize_args(
            tiny_llama,
            "--tensor-parallel-size",
            "2",
            "deserialize",
            "--serialized-directory",
            str(tmp_path),
        )
    )
    assert (config.given_uri, config.tensorizer_dir) == (None, str(tmp_path))  # the plan decides
    with pytest.raises(ConfigError, match="--serialized-directory and --path-to-tensors"):
        deserialize_config(
            deserialize_args(
                tiny_llama,
                "deserialize",
                "--serialized-directory",
                str(tmp_path),
                "--path-to-tensors",
                "/d/model.tensors",
            )
        )


def test_deserialization_kwargs_flag(tiny_llama):
    from tensorize_vllm_model.cli import deserialize_config

    args = deserialize_args(
        tiny_llama,
        "--model-loader-extra-config",
        '{"deserialization_kwargs": {"num_readers": 1}}',
        "deserialize",
        "--path-to-tensors",
        "/d/model.tensors",
        "--deserialization-kwargs",
        '{"verify_hash": "True", "num_readers": 3}',
    )
    assert deserialize_config(args).deserialization_kwargs == {
        "verify_hash": True,
        "num_readers": 3,
    }
    bad = deserialize_args(
        tiny_llama,
        "deserialize",
        "--path-to-tensors",
        "/d/model.tensors",
        "--deserialization-kwargs",
        '{"lazy_load": true}',
    )
    with pytest.raises(ConfigError, match="unknown deserialization_kwargs key.*'lazy_load'"):
        deserialize_config(bad)
