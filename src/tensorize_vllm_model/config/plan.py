"""Read and write plans: which file each rank reads or writes, with which key and stream
options, resolved once from what the user gave (`TensorizerConfig`) and the parallel layout.

Every entry point (command line, plug-in loader, Python API, inspect/verify) asks here, so
the rules live in one place:

* An explicit ``tensorizer_uri`` is used as given: a rank template (``%03d``) gives one file
  per rank; a URI without one, at more than one rank, is one file every rank reads, which
  must hold whole weights (`check_shared_file`).
* A directory (``tensorizer_dir``, vLLM's ``--model``) holds ``model.tensors`` at one rank,
  ``model-rank-%03d.tensors`` at more; when it has no rank files but a ``model.tensors``
  (a converted checkpoint, a Hugging Face file), that one file is shared.
* A write never shares: a directory gets ``model.tensors`` at one rank,
  ``model-rank-%03d.tensors`` at more; a given URI needs a rank template at more than one
  (`check_rank_files`, which vLLM's ``verify_with_parallel_config`` asks too).
* A load whose layout is not known beforehand (inspect, verify) covers every rank file of a
  template: as many as rank 0's record says, else as many as exist (`discover_rank_uris`).

The plan reads no tensors file itself (only whether files exist): what it needs from one
(rank 0's record) the caller reads and hands in. It takes the config by type only, so
`config` can ask it (`TensorizerConfig.verify_with_parallel_config`) without a cycle.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import storage
from ..core.errors import ConfigError, NotFound
from ..format.names import (
    DEFAULT_TENSORS_NAME,
    SHARDED_TENSORS_NAME,
    has_rank_template,
    needs_rank_files,
    rank_uri,
    tensors_uri,
)
from ..format.record import FileRecord, ParallelLayout

if TYPE_CHECKING:
    from ..storage.options import StreamOptions
    from . import TensorizerConfig

__all__ = [
    "ReadPlan",
    "WritePlan",
    "resolve_read",
    "resolve_write",
    "check_rank_files",
    "check_shared_file",
    "discover_rank_uris",
    "model_directory_tensors",
    "one_file_of_directory",
]


@dataclass(frozen=True)
class ReadPlan:
    """Where one rank of a load reads its tensors, and how.

    Attributes:
        config: the user's settings, as given.
        layout: the parallel layout and this rank.
        template: the tensors URI or rank template of the whole load.
        uri: the file this rank reads (`template` formatted with its rank, or the shared file).
        shared: True when every rank reads the one file `uri` (see `check_shared_file`).
        keyfile: the key file that decrypts the tensors, or None.
        options: how to reach remote storage (`TensorizerConfig.options`).
    """

    config: TensorizerConfig
    layout: ParallelLayout
    template: str
    uri: str
    shared: bool
    keyfile: str | None
    options: StreamOptions

    def rank_uris(self) -> list[str]:
        """Every rank's file, in global rank order (the one file, for a shared one)."""
        if self.shared or not has_rank_template(self.template):
            return [self.uri]
        return _rank_files(self.template, self.layout)

    def rank_layout(self, rank: int) -> ParallelLayout:
        """The layout of global rank `rank` of this load (the file `rank_uris()[rank]` is
        written for)."""
        return _rank_layout(self.layout, rank)

    @property
    def world(self) -> int:
        return self.layout.world_size

    def file_config(self) -> TensorizerConfig:
        """The settings with ``tensorizer_uri`` set to `template` (the shared file when
        `shared`): for the readers, which take one config per load."""
        return dataclasses.replace(
            self.config, tensorizer_uri=self.uri if self.shared else self.template
        )


@dataclass(frozen=True)
class WritePlan:
    """Where one rank of a serialize writes, and how.

    Attributes:
        config: the user's settings, as given.
        layout: the parallel layout and this rank.
        template: the tensors URI or rank template (``tensorizer_uri``).
        uri: this rank's file.
        directory: where the config, tokenizer and LoRA files go (``tensorizer_dir``).
        keyfile: the key file to encrypt with, or None.
        options: how to reach remote storage.
        serialization_kwargs: extra keyword arguments for tensorizer's ``TensorSerializer``.
    """

    config: TensorizerConfig
    layout: ParallelLayout
    template: str
    uri: str
    directory: str
    keyfile: str | None
    options: StreamOptions
    serialization_kwargs: dict[str, Any]

    def rank_uris(self) -> list[str]:
        """Every rank's file, in global rank order."""
        return _rank_files(self.template, self.layout)


