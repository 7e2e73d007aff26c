"""The always-on sidecar: one process per region, each loop on its own thread.

This module is wiring: each loop is a :class:`reconciler.loop.SupervisedLoop` (which
owns retries, backoff, which errors end the process, and the loop metrics) around a
worker whose ``step`` does one unit of the duty below.

Loops (``reconciler_loop_*{component=...}`` names them):

- ``relay``      this region's outbox -> its Kafka topic (:mod:`reconciler.relay`);
- ``inbox``      peers' topics -> this region's rows (:mod:`reconciler.inbox`);
- ``lifecycle``  decides at start (and again when the database answers after an
  outage) whether the region must catch up, stamps
  ``last_alive_at``, and publishes the persisted state (the only truth ``/readyz``
  follows: a restarted sidecar must not call a region ready that an operator fenced);
- ``replay``     runs catch-up (:func:`reconciler.recovery.recover`) while the region is
  CATCHING_UP, with backoff; a FENCED region waits for an operator;
- ``heartbeat``  tells peers this region is alive and judges theirs (:mod:`reconciler.peers`);
- ``stats``      measures backlog, lag, gaps, queues from the databases every few seconds;
- ``retention``  prunes relayed and applied events older than ``retention.keep_hours``
  (:mod:`reconciler.prune`);
- ``merkle``     continuous anti-entropy while ACTIVE: compares every replicated table
  with every reachable peer at a watermark, now and then by full scan
  (:mod:`reconciler.anti_entropy`).

Stopping. SIGTERM/SIGINT drain: ``/readyz`` turns 503 at once, the inbox finishes and
commits its batch, the relay keeps publishing until every outbox row committed so far
is acknowledged by Kafka (so a planned stop strands nothing in the outbox; a region
FENCED or CATCHING_UP numbers no new rows, and those wait for its return), then
``clean_stop`` is persisted and the process exits 0. If the drain cannot finish (Kafka
down), ``clean_stop`` stays false, the next start goes through catch-up, and the exit
code is 1. The loops stop together under one deadline (``drain_seconds`` +
JOIN_GRACE_SECONDS); one still stuck in a driver call after it does not keep the
process alive. SIGKILL loses nothing either: every step is committed before it is
acknowledged, so an interrupted batch is redone and the inbox drops the duplicates.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from .anti_entropy import AntiEntropy
from .config import Config
from .errors import ConfigError, ReconcilerError, StoreError, StoreUnavailable
from .gaps import SeqRanges, by_origin, kafka_retained_from, measure_lag, origin_high_water
from .hlc import Timestamp
from .inbox import InboxConsumer
from .lifecycle import RegionStatus, State, needs_catch_up
from .logs import ComponentLogger, component_logger
from .loop import GO_ON, Backoff, Pause, SupervisedLoop, run_guarded
from .metrics import COMPONENTS, REGION_STATES, Metrics, serve
from .peers import Heartbeat, PeerTracker, PeerView
from .prune import prune_region
from .relay import Relay, relay_loop
from .store import health, merkle_leaves, seeding
from .store import invariants as store_invariants
from .store import postgres as pg
from .store import quarantine as quarantine_store
from .store.translate import translated
from .transport import kafka

#: how often measured gauges are refreshed from the databases
STATS_INTERVAL_SECONDS = 2.0
LEAF_COMPACTION_SECONDS = 60.0
#: how often the stats loop asks Kafka where each origin's topic starts (a consumer and
#: two reads per origin): an older answer only undercounts what expired, never invents it
KAFKA_RETENTION_CHECK_SECONDS = 60.0
#: how long a planned stop may spend publishing what is left in the outbox
DRAIN_SECONDS = 30.0
#: retry after a peer's database refused a connection (its absence must not slow us down)
PEER_DB_RETRY_SECONDS = 10.0
#: how often a loop with nothing to do stamps its progress metric: well under the 5
#: minutes after which ReconcilerLoopStalled calls a loop stalled (alerts.yml)
IDLE_STAMP_SECONDS = 15.0
#: how long a stop waits for the loops beyond the relay's drain (all loops at once)
JOIN_GRACE_SECONDS = 15.0
#: how long a stop waits for catch-up, which resumes on the next start
REPLAY_JOIN_SECONDS = 5.0


class RecoverFn(Protocol):
    """What the sidecar needs of :func:`reconciler.recovery.recover`."""

    def __call__(self, config: Config, region: str, *, actor: str = ..., metrics: Metrics | None = ...) -> Any: ...


def load_recover() -> RecoverFn:
    """The catch-up service (imported on first use: the sidecar's start needs none of it)."""
    from .recovery import recover

    return recover


class Sidecar:
    """One region's loops, their shared view of the lifecycle state, and the probes.

    Loops share only what they must: the persisted state (read by the lifecycle
    loop, trusted by readiness, heartbeats and catch-up) and the outbox backlog (for
    heartbeats). Each owns its connections, so one slow or broken database session
    cannot stall another loop.
    """

    def __init__(
        self,
        config: Config,
        region: str,
        *,
        recover: RecoverFn | None = None,
        drain_seconds: float = DRAIN_SECONDS,
        stats_interval: float = STATS_INTERVAL_SECONDS,
    ) -> None:
        config.region(region)
        self.config = config
        self.region = region
        self.dsn = config.region(region).dsn
        self.stop = threading.Event()
        self.metrics = Metrics.create(region, peers=config.peers(region), tables=list(config.tables))
        self.metrics.hlc_max_offset_seconds.set(config.hlc_max_offset_ms / 1000.0)
        self.log = component_logger("sidecar", region)
        self.relay = Relay(config, region, metrics=self.metrics)
        self.inbox = InboxConsumer(config, region, metrics=self.metrics)
        self.failures: list[BaseException] = []
        self.drain_seconds = drain_seconds
        self.stats_interval = stats_interval
        self._recover = recover
        self._threads: dict[str, threading.Thread] = {}
        self._loops: dict[str, SupervisedLoop] = {}
        self._loggers: list[ComponentLogger] = [self.log, self.inbox.log]
        # the persisted lifecycle state and when it was last read (monotonic)
        self._status: RegionStatus | None = None
        self._status_read_at = float("-inf")
        self._backlog: int | None = None
        self._relay_drained = False
        self._started_mono = time.monotonic()
        #: per origin: (when asked, the lowest sequence its topic could still deliver, or None: unknown)
        self._retained_from: dict[str, tuple[float, int | None]] = {}

    # ------------------------------------------------------------------ probes

    def healthy(self) -> bool:
        return not self.failures and all(t.is_alive() for t in self._threads.values())

    def ready(self) -> bool:
        """Serve traffic only while the persisted state is ACTIVE and was read recently.

        Not knowing is not ready: before the first read, or when the database has not
        answered for a while, the region may have been fenced meanwhile.
        """
        status = self._status
        return (
            not self.stop.is_set()
            and self.healthy()
            and status is not None
            and status.state is State.ACTIVE
            and self._status_fresh()
        )

    def _status_fresh(self) -> bool:
        """The lifecycle state was read recently enough to vouch for it."""
        fresh_for = max(5.0, 3 * self.config.heartbeat.interval_seconds)
        return time.monotonic() - self._status_read_at < fresh_for

    @property
    def status(self) -> RegionStatus | None:
        """The lifecycle state as last read from the database."""
        return self._status

    # ------------------------------------------------------------------ running

    def _start(self, loop: SupervisedLoop) -> threading.Thread:
        thread = threading.Thread(target=run_guarded, args=(loop, self.failures, self.stop),
                                  name=f"{self.region}-{loop.name}", daemon=True)
        thread.start()
        return thread

    def loops(self) -> dict[str, SupervisedLoop]:
        """Every loop of the sidecar, built afresh (each owns its worker's connections)."""
        return {name: self._supervised(name) for name in COMPONENTS}

    def _supervised(self, name: str) -> SupervisedLoop:
        """The loop called ``name`` (a ``component`` of the loop metrics), stopped by ``self.stop``.

        Relay and inbox are essential (an error no retry cures ends the process); catch-up
        and anti-entropy contain bugs (they must never stop replication); the others
        retry whatever ReconcilerError they meet and let a bug end the process."""
        if name == "relay":
            return relay_loop(self.relay, self.stop, drain_seconds=self.drain_seconds)
        if name == "inbox":
            return self.inbox.loop(self.stop)
        log = component_logger(name, self.region)
        self._loggers.append(log)
        common: dict[str, Any] = {"log": log, "metrics": self.metrics, "idle_stamp_seconds": IDLE_STAMP_SECONDS}
        if name == "lifecycle":
            lifecycle = _LifecycleSteps(self, log)
            return SupervisedLoop(name, lifecycle, self.stop, backoff=Backoff(0.5, 2.0),
                                  on_error=lifecycle.failed, **common)
        if name == "replay":
            return SupervisedLoop(name, _RecoverySteps(self, log), self.stop, backoff=Backoff(1.0, 60.0),
                                  contain_bugs=True, **common)
        if name == "heartbeat":
            return SupervisedLoop(name, _HeartbeatSteps(self, log), self.stop, backoff=Backoff(0.5, 5.0), **common)
        if name == "stats":
            return SupervisedLoop(name, _StatsSteps(self, log), self.stop,
                                  backoff=Backoff.fixed(self.stats_interval), **common)
        if name == "retention":
            return SupervisedLoop(name, _RetentionSteps(self, log), self.stop,
                                  backoff=Backoff.fixed(self.config.retention.interval_seconds), **common)
        if name == "merkle":
            return SupervisedLoop(name, _AntiEntropySteps(self, log), self.stop,
                                  backoff=Backoff.fixed(self.config.anti_entropy.interval_seconds),
                                  contain_bugs=True, **common)
        raise ValueError(f"no sidecar loop called {name!r}; expected one of {COMPONENTS}")

    def run(self, install_signals: bool = True) -> int:
        """Run until signalled; returns the process exit code (see the module docstring)."""
        if install_signals:
            def on_signal(signum: int, _frame: object) -> None:
                self.log.info("draining", extra={"fields": {"signal": signal.Signals(signum).name}})
                self.stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        address = self.config.region(self.region).metrics_address
        try:
            server = serve(address, self.metrics, self.healthy, self.ready)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror or exc}",
                              key=f"regions.{self.region}.metrics_address", file=self.config.path) from exc
        self.log.info("sidecar started", extra={"fields": {
            # host:port, not a URL: logs.py's last-resort DSN redaction would take an
            # "http://host:" followed later by a DSN's "@" for a password
            "metrics": f"{server.host}:{server.port}",
            "dsn": self.config.region(self.region).redacted_dsn,
            "kafka": kafka.safe_settings(self.config.kafka_settings(self.region)),
            "peers": self.config.peers(self.region),
            "pid": os.getpid(),
        }})
        try:
            self._loops = self.loops()
            self._threads = {name: self._start(loop) for name, loop in self._loops.items()}
            while not self.stop.wait(0.5):
                pass
            drained = self._join()
        finally:
            server.close()
        if self.failures:
            first = self.failures[0]
            if isinstance(first, ReconcilerError):
                raise first
            raise ReconcilerError(f"sidecar loop failed: {first}", region=self.region) from first
        if drained and self._mark_clean_stop():
            self.log.info("sidecar stopped cleanly", extra={"fields": {"clean_stop": True}})
            if install_signals:
                self._exit_if_stuck(0)
            return 0
        self.log.error("sidecar stopped without a complete drain; the next start will catch up",
                       extra={"fields": {"clean_stop": False}})
        if install_signals:
            self._exit_if_stuck(1)
        return 1

    def _exit_if_stuck(self, code: int) -> None:
        """End the process now when a loop is still running after the stop deadline.

        A loop stuck in a driver call (a query waiting on a lock, a broker that does
        not answer) may hold a worker of a thread pool, and the interpreter joins every
        pool worker before it exits: without this, such a process would outlive its
        stop by as long as the call hangs, and an orchestrator would SIGKILL it anyway.
        Leaving without that wait loses nothing: every step commits before it
        acknowledges, and the next start catches up (``clean_stop`` stays false)."""
        alive = [name for name, t in self._threads.items() if t.is_alive()]
        if not alive:
            return
        self.log.error("exiting with loops still running", extra={"fields": {"loops": alive, "exit_code": code}})
        logging.shutdown()
        os._exit(code)

    def _join(self) -> bool:
        """Wait for the loops to finish their batches; True when nothing is left in flight.

        One deadline for all of them, not one wait per loop: they stop in parallel, so a
        stop takes at most ``drain_seconds + JOIN_GRACE_SECONDS`` however many loops hang
        (waiting for each in turn could add up to minutes, past any orchestrator's grace
        period, and read as a sidecar ignoring SIGTERM). Catch-up and anti-entropy get a
        few seconds only: both are resumable (every repair is its own transaction), so a
        pass cut short is redone and neither makes a stop unclean."""
        deadline = time.monotonic() + self.drain_seconds + JOIN_GRACE_SECONDS
        resumable = ("replay", "merkle")
        for name, thread in self._threads.items():
            left = max(0.0, deadline - time.monotonic())
            thread.join(min(left, REPLAY_JOIN_SECONDS) if name in resumable else left)
        stuck = [name for name, t in self._threads.items() if t.is_alive() and name not in resumable]
        if stuck:
            self.log.error("loops did not stop in time", extra={"fields": {"loops": stuck}})
        if self._threads.get("replay") and self._threads["replay"].is_alive():
            self.log.warning("leaving catch-up unfinished; it resumes on the next start")
        self._relay_drained = bool(self._loops.get("relay") and self._loops["relay"].drained)
        return not stuck and self._relay_drained

    def _mark_clean_stop(self) -> bool:
        try:
            with pg.connect(self.dsn, region=self.region) as conn:
                pg.mark_alive(conn, clean_stop=True)
            return True
        except ReconcilerError as exc:
            self.log.error("could not record the clean stop", extra={"fields": exc.to_dict()})
            return False

    def _bind_epoch(self, epoch: int) -> None:
        for logger in self._loggers:
            logger.bind(epoch=epoch)

    # ------------------------------------------------------------------ loops run on the calling thread (tests)

    def _relay_loop(self, _stop: threading.Event) -> None:
        loop = self._supervised("relay")
        try:
            loop.run()
        finally:
            self._relay_drained = loop.drained

    def _inbox_loop(self, _stop: threading.Event) -> None:
        self._supervised("inbox").run()

    def _lifecycle_loop(self, _stop: threading.Event) -> None:
        self._supervised("lifecycle").run()

    def _recovery_loop(self, _stop: threading.Event) -> None:
        self._supervised("replay").run()

    def _heartbeat_loop(self, _stop: threading.Event) -> None:
        self._supervised("heartbeat").run()

    def _retention_loop(self, _stop: threading.Event) -> None:
        self._supervised("retention").run()

    def _anti_entropy_loop(self, _stop: threading.Event) -> None:
        self._supervised("merkle").run()

    def _stats_loop(self, _stop: threading.Event) -> None:
        self._supervised("stats").run()

    # ------------------------------------------------------------------ lifecycle

    def _decide_at_start(self, conn: pg.Connection, log: ComponentLogger) -> None:
        """Catch up first if the last run ended badly or long ago.

        Read before anything is written: ``clean_stop`` is set to false right after,
        so that a SIGKILL from now on is recognised on the next start.
        """
        status = pg.region_status(conn)
        self._bind_epoch(status.epoch)
        absent = None
        if status.last_alive_at is not None:
            absent = max(0.0, time.time() - status.last_alive_at.timestamp())
        reason = needs_catch_up(status.clean_stop, absent, self.config.lifecycle.absence_threshold_seconds,
                                empty_beside_peers=status.last_alive_at is None and self._empty_beside_peers(conn))
        log.info("lifecycle at start", extra={"fields": {
            "state": status.state.value, "epoch": status.epoch, "clean_stop": status.clean_stop,
            "absent_seconds": None if absent is None else round(absent, 1), "catch_up": reason,
        }})
        # FENCED waits for an operator; CATCHING_UP is already where it must be.
        if reason and status.state in (State.ACTIVE, State.SUSPECT, State.VERIFYING):
            status = pg.transition(conn, State.CATCHING_UP, reason, actor="sidecar", expected_epoch=status.epoch)
            log.warning("region sent to catch-up", extra={"fields": {"reason": reason, "epoch": status.epoch}})
        pg.mark_alive(conn, clean_stop=False)
        self._publish_state(status, log)

    def _empty_beside_peers(self, conn: pg.Connection) -> bool:
        """This region's replicated tables are empty and some reachable peer's are not."""
        tables = list(self.config.tables.values())
        if seeding.holds_rows(conn, self.region, tables):
            return False
        for peer in self.config.peers(self.region):
            try:
                with pg.connect(self.config.region(peer).dsn, region=peer) as other:
                    if seeding.holds_rows(other, peer, tables):
                        return True
            except StoreError:
                continue  # an unreachable peer cannot say; the others may
        return False

    def _decide_after_outage(self, conn: pg.Connection, log: ComponentLogger) -> None:
        """The start decision again, when the database answers after an outage.

        While the database was away, ``last_alive_at`` stopped moving, so its age is the
        outage; a database restored from a backup shows the age of the backup. Either
        way, beyond the absence threshold the region may have missed what it cannot get
        from Kafka alone. ``clean_stop`` is ignored here: it is false because this
        sidecar is running, not because it crashed, and a blip must not cost a catch-up.
        """
        status = pg.region_status(conn)
        if status.last_alive_at is None:
            return
        absent = max(0.0, time.time() - status.last_alive_at.timestamp())
        threshold = self.config.lifecycle.absence_threshold_seconds
        log.info("database answers again", extra={"fields": {
            "state": status.state.value, "absent_seconds": round(absent, 1)}})
        if needs_catch_up(True, absent, threshold) and status.state in (State.ACTIVE, State.SUSPECT,
                                                                         State.VERIFYING):
            reason = f"database was out of reach for {absent:.0f}s (> {threshold:.0f}s)"
            status = pg.transition(conn, State.CATCHING_UP, reason, actor="sidecar", expected_epoch=status.epoch)
            log.warning("region sent to catch-up", extra={"fields": {"reason": reason, "epoch": status.epoch}})
        self._publish_state(status, log)

    def _publish_state(self, status: RegionStatus, log: ComponentLogger) -> None:
        previous = self._status
        self._status = status
        self._status_read_at = time.monotonic()
        self.metrics.set_region_state(status.state.value)
        self.metrics.region_epoch.set(status.epoch)
        if previous is None or previous.epoch != status.epoch:
            self._bind_epoch(status.epoch)
        if previous is not None and previous.state is not status.state:
            log.info("lifecycle state changed", extra={"fields": {
                "from": previous.state.value, "to": status.state.value, "epoch": status.epoch,
                "reason": status.reason,
            }})

    def _heartbeat(self, db: _Reconnecting) -> Heartbeat:
        status = self._status
        stamp = db.run(_stamp)
        return Heartbeat(
            region=self.region,
            wall_ms=_wall_ms(),
            hlc=stamp.pack() if stamp is not None else None,
            state=status.state.value if status else None,
            epoch=status.epoch if status else None,
            outbox_backlog=self._backlog,
        )

    def _publish_peers(self, views: dict[str, PeerView], last: dict[str, str], log: ComponentLogger) -> None:
        for peer, view in views.items():
            believed = view.believed_state if view.believed_state in REGION_STATES else view.liveness
            self.metrics.set_peer_state(peer, believed)
            self.metrics.heartbeat_age_seconds.labels(peer=peer).set(view.age_seconds)
            if view.skew_ms is not None:
                self.metrics.hlc_skew_seconds.labels(peer=peer).set(view.skew_ms / 1000.0)
            before = last.get(peer)
            if before != view.liveness and (before is not None or view.liveness != "ACTIVE"):
                level = log.info if view.liveness == "ACTIVE" else log.warning
                level("peer state changed", extra={"fields": {
                    "peer": peer, "from": before, "to": view.liveness, "heard": view.heard,
                    "age_seconds": round(view.age_seconds, 2),
                }})
            last[peer] = view.liveness

    # ------------------------------------------------------------------ measurements

    def _measure(
        self, own: _Reconnecting, peers: dict[str, _Reconnecting], log: ComponentLogger, warned: set[str],
    ) -> None:
        conn = own.connection()
        m = self.metrics
        backlog = health.outbox_backlog(conn, self.region)
        self._backlog = backlog.events
        m.outbox_backlog_events.set(backlog.events)
        m.outbox_oldest_unrelayed_age_seconds.set(backlog.oldest_age_seconds)
        progress = health.inbox_progress(conn)
        refused = by_origin(quarantine_store.refused(conn))
        settled = {o: SeqRanges(r) for o, r in quarantine_store.discarded(conn).items()}
        for origin, peer_db in peers.items():
            mine = progress.get(origin)
            applied = mine.applied if mine else 0
            highest = mine.highest_sequence if mine else 0
            # the origin's own relay knows best how far it got; when it cannot be asked,
            # what we have seen of it is the best lower bound
            position = peer_db.run(partial(pg.relay_position, origin=origin))
            origin_high, published = position if position is not None else (None, None)
            if peer_db.error and origin not in warned:
                log.warning("origin database unreachable; lag is measured against the events seen",
                            extra={"fields": {"origin": origin, "error": peer_db.error}})
                warned.add(origin)
            elif not peer_db.error:
                warned.discard(origin)
            measure = partial(measure_lag, applied=applied, highest_applied=highest,
                              origin_high=origin_high_water(origin_high, highest),
                              refused=refused.get(origin, SeqRanges()), settled=settled.get(origin, SeqRanges()))
            lag = measure()
            if lag.events:
                measure = partial(measure, kafka_retained_from=self._kafka_retained_from(
                    origin, published, lag.origin_high))
                lag = measure()
            if lag.events:
                first = lag.first_in_flight or highest + 1
                oldest = peer_db.run(partial(health.event_age, origin=origin, sequence=first))
                if oldest is None and mine is not None:
                    oldest = mine.last_applied_age_seconds
                lag = measure(oldest_unapplied_age=oldest if oldest is not None
                              else time.monotonic() - self._started_mono)
            m.replication_lag_events.labels(origin=origin, destination=self.region).set(lag.events)
            m.replication_lag_seconds.labels(origin=origin, destination=self.region).set(lag.seconds)
            m.gaps_events.labels(origin=origin, destination=self.region).set(lag.gap)
        queue = health.manual_queue(conn, list(self.config.tables))
        for table, depth in queue.depth_by_table.items():
            m.manual_queue_depth.labels(table=table).set(depth)
        m.manual_queue_oldest_age_seconds.set(queue.oldest_age_seconds)
        m.quarantine_events.set(health.quarantined(conn))
        m.set_refused(quarantine_store.refused_counts(conn), self.config.regions)
        open_violations = store_invariants.open_counts(conn)
        for table_name, table_config in self.config.tables.items():
            for invariant in table_config.invariants:  # 0 published too: the alert's series exists from start
                m.invariant_violations_open.labels(table=table_name, invariant=invariant).set(
                    open_violations.get((table_name, invariant), 0))

    def _kafka_retained_from(self, origin: str, published: int | None, origin_high: int) -> int | None:
        """Where ``origin``'s topic starts, asked at most every KAFKA_RETENTION_CHECK_SECONDS.
        The answer is kept, not the bounds: an empty topic is read against the relay
        position of the same moment, so a stale answer never calls new events expired."""
        now = time.monotonic()
        cached = self._retained_from.get(origin)
        if cached is None or now - cached[0] > KAFKA_RETENTION_CHECK_SECONDS:
            try:
                bounds = kafka.retained_sequences(self.config.kafka_settings(self.region),
                                                  self.config.events_topic(origin), timeout=2.0)
                cached = (now, kafka_retained_from(bounds, published, origin_high))
            except ReconcilerError:
                cached = (now, None)  # unknown: the tail counts as lag until the next try
            self._retained_from[origin] = cached
        return cached[1]


