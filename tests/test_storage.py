"""URI schemes, staged (all-or-nothing) writes and key files."""

import os
import stat

import pytest

from tensorize_vllm_model import ConfigError, EncryptionError, StorageError, keys, storage


def test_unknown_scheme_lists_supported():
    with pytest.raises(ConfigError, match=r"'gs'.*s3://.*http://.*https://"):
        storage.scheme_of("gs://bucket/model.tensors")


@pytest.mark.parametrize(
    "uri,scheme",
    [
        ("/a/b", "file"),
        ("rel/b", "file"),
        ("s3://b/k", "s3"),
        ("HTTPS://h/x", "https"),
        ("http://h/x", "http"),
    ],
)
def test_schemes(uri, scheme):
    assert storage.scheme_of(uri) == scheme


def test_staged_write_appears_only_on_commit(tmp_path):
    final = tmp_path / "sub" / "model.tensors"
    with storage.transaction() as tx:
        staged = tx.stage(str(final))
        with open(staged.path, "wb") as f:
            f.write(b"new")
        assert not final.exists()
        assert os.path.dirname(staged.path) == str(final.parent)
    assert final.read_bytes() == b"new"
    assert not os.path.exists(staged.path)


def test_aborted_write_keeps_earlier_file(tmp_path):
    final = tmp_path / "model.tensors"
    final.write_bytes(b"good old model")
    tx = storage.transaction()
    staged = tx.stage(str(final))
    with open(staged.path, "wb") as f:
        f.write(b"half")
    tx.rollback()
    assert final.read_bytes() == b"good old model"
    assert os.listdir(tmp_path) == ["model.tensors"]


def test_http_is_read_only():
    with pytest.raises(ConfigError, match="read-only"):
        storage.transaction().stage("https://example.com/model.tensors")


def test_missing_file_named(tmp_path):
    with pytest.raises(StorageError, match=str(tmp_path / "nope")):
        storage.open_read(str(tmp_path / "nope"))


def test_key_file_mode_0600_and_round_trip(tmp_path):
    key = keys.generate_key()
    assert len(key) == 32
    with storage.transaction() as tx:
        staged = keys.stage_key(tx, str(tmp_path / "model.key"), key)
        assert stat.S_IMODE(os.stat(staged.path).st_mode) == 0o600
    path = tmp_path / "model.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys.read_key(str(path)) == key
    assert keys.generate_key() != key


def test_short_key_file_refused(tmp_path):
    path = tmp_path / "short.key"
    path.write_bytes(b"x" * 16)
    with pytest.raises(EncryptionError, match=rf"{path} holds 16 bytes.*exactly 32"):
        keys.read_key(str(path))


def test_missing_key_file_named(tmp_path):
    with pytest.raises(EncryptionError, match=str(tmp_path / "missing.key")):
        keys.read_key(str(tmp_path / "missing.key"))


def test_commit_keeps_no_copy_of_what_the_last_file_replaces(tmp_path, monkeypatch):
    """Every replaced file but the last is kept aside until the commit ends (a later
    failure puts it back); after the last publish nothing can fail, so no copy of a large
    tensors file is made (on S3 a server-side copy)."""
    from tensorize_vllm_model.storage.local import LocalBackend

    kept: list[str] = []
    real = LocalBackend.keep_aside

    def keep_aside(self, uri, backup, options):
        kept.append(uri)
        real(self, uri, backup, options)

    monkeypatch.setattr(LocalBackend, "keep_aside", keep_aside)
    for name in ("config.json", "model.tensors"):
        (tmp_path / name).write_bytes(b"old")
    with storage.transaction() as tx:
        for name, last in (("model.tensors", True), ("config.json", False)):
            staged = tx.stage(str(tmp_path / name), last=last)
            with open(staged.path, "wb") as f:
                f.write(b"new")
    assert kept == [str(tmp_path / "config.json")]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.tensors"]
    assert (tmp_path / "model.tensors").read_bytes() == b"new"