def resolve_read(config: TensorizerConfig, layout: ParallelLayout) -> ReadPlan:
    """The read plan of one rank of `layout` (see the module's rules).

    A ``tensorizer_uri`` that is a model directory (`model_directory_tensors`) is read as
    ``tensorizer_dir`` is.

    Raises:
        ConfigError: an explicit rank template that does not format.
        StorageError: the directory cannot be looked at (a remote one).
    """
    if config.given_uri and model_directory_tensors(config.given_uri, config.options):
        # a model directory given as the tensors: its files, as for tensorizer_dir
        config = dataclasses.replace(config, tensorizer_uri=None, tensorizer_dir=config.given_uri)
    given = config.given_uri
    directory = config.tensorizer_dir or "."
    template = given or _directory_template(directory, layout.world_size, config)
    shared = _shared_file(config, layout.world_size)
    uri = shared or rank_uri(template, layout, shared=True)
    return ReadPlan(
        config=config,
        layout=layout,
        template=template,
        uri=uri,
        shared=shared is not None,
        keyfile=config.encryption_keyfile,
        options=config.options,
    )


def resolve_write(config: TensorizerConfig, layout: ParallelLayout) -> WritePlan:
    """The write plan of one rank of `layout`: the given ``tensorizer_uri``, or the
    directory's ``model.tensors`` (one rank) or ``model-rank-%03d.tensors`` (more, as vLLM's
    example script names them), formatted with the rank.

    Raises:
        ConfigError: more than one rank and a given URI without rank template (checked
            before any write).
    """
    template = config.given_uri or tensors_uri(config.tensorizer_dir or ".", layout.world_size)
    return WritePlan(
        config=config,
        layout=layout,
        template=template,
        uri=rank_uri(template, layout),
        directory=config.tensorizer_dir or storage.parent(template),
        keyfile=config.encryption_keyfile,
        options=config.options,
        serialization_kwargs=dict(config.serialization_kwargs or {}),
    )


def check_rank_files(config: TensorizerConfig, layout: ParallelLayout) -> None:
    """Whether every rank of `layout` can have its own file: `resolve_write`'s rule (a
    given ``tensorizer_uri`` needs a rank template at more than one rank; a directory gets
    ``model-rank-%03d.tensors``). The check of vLLM's ``verify_with_parallel_config``.

    Raises:
        ConfigError: (a ValueError) naming the URI and the layout.
    """
    resolve_write(config, layout)


def discover_rank_uris(
    config: TensorizerConfig, read_record: Callable[[str], FileRecord | None]
) -> list[str]:
    """Every file of ``tensorizer_uri`` when the layout is not known beforehand (inspect,
    verify): the URI itself, or for a rank template every rank's file, as many as rank 0's
    record says, else as many as exist from rank 0 on.

    Args:
        config: the settings (``tensorizer_uri`` and how to reach remote storage).
        read_record: reads the record of a tensors file (None: it has none); called for
            rank 0's file of a rank template only.

    Raises:
        ConfigError: a rank template that does not format.
        StorageError, FormatError: as `read_record`, for rank 0's file.
    """
    template = config.given_uri or config.tensorizer_uri or ""
    if not has_rank_template(template):
        return [template]
    first = rank_uri(template, ParallelLayout())
    record = read_record(first)
    if record is not None:
        layout = ParallelLayout(record.tensor_parallel_size, record.pipeline_parallel_size)
        return resolve_read(
            dataclasses.replace(config, tensorizer_uri=template), layout
        ).rank_uris()
    found = [first]
    options = config.options
    while storage.exists(nth := _nth_rank_uri(template, len(found)), options):
        found.append(nth)
    return found


def check_shared_file(
    uri: str, layout: ParallelLayout, *, vllm_tensorized: bool, record: FileRecord | None
) -> None:
    """Whether one file (a `uri` without rank template) can be loaded by every rank of
    `layout`.

    A file that is not vLLM-tensorized (a Hugging Face model written with tensorizer's
    ``write_module``) holds whole, unsharded weights: every rank reads it and vLLM's weight
    loaders take each rank's part, at any TP/PP (as vLLM's own tensorizer loader does). A
    vLLM-tensorized file holds the weights of one rank as vLLM shards them, so more than one
    rank needs one file per rank.

    Raises:
        LayoutError: the file records the layout it was written for, and it is another.
        ConfigError: a vLLM-tensorized file for more than one rank, without rank template.
    """
    if layout.world_size == 1 or has_rank_template(uri) or not vllm_tensorized:
        return
    if record is not None:
        record.check_written_for(layout, source=uri)
    raise needs_rank_files(uri, layout)


