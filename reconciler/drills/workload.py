"""The workload: concurrent writers in every region on the checkout demo domain.

Each writer thread belongs to a home region and writes through
:func:`reconciler.outbox.write`, the way a service does: orders (last-writer-wins,
shared keys, so regions overwrite each other), inventory (merge: stock deltas on
shared SKUs and tag set operations) and payments (manual policy: each writer's own
payments, plus optionally a few shared ones that produce real conflicts).

Only writes whose commit returned are recorded in the history: a writer whose
database is down keeps failing and retrying, records nothing, and counts its
failures. A drill can route a region's writers elsewhere (its users failing over
to another region) or pause them. Every writer stops by itself after its write
budget or its time budget, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import outbox
from ..errors import ReconcilerError, StoreError, StoreUnavailable
from ..model import Event
from ..store.demo_domain import DemoDomain
from ..store.inspection import Inspector
from ..store.postgres_store import PostgresRegionStore, open_store
from .history import HistoryWriter, WriteRecord

TAGS = ("new", "sale", "clearance", "gift", "eco", "bulk")

ORDER_STATUSES = ("new", "paid", "packed", "shipped", "cancelled")
PAYMENT_STATUSES = ("captured", "refunded", "settled", "disputed")


#: the most one writer is asked for per second: each waits for its own commit, so
#: more than this from one connection is more than a busy machine gives it
WRITER_CEILING = 40.0


@dataclass(frozen=True)
class WorkloadSpec:
    writers_per_region: int = 2
    #: writes per second per writer (a target, not a promise under load)
    rate: float = 8.0
    #: time budget of every writer, from start()
    seconds: float = 60.0
    #: write budget of every writer
    max_writes: int = 2000
    order_keys: int = 30
    skus: int = 6
    #: payments every region may update (each concurrent update is a manual conflict)
    shared_payments: int = 0
    shared_payment_ratio: float = 0.0
    #: table mix: orders, inventory, payments
    mix: tuple[float, float, float] = (0.5, 0.35, 0.15)
    order_delete_ratio: float = 0.05
    seed: int = 7
    #: seed one order written by two regions with the same HLC stamp (see Workload.seed_tie)
    tie: bool = True

    def at_rate(self, per_region: float) -> WorkloadSpec:
        """This workload aiming at ``per_region`` acknowledged writes per second in each
        region: enough writers that none is asked for more than WRITER_CEILING a second
        (each waits for its own commit), and a write budget that lasts the time budget."""
        writers = max(self.writers_per_region, math.ceil(per_region / WRITER_CEILING))
        rate = per_region / writers
        return dataclasses.replace(self, writers_per_region=writers, rate=rate,
                                   max_writes=max(self.max_writes, math.ceil(rate * self.seconds * 1.2)))


@dataclass
class WriterStats:
    name: str
    home: str
    acknowledged: int = 0
    failed: int = 0
    #: failures by kind: "unreachable", "refused" (the write itself was refused), …
    failures: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "home": self.home, "acknowledged": self.acknowledged, "failed": self.failed,
                "failures": dict(self.failures), "by_target": dict(self.by_target), "last_error": self.last_error}


class Workload:
    def __init__(self, dsns: Mapping[str, str], history: HistoryWriter, spec: WorkloadSpec) -> None:
        self.dsns = dict(dsns)
        self.regions = list(dsns)
        self.history = history
        self.spec = spec
        #: home region -> where its users currently write (None: nowhere, paused)
        self.routing: dict[str, str | None] = {r: r for r in self.regions}
        self.stop_event = threading.Event()
        self.stats: list[WriterStats] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.acked: Counter[str] = Counter()
        self.started_at: float | None = None
        #: the order key two regions wrote with one stamp, once seed_tie managed it
        self.tied: str | None = None

    # ---------------------------------------------------------------- control

    def seed(self) -> None:
        """Rows every region's writers update: inventory SKUs and shared payments,
        inserted in the first region (recorded like any acknowledged write)."""
        first = self.regions[0]
        for i in range(self.spec.skus):
            self.write(first, "inventory", "insert", {"sku": f"sku-{i}"},
                       values={"name": f"item {i}", "stock": 1000, "tags": ["new"], "price_cents": 100 + i})
        for i in range(self.spec.shared_payments):
            self.write(first, "payments", "insert", {"id": f"pay-shared-{i}"},
                       values={"order_id": f"ord-{i}", "amount_cents": 1000 + i, "status": "authorized"})
        if self.spec.tie:
            self.seed_tie()

    def seed_tie(self, attempts: int = 5) -> bool:
        """Two regions insert one order with the very same HLC stamp, so that every drill
        exercises last-writer-wins' tie-break by region id (equal stamps are rare by
        chance). Both clocks are moved to one value a little ahead of physical time
        (forward only, as the clock-skew drill does), then both regions insert the key
        at once, before either can have seen the other's write. Returns whether the
        stamps came out equal (a clock ticking in between spoils an attempt; the
        writes stand all the same, on keys the writers never touch)."""
        if len(self.regions) < 2:
            return False
        pair = self.regions[:2]
        for attempt in range(attempts):
            key = f"ord-tie-{attempt}"
            dbs = {r: Inspector(self.dsns[r], r, timeout=5).connected() for r in pair}
            try:
                ahead = max(db.clock_or_physical() for db in dbs.values())
                target = ahead + (300 << 16)  # 300 ms ahead: well inside any max offset
                for db in dbs.values():
                    db.push_clock(at_least=target)
            finally:
                for db in dbs.values():
                    db.close()
            events = self._insert_together(pair, key)
            if len(events) == len(pair) and len({e.hlc for e in events.values()}) == 1:
                self.tied = key
                return True
            if not events:
                return False  # refused everywhere: trying again would not help
        return False

    def start(self) -> None:
        self.started_at = time.monotonic()
        for region in self.regions:
            for index in range(self.spec.writers_per_region):
                stats = WriterStats(f"{region}/w{index}", region)
                self.stats.append(stats)
                thread = threading.Thread(target=self._run, args=(stats, index), daemon=True,
                                          name=f"writer-{region}-{index}")
                thread.start()
                self._threads.append(thread)

    def route(self, home: str, target: str | None) -> None:
        """Send ``home``'s users to ``target`` (None: they do not write at all)."""
        self.routing[home] = target

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def acknowledged(self) -> Counter[str]:
        """Acknowledged writes so far, per region written to."""
        with self._lock:
            return Counter(self.acked)

    def write(self, region: str, table: str, op: str, key: dict[str, Any], *, hold_seconds: float = 0.0,
              **kwargs: Any) -> Event:
        """One scenario-directed write, recorded once its commit returned; ``hold_seconds``
        keeps its transaction open that long after the write (stamped early, committed late)."""
        attempt = _Attempt()
        with open_store(self.dsns[region], region=region, timeout=5) as store:
            try:
                with store.transaction():
                    event = attempt.write(store, table, op, key, **kwargs)
                    if hold_seconds:
                        time.sleep(hold_seconds)
            except (ReconcilerError, OSError):
                self._record_in_doubt(attempt, "drill")  # only once its event was built: the commit failed
                raise
        self._record(attempt, "drill")
        return event

    def write_together(
        self, region: str, body: Callable[[PostgresRegionStore], list[Event]], writer: str = "drill",
    ) -> list[Event]:
        """Several writes in one transaction (a purchase: the stock and the order), each
        recorded once the commit returned; ``body`` may write nothing."""
        with open_store(self.dsns[region], region=region, timeout=5) as store:
            with store.transaction():
                events = body(store)
        self.record(events, writer)
        return events

    def record(self, events: Iterable[Event], writer: str) -> None:
        """Writes committed by someone else in the drill (a saga), for the checker's history."""
        for event in events:
            self.history.append(WriteRecord.of_event(event, time.time(), writer))
            with self._lock:
                self.acked[event.origin] += 1

    def _insert_together(self, regions: list[str], key: str) -> dict[str, Event]:
        """Each region inserts ``key`` at the same moment (connections opened first)."""
        events: dict[str, Event] = {}
        stores = {r: open_store(self.dsns[r], region=r, timeout=5) for r in regions}
        barrier = threading.Barrier(len(regions))

        def insert(region: str) -> None:
            attempt = _Attempt()
            barrier.wait(10)
            try:
                with stores[region].transaction():
                    attempt.write(stores[region], "orders", "insert", {"id": key}, values={
                        "customer": f"cust-{region}", "status": "new", "total_cents": 100, "note": f"tie@{region}"})
            except (ReconcilerError, OSError):
                # built but not committed: in doubt; refused before (no orders table in this
                # drill, say): nothing to record, no tie
                self._record_in_doubt(attempt, "drill")
                return
            self._record(attempt, "drill")
            assert attempt.event is not None
            events[region] = attempt.event

        threads = [threading.Thread(target=insert, args=(r,), name=f"tie-{r}") for r in regions]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            for store in stores.values():
                store.close()
        return events

    def _record(self, attempt: _Attempt, writer: str) -> None:
        assert attempt.event is not None
        self.history.append(WriteRecord.of_event(attempt.event, time.time(), writer, key=attempt.key,
                                                 requested=attempt.values))
        with self._lock:
            self.acked[attempt.event.origin] += 1

    def _record_in_doubt(self, attempt: _Attempt, writer: str) -> None:
        """The write was built but its COMMIT failed: it may have committed. The
        checker counts it only if some region holds its event."""
        if attempt.event is not None:
            self.history.append(WriteRecord.of_event(attempt.event, time.time(), writer, key=attempt.key,
                                                     requested=attempt.values, acknowledged=False))

    # ---------------------------------------------------------------- one writer

    def _run(self, stats: WriterStats, index: int) -> None:
        rnd = random.Random(f"{self.spec.seed}:{stats.name}")
        deadline = time.monotonic() + self.spec.seconds
        interval = 1.0 / self.spec.rate if self.spec.rate > 0 else 0.0
        conn: PostgresRegionStore | None = None
        connected_to: str | None = None
        own_payments: list[str] = []
        backoff = 0.1
        next_at = time.monotonic()
        n = 0
        try:
            while not self.stop_event.is_set() and stats.acknowledged < self.spec.max_writes \
                    and time.monotonic() < deadline:
                target = self.routing.get(stats.home)
                if target is None:
                    self.stop_event.wait(0.1)
                    continue
                if conn is not None and (connected_to != target or conn.closed):
                    _close(conn)
                    conn = None
                attempt = _Attempt()
                try:
                    if conn is None:
                        conn = open_store(self.dsns[target], region=target, timeout=2)
                        connected_to = target
                    self._one_write(conn, attempt, stats, rnd, n, own_payments)
                except (ReconcilerError, OSError) as exc:
                    # unacknowledged: recorded only as in doubt; a dead connection is reopened
                    self._record_in_doubt(attempt, stats.name)
                    stats.failed += 1
                    kind = _failure_kind(exc)
                    stats.failures[kind] += 1
                    stats.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                    if kind == "unreachable":
                        _close(conn)
                        conn = None
                        self.stop_event.wait(backoff)
                        backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.1
                n += 1
                stats.acknowledged += 1
                stats.by_target[target] += 1
                self._record(attempt, stats.name)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # fell behind (a slow server): do not burst to catch up
        finally:
            _close(conn)

    def _one_write(
        self, conn: PostgresRegionStore, attempt: _Attempt, stats: WriterStats, rnd: random.Random, n: int,
        own_payments: list[str],
    ) -> Event:
        spec = self.spec
        pick = rnd.random()
        with conn.transaction():
            if pick < spec.mix[0]:
                key = f"ord-{rnd.randrange(spec.order_keys)}"
                # the client looks at its own table, as a service would, not at replication metadata
                live = DemoDomain(conn).order_exists(key)
                values = {"status": rnd.choice(ORDER_STATUSES), "total_cents": rnd.randint(100, 50_000),
                          "note": f"{stats.name}#{n}"}
                if not live:
                    return attempt.write(conn, "orders", "insert", {"id": key},
                                        values={"customer": f"cust-{stats.home}", **values})
                if rnd.random() < spec.order_delete_ratio:
                    return attempt.write(conn, "orders", "delete", {"id": key})
                return attempt.write(conn, "orders", "update", {"id": key}, values=values)
            if pick < spec.mix[0] + spec.mix[1] and spec.skus:
                sku = f"sku-{rnd.randrange(spec.skus)}"
                kwargs: dict[str, Any] = {"deltas": {"stock": rnd.choice((-3, -2, -1, 1, 2, 5))}}
                roll = rnd.random()
                if roll < 0.3:
                    kwargs["set_add"] = {"tags": [rnd.choice(TAGS)]}
                elif roll < 0.45:
                    kwargs["set_remove"] = {"tags": [rnd.choice(TAGS)]}
                return attempt.write(conn, "inventory", "update", {"sku": sku}, values={}, **kwargs)
            if spec.shared_payments and rnd.random() < spec.shared_payment_ratio:
                key = f"pay-shared-{rnd.randrange(spec.shared_payments)}"
                values = {"status": rnd.choice(PAYMENT_STATUSES), "amount_cents": rnd.randint(1, 9999)}
                return attempt.write(conn, "payments", "update", {"id": key}, values=values)
            if own_payments and rnd.random() < 0.4:
                key = rnd.choice(own_payments)
                return attempt.write(conn, "payments", "update", {"id": key},
                                    values={"status": rnd.choice(PAYMENT_STATUSES)})
            key = f"pay-{stats.name.replace('/', '-')}-{n}"
            event = attempt.write(conn, "payments", "insert", {"id": key},
                                 values={"order_id": f"ord-{rnd.randrange(max(1, spec.order_keys))}",
                                         "amount_cents": rnd.randint(100, 50_000), "status": "authorized"})
        own_payments.append(key)  # only once committed: an uncommitted insert is no payment
        return event


class _Attempt:
    """One write as its client made it: what it asked for, and the event it got back
    (before the commit, so that a commit whose outcome is unknown is still known)."""

    def __init__(self) -> None:
        self.event: Event | None = None
        self.key: dict[str, Any] = {}
        self.values: dict[str, Any] | None = None

    def write(self, conn: PostgresRegionStore, table: str, op: str, key: dict[str, Any],
              **kwargs: Any) -> Event:
        self.key = dict(key)
        self.values = dict(kwargs.get("values") or {})
        self.event = outbox.write(conn, table, op, key, **kwargs)
        return self.event


#: steps of the client's own statements (its read, its commit), outside outbox.write:
#: a refusal there is the database's, not the write path's
_CLIENT_STEPS = ("transaction", "read order")


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return "unreachable"
    if isinstance(exc, ReconcilerError):
        if exc.retryable or isinstance(exc, StoreUnavailable):
            return "unreachable"
        if isinstance(exc, StoreError) and exc.context.get("step") in _CLIENT_STEPS:
            return "database_error"
        return "refused"
    return "other"


def _close(conn: PostgresRegionStore | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection must not stop the writer
            pass
