"""Run in a fresh process by test_memory.py: load one tensors file and report the process's
resident memory (Linux /proc) before, at its peak during the load, and after the tensors
are freed, as one JSON line ``RESULT {...}``.

Input (stdin, JSON): ``uri``, ``warmup_uri`` (a small file on the same storage, loaded
first so that imports, clients and connection pools exist before the baseline is taken),
``config`` (TensorizerConfig keyword arguments), ``expect_error`` (the load of `uri` is
expected to fail: its error's type and message are reported with the figures).
"""

from __future__ import annotations

import gc
import json
import sys


def _status(field: str) -> int:
    """A /proc/self/status figure, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _load(uri: str, config: dict) -> int:
    from tensorize_vllm_model import TensorizerConfig, open_tensors

    with open_tensors(uri, config=TensorizerConfig(tensorizer_uri=uri, **config)) as reader:
        tensors = [tensor for _, tensor in reader.items()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    del tensors
    return nbytes


def main() -> None:
    spec = json.load(sys.stdin)
    _load(spec["warmup_uri"], spec["config"])
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    result = {}
    try:
        result["tensor_bytes"] = _load(spec["uri"], spec["config"])
    except Exception as e:
        if not spec.get("expect_error"):
            raise
        result.update(error=type(e).__name__, message=str(e))
    result["peak"] = _status("VmHWM")
    gc.collect()
    result.update(before=before, after=_status("VmRSS"))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
