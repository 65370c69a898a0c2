"""`read.scatter.read_scattered`: many small reads of one local file in few ``preadv``
calls put each range's bytes, and only those, where it was asked; a call that reads short
(a file that ends early) hands its reads to the fallback, one by one.
`read_tiles_scattered`: whole column tiles land in the columns they came from."""

from __future__ import annotations

import os

import pytest
import torch

from tensorize_vllm_model.read import scatter
from tensorize_vllm_model.read.parts import Part
from tensorize_vllm_model.read.scatter import read_scattered, read_tiles_scattered


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def test_ranges_land_where_asked(data_file, monkeypatch):
    fd, data = data_file
    monkeypatch.setattr(scatter, "IOV_MAX", 7)  # several calls, each of a few buffers
    ranges = [(0, 10), (10, 5), (100, 300), (90, 20), (200_000, 4096), (2_500_000, 1)]
    ranges += [(1000 + 50 * i, 30) for i in range(40)]  # small gaps, read and dropped
    target = torch.full((sum(n for _, n in ranges) + 8,), 7, dtype=torch.uint8)
    reads, place = [], 4
    for offset, length in ranges:
        reads.append((offset, length, target, place))
        place += length
    calls = []
    read_scattered(fd, reads, calls.append)
    assert calls == []
    place = 4
    for offset, length in ranges:
        assert bytes(target[place : place + length].tolist()) == data[offset : offset + length]
        place += length
    assert target[:4].tolist() == [7] * 4 and target[place:].tolist() == [7] * 4


def test_a_short_read_goes_to_the_fallback(data_file):
    fd, data = data_file
    target = torch.zeros(64, dtype=torch.uint8)
    reads = [(0, 16, target, 0), (len(data) - 8, 16, target, 16), (len(data) + 100, 8, target, 40)]
    calls = []
    read_scattered(fd, reads, calls.append)
    assert calls == [1, 2]  # read together (100 bytes apart), short: each alone
    assert bytes(target[:16].tolist()) == data[:16]


def test_tiles_land_in_their_columns(tmp_path, monkeypatch):
    # two [6, 8] bfloat16 weights stored in 4 column tiles ([4, 6, 2]) with a header-like
    # gap before each; the first read whole into a [6, 8] tensor, the second's tiles 1..2
    # into columns of a wider parameter (a TP rank's share), the third reaches past the end
    monkeypatch.setattr(scatter, "GAP_BYTES", 16)  # each read a preadv of its own
    weights = [torch.randn(6, 8).to(torch.bfloat16) for _ in range(2)]
    stored = [w.reshape(6, 4, 2).transpose(0, 1).contiguous() for w in weights]
    raw, offsets = b"", []
    for tiles in stored:
        raw += os.urandom(37)
        offsets.append(len(raw))
        raw += tiles.view(torch.uint8).numpy().tobytes()
    path = tmp_path / "tiles"
    path.write_bytes(raw)
    part = Part("w", None, 0, 0, dtype=torch.bfloat16, tiles=4, shape=(6, 8))
    whole = torch.zeros(6, 8, dtype=torch.bfloat16)
    wide = torch.zeros(6, 10, dtype=torch.bfloat16)
    tile = 6 * 2 * 2  # bytes of one tile
    reads = [
        (offsets[0], 4 * tile, whole, part),
        (offsets[1] + tile, 2 * tile, wide[:, 3:7], part),
        (len(raw) + 10, 2 * tile, torch.zeros(6, 4, dtype=torch.bfloat16), part),
    ]
    calls = []
    fd = os.open(path, os.O_RDONLY)
    try:
        read_tiles_scattered(fd, reads, calls.append)
    finally:
        os.close(fd)
    assert calls == [2]  # read short: left to the fallback
    assert torch.equal(whole, weights[0])
    assert torch.equal(wide[:, 3:7], weights[1][:, 2:6])
    assert not wide[:, :3].any() and not wide[:, 7:].any()  # nothing else written


def test_a_read_outside_its_tensor_is_refused_before_any_read(data_file):
    fd, _ = data_file
    target = torch.zeros(32, dtype=torch.uint8)
    for read in [(0, 16, target, 20), (0, 4, target, -1), (0, 4, torch.zeros(4, 8)[:, 0], 0)]:
        with pytest.raises(ValueError, match="does not fit its tensor"):
            read_scattered(fd, [(0, 8, target, 0), read], lambda i: None)
    assert not target.any()  # nothing was read
