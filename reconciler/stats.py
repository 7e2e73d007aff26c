"""The sidecar's stats loop: backlog, lag, gaps and queues measured from the databases.

Lag and gaps come from :func:`reconciler.gaps.measure_lag`, the one definition
``status``, ``gaps`` and the gate use too; this loop only gathers its inputs (this
region's inbox, each origin's relay position, what Kafka still holds) and
publishes the result as gauges every few seconds.
"""

from __future__ import annotations

import time
from functools import partial
from operator import methodcaller

from .errors import ReconcilerError
from .gaps import SeqRanges, by_origin, kafka_retained_from, measure_lag, origin_high_water
from .logs import ComponentLogger
from .loop import Pause
from .region_view import LoopContext
from .store.reconnecting import Reconnecting
from .transport.port import EventLog

STATS_INTERVAL_SECONDS = 2.0
LEAF_COMPACTION_SECONDS = 60.0
#: how often the loop asks Kafka where each origin's topic starts (a consumer and two
#: reads per origin): an older answer only undercounts what expired, never invents it
KAFKA_RETENTION_CHECK_SECONDS = 60.0
#: retry after a peer's database refused a connection (its absence must not slow us down)
PEER_DB_RETRY_SECONDS = 10.0


class StatsSteps:
    """A :class:`~reconciler.loop.Worker`: one measurement per step, and now and then
    a compaction of the maintained Merkle leaves."""

    def __init__(self, ctx: LoopContext, log: ComponentLogger, events: EventLog,
                 interval: float = STATS_INTERVAL_SECONDS) -> None:
        self.ctx = ctx
        self.log = log
        self.interval = interval
        self.own = Reconnecting(ctx.dsn, ctx.region, retry_seconds=1.0)
        self.peers = {p: Reconnecting(ctx.config.region(p).dsn, p, retry_seconds=PEER_DB_RETRY_SECONDS, timeout=3)
                      for p in ctx.config.peers(ctx.region)}
        self.measure = Measurement(ctx, log, events)
        self.compacted_at = time.monotonic()

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        self.measure(self.own, self.peers)
        if time.monotonic() - self.compacted_at > LEAF_COMPACTION_SECONDS:
            # the maintained Merkle leaves are an insert-only delta log: fold it so that
            # reading a table's leaves stays a small GROUP BY
            self.compacted_at = time.monotonic()
            self.own.run(lambda store: store.compact_leaves(self.ctx.config.tables))
        return Pause(self.interval)

    def close(self) -> None:
        self.own.close()
        for conn in self.peers.values():
            conn.close()


class Measurement:
    """One pass of measurements, remembering between passes what Kafka said it holds
    and which unreachable origins were already reported."""

    def __init__(self, ctx: LoopContext, log: ComponentLogger, events: EventLog) -> None:
        self.ctx = ctx
        self.log = log
        self.events = events
        self.started_mono = time.monotonic()
        self.warned: set[str] = set()
        #: per origin: (when asked, the lowest sequence its topic could still deliver, or None: unknown)
        self._retained_from: dict[str, tuple[float, int | None]] = {}

    def __call__(self, own: Reconnecting, peers: dict[str, Reconnecting]) -> None:
        ctx, log = self.ctx, self.log
        store = own.store()
        m = ctx.metrics
        backlog = store.outbox_backlog(ctx.region)
        ctx.view.backlog = backlog.events
        m.outbox_backlog_events.set(backlog.events)
        m.outbox_oldest_unrelayed_age_seconds.set(backlog.oldest_age_seconds)
        progress = store.inbox_progress()
        refused = by_origin(store.refused())
        settled = {o: SeqRanges(r) for o, r in store.discarded().items()}
        for origin, peer_db in peers.items():
            mine = progress.get(origin)
            applied = mine.applied if mine else 0
            highest = mine.highest_sequence if mine else 0
            # the origin's own relay knows best how far it got; when it cannot be asked,
            # what we have seen of it is the best lower bound
            position = peer_db.run(methodcaller("relay_position", origin))
            origin_high, published = position if position is not None else (None, None)
            if peer_db.error and origin not in self.warned:
                log.warning("origin database unreachable; lag is measured against the events seen",
                            extra={"fields": {"origin": origin, "error": peer_db.error}})
                self.warned.add(origin)
            elif not peer_db.error:
                self.warned.discard(origin)
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
                oldest = peer_db.run(methodcaller("event_age", origin, first))
                if oldest is None and mine is not None:
                    oldest = mine.last_applied_age_seconds
                lag = measure(oldest_unapplied_age=oldest if oldest is not None
                              else time.monotonic() - self.started_mono)
            m.replication_lag_events.labels(origin=origin, destination=ctx.region).set(lag.events)
            m.replication_lag_seconds.labels(origin=origin, destination=ctx.region).set(lag.seconds)
            m.gaps_events.labels(origin=origin, destination=ctx.region).set(lag.gap)
        queue = store.manual_queue(list(ctx.config.tables))
        for table, depth in queue.depth_by_table.items():
            m.manual_queue_depth.labels(table=table).set(depth)
        m.manual_queue_oldest_age_seconds.set(queue.oldest_age_seconds)
        m.quarantine_events.set(store.quarantined())
        m.set_refused(store.refused_counts(), ctx.config.regions)
        open_violations = store.open_violation_counts()
        for table_name, table_config in ctx.config.tables.items():
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
                cached = (now, kafka_retained_from(self.events.retained(origin), published, origin_high))
            except ReconcilerError:
                cached = (now, None)  # unknown: the tail counts as lag until the next try
            self._retained_from[origin] = cached
        return cached[1]