def model_directory_tensors(uri: str, options: storage.Options = None) -> str | None:
    """The tensors of the model directory `uri`, found as a load finds them: its rank
    template (``DIR/model-rank-%03d.tensors``) when it has rank files, else its
    ``DIR/model.tensors``. None when `uri` is not a directory: a file, a rank template, or
    (remote) a name with a dot in its last part or with no tensors under it.

    Raises:
        NotFound: a local directory with neither file (both names are given).
    """
    if has_rank_template(uri):
        return None
    local = storage.local_path(uri)
    if local is not None and not os.path.isdir(local):
        return None
    if local is None and "." in uri.rstrip("/").rsplit("/", 1)[-1]:
        return None  # a file name (model.tensors), not a directory
    directory = uri.rstrip("/") or "/"
    for template in (tensors_uri(directory, 2), tensors_uri(directory, 1)):
        if storage.exists(rank_uri(template, ParallelLayout()), options):
            return template
    if local is None:
        return None
    raise NotFound(
        f"{uri} is a directory without tensors (neither {DEFAULT_TENSORS_NAME} nor "
        f"{rank_uri(SHARDED_TENSORS_NAME, ParallelLayout())}); give the directory serialize "
        "or convert printed, or a tensors file"
    )


def check_model_directory(config: TensorizerConfig) -> None:
    """Refuse a local ``tensorizer_dir`` (read without a ``tensorizer_uri``) that holds no
    tensors, before a load looks for ``DIR/model.tensors`` and reports that file missing.

    Raises:
        NotFound: the directory has neither ``model.tensors`` nor ``model-rank-000.tensors``
            (`model_directory_tensors`'s message, which says what to give instead).
    """
    if config.given_uri or not config.tensorizer_dir:
        return
    local = storage.local_path(config.tensorizer_dir)
    if local is not None and os.path.isdir(local):
        model_directory_tensors(config.tensorizer_dir, config.options)


def one_file_of_directory(uri: str, options: storage.Options = None) -> str | None:
    """The one tensors file of the model directory `uri` (its ``model.tensors``), for a
    reader that opens one file (`read.reader.open_tensors`); None when `uri` is no
    directory (`model_directory_tensors`).

    Raises:
        ConfigError: the directory holds one file per rank (rank 0's file is named).
        NotFound: a local directory without tensors.
    """
    found = model_directory_tensors(uri, options)
    if found is not None and has_rank_template(found):
        first = rank_uri(found, ParallelLayout())
        raise ConfigError(
            f"{uri} holds one file per rank ({first}, ...): open one of them, e.g. "
            f"open_tensors({first!r})"
        )
    return found


def _directory_template(directory: str, world_size: int, config: TensorizerConfig) -> str:
    """The tensors a load at `world_size` ranks reads from `directory`: ``model.tensors``
    at one rank, rank files at more. At one rank, a directory holding only rank files gives
    its rank template, so the check of rank 0's record names the layout they were written
    for (rather than a missing ``model.tensors``)."""
    template = tensors_uri(directory, world_size)
    if world_size == 1:
        options = config.options
        sharded = tensors_uri(directory, 2)
        if not storage.exists(template, options) and storage.exists(
            rank_uri(sharded, ParallelLayout()), options
        ):
            return sharded
    return template


def _shared_file(config: TensorizerConfig, world_size: int) -> str | None:
    """The one file every rank reads, at more than one rank: an explicit ``tensorizer_uri``
    without a rank template, or a directory's ``model.tensors`` when it has no rank files.
    Whether that file may be shared is checked when it is opened (`check_shared_file`).
    None: one file per rank."""
    if world_size == 1:
        return None
    given = config.given_uri
    if given:
        return None if has_rank_template(given) else given
    directory = config.tensorizer_dir or "."
    options = config.options
    single = tensors_uri(directory, 1)
    first_rank = rank_uri(tensors_uri(directory, world_size), ParallelLayout())
    if storage.exists(first_rank, options) or not storage.exists(single, options):
        return None
    return single


def _rank_files(template: str, layout: ParallelLayout) -> list[str]:
    """Every rank's file of `template` at `layout`, in global rank order."""
    return [rank_uri(template, _rank_layout(layout, r)) for r in range(layout.world_size)]


def _nth_rank_uri(template: str, rank: int) -> str:
    """Rank `rank`'s file of `template` (a layout of that many ranks and more)."""
    return rank_uri(template, ParallelLayout(tensor_parallel_size=rank + 1, tp_rank=rank))


def _rank_layout(layout: ParallelLayout, rank: int) -> ParallelLayout:
    tp = layout.tensor_parallel_size
    return dataclasses.replace(layout, tp_rank=rank % tp, pp_rank=rank // tp)
