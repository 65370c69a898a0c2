"""docs/gcs-azure.md's Azurite commands work as pasted: the server line started as written
(its port and data directory moved to the test's), then the SDK with the doc's connection
string creates a container and our backend writes and reads a blob there. The doc's command
once lacked ``--skipApiVersionCheck``, so every request failed with HTTP 400
InvalidHeaderValue, and its key was a placeholder."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.support import ROOT
from tests.support.servers import azurite_program, free_port, wait_for_port

DOC = ROOT / "docs/gcs-azure.md"


def _doc_lines() -> tuple[list[str], str]:
    text = DOC.read_text()
    server = next(line for line in text.splitlines() if "azurite-blob" in line and "&" in line)
    variable = re.search(r'AZURE_STORAGE_CONNECTION_STRING="([^"]+)"', text)
    assert variable, "docs/gcs-azure.md sets no AZURE_STORAGE_CONNECTION_STRING"
    return shlex.split(server.rstrip("& ")), variable.group(1)


@pytest.mark.skipif(azurite_program() is None, reason="Azurite is not installed")
def test_azurite_commands_work_as_pasted(tmp_path, monkeypatch):
    argv, connection = _doc_lines()
    port = str(free_port())
    argv[0] = str(ROOT / argv[0])
    argv[argv.index("--blobPort") + 1] = port
    argv[argv.index("--location") + 1] = str(tmp_path / "az-data")
    connection = connection.replace("127.0.0.1:10000", f"127.0.0.1:{port}")
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(int(port), timeout=60)
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(connection).create_container("docs")
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
        from tensorize_vllm_model import storage

        with storage.transaction() as tx, open(tx.stage("az://docs/m/a.bin").path, "wb") as f:
            f.write(b"pasted")
        assert storage.read_bytes("az://docs/m/a.bin") == b"pasted"
    finally:
        server.kill()  # scratch data: no clean shutdown needed (as servers.AzuriteServer)
        server.wait()
