"""The streaming core on plain torch modules: no vLLM involved."""

import pytest
import torch
from tensorizer import TensorSerializer

from tensorize_vllm_model import (
    EncryptionError,
    FormatError,
    ModelMismatchError,
    TensorizerConfig,
    is_vllm_tensorized,
    load_into_module,
    open_tensors,
)
from tensorize_vllm_model.format.keys import generate_key, write_key
from tensorize_vllm_model.format.record import FileRecord
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.read.modules import meta_parameters


class Tiny(torch.nn.Module):
    def __init__(self, tie: bool = True):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("codes", torch.zeros(4, dtype=torch.int32))
        self.register_buffer("table", torch.arange(3, dtype=torch.float32), persistent=False)


def state_of(module: torch.nn.Module) -> list:
    tensors = [(n, p.detach(), False) for n, p in module.named_parameters()]
    return tensors + [(n, b, True) for n, b in module.named_buffers()]


def write(module: torch.nn.Module, path, key=None):
    staged = write_tensors(
        str(path), state_of(module), record=FileRecord(architecture="Tiny"), key=key
    )
    staged.commit()
    return str(path)


@pytest.fixture
def source():
    torch.manual_seed(0)
    module = Tiny()
    module.codes.copy_(torch.tensor([7, -3, 2**30, 5], dtype=torch.int32))
    return module


def test_round_trip_onto_meta_module(tmp_path, source):
    path = write(source, tmp_path / "m.tensors")
    with meta_parameters("cpu"):
        target = Tiny()
    assert target.proj.weight.is_meta
    with open_tensors(path) as reader:
        assert reader.record.architecture == "Tiny"
        assert reader.vllm_tensorized
        stats = load_into_module(target, reader)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert stats.tensors == len(state_of(source))
    assert stats.bytes == sum(t.numel() * t.element_size() for _, t, _ in state_of(source))


def test_tied_weights_stay_tied(tmp_path, source):
    path = write(source, tmp_path / "m.tensors")
    with meta_parameters("cpu"):
        target = Tiny()
    with open_tensors(path) as reader:
        load_into_module(target, reader)
    assert target.head.weight is target.embed.weight
    assert torch.equal(target.head.weight, source.embed.weight)


def test_parameter_attributes_survive(tmp_path, source):
    path = write(source, tmp_path / "m.tensors")
    with meta_parameters("cpu"):
        target = Tiny()
    target.proj.weight.weight_loader = "hook"  # vLLM hangs such attributes on parameters
    with open_tensors(path) as reader:
        load_into_module(target, reader)
    assert target.proj.weight.weight_loader == "hook"
    assert not target.proj.weight.requires_grad


def test_float_cast_to_model_dtype_but_integers_kept(tmp_path, source):
    path = write(source, tmp_path / "m.tensors")
    with meta_parameters("cpu"):
        target = Tiny().to(torch.bfloat16)  # codes (int32) stays int32 under .to(dtype)
    target.codes = torch.empty(4, dtype=torch.int32, device="meta")
    with open_tensors(path) as reader:
        load_into_module(target, reader)
    assert target.proj.weight.dtype == torch.bfloat16
    assert torch.equal(target.proj.weight, source.proj.weight.to(torch.bfloat16))
    assert target.codes.dtype == torch.int32
    assert target.codes.tolist() == [7, -3, 2**30, 5]


def test_complex_and_integer_tensors_never_cast(tmp_path):
    values = torch.tensor([1 + 2j, -3.5 + 0.25j], dtype=torch.complex64)
    packed = torch.tensor([[1, -2], [3, 127]], dtype=torch.int8)
    write_tensors(
        str(tmp_path / "q.tensors"),
        [("c", values, False), ("q", packed, False)],
        record=FileRecord(),
    ).commit()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.empty(2, dtype=torch.bfloat16), requires_grad=False)
            self.q = torch.nn.Parameter(
                torch.empty(2, 2, dtype=torch.bfloat16), requires_grad=False
            )

    with meta_parameters("cpu"):
        holder = Holder()
    with open_tensors(str(tmp_path / "q.tensors")) as reader:
        load_into_module(holder, reader)
    assert holder.c.dtype == torch.complex64 and torch.equal(holder.c, values)
    assert holder.q.dtype == torch.int8 and torch.equal(holder.q, packed)


