"""Our own reads of local files into CPU memory (local_read), plain and encrypted, against
tensorizer's."""

import os
import time

import pytest
import torch
from tensorizer import TensorDeserializer, TensorSerializer

from tensorize_vllm_model import (
    EncryptionError,
    FormatError,
    TensorizeError,
    TensorizerConfig,
    load_into_module,
    open_tensors,
)
from tensorize_vllm_model.core.errors import CorruptTensorError
from tensorize_vllm_model.read import local as local_read
from tensorize_vllm_model.read import memory as read_memory
from tensorize_vllm_model.read import staged as staged_read
from tensorize_vllm_model.read.source import LocalSource


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
    monkeypatch.setattr(
        local_read,
        "read_spans",
        lambda *args, **kwargs: calls.append(args[2]) or real(*args, **kwargs),
    )
    assert_same(read_ours(path, num_readers=readers), tensorizer_reads(path))
    assert calls == [readers]  # our reads, not tensorizer's, with the readers asked for
    assert_same(read_ours(path, num_readers=readers), tensors())


def test_only_the_tensors_asked_for(path):
    with open_tensors(path) as reader:
        got = dict(reader.items(only={"w", "mask"}))
    assert_same(got, {k: v for k, v in tensors().items() if k in ("w", "mask")})


def test_without_populate_the_bytes_are_the_same(path, monkeypatch):
    monkeypatch.setattr(read_memory, "_madvise", False)
    assert_same(read_ours(path), tensors())


def test_populate_is_available_on_linux():
    if os.uname().sysname != "Linux":
        pytest.skip("MADV_POPULATE_WRITE is Linux-only")
    memory = torch.empty(1 << 20, dtype=torch.uint8)
    read_memory.populate(memory.data_ptr(), memory.numel())
    # Either the call worked, or this kernel refused it and the loader stopped asking.
    assert read_memory._madvise is False or callable(read_memory._madvise)


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
    with pytest.raises(
        FormatError,
        match=r"/x/m.tensors is corrupt: tensor w holds 12 bytes "
        r"where its shape and dtype need 16",
    ):
        local_read.read_spans("/x/m.tensors", [span], 1)


def test_a_span_without_data_reads_as_zeros(path):
    span = local_read.Span(name="z", offset=0, length=0, dtype=torch.bfloat16, shape=(3, 2))
    [got] = local_read.read_spans(path, [span], 2)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.zeros(3, 2, dtype=torch.bfloat16))


def test_hash_checks_in_our_reads(path, tmp_path, monkeypatch):
    """verify_hash reads through our reader too (tensorizer's would allocate the tensors in
    its own threads), checking every dtype's hashes as tensorizer does, and naming a tensor
    whose data changed."""
    monkeypatch.setattr(
        TensorDeserializer, "items", lambda *a, **k: pytest.fail("tensorizer's reader used")
    )
    assert_same(read_ours(path, verify_hash=True), tensors())
    data = bytearray(open(path, "rb").read())
    with open_tensors(path, header_only=True) as reader:
        name, entry = [(n, e) for n, e in reader.index.items() if e.data_length > 1][-1]
    data[entry.data_offset + entry.data_length - 1] ^= 0x01
    bad = tmp_path / "bad.tensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptTensorError, match=rf"{bad}: tensor {name} failed its hash check"):
        read_ours(str(bad), verify_hash=True)


@pytest.mark.parametrize(
    "settings",
    [{"verify_hash": True}, {"tensorizer_config": {"verify_hash": True}}],
    ids=["flat", "under tensorizer_config"],
)
def test_settings_as_a_dict_that_names_no_file(path, tmp_path, settings):
    """``open_tensors(uri, config={...})`` with settings only: they apply to `uri` (the
    dict need not name the file again)."""
    with open_tensors(path, config=settings) as reader:
        assert_same(dict(reader.items()), tensors())
    data = bytearray(open(path, "rb").read())
    with open_tensors(path, header_only=True) as reader:
        name, entry = [(n, e) for n, e in reader.index.items() if e.data_length > 1][0]
    data[entry.data_offset] ^= 0x01
    bad = tmp_path / "bad.tensors"
    bad.write_bytes(bytes(data))
    with open_tensors(str(bad)) as reader:  # no hash checks: read as it is
        dict(reader.items())
    with pytest.raises(CorruptTensorError, match=rf"{bad}: tensor {name} failed its hash check"):
        with open_tensors(str(bad), config=settings) as reader:
            dict(reader.items())


