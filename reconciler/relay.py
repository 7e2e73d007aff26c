"""The relay: this region's outbox -> its Kafka topic, in commit order, exactly once.

One relay per region holds the lease (advisory lock + epoch, see
``store.postgres.acquire_lease``). Each step is crash-safe in three moves:

1. number the committed, unnumbered outbox rows densely (durable before publish,
   so a republished event carries the same (origin, sequence) and the inbox can
   drop the duplicate);
2. publish every numbered-but-unpublished event in one Kafka transaction of the
   idempotent producer (acks=all) and commit it; the transactional id is the
   region's, so the next lease holder's producer fences this one at the broker
   (a zombie relay that lost the lease appends nothing consumers read);
3. record the highest sequence acknowledged.

A crash between 2 and 3 republishes; nothing is skipped and the inbox absorbs
the duplicates.

Before it numbers anything on a (re)connected database, the relay checks that the
database is not older than the one it numbered on (restored from a backup under
it, see ``store.port.DatabaseMark``) and that neither its topic nor its peers hold numbers
its counter does not know. Either sends the region to CATCHING_UP, and nothing is
numbered until ``recover`` has returned the region's own lost events.

While one batch is produced and acknowledged, a helper thread numbers and reads
the next one (1 for the next batch overlaps 2 for this one): the database and the
broker work at the same time. The next batch is published only after this one is
acknowledged and recorded, so the topic stays in sequence order, and a batch read
ahead but never published is simply numbered-and-unpublished: the next relay
publishes it first.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Protocol

from .config import Config
from .errors import LifecycleError
from .lifecycle import State
from .logs import ComponentLogger, component_logger
from .loop import GO_ON, Backoff, Pause, SupervisedLoop
from .metrics import Metrics
from .store.port import DatabaseMark, RelayStore, StoreSessions
from .store.postgres_store import RegionDatabases, peers_seen_through
from .store.reconnecting import close_quietly
from .transport.kafka import KafkaEventLog
from .transport.port import EventLog, Publisher

#: how often the relay looks for compensation events to publish (an indexed, usually empty, query)
COMPENSATION_POLL_SECONDS = 0.5
#: how long the relay's own questions to Kafka (where its topic ends) may wait
KAFKA_CHECK_TIMEOUT_SECONDS = 10.0


class Relay:
    def __init__(
        self, config: Config, region: str, *, holder: str | None = None, metrics: Metrics | None = None,
        databases: StoreSessions | None = None, events: EventLog | None = None,
        peers_seen: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.config = config
        self.region = region
        self.topic = config.events_topic(region)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics
        self.log = component_logger("relay", region)
        self.epoch = 0
        self.databases: StoreSessions = databases or RegionDatabases(config)
        self.events: EventLog = events or KafkaEventLog(config.kafka_settings(region), config.events_topic,
                                                        region=region, timeout=KAFKA_CHECK_TIMEOUT_SECONDS)
        #: the highest sequence of this region each reachable peer applied
        self.peers_seen = peers_seen or (lambda: peers_seen_through(
            {p: config.region(p).dsn for p in config.peers(region)}, region))
        #: holds the lease (an advisory lock) for as long as it is open
        self._lease: RelayStore | None = None
        self._store: RelayStore | None = None
        self._publisher: Publisher | None = None
        self._stale = False
        self._stale_checked_at: float | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._next: Future[list[tuple[int, bytes, bytes]]] | None = None
        #: highest sequence this relay has read (published or in hand): the next claim starts above it
        self._read_through = 0
        #: the database as this relay last saw it, kept across reconnects: a database that
        #: comes back older than this was restored under the relay (see DatabaseMark)
        self._seen: DatabaseMark | None = None
        self._mark_read_at = 0.0
        self._compensations_due = 0.0

    def start(self) -> None:
        self.events.ensure_topics([self.topic, self.config.compensation_topic], self.config.topic_partitions)
        self._lease = self.databases.open(self.region, autocommit=True)
        self.epoch = self._lease.acquire_lease(self.region, self.holder)
        self.log.bind(epoch=self.epoch)
        self._store = self.databases.open(self.region)
        # before anything is numbered on this connection: is this still the database we
        # numbered on, and does nobody hold numbers it does not know? (re-asked on every
        # reconnect, since a restore is a reconnect)
        mark = self._store.database_mark(self.region, self.epoch)
        behind = mark.behind(self._seen) if self._seen is not None else []
        self._stale, self._stale_checked_at = False, None
        if behind:
            self._restored("database restored under the relay: " + "; ".join(behind))
        # remembered only once acted on: a failure above is retried with the same evidence
        self._seen = mark
        # one transactional id per region (its topic): taking it fences any older relay's
        # producer at the broker, so a zombie that lost the lease cannot append any more
        self._publisher = self.events.publisher(f"reconciler-relay.{self.topic}")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"relay-{self.region}-db")
        self._read_through = 0
        self.log.info("relay started", extra={"fields": {"topic": self.topic, "holder": self.holder}})

    def close(self) -> None:
        self._drop_read_ahead()  # never close the connection under the read-ahead
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._publisher is not None:
            self._publisher.close()
        close_quietly(self._store)
        close_quietly(self._lease)
        self._store = self._lease = self._publisher = None

    def step(self) -> int:
        """Relay one batch; returns how many events were published."""
        assert self._store is not None and self._publisher is not None, "start() first"
        started = time.perf_counter()
        ahead, self._next = self._next, None
        batch = (ahead.result() if ahead is not None else None) or self._claim()
        if not batch:
            self._refresh_mark()
            return self._publish_compensations()
        self._read_through = batch[-1][0]
        assert self._pool is not None
        self._next = self._pool.submit(self._claim)  # the next batch, while this one is in flight
        try:
            self._publisher.publish(self.topic, [(key, value) for _sequence, key, value in batch])
        except BaseException:
            self._drop_read_ahead()
            raise
        wait_for([self._next])  # the connection is the read-ahead's until it is done; its error surfaces next step
        lsn = self._store.mark_published(self.region, self.epoch, batch[-1][0])
        if self._seen is not None:
            self._seen = self._seen.advanced(lsn, batch[-1][0], batch[-1][0])
        self._publish_compensations()
        if self.metrics is not None:
            self.metrics.events_relayed.inc(len(batch))
            self.metrics.relay_batch_seconds.observe(time.perf_counter() - started)
        return len(batch)

    def _publish_compensations(self) -> int:
        """Publish the compensation events recorded by invariant checks (see
        docs/compensation-events.md) to the compensation topic, keyed by their id.

        Not through the events topic: its dense per-origin sequences are what peers
        detect gaps with, and these events are for services, not for replication.
        Marked published only once acknowledged, so a crash republishes (same id)
        rather than loses. Called while the connection is free of the read-ahead."""
        assert self._store is not None and self._publisher is not None
        now = time.monotonic()
        if now < self._compensations_due:
            return 0
        self._compensations_due = now + COMPENSATION_POLL_SECONDS
        pending = self._store.pending_compensations(self.config.relay_batch_size)
        if not pending:
            return 0
        self._publisher.publish(self.config.compensation_topic,
                                [(ident.encode(), payload.encode()) for ident, payload in pending])
        self._store.mark_compensations_published([ident for ident, _ in pending])
        self._compensations_due = 0.0  # more may be waiting
        return len(pending)

    def _refresh_mark(self) -> None:
        """While idle, keep the remembered WAL position current (about once a second):
        a restore to a backup taken during a quiet spell must still show as going back."""
        now = time.monotonic()
        if self._seen is None or self._store is None or now - self._mark_read_at < 1.0:
            return
        self._mark_read_at = now
        mark = self._store.database_mark(self.region, self.epoch)
        self._seen = self._seen.advanced(mark.lsn, mark.last_sequence, mark.published_through)

    def _drop_read_ahead(self) -> None:
        """After a failed publish: forget the batch read ahead, so that the next step
        starts again from the last published sequence (this batch first)."""
        if self._next is not None:
            wait_for([self._next])
        self._next = None
        self._read_through = 0

    def _claim(self) -> list[tuple[int, bytes, bytes]]:
        """The next batch of (sequence, key, message), numbering new events when allowed."""
        assert self._store is not None
        return self._store.claim_messages(self.region, self.epoch, self._read_through,
                                 self.config.relay_batch_size, number=self._numbering_allowed())

    def _numbering_allowed(self) -> bool:
        """New events get numbers only while the region is in service (ACTIVE, or merely
        SUSPECT), and never while its own topic holds sequences its outbox does not know:
        that database was restored from a stale backup, and a new event numbered now
        would reuse a sequence peers already applied, so their inbox would drop it.
        ``reconciler recover`` returns the lost events and reserves their numbers.

        Not while VERIFYING either: a recover cut short there (killed after it raised the
        counter, before every pending own event got its original number back) leaves
        rows whose events peers already hold under those numbers; numbered anew, they
        would be applied a second time everywhere. Only the gate, which counts every own
        event missing, lets the region number again."""
        assert self._store is not None
        status = self._store.region_status()
        if status.state not in (State.ACTIVE, State.SUSPECT):
            return False
        now = time.monotonic()
        if self._stale_checked_at is None or (self._stale and now - self._stale_checked_at > 5.0):
            self._stale_checked_at = now
            retained = self.events.retained(self.region)
            peers = self.peers_seen()
            last, _ = self._store.relay_position(self.region)
            evidence = max([retained[1] if retained else 0, *peers.values()])
            stale = evidence > last
            if stale and not self._stale:
                self._restored(f"outbox counter {last} is behind sequences its topic or peers hold "
                               f"(topic {list(retained) if retained else None}, peers {peers})")
            self._stale = stale
        return not self._stale

    def _restored(self, reason: str) -> None:
        """This database lost numbers peers already hold (restored from a backup): number
        nothing until ``recover`` has brought the region's own events back, and send the
        region to catch-up so that it does (the sidecar runs it; an operator may too)."""
        assert self._store is not None
        self.log.error(reason + "; not numbering new events until `reconciler recover` has run",
                       extra={"fields": {"reason": reason}})
        if self.metrics is not None:
            self.metrics.loop_failed("relay")
        status = self._store.region_status()
        if status.state in (State.ACTIVE, State.SUSPECT, State.VERIFYING):
            try:
                self._store.transition(State.CATCHING_UP, reason[:500], actor="relay", expected_epoch=status.epoch)
            except LifecycleError:
                pass  # someone moved the lifecycle meanwhile (fenced, or already catching up)

    def loop(self, stop: threading.Event, *, drain_seconds: float = 0.0, idle_sleep: float = 0.05) -> SupervisedLoop:
        """The relay as the sidecar runs it: :func:`relay_loop`."""
        return relay_loop(self, stop, drain_seconds=drain_seconds, idle_sleep=idle_sleep)

    def run(self, stop: threading.Event, idle_sleep: float = 0.05) -> None:
        """Relay until ``stop`` is set (:func:`relay_loop` on this thread, no drain)."""
        self.loop(stop, idle_sleep=idle_sleep).run()


class RelayLike(Protocol):
    """What :func:`relay_loop` needs of a relay (tests stand in for one)."""

    log: ComponentLogger
    metrics: Metrics | None

    def start(self) -> None: ...

    def step(self) -> int: ...

    def close(self) -> None: ...


def relay_loop(relay: RelayLike, stop: threading.Event, *, drain_seconds: float = 0.0,
               idle_sleep: float = 0.05) -> SupervisedLoop:
    """The relay's supervised loop, the one the sidecar and the drills run.

    Essential: an error no retry cures (an ACL refusal) ends the process; a retryable
    one (broker or database unreachable, a producer fenced by a newer relay) closes
    everything, backs off and starts again, taking the lease anew. After ``stop`` the
    batch in hand is finished; with ``drain_seconds`` the loop then keeps publishing
    until a step finds the outbox empty (a planned stop strands nothing), for at most
    that long."""
    return SupervisedLoop("relay", _RelaySteps(relay, idle_sleep), stop, log=relay.log, metrics=relay.metrics,
                          backoff=Backoff(0.2, 5.0), essential=True, drain_seconds=drain_seconds)


class _RelaySteps:
    """The relay as a :class:`~reconciler.loop.Worker`: idles only when a step
    published nothing (which, during a drain, means the outbox is empty)."""

    def __init__(self, relay: RelayLike, idle_sleep: float) -> None:
        self.relay = relay
        self.idle_sleep = idle_sleep

    def start(self) -> None:
        self.relay.start()

    def step(self) -> Pause:
        return GO_ON if self.relay.step() else Pause(self.idle_sleep)

    def close(self) -> None:
        self.relay.close()
