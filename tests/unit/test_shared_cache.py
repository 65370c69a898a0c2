"""A cache directory shared by several users (mode 1777, as /tmp): shared mode gives each
user a private 0700 ``user-<uid>`` sub-directory, so a second user's fetch works (it was
"AccessDenied: cannot write into .../models") and no user's files, decrypted LoRA adapters
included, are visible to another. A second user's process cannot run here (the venv lives
in root's home), so the other user is shown by a directory chowned to ``nobody``."""

from __future__ import annotations

import os
import stat

import pytest

from tensorize_vllm_model.core.errors import ConfigError
from tensorize_vllm_model.core.settings import environment


def test_a_private_cache_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(tmp_path))
    assert environment().cache_dir == str(tmp_path)


# 3775: a team's directory (setgid, group-writable, sticky), once used as one user's, so
# the second user of the group got "Permission denied" writing into it.
@pytest.mark.parametrize("mode", [0o1777, 0o3775])
def test_a_shared_cache_gives_each_user_a_private_directory(tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(shared))
    cache = environment().cache_dir
    assert cache == str(shared / f"user-{os.getuid()}")
    info = os.stat(cache)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o700)
    assert environment().cache_dir == cache  # the same one next time


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make another user's directory")
def test_another_users_directory_at_our_name_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / f"user-{os.getuid()}").mkdir(parents=True)
    os.chown(shared / f"user-{os.getuid()}", 65534, 65534)  # made first by "nobody"
    os.chmod(shared, 0o1777)
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(shared))
    with pytest.raises(ConfigError, match="is not a directory of this user"):
        assert environment().cache_dir
