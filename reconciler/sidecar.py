"""The always-on sidecar: one process per region, each loop on its own thread.

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
code is 1. SIGKILL loses nothing either: every step is committed before it is
acknowledged, so an interrupted batch is redone and the inbox drops the duplicates.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, cast

from confluent_kafka import OFFSET_END, KafkaError, TopicPartition

from .anti_entropy import AntiEntropy
from .config import Config
from .errors import ConfigError, ReconcilerError, StoreUnavailable
from .gaps import SeqRanges, by_origin, kafka_retained_from, measure_lag, origin_high_water
from .hlc import Timestamp
from .inbox import InboxConsumer
from .lifecycle import RegionStatus, State, needs_catch_up
from .logs import ComponentLogger, component_logger
from .metrics import REGION_STATES, Metrics, serve
from .peers import Heartbeat, PeerTracker, PeerView
from .prune import prune_region
from .relay import Relay
from .store import health, merkle_leaves
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


class RecoverFn(Protocol):
    """What the sidecar needs of :func:`reconciler.recovery.recover`."""

    def __call__(self, config: Config, region: str, *, actor: str = ..., metrics: Metrics | None = ...) -> Any: ...


def load_recover() -> RecoverFn | None:
    """The catch-up service, or None when this build does not have it.

    Imported lazily: only a missing module is tolerated. A recovery module that is
    present but broken raises, because silently never recovering would be worse.
    """
    try:
        module = importlib.import_module("reconciler.recovery")
    except ModuleNotFoundError as exc:
        if exc.name == "reconciler.recovery":
            return None
        raise
    return cast(RecoverFn, module.recover)


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

    def _loop(self, name: str, body: Callable[[threading.Event], None]) -> threading.Thread:
        def guarded() -> None:
            # a loop that never completes one iteration must still age into the alert
            self.metrics.loop_succeeded(name)
            try:
                body(self.stop)
            except BaseException as exc:  # noqa: BLE001 - any loop dying must stop the whole sidecar
                self.failures.append(exc)
                self.log.error("loop died", extra={"fields": {"loop": name, "error": str(exc)}})
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"{self.region}-{name}", daemon=True)
        thread.start()
        return thread

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
            bodies: dict[str, Callable[[threading.Event], None]] = {
                "lifecycle": self._lifecycle_loop,
                "relay": self._relay_loop,
                "inbox": self._inbox_loop,
                "heartbeat": self._heartbeat_loop,
                "stats": self._stats_loop,
                "replay": self._recovery_loop,
                "retention": self._retention_loop,
                "merkle": self._anti_entropy_loop,
            }
            self._threads = {name: self._loop(name, body) for name, body in bodies.items()}
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
            return 0
        self.log.error("sidecar stopped without a complete drain; the next start will catch up",
                       extra={"fields": {"clean_stop": False}})
        return 1

    def _join(self) -> bool:
        """Wait for the loops to finish their batches; True when nothing is left in flight."""
        limits = {"relay": self.drain_seconds + 15, "inbox": 60.0, "replay": 5.0, "merkle": 5.0}
        for name, thread in self._threads.items():
            thread.join(limits.get(name, 15.0))
        # catch-up and anti-entropy are resumable (every repair is its own transaction):
        # a pass cut short is redone, so neither makes a stop unclean
        stuck = [name for name, t in self._threads.items() if t.is_alive() and name not in ("replay", "merkle")]
        if stuck:
            self.log.error("loops did not stop in time", extra={"fields": {"loops": stuck}})
        if self._threads.get("replay") and self._threads["replay"].is_alive():
            # catch-up is resumable: whatever it did not commit is simply redone on the next start
            self.log.warning("leaving catch-up unfinished; it resumes on the next start")
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

    # ------------------------------------------------------------------ relay and inbox

    def _relay_loop(self, stop: threading.Event) -> None:
        """Relay until stopped, then drain (see :meth:`_drain_relay`).

        The same retry rules as :meth:`Relay.run`, plus loop metrics and the drain,
        which ``Relay.run`` does not do: it stops after the batch in hand.
        """
        relay, started, backoff = self.relay, False, 0.2
        try:
            while not stop.is_set():
                try:
                    if not started:
                        relay.start()
                        started = True
                    sent = relay.step()
                    self.metrics.loop_succeeded("relay")
                    backoff = 0.2
                    if not sent:
                        stop.wait(0.05)
                except ReconcilerError as exc:
                    self.metrics.loop_failed("relay")
                    relay.close()
                    started = False
                    if not exc.retryable:
                        self.log.error("relay stopped", extra={"fields": exc.to_dict()})
                        raise
                    relay.log.warning("relay retrying", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
            started = self._drain_relay(started)
        finally:
            relay.close()

    def _drain_relay(self, started: bool) -> bool:
        """Publish everything committed to the outbox until a step finds nothing left.

        A writer that keeps committing during the drain keeps it going, up to
        ``drain_seconds``; a transient failure is retried inside that budget.
        """
        relay = self.relay
        deadline = time.monotonic() + self.drain_seconds
        published, backoff = 0, 0.2
        while time.monotonic() < deadline:
            try:
                if not started:
                    relay.start()
                    started = True
                sent = relay.step()
                published += sent
                if not sent:
                    self._relay_drained = True
                    relay.log.info("relay drained", extra={"fields": {"published": published}})
                    return started
            except ReconcilerError as exc:
                relay.close()
                started = False
                relay.log.warning("relay drain retrying", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
                if not exc.retryable:
                    break
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        relay.log.error("relay drain incomplete: committed events remain in the outbox",
                        extra={"fields": {"published": published, "drain_seconds": self.drain_seconds}})
        return started

    def _inbox_loop(self, stop: threading.Event) -> None:
        """Apply peers' events until stopped; the batch in hand is applied and its
        offsets committed before the loop returns."""
        inbox, started, backoff = self.inbox, False, 0.2
        try:
            while not stop.is_set():
                try:
                    if not started:
                        inbox.start()
                        started = True
                    inbox.step()
                    self.metrics.loop_succeeded("inbox")
                    backoff = 0.2
                except ReconcilerError as exc:
                    self.metrics.loop_failed("inbox")
                    inbox.close()
                    started = False
                    if not exc.retryable:
                        self.log.error("inbox stopped", extra={"fields": exc.to_dict()})
                        raise
                    inbox.log.warning("inbox retrying", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            inbox.close()

    # ------------------------------------------------------------------ lifecycle

    def _lifecycle_loop(self, stop: threading.Event) -> None:
        log = component_logger("lifecycle", self.region)
        self._loggers.append(log)
        interval = self.config.heartbeat.interval_seconds
        conn: pg.Connection | None = None
        decided = False
        lost = False  # the database stopped answering after the start decision
        next_alive = 0.0
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = pg.connect(self.dsn, region=self.region)
                    if not decided:
                        self._decide_at_start(conn, log)
                        decided = True
                    elif lost:
                        self._decide_after_outage(conn, log)
                        lost = False
                    if time.monotonic() >= next_alive:
                        pg.mark_alive(conn, clean_stop=False)
                        next_alive = time.monotonic() + interval
                    self._publish_state(pg.region_status(conn), log)
                    self.metrics.loop_succeeded("lifecycle")
                    backoff = 0.5
                    stop.wait(min(1.0, interval))
                except ReconcilerError as exc:
                    # the state can no longer be vouched for: not ready until it is read again
                    self._status_read_at = float("-inf")
                    self.metrics.loop_failed("lifecycle")
                    log.warning("lifecycle retrying", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
                    _close(conn)
                    conn = None
                    lost = decided
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            _close(conn)

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
        reason = needs_catch_up(status.clean_stop, absent, self.config.lifecycle.absence_threshold_seconds)
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

    def _recovery_loop(self, stop: threading.Event) -> None:
        """Run catch-up whenever the persisted state asks for it.

        VERIFYING counts too: a sidecar killed during verification leaves the region
        there, and nobody else would move it. A recover that another process is
        already running is refused by its lock and simply retried later. Any
        exception is survived: a bug in catch-up must not stop relay and inbox,
        which keep the region's data flowing meanwhile.
        """
        log = component_logger("replay", self.region)
        self._loggers.append(log)
        recover = self._recover or load_recover()
        db = _Reconnecting(self.dsn, self.region, retry_seconds=1.0)
        backoff = 1.0
        warned = False
        while not stop.is_set():
            # decide on a fresh read, not on the lifecycle loop's copy: just after a
            # successful catch-up that copy still says CATCHING_UP, and recovering an
            # ACTIVE region again would fence it
            status = self._status and db.run(pg.region_status)
            if status is None or status.state not in (State.CATCHING_UP, State.VERIFYING):
                if status is not None:
                    self.metrics.loop_succeeded("replay")  # nothing to catch up is progress too
                stop.wait(0.5)
                continue
            if recover is None:
                if not warned:
                    log.warning("catch-up is not available in this build; run `reconciler recover`")
                    warned = True
                stop.wait(5.0)
                continue
            try:
                log.info("catch-up starting", extra={"fields": {"state": status.state.value}})
                report = recover(self.config, self.region, actor="sidecar", metrics=self.metrics)
                # a gate that refuses has still done its work; ReconcilerCatchUpTooLong
                # is the alert for a catch-up that never ends
                self.metrics.loop_succeeded("replay")
                state = str(getattr(report, "state", ""))
                log.info("catch-up finished", extra={"fields": {"state": state}})
                if state == State.ACTIVE.value:
                    backoff = 1.0
                    continue
                # the gate refused: wait before measuring again, it will not pass sooner
            except ReconcilerError as exc:
                self.metrics.loop_failed("replay")
                log.warning("catch-up failed", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self.metrics.loop_failed("replay")
                log.error("catch-up crashed", extra={"fields": {
                    "error": f"{type(exc).__name__}: {exc}", "backoff_s": backoff}})
            stop.wait(backoff)
            backoff = min(backoff * 2, 60.0)
        db.close()

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Send a heartbeat every interval, read everyone's, judge the peers.

        The control topic is read by assignment at its end, not by group subscription:
        every region must see every partition anyway, and assignment skips the group
        rebalance that would delay the first heartbeats by seconds. Old heartbeats are
        worthless, hence the start at the end (``auto.offset.reset=latest`` too).

        A heartbeat carries an HLC stamp from the region's database, so it vouches for
        the region, not just for this process: while the database does not answer,
        none is sent.
        """
        hb = self.config.heartbeat
        log = component_logger("heartbeat", self.region)
        self._loggers.append(log)
        tracker = PeerTracker(self.config.peers(self.region), hb.suspect_after_seconds, hb.failed_after_seconds,
                              started_mono=time.monotonic())
        link = _ControlLink(self.config, self.region, log)
        db = _Reconnecting(self.dsn, self.region, retry_seconds=2.0)
        last_liveness: dict[str, str] = {}
        withheld = False
        view_unsaved = False
        next_send = 0.0
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    link.open()
                    now = time.monotonic()
                    if now >= next_send:
                        beat = self._heartbeat(db)
                        if beat.hlc is None:
                            if not withheld:
                                # a region without its database serves nothing: let peers see
                                # it go silent, SUSPECT then FAILED, rather than vouch for it
                                log.warning("heartbeats withheld: database unreachable",
                                            extra={"fields": {"error": db.error}})
                            withheld = True
                        elif self._status_fresh():
                            link.send(beat)
                            if withheld:
                                log.info("heartbeats resumed: database answers again")
                            withheld = False
                        # else: at start or after an outage, the lifecycle loop has not yet
                        # judged the state (it may send the region to catch-up): wait for it
                        next_send = now + hb.interval_seconds
                        views = tracker.view(time.monotonic())
                        self._publish_peers(views, last_liveness, log)
                        db.run(partial(health.save_peer_views, views=list(views.values())))
                        if db.error and not view_unsaved:
                            log.warning("peer view not saved (status will not show it)",
                                        extra={"fields": {"error": db.error}})
                        view_unsaved = db.error is not None
                    for beat in link.receive(timeout=max(0.01, min(0.25, next_send - time.monotonic()))):
                        tracker.observe(beat, time.monotonic(), _wall_ms())
                    self.metrics.loop_succeeded("heartbeat")
                    backoff = 0.5
                except ReconcilerError as exc:
                    self.metrics.loop_failed("heartbeat")
                    log.warning("heartbeat retrying", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
                    link.close()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            link.close()
            db.close()

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

    def _retention_loop(self, stop: threading.Event) -> None:
        """Prune events older than retention.keep_hours every retention.interval_seconds.

        The first pass waits one interval, so a sidecar restarting in a loop does not
        prune in a loop; a pass stops between batches when the sidecar drains.
        Between passes the loop stamps its progress every IDLE_STAMP_SECONDS while the
        last pass succeeded: waiting for the next pass is not a stall, a failing one is.
        """
        if self.config.retention.keep_hours is None:
            # alive all the same: /healthz wants every loop running
            while not stop.wait(IDLE_STAMP_SECONDS):
                self.metrics.loop_succeeded("retention")
            return
        log = component_logger("retention", self.region)
        self._loggers.append(log)
        interval = self.config.retention.interval_seconds
        next_pass = time.monotonic() + interval
        last_ok = True
        while not stop.wait(max(0.0, min(IDLE_STAMP_SECONDS, next_pass - time.monotonic()))):
            if time.monotonic() < next_pass:
                if last_ok:
                    self.metrics.loop_succeeded("retention")
                continue
            next_pass = time.monotonic() + interval
            try:
                result = prune_region(self.config, self.region, metrics=self.metrics, stop=stop.is_set)
                self.metrics.loop_succeeded("retention")
                last_ok = True
                if result is not None and (result.inbox_rows or result.outbox_rows):
                    log.info("pruned old events", extra={"fields": result.to_dict()})
            except ReconcilerError as exc:
                self.metrics.loop_failed("retention")
                last_ok = False
                log.warning("pruning failed; retrying next interval", extra={"fields": exc.to_dict()})

    def _anti_entropy_loop(self, stop: threading.Event) -> None:
        """Compare this region with its peers every anti_entropy.interval_seconds while
        it is ACTIVE (see :mod:`reconciler.anti_entropy`)."""
        settings = self.config.anti_entropy
        if not settings.enabled:
            stop.wait()  # alive all the same: /healthz wants every loop running
            return
        log = component_logger("merkle", self.region)
        self._loggers.append(log)
        runner = AntiEntropy(self.config, self.region, self.metrics, log)
        while not stop.wait(settings.interval_seconds):
            status = self.status
            if status is None or status.state is not State.ACTIVE:
                continue
            try:
                runner.run_pass()
                self.metrics.loop_succeeded("merkle")
            except ReconcilerError as exc:
                self.metrics.loop_failed("merkle")
                log.warning("anti-entropy pass failed; retrying next interval", extra={"fields": exc.to_dict()})
            except Exception as exc:  # noqa: BLE001 - a comparison must never stop replication
                self.metrics.loop_failed("merkle")
                log.error("anti-entropy pass failed unexpectedly; retrying next interval",
                          extra={"fields": {"error": repr(exc)[:500]}})

    def _stats_loop(self, stop: threading.Event) -> None:
        log = component_logger("stats", self.region)
        self._loggers.append(log)
        own = _Reconnecting(self.dsn, self.region, retry_seconds=1.0)
        peers = {p: _Reconnecting(self.config.region(p).dsn, p, retry_seconds=PEER_DB_RETRY_SECONDS, timeout=3)
                 for p in self.config.peers(self.region)}
        warned: set[str] = set()
        compacted_at = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    self._measure(own, peers, log, warned)
                    if time.monotonic() - compacted_at > LEAF_COMPACTION_SECONDS:
                        # the maintained Merkle leaves are an insert-only delta log: fold it so
                        # that reading a table's leaves stays a small GROUP BY
                        compacted_at = time.monotonic()
                        own.run(lambda conn: merkle_leaves.compact_all(conn, self.config.tables))
                    self.metrics.loop_succeeded("stats")
                except ReconcilerError as exc:
                    self.metrics.loop_failed("stats")
                    log.warning("measurement failed", extra={"fields": exc.to_dict()})
                    own.close()
                stop.wait(self.stats_interval)
        finally:
            own.close()
            for conn in peers.values():
                conn.close()

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
            meta = self._consumer.list_topics(self.topic, timeout=10)
            partitions = sorted(meta.topics[self.topic].partitions) if self.topic in meta.topics else [0]
            self._consumer.assign([TopicPartition(self.topic, p, OFFSET_END) for p in partitions])
        except Exception as exc:
            self.close()
            raise kafka.translate(exc, region=self.region, topic=self.topic, step="assign control topic") from exc

    def send(self, beat: Heartbeat) -> None:
        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                self._undelivered += 1

        try:
            self._producer.produce(self.topic, key=beat.region.encode(), value=beat.encode(), on_delivery=delivered)
        except BufferError:
            self._undelivered += 1  # the queue is full of heartbeats nobody received: skip this one
        except Exception as exc:
            raise kafka.translate(exc, region=self.region, topic=self.topic, step="send heartbeat") from exc
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
        first = self._consumer.poll(timeout)
        if first is None:
            return []
        beats = []
        for msg in [first, *self._consumer.consume(num_messages=100, timeout=0)]:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise kafka.translate(err, region=self.region, topic=self.topic, step="read heartbeats")
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
