"""Retention: drop events this region no longer needs to keep (see
:mod:`reconciler.store.retention` for what is safe to drop and why)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import Config
from .errors import ConfigError
from .hlc import Timestamp, wall_ms
from .logs import ComponentLogger
from .loop import Pause
from .metrics import Metrics
from .region_view import LoopContext
from .store.postgres_store import RegionDatabases
from .store.retention import PruneResult


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
    now_ms: Callable[[], int] = wall_ms,
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
    with RegionDatabases(config).session(region, autocommit=True) as store:
        result = store.prune(config.regions, cutoff_for(keep, now_ms()), config.retention.batch, dry_run, stop)
    if metrics is not None and not dry_run:
        metrics.events_pruned.labels(store="inbox").inc(result.inbox_rows)
        metrics.events_pruned.labels(store="outbox").inc(result.outbox_rows)
        metrics.events_pruned.labels(store="compensation").inc(result.compensation_rows)
    return result


class RetentionSteps:
    """The sidecar's retention loop as a :class:`~reconciler.loop.Worker`: a pass every
    ``retention.interval_seconds``.

    The first pass waits one interval, so a sidecar restarting in a loop does not prune
    in a loop; a pass stops between batches when the sidecar drains. Waiting for the
    next pass is idling (stamped as progress while the last pass succeeded), a failing
    pass is an error retried at the next interval."""

    def __init__(self, ctx: LoopContext, log: ComponentLogger) -> None:
        self.ctx = ctx
        self.log = log
        self.interval = ctx.config.retention.interval_seconds
        self.next_pass = time.monotonic() + self.interval

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        ctx = self.ctx
        if ctx.config.retention.keep_hours is None:
            return Pause(float("inf"))  # alive all the same: /healthz wants every loop running
        now = time.monotonic()
        if now < self.next_pass:
            return Pause(self.next_pass - now)
        self.next_pass = now + self.interval
        result = prune_region(ctx.config, ctx.region, metrics=ctx.metrics, stop=ctx.stop.is_set)
        if result is not None and (result.inbox_rows or result.outbox_rows):
            self.log.info("pruned old events", extra={"fields": result.to_dict()})
        return Pause(self.interval)

    def close(self) -> None:
        pass