CHUNK = 2 << 20  # the cipher chunk tensorizer writes


def encrypted_tensors() -> dict[str, torch.Tensor]:
    """Every dtype (tensorizer cannot encrypt a tensor of 0 bytes), and one tensor of
    three cipher chunks, the last one short."""
    some = {n: t for n, t in tensors().items() if t.numel()}
    torch.manual_seed(1)
    return {
        **some,
        "big": torch.randint(-(2**31), 2**31 - 1, ((2 * CHUNK + 12) // 4,), dtype=torch.int32),
    }


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory):
    from tensorize_vllm_model.format.keys import generate_key, write_key
    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    folder = tmp_path_factory.mktemp("encrypted")
    keyfile, other = str(folder / "k.key"), str(folder / "other.key")
    write_key(keyfile, generate_key())
    write_key(other, generate_key())
    path = str(folder / "e.tensors")
    with open(keyfile, "rb") as f:
        key = f.read()
    write_tensors(
        path, [(n, t, False) for n, t in encrypted_tensors().items()], record=FileRecord(), key=key
    ).commit()
    return path, keyfile, other


def open_encrypted(path: str, keyfile: str):
    return open_tensors(
        path, config=TensorizerConfig(tensorizer_uri=path, encryption_keyfile=keyfile)
    )


def record_reads(monkeypatch) -> list[int]:
    """The length of every read our readers make."""
    lengths: list[int] = []
    real = LocalSource.read_into
    monkeypatch.setattr(
        LocalSource,
        "read_into",
        lambda self, offset, view, *a: lengths.append(len(view)) or real(self, offset, view, *a),
    )
    return lengths


@pytest.mark.parametrize("readers", [1, 3, 8])
def test_encrypted_files_are_decrypted_by_our_readers(encrypted, readers, monkeypatch):
    path, keyfile, _ = encrypted
    lengths = record_reads(monkeypatch)
    got = read_ours(path, encryption_keyfile=keyfile, num_readers=readers)
    assert_same(got, encrypted_tensors())
    # One cipher chunk per read, each decrypted alone (pieces are 4 KiB in these tests):
    # the big tensor takes two whole chunks and its last 12 bytes, "w" one read of its own.
    assert lengths.count(CHUNK) == 2 and 12 in lengths and 51200 in lengths
    assert max(lengths) == CHUNK and len(lengths) == len(encrypted_tensors()) + 2


def test_encrypted_reads_match_tensorizers_reader(encrypted, monkeypatch):
    from tensorize_vllm_model.read import decrypt as tensor_decryption

    path, keyfile, _ = encrypted
    ours = read_ours(path, encryption_keyfile=keyfile)
    # A tensor header this module does not expect sends the file to tensorizer's reader.
    monkeypatch.setattr(tensor_decryption, "ciphers", lambda *a: None)
    monkeypatch.setattr(local_read, "read_spans", lambda *a, **k: pytest.fail("our reads used"))
    assert_same(ours, read_ours(path, encryption_keyfile=keyfile))


def test_encrypted_staged_reads(encrypted, monkeypatch):
    path, keyfile, _ = encrypted
    monkeypatch.setattr(staged_read, "STAGING_BYTES", 4096)  # smaller than a chunk
    with open_encrypted(path, keyfile) as reader:
        spans = local_read.LocalEngine(path).spans(reader.file)
    got = local_read.read_spans(path, spans, 2, staged=True)
    assert_same({span.name: tensor for span, tensor in zip(spans, got)}, encrypted_tensors())
    with open(keyfile, "rb") as f:
        key = f.read()
    shown = repr(spans)
    assert "TensorCipher(" in shown and "key=" not in shown and repr(key) not in shown


def test_a_wrong_key_is_named_with_the_file(encrypted):
    path, _, other = encrypted
    with pytest.raises(EncryptionError) as error:
        read_ours(path, encryption_keyfile=other)
    assert (
        str(error.value) == f"cannot decrypt {path} with the key in {other}: wrong key "
        f"(or corrupted data)"
    )


@pytest.mark.parametrize("where", ["first chunk", "last chunk", "MAC"])
def test_a_changed_byte_fails_its_check(encrypted, tmp_path, where):
    path, keyfile, _ = encrypted
    with open_encrypted(path, keyfile) as reader:
        entry = dict(reader.index.items())["big"]
    data = bytearray(open(path, "rb").read())
    at = {
        "first chunk": entry.data_offset + 5,
        "last chunk": entry.data_offset + entry.data_length - 1,
        # The MACs are in the tensor's header, just before its data length and data.
        "MAC": entry.data_offset - 8 - 3,
    }[where]
    data[at] ^= 0x40
    bad = tmp_path / "bad.tensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        EncryptionError,
        match=rf"cannot decrypt {bad} with the key in "
        rf"{keyfile}: wrong key \(or corrupted data\)",
    ):
        read_ours(str(bad), encryption_keyfile=keyfile)


