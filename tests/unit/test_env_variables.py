"""Each ``TENSORIZE_VLLM_MODEL_*`` variable is read where it is used, and only there: a
plain local read (`open_tensors`, the ``inspect`` command) is not refused for a bad value
of a variable that concerns another path (``TENSORIZE_VLLM_MODEL_OVERLAP=maybe`` made it
raise: every options build parsed every variable), and does not touch the cache directory.
A bad value is still refused, with one line naming the variable, by the code that uses it.
No engine: the AOT fix's switch is read by its wrapper of vLLM's load, shown here by the
setting it reads (`settings.environment().aot_fix`)."""

from __future__ import annotations

import os

import pytest
import torch

from tensorize_vllm_model import open_tensors
from tensorize_vllm_model.artifacts import compile_cache
from tensorize_vllm_model.cli import main
from tensorize_vllm_model.core import settings
from tensorize_vllm_model.core.errors import ConfigError
from tensorize_vllm_model.format.record import FileRecord
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.read import prefetch

# variable -> (a bad value, the code that uses it, the one line it is refused with)
BAD = {
    settings.OVERLAP_ENV: (
        "maybe",
        prefetch.enabled,
        "TENSORIZE_VLLM_MODEL_OVERLAP must be 1 or 0 (on or off), got 'maybe'",
    ),
    settings.PREFETCH_ENV: (
        "[1, 2]",
        lambda: prefetch.local_copy("s3://bucket/model.tensors"),
        "TENSORIZE_VLLM_MODEL_PREFETCH must be a JSON object, got '[1, 2]'",
    ),
    settings.COMPILE_CACHE_ENV: (
        "maybe",
        compile_cache.enabled,
        "TENSORIZE_VLLM_MODEL_COMPILE_CACHE must be 1 or 0 (on or off), got 'maybe'",
    ),
    settings.AOT_FIX_ENV: (
        "maybe",
        lambda: settings.environment().aot_fix,
        "TENSORIZE_VLLM_MODEL_AOT_FIX must be 1 or 0 (on or off), got 'maybe'",
    ),
}


@pytest.fixture
def tensors_file(tmp_path):
    path = tmp_path / "model.tensors"
    write_tensors(str(path), [("w", torch.ones(2, 2), False)], record=FileRecord()).commit()
    return path


@pytest.mark.parametrize("variable", sorted(BAD))
def test_a_local_read_ignores_variables_of_other_paths(monkeypatch, tensors_file, variable):
    monkeypatch.setenv(variable, BAD[variable][0])
    with open_tensors(str(tensors_file)) as reader:
        assert torch.equal(dict(reader.items())["w"], torch.ones(2, 2))


@pytest.mark.parametrize("variable", sorted(BAD))
def test_inspect_ignores_variables_of_other_paths(monkeypatch, capsys, tensors_file, variable):
    monkeypatch.setenv(variable, BAD[variable][0])
    assert main(["inspect", str(tensors_file)]) == 0
    assert "w" in capsys.readouterr().out


@pytest.mark.parametrize("variable", sorted(BAD))
def test_a_bad_value_is_refused_where_it_is_used(monkeypatch, variable):
    value, use, message = BAD[variable]
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        use()
    assert str(info.value) == message


def test_a_local_read_leaves_the_cache_directory_alone(monkeypatch, tmp_path, tensors_file):
    """The shared cache's private ``user-<uid>`` directory is made when the cache is used
    (a remote model's files), not on every read of the environment."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setenv("TENSORIZE_VLLM_MODEL_CACHE", str(shared))
    with open_tensors(str(tensors_file)) as reader:
        dict(reader.items())
    assert list(shared.iterdir()) == []
    assert settings.environment().cache_dir == str(shared / f"user-{os.getuid()}")
