"""Where a local file -> cuda:0 load spends its time, in one process (run where an NVIDIA GPU
is present, after ``run.py --scenarios gpu`` built the model): the page cache read into
pinned vs plain memory, the cost of pinning, the launch cost of one copy, and the staged
pipeline of `local_read` (re-implemented here with timers) with its time split into reads,
waits and copy launches per reader thread; then the same with one device block per reader
(one read and one copy per buffer). Device and pinned-memory caches are emptied before each
fresh-state figure, as a fresh process starts. Prints one line per figure; the H100's are in
results/gpu-h100-profile.txt."""

import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402

from tensorize_vllm_model import open_tensors  # noqa: E402
from tensorize_vllm_model.read import local as local_read  # noqa: E402
from tensorize_vllm_model.read.memory import populate  # noqa: E402
from tensorize_vllm_model.read.source import LocalSource  # noqa: E402

files = run.prepare(float(sys.argv[1]) if len(sys.argv) > 1 else 1.5)
path = files["tensors"]
size = os.path.getsize(path)
run.set_cache("warm", [path])
torch.empty(1, device="cuda:0")
torch.cuda.synchronize()
cudart = torch.cuda.cudart()


def empty() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch._C._host_emptyCache()


def read_file(threads: int, buffers: list[torch.Tensor]) -> float:
    piece = buffers[0].numel()
    bounds = [size * i // threads for i in range(threads + 1)]

    def read(i: int) -> None:
        view = memoryview(buffers[i].numpy())
        with open(path, "rb", buffering=0) as f:
            at = bounds[i]
            while at < bounds[i + 1]:
                at += os.preadv(f.fileno(), [view[: min(piece, bounds[i + 1] - at)]], at)

    workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


for threads in (4, 8):
    for pinned in (False, True):
        buffers = [
            torch.ones(8 << 20, dtype=torch.uint8, pin_memory=pinned) for _ in range(threads)
        ]
        best = min(read_file(threads, buffers) for _ in range(3))
        print(
            f"file -> reused {'pinned' if pinned else 'plain'} 8 MiB buffers, {threads} threads: "
            f"{size / best / 1e9:.2f} GB/s",
            flush=True,
        )
        del buffers

for mib in (8, 64):
    empty()
    start = time.perf_counter()
    pinned = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
    print(f"cudaHostAlloc {mib} MiB: {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
    del pinned
    plain = torch.empty(mib << 20, dtype=torch.uint8)
    start = time.perf_counter()
    populate(plain.data_ptr(), plain.numel())
    populated = time.perf_counter()
    status = cudart.cudaHostRegister(plain.data_ptr(), plain.numel(), 0)
    registered = time.perf_counter()
    print(
        f"populate {mib} MiB: {(populated - start) * 1e3:.1f} ms, then cudaHostRegister "
        f"({status}): {(registered - populated) * 1e3:.1f} ms",
        flush=True,
    )
    cudart.cudaHostUnregister(plain.data_ptr())
    del plain

with open_tensors(path, device="cuda:0") as reader:
    spans = local_read.LocalEngine(path).spans(reader.file)

# The pipeline, instrumented: the same steps as read.staged.Staged.read.
timers = {}
lock = threading.Lock()


def staged_read(run_, nbuffers, staging):
    size_ = min(staging, sum(e - s for _, _, s, e in run_))
    buffers = [torch.empty(size_, dtype=torch.uint8, pin_memory=True) for _ in range(nbuffers)]
    views = [memoryview(b.numpy()) for b in buffers]
    stream = torch.cuda.Stream("cuda:0")
    done = [None] * nbuffers
    which, used, pending = 0, 0, []
    t = {"read": 0.0, "wait": 0.0, "send": 0.0, "alloc": 0.0}
    begin = time.perf_counter()

    def send():
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            for target, at, length in pending:
                target.copy_(buffers[which][at : at + length], non_blocking=True)
        done[which] = stream.record_event()
        pending.clear()
        t["send"] += time.perf_counter() - start

    t["alloc"] = time.perf_counter() - begin
    with LocalSource(path) as source:
        for span, memory, start, end in run_:
            length = end - start
            if used + length > size_:
                send()
                which, used = (which + 1) % nbuffers, 0
                if done[which] is not None:
                    w = time.perf_counter()
                    done[which].synchronize()
                    t["wait"] += time.perf_counter() - w
            r = time.perf_counter()
            source.read_into(span.offset + start, views[which][used : used + length], span.name)
            t["read"] += time.perf_counter() - r
            pending.append((memory[start:end], used, length))
            used += length
        send()
    stream.synchronize()
    t["all"] = time.perf_counter() - begin
    with lock:
        for k, v in t.items():
            timers[k] = timers.get(k, 0.0) + v


def pipeline(readers, staging, nbuffers, keep_cache):
    from concurrent.futures import ThreadPoolExecutor

    if not keep_cache:
        empty()
    timers.clear()
    start = time.perf_counter()
    tensors, pieces = [], []
    for span in spans:
        memory = torch.empty(span.length, dtype=torch.uint8, device="cuda:0")
        tensors.append(memory)
        for s in range(0, span.length, staging):
            pieces.append((span, memory, s, min(span.length, s + staging)))
    runs = local_read._split(pieces, readers)
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda r: staged_read(r, nbuffers, staging), runs))
    seconds = time.perf_counter() - start
    print(
        f"pipeline readers={readers} staging={staging >> 20} MiB x{nbuffers}"
        f"{' (caches kept)' if keep_cache else ''}: {seconds * 1e3:.0f} ms = "
        f"{size / seconds / 1e9:.2f} GB/s; per thread: "
        + ", ".join(f"{k} {v / len(runs) * 1e3:.0f}" for k, v in timers.items())
        + " ms",
        flush=True,
    )
    return tensors


