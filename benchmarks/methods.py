"""One measurement, in a fresh process: ``python benchmarks/methods.py METHOD JSON-ARGS``,
or many, one forked child each: ``python benchmarks/methods.py --serve`` (see `serve`).

Prints one JSON line: seconds (the load only: imports and model construction excluded),
bytes, peak_rss (the process's peak resident memory) and baseline_rss (its resident memory
just before the load). Every method ends with the data in this process's memory (or on the
device), so a lazy method (safetensors' mmap views) is charged for touching it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
import torch

_baseline = 0


def rss() -> int:
    return psutil.Process().memory_info().rss


def begin() -> float:
    """Start the clock; the resident memory now is the baseline."""
    global _baseline
    _baseline = rss()
    return time.perf_counter()


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it is not inherited
    from the parent across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _meta_model(model_dir: str, device: str = "cpu"):
    import transformers

    from tensorize_vllm_model.read.modules import meta_parameters

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device(device), meta_parameters(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


_kept: list[torch.Tensor] = []


def _copy_all(tensors) -> int:
    """Copy lazily mapped tensors into this process's memory, as a model load does, and
    keep the copies until the process ends: a copy dropped at once would hand its memory
    to the next one, which then costs no page faults."""
    total = 0
    for tensor in tensors:
        _kept.append(tensor.clone())
        total += tensor.numel() * tensor.element_size()
    return total


# -- local file -> CPU memory ---------------------------------------------------------------


def _in_threads(size: int, threads: int, read) -> None:
    """Run read(index, begin, end) over `threads` equal parts of [0, size), one thread each."""
    bounds = [size * i // threads for i in range(threads + 1)]
    workers = [
        threading.Thread(target=read, args=(i, bounds[i], bounds[i + 1])) for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def ceiling(path: str, threads: int = 1, **_):
    """The fresh-memory ceiling: readinto freshly allocated memory, N threads."""
    size = os.path.getsize(path)
    buffer = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    start = begin()

    def read(_: int, begin: int, end: int) -> None:
        with open(path, "rb", buffering=0) as f:
            f.seek(begin)
            position = begin
            while position < end:
                position += f.readinto(view[position : min(end, position + (64 << 20))])

    _in_threads(size, threads, read)
    return time.perf_counter() - start, size


def decrypt_ceiling(path: str, keyfile: str, threads: int = 2, **_):
    """The cipher's own ceiling: the encrypted file's tensors are read into memory before
    the clock; then `threads` threads check and decrypt them in place, chunk by chunk, with
    the calls our loader makes (tensorizer's libsodium bindings)."""

    from tensorize_vllm_model import TensorizerConfig, open_tensors
    from tensorize_vllm_model.read import local as local_read

    config = TensorizerConfig(tensorizer_uri=path, encryption_keyfile=keyfile)
    with open_tensors(path, config=config) as reader:
        spans = local_read.LocalEngine(path).spans(reader.file)
    tensors = local_read.read_spans(path, [dataclasses.replace(s, cipher=None) for s in spans], 8)
    chunks = [
        (memoryview(t.reshape(-1).view(torch.uint8).numpy()), s.cipher, at)
        for s, t in zip(spans, tensors)
        if s.cipher
        for at in range(0, s.length, s.cipher.chunk_size)
    ]
    total = sum(s.length for s in spans)
    start = begin()

    def decrypt(_: int, first: int, end: int) -> None:
        for view, cipher, at in chunks[first:end]:
            cipher.decrypt(view[at : at + cipher.chunk_size], at)

    _in_threads(len(chunks), threads, decrypt)
    return time.perf_counter() - start, total


def safetensors_load(path: str, **_):
    from safetensors.torch import load_file

    start = begin()
    tensors = load_file(path)
    total = _copy_all(tensors.values())  # mmap views: copy them out, as a model load does
    return time.perf_counter() - start, total


def torch_load(path: str, **_):
    start = begin()
    state = torch.load(path, map_location="cpu", weights_only=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    return time.perf_counter() - start, total


def tensorizer_default(path: str, **_):
    from tensorizer import TensorDeserializer

    start = begin()
    deserializer = TensorDeserializer(path, device="cpu")
    total = deserializer.total_tensor_bytes
    return time.perf_counter() - start, total


def ours(
    path: str,
    model_dir: str,
    keyfile: str | None = None,
    options: dict | None = None,
    num_readers: int | None = None,
    device: str = "cpu",
    staging_mb: int | None = None,
    **_,
):
    from tensorize_vllm_model import TensorizerConfig, load_into_module, open_tensors
    from tensorize_vllm_model.read import staged

    if staging_mb:
        staged.STAGING_BYTES = staging_mb << 20

    import tensorizer  # noqa: F401 - imported before the clock, as for tensorizer_default

    model = _meta_model(model_dir, device)
    config = TensorizerConfig(
        tensorizer_uri=path, encryption_keyfile=keyfile, num_readers=num_readers, **(options or {})
    )
    _init_device(device)
    start = begin()
    with open_tensors(path, config=config, device=device) as reader:
        stats = load_into_module(model, reader, strict=False)
    _sync(device)
    seconds = time.perf_counter() - start
    times = dataclasses.asdict(stats.read_times) if stats.read_times else None
    return seconds, stats.bytes, {"read_times": times}


# -- local file -> GPU ------------------------------------------------------------------------


def _init_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.empty(1, device=device)  # the CUDA context: not part of any load
        torch.cuda.synchronize()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reused_read_ceiling(path: str, threads: int = 8, **_):
    """The page-cache read ceiling: N threads each read their part of the file in 16 MiB
    pieces into one reused buffer whose pages are already present (no page faults, nothing
    kept, no copy to a device)."""
    size = os.path.getsize(path)
    piece = 16 << 20
    buffers = [torch.ones(piece, dtype=torch.uint8) for _ in range(threads)]
    start = begin()

    def read(index: int, begin: int, end: int) -> None:
        view = memoryview(buffers[index].numpy())
        with open(path, "rb", buffering=0) as f:
            position = begin
            while position < end:
                count = os.preadv(f.fileno(), [view[: min(piece, end - position)]], position)
                if count == 0:
                    break
                position += count

    _in_threads(size, threads, read)
    return time.perf_counter() - start, size


def h2d_ceiling(path: str, device: str = "cuda:0", **_):
    """The pinned host-to-device ceiling: the file's bytes, already in pinned host memory,
    copied to the GPU in 64 MiB pieces."""
    size = os.path.getsize(path)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(host.numpy()))
    _init_device(device)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    start = begin()
    piece = 64 << 20
    for offset in range(0, size, piece):
        target[offset : offset + piece].copy_(host[offset : offset + piece], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start, size


def safetensors_cuda(path: str, device: str = "cuda:0", **_):
    from safetensors.torch import load_file

    _init_device(device)
    start = begin()
    tensors = load_file(path, device=device)
    torch.cuda.synchronize()
    return time.perf_counter() - start, sum(t.numel() * t.element_size() for t in tensors.values())


def runai(path: str, **_):
    from runai_model_streamer import SafetensorsStreamer

    start = begin()
    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path)
        for _, tensor in streamer.get_tensors():
            total += _copy_all([tensor])
    return time.perf_counter() - start, total


# -- over the network ------------------------------------------------------------------------


def curl(url: str, **_):
    start = begin()
    out = subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, int(float(out.stdout))


def response_ceiling(url: str, **_):
    """The ceiling of a remote load into memory: one response read into freshly allocated
    memory, as any loader must land it (curl writes to /dev/null through one reused
    buffer). HTTP through http.client's `readinto`; S3 through botocore's response body in
    1 MiB reads, as our loader reads it."""
    if url.startswith("s3://"):
        client, bucket, key = _s3_object(url)
        start = begin()
        response = client.get_object(Bucket=bucket, Key=key)
        size = response["ContentLength"]

        def read(view: memoryview) -> int:
            data = response["Body"].read(min(len(view), 1 << 20))
            view[: len(data)] = data
            return len(data)
    else:
        import http.client
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port)
        start = begin()
        connection.request("GET", parts.path)
        response = connection.getresponse()
        size = int(response.getheader("Content-Length"))
        read = response.readinto
    view = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
    done = 0
    while done < size:
        count = read(view[done : done + (16 << 20)])
        if not count:
            raise RuntimeError(f"{url}: the response ended at byte {done} of {size}")
        done += count
    return time.perf_counter() - start, size


