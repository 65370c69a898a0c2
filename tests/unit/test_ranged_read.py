"""The default remote read (read/ranges.py): parallel byte ranges straight into the
tensors' memory. The plan's requests as pure logic; then real files over a real HTTP server
on loopback that records every request: the ranged GETs of a load cover the tensors' bytes
once each, with the tensor headers inside them (no request of their own); encrypted files
are decrypted across requests that split cipher chunks; a wrong key, and an object
replaced after it was opened, give their clear errors."""

from __future__ import annotations

import os
import re
import uuid
from types import SimpleNamespace

import pytest
import torch

from tensorize_vllm_model import EncryptionError, StorageError, TensorizerConfig, open_tensors
from tensorize_vllm_model.format.keys import generate_key, write_key
from tensorize_vllm_model.format.record import FileRecord
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.read.ranges import plan_requests
from tensorize_vllm_model.read.remote import RemoteSpan
from tests.support import BUCKET

MiB = 1024 * 1024


def spans_at(layout: list[tuple[int, int, int]]) -> list[RemoteSpan]:
    """Spans of (header offset, header room, data length); data follows its header."""
    return [
        RemoteSpan(
            name=f"t{i}",
            entry=SimpleNamespace(offset=at, data_offset=at + room, data_length=length),
            dtype=torch.uint8,
            shape=(length,),
        )
        for i, (at, room, length) in enumerate(layout)
    ]


def contiguous(rooms_and_lengths: list[tuple[int, int]], start: int = 100) -> list[RemoteSpan]:
    layout, at = [], start
    for room, length in rooms_and_lengths:
        layout.append((at, room, length))
        at += room + length
    return spans_at(layout)


