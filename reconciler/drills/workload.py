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

With ``WorkloadSpec.processes`` the writers of each home region run in a child
process of their own (``python -m reconciler.drills.workload``), which streams every
acknowledgement, in-doubt attempt and failure back on its stdout; the drill records
them exactly as it records its own threads' writes. A drill process that also runs
the fault schedule, the sampler and the proxies would otherwise share one
interpreter lock with every writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import outbox
from ..errors import EventError, ReconcilerError, StoreError, StoreUnavailable
from ..hlc import Timestamp
from ..model import Event, Operation, encode_key
from ..store.demo_domain import DemoDomain
from ..store.inspection import Inspector
from ..store.postgres_store import PostgresRegionStore, open_store
from .history import HistoryWriter, WriteRecord, record_line

TAGS = ("new", "sale", "clearance", "gift", "eco", "bulk")

ORDER_STATUSES = ("new", "paid", "packed", "shipped", "cancelled")
PAYMENT_STATUSES = ("captured", "refunded", "settled", "disputed")


#: cores from which writers in processes pay off. Below, the machine itself is the limit:
#: on 2 cores the drill's one interpreter held its lock about a fifth of the time at
#: 200 writes/s asked per region, while three writer processes cost more CPU per
#: write (1.9-2.3 ms of client CPU against 1.6-1.8 ms in threads) and got fewer writes
#: through. With more cores, one interpreter's ~1.7 ms per write caps it near 590 writes/s.
PROCESS_CORES = 4

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
    #: share of writes made in plain SQL, as a service in another language makes them
    #: (the database's capture stamps them and writes their outbox rows): inserts,
    #: updates and deletes of orders and payments, and inventory's counter updates
    plain_sql: float = 0.0
    #: run each home region's writers in a child process of their own (see the module's
    #: docstring); None: only on a machine with at least PROCESS_CORES cores
    processes: bool | None = False

    @property
    def in_processes(self) -> bool:
        if self.processes is None:
            return (os.cpu_count() or 1) >= PROCESS_CORES
        return self.processes

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


class _Sink(Protocol):
    """Where a writer's outcomes go: the history itself (a writer thread of the drill),
    or the pipe to the drill (a writer in a child process)."""

    def acknowledged_by(self, stats: WriterStats, attempt: _Attempt, target: str) -> None: ...

    def in_doubt(self, stats: WriterStats, attempt: _Attempt) -> None: ...

    def failed(self, stats: WriterStats, kind: str) -> None: ...


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
        #: monotonic time the last writer stopped (None while any still runs)
        self.ended_at: float | None = None
        #: the order key two regions wrote with one stamp, once seed_tie managed it
        self.tied: str | None = None
        self._children: dict[str, _Child] = {}
        self._alive = 0

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
        if self.spec.in_processes:
            self._start_children()
            return
        deadline = self.started_at + self.spec.seconds
        for region in self.regions:
            for index in range(self.spec.writers_per_region):
                stats = WriterStats(f"{region}/w{index}", region)
                self.stats.append(stats)
                writer = _Writer(self.spec, self.routing, self.stop_event, stats, deadline, self, self.dsns)
                thread = threading.Thread(target=self._thread_main, args=(writer,), daemon=True,
                                          name=f"writer-{region}-{index}")
                self._alive += 1
                thread.start()
                self._threads.append(thread)

    def route(self, home: str, target: str | None) -> None:
        """Send ``home``'s users to ``target`` (None: they do not write at all). With
        writers in child processes, returns once none of them is still in a write to
        its former target and every write they finished is recorded."""
        self.routing[home] = target
        child = self._children.get(home)
        if child is not None:
            child.route(target)

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        for child in self._children.values():
            child.stop(timeout)
        for thread in self._threads:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads) or any(c.alive for c in self._children.values())

    def rates(self) -> dict[str, Any]:
        """What the writers achieved: acknowledged writes per second in each region
        written to, over the time they ran (from start() until the last one stopped,
        or until now), beside what they were asked for."""
        started = self.started_at
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        window = max(0.0, end - started) if started is not None else 0.0
        per_region = {r: sum(s.by_target.get(r, 0) for s in self.stats) for r in self.regions}
        return {
            "target_per_region": round(self.spec.writers_per_region * self.spec.rate, 2),
            "window_seconds": round(window, 2),
            "acknowledged": per_region,
            "per_second": {r: round(n / window, 2) if window else 0.0 for r, n in per_region.items()},
            "writer_processes": self.spec.in_processes,
        }

    def acknowledged(self) -> Counter[str]:
        """Acknowledged writes so far, per region written to (a writer process's as of
        its last report, at most a quarter of a second old)."""
        with self._lock:
            total = Counter(self.acked)
        for child in list(self._children.values()):
            total.update(child.acknowledged())
        return total

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

    # ---------------------------------------------------------------- writer threads (a _Sink)

    def acknowledged_by(self, stats: WriterStats, attempt: _Attempt, target: str) -> None:
        self._record(attempt, stats.name)

    def in_doubt(self, stats: WriterStats, attempt: _Attempt) -> None:
        self._record_in_doubt(attempt, stats.name)

    def failed(self, stats: WriterStats, kind: str) -> None:
        pass  # the writer's own stats are the drill's

    def _thread_main(self, writer: _Writer) -> None:
        try:
            writer.run()
        finally:
            with self._lock:
                self._alive -= 1
                if self._alive == 0:
                    self.ended_at = time.monotonic()

    # ---------------------------------------------------------------- writer processes

    def _start_children(self) -> None:
        deadline_wall = time.time() + self.spec.seconds
        for region in self.regions:
            names = [f"{region}/w{i}" for i in range(self.spec.writers_per_region)]
            stats = {n: WriterStats(n, region) for n in names}
            self.stats.extend(stats.values())
            self._alive += 1
            self._children[region] = _Child(self, region, stats, deadline_wall)
        for child in self._children.values():
            child.wait_ready(60.0)

    def _child_ended(self, child: _Child) -> None:
        with self._lock:
            self._alive -= 1
            if self._alive == 0:
                self.ended_at = time.monotonic()