def _s3_object(url: str):
    """A boto3 client for the benchmark's S3 endpoint, and the bucket and key of `url`."""
    import boto3

    bucket, key = url[5:].split("/", 1)
    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]), bucket, key


def download_then_load(url: str, **_):
    """What a user without tensorizer does: download the safetensors file, then load it."""
    start = begin()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as directory:
        local = os.path.join(directory, "model.safetensors")
        if url.startswith("s3://"):
            from boto3.s3.transfer import TransferConfig

            client, bucket, key = _s3_object(url)
            client.download_file(
                bucket, key, local, Config=TransferConfig(multipart_threshold=1 << 40)
            )
        else:
            with urllib.request.urlopen(url) as response, open(local, "wb") as f:
                shutil.copyfileobj(response, f, 16 << 20)
        _, total = safetensors_load(local)
    return time.perf_counter() - start, total


METHODS = {
    f.__name__: f
    for f in (
        ceiling,
        decrypt_ceiling,
        reused_read_ceiling,
        h2d_ceiling,
        safetensors_cuda,
        safetensors_load,
        torch_load,
        tensorizer_default,
        ours,
        runai,
        curl,
        response_ceiling,
        download_then_load,
    )
}


def _preload() -> None:
    """Imports are not part of any load: they are done before the clock starts."""
    import safetensors.torch  # noqa: F401
    import tensorizer  # noqa: F401

    import tensorize_vllm_model.read.decrypt  # noqa: F401
    import tensorize_vllm_model.read.local  # noqa: F401
    import tensorize_vllm_model.read.modules  # noqa: F401
    import tensorize_vllm_model.read.reader  # noqa: F401
    import tensorize_vllm_model.storage.http  # noqa: F401
    import tensorize_vllm_model.storage.s3  # noqa: F401

    for optional in (
        "transformers",
        "transformers.models.llama.modeling_llama",
        "runai_model_streamer",
    ):
        try:
            __import__(optional)
        except ImportError:
            pass


