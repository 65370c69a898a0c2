"""What the cloud backends built on a client library share (gs://, az://): the client made
once per set of options, how its settings are looked up, and a library call tried as the
one retry policy says with its failure mapped in the backend's one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..core.settings import storage_variable
from . import retry
from .options import StreamOptions

__all__ = ["Client", "ClientCache", "setting", "call"]

T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True)
class Client:
    """A store's client as a backend keeps it, with what its messages say about it."""

    client: Any  # google.cloud.storage.Client, azure.storage.blob.BlobServiceClient
    where: str  # the endpoint, for messages (no query string: a SAS stays out)
    credentials: str  # how the credentials were found (never the credentials)
    session: Any = None  # GCS: google-auth's AuthorizedSession its ranged GETs use
    base: str = ""  # GCS: the endpoint URL requests go to


class ClientCache(Generic[C]):
    """The client of each `StreamOptions`, made once by `make` (thread-safe): one
    connection pool and one credential lookup per set of options."""

    def __init__(self, make: Callable[[StreamOptions], C]):
        self._make = make
        self._made: dict[StreamOptions, C] = {}
        self._lock = threading.Lock()

    def __call__(self, options: StreamOptions) -> C:
        with self._lock:
            if options not in self._made:
                self._made[options] = self._make(options)
            return self._made[options]

    def clear(self) -> None:
        with self._lock:
            self._made.clear()


def setting(options: StreamOptions, key: str, variable: str) -> str | None:
    """The ``stream_kwargs`` option `key`, else the environment variable `variable` (as
    `settings.storage_variable` reads it), else None."""
    return options.get(key) or storage_variable(variable) or None


def call(
    send: Callable[[], T],
    mapped: Callable[[BaseException], BaseException | None],
    *,
    options: StreamOptions,
    uri: str,
    peer: str,
) -> T:
    """`send()` (a library call with the library's own retries off), tried as
    ``options.retry`` says. `mapped(e)` turns its failure into a typed error
    (`StorageError`, raised at once) or `retry.Transient` (tried again), or None for a bug
    (raised as it is). `peer` names the other side ("the GCS endpoint http://...")."""

    def attempt() -> T:
        try:
            return send()
        except Exception as e:  # noqa: BLE001 - `mapped` is the backend's one place
            error = mapped(e)
            if error is None:
                raise
            raise error from None

    where = peer.rpartition(" ")[2]
    return retry.request(attempt, policy=options.retry, name=f"{uri} at {where}", peer=peer)
