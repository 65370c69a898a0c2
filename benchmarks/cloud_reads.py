"""Google Cloud Storage and Azure Blob ranged reads, from the same emulator, side by side:

    .venv/bin/python benchmarks/cloud_reads.py [--size-mb 256] [--repeats 3]

(``make bench-cloud``). One safetensors file of `--size-mb` MB on fake-gcs-server and on
Azurite (loopback, started here as the tests start them), read whole into memory by:
  ours      storage.open_read (parallel byte ranges of one generation / ETag, 4 workers,
            16 MiB chunks, streamed into the window buffers) into a preallocated buffer;
  runai     runai-model-streamer 0.17 with its GCS / Azure backend (SafetensorsStreamer,
            every tensor yielded);
  ceiling   one GET of the whole object into a preallocated buffer (requests' readinto for
            GCS, azure-storage-blob's download_blob().readinto for Azure): what one
            response from the emulator can give.
Methods alternate run by run; each figure is the median GB/s of `--repeats` runs with min
and max. Prints a table and writes benchmarks/results/cloud.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))  # the emulators, as the tests run them
sys.path.insert(0, str(HERE.parent / "src"))

BUCKET = "bench"
NAME = "model.safetensors"


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


def azure_ceiling(connection: str, size: int) -> Callable[[], None]:
    from azure.storage.blob import BlobClient

    buffer = bytearray(size)
    blob = BlobClient.from_connection_string(connection, BUCKET, NAME, max_single_get_size=size)

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


def measure(methods: dict[str, Callable[[], None]], size: int, repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, read in methods.items():  # alternate the methods run by run
            start = time.perf_counter()
            read()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "gb_s": size / 1e9 / statistics.median(t),
            "min": size / 1e9 / max(t),
            "max": size / 1e9 / min(t),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from servers import AzuriteServer, FakeGCSServer

    work = Path(tempfile.mkdtemp(prefix="bench-cloud-"))
    data = make_file(work / NAME, args.size_mb)
    gcs = FakeGCSServer(work / "gcs", buckets=(BUCKET,))
    azurite = AzuriteServer(work / "azurite")
    try:
        gcs.client().bucket(BUCKET).blob(NAME).upload_from_string(data)
        azurite.client().create_container(BUCKET)
        azurite.client().get_container_client(BUCKET).upload_blob(NAME, data)
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint  # ours
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = gcs.endpoint  # run:ai's (google-cloud-cpp)
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string()  # both
        size = len(data)
        results = {
            "gs": measure(
                {
                    "ours": ours(f"gs://{BUCKET}/{NAME}", size),
                    "runai": runai(f"gs://{BUCKET}/{NAME}", size),
                    "ceiling": gcs_ceiling(gcs.endpoint, size),
                },
                size,
                args.repeats,
            ),
            "az": measure(
                {
                    "ours": ours(f"az://{BUCKET}/{NAME}", size),
                    "runai": runai(f"az://{BUCKET}/{NAME}", size),
                    "ceiling": azure_ceiling(azurite.connection_string(), size),
                },
                size,
                args.repeats,
            ),
        }
    finally:
        gcs.stop()
        azurite.stop()
    print(f"{size / 1e6:.0f} MB, median GB/s (min-max) of {args.repeats} runs")
    for store, rows in results.items():
        for method, r in rows.items():
            print(f"  {store}  {method:8s} {r['gb_s']:.3f} ({r['min']:.3f}-{r['max']:.3f})")
    out = HERE / "results" / "cloud.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"size_bytes": size, "repeats": args.repeats, **results}, indent=2))


if __name__ == "__main__":
    main()