def test_changed_bytes_in_encrypted_headers_never_crash(encrypted, tmp_path):
    """Bit flips in the tensor headers (names, shapes, crypt info with nonces and MACs):
    the file reads, or one of this package's errors names it."""
    import random

    path, keyfile, _ = encrypted
    with open_encrypted(path, keyfile) as reader:
        regions = [range(e.offset, e.data_offset) for _, e in reader.index.items()]
    data = open(path, "rb").read()
    rnd = random.Random(11)
    bad = tmp_path / "flipped.tensors"
    outcomes = set()
    for _ in range(60):
        flipped = bytearray(data)
        flipped[rnd.choice(rnd.choice(regions))] ^= 1 << rnd.randrange(8)
        bad.write_bytes(bytes(flipped))
        try:
            read_ours(str(bad), encryption_keyfile=keyfile)
            outcomes.add("read")
        except TensorizeError as e:
            assert str(bad) in str(e)
            outcomes.add(type(e).__name__)
    assert "EncryptionError" in outcomes


def read_staged(path, readers, device="cpu", **kwargs) -> dict[str, torch.Tensor]:
    with open_tensors(path) as reader:
        spans = local_read.LocalEngine(path).spans(reader.file)
    got = local_read.read_spans(path, spans, readers, device=device, staged=True, **kwargs)
    return {span.name: tensor for span, tensor in zip(spans, got)}


# The staging path serves GPUs: pinned buffers and CUDA streams cannot run on this CPU-only
# machine, so these tests run its bookkeeping (pieces packed into two buffers per reader,
# buffers reused, copies out of them) with plain CPU buffers; the CUDA test below runs only
# where a GPU is present.
@pytest.mark.parametrize("readers", [1, 3])
@pytest.mark.parametrize("staging", [4096, 4096 + 512, 1 << 20])
def test_staged_reads_through_reused_buffers(path, readers, staging, monkeypatch):
    monkeypatch.setattr(staged_read, "STAGING_BYTES", staging)
    filled = []
    real = LocalSource.read_into
    monkeypatch.setattr(
        LocalSource,
        "read_into",
        lambda self, offset, view, *a: filled.append(view.obj) or real(self, offset, view, *a),
    )
    assert_same(read_staged(path, readers), tensorizer_reads(path))
    assert all(len(buffer) <= staging for buffer in filled)
    buffers = {id(buffer) for buffer in filled}
    if staging == 4096:  # 51 200 bytes of "w" alone: each reader's two buffers reused
        assert len(buffers) <= 2 * readers < len(filled)


@pytest.mark.parametrize("readers", [1, 3])
@pytest.mark.parametrize("count, streams", [(3, 1), (4, 2)])
def test_staged_reads_through_a_ring_of_buffers(path, readers, count, streams, monkeypatch):
    """More staging buffers per reader (and, on CUDA, streams): the same bytes, each
    reader's `count` buffers reused in turn."""
    monkeypatch.setattr(staged_read, "STAGING_BYTES", 4096)
    monkeypatch.setattr(staged_read, "STAGING_BUFFERS", count)
    monkeypatch.setattr(staged_read, "STAGING_STREAMS", streams)
    filled = []
    real = LocalSource.read_into
    monkeypatch.setattr(
        LocalSource,
        "read_into",
        lambda self, offset, view, *a: filled.append(view.obj) or real(self, offset, view, *a),
    )
    assert_same(read_staged(path, readers), tensorizer_reads(path))
    buffers = {id(buffer) for buffer in filled}
    assert readers * count >= len(buffers) > readers * 2 - 1 and len(filled) > len(buffers)