class _Writer:
    """One client of the checkout service: paced writes to wherever its home region's
    users are routed, each outcome handed to ``sink``. ``busy`` is held from the
    choice of a target until the outcome was handed over, so that whoever takes it
    knows no write of this writer is in flight."""

    def __init__(self, spec: WorkloadSpec, routing: Mapping[str, str | None], stop_event: threading.Event,
                 stats: WriterStats, deadline: float, sink: _Sink, dsns: Mapping[str, str]) -> None:
        self.spec = spec
        self.routing = routing
        self.stop_event = stop_event
        self.stats = stats
        self.deadline = deadline
        self.sink = sink
        self.dsns = dict(dsns)
        self.busy = threading.Lock()

    def run(self) -> None:
        stats = self.stats
        rnd = random.Random(f"{self.spec.seed}:{stats.name}")
        interval = 1.0 / self.spec.rate if self.spec.rate > 0 else 0.0
        conn: PostgresRegionStore | None = None
        connected_to: str | None = None
        own_payments: list[str] = []
        backoff = 0.1
        next_at = time.monotonic()
        n = 0
        try:
            while not self.stop_event.is_set() and stats.acknowledged < self.spec.max_writes \
                    and time.monotonic() < self.deadline:
                failure: str | None = None
                with self.busy:
                    target = self.routing.get(stats.home)
                    if target is not None:
                        if conn is not None and (connected_to != target or conn.closed):
                            _close(conn)
                            conn = None
                        attempt = _Attempt()
                        try:
                            if conn is None:
                                conn = open_store(self.dsns[target], region=target, timeout=2)
                                connected_to = target
                            self._one_write(conn, attempt, rnd, n, own_payments)
                        except (ReconcilerError, OSError) as exc:
                            # unacknowledged: recorded only as in doubt; a dead connection is reopened
                            self.sink.in_doubt(stats, attempt)
                            stats.failed += 1
                            kind = _failure_kind(exc)
                            stats.failures[kind] += 1
                            stats.last_error = \
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                            self.sink.failed(stats, kind)
                            failure = kind
                        else:
                            n += 1
                            stats.acknowledged += 1
                            stats.by_target[target] += 1
                            self.sink.acknowledged_by(stats, attempt, target)
                if target is None:
                    self.stop_event.wait(0.1)
                    continue
                if failure is not None:
                    if failure == "unreachable":
                        _close(conn)
                        conn = None
                        self.stop_event.wait(backoff)
                        backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # fell behind (a slow server): do not burst to catch up
        finally:
            _close(conn)

    def _one_write(
        self, conn: PostgresRegionStore, attempt: _Attempt, rnd: random.Random, n: int, own_payments: list[str],
    ) -> Event:
        spec, stats = self.spec, self.stats
        pick = rnd.random()
        with conn.transaction():
            if pick < spec.mix[0]:
                key = f"ord-{rnd.randrange(spec.order_keys)}"
                # the client looks at its own table, as a service would, not at replication metadata
                live = DemoDomain(conn).order_exists(key)
                values = {"status": rnd.choice(ORDER_STATUSES), "total_cents": rnd.randint(100, 50_000),
                          "note": f"{stats.name}#{n}"}
                if not live:
                    return self._put(conn, attempt, rnd, "orders", "insert", "id", key,
                                     {"customer": f"cust-{stats.home}", **values})
                if rnd.random() < spec.order_delete_ratio:
                    return self._put(conn, attempt, rnd, "orders", "delete", "id", key, {})
                return self._put(conn, attempt, rnd, "orders", "update", "id", key, values)
            if pick < spec.mix[0] + spec.mix[1] and spec.skus:
                sku = f"sku-{rnd.randrange(spec.skus)}"
                deltas = {"stock": rnd.choice((-3, -2, -1, 1, 2, 5))}
                sets: dict[str, Any] = {}
                roll = rnd.random()
                if roll < 0.3:
                    sets["set_add"] = {"tags": [rnd.choice(TAGS)]}
                elif roll < 0.45:
                    sets["set_remove"] = {"tags": [rnd.choice(TAGS)]}
                return self._put(conn, attempt, rnd, "inventory", "update", "sku", sku, {}, deltas, sets)
            if spec.shared_payments and rnd.random() < spec.shared_payment_ratio:
                key = f"pay-shared-{rnd.randrange(spec.shared_payments)}"
                values = {"status": rnd.choice(PAYMENT_STATUSES), "amount_cents": rnd.randint(1, 9999)}
                return self._put(conn, attempt, rnd, "payments", "update", "id", key, values)
            if own_payments and rnd.random() < 0.4:
                key = rnd.choice(own_payments)
                return self._put(conn, attempt, rnd, "payments", "update", "id", key,
                                 {"status": rnd.choice(PAYMENT_STATUSES)})
            key = f"pay-{stats.name.replace('/', '-')}-{n}"
            event = self._put(conn, attempt, rnd, "payments", "insert", "id", key,
                              {"order_id": f"ord-{rnd.randrange(max(1, spec.order_keys))}",
                               "amount_cents": rnd.randint(100, 50_000), "status": "authorized"})
        own_payments.append(key)  # only once committed: an uncommitted insert is no payment
        return event

    def _put(
        self, conn: PostgresRegionStore, attempt: _Attempt, rnd: random.Random, table: str, op: str,
        key_column: str, key: Any, values: dict[str, Any], deltas: dict[str, int] | None = None,
        sets: dict[str, Any] | None = None,
    ) -> Event:
        """One write, through ``outbox.write`` or, for a share of them, in plain SQL.

        Set changes always go through ``outbox.write``: capture records the difference
        a statement made to the column, so adding an element already there would
        record nothing, while the client asked for an add."""
        share = self.spec.plain_sql
        # drawn only when asked for, so that every other workload draws what it always drew
        if share and not sets and rnd.random() < share:
            return attempt.write_sql(conn, table, op, key_column, key, values, deltas or {})
        kwargs: dict[str, Any] = {} if op == "delete" else {"values": values}
        if deltas:
            kwargs["deltas"] = deltas
        kwargs.update(sets or {})
        return attempt.write(conn, table, op, {key_column: key}, **kwargs)




