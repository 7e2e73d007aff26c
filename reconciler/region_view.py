"""What the sidecar's loops of one region share, and nothing more.

The loops run on their own threads with their own connections. They share the
persisted lifecycle state as the lifecycle loop last read it (readiness, heartbeats,
catch-up and anti-entropy act on it) and the outbox backlog (heartbeats carry it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .config import Config
from .lifecycle import RegionStatus, State
from .logs import ComponentLogger, component_logger
from .metrics import Metrics


class RegionView:
    """The persisted lifecycle state as last read, when it was read, and the outbox backlog."""

    def __init__(self, metrics: Metrics, *, fresh_for_seconds: float) -> None:
        self.metrics = metrics
        self.fresh_for_seconds = fresh_for_seconds
        self.status: RegionStatus | None = None
        #: monotonic time of the last read; -inf: the state cannot be vouched for
        self.read_at = float("-inf")
        self.backlog: int | None = None
        self.loggers: list[ComponentLogger] = []
        self._changed = threading.Condition()

    def fresh(self) -> bool:
        """The state was read recently enough to vouch for it."""
        return time.monotonic() - self.read_at < self.fresh_for_seconds

    def active(self) -> bool:
        return self.status is not None and self.status.state is State.ACTIVE

    def forget(self) -> None:
        """The database stopped answering: the state may have changed meanwhile."""
        self.read_at = float("-inf")

    def publish(self, status: RegionStatus, log: ComponentLogger) -> None:
        """Take ``status`` as the region's state: metrics, every loop's log context, a log line on change."""
        previous = self.status
        self.status = status
        self.read_at = time.monotonic()
        self.metrics.set_region_state(status.state.value)
        self.metrics.region_epoch.set(status.epoch)
        if previous is None or previous.epoch != status.epoch:
            self.bind_epoch(status.epoch)
        if previous is not None and previous.state is not status.state:
            log.info("lifecycle state changed", extra={"fields": {
                "from": previous.state.value, "to": status.state.value, "epoch": status.epoch,
                "reason": status.reason,
            }})
        if previous is None or previous.epoch != status.epoch:
            with self._changed:
                self._changed.notify_all()

    def wait_for_change(self, timeout: float, seen_epoch: int | None = None) -> None:
        """Return once the published epoch is not ``seen_epoch`` (None: nothing published
        yet), or after ``timeout``: a loop that acts on the state reacts at once
        instead of at its next poll, and a move just before the call is not missed."""
        with self._changed:
            self._changed.wait_for(lambda: self._epoch() != seen_epoch, timeout)

    def _epoch(self) -> int | None:
        return self.status.epoch if self.status is not None else None

    def bind_epoch(self, epoch: int) -> None:
        for logger in self.loggers:
            logger.bind(epoch=epoch)


@dataclass
class LoopContext:
    """What every loop of a sidecar is built from."""

    config: Config
    region: str
    metrics: Metrics
    stop: threading.Event
    view: RegionView

    @property
    def dsn(self) -> str:
        return self.config.region(self.region).dsn

    def logger(self, component: str) -> ComponentLogger:
        """A logger for ``component`` that follows the region's epoch."""
        log = component_logger(component, self.region)
        self.view.loggers.append(log)
        return log