# Launch cost of one 8 MiB pinned -> device copy, one thread.
host = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True)
dev = torch.empty(8 << 20, dtype=torch.uint8, device="cuda:0")
stream = torch.cuda.Stream("cuda:0")
for slice_ in (False, True):
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(100):
            (dev[0 : 8 << 20] if slice_ else dev).copy_(
                host[0 : 8 << 20] if slice_ else host, non_blocking=True
            )
    launched = time.perf_counter()
    stream.synchronize()
    print(
        f"100 copies of 8 MiB{' (slices)' if slice_ else ''}: launch {(launched - start) * 1e4:.0f} us "
        f"each, all done {(time.perf_counter() - start) * 1e3:.0f} ms",
        flush=True,
    )


def block_read(run_, staging, nbuffers, out):
    """One device block per run, laid out as the file: one read and one copy per buffer."""
    first = run_[0][0].offset + run_[0][2]
    last = run_[-1][0].offset + run_[-1][3]
    block = torch.empty(last - first, dtype=torch.uint8, device="cuda:0")
    out.append(block)
    buffers = [torch.empty(staging, dtype=torch.uint8, pin_memory=True) for _ in range(nbuffers)]
    views = [memoryview(b.numpy()) for b in buffers]
    stream = torch.cuda.Stream("cuda:0")
    done = [None] * nbuffers
    with LocalSource(path) as source:
        for i, at in enumerate(range(first, last, staging)):
            which = i % nbuffers
            if done[which] is not None:
                done[which].synchronize()
            length = min(staging, last - at)
            source.read_into(at, views[which][:length], run_[0][0].name)
            with torch.cuda.stream(stream):
                block[at - first : at - first + length].copy_(
                    buffers[which][:length], non_blocking=True
                )
            done[which] = stream.record_event()
    stream.synchronize()


def blocks(readers, staging, nbuffers):
    from concurrent.futures import ThreadPoolExecutor

    empty()
    start = time.perf_counter()
    pieces = [
        (span, None, s, min(span.length, s + staging))
        for span in spans
        for s in range(0, span.length, staging)
    ]
    runs = local_read._split(pieces, readers)
    out = []
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda r: block_read(r, staging, nbuffers, out), runs))
    seconds = time.perf_counter() - start
    print(
        f"one device block per reader, readers={readers} staging={staging >> 20} MiB "
        f"x{nbuffers}: {seconds * 1e3:.0f} ms = {size / seconds / 1e9:.2f} GB/s",
        flush=True,
    )


for readers, mib, nbuffers in ((4, 8, 2), (4, 16, 2), (8, 8, 2), (2, 16, 2)):
    for keep in (False, True):
        got = pipeline(readers, mib << 20, nbuffers, keep)
        del got
for readers, mib, nbuffers in ((4, 8, 2), (8, 8, 2), (8, 4, 2), (16, 4, 2), (4, 16, 2)):
    blocks(readers, mib << 20, nbuffers)
