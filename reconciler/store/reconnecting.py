"""A region connection for loops that may fail without consequence.

The sidecar's measurements (its own database and its peers', the heartbeat's HLC
stamp, the catch-up loop's state read) must keep going when a database is away,
and must not hammer it with a connect per loop iteration meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..errors import ReconcilerError, StoreUnavailable
from ..hlc import Timestamp
from . import postgres as pg
from .translate import translated


def close_quietly(conn: pg.Connection | None) -> None:
    """Close ``conn``, ignoring what a broken connection raises (it must not mask the real error)."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - see the docstring
            pass


def committed_stamp(conn: pg.Connection) -> Timestamp:
    """The region's HLC stamp, committed at once so no transaction idles open."""
    with translated(step="stamp heartbeat"):
        stamp = pg.hlc_now(conn)
        conn.commit()
    return stamp


class Reconnecting:
    """A connection reopened on demand, at most every ``retry_seconds``.

    ``run`` returns None instead of raising and keeps the redacted error for the
    log, so an unreachable database costs one failed connect per retry period.
    """

    def __init__(self, dsn: str, region: str, *, retry_seconds: float, timeout: int = 5) -> None:
        self.dsn = dsn
        self.region = region
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.error: str | None = None
        self._conn: pg.Connection | None = None
        self._next_try = 0.0

    def connection(self) -> pg.Connection:
        if self._conn is None:
            self._conn = pg.connect(self.dsn, region=self.region, timeout=self.timeout)
        return self._conn

    def run(self, query: Callable[[pg.Connection], Any]) -> Any:
        if self._conn is None and time.monotonic() < self._next_try:
            return None
        try:
            result = query(self.connection())
        except ReconcilerError as exc:
            self.error = str(exc)
            if isinstance(exc, StoreUnavailable) or self._conn is None:
                self.close()
                self._next_try = time.monotonic() + self.retry_seconds
            else:
                # the database answered, with an error (say, a schema not migrated):
                # the connection is fine and other queries on it must not wait
                try:
                    self._conn.rollback()
                except Exception:  # noqa: BLE001 - a broken connection is dropped instead
                    self.close()
            return None
        self.error = None
        return result

    def close(self) -> None:
        close_quietly(self._conn)
        self._conn = None