@pytest.mark.parametrize("window", [0, 4096, 20000, 1 << 30])
def test_read_ahead_asks_for_each_piece_once_within_its_window(path, window, monkeypatch):
    """Cold reads: before reading a piece, a reader asks the kernel for the pieces that
    follow, up to READ_AHEAD_BYTES past it (posix_fadvise WILLNEED); the bytes are the same."""
    monkeypatch.setattr(local_read, "READ_AHEAD_BYTES", window)
    monkeypatch.setattr(local_read, "PIECE_BYTES", 4096)
    asked: list[tuple[int, int]] = []
    read_at: list[int] = []
    real_advise, real_read = os.posix_fadvise, LocalSource.read_into

    def advise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        asked.append((offset, length))
        real_advise(fd, offset, length, advice)

    def read(self, offset, view, *a):
        ahead = sum(n for o, n in asked if o > offset)  # asked for, beyond this piece
        assert ahead <= window, (offset, ahead)
        read_at.append(offset)
        real_read(self, offset, view, *a)

    with open_tensors(path) as reader:  # opening asks for the headers' pages: not counted
        spans = local_read.LocalEngine(path).spans(reader.file)
    monkeypatch.setattr(local_read.os, "posix_fadvise", advise)
    monkeypatch.setattr(LocalSource, "read_into", read)
    got = local_read.read_spans(path, spans, 1)
    assert_same({s.name: t for s, t in zip(spans, got)}, tensorizer_reads(path))
    if window == 0:
        assert asked == []
    else:
        assert sorted(o for o, _ in asked) == sorted(read_at)  # each piece once


def test_staged_read_of_a_file_cut_short(path, monkeypatch):
    monkeypatch.setattr(staged_read, "STAGING_BYTES", 8192)
    with open_tensors(path) as reader:
        spans = local_read.LocalEngine(path).spans(reader.file)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(FormatError, match=r"truncated: tensor later ends past the end"):
        local_read.read_spans(path, spans, 2, staged=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("readers", [1, 2])
def test_onto_a_gpu_through_pinned_buffers(path, readers, monkeypatch):
    monkeypatch.setattr(staged_read, "STAGING_BYTES", 8192)
    config = TensorizerConfig(tensorizer_uri=path, num_readers=readers)
    with open_tensors(path, config=config, device="cuda:0") as reader:
        got = dict(reader.items())
    assert {t.device.type for t in got.values()} == {"cuda"}
    assert_same({n: t.cpu() for n, t in got.items()}, tensors())


def test_where_the_readers_spent_their_time(path, encrypted):
    with open_tensors(path) as reader:
        began = time.perf_counter()
        read = dict(reader.items())
        wall = time.perf_counter() - began
        times = reader.read_times
        stats = load_into_module(torch.nn.Module(), reader, strict=False)
    assert_same(read, tensors())
    assert stats.read_times is reader.read_times  # of the load's own items()
    # 4 KiB pieces of about 52 KB: split between the 8 readers a local load starts with
    assert times.readers == 8
    assert times.reading > 0 and times.populating > 0 and times.decrypting == 0
    assert times.populating + times.reading <= times.readers * wall
    shown = str(times)
    assert shown.startswith("8 readers: making pages present ") and ", reading " in shown
    assert "decrypting" not in shown and shown.endswith(" s (summed over readers)")

    encrypted_path, keyfile, _ = encrypted
    with open_encrypted(encrypted_path, keyfile) as reader:
        dict(reader.items())
        assert reader.read_times.decrypting > 0 and ", decrypting " in str(reader.read_times)

    config = TensorizerConfig(tensorizer_uri=path, deserialization_kwargs={"plaid_mode": False})
    with open_tensors(path, config=config) as reader:
        dict(reader.items())  # a setting only tensorizer's reader knows: no figures of ours
        assert reader.read_times is None
