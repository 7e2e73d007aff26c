"""The ``diff`` service: which rows of a table differ between two databases.

Two modes with one result shape, both computed by the one comparison routine of
:mod:`reconciler.verify` (:func:`~reconciler.verify.diff_trees`).
:func:`diff_tables` is the full scan: it works on any table of any two databases with
nothing of ours installed, and hashes every row. :func:`diff_regions` compares a
replicated table between two regions of a config through the maintained Merkle
leaves (:mod:`reconciler.store.merkle_leaves`), which costs reading the leaves plus
the rows of the leaves that differ; where the leaves cannot answer (not installed on
a side, stale after a column change, built differently on the two sides) it says why
and falls back to the full scan. Both modes share the bucket scheme and row hash of
:mod:`reconciler.merkle` and :mod:`reconciler.store.merkle_scan`, so their digests
are comparable. This module checks what a user asked for; the comparing is verify's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .config import TableConfig
from .errors import ConfigError
from .merkle import DifferenceKind, DiffResult, KeyDifference, WalkLimits
from .store.merkle_scan import ScanOptions
from .verify import diff_full_scan, diff_regions, diff_replicated

__all__ = [
    "DiffResult",
    "DifferenceKind",
    "KeyDifference",
    "ScanOptions",
    "WalkLimits",
    "diff_regions",
    "diff_replicated",
    "diff_tables",
    "parse_key_columns",
]


def parse_key_columns(values: Sequence[str]) -> tuple[str, ...]:
    """Key columns from repeated and/or comma-separated values, in order, deduplicated."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if name and name not in out:
                out.append(name)
    return tuple(out)


def diff_tables(
    dsn_a: str,
    dsn_b: str,
    table: str,
    key_columns: Sequence[str],
    schema: str = "public",
    *,
    options: ScanOptions | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> DiffResult:
    """Compare ``schema.table`` on two databases and list the differing keys.

    Raises :class:`~reconciler.errors.ConfigError` for unusable arguments and
    :class:`~reconciler.errors.StoreError` (or ``StoreUnavailable``) when either
    database refuses; errors name the side, the table and the DSN without password.
    """
    keys = parse_key_columns(key_columns)
    if not keys:
        raise ConfigError("diff needs at least one key column", table=f"{schema}.{table}")
    if not table:
        raise ConfigError("diff needs a table name")
    if not dsn_a or not dsn_b:
        raise ConfigError("diff needs two DSNs", table=f"{schema}.{table}")
    spec = TableConfig(name=table, key=keys, policy="lww", schema=schema)  # the policy plays no part
    return diff_full_scan(dsn_a, dsn_b, spec, options=options, clock=clock)
