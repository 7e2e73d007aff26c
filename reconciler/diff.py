"""The ``diff`` service: which rows of a table differ between two databases.

Two modes with one result shape. :func:`diff_tables` is the full scan: it works on
any table of any two databases with nothing of ours installed, and hashes every row.
:func:`diff_regions` compares a replicated table between two regions of a config
through the maintained Merkle leaves (:mod:`reconciler.store.merkle_leaves`), which
costs reading the leaves plus the rows of the leaves that differ; where the leaves
cannot answer (not installed on a side, stale after a column change, built
differently on the two sides) it says why and falls back to the full scan. Both
modes share the bucket scheme and row hash of :mod:`reconciler.merkle` and
:mod:`reconciler.store.merkle_scan`, so their digests are comparable.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .config import Config, TableConfig
from .errors import ConfigError
from .merkle import DifferenceKind, DiffResult, KeyDifference, WalkLimits
from .store import merkle_leaves
from .store.merkle_scan import ScanOptions, full_scan_diff

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
    return full_scan_diff(dsn_a, dsn_b, table, keys, schema=schema, options=options, clock=clock)


def diff_regions(
    config: Config,
    table: str,
    region_a: str,
    region_b: str,
    *,
    options: ScanOptions | None = None,
    full_scan: bool = False,
    compact_min_rows: int = merkle_leaves.COMPACT_MIN_ROWS,
    clock: Callable[[], float] = time.perf_counter,
) -> DiffResult:
    """Compare a replicated table of ``config`` between two of its regions.

    See :func:`diff_replicated`; raises :class:`~reconciler.errors.ConfigError` for
    an unknown table or region.
    """
    spec = config.table(table)
    if region_a == region_b:
        raise ConfigError(f"diff compares two regions, got {region_a!r} twice", file=config.path)
    return diff_replicated(
        config.region(region_a).dsn,
        config.region(region_b).dsn,
        spec,
        options=options,
        full_scan=full_scan,
        compact_min_rows=compact_min_rows,
        clock=clock,
    )


def diff_replicated(
    dsn_a: str,
    dsn_b: str,
    spec: TableConfig,
    *,
    options: ScanOptions | None = None,
    full_scan: bool = False,
    compact_min_rows: int = merkle_leaves.COMPACT_MIN_ROWS,
    clock: Callable[[], float] = time.perf_counter,
) -> DiffResult:
    """Compare a replicated table on two databases, through its maintained leaves.

    Uses the leaves (mode ``maintained-leaves``) when both databases have them and
    they describe the table as it is; otherwise, or with ``full_scan``, the full scan
    (mode ``full-scan``), whose ``extra["fallback_reason"]`` then says why. A long
    leaf log is compacted first (``compact_min_rows``; a standby is only read).
    Raises like :func:`diff_tables`.
    """
    started = clock()
    if full_scan:
        return _full(dsn_a, dsn_b, spec, options, clock, started, "requested")
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="leaf-check") as pool:
            checks = [
                pool.submit(merkle_leaves.prepare_side, dsn, spec, side=side, compact_min_rows=compact_min_rows)
                for dsn, side in ((dsn_a, "a"), (dsn_b, "b"))
            ]
            status_a, status_b = (c.result() for c in checks)
        return merkle_leaves.maintained_leaves_diff(
            dsn_a, dsn_b, status_a, status_b, options=options, clock=clock, started=started
        )
    except merkle_leaves.LeavesUnusable as exc:
        return _full(dsn_a, dsn_b, spec, options, clock, started, exc.reason)


def _full(
    dsn_a: str,
    dsn_b: str,
    spec: TableConfig,
    options: ScanOptions | None,
    clock: Callable[[], float],
    started: float,
    reason: str,
) -> DiffResult:
    result = diff_tables(dsn_a, dsn_b, spec.name, spec.key, spec.schema, options=options, clock=clock)
    # the time spent finding out that the leaves could not answer counts too
    return dataclasses.replace(
        result, seconds=clock() - started, extra={**result.extra, "fallback_reason": reason}
    )
