"""The sidecar's lifecycle and catch-up loops.

The lifecycle loop decides at start (and again when the database answers after an
outage) whether the region must catch up, stamps ``last_alive_at`` and publishes
the persisted state, the only truth readiness follows: a restarted sidecar must
not call a region ready that an operator fenced. The catch-up loop runs
:func:`reconciler.recovery.recover` while that state asks for it.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from .config import Config
from .errors import StoreError
from .lifecycle import State, needs_catch_up
from .logs import ComponentLogger
from .loop import GO_ON, Backoff, Pause
from .metrics import Metrics
from .region_view import LoopContext
from .store.port import PipelineStore, StoreSessions
from .store.postgres_store import RegionDatabases
from .store.reconnecting import Reconnecting, close_quietly


class RecoverFn(Protocol):
    """What the catch-up loop needs of :func:`reconciler.recovery.recover`."""

    def __call__(self, config: Config, region: str, *, actor: str = ..., metrics: Metrics | None = ...) -> Any: ...


def load_recover() -> RecoverFn:
    """The catch-up service (imported on first use: the sidecar's start needs none of it)."""
    from .recovery import recover

    return recover


class LifecycleSteps:
    """A :class:`~reconciler.loop.Worker`: the start decision once, then ``last_alive_at``
    every heartbeat interval and the persisted state every second at most."""

    def __init__(self, ctx: LoopContext, log: ComponentLogger, databases: StoreSessions | None = None) -> None:
        self.ctx = ctx
        self.log = log
        self.databases: StoreSessions = databases or RegionDatabases(ctx.config)
        self.interval = ctx.config.heartbeat.interval_seconds
        self.store: PipelineStore | None = None
        self.decided = False
        self.lost = False  # the database stopped answering after the start decision
        self.next_alive = 0.0

    def start(self) -> None:
        self.store = self.databases.open(self.ctx.region)
        if not self.decided:
            self.decide_at_start(self.store)
            self.decided = True
        elif self.lost:
            self.decide_after_outage(self.store)
            self.lost = False

    def step(self) -> Pause:
        assert self.store is not None
        if time.monotonic() >= self.next_alive:
            self.store.mark_alive(clean_stop=False)
            self.next_alive = time.monotonic() + self.interval
        self.ctx.view.publish(self.store.region_status(), self.log)
        return Pause(min(1.0, self.interval))

    def failed(self, _exc: BaseException) -> None:
        self.ctx.view.forget()
        self.lost = self.decided

    def close(self) -> None:
        close_quietly(self.store)
        self.store = None

    def decide_at_start(self, store: PipelineStore) -> None:
        """Catch up first if the last run ended badly or long ago, or if this region is
        empty beside peers that hold rows.

        Read before anything is written: ``clean_stop`` is set to false right after,
        so that a SIGKILL from now on is recognised on the next start.
        """
        ctx, log = self.ctx, self.log
        status = store.region_status()
        ctx.view.bind_epoch(status.epoch)
        absent = None
        if status.last_alive_at is not None:
            absent = max(0.0, time.time() - status.last_alive_at.timestamp())
        reason = needs_catch_up(status.clean_stop, absent, ctx.config.lifecycle.absence_threshold_seconds,
                                empty_beside_peers=status.last_alive_at is None and self._empty_beside_peers(store))
        log.info("lifecycle at start", extra={"fields": {
            "state": status.state.value, "epoch": status.epoch, "clean_stop": status.clean_stop,
            "absent_seconds": None if absent is None else round(absent, 1), "catch_up": reason,
        }})
        # FENCED waits for an operator; CATCHING_UP is already where it must be.
        if reason and status.state in (State.ACTIVE, State.SUSPECT, State.VERIFYING):
            status = store.transition(State.CATCHING_UP, reason, actor="sidecar", expected_epoch=status.epoch)
            log.warning("region sent to catch-up", extra={"fields": {"reason": reason, "epoch": status.epoch}})
        store.mark_alive(clean_stop=False)
        ctx.view.publish(status, log)

    def _empty_beside_peers(self, store: PipelineStore) -> bool:
        """This region's replicated tables are empty and some reachable peer's are not."""
        config, region = self.ctx.config, self.ctx.region
        tables = list(config.tables.values())
        if store.holds_rows(tables):
            return False
        for peer in config.peers(region):
            try:
                other = self.databases.open(peer)
                try:
                    if other.holds_rows(tables):
                        return True
                finally:
                    close_quietly(other)
            except StoreError:
                continue  # an unreachable peer cannot say; the others may
        return False

    def decide_after_outage(self, store: PipelineStore) -> None:
        """The start decision again, when the database answers after an outage.

        While the database was away, ``last_alive_at`` stopped moving, so its age is the
        outage; a database restored from a backup shows the age of the backup. Either
        way, beyond the absence threshold the region may have missed what it cannot get
        from Kafka alone. ``clean_stop`` is ignored here: it is false because this
        sidecar is running, not because it crashed, and a blip must not cost a catch-up.
        """
        log = self.log
        status = store.region_status()
        if status.last_alive_at is None:
            return
        absent = max(0.0, time.time() - status.last_alive_at.timestamp())
        threshold = self.ctx.config.lifecycle.absence_threshold_seconds
        log.info("database answers again", extra={"fields": {
            "state": status.state.value, "absent_seconds": round(absent, 1)}})
        if needs_catch_up(True, absent, threshold) and status.state in (State.ACTIVE, State.SUSPECT,
                                                                         State.VERIFYING):
            reason = f"database was out of reach for {absent:.0f}s (> {threshold:.0f}s)"
            status = store.transition(State.CATCHING_UP, reason, actor="sidecar", expected_epoch=status.epoch)
            log.warning("region sent to catch-up", extra={"fields": {"reason": reason, "epoch": status.epoch}})
        self.ctx.view.publish(status, log)


class CatchUpSteps:
    """Runs catch-up whenever the persisted state asks for it.

    VERIFYING counts too: a sidecar killed during verification leaves the region
    there, and nobody else would move it. A recover that another process is already
    running is refused by its lock and simply retried later. The sidecar runs this
    loop containing any exception: a bug in catch-up must not stop relay and inbox,
    which keep the region's data flowing meanwhile."""

    #: a gate that refused will not pass sooner: measure again after this, doubling
    REFUSED_WAIT = Backoff(1.0, 60.0, jitter=0.0)

    def __init__(self, ctx: LoopContext, log: ComponentLogger, recover: RecoverFn | None = None) -> None:
        self.ctx = ctx
        self.log = log
        self.recover = recover or load_recover()
        self.db = Reconnecting(ctx.dsn, ctx.region, retry_seconds=1.0)
        self.refused = 0
        self.retry_at = 0.0

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        ctx = self.ctx
        if ctx.view.status is None:
            ctx.view.wait_for_change(0.5, seen_epoch=None)  # the lifecycle loop's start decision
            return Pause(0.0, progressed=False)
        # decide on a fresh read, not on the lifecycle loop's copy: just after a
        # successful catch-up that copy still says CATCHING_UP, and recovering an
        # ACTIVE region again would fence it
        status = self.db.run(lambda store: store.region_status())
        if status is None:
            return Pause(0.5, progressed=False)
        if status.state not in (State.CATCHING_UP, State.VERIFYING):
            self.refused, self.retry_at = 0, 0.0
            # an operator or the relay may send it to catch-up
            ctx.view.wait_for_change(0.5, seen_epoch=status.epoch)
            return GO_ON  # nothing to catch up is progress too
        if time.monotonic() < self.retry_at:
            # the gate refused: keep reading the state meanwhile, it will not pass sooner
            return Pause(min(0.5, self.retry_at - time.monotonic()))
        self.log.info("catch-up starting", extra={"fields": {"state": status.state.value}})
        report = self.recover(ctx.config, ctx.region, actor="sidecar", metrics=ctx.metrics)
        # a gate that refuses has still done its work; ReconcilerCatchUpTooLong is the
        # alert for a catch-up that never ends
        state = str(getattr(report, "state", ""))
        self.log.info("catch-up finished", extra={"fields": {"state": state}})
        if state == State.ACTIVE.value:
            self.refused, self.retry_at = 0, 0.0
            return GO_ON
        self.refused += 1
        self.retry_at = time.monotonic() + self.REFUSED_WAIT.nominal(self.refused)
        return Pause(0.5)

    def close(self) -> None:
        self.db.close()
