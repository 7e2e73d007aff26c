"""The inbox consumer: peers' Kafka topics -> this region's rows, exactly once.

Offsets are committed to Kafka only after the database transaction that applied
the batch has committed. A crash in between redelivers the batch and the inbox
table's (origin, sequence) key drops what was already applied. A message that
cannot be decoded or applied is quarantined with its reason and the consumer
goes on with the next one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from . import wire
from .apply import Applier, ApplyReport, KeyRoutedApplier, Rejected
from .config import Config
from .conflict_queue import retry_held
from .errors import TransportError
from .logs import component_logger
from .loop import GO_ON, Backoff, Pause, SupervisedLoop
from .metrics import Metrics
from .model import Event
from .store.port import PipelineStore, StoreSessions
from .store.postgres_store import RegionDatabases
from .store.reconnecting import close_quietly
from .transport.kafka import KafkaEventLog
from .transport.port import Delivery, EventLog, Subscription

#: how often held (future-stamped) events are looked at again
HELD_RETRY_SECONDS = 1.0
#: how often the inbox asks the broker whether its (asynchronous) offset commits land
COMMIT_CHECK_SECONDS = 10.0
#: how long closing a consumer may take before it is left to finish on its own
CLOSE_SECONDS = 10.0


@dataclass
class _Batch:
    """What one poll brought: events to apply, messages to quarantine, and the highest
    offset per partition, committed once the batch is applied."""

    deliveries: list[Delivery]
    events: list[Event] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)


class InboxConsumer:
    def __init__(
        self, config: Config, region: str, *, metrics: Metrics | None = None, origins: list[str] | None = None,
        databases: StoreSessions | None = None, events: EventLog | None = None,
    ) -> None:
        self.config = config
        self.region = region
        self.origins = origins or config.peers(region)
        self.topics = [config.events_topic(o) for o in self.origins]
        self.metrics = metrics
        self.log = component_logger("inbox", region)
        self.databases: StoreSessions = databases or RegionDatabases(config)
        self.events: EventLog = events or KafkaEventLog(config.kafka_settings(region), config.events_topic,
                                                        region=region)
        self._conn: PipelineStore | None = None
        self._subscription: Subscription | None = None
        self._applier: Applier | None = None
        #: the applier above plus one per further ``apply.workers``, each on its own session
        self._routed: KeyRoutedApplier | None = None
        self._worker_conns: list[PipelineStore] = []
        #: fetched while the previous batch was applied; not committed, so on a rebuild
        #: or a stop it is simply delivered again
        self._ahead: _Batch | None = None
        self._next_held_check = 0.0
        self._commit_check_at = 0.0
        #: offsets asked to commit since the last check, and those asked before it
        self._asked: dict[tuple[str, int], int] = {}
        self._due: dict[tuple[str, int], int] = {}

    @property
    def group_id(self) -> str:
        return f"{self.config.topic_prefix}.inbox.{self.region}"

    def start(self) -> None:
        self.events.ensure_topics(self.topics, self.config.topic_partitions)
        # autocommit: every Applier.transaction() is then a real transaction, never a
        # savepoint inside one that an earlier read left open
        self._conn = self.databases.open(self.region, autocommit=True)
        self._applier = Applier(self._conn, self.region, self.config.tables, self.config.hlc_max_offset_ms)
        self._worker_conns = [self.databases.open(self.region, autocommit=True)
                              for _ in range(self.config.apply_workers - 1)]
        self._routed = KeyRoutedApplier([self._applier] + [
            Applier(conn, self.region, self.config.tables, self.config.hlc_max_offset_ms)
            for conn in self._worker_conns])
        self._subscription = self.events.subscribe(self.group_id, self.origins)
        self._asked, self._due, self._commit_check_at = {}, {}, time.monotonic() + COMMIT_CHECK_SECONDS
        self._ahead = None
        self.log.info("inbox started", extra={"fields": {"topics": self.topics}})

    def close(self) -> None:
        if self._subscription is not None:
            # bounded: a consumer whose group coordinator is stuck can block in close()
            # too, and the loop must still be able to rebuild it or stop
            closer = threading.Thread(target=self._subscription.close, daemon=True, name=f"inbox-{self.region}-close")
            closer.start()
            closer.join(CLOSE_SECONDS)
        if self._routed is not None:
            self._routed.close()
            self._routed = None
        for conn in [*self._worker_conns, self._conn]:
            close_quietly(conn)
        self._worker_conns = []
        self._subscription = self._conn = self._applier = None

    def step(self, timeout: float = 0.5) -> ApplyReport:
        """Apply and commit one batch; while it is being applied, fetch the next one."""
        assert self._subscription is not None and self._routed is not None, "start() first"
        batch, self._ahead = self._ahead or self._take(timeout), None
        self._retry_held()
        self._check_commits()
        if not batch.positions:
            return ApplyReport()
        started = time.perf_counter()
        applying = self._routed.submit(batch.events, batch.rejected)
        try:
            # what the consumer already holds (no wait): decoded here while the database
            # works on this batch, applied by the next step, committed only after that
            self._ahead = self._take(0)
        finally:
            report = applying.result()
        deliveries, positions = batch.deliveries, batch.positions
        # asynchronous: a synchronous commit has no timeout, and after a broker restart
        # it can wait for the group coordinator forever (the inbox then applied nothing
        # more and could not stop). A commit that never lands costs a redelivery, which
        # the inbox drops; _check_commits rebuilds a subscription whose commits stopped
        # landing. A refused commit is retryable: the batch is applied, a rebuilt
        # subscription gets it again and the inbox drops it.
        self._subscription.commit(deliveries, wait=False)
        self._asked.update({key: o + 1 for key, o in positions.items()})
        if self.metrics is not None:
            self._record(report, time.perf_counter() - started)
        if report.quarantined:
            self.log.warning("events quarantined", extra={"fields": {
                "count": len(report.quarantined),
                "reasons": sorted({q["reason"] for q in report.quarantined}),
            }})
        return report

    def _take(self, timeout: float) -> _Batch:
        """Poll one batch and sort it into events to apply and messages to quarantine."""
        assert self._subscription is not None
        # each worker's share stays about one apply batch: a transaction's fixed costs
        # (commit, lock and load round trips) spread over as many events as with one worker
        deliveries = self._subscription.poll(self.config.apply_batch_size * self.config.apply_workers, timeout)
        batch = _Batch(deliveries)
        for d in deliveries:
            batch.positions[(d.topic, d.partition)] = max(batch.positions.get((d.topic, d.partition), -1), d.offset)
            event = d.event
            if event is None:
                seen = wire.peek(d.raw)
                batch.rejected.append(Rejected(
                    reason="malformed", detail=str(d.error), origin=d.origin,
                    sequence=seen["sequence"] if seen["origin"] == d.origin else None, event_id=seen["event_id"],
                    topic=d.topic, partition=d.partition, offset=d.offset, raw=d.raw))
            elif d.foreign:
                # Only the region that owns a topic writes events of its origin there. A
                # message claiming another origin is never applied: applied, it would
                # take that origin's (origin, sequence) and the real event, arriving
                # later, would be dropped as a duplicate.
                batch.rejected.append(Rejected(
                    reason="origin_mismatch",
                    detail=f"event {event.event_id} claims origin {event.origin!r} but arrived on topic {d.topic}"
                           f" of region {d.origin!r} (sequence {event.sequence}, table {event.table},"
                           f" key {event.key})",
                    origin=event.origin, sequence=event.sequence, event_id=event.event_id, hlc=event.hlc.pack(),
                    topic=d.topic, partition=d.partition, offset=d.offset, raw=d.raw))
            else:
                batch.events.append(event)
        return batch

    def _check_commits(self) -> None:
        """Every few seconds: have the offsets asked to commit before the last check
        landed? If not (or the broker cannot say in time), raise a retryable error so
        that the loop rebuilds the consumer: its group coordinator is lost for good."""
        now = time.monotonic()
        if now < self._commit_check_at:
            return
        self._commit_check_at = now + COMMIT_CHECK_SECONDS
        due, self._due, self._asked = self._due, self._asked, {}
        if not due:
            return
        assert self._subscription is not None
        landed = self._subscription.committed(list(due), COMMIT_CHECK_SECONDS)
        behind = sorted(f"{t}[{p}]" for (t, p), offset in landed.items() if offset < due[(t, p)])
        if behind:
            raise TransportError(f"offset commits asked {COMMIT_CHECK_SECONDS:.0f}s ago have not landed on {behind}:"
                                 " rebuilding the consumer", retryable=True, region=self.region,
                                 step="check offset commits")

    def _retry_held(self) -> None:
        """Every few seconds, apply the held events (future stamps) whose stamp is no
        longer too far ahead of the database's clock; each settles its entry."""
        now = time.monotonic()
        if now < self._next_held_check:
            return
        self._next_held_check = now + HELD_RETRY_SECONDS
        assert self._conn is not None and self._applier is not None
        report = retry_held(self._conn, self._applier, self.config.apply_batch_size)
        if report.settled:
            self.log.info("held events applied", extra={"fields": {"count": len(report.settled)}})
        if self.metrics is not None and (report.applied or report.settled):
            for event in report.applied:
                self.metrics.events_applied.labels(origin=event.origin).inc()

    def _record(self, report: ApplyReport, seconds: float) -> None:
        metrics = self.metrics
        assert metrics is not None
        metrics.apply_batch_seconds.observe(seconds)
        for event in report.applied:
            metrics.events_applied.labels(origin=event.origin).inc()
        for origin, count in report.duplicates.items():
            metrics.events_duplicate.labels(origin=origin).inc(count)
        for item in report.quarantined:
            metrics.record_quarantined(str(item.get("origin") or "unknown"), str(item["reason"]))
        for conflict in report.conflicts:
            metrics.record_conflict(conflict.table, conflict.kind.value, conflict.outcome.value)

    def loop(self, stop: threading.Event) -> SupervisedLoop:
        """The inbox as the sidecar runs it (and the drills, through the same call).

        Essential: an error no retry cures (an ACL refusal) ends the process. A
        retryable one rebuilds the consumer, which resumes from the last committed
        offsets, so nothing is skipped. After ``stop`` the batch in hand is applied
        and its offsets committed before the loop returns."""
        return SupervisedLoop("inbox", _InboxSteps(self), stop, log=self.log, metrics=self.metrics,
                              backoff=Backoff(0.2, 5.0), essential=True)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set (:meth:`loop`, run on this thread)."""
        self.loop(stop).run()


class _InboxSteps:
    """The inbox as a :class:`~reconciler.loop.Worker`: consuming waits for messages
    itself (up to half a second), so a step never asks the loop to idle."""

    def __init__(self, inbox: InboxConsumer) -> None:
        self.inbox = inbox

    def start(self) -> None:
        self.inbox.start()

    def step(self) -> Pause:
        self.inbox.step()
        return GO_ON

    def close(self) -> None:
        self.inbox.close()
