"""A region session for loops that may fail without consequence.

The sidecar's measurements (its own database and its peers', the heartbeat's HLC
stamp, the catch-up loop's state read) must keep going when a database is away,
and must not hammer it with a connect per loop iteration meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from ..errors import ReconcilerError, StoreUnavailable
from .port import RegionStore
from .postgres_store import PostgresRegionStore, open_store

T = TypeVar("T")


class _Closeable(Protocol):
    def close(self) -> None: ...


def close_quietly(session: _Closeable | None) -> None:
    """Close ``session``, ignoring what a broken connection raises (it must not mask the real error)."""
    if session is not None:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - see the docstring
            pass


class Reconnecting:
    """A region session (autocommit: no transaction is left idle between loop
    iterations) reopened on demand, at most every ``retry_seconds``.

    ``run`` returns None instead of raising and keeps the redacted error for the
    log, so an unreachable database costs one failed connect per retry period.
    """

    def __init__(self, dsn: str, region: str, *, retry_seconds: float, timeout: int = 5) -> None:
        self.dsn = dsn
        self.region = region
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.error: str | None = None
        self._store: PostgresRegionStore | None = None
        self._next_try = 0.0

    def store(self) -> RegionStore:
        if self._store is None:
            self._store = open_store(self.dsn, region=self.region, autocommit=True, timeout=self.timeout)
        return self._store

    def run(self, query: Callable[[RegionStore], T]) -> T | None:
        if self._store is None and time.monotonic() < self._next_try:
            return None
        try:
            result = query(self.store())
        except ReconcilerError as exc:
            self.error = str(exc)
            # an error the database answered with (a schema not migrated) leaves the
            # session usable for the other queries; a lost server does not
            if isinstance(exc, StoreUnavailable) or self._store is None or self._store.closed:
                self.close()
                self._next_try = time.monotonic() + self.retry_seconds
            return None
        self.error = None
        return result

    def close(self) -> None:
        close_quietly(self._store)
        self._store = None