#: (table, operation, key column, value columns, counter columns) -> the statement's text
_STATEMENTS: dict[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], str] = {}


def _plain_statement(table: str, op: str, key_column: str, columns: tuple[str, ...],
                     counters: tuple[str, ...] = ()) -> str:
    """INSERT (key, columns); UPDATE columns (set) and counters (incremented) by key; or
    DELETE by key: composed once."""
    found = _STATEMENTS.get((table, op, key_column, columns, counters))
    if found is None:
        name, key = f"public.{_ident(table)}", _ident(key_column)
        if op == "insert":
            names = [key, *map(_ident, columns)]
            found = f"INSERT INTO {name} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"
        elif op == "update":
            assignments = [f"{_ident(c)} = %s" for c in columns] + [f"{_ident(c)} = {_ident(c)} + %s" for c in counters]
            found = f"UPDATE {name} SET {', '.join(assignments)} WHERE {key} = %s"
        else:
            found = f"DELETE FROM {name} WHERE {key} = %s"
        _STATEMENTS[(table, op, key_column, columns, counters)] = found
    return found


def _ident(name: str) -> str:
    """A quoted SQL identifier (the drills reach PostgreSQL only through the store's
    sessions, never by importing the driver)."""
    return '"' + name.replace('"', '""') + '"'


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

    def write_sql(self, conn: PostgresRegionStore, table: str, op: str, key_column: str, key: Any,
                  values: Mapping[str, Any], deltas: Mapping[str, int]) -> Event:
        """The same write as one plain statement on the business table, in the caller's
        transaction; the event is the outbox row the database's capture wrote for it,
        read back before the commit (so that a commit whose outcome is unknown is still
        known, as for :meth:`write`)."""
        self.key = {key_column: key}
        self.values = dict(values)
        statement = _plain_statement(table, op, key_column, tuple(values), tuple(deltas))
        params = [*values.values(), *deltas.values(), key] if op == "update" else [key, *values.values()]
        key_text = encode_key(self.key, (key_column,))
        with conn.translating(f"{op} {table} in plain SQL"):
            written = conn.connection.execute(statement, params).rowcount
            if written != 1:
                # the row came or went since the client looked (a peer's write applied)
                raise EventError(f"{op} in plain SQL changed {written} rows", table=table, key=key_text)
            row = conn.connection.execute(
                "SELECT id::text, origin, aggregateid, operation, hlc, prior_hlc, payload, type"
                " FROM reconciler.outbox WHERE aggregatetype = %s AND aggregateid = %s"
                " AND xmin = pg_current_xact_id()::xid ORDER BY position DESC LIMIT 1", (table, key_text),
            ).fetchone()
        if row is None:
            # no capture on the table: the statement wrote a row no peer would ever learn of
            raise EventError("a plain SQL write was not captured (no outbox row)", table=table, key=key_text)
        ident, origin, aggregate, operation, stamp, prior, payload, kind = row
        self.event = Event(origin=origin, event_id=ident, table=table, key=aggregate, operation=Operation(operation),
                           hlc=Timestamp.unpack(int(stamp)), payload=payload,
                           prior=None if prior is None else Timestamp.unpack(int(prior)), event_type=kind)
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


