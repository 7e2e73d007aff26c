"""Retention: drop events this region no longer needs to keep (see
:mod:`reconciler.store.retention` for what is safe to drop and why)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import Config
from .errors import ConfigError
from .hlc import Timestamp
from .metrics import Metrics
from .store import postgres as pg
from .store.retention import PruneResult, prune


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def cutoff_for(keep_hours: float, now_ms: int) -> Timestamp:
    """The first stamp that is kept: events stamped before it are old enough to go."""
    return Timestamp(max(0, now_ms - int(keep_hours * 3_600_000)), 0)


def prune_region(
    config: Config,
    region: str,
    *,
    keep_hours: float | None = None,
    dry_run: bool = False,
    metrics: Metrics | None = None,
    now_ms: Callable[[], int] = wall_clock_ms,
    stop: Callable[[], bool] = lambda: False,
) -> PruneResult | None:
    """Prune ``region``'s events older than ``keep_hours`` (default: the config's
    ``retention.keep_hours``); None when retention is off and no age was given."""
    config.region(region)
    keep = keep_hours if keep_hours is not None else config.retention.keep_hours
    if keep is None:
        return None
    if keep <= 0:
        raise ConfigError("keep hours must be above 0", key="retention.keep_hours", value=keep)
    with pg.connect(config.region(region).dsn, region=region) as conn:
        result = prune(conn, region, config.regions, cutoff_for(keep, now_ms()), config.retention.batch, dry_run,
                       stop)
    if metrics is not None and not dry_run:
        metrics.events_pruned.labels(store="inbox").inc(result.inbox_rows)
        metrics.events_pruned.labels(store="outbox").inc(result.outbox_rows)
        metrics.events_pruned.labels(store="compensation").inc(result.compensation_rows)
    return result
