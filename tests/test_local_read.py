"""Our own reads of plain local files into CPU memory (local_read), against tensorizer's."""

import os

import pytest
import torch
from tensorizer import TensorDeserializer, TensorSerializer

from tensorize_vllm_model import FormatError, TensorizerConfig, local_read, open_tensors


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(64, 200),  # 51 200 bytes: many pieces when pieces are 4 KiB
        "half": torch.randn(7, 3).half(),
        "brain": torch.randn(5, 9).bfloat16(),
        "codes": torch.randint(-128, 127, (33,), dtype=torch.int8),
        "step": torch.tensor(2**40, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "phase": torch.randn(4, dtype=torch.complex64),
        "none": torch.empty(0, 4),
        "later": torch.randn(3, 1, 2, dtype=torch.float64),
    }


@pytest.fixture
def path(tmp_path):
    path = str(tmp_path / "m.tensors")
    serializer = TensorSerializer(path)
    serializer.write_state_dict(tensors())
    serializer.close()
    return path


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(local_read, "PIECE_BYTES", 4096)


def read_ours(path, **kwargs) -> dict[str, torch.Tensor]:
    with open_tensors(path, config=TensorizerConfig(tensorizer_uri=path, **kwargs)) as reader:
        return dict(reader.items())


def assert_same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert ours[name].shape == tensor.shape, name
        assert raw(ours[name]) == raw(tensor), name


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensorizer_reads(path) -> dict[str, torch.Tensor]:
    deserializer = TensorDeserializer(path, device="cpu")
    return {name: tensor.clone() for name, tensor in deserializer.items()}


@pytest.mark.parametrize("readers", [1, 3, 8])
def test_every_dtype_and_shape_as_tensorizer_reads_it(path, readers, monkeypatch):
    calls = []
    real = local_read.read_spans
    monkeypatch.setattr(local_read, "read_spans",
                        lambda *args, **kwargs: calls.append(args[2]) or real(*args, **kwargs))
    assert_same(read_ours(path, num_readers=readers), tensorizer_reads(path))
    assert calls == [readers]  # our reads, not tensorizer's, with the readers asked for
    assert_same(read_ours(path, num_readers=readers), tensors())


def test_only_the_tensors_asked_for(path):
    with open_tensors(path) as reader:
        got = dict(reader.items(only={"w", "mask"}))
    assert_same(got, {k: v for k, v in tensors().items() if k in ("w", "mask")})


def test_without_populate_the_bytes_are_the_same(path, monkeypatch):
    monkeypatch.setattr(local_read, "_madvise", False)
    assert_same(read_ours(path), tensors())


def test_populate_is_available_on_linux():
    if os.uname().sysname != "Linux":
        pytest.skip("MADV_POPULATE_WRITE is Linux-only")
    memory = torch.empty(1 << 20, dtype=torch.uint8)
    local_read._populate(memory.data_ptr(), memory.numel())
    # Either the call worked, or this kernel refused it and the loader stopped asking.
    assert local_read._madvise is False or callable(local_read._madvise)


def test_a_file_cut_short_after_its_index_was_checked(path):
    with open_tensors(path) as reader:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 100)
        with pytest.raises(FormatError) as error:
            dict(reader.items())
    assert path in str(error.value) and "tensor later" in str(error.value)
    assert "truncated" in str(error.value)


def test_a_span_whose_length_disagrees_with_its_shape():
    span = local_read.Span(name="w", offset=0, length=12, dtype=torch.float32, shape=(2, 2))
    with pytest.raises(FormatError, match=r"/x/m.tensors is corrupt: tensor w holds 12 bytes "
                                          r"where its shape and dtype need 16"):
        local_read.read_spans("/x/m.tensors", [span], 1)


def test_a_span_without_data_reads_as_zeros(path):
    span = local_read.Span(name="z", offset=0, length=0, dtype=torch.bfloat16, shape=(3, 2))
    [got] = local_read.read_spans(path, [span], 2)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.zeros(3, 2, dtype=torch.bfloat16))


def test_hash_checks_and_encrypted_files_stay_with_tensorizer(tmp_path, path, monkeypatch):
    from tensorize_vllm_model.keys import generate_key, stage_key
    from tensorize_vllm_model.layout import FileRecord
    from tensorize_vllm_model.serialization import write_tensors

    monkeypatch.setattr(local_read, "read_spans", lambda *a, **k: pytest.fail("our reads used"))
    assert_same(read_ours(path, verify_hash=True), tensors())
    key = generate_key()
    keyfile = str(tmp_path / "k.key")
    stage_key(keyfile, key).commit()
    encrypted = str(tmp_path / "e.tensors")
    some = {n: t for n, t in tensors().items() if t.numel()}  # tensorizer cannot encrypt 0 bytes
    write_tensors(encrypted, [(n, t, False) for n, t in some.items()], record=FileRecord(),
                  key=key).commit()
    assert_same(read_ours(encrypted, encryption_keyfile=keyfile), some)


def read_staged(path, readers, device="cpu", **kwargs) -> dict[str, torch.Tensor]:
    with open_tensors(path) as reader:
        spans = reader._spans(None)
    got = local_read.read_spans(path, spans, readers, device=device, staged=True, **kwargs)
    return {span.name: tensor for span, tensor in zip(spans, got)}


# The staging path serves GPUs: pinned buffers and CUDA streams cannot run on this CPU-only
# machine, so these tests run its bookkeeping (pieces packed into two buffers per reader,
# buffers reused, copies out of them) with plain CPU buffers; the CUDA test below runs only
# where a GPU is present.
@pytest.mark.parametrize("readers", [1, 3])
@pytest.mark.parametrize("staging", [4096, 4096 + 512, 1 << 20])
def test_staged_reads_through_reused_buffers(path, readers, staging, monkeypatch):
    monkeypatch.setattr(local_read, "STAGING_BYTES", staging)
    filled = []
    real = local_read._read_exactly
    monkeypatch.setattr(local_read, "_read_exactly",
                        lambda fd, view, *a: filled.append(view.obj) or real(fd, view, *a))
    assert_same(read_staged(path, readers), tensorizer_reads(path))
    assert all(len(buffer) <= staging for buffer in filled)
    buffers = {id(buffer) for buffer in filled}
    if staging == 4096:  # 51 200 bytes of "w" alone: each reader's two buffers reused
        assert len(buffers) <= 2 * readers < len(filled)


def test_staged_read_of_a_file_cut_short(path, monkeypatch):
    monkeypatch.setattr(local_read, "STAGING_BYTES", 8192)
    with open_tensors(path) as reader:
        spans = reader._spans(None)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(FormatError, match=r"truncated: tensor later ends past the end"):
        local_read.read_spans(path, spans, 2, staged=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("readers", [1, 2])
def test_onto_a_gpu_through_pinned_buffers(path, readers, monkeypatch):
    monkeypatch.setattr(local_read, "STAGING_BYTES", 8192)
    config = TensorizerConfig(tensorizer_uri=path, num_readers=readers)
    with open_tensors(path, config=config, device="cuda:0") as reader:
        got = dict(reader.items())
    assert {t.device.type for t in got.values()} == {"cuda"}
    assert_same({n: t.cpu() for n, t in got.items()}, tensors())
