"""Host memory of a load, measured in a fresh process (tests/support/memory_probe.py) for every
source: local disk, HTTP and S3 (moto), by parallel byte ranges and as one response, plain,
encrypted and with hash checks. After the tensors are freed the process is back within 10% of the tensor
bytes of where it started; during the load it never holds more than the tensors plus the
read-ahead window (docs/design.md, Guarantees). Memory figures, not timings."""

from __future__ import annotations

import uuid

import pytest
import torch

from tensorize_vllm_model.format.keys import generate_key
from tensorize_vllm_model.format.record import FileRecord
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.storage.ranged import DEFAULT_CHUNK_SIZE, DEFAULT_WORKERS
from tests.support import BUCKET
from tests.support.memory import probe

MiB = 1024 * 1024
TENSOR_BYTES = 128 * MiB
WINDOW = DEFAULT_WORKERS * DEFAULT_CHUNK_SIZE  # the range reader's read-ahead
# What the process may add during a load besides the tensors and the window: the index,
# the 1 MiB kept head of a one-response read, botocore's 1 MiB read pieces in each reader
# thread, thread stacks (6 MiB measured over S3 ranges).
SLACK = 12 * MiB


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 128 MiB model (16 float32 tensors of 8 MiB) and a small one, plain and encrypted,
    with the key."""
    root = tmp_path_factory.mktemp("memory")
    key = generate_key()
    (root / "model.key").write_bytes(key)
    torch.manual_seed(0)
    big = [(f"layer{i}.weight", torch.randn(2048, 1024), False) for i in range(16)]
    small = [("w", torch.randn(64, 64), False)]
    for name, tensors in (("big", big), ("small", small)):
        for suffix, file_key in (("", None), ("-encrypted", key)):
            write_tensors(
                str(root / f"{name}{suffix}.tensors"),
                tensors,
                record=FileRecord(architecture="Probe"),
                key=file_key,
            ).commit()
    return root


SOURCES = ["local", "http-ranges", "http-one-response", "s3-ranges", "s3-one-response"]
CASES = [(source, kind) for source in SOURCES for kind in ("plain", "encrypted", "verify-hash")]


@pytest.mark.parametrize("source, kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_memory_returns_after_a_load(source, kind, files, request, web_root):
    encrypted = kind == "encrypted"
    suffix = "-encrypted" if encrypted else ""
    config: dict = {"encryption_keyfile": str(files / "model.key")} if encrypted else {}
    config["verify_hash"] = kind == "verify-hash"
    if source == "local":
        base = str(files)
    elif source.startswith("http"):
        prefix = uuid.uuid4().hex
        (web_root / prefix).mkdir()
        for name in ("big", "small"):
            (web_root / prefix / f"{name}{suffix}.tensors").write_bytes(
                (files / f"{name}{suffix}.tensors").read_bytes()
            )
        base = f"{request.getfixturevalue('web_servers')['http-1.1'].url}/{prefix}"
    else:
        moto = request.getfixturevalue("moto")
        prefix = uuid.uuid4().hex
        for name in ("big", "small"):
            moto.client().upload_file(
                str(files / f"{name}{suffix}.tensors"), BUCKET, f"{prefix}/{name}{suffix}.tensors"
            )
        base = f"s3://{BUCKET}/{prefix}"
        config.update(
            s3_endpoint=moto.endpoint, s3_access_key_id="testing", s3_secret_access_key="testing"
        )
        config["stream_kwargs"] = {"force_http": True}
    if source.endswith("one-response"):
        config.setdefault("stream_kwargs", {})["ranges"] = False
    result = probe(f"{base}/big{suffix}.tensors", f"{base}/small{suffix}.tensors", config)

    assert result["tensor_bytes"] == TENSOR_BYTES
    kept = result["after"] - result["before"]
    assert kept <= 0.1 * TENSOR_BYTES, f"{kept / MiB:.1f} MiB kept after the tensors were freed"
    window = 0 if source == "local" or source.endswith("one-response") else WINDOW
    held = result["peak"] - result["before"]
    assert held <= TENSOR_BYTES + window + SLACK, (
        f"{held / MiB:.1f} MiB held at the peak: more than the tensors "
        f"({TENSOR_BYTES // MiB} MiB) and the read-ahead window ({window // MiB} MiB)"
    )