def test_mismatch_names_every_tensor(tmp_path, source):
    path = write(source, tmp_path / "m.tensors")

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.proj = torch.nn.Linear(8, 4)  # wrong shape
            self.extra = torch.nn.Linear(2, 2)  # not in the file

    with meta_parameters("cpu"):
        other = Other()
    with open_tensors(path) as reader, pytest.raises(ModelMismatchError) as info:
        load_into_module(other, reader)
    message = str(info.value)
    assert path in message
    assert "missing from the file: extra.bias, extra.weight" in message
    assert "not in the model: codes, table" in message
    assert "proj.weight (file (8, 8), model (4, 8))" in message


def test_encrypted_round_trip_and_key_errors(tmp_path, source):
    key = generate_key()
    key_path = tmp_path / "m.key"
    write_key(str(key_path), key)
    path = write(source, tmp_path / "m.tensors", key=key)
    assert (
        bytes(source.proj.weight.detach().numpy().tobytes())
        not in (tmp_path / "m.tensors").read_bytes()
    )

    config = TensorizerConfig(tensorizer_uri=path, encryption_keyfile=str(key_path))
    with meta_parameters("cpu"):
        target = Tiny()
    with open_tensors(path, config=config) as reader:
        assert reader.record.architecture == "Tiny"
        load_into_module(target, reader)
    assert torch.equal(target.proj.weight, source.proj.weight)

    with pytest.raises(EncryptionError, match=rf"{path} is encrypted: give the key"):
        open_tensors(path)

    wrong = tmp_path / "wrong.key"
    write_key(str(wrong), generate_key())
    with pytest.raises(EncryptionError, match=rf"cannot decrypt {path} with the key in {wrong}"):
        open_tensors(
            path, config=TensorizerConfig(tensorizer_uri=path, encryption_keyfile=str(wrong))
        )


def test_key_for_unencrypted_file_refused(tmp_path, source):
    path = write(source, tmp_path / "m.tensors")
    key_path = tmp_path / "m.key"
    write_key(str(key_path), generate_key())
    with pytest.raises(EncryptionError, match=rf"{path} is not encrypted, but a key was given"):
        open_tensors(
            path, config=TensorizerConfig(tensorizer_uri=path, encryption_keyfile=str(key_path))
        )


@pytest.mark.parametrize(
    "content",
    [b"", b"not a model at all" * 100, b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64],
)
def test_not_a_tensorizer_file(tmp_path, content):
    path = tmp_path / "x.tensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=rf"{path} is not a tensorizer file"):
        open_tensors(str(path))


def test_hugging_face_file_is_not_vllm_tensorized(tmp_path, source):
    path = str(tmp_path / "hf.tensors")
    serializer = TensorSerializer(path)
    serializer.write_module(source)
    serializer.close()
    assert not is_vllm_tensorized(TensorizerConfig(tensorizer_uri=path))
    with open_tensors(path) as reader:
        kinds = reader.tensor_types()
    assert kinds["codes"] == "BUFFER" and kinds["proj.weight"] == "PARAM"  # ".codes" in the file
    ours = write(source, tmp_path / "ours.tensors")
    assert is_vllm_tensorized(TensorizerConfig(tensorizer_uri=ours))


def test_staged_tensors_absent_until_commit(tmp_path, source):
    final = tmp_path / "m.tensors"
    staged = write_tensors(str(final), state_of(source), record=FileRecord())
    assert not final.exists()
    staged.abort()
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_default_reader_counts(monkeypatch):
    from tensorize_vllm_model.read.reader import default_num_readers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_num_readers("/m/model.tensors", "cuda:0") == 4
    assert default_num_readers("/m/model.tensors", "cpu") == 8
    assert default_num_readers("s3://b/model.tensors", "cuda:0") == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_num_readers("/m/model.tensors") == 8
