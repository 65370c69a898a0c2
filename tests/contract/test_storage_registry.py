"""The backend registry is open: another package adds a scheme through the entry-point group
``tensorize_vllm_model.storage_backends`` (a real distribution's metadata on sys.path, in a
fresh interpreter), with its own ``stream_kwargs`` keys that it validates itself; the
generic layer names none of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tensorize_vllm_model import ConfigError, storage
from tensorize_vllm_model.storage import options as generic_options
from tests.support.commands import subprocess_env

PLUGIN = '''
"""A tiny third-party backend: mem://NAME serves bytes kept in this process."""
from tensorize_vllm_model.core.errors import ConfigError, NotFound
from tensorize_vllm_model.storage import Backend, retry

FILES = {}


class MemSource(retry.RetryingSource):
    supports_ranges = True

    def __init__(self, uri, options):
        if uri not in FILES:
            raise NotFound(f"no such object: {uri}")
        self.name, self.timeout, self.size = uri, options.timeout, len(FILES[uri])

    def _open_range(self, start, stop, log):
        import io
        data = io.BytesIO(FILES[self.name][start:stop])
        return retry.Body(data.readinto, data.close, piece=1 << 20, stall_errors=())


class MemBackend(Backend):
    option_keys = ("mem_shelf",)

    @classmethod
    def check_options(cls, values):
        if not str(values["mem_shelf"]).isidentifier():
            raise ConfigError("stream_kwargs mem_shelf must be a name")
        return values

    def range_source(self, uri, options):
        return MemSource(uri, options)
'''

CHECK = """
from tensorize_vllm_model import storage
import tensorize_vllm_memstore as mem
mem.FILES["mem://shelf/a.bin"] = b"0123456789"
print(storage.read_bytes("mem://shelf/a.bin", {"mem_shelf": "main", "chunk_size": 4}))
print("mem" in storage.supported_schemes())
try:
    storage.StreamOptions.from_mapping({"mem_shelf": "not a name"})
except storage.ConfigError as e:
    print(e)
"""


def test_a_package_adds_a_scheme_through_the_entry_point_group(tmp_path):
    (tmp_path / "tensorize_vllm_memstore.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "tensorize_vllm_memstore-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tensorize-vllm-memstore\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{storage.base.ENTRY_POINT_GROUP}]\nmem = tensorize_vllm_memstore:MemBackend\n"
    )
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "b'0123456789'",
        "True",
        "stream_kwargs mem_shelf must be a name",
    ]


def test_unknown_option_lists_every_backends_keys():
    with pytest.raises(
        ConfigError,
        match=r"unknown stream_kwargs key\(s\) 'gcs_bucket'.*"
        r"s3_endpoint.*gcs_endpoint.*azure_connection_string",
    ):
        storage.StreamOptions.from_mapping({"gcs_bucket": "x"})


def test_the_generic_options_name_no_backend_field():
    text = open(generic_options.__file__).read()
    for word in ("s3_", "gcs_", "azure_", "force_http", "addressing_style"):
        assert word not in text, word
    assert not any(k.startswith(("s3", "gcs", "azure")) for k in storage.GENERIC_KEYS)


def test_each_backend_validates_its_own_options():
    with pytest.raises(ConfigError, match="addressing_style must be one of"):
        storage.StreamOptions.from_mapping({"addressing_style": "sideways"})
    with pytest.raises(ConfigError, match="azure_endpoint must be a non-empty string"):
        storage.StreamOptions.from_mapping({"azure_endpoint": 3})
    options = storage.StreamOptions.from_mapping({"force_http": "true", "gcs_project": "p"})
    assert options.get("force_http") is True and options.get("gcs_project") == "p"
    assert "hunter2" not in repr(storage.StreamOptions(s3_secret_access_key="hunter2"))


def test_a_backend_written_from_the_guide_reads(monkeypatch):
    """docs/development.md's guide asks a source for `retry.RetryingSource` and
    `_open_range` only; such a source (no `supports_ranges`, no `open_sequential`) once
    failed every read with AttributeError. Read with ranges and without."""
    import io

    from tensorize_vllm_model.storage import base, retry

    data = bytes(range(256)) * 4096

    class GuideSource(retry.RetryingSource):
        def __init__(self, uri, options):
            self.name, self.timeout, self.size = uri, options.timeout, len(data)

        def _open_range(self, start, stop, log):
            return io.BytesIO(data[start:stop])

    class GuideBackend(storage.Backend):
        def range_source(self, uri, options):
            return GuideSource(uri, options)

    for table in (base._registry, base._classes, base._instances):  # removed afterwards
        monkeypatch.setitem(table, "guide", None)
    storage.register_backend("guide", GuideBackend)
    for ranges in (True, False):
        options = {"ranges": ranges, "chunk_size": 100_000}
        with storage.open_read("guide://x/model.tensors", options) as stream:
            stream.seek(1000)
            assert stream.read(5000) == data[1000:6000]
    assert storage.read_bytes("guide://x/model.tensors") == data