# ---------------------------------------------------------------- writer processes


class _Child:
    """The drill's end of one home region's writer process.

    The process appends its writers' records to the history file itself (a whole
    line per write, as the drill's own writer threads do) and tells the drill only
    its writers' counts: a few times a second, when a routing change has taken
    effect, and when it ends. Nothing per write crosses the pipe, so the drill
    spends nothing per write either."""

    def __init__(self, workload: Workload, home: str, stats: dict[str, WriterStats], deadline_wall: float) -> None:
        self.workload = workload
        self.home = home
        self.stats = stats
        self._replies: dict[str, threading.Event] = {}
        self._ready = threading.Event()
        self._ended = threading.Event()
        self._write_lock = threading.Lock()
        self._asked = 0
        spec = {**dataclasses.asdict(workload.spec), "processes": False}
        setup = {"home": home, "dsns": workload.dsns, "spec": spec, "writers": list(stats),
                 "routing": workload.routing.get(home), "deadline_wall": deadline_wall,
                 "history": str(workload.history.path)}
        # the child's stdout carries its counts only; its stderr is the drill's, for a traceback
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler.drills.workload"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, encoding="utf-8", bufsize=1,
        )
        self._send(setup)
        self._reader = threading.Thread(target=self._read, name=f"writers-{home}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def acknowledged(self) -> Counter[str]:
        """Acknowledged writes of this process's writers, per region written to."""
        total: Counter[str] = Counter()
        for stats in list(self.stats.values()):
            total.update(stats.by_target)
        return total

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the writer process of {self.home} did not start within {timeout:.0f}s")

    def route(self, target: str | None, timeout: float = 30.0) -> bool:
        self._asked += 1
        ident = f"{self.home}:{self._asked}"
        done = self._replies[ident] = threading.Event()
        if self._ended.is_set():
            return True  # its writers are done: nothing in flight to wait for
        self._send({"route": target, "id": ident})
        return done.wait(timeout)

    def stop(self, timeout: float) -> None:
        self._send({"stop": True})
        with self._write_lock, contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # a writer stuck past its budget: what it acknowledged so far is in the history
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(timeout)

    def _send(self, doc: dict[str, Any]) -> None:
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(doc) + "\n")
            self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    print(f"writers {self.home}: {line.rstrip()}", file=sys.stderr)
                    continue
                for name, counts in (doc.get("stats") or {}).items():
                    if name in self.stats:
                        _take_counts(self.stats[name], counts)
                if "ready" in doc:
                    self._ready.set()
                if "routed" in doc:
                    done = self._replies.pop(str(doc["routed"]), None)
                    if done is not None:
                        done.set()
        finally:
            self._ended.set()
            self.workload._child_ended(self)
            for done in list(self._replies.values()):
                done.set()


