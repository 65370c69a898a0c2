"""`read.scatter.read_scattered`: many small reads of one local file in few ``preadv``
calls put each range's bytes, and only those, where it was asked; a call that reads short
(a file that ends early) hands its reads to the fallback, one by one."""

from __future__ import annotations

import os

import pytest
import torch

from tensorize_vllm_model.read import scatter
from tensorize_vllm_model.read.scatter import read_scattered


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