def _stamp(conn: pg.Connection) -> Timestamp:
    """The region's HLC stamp for a heartbeat, committed so no transaction idles open."""
    with translated(step="stamp heartbeat"):
        stamp = pg.hlc_now(conn)
        conn.commit()
    return stamp


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _close(conn: pg.Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
            pass


class _Reconnecting:
    """A connection that is reopened on demand, at most every ``retry_seconds``.

    For measurements that may fail without consequence (a peer's database, the
    heartbeat's HLC stamp): ``run`` returns None instead of raising, and keeps the
    redacted error for the log, so an unreachable database costs one failed connect
    per retry period, not one per loop iteration.
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
        _close(self._conn)
        self._conn = None


class _ControlLink:
    """Producer and reader of the control topic, rebuilt after a Kafka failure."""

    def __init__(self, config: Config, region: str, log: ComponentLogger) -> None:
        self.config = config
        self.region = region
        self.topic = config.control_topic
        self.log = log
        self._producer: Any = None
        self._consumer: Any = None
        self._undelivered = 0
        self._warned_at = float("-inf")

    def open(self) -> None:
        if self._producer is not None:
            return
        settings = self.config.kafka_settings(self.region)
        hb = self.config.heartbeat
        kafka.ensure_topics(settings, [self.topic], self.config.topic_partitions, region=self.region)
        # a heartbeat that cannot be delivered in time is worthless: let it expire
        # rather than arrive late and make a silent region look alive
        timeout_ms = str(int(max(1000.0, hb.suspect_after_seconds * 1000)))
        self._producer = kafka.producer(settings, **{"linger.ms": "0", "message.timeout.ms": timeout_ms})
        self._consumer = kafka.consumer(
            settings, f"{self.config.topic_prefix}.heartbeat.{self.region}", **{"auto.offset.reset": "latest"}
        )
        try:
            kafka.assign_at_end(self._consumer, self.topic, region=self.region, step="assign control topic")
        except ReconcilerError:
            self.close()
            raise

    def send(self, beat: Heartbeat) -> None:
        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                self._undelivered += 1

        try:
            self._producer.produce(self.topic, key=beat.region.encode(), value=beat.encode(), on_delivery=delivered)
        except BufferError:
            self._undelivered += 1  # the queue is full of heartbeats nobody received: skip this one
        self._producer.poll(0)
        if self._undelivered and time.monotonic() - self._warned_at > 10:
            self.log.warning("heartbeats not delivered", extra={"fields": {"count": self._undelivered}})
            self._warned_at = time.monotonic()
            self._undelivered = 0

    def receive(self, timeout: float) -> list[Heartbeat]:
        """Heartbeats that arrived, waiting up to ``timeout`` for the first.

        poll() for the first, not consume(n, timeout): consume waits out its whole
        timeout unless n messages arrive, and that wait would be read as network
        delay (skew) and heartbeat age.
        """
        where = {"region": self.region, "topic": self.topic, "step": "read heartbeats"}
        first = kafka.poll(self._consumer, timeout, **where)
        if first is None:
            return []
        beats = []
        for msg in [first, *kafka.consume(self._consumer, 100, 0, **where)]:
            beat = Heartbeat.decode(msg.value())
            if beat is not None:
                beats.append(beat)
        return beats

    def close(self) -> None:
        for closing in (self._consumer, self._producer):
            if closing is None:
                continue
            try:
                if closing is self._producer:
                    closing.flush(1)
                else:
                    closing.close()
            except Exception:  # noqa: BLE001 - a broken client must not mask the real error
                pass
        self._producer = self._consumer = None


# ---------------------------------------------------------------------- the loops' steps
# Each is a reconciler.loop.Worker: start opens what the loop needs, step does one unit
# of work and says how long to idle, close releases everything. Retrying, backing off,
# stopping and the loop metrics are SupervisedLoop's.


class _LifecycleSteps:
    """Decides at start (and again when the database answers after an outage) whether
    the region must catch up, stamps ``last_alive_at``, publishes the persisted state."""

    def __init__(self, sidecar: Sidecar, log: ComponentLogger) -> None:
        self.sidecar = sidecar
        self.log = log
        self.interval = sidecar.config.heartbeat.interval_seconds
        self.conn: pg.Connection | None = None
        self.decided = False
        self.lost = False  # the database stopped answering after the start decision
        self.next_alive = 0.0

    def start(self) -> None:
        sidecar = self.sidecar
        self.conn = pg.connect(sidecar.dsn, region=sidecar.region)
        if not self.decided:
            sidecar._decide_at_start(self.conn, self.log)
            self.decided = True
        elif self.lost:
            sidecar._decide_after_outage(self.conn, self.log)
            self.lost = False

    def step(self) -> Pause:
        assert self.conn is not None
        if time.monotonic() >= self.next_alive:
            pg.mark_alive(self.conn, clean_stop=False)
            self.next_alive = time.monotonic() + self.interval
        self.sidecar._publish_state(pg.region_status(self.conn), self.log)
        return Pause(min(1.0, self.interval))

    def failed(self, _exc: BaseException) -> None:
        # the state can no longer be vouched for: not ready until it is read again
        self.sidecar._status_read_at = float("-inf")
        self.lost = self.decided

    def close(self) -> None:
        _close(self.conn)
        self.conn = None


class _RecoverySteps:
    """Runs catch-up whenever the persisted state asks for it.

    VERIFYING counts too: a sidecar killed during verification leaves the region
    there, and nobody else would move it. A recover that another process is already
    running is refused by its lock and simply retried later. The loop contains any
    exception: a bug in catch-up must not stop relay and inbox, which keep the
    region's data flowing meanwhile."""

    #: a gate that refused will not pass sooner: measure again after this, doubling
    REFUSED_WAIT = Backoff(1.0, 60.0, jitter=0.0)

    def __init__(self, sidecar: Sidecar, log: ComponentLogger) -> None:
        self.sidecar = sidecar
        self.log = log
        self.recover = sidecar._recover or load_recover()
        self.db = _Reconnecting(sidecar.dsn, sidecar.region, retry_seconds=1.0)
        self.refused = 0
        self.retry_at = 0.0

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        sidecar = self.sidecar
        # decide on a fresh read, not on the lifecycle loop's copy: just after a
        # successful catch-up that copy still says CATCHING_UP, and recovering an
        # ACTIVE region again would fence it
        status = sidecar._status and self.db.run(pg.region_status)
        if status is None:
            return Pause(0.5, progressed=False)
        if status.state not in (State.CATCHING_UP, State.VERIFYING):
            self.refused, self.retry_at = 0, 0.0
            return Pause(0.5)  # nothing to catch up is progress too
        if time.monotonic() < self.retry_at:
            # the gate refused: keep reading the state meanwhile, it will not pass sooner
            return Pause(min(0.5, self.retry_at - time.monotonic()))
        self.log.info("catch-up starting", extra={"fields": {"state": status.state.value}})
        report = self.recover(sidecar.config, sidecar.region, actor="sidecar", metrics=sidecar.metrics)
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


class _HeartbeatSteps:
    """Sends a heartbeat every interval, reads everyone's, judges the peers.

    The control topic is read by assignment at its end, not by group subscription:
    every region must see every partition anyway, and assignment skips the group
    rebalance that would delay the first heartbeats by seconds. Old heartbeats are
    worthless, hence the start at the end (``auto.offset.reset=latest`` too).

    A heartbeat carries an HLC stamp from the region's database, so it vouches for the
    region, not just for this process: while the database does not answer, none is sent.
    """

    def __init__(self, sidecar: Sidecar, log: ComponentLogger) -> None:
        hb = sidecar.config.heartbeat
        self.sidecar = sidecar
        self.log = log
        self.interval = hb.interval_seconds
        self.tracker = PeerTracker(sidecar.config.peers(sidecar.region), hb.suspect_after_seconds,
                                   hb.failed_after_seconds, started_mono=time.monotonic())
        self.link = _ControlLink(sidecar.config, sidecar.region, log)
        self.db = _Reconnecting(sidecar.dsn, sidecar.region, retry_seconds=2.0)
        self.last_liveness: dict[str, str] = {}
        self.withheld = False
        self.view_unsaved = False
        self.next_send = 0.0

    def start(self) -> None:
        self.link.open()

    def step(self) -> Pause:
        sidecar, log, db = self.sidecar, self.log, self.db
        now = time.monotonic()
        if now >= self.next_send:
            beat = sidecar._heartbeat(db)
            if beat.hlc is None:
                if not self.withheld:
                    # a region without its database serves nothing: let peers see it go
                    # silent, SUSPECT then FAILED, rather than vouch for it
                    log.warning("heartbeats withheld: database unreachable", extra={"fields": {"error": db.error}})
                self.withheld = True
            elif sidecar._status_fresh():
                self.link.send(beat)
                if self.withheld:
                    log.info("heartbeats resumed: database answers again")
                self.withheld = False
            # else: at start or after an outage, the lifecycle loop has not yet judged
            # the state (it may send the region to catch-up): wait for it
            self.next_send = now + self.interval
            views = self.tracker.view(time.monotonic())
            sidecar._publish_peers(views, self.last_liveness, log)
            db.run(partial(health.save_peer_views, views=list(views.values())))
            if db.error and not self.view_unsaved:
                log.warning("peer view not saved (status will not show it)", extra={"fields": {"error": db.error}})
            self.view_unsaved = db.error is not None
        # receiving waits for the next heartbeat, so the loop itself never idles
        for beat in self.link.receive(timeout=max(0.01, min(0.25, self.next_send - time.monotonic()))):
            self.tracker.observe(beat, time.monotonic(), _wall_ms())
        return GO_ON

    def close(self) -> None:
        self.link.close()
        self.db.close()


class _StatsSteps:
    """Measures backlog, lag, gaps and queues from the databases every few seconds."""

    def __init__(self, sidecar: Sidecar, log: ComponentLogger) -> None:
        self.sidecar = sidecar
        self.log = log
        self.own = _Reconnecting(sidecar.dsn, sidecar.region, retry_seconds=1.0)
        self.peers = {p: _Reconnecting(sidecar.config.region(p).dsn, p, retry_seconds=PEER_DB_RETRY_SECONDS, timeout=3)
                      for p in sidecar.config.peers(sidecar.region)}
        self.warned: set[str] = set()
        self.compacted_at = time.monotonic()

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        sidecar = self.sidecar
        sidecar._measure(self.own, self.peers, self.log, self.warned)
        if time.monotonic() - self.compacted_at > LEAF_COMPACTION_SECONDS:
            # the maintained Merkle leaves are an insert-only delta log: fold it so that
            # reading a table's leaves stays a small GROUP BY
            self.compacted_at = time.monotonic()
            self.own.run(lambda conn: merkle_leaves.compact_all(conn, sidecar.config.tables))
        return Pause(sidecar.stats_interval)

    def close(self) -> None:
        self.own.close()
        for conn in self.peers.values():
            conn.close()


class _RetentionSteps:
    """Prunes events older than retention.keep_hours every retention.interval_seconds.

    The first pass waits one interval, so a sidecar restarting in a loop does not prune
    in a loop; a pass stops between batches when the sidecar drains. Waiting for the
    next pass is idling (stamped as progress while the last pass succeeded), a failing
    pass is an error retried at the next interval."""

    def __init__(self, sidecar: Sidecar, log: ComponentLogger) -> None:
        self.sidecar = sidecar
        self.log = log
        self.interval = sidecar.config.retention.interval_seconds
        self.next_pass = time.monotonic() + self.interval

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        sidecar = self.sidecar
        if sidecar.config.retention.keep_hours is None:
            return Pause(float("inf"))  # alive all the same: /healthz wants every loop running
        now = time.monotonic()
        if now < self.next_pass:
            return Pause(self.next_pass - now)
        self.next_pass = now + self.interval
        result = prune_region(sidecar.config, sidecar.region, metrics=sidecar.metrics, stop=sidecar.stop.is_set)
        if result is not None and (result.inbox_rows or result.outbox_rows):
            self.log.info("pruned old events", extra={"fields": result.to_dict()})
        return Pause(self.interval)

    def close(self) -> None:
        pass


class _AntiEntropySteps:
    """Compares this region with its peers every anti_entropy.interval_seconds while it
    is ACTIVE (see :mod:`reconciler.anti_entropy`); in any other state there is nothing
    to compare, which is progress too."""

    def __init__(self, sidecar: Sidecar, log: ComponentLogger) -> None:
        self.sidecar = sidecar
        self.settings = sidecar.config.anti_entropy
        self.runner = (AntiEntropy(sidecar.config, sidecar.region, sidecar.metrics, log)
                       if self.settings.enabled else None)
        self.next_pass = time.monotonic() + self.settings.interval_seconds

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        if self.runner is None:
            return Pause(float("inf"))  # alive all the same: /healthz wants every loop running
        now = time.monotonic()
        if now < self.next_pass:
            return Pause(self.next_pass - now)
        self.next_pass = now + self.settings.interval_seconds
        status = self.sidecar.status
        if status is not None and status.state is State.ACTIVE:
            self.runner.run_pass()
        return Pause(self.settings.interval_seconds)

    def close(self) -> None:
        pass
