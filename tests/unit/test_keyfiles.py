"""Key files are never overwritten, locally or on S3, and neither is any other file the
package writes outside the serialized directory.

A serialize given a key file that exists encrypts with the key it holds (the command line
says so); a new key is written only where no file is, and not even over one that appears
while the serialize runs. The serializes here are the real `tensorize_vllm_model` (and the
real command line) with the stand-in engine of tests/support/fake_engine.py (no vLLM engine
start).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tensorize_vllm_model import EncryptionError, StorageError, TensorizerConfig, storage
from tensorize_vllm_model.format.keys import generate_key, prepare_key, stage_key, write_key
from tensorize_vllm_model.read.reader import open_tensors
from tests.support import BUCKET
from tests.support.fake_engine import FakeEngine, engine_args

S3 = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing", "force_http": True}


def serialize(tiny_llama: Path, directory: Path, key: Path, **kwargs):
    from tensorize_vllm_model.integrations.vllm.serialize import tensorize_vllm_model

    return tensorize_vllm_model(
        engine_args(tiny_llama),
        TensorizerConfig(
            tensorizer_uri=str(directory / "model.tensors"), encryption_keyfile=str(key)
        ),
        **kwargs,
    )


def state(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode & 0o777


def decrypts_with(tensors: Path, key: Path) -> bool:
    config = TensorizerConfig(tensorizer_uri=str(tensors), encryption_keyfile=str(key))
    try:
        with open_tensors(str(tensors), config=config) as reader:
            values = {name: float(t.flatten()[0]) for name, t in reader.items()}
    except EncryptionError:
        return False
    return values == {f"layers.{i}.weight": float(i) for i in range(4)}


@pytest.mark.parametrize("generate_keyfile", [True, False])
def test_existing_key_is_used_and_left_as_it_is(
    fake_engine, tiny_llama, tmp_path, generate_keyfile
):
    key = tmp_path / "keys" / "model.key"
    key.parent.mkdir()
    key.write_bytes(generate_key())
    key.chmod(0o600)
    before = state(key)
    directory = tmp_path / "out"
    result = serialize(tiny_llama, directory, key, generate_keyfile=generate_keyfile)
    assert result.key_existing and result.keyfile == str(key)
    assert state(key) == before  # same bytes, inode, mtime and mode
    assert os.listdir(key.parent) == ["model.key"]  # no temporary, no kept copy
    assert str(key) not in result.files
    assert decrypts_with(directory / "model.tensors", key)
    other = tmp_path / "other.key"
    other.write_bytes(generate_key())
    assert not decrypts_with(directory / "model.tensors", other)


def test_new_key_only_where_no_file_is(fake_engine, tiny_llama, tmp_path):
    key = tmp_path / "keys" / "new.key"
    result = serialize(tiny_llama, tmp_path / "out", key)
    assert not result.key_existing and str(key) in result.files
    assert len(key.read_bytes()) == 32 and key.stat().st_mode & 0o777 == 0o600
    assert decrypts_with(tmp_path / "out" / "model.tensors", key)


def test_existing_file_that_is_not_a_key_is_refused_before_any_engine(
    fake_engine, tiny_llama, tmp_path
):
    key = tmp_path / "notes.txt"
    key.write_bytes(b"my notes\n")
    before = state(key)
    with pytest.raises(EncryptionError, match=rf"the key file {key} holds 9 bytes"):
        serialize(tiny_llama, tmp_path / "out", key)
    assert fake_engine.instances == [] and state(key) == before
    assert not (tmp_path / "out").exists()


def test_generate_keyfile_false_needs_the_file(fake_engine, tiny_llama, tmp_path):
    key = tmp_path / "missing.key"
    with pytest.raises(EncryptionError, match=rf"the key file {key} does not exist"):
        serialize(tiny_llama, tmp_path / "out", key, generate_keyfile=False)
    assert fake_engine.instances == [] and not key.exists()


def test_a_key_file_that_appears_meanwhile_is_not_replaced(
    fake_engine, tiny_llama, tmp_path, monkeypatch
):
    """Another process writes the key file while the model loads: its file stays, and the
    serialize fails publishing nothing (the model would be encrypted with a lost key)."""
    key = tmp_path / "model.key"
    theirs = generate_key()
    real_rpc = FakeEngine.rpc

    def rpc(self, method, **kwargs):
        if method == "tensorize_vllm_model_save":
            key.write_bytes(theirs)
        return real_rpc(self, method, **kwargs)

    monkeypatch.setattr(FakeEngine, "rpc", rpc)
    directory = tmp_path / "out"
    with pytest.raises(StorageError, match=rf"{key} already exists; it was left as it is"):
        serialize(tiny_llama, directory, key)
    assert key.read_bytes() == theirs
    assert sorted(os.listdir(tmp_path)) == ["model.key", "out"]  # no temporary left
    assert not [n for n in os.listdir(directory) if not n.startswith(".")]  # nothing published


def test_staged_key_never_replaces_a_local_file(tmp_path):
    key = tmp_path / "k"
    tx = storage.transaction()
    stage_key(tx, str(key), generate_key())
    key.write_bytes(b"x" * 32)
    with pytest.raises(StorageError, match="already exists"):
        tx.commit()  # a failed commit rolls back: the temporary is removed
    assert key.read_bytes() == b"x" * 32 and os.listdir(tmp_path) == ["k"]


def test_s3_key_never_replaced(moto):
    client = moto.client()
    prefix = uuid.uuid4().hex
    uri = f"s3://{BUCKET}/{prefix}/model.key"
    config = TensorizerConfig(
        tensorizer_uri=f"s3://{BUCKET}/{prefix}/model.tensors",
        stream_kwargs={**S3, "s3_endpoint": moto.endpoint},
    )
    existing = generate_key()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/model.key", Body=existing)
    prepared = prepare_key(uri, config)
    assert prepared.existing and prepared.key == existing
    with storage.transaction(config.options) as tx:
        assert prepared.stage(tx) is None  # an existing key: nothing to write

    fresh = f"s3://{BUCKET}/{prefix}/fresh.key"
    prepared = prepare_key(fresh, config)
    assert not prepared.existing
    # An object appears at the key before the new key is published: S3's conditional
    # write (If-None-Match) keeps it.
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/fresh.key", Body=b"theirs")
    with pytest.raises(StorageError, match=f"{fresh} already exists; it was left as it is"):
        with storage.transaction(config.options) as tx:
            prepared.stage(tx)
    assert client.get_object(Bucket=BUCKET, Key=f"{prefix}/fresh.key")["Body"].read() == b"theirs"

    other = f"s3://{BUCKET}/{prefix}/other.key"
    prepared = prepare_key(other, config)
    with storage.transaction(config.options) as tx:
        prepared.stage(tx)
    assert (
        client.get_object(Bucket=BUCKET, Key=f"{prefix}/other.key")["Body"].read() == prepared.key
    )


@pytest.mark.parametrize("race", [False, True], ids=["there-before", "appears-after-the-check"])
def test_s3_upload_that_must_not_replace(moto, monkeypatch, tmp_path, race):
    """An object at the key is kept: found by the check before the upload, or, when it
    appears after that check, by S3's conditional write (If-None-Match: *, which moto
    implements as AWS does)."""
    from tensorize_vllm_model.storage import s3 as s3_backend

    client = moto.client()
    prefix = uuid.uuid4().hex
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/k", Body=b"theirs")
    if race:
        monkeypatch.setattr(s3_backend.S3Backend, "exists", lambda self, uri, options: False)
    options = storage.StreamOptions.from_mapping({**S3, "s3_endpoint": moto.endpoint})
    ours = tmp_path / "ours"
    ours.write_bytes(b"ours")
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/{prefix}/k already exists"):
        s3_backend.upload(str(ours), f"s3://{BUCKET}/{prefix}/k", options, replace=False)
    assert client.get_object(Bucket=BUCKET, Key=f"{prefix}/k")["Body"].read() == b"theirs"


@pytest.mark.parametrize("hard_links", [True, False])
def test_local_publish_that_must_not_replace(tmp_path, monkeypatch, hard_links):
    """Without hard links (some network file systems) the name is created exclusively."""
    from tensorize_vllm_model.storage import local

    if not hard_links:

        def no_link(*args):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(local.os, "link", no_link)
    key = tmp_path / "new.key"
    write_key(str(key), b"k" * 32)
    assert key.read_bytes() == b"k" * 32 and key.stat().st_mode & 0o777 == 0o600
    tx = storage.transaction()
    stage_key(tx, str(key), b"z" * 32)
    with pytest.raises(StorageError, match=f"{key} already exists"):
        tx.commit()
    assert key.read_bytes() == b"k" * 32 and os.listdir(tmp_path) == ["new.key"]


# -- the command line ----------------------------------------------------------------------


def cli_serialize(main, capsys, model: Path, directory: Path, key: Path) -> tuple[int, str]:
    """``serialize --serialized-directory DIRECTORY --suffix v1 --keyfile KEY`` through the
    command line's `main`: (exit code, stdout)."""
    argv = ["--model", model, "serialize", "--serialized-directory", directory, "--suffix", "v1"]
    code = main([str(a) for a in argv] + ["--keyfile", str(key)])
    return code, capsys.readouterr().out