def _measure(name: str, args: dict) -> dict:
    seconds, total, *more = METHODS[name](**args)  # more: figures of the method's own
    return {
        "seconds": seconds,
        "bytes": total,
        "peak_rss": peak_rss(),
        "baseline_rss": _baseline,
        **(more[0] if more else {}),
    }


def serve() -> None:
    """Answer one JSON request per line ({"method": ..., "args": {...}}) with one JSON line
    ({"ok": result} or {"error": text}). Each request runs in a child forked from this
    process after its imports: a fresh process for every load (its own memory, no caches
    of an earlier load) without paying Python's, torch's and transformers' start-up again.
    This process never touches CUDA, so a child may."""
    import traceback

    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            if "environ" in request:  # the caller's, as a new process would get it
                os.environ.clear()
                os.environ.update(request["environ"])
            try:
                reply = {"ok": _measure(request["method"], request["args"])}
            except BaseException:  # noqa: BLE001 - reported to the parent
                reply = {"error": traceback.format_exc()[-3000:]}
            with os.fdopen(write, "w") as out:
                out.write(json.dumps(reply))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            text = answer.read()
        _, status = os.waitpid(pid, 0)
        print(
            text or json.dumps({"error": f"the measuring child ended with status {status}"}),
            flush=True,
        )


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    name, args = sys.argv[1], json.loads(sys.argv[2])
    _preload()
    print(json.dumps(_measure(name, args)), flush=True)


if __name__ == "__main__":
    main()