def test_plan_cuts_the_bytes_into_chunks_with_the_headers_inside():
    spans = contiguous([(100, 3 * MiB), (90, 5000), (90, 0), (120, 6 * MiB + 7)])
    requests = plan_requests(spans, chunk_size=4 * MiB, window=16 * MiB)
    # every byte from the first header to the last tensor's end, once, in order
    assert requests[0].start == 100
    assert all(a.stop == b.start for a, b in zip(requests, requests[1:]))
    end = spans[-1].entry.data_offset + spans[-1].entry.data_length
    assert requests[-1].stop == end
    # as many requests as 4 MiB chunks of tensor data: headers ride along
    data = sum(s.entry.data_length for s in spans)
    assert len(requests) == -(-data // (4 * MiB)) == 3
    assert all(r.data <= 4 * MiB for r in requests)
    headers = [p.tensor for r in requests for p in r.pieces if p.header]
    assert headers == [0, 1, 2, 3]


def test_plan_starts_a_request_at_a_gap_and_before_a_tensor_past_the_window():
    gap = spans_at([(100, 50, 1000), (5000, 50, 1000)])  # bytes 1150-4999 not chosen
    requests = plan_requests(gap, chunk_size=MiB, window=4 * MiB)
    assert [(r.start, r.stop) for r in requests] == [(100, 1150), (5000, 6050)]
    # small tensors share one request; one larger than the window starts its own
    spans = contiguous([(50, 1000), (50, 2000), (50, 5 * MiB), (50, 10)])
    requests = plan_requests(spans, chunk_size=8 * MiB, window=4 * MiB)
    assert [[p.tensor for p in r.pieces] for r in requests] == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_gaps_leave_out_what_the_fetch_threads_decrypted():
    from tensorize_vllm_model.read.ranges import _gaps

    assert _gaps(0, 10, []) == [(0, 10)]
    assert _gaps(0, 10, [(2, 4), (6, 8)]) == [(0, 2), (4, 6), (8, 10)]
    assert _gaps(4, 6, [(0, 5)]) == [(5, 6)]
    assert _gaps(6, 4, [(0, 2)]) == []


def write_model(path, key: bytes | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    tensors = {
        "embed": torch.randn(1000, 1000),  # 4 MB: split over requests
        "norm": torch.randn(1000),
        "proj": torch.randn(700, 900).to(torch.bfloat16),
        "ids": torch.arange(333),
    }
    if key is None:  # tensorizer cannot encrypt a tensor without data
        tensors["empty"] = torch.zeros(0)
    write_tensors(
        str(path), [(n, t, False) for n, t in tensors.items()], record=FileRecord(), key=key
    ).commit()
    return tensors


def load(url: str, **config) -> dict[str, torch.Tensor]:
    with open_tensors(url, config=TensorizerConfig(tensorizer_uri=url, **config)) as reader:
        return dict(reader.items())


def ranged_gets(server, path: str) -> list[tuple[int, int]]:
    found = []
    for method, where, ask in server.requests:
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", ask or "")
        if method == "GET" and where == path and match:
            found.append((int(match.group(1)), int(match.group(2)) + 1))
    return found


def test_a_load_reads_each_byte_once_in_chunk_sized_ranges(web_servers, web_root):
    server = web_servers["http-1.1"]
    name = f"{uuid.uuid4().hex}.tensors"
    tensors = write_model(web_root / name)
    url = f"{server.url}/{name}"
    config = TensorizerConfig(tensorizer_uri=url, stream_kwargs={"chunk_size": MiB, "workers": 3})
    with open_tensors(url, config=config) as reader:
        index = reader.index
        before = len(ranged_gets(server, f"/{name}"))  # the size probe, header and index
        got = dict(reader.items())
    first = min(e.offset for e in index.values())
    end = max(e.data_offset + e.data_length for e in index.values())
    data = sum(e.data_length for e in index.values())

    for key, tensor in tensors.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    # no second probe of the file (bytes=0-0): the header's source is read on
    ranges = sorted(ranged_gets(server, f"/{name}")[before:])
    assert ranges[0][0] == first and ranges[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges  # once each
    assert len(ranges) == -(-data // MiB)  # the headers cost no request of their own


@pytest.mark.parametrize("chunk_size", [1_300_000, 3_000_000], ids=["small", "large"])
@pytest.mark.parametrize("verify_hash", [False, True], ids=["load", "verify-hash"])
def test_encrypted_over_ranges_that_split_cipher_chunks(
    web_servers, web_root, tmp_path, verify_hash, chunk_size
):
    """Requests smaller than a cipher chunk (2 MiB: the calling thread decrypts every
    chunk) and larger (the fetch threads decrypt the chunks a request holds whole, the
    calling thread those cut by its ends)."""
    server = web_servers["http-1.1"]
    key = generate_key()
    keyfile, other = tmp_path / "model.key", tmp_path / "other.key"
    write_key(str(keyfile), key)
    write_key(str(other), generate_key())
    name = f"{uuid.uuid4().hex}.tensors"
    tensors = write_model(web_root / name, key=key)
    url = f"{server.url}/{name}"
    options = {"stream_kwargs": {"chunk_size": chunk_size, "workers": 2}}
    got = load(url, encryption_keyfile=str(keyfile), verify_hash=verify_hash, **options)
    for key_name, tensor in tensors.items():
        assert torch.equal(got[key_name], tensor), key_name
    with pytest.raises(EncryptionError, match=rf"cannot decrypt {url} with the key in {other}"):
        load(url, encryption_keyfile=str(other), verify_hash=verify_hash, **options)


@pytest.mark.parametrize("same_size", [False, True], ids=["shorter", "same-size"])
@pytest.mark.parametrize("store", ["http", "s3"])
def test_an_object_replaced_after_opening_is_refused(web_servers, web_root, moto, store, same_size):
    """The tensors are read through the source the header was read from (no second probe
    of the file): a file replaced meanwhile is refused by the ranged answers, naming the
    file, not read as a mix of two files: by their Content-Range when it is shorter, by
    their ETag when it has the same size (other bytes)."""
    name = f"{uuid.uuid4().hex}.tensors"
    write_model(web_root / name)
    data = (web_root / name).read_bytes()
    # the replacement: 100 bytes shorter, or the same size with its last 100 bytes changed
    new = data[:-100] + bytes(b ^ 0xFF for b in data[-100:]) if same_size else data[:-100]
    changed = "its ETag is" if same_size else "it is"
    if store == "http":
        url, values = f"{web_servers['http-1.1'].url}/{name}", {}

        def replace():
            (web_root / f"{name}.new").write_bytes(new)  # a new file, as a deploy would
            os.replace(web_root / f"{name}.new", web_root / name)
    else:
        moto.client().put_object(Bucket=BUCKET, Key=name, Body=data)
        url = f"s3://{BUCKET}/{name}"
        values = dict(
            s3_endpoint=moto.endpoint,
            s3_access_key_id="testing",
            s3_secret_access_key="testing",
            stream_kwargs={"force_http": True},
        )

        def replace():
            moto.client().put_object(Bucket=BUCKET, Key=name, Body=new)

    with open_tensors(url, config=TensorizerConfig(tensorizer_uri=url, **values)) as reader:
        replace()
        with pytest.raises(StorageError, match=rf"{url} changed while it was read: {changed}"):
            dict(reader.items())
