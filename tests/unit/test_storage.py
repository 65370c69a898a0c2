"""URI schemes, staged (all-or-nothing) writes and key files."""

import os
import stat

import pytest

from tensorize_vllm_model import ConfigError, EncryptionError, StorageError, storage
from tensorize_vllm_model.format import keys


def test_unknown_scheme_lists_supported():
    with pytest.raises(ConfigError, match=r"'hdfs'.*s3://.*gs://.*az://.*http://.*https://"):
        storage.scheme_of("hdfs://bucket/model.tensors")


@pytest.mark.parametrize(
    "uri,scheme",
    [
        ("/a/b", "file"),
        ("rel/b", "file"),
        ("s3://b/k", "s3"),
        ("gs://b/k", "gs"),
        ("az://c/b", "az"),
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


@pytest.mark.parametrize("moment", ["before", "after"])
@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupt_inside_a_publish_puts_every_name_back(
    tmp_path, monkeypatch, existing, moment
):
    """Ctrl-C as a file's publish completes (the store made it visible; the transaction
    never heard back): that file once stayed, alone, while the rollback put back every
    other name (`convert` to gs:// interrupted after 5 s: exit 130, yet a lone
    model.tensors at the destination); and a kept copy of a replaced file was dropped, not
    restored. Ctrl-C just before the publish (the name still the kept file, a hard link to
    it) once left the kept copy (``.config.json.kept-XXXX``) behind: renaming a link onto
    another link of the same file does nothing. The interrupt is raised by a wrapper
    around the real publish (a signal cannot be timed to that instant)."""
    from tensorize_vllm_model.core.interrupts import Interrupted
    from tensorize_vllm_model.storage.local import LocalBackend

    real = LocalBackend.publish_object
    victim = "model.tensors" if not existing else "config.json"

    def publish_object(self, temp, uri, options, **kwargs):
        if moment == "before" and uri.endswith(victim):
            raise Interrupted(2)
        real(self, temp, uri, options, **kwargs)
        if uri.endswith(victim):
            raise Interrupted(2)

    monkeypatch.setattr(LocalBackend, "publish_object", publish_object)
    if existing:
        for name in ("config.json", "model.tensors"):
            (tmp_path / name).write_bytes(b"old")
    with pytest.raises(Interrupted), storage.transaction() as tx:
        for name, last in (("model.tensors", True), ("config.json", False)):
            staged = tx.stage(str(tmp_path / name), last=last)
            with open(staged.path, "wb") as f:
                f.write(b"new")
    if existing:  # config.json (kept aside) interrupted: both old files are back
        assert sorted(os.listdir(tmp_path)) == ["config.json", "model.tensors"]
        assert {p.read_bytes() for p in tmp_path.iterdir()} == {b"old"}
    else:  # model.tensors (last, new) interrupted: nothing is left, config.json included
        assert os.listdir(tmp_path) == []


# -- whole directories (the fetch cache, LoRA adapters written for vLLM) ------------------------


def _fill(path, names, content=b"new"):
    for name in names:
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)


def test_staged_directory_appears_whole_on_commit_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "cache" / "entry"
    final.mkdir(parents=True)
    (final / "stale.json").write_bytes(b"old")
    with storage.transaction() as tx:
        staged = tx.stage_directory(str(final))
        assert os.path.dirname(staged.path) == str(final.parent)
        assert stat.S_IMODE(os.stat(staged.path).st_mode) == 0o700
        _fill(staged.path, ["config.json", "tokenizer.json"])
        assert sorted(os.listdir(final)) == ["stale.json"]  # nothing published yet
    assert sorted(os.listdir(final)) == ["config.json", "tokenizer.json"]
    assert os.listdir(final.parent) == ["entry"]  # no temporary, no old copy left


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_failed_directory_write_leaves_nothing_and_keeps_the_old_one(tmp_path, failure):
    """A failure (or Ctrl-C) after some files are written: no partial directory, the
    earlier one as it was, no temporary left."""
    final = tmp_path / "entry"
    final.mkdir()
    (final / "config.json").write_bytes(b"good old")
    with pytest.raises(failure):
        with storage.transaction() as tx:
            staged = tx.stage_directory(str(final))
            _fill(staged.path, ["config.json"])
            raise failure()
    assert os.listdir(tmp_path) == ["entry"]
    assert os.listdir(final) == ["config.json"]
    assert (final / "config.json").read_bytes() == b"good old"


def test_directory_rolled_back_after_publish_is_put_back(tmp_path):
    """A transaction that publishes a directory and then fails (a later file) puts the
    earlier directory back."""
    final = tmp_path / "entry"
    final.mkdir()
    (final / "a").write_bytes(b"old")
    tx = storage.transaction()
    _fill(tx.stage_directory(str(final)).path, ["b"])
    tx.publish()
    assert os.listdir(final) == ["b"]
    tx.rollback()
    assert os.listdir(final) == ["a"] and os.listdir(tmp_path) == ["entry"]


def test_racing_directory_publishes_end_with_one_whole_copy(tmp_path):
    """Writers racing on one cache entry (threads here: the same renames as processes):
    every one succeeds, and the entry is one writer's whole set of files."""
    import threading

    final = str(tmp_path / "entry")
    names = [f"f{i}.json" for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def write(number):
        try:
            with storage.transaction() as tx:
                staged = tx.stage_directory(final)
                _fill(staged.path, names, content=str(number).encode())
                start.wait()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(os.listdir(final)) == names
    assert len({open(os.path.join(final, n), "rb").read() for n in names}) == 1
    assert os.listdir(tmp_path) == ["entry"]


def test_temporary_directory_is_listed_only_once_published_and_removed_at_exit(tmp_path):
    final = tmp_path / "scratch"
    with pytest.raises(RuntimeError):
        with storage.transaction() as tx:
            _fill(tx.stage_directory(str(final), temporary=True).path, ["x"])
            raise RuntimeError
    assert str(final) not in storage.temporary_directories()
    assert os.listdir(tmp_path) == []
    with storage.transaction() as tx:
        _fill(tx.stage_directory(str(final), temporary=True).path, ["x"])
    assert str(final) in storage.temporary_directories()
    from tensorize_vllm_model.storage.staged import remove_temporary_directories

    remove_temporary_directories()  # what the exit hook runs
    assert not final.exists() and storage.temporary_directories() == []


def test_only_local_directories_are_staged_whole():
    with pytest.raises(ConfigError, match="only a local directory"):
        storage.transaction().stage_directory("s3://bucket/entry")


def test_being_written_while_staged(tmp_path):
    final = str(tmp_path / "model.tensors")
    tx = storage.transaction()
    tx.stage(final)
    assert storage.being_written(final)
    assert not storage.being_written(str(tmp_path / "model"))  # another name's prefix
    tx.commit()
    assert not storage.being_written(final) and os.path.exists(final)


def test_directory_that_must_not_replace_leaves_the_one_there(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "a").write_bytes(b"theirs")
    with pytest.raises(storage.AlreadyExists, match="already exists"):
        with storage.transaction() as tx:
            _fill(tx.stage_directory(str(final), replace=False).path, ["b"])
    assert os.listdir(tmp_path) == ["entry"] and os.listdir(final) == ["a"]


@pytest.mark.parametrize("uri", ["s3://models", "s3://models/"])
def test_s3_uri_without_key_named_before_any_request(uri):
    """A bucket alone is not an object: a ConfigError naming the URI, raised before any
    request (no client is made; botocore would answer ParamValidationError)."""
    with pytest.raises(ConfigError, match=f"'{uri}' names a bucket, not an object"):
        storage.open_read(uri, storage.StreamOptions())