def _take_counts(stats: WriterStats, doc: Mapping[str, Any]) -> None:
    """A writer process's report on one writer; each field replaced whole, so that a
    reader on another thread never sees a counter change under it."""
    stats.acknowledged = int(doc["acknowledged"])
    stats.failed = int(doc["failed"])
    stats.failures = Counter(doc["failures"])
    stats.by_target = Counter(doc["by_target"])
    stats.last_error = str(doc["last_error"])


class _HistoryFile:
    """A writer process's sink: each record one line appended to the drill's history
    file with a single write (O_APPEND: never interleaved with anyone's)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def _append(self, record: WriteRecord) -> None:
        os.write(self.fd, (record_line(record) + "\n").encode("utf-8"))

    def acknowledged_by(self, stats: WriterStats, attempt: _Attempt, target: str) -> None:
        assert attempt.event is not None
        self._append(WriteRecord.of_event(attempt.event, time.time(), stats.name, key=attempt.key,
                                          requested=attempt.values))

    def in_doubt(self, stats: WriterStats, attempt: _Attempt) -> None:
        if attempt.event is not None:
            self._append(WriteRecord.of_event(attempt.event, time.time(), stats.name, key=attempt.key,
                                              requested=attempt.values, acknowledged=False))

    def failed(self, stats: WriterStats, kind: str) -> None:
        pass  # counted in the writer's stats, which the drill receives


#: how often a writer process tells the drill its writers' counts, seconds
COUNTS_INTERVAL = 0.25


def _child_main() -> None:
    """A writer process: the setup line, then routing changes and the stop on stdin;
    its writers' counts on stdout. The drill going away (stdin closed) stops the writers."""
    pipe = sys.stdout
    sys.stdout = sys.stderr  # nothing but counts on the pipe, whatever prints
    pipe_lock = threading.Lock()
    setup = json.loads(sys.stdin.readline())
    raw = dict(setup["spec"])
    raw["mix"] = tuple(raw["mix"])
    spec = WorkloadSpec(**raw)
    home = str(setup["home"])
    routing: dict[str, str | None] = {home: setup["routing"]}
    stop_event = threading.Event()
    deadline = time.monotonic() + (float(setup["deadline_wall"]) - time.time())
    sink = _HistoryFile(str(setup["history"]))
    writers = [_Writer(spec, routing, stop_event, WriterStats(name, home), deadline, sink, setup["dsns"])
               for name in setup["writers"]]

    def send(**doc: Any) -> None:
        counts = {w.stats.name: {k: v for k, v in w.stats.to_dict().items() if k not in ("name", "home")}
                  for w in writers}
        with pipe_lock:
            pipe.write(json.dumps({**doc, "stats": counts}) + "\n")
            pipe.flush()

    threads = [threading.Thread(target=w.run, name=f"writer-{w.stats.name}", daemon=True) for w in writers]
    for thread in threads:
        thread.start()
    send(ready=True)

    def control() -> None:
        for line in sys.stdin:
            doc = json.loads(line)
            if "route" in doc:
                routing[home] = doc["route"]
                for writer in writers:  # a write already under way finishes (and is recorded) first
                    with writer.busy:
                        pass
                send(routed=doc["id"])
            elif doc.get("stop"):
                break
        stop_event.set()

    threading.Thread(target=control, name="control", daemon=True).start()
    while any(t.is_alive() for t in threads):
        time.sleep(COUNTS_INTERVAL)
        send()


if __name__ == "__main__":
    _child_main()