def test_cli_existing_key(cli_with_fake_engine, tiny_llama, tmp_path, capsys):
    key = tmp_path / "model.key"
    key.write_bytes(generate_key())
    before = state(key)
    code, out = cli_serialize(cli_with_fake_engine, capsys, tiny_llama, tmp_path / "out", key)
    assert code == 0, out
    assert out.splitlines()[0] == f"encrypting with the existing key in {key}"
    assert f"  encrypted with the existing key in {key} (left unchanged)" in out
    assert "key saved" not in out
    assert state(key) == before
    assert decrypts_with(tmp_path / "out" / "vllm" / "tiny-llama" / "v1" / "model.tensors", key)


def test_cli_new_key(cli_with_fake_engine, tiny_llama, tmp_path, capsys):
    key = tmp_path / "keys" / "model.key"
    code, out = cli_serialize(cli_with_fake_engine, capsys, tiny_llama, tmp_path / "out", key)
    assert code == 0, out
    assert "encrypting with the existing key" not in out
    assert f"  key saved to {key} (mode 0600): keep it to load the model" in out
    assert len(key.read_bytes()) == 32


# -- the other files written outside the serialized directory ------------------------------


def test_adapter_directory_refuses_a_planted_link(tmp_path, monkeypatch):
    """Materialized adapters go to a private per-user directory in a shared place; if its
    name is taken by a link (anyone can create names in /dev/shm), nothing is written."""
    from tensorize_vllm_model.artifacts import lora

    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(
        lora.os, "access", lambda p, m: False if p == "/dev/shm" else real_access(p, m)
    )
    (tmp_path / "cache").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache" / f"tensorize_vllm_model-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(StorageError, match="is not a directory of this user"):
        lora._ram_root()
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize(
    ("keyfile", "line"),
    [
        (
            "/keys/model.key",
            "  key saved to /keys/model.key (mode 0600): keep it to load the model",
        ),
        (
            "s3://bucket/model.key",
            "  key saved to s3://bucket/model.key: keep it to load the model",
        ),
    ],
)
def test_new_key_line_gives_a_file_mode_only_for_local_keys(capsys, keyfile, line):
    import types

    from tensorize_vllm_model.cli.output import print_written

    print_written(
        types.SimpleNamespace(files=[], keyfile=keyfile, key_existing=False, directory="/out")
    )
    assert capsys.readouterr().out.splitlines() == [line, "/out"]
