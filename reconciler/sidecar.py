"""The always-on sidecar: one process per region, each loop on its own thread.

This module is wiring: each loop is a :class:`reconciler.loop.SupervisedLoop` (which
owns retries, backoff, which errors end the process, and the loop metrics) around a
worker whose ``step`` does one unit of the duty below.

Loops (``reconciler_loop_*{component=...}`` names them), each in its stage's module:

- ``relay``      this region's outbox -> its Kafka topic (:mod:`reconciler.relay`);
- ``inbox``      peers' topics -> this region's rows (:mod:`reconciler.inbox`);
- ``lifecycle``  the start decision, ``last_alive_at``, the persisted state that
  ``/readyz`` follows (:mod:`reconciler.lifecycle_loop`);
- ``replay``     catch-up while the region is CATCHING_UP or VERIFYING
  (:mod:`reconciler.lifecycle_loop`, running :func:`reconciler.recovery.recover`);
- ``heartbeat``  tells peers this region is alive and judges theirs (:mod:`reconciler.heartbeats`);
- ``stats``      backlog, lag, gaps, queues measured every few seconds (:mod:`reconciler.stats`);
- ``retention``  prunes events older than ``retention.keep_hours`` (:mod:`reconciler.prune`);
- ``merkle``     continuous anti-entropy while ACTIVE (:mod:`reconciler.anti_entropy`).

What the loops share is :class:`reconciler.region_view.RegionView`.

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
from typing import Any

from .anti_entropy import AntiEntropySteps
from .config import Config
from .errors import ConfigError, ReconcilerError
from .heartbeats import HeartbeatSteps
from .inbox import InboxConsumer
from .lifecycle import RegionStatus
from .lifecycle_loop import CatchUpSteps, LifecycleSteps, RecoverFn
from .loop import Backoff, SupervisedLoop, run_guarded
from .metrics import COMPONENTS, Metrics, serve
from .prune import RetentionSteps
from .region_view import LoopContext, RegionView
from .relay import Relay, relay_loop
from .stats import STATS_INTERVAL_SECONDS, StatsSteps
from .store.postgres_store import RegionDatabases
from .transport import kafka
from .transport.kafka import KafkaEventLog
from .transport.port import EventLog

#: how long a planned stop may spend publishing what is left in the outbox
DRAIN_SECONDS = 30.0
#: how often a loop with nothing to do stamps its progress metric: well under the 5
#: minutes after which ReconcilerLoopStalled calls a loop stalled (alerts.yml)
IDLE_STAMP_SECONDS = 15.0
#: how long a stop waits for the loops beyond the relay's drain (all loops at once)
JOIN_GRACE_SECONDS = 15.0
#: how long a stop waits for catch-up, which resumes on the next start
REPLAY_JOIN_SECONDS = 5.0
#: how long the sidecar's own Kafka reads (where a topic starts, for the stats) may wait
KAFKA_CHECK_TIMEOUT_SECONDS = 2.0


class Sidecar:
    """One region's loops, their shared :class:`~reconciler.region_view.RegionView`,
    and the probes.

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
        events: EventLog | None = None,
    ) -> None:
        config.region(region)
        self.config = config
        self.region = region
        self.stop = threading.Event()
        self.metrics = Metrics.create(region, peers=config.peers(region), tables=list(config.tables))
        self.metrics.hlc_max_offset_seconds.set(config.hlc_max_offset_ms / 1000.0)
        self.view = RegionView(self.metrics, fresh_for_seconds=max(5.0, 3 * config.heartbeat.interval_seconds))
        self.ctx = LoopContext(config, region, self.metrics, self.stop, self.view)
        self.events = events or KafkaEventLog(config.kafka_settings(region), config.events_topic, region=region,
                                              timeout=KAFKA_CHECK_TIMEOUT_SECONDS)
        self.log = self.ctx.logger("sidecar")
        self.relay = Relay(config, region, metrics=self.metrics)
        self.inbox = InboxConsumer(config, region, metrics=self.metrics)
        self.view.loggers.append(self.inbox.log)
        self.failures: list[BaseException] = []
        self.drain_seconds = drain_seconds
        self.stats_interval = stats_interval
        self.recover = recover
        self._threads: dict[str, threading.Thread] = {}
        self._loops: dict[str, SupervisedLoop] = {}

    # ------------------------------------------------------------------ probes

    def healthy(self) -> bool:
        return not self.failures and all(t.is_alive() for t in self._threads.values())

    def ready(self) -> bool:
        """Serve traffic only while the persisted state is ACTIVE and was read recently.

        Not knowing is not ready: before the first read, or when the database has not
        answered for a while, the region may have been fenced meanwhile.
        """
        return not self.stop.is_set() and self.healthy() and self.view.active() and self.view.fresh()

    @property
    def status(self) -> RegionStatus | None:
        """The lifecycle state as last read from the database."""
        return self.view.status

    # ------------------------------------------------------------------ the loops

    def loops(self) -> dict[str, SupervisedLoop]:
        """Every loop of the sidecar, built afresh (each owns its worker's connections)."""
        return {name: self.loop(name) for name in COMPONENTS}

    def loop(self, name: str) -> SupervisedLoop:
        """The loop called ``name`` (a ``component`` of the loop metrics), stopped by ``self.stop``.

        Relay and inbox are essential (an error no retry cures ends the process); catch-up
        and anti-entropy contain bugs (they must never stop replication); the others
        retry whatever ReconcilerError they meet and let a bug end the process."""
        if name == "relay":
            return relay_loop(self.relay, self.stop, drain_seconds=self.drain_seconds)
        if name == "inbox":
            return self.inbox.loop(self.stop)
        ctx = self.ctx
        log = ctx.logger(name)
        common: dict[str, Any] = {"log": log, "metrics": self.metrics, "idle_stamp_seconds": IDLE_STAMP_SECONDS}
        if name == "lifecycle":
            lifecycle = LifecycleSteps(ctx, log)
            return SupervisedLoop(name, lifecycle, self.stop, backoff=Backoff(0.5, 2.0),
                                  on_error=lifecycle.failed, **common)
        if name == "replay":
            return SupervisedLoop(name, CatchUpSteps(ctx, log, self.recover), self.stop, backoff=Backoff(1.0, 60.0),
                                  contain_bugs=True, **common)
        if name == "heartbeat":
            return SupervisedLoop(name, HeartbeatSteps(ctx, log, self.events), self.stop,
                                  backoff=Backoff(0.5, 5.0), **common)
        if name == "stats":
            return SupervisedLoop(name, StatsSteps(ctx, log, self.events, self.stats_interval), self.stop,
                                  backoff=Backoff.fixed(self.stats_interval), **common)
        if name == "retention":
            return SupervisedLoop(name, RetentionSteps(ctx, log), self.stop,
                                  backoff=Backoff.fixed(self.config.retention.interval_seconds),
                                  **common)
        if name == "merkle":
            return SupervisedLoop(name, AntiEntropySteps(ctx, log), self.stop,
                                  backoff=Backoff.fixed(self.config.anti_entropy.interval_seconds),
                                  contain_bugs=True, **common)
        raise ValueError(f"no sidecar loop called {name!r}; expected one of {COMPONENTS}")

    def run_loop(self, name: str) -> SupervisedLoop:
        """Run one loop on the calling thread until ``stop`` (tests); returns it, finished."""
        loop = self.loop(name)
        loop.run()
        return loop

    def _start(self, loop: SupervisedLoop) -> threading.Thread:
        thread = threading.Thread(target=run_guarded, args=(loop, self.failures, self.stop),
                                  name=f"{self.region}-{loop.name}", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ running

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
        relay = self._loops.get("relay")
        return not stuck and bool(relay and relay.drained)

    def _mark_clean_stop(self) -> bool:
        try:
            with RegionDatabases(self.config).session(self.region, autocommit=True) as store:
                store.mark_alive(clean_stop=True)
            return True
        except ReconcilerError as exc:
            self.log.error("could not record the clean stop", extra={"fields": exc.to_dict()})
            return False
