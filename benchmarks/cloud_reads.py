"""Google Cloud Storage and Azure Blob ranged reads, from the same emulator, side by side:

    .venv/bin/python benchmarks/cloud_reads.py [--size-mb 256] [--repeats 3]

(``make bench-cloud``). One safetensors file of `--size-mb` MB on fake-gcs-server (HTTP)
and on Azurite (HTTPS: see `azure_tls`), on loopback, started as the tests start them,
read whole into memory by:
  ours      storage.open_read (parallel byte ranges of one generation / ETag, 4 workers,
            16 MiB chunks, streamed into the window buffers) into a preallocated buffer;
  runai     runai-model-streamer 0.17 with its GCS / Azure backend (SafetensorsStreamer,
            every tensor yielded);
  ceiling   one GET of the whole object into a preallocated buffer (requests' readinto for
            GCS, azure-storage-blob's download_blob().readinto for Azure): what one
            response from the emulator can give.
Methods alternate run by run; each figure is the median GB/s of `--repeats` runs with min
and max, and ours against run:ai's as the median of each round's time ratio (both read in
the same spell of a shared machine). `--stores az` measures Azure only. Prints a table and
writes benchmarks/results/cloud.json (cloud-az.json for `--stores az`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))  # the emulators, as the tests run them
sys.path.insert(0, str(HERE.parent / "src"))

from servers import AZURITE_KEY, TLSFiles  # noqa: E402

BUCKET = "bench"
NAME = "model.safetensors"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # what run:ai's libcurl trusts
AZURE_HOST = "devstoreaccount1.localhost"  # Azurite's account, product-style
TLS_ENV = "_CLOUD_READS_TLS"  # set for the re-run in a private mount namespace


def make_file(path: Path, size_mb: int) -> bytes:
    import torch
    from safetensors.torch import save_file

    count = max(1, size_mb // 4)
    tensors = {f"t{i}": torch.randn(1024, 1024) for i in range(count)}  # 4 MiB each
    save_file(tensors, str(path))
    return path.read_bytes()


def ours(uri: str, size: int) -> Callable[[], None]:
    from tensorize_vllm_model import storage

    buffer = bytearray(size)

    def read() -> None:
        with storage.open_read(uri) as stream:
            view, done = memoryview(buffer), 0
            while done < size:
                done += stream.readinto(view[done:])

    return read


def runai(uri: str, size: int) -> Callable[[], None]:
    def read() -> None:
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(uri)
            total = sum(t.numel() * t.element_size() for _, t in streamer.get_tensors())
        assert total > 0.9 * size

    return read


def gcs_ceiling(endpoint: str, size: int) -> Callable[[], None]:
    import requests

    buffer = bytearray(size)
    url = f"{endpoint}/download/storage/v1/b/{BUCKET}/o/{NAME}?alt=media"

    def read() -> None:
        with requests.get(url, stream=True, timeout=60) as response:
            view, done = memoryview(buffer), 0
            while done < size:
                got = response.raw.readinto(view[done : done + (1 << 20)])
                if not got:
                    break
                done += got
        assert done == size

    return read


def azure_ceiling(connection: str, ca: Path, size: int) -> Callable[[], None]:
    from azure.storage.blob import BlobClient

    buffer = bytearray(size)
    blob = BlobClient.from_connection_string(
        connection, BUCKET, NAME, max_single_get_size=size, connection_verify=str(ca)
    )

    class Into:
        def __init__(self) -> None:
            self.view, self.done = memoryview(buffer), 0

        def write(self, data: bytes) -> int:
            self.view[self.done : self.done + len(data)] = data
            self.done += len(data)
            return len(data)

    def read() -> None:
        target = Into()
        blob.download_blob(max_concurrency=1).readinto(target)
        assert target.done == size

    return read


def azure_tls() -> TLSFiles | None:
    """The certificate Azurite serves HTTPS with here, its CA trusted by run:ai too; None
    where run:ai cannot be made to trust it (then its az:// reads are left out).

    run:ai's released Azure backend reads only ``https://ACCOUNT.SUFFIX`` (its connection
    string support is compiled for its own Azurite tests only), and its bundled libcurl
    trusts only SYSTEM_BUNDLE. So Azurite serves HTTPS for ``devstoreaccount1.localhost``
    (curl resolves ``*.localhost`` to loopback), and this script re-runs itself in a private
    mount namespace (``unshare -m``, as root) where SYSTEM_BUNDLE is the system's bundle
    plus the test CA: nothing outside this process tree changes. Ours reads the same
    server over the same TLS."""
    from servers import make_tls_files

    if os.environ.get(TLS_ENV):  # the re-run, in the namespace
        directory = Path(os.environ[TLS_ENV])
        return TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if os.geteuid() != 0 or not shutil.which("unshare") or not Path(SYSTEM_BUNDLE).exists():
        print("run:ai's az:// reads left out: trusting a test CA needs root and unshare")
        return None
    directory = Path(tempfile.mkdtemp(prefix="bench-cloud-tls-"))
    tls = make_tls_files(directory, names=(AZURE_HOST,))
    bundle = directory / "bundle.pem"
    bundle.write_bytes(Path(SYSTEM_BUNDLE).read_bytes() + b"\n" + tls.ca.read_bytes())
    mount = f'mount --bind "$0" {SYSTEM_BUNDLE} && exec "$@"'
    os.environ[TLS_ENV] = str(directory)
    argv = ["unshare", "-m", "sh", "-c", mount, str(bundle), sys.executable, *sys.argv]
    os.execvp("unshare", argv)


def measure(methods: dict[str, Callable[[], None]], size: int, repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, read in methods.items():  # alternate the methods run by run
            start = time.perf_counter()
            read()
            times[name].append(time.perf_counter() - start)
    result = {
        name: {
            "gb_s": size / 1e9 / statistics.median(t),
            "min": size / 1e9 / max(t),
            "max": size / 1e9 / min(t),
        }
        for name, t in times.items()
    }
    if "ours" in times and "runai" in times:  # within each round: the noise both shared
        ratios = [r / o for o, r in zip(times["ours"], times["runai"], strict=True)]
        result["ours_over_runai"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", default="gs,az", help="which of gs, az (comma-separated)")
    args = parser.parse_args()
    from servers import AzuriteServer, FakeGCSServer, make_tls_files

    stores = args.stores.split(",")
    tls = azure_tls() if "az" in stores else None
    work = Path(tempfile.mkdtemp(prefix="bench-cloud-"))
    data = make_file(work / NAME, args.size_mb)
    gcs = FakeGCSServer(work / "gcs", buckets=(BUCKET,))
    azurite = AzuriteServer(work / "azurite", tls=tls or make_tls_files(work / "tls"))
    assert azurite.tls is not None
    try:
        gcs.client().bucket(BUCKET).blob(NAME).upload_from_string(data)
        azurite.client().create_container(BUCKET)
        azurite.client().get_container_client(BUCKET).upload_blob(NAME, data)
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint  # ours
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = gcs.endpoint  # run:ai's (google-cloud-cpp)
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string()  # ours
        os.environ["AWS_CA_BUNDLE"] = str(azurite.tls.ca)  # ours: the first CA variable
        os.environ["AZURE_STORAGE_ACCOUNT_NAME"] = "devstoreaccount1"  # run:ai's
        os.environ["AZURE_STORAGE_ACCOUNT_KEY"] = AZURITE_KEY
        os.environ["AZURE_STORAGE_ENDPOINT_SUFFIX"] = f"localhost:{azurite.port}"
        size = len(data)
        az_runai = {"runai": runai(f"az://{BUCKET}/{NAME}", size)} if tls else {}
        runs = {
            "gs": lambda: measure(
                {
                    "ours": ours(f"gs://{BUCKET}/{NAME}", size),
                    "runai": runai(f"gs://{BUCKET}/{NAME}", size),
                    "ceiling": gcs_ceiling(gcs.endpoint, size),
                },
                size,
                args.repeats,
            ),
            "az": lambda: measure(
                {
                    "ours": ours(f"az://{BUCKET}/{NAME}", size),
                    **az_runai,
                    "ceiling": azure_ceiling(azurite.connection_string(), azurite.tls.ca, size),
                },
                size,
                args.repeats,
            ),
        }
        results = {store: run() for store, run in runs.items() if store in stores}
    finally:
        gcs.stop()
        azurite.stop()
        shutil.rmtree(work, ignore_errors=True)
        if os.environ.get(TLS_ENV):
            shutil.rmtree(os.environ[TLS_ENV], ignore_errors=True)
    print(f"{size / 1e6:.0f} MB, median GB/s (min-max) of {args.repeats} runs")
    for store, rows in results.items():
        for method, r in rows.items():
            if method == "ours_over_runai":
                figures = f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
                print(f"  {store}  ours/runai, each round's times: {figures}")
                continue
            print(f"  {store}  {method:8s} {r['gb_s']:.3f} ({r['min']:.3f}-{r['max']:.3f})")
    out = HERE / "results" / ("cloud.json" if len(results) == 2 else f"cloud-{args.stores}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"size_bytes": size, "repeats": args.repeats, **results}, indent=2))


if __name__ == "__main__":
    main()
