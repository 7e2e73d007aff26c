"""One table from PostgreSQL's SQLSTATE classes to reconciler errors.

Used by every psycopg call site through :func:`translated`, so a driver error
always surfaces as a :class:`~reconciler.errors.StoreError` carrying its context
and whether a retry can help, chained ``from`` the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from ..errors import ClockSkewError, ReconcilerError, StoreError, StoreUnavailable
from .dsn import redact_dsn

# SQLSTATE class (first two characters) -> (error type, retryable)
_BY_CLASS: dict[str, tuple[type[StoreError], bool]] = {
    "08": (StoreUnavailable, True),  # connection exception
    "57": (StoreUnavailable, True),  # operator intervention: shutdown, cancel, crash
    "53": (StoreError, True),  # insufficient resources
    "40": (StoreError, True),  # serialization failure, deadlock
    "55": (StoreError, True),  # object not in prerequisite state, lock not available
    "23": (StoreError, False),  # integrity constraint violation
    "22": (StoreError, False),  # data exception
    "42": (StoreError, False),  # syntax error or access rule violation (missing table, ...)
    "3F": (StoreError, False),  # invalid schema name
    "28": (StoreError, False),  # invalid authorization
}

CLOCK_SKEW_SQLSTATE = "RC001"

# What to do about an error, where the cause is usually ours rather than the server's
_ADVICE: dict[str, str] = {
    # the shared lock table: every key of an apply batch holds an advisory lock until commit
    "53200": "each key of an apply batch holds a lock until its transaction ends: lower batch.apply,"
             " or raise the server's max_locks_per_transaction",
}


def translate(exc: BaseException, **context: Any) -> ReconcilerError:
    if "dsn" in context and isinstance(context["dsn"], str):
        context["dsn"] = redact_dsn(context["dsn"])
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate or ""
        detail = (exc.diag.message_primary if exc.diag else None) or _first_line(exc)
        hint = exc.diag.message_hint if exc.diag else None
        for extra in (hint, _ADVICE.get(sqlstate)):
            if extra:
                detail = f"{detail} ({extra.rstrip('.')})"
        if sqlstate == CLOCK_SKEW_SQLSTATE:
            return ClockSkewError(detail, **context)
        if isinstance(exc, psycopg.OperationalError) and not sqlstate:
            return StoreUnavailable(f"PostgreSQL unreachable: {_first_line(exc)}", **context)
        error_type, retryable = _BY_CLASS.get(sqlstate[:2], (StoreError, False))
        return error_type(f"PostgreSQL error {sqlstate}: {detail}", retryable=retryable, sqlstate=sqlstate, **context)
    return StoreError(f"{type(exc).__name__}: {exc}", **context)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def translated(**context: Any) -> Iterator[None]:
    """Re-raise psycopg errors as reconciler errors with ``context`` attached."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, **context) from exc
