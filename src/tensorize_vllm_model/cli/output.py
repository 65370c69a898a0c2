"""What the commands print on stdout: written files, inspect tables, verify results."""

from __future__ import annotations

from typing import Any

from ..storage import local_path


def print_written(result: Any, *, replaced: bool = False) -> None:
    """The files a serialize or convert published, its key, whether it replaced an earlier
    model (the same --suffix), and (last line) its directory."""
    for uri in result.files:
        print(f"  wrote {uri}")
    if replaced:
        print(
            f"  replaced the model that was in {result.directory} (same --suffix; give "
            "another --suffix to keep both)"
        )
    for item in getattr(result, "left_out", []):
        print(f"  not carried: {item}")
    if result.keyfile and result.key_existing:
        print(f"  encrypted with the existing key in {result.keyfile} (left unchanged)")
    elif result.keyfile:
        # A file mode means something only for a local file (S3 objects have none).
        mode = " (mode 0600)" if local_path(result.keyfile) is not None else ""
        print(f"  key saved to {result.keyfile}{mode}: keep it to load the model")
    print(result.directory)


def _tiled_count(report: Any, extra: dict[str, Any]) -> int:
    """How many of the file's tensors the record says are in column tiles (it may name
    them by pattern: `format.record.TileMap`)."""
    from ..format.record import TileMap

    tiles = TileMap({str(k): int(v) for k, v in (extra.get("column_tiles") or {}).items()})
    return sum(1 for t in report.tensors if t.name in tiles)


def _layout(report: Any, record: dict[str, Any]) -> str:
    extra = record.get("extra") or {}
    if extra.get("form") == "checkpoint" and extra.get("transposed"):
        return (
            "any (checkpoint form, written by an earlier convert that stored row-parallel "
            "weights transposed: loads refuse it; convert the checkpoint again)"
        )
    if extra.get("form") == "checkpoint":
        return (
            f"any (checkpoint form, written by convert; dtype {record.get('dtype')}; "
            f"{_tiled_count(report, extra)} row-parallel weights stored in "
            "column tiles)"
        )
    if record:
        return (
            f"TP={record['tensor_parallel_size']} x PP={record['pipeline_parallel_size']}"
            f", rank {record['rank']}"
        )
    if report.encrypted and (report.vllm_tensorized or report.record_encrypted):
        return "unknown (the file's record is encrypted: give --keyfile)"
    return "not recorded"


def print_report(report: Any) -> None:
    """One `inspection.FileReport` as a table (``inspect`` without --json)."""
    record = report.record or {}
    print(f"{report.uri}")
    print(
        f"  tensorizer format version {report.format_version}; "
        f"{'encrypted' if report.encrypted else 'not encrypted'}; "
        f"{'vLLM-tensorized' if report.vllm_tensorized else 'not vLLM-tensorized'}"
    )
    print(
        f"  parallel layout: {_layout(report, record)}"
        + (f"; architecture {record['architecture']}" if record.get("architecture") else "")
        + (f"; written by {record['producer']}" if record.get("producer") else "")
    )
    width = max((len(t.name) for t in report.tensors), default=4)
    print(f"  {'name':<{width}}  {'dtype':<9} {'shape':<18} {'bytes':>12}")
    for t in report.tensors:
        shape = "x".join(str(d) for d in t.shape) or "scalar"
        print(f"  {t.name:<{width}}  {t.dtype:<9} {shape:<18} {t.bytes:>12}")
    print(
        f"  {len(report.tensors)} tensors, {report.tensor_bytes} bytes "
        f"({report.tensor_bytes / 1e9:.3f} GB) in a {report.size}-byte file"
    )


def print_verified(results: list[Any]) -> None:
    """One ``OK``/``BAD`` line per file ``verify`` read, and each corrupt tensor."""
    for result in results:
        if result.intact:
            print(
                f"OK {result.uri}: {result.tensors} tensors, {result.bytes / 1e6:.1f} MB, "
                f"hashes checked{', decrypted with the key' if result.encrypted else ''}"
                f"{', layout ' + result.layout if result.layout else ''} "
                f"in {result.seconds:.2f} s"
            )
        else:
            print(f"BAD {result.uri}: {len(result.bad)} of {result.tensors} tensors corrupt")
            for name, reason in result.bad:
                print(f"  {name}: {reason}")
