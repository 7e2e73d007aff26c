"""Usage: .venv/bin/python benchmarks/bench_pipeline.py [--events 50000 | --quick] [--repeat 3]
                                                    [--dev-dir .dev] [--out benchmarks/results/pipeline.json]
                                                    [--relay-batch N] [--apply-batch N]
                                                    [--no-e2e] [--check] [--keep]

`make bench` runs it with no arguments while the local stack is up (``reconciler dev
up``); the stack is found through ``--dev-dir`` (default: env RECONCILER_DEV_DIR, else
``.dev``, the Makefile's DEV_DIR). Alone: ``reconciler dev up`` then this script.

The replication pipeline against the raw client ceilings, on the same broker and the
same database server, in one run:

- relay: a region's outbox is pre-filled with N ``orders`` events (bulk COPY, ~200-byte
  payloads, half inserts and half updates of those rows), then ``Relay.step()`` runs
  until every event is published (sequence numbering, read, encode, produce, wait for
  every acknowledgement, mark published: all timed). Ceiling: the raw confluent-kafka
  Producer built with the relay's own settings (enable.idempotence=true, acks=all,
  same linger/batch) producing the same N encoded messages (same keys, same sizes) to
  a fresh topic, one flush at the end. Floor: ``pg.claim_messages`` alone numbering and
  reading the N events, nothing produced (the database side the relay cannot avoid).
- apply: the same N events, decoded by ``reconciler.wire.decode`` beforehand, applied
  with ``Applier.apply_remote`` in batches of the configured size (``--apply-batch``), one
  transaction each, into a fresh region database. Ceiling: the same rows written with
  raw batched ``INSERT INTO orders ... ON CONFLICT (id) DO UPDATE`` in batches of the
  same size, one transaction each, into another fresh database on the same server.
  Several raw ways are timed (psycopg 3 executemany, which pipelines; one INSERT from
  binary arrays through unnest; one INSERT from a jsonb recordset; COPY into a temp
  table then one INSERT ... SELECT); the fastest is the ceiling. Floor: apply's own row
  writes alone (inbox, business row, row_meta), the states computed beforehand.
- end-to-end (bonus): outbox -> Kafka -> the other region's rows: the relay in its own
  process (as in a sidecar of the origin), the destination's ``InboxConsumer`` in this
  one, timed from "go" until the last event is applied and its offset committed.

Each measurement is repeated ``--repeat`` times (order of ours/ceiling alternated) and
the median is reported. Target: ours / ceiling >= 0.5 for relay and apply. The JSON
has the machine, the versions, every measurement, the medians, the ratios and
pass/fail. Exit status 0, or 1 with ``--check`` when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import psycopg
import yaml

from reconciler import wire
from reconciler.apply import Applier
from reconciler.config import DEFAULT_APPLY_BATCH, DEFAULT_RELAY_BATCH, Config, load_config
from reconciler.devstack import DevStack
from reconciler.errors import TransportError
from reconciler.hlc import Timestamp
from reconciler.inbox import InboxConsumer
from reconciler.model import Event, Operation, RowState
from reconciler.provision import migrate
from reconciler.relay import Relay
from reconciler.store import postgres as pg
from reconciler.transport import kafka

TARGET = 0.5
ORDER_COLUMNS = ("id", "customer", "status", "total_cents", "note")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- events ----------------------------------------------------------------------------


def make_events(n: int, origin: str, seed: int = 7) -> list[Event]:
    """N ``orders`` events as the relay would publish them (sequence 1..N): the first
    half insert distinct rows, the second half update them (causally: ``prior`` is the
    insert's stamp), so no batch of <= N/2 touches a key twice and the ceiling's
    ON CONFLICT DO UPDATE path is exercised as much as the insert path."""
    rnd = random.Random(seed)
    base = Timestamp(time.time_ns() // 1_000_000 - 60_000, 0).pack()  # a minute ago: never "ahead"
    half = (n + 1) // 2
    events: list[Event] = []
    for i in range(n):
        row = i if i < half else i - half
        key = f"o{row:08d}"
        values = {
            "id": key,
            "customer": f"customer-{rnd.randrange(100_000):05d}",
            "status": rnd.choice(("new", "paid", "shipped", "delivered")),
            "total_cents": rnd.randint(100, 1_000_000),
            "note": "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz ", k=rnd.randint(70, 90))),
        }
        events.append(Event(
            origin=origin,
            event_id=str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
            table="orders",
            key=key,
            operation=Operation.INSERT if i < half else Operation.UPDATE,
            hlc=Timestamp.unpack(base + i),
            payload={"key": {"id": key}, "values": values},
            prior=None if i < half else Timestamp.unpack(base + row),
            sequence=i + 1,
            event_type="orders.insert" if i < half else "orders.update",
        ))
    return events


def prefill_outbox(dsn: str, events: Sequence[Event]) -> float:
    """Committed, unnumbered outbox rows, as services would have left them."""
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc,"
            " operation) FROM STDIN"
        ) as copy:
            for e in events:
                copy.write_row((
                    e.event_id, e.table, e.key, e.event_type, json.dumps(e.payload, separators=(",", ":")),
                    e.origin, e.hlc.pack(), e.prior.pack() if e.prior else None, e.operation.value,
                ))
        conn.execute("ANALYZE reconciler.outbox")
    return time.perf_counter() - started


# --- environments ------------------------------------------------------------------------


class Envs:
    """Fresh databases (one per region per environment) and topic prefixes, dropped at the end."""

    def __init__(self, stack: DevStack, regions: tuple[str, str], workdir: Path, keep: bool) -> None:
        self.stack = stack
        self.regions = regions
        self.workdir = workdir
        self.keep = keep
        self.databases: list[tuple[str, str]] = []  # (server dsn, database)
        self.prefixes: list[str] = []

    def make(self, relay_batch: int, apply_batch: int) -> Config:
        tag = "bench" + uuid.uuid4().hex[:10]
        docs = {}
        for i, region in enumerate(self.regions):
            base = self.stack.dsn(region)
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{tag}"')
            self.databases.append((base, tag))
            docs[region] = {"dsn": base.rsplit("/", 1)[0] + "/" + tag, "metrics_address": f"127.0.0.1:{19600 + i}"}
        doc = {
            "topic_prefix": tag,
            "hlc": {"max_offset_ms": 1000},
            "kafka": {"bootstrap.servers": self.stack.bootstrap_servers},
            "regions": docs,
            "tables": {
                "orders": {"key": ["id"], "policy": "lww"},
                "inventory": {"key": ["sku"], "policy": "merge", "fields": {"stock": "counter", "tags": "set"}},
                "payments": {"key": ["id"], "policy": "manual"},
            },
            "batch": {"relay": relay_batch, "apply": apply_batch},
        }
        path = self.workdir / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(doc))
        config = load_config(path)
        migrate(config, demo_tables=True)
        self.prefixes.append(tag)
        return config

    def plain(self, region: str) -> str:
        """A fresh database on ``region``'s server with just the demo tables; returns its DSN."""
        tag = "bench" + uuid.uuid4().hex[:10]
        base = self.stack.dsn(region)
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{tag}"')
        self.databases.append((base, tag))
        dsn = base.rsplit("/", 1)[0] + "/" + tag
        with psycopg.connect(dsn) as conn:
            pg.create_demo_tables(conn)
        return dsn

    def cleanup(self) -> None:
        if self.keep:
            return
        for base, name in self.databases:
            try:
                with psycopg.connect(base, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.Error as exc:
                log(f"  (could not drop database {name}: {exc})")
        try:
            client = kafka.admin({"bootstrap.servers": self.stack.bootstrap_servers})
            topics = [t for t in client.list_topics(timeout=10).topics if t.split(".", 1)[0] in self.prefixes]
            if topics:
                for future in client.delete_topics(topics, operation_timeout=30).values():
                    future.result(30)
        except Exception as exc:  # noqa: BLE001 - leftover topics are harmless, say so and go on
            log(f"  (could not delete benchmark topics: {exc})")


def scalar(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def topic_messages(settings: dict[str, str], topic: str) -> int:
    consumer = confluent_kafka.Consumer({**settings, "group.id": "bench-watermarks", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


# --- relay -------------------------------------------------------------------------------


def warm_up(producer: Any, settings: dict[str, str], prefix: str) -> None:
    """Connect and get the idempotent producer id before the clock starts (a running
    relay has long done both); the warm-up message goes to a topic of its own."""
    topic = f"{prefix}.warmup"
    kafka.ensure_topics(settings, [topic])
    transactional = _in_transactions(producer)
    if transactional:
        producer.begin_transaction()
    producer.produce(topic, b"warm-up")
    if transactional:
        producer.commit_transaction(30)
    elif producer.flush(30):
        raise RuntimeError("warm-up message not acknowledged")


def _in_transactions(producer: Any) -> bool:
    """Whether the producer was made transactional (the relay's is: one transaction per batch)."""
    try:
        producer.begin_transaction()
    except (confluent_kafka.KafkaException, TransportError):  # raw, or translated by kafka.EventProducer
        return False
    producer.abort_transaction(10)
    return True


def read_topic(settings: dict[str, str], topic: str) -> list[tuple[bytes, bytes]]:
    """Every committed (key, value) of a one-partition topic, in order (read to the end
    of the partition: transaction markers take offsets but are no messages)."""
    consumer = confluent_kafka.Consumer({**settings, "group.id": "bench-reader", "enable.auto.commit": False,
                                         "enable.partition.eof": True, "isolation.level": "read_committed"})
    try:
        low, high = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, 0), timeout=10)
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, low)])
        out: list[tuple[bytes, bytes]] = []
        end = False
        while not end:
            batch = consumer.consume(1000, timeout=10)
            if not batch:
                raise RuntimeError(f"read {len(out)} of {high - low} offsets of {topic}")
            for msg in batch:
                err = msg.error()
                if err is not None and err.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    end = True
                elif err is None:
                    out.append((msg.key(), msg.value()))
        return out
    finally:
        consumer.close()


def bench_relay(config: Config, origin: str, events: Sequence[Event]) -> dict[str, Any]:
    """A running, idle relay (lease held, producer connected, one empty step done);
    then N committed events appear in the outbox at once and the clock starts."""
    n = len(events)
    relay = Relay(config, origin, holder="bench")
    relay.start()
    warm_up(relay._publisher._producer, config.kafka_settings(origin), config.topic_prefix)
    if relay.step() != 0:
        raise RuntimeError("the outbox of a fresh database is not empty")
    prefill_outbox(config.region(origin).dsn, events)
    steps = 0
    try:
        started = time.perf_counter()
        done = 0
        while done < n:
            sent = relay.step()
            if not sent:
                raise RuntimeError(f"relay published {done} of {n} events and then found nothing to do")
            done += sent
            steps += 1
        elapsed = time.perf_counter() - started
    finally:
        relay.close()
    settings = config.kafka_settings(origin)
    on_topic = topic_messages(settings, config.events_topic(origin))
    # offsets, not messages: each relay batch is one transaction, and its commit marker takes an offset
    if on_topic not in (n, n + steps):
        raise RuntimeError(f"relay topic holds {on_topic} offsets, expected {n} events (+{steps} commit markers)")
    return {"seconds": elapsed, "events": n, "events_per_s": n / elapsed, "steps": steps}


def bench_relay_floor(config: Config, origin: str, events: Sequence[Event]) -> float:
    """Seconds for the relay's database side alone: ``pg.claim_messages`` numbering
    and reading every event (server-built messages) in steps of the relay's size,
    nothing produced. What the outbox costs before Kafka: the relay can approach
    it, not beat it."""
    dsn = config.region(origin).dsn
    prefill_outbox(dsn, events)
    with pg.connect(dsn) as conn, pg.connect(dsn, autocommit=True) as lease:
        epoch = pg.acquire_lease(lease, origin, "bench-floor")
        started = time.perf_counter()
        after = 0
        while after < len(events):
            claimed = pg.claim_messages(conn, origin, epoch, after, config.relay_batch_size)
            if not claimed:
                raise RuntimeError(f"relay floor numbered {after} of {len(events)} events")
            after = claimed[-1][0]
        return time.perf_counter() - started


def bench_producer_ceiling(config: Config, origin: str, messages: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    settings = config.kafka_settings(origin)
    topic = f"{config.topic_prefix}.ceiling.{uuid.uuid4().hex[:6]}"
    kafka.ensure_topics(settings, [topic], config.topic_partitions)
    producer = kafka.producer(settings)  # the relay's own constructor: same idempotence/acks/linger/batch
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    warm_up(producer, settings, config.topic_prefix)
    produce = producer.produce
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(60)
    elapsed = time.perf_counter() - started
    if errors or remaining:
        raise RuntimeError(f"ceiling producer: {len(errors)} failed, {remaining} outstanding")
    on_topic = topic_messages(settings, topic)
    if on_topic != len(messages):
        raise RuntimeError(f"ceiling topic holds {on_topic} messages, expected {len(messages)}")
    return {"seconds": elapsed, "events": len(messages), "events_per_s": len(messages) / elapsed}


# --- apply -------------------------------------------------------------------------------


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def bench_apply(config: Config, dest: str, events: Sequence[Event]) -> dict[str, Any]:
    dsn = config.region(dest).dsn
    size = config.apply_batch_size
    with psycopg.connect(dsn) as conn:
        applier = Applier(conn, dest, config.tables, config.hlc_max_offset_ms)
        applier.writer("orders")  # catalogue lookup once, as a running inbox has done long before
        conn.commit()  # or each apply_remote "transaction" would be a savepoint of one long transaction
        applied = 0
        started = time.perf_counter()
        for chunk in batches(events, size):
            report = applier.apply_remote(chunk)
            applied += len(report.applied)
            if report.quarantined:
                raise RuntimeError(f"apply quarantined events: {report.quarantined[:1]}")
        elapsed = time.perf_counter() - started
    if applied != len(events):
        raise RuntimeError(f"applied {applied} of {len(events)} events")
    inbox = scalar(dsn, "SELECT count(*) FROM reconciler.inbox")
    rows = scalar(dsn, "SELECT count(*) FROM public.orders")
    if inbox != len(events) or rows != len({e.key for e in events}):
        raise RuntimeError(f"after apply: {inbox} inbox rows, {rows} orders rows")
    return {"seconds": elapsed, "events": len(events), "events_per_s": len(events) / elapsed,
            "batch_size": size}


_UPSERT_SET = "customer = EXCLUDED.customer, status = EXCLUDED.status, total_cents = EXCLUDED.total_cents," \
    " note = EXCLUDED.note"


def _raw_executemany(conn: psycopg.Connection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.orders (id, customer, status, total_cents, note) VALUES (%s, %s, %s, %s, %s)"
            f" ON CONFLICT (id) DO UPDATE SET {_UPSERT_SET}",
            rows,
        )


def _raw_unnest(conn: psycopg.Connection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    cols = list(zip(*rows, strict=True))
    with conn.cursor(binary=True) as cur:
        cur.execute(
            "INSERT INTO public.orders (id, customer, status, total_cents, note)"
            " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[])"
            f" ON CONFLICT (id) DO UPDATE SET {_UPSERT_SET}",
            [list(c) for c in cols],
            prepare=True,
        )


def _raw_jsonb(conn: psycopg.Connection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    doc = json.dumps([dict(zip(ORDER_COLUMNS, r, strict=True)) for r in rows], separators=(",", ":"))
    conn.execute(
        "INSERT INTO public.orders (id, customer, status, total_cents, note)"
        " SELECT id, customer, status, total_cents, note FROM jsonb_populate_recordset(NULL::public.orders, %s::jsonb)"
        f" ON CONFLICT (id) DO UPDATE SET {_UPSERT_SET}",
        (doc,),
        prepare=True,
    )


def _raw_copy(conn: psycopg.Connection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS bench_stage (id text, customer text, status text, total_cents bigint,"
        " note text) ON COMMIT DELETE ROWS"
    )
    with conn.cursor() as cur:
        with cur.copy("COPY bench_stage (id, customer, status, total_cents, note) FROM STDIN (FORMAT binary)") as cp:
            cp.set_types(["text", "text", "text", "int8", "text"])
            for r in rows:
                cp.write_row(r)
        cur.execute(
            "INSERT INTO public.orders (id, customer, status, total_cents, note) SELECT * FROM bench_stage"
            f" ON CONFLICT (id) DO UPDATE SET {_UPSERT_SET}",
            prepare=True,
        )


def bench_apply_floor(config: Config, dest: str, events: Sequence[Event], size: int) -> float:
    """Seconds for apply's own row writes alone: ``pg.insert_inbox`` (dedup key and
    payload, RETURNING what was new) and ``pg.write_states`` (the business row and its
    row_meta), the states computed before the clock starts; no locks, no reads, no
    policy, one transaction per batch. What the schema costs before any decision is
    taken: apply can approach it, not beat it."""
    writer_table = config.tables["orders"]
    plan = [
        (chunk, {e.key: RowState(values=dict(e.payload["values"]), hlc=e.hlc, origin=e.origin) for e in chunk})
        for chunk in batches(events, size)
    ]
    with psycopg.connect(config.region(dest).dsn) as conn:
        writer = pg.TableWriter.build(conn, writer_table)
        conn.commit()
        started = time.perf_counter()
        for chunk, states in plan:
            with conn.transaction():
                pg.insert_inbox(conn, chunk)
                pg.write_states(conn, writer, states)
        elapsed = time.perf_counter() - started
        inbox = conn.execute("SELECT count(*) FROM reconciler.inbox").fetchone()
    if not inbox or inbox[0] != len(events):
        raise RuntimeError(f"floor wrote {inbox} inbox rows, expected {len(events)}")
    return elapsed


RAW_METHODS: dict[str, Callable[[psycopg.Connection[Any], Sequence[tuple[Any, ...]]], None]] = {
    "executemany (pipelined INSERT ... VALUES per row)": _raw_executemany,
    "one INSERT ... SELECT FROM unnest(binary arrays)": _raw_unnest,
    "one INSERT ... SELECT FROM jsonb_populate_recordset": _raw_jsonb,
    "binary COPY to temp table + one INSERT ... SELECT": _raw_copy,
}


def bench_insert_ceiling(dsn: str, rows: Sequence[tuple[Any, ...]], size: int,
                         method: Callable[[psycopg.Connection[Any], Sequence[tuple[Any, ...]]], None]) -> float:
    """Seconds to upsert ``rows`` in batches of ``size``, one committed transaction each."""
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE public.orders")
        conn.commit()
        started = time.perf_counter()
        for chunk in batches(rows, size):
            method(conn, chunk)
            conn.commit()
        elapsed = time.perf_counter() - started
        count = conn.execute("SELECT count(*) FROM public.orders").fetchone()
    distinct = len({r[0] for r in rows})
    if not count or count[0] != distinct:
        raise RuntimeError(f"ceiling wrote {count} rows, expected {distinct}")
    return elapsed


# --- end to end ----------------------------------------------------------------------------


def _relay_process(config_path: str, origin: str, n: int, ready: Any, go: Any, result: Any) -> None:
    config = load_config(config_path)
    relay = Relay(config, origin, holder="bench-e2e")
    relay.start()
    warm_up(relay._publisher._producer, config.kafka_settings(origin), config.topic_prefix)
    relay.step()  # idle: nothing in the outbox yet
    ready.set()
    go.wait(120)
    done = 0
    try:
        while done < n:
            sent = relay.step()
            done += sent
            if not sent:
                time.sleep(0.01)
    finally:
        relay.close()
    result.put(done)


def bench_e2e(config: Config, origin: str, dest: str, events: Sequence[Event]) -> dict[str, Any]:
    n = len(events)
    ctx = mp.get_context("spawn")
    ready, go, result = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_relay_process, args=(str(config.path), origin, n, ready, go, result), daemon=True)
    proc.start()
    inbox = InboxConsumer(config, dest, origins=[origin])
    inbox.start()
    try:
        deadline = time.monotonic() + 60
        while not inbox._subscription._consumer.assignment():  # join the group before the clock starts
            inbox.step(timeout=0.2)
            if time.monotonic() > deadline:
                raise RuntimeError("inbox consumer got no partition assignment in 60 s")
        if not ready.wait(60):
            raise RuntimeError("relay process did not start")
        prefill_outbox(config.region(origin).dsn, events)
        go.set()
        started = time.perf_counter()
        applied = 0
        deadline = time.monotonic() + max(120, n / 200)
        while applied < n:
            applied += len(inbox.step(timeout=0.5).applied)
            if time.monotonic() > deadline:
                raise RuntimeError(f"end-to-end: {applied} of {n} applied before the deadline")
        elapsed = time.perf_counter() - started
    finally:
        inbox.close()
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    if proc.exitcode != 0:
        raise RuntimeError(f"relay process exited with {proc.exitcode}")
    return {"seconds": elapsed, "events": n, "events_per_s": n / elapsed}


# --- the run -------------------------------------------------------------------------------


def environment(stack: DevStack, dsn: str) -> dict[str, Any]:
    server = scalar(dsn, "SHOW server_version")
    settings = {
        name: scalar(dsn, f"SHOW {name}") for name in ("fsync", "synchronous_commit", "shared_buffers", "wal_level")
    }
    jars = sorted(p.name for p in (stack.root / "kafka" / "libs").glob("kafka_*.jar")) if stack.root else []
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "postgresql_server": server,
        "postgresql_settings": settings,
        "kafka_broker_jars": jars,
        "git_commit": commit,
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--quick", action="store_true", help="5,000 events (CI smoke)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--relay-batch", type=int, default=DEFAULT_RELAY_BATCH, help="relay step size (config default)")
    p.add_argument("--apply-batch", type=int, default=DEFAULT_APPLY_BATCH,
                   help="apply transaction size, also the ceiling's (config default)")
    p.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end figure")
    p.add_argument("--check", action="store_true", help="exit 1 when a ratio is under its target")
    p.add_argument("--keep", action="store_true", help="keep the benchmark databases and topics")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pipeline.json"))
    args = p.parse_args(argv)
    n = 5_000 if args.quick else args.events

    stack = DevStack.from_state(Path(args.dev_dir))
    if len(stack.regions) < 2:
        raise SystemExit("the pipeline benchmark needs a stack with at least two regions")
    origin, dest = stack.regions[0], stack.regions[1]
    env_info = environment(stack, stack.dsn(dest))
    log(f"pipeline benchmark: {n:,} events, {args.repeat} rounds, relay batch {args.relay_batch}, "
        f"apply batch {args.apply_batch}, "
        f"{origin} -> {dest}, {env_info['cpus']} cpus")

    events = make_events(n, origin)
    messages = [(e.key.encode(), wire.encode(e)) for e in events]
    decoded = [wire.decode(value, topic="bench", offset=i) for i, (_, value) in enumerate(messages)]
    rows = [tuple(e.payload["values"][c] for c in ORDER_COLUMNS) for e in events]
    payload_sizes = [len(json.dumps(e.payload, separators=(",", ":"))) for e in events]

    runs: dict[str, list[float]] = {"relay": [], "relay_ceiling": [], "relay_floor": [], "apply": [],
                                    "apply_floor": [], "e2e": []}
    raw: dict[str, list[float]] = {name: [] for name in RAW_METHODS}
    details: list[dict[str, Any]] = []
    relayed: list[tuple[bytes, bytes]] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        envs = Envs(stack, (origin, dest), Path(tmp), args.keep)
        try:
            for rnd in range(args.repeat):
                log(f"round {rnd + 1}/{args.repeat}")
                detail: dict[str, Any] = {"round": rnd + 1}
                config = envs.make(args.relay_batch, args.apply_batch)
                ours_first = rnd % 2 == 0
                for what in ("relay", "ceiling") if ours_first else ("ceiling", "relay"):
                    if what == "relay":
                        detail["relay"] = bench_relay(config, origin, events)
                        runs["relay"].append(detail["relay"]["events_per_s"])
                        log(f"  relay          {detail['relay']['events_per_s']:>10,.0f} ev/s")
                        if relayed is None:  # the ceiling produces exactly what the relay published
                            relayed = read_topic(config.kafka_settings(origin), config.events_topic(origin))
                    else:
                        detail["relay_ceiling"] = bench_producer_ceiling(config, origin, relayed or messages)
                        runs["relay_ceiling"].append(detail["relay_ceiling"]["events_per_s"])
                        log(f"  raw producer   {detail['relay_ceiling']['events_per_s']:>10,.0f} ev/s")
                seconds = bench_relay_floor(envs.make(args.relay_batch, args.apply_batch), origin, events)
                detail["relay_floor"] = {"seconds": seconds, "events_per_s": n / seconds}
                runs["relay_floor"].append(n / seconds)
                log(f"  relay floor    {n / seconds:>10,.0f} ev/s  (number + read alone, no Kafka)")
                ceiling_dsn = envs.plain(dest)
                methods = list(RAW_METHODS.items())
                for what in ("apply", "ceiling") if ours_first else ("ceiling", "apply"):
                    if what == "apply":
                        detail["apply"] = bench_apply(config, dest, decoded)
                        runs["apply"].append(detail["apply"]["events_per_s"])
                        log(f"  apply          {detail['apply']['events_per_s']:>10,.0f} ev/s")
                    else:
                        detail["apply_ceiling"] = {}
                        for name, method in methods if ours_first else methods[::-1]:
                            seconds = bench_insert_ceiling(ceiling_dsn, rows, args.apply_batch, method)
                            raw[name].append(n / seconds)
                            detail["apply_ceiling"][name] = {"seconds": seconds, "events_per_s": n / seconds}
                            log(f"  raw upsert     {n / seconds:>10,.0f} ev/s  ({name})")
                seconds = bench_apply_floor(envs.make(args.relay_batch, args.apply_batch), dest, decoded,
                                            args.apply_batch)
                detail["apply_floor"] = {"seconds": seconds, "events_per_s": n / seconds}
                runs["apply_floor"].append(n / seconds)
                log(f"  write floor    {n / seconds:>10,.0f} ev/s  (apply's own row writes alone)")
                if not args.no_e2e:
                    detail["e2e"] = bench_e2e(envs.make(args.relay_batch, args.apply_batch), origin, dest, events)
                    runs["e2e"].append(detail["e2e"]["events_per_s"])
                    log(f"  end-to-end     {detail['e2e']['events_per_s']:>10,.0f} ev/s")
                details.append(detail)
        finally:
            envs.cleanup()

    raw_medians = {name: median(v) for name, v in raw.items()}
    best_raw = max(raw_medians, key=lambda k: raw_medians[k])
    medians = {k: median(v) for k, v in runs.items() if v}
    medians["apply_ceiling"] = raw_medians[best_raw]
    ratios = {
        "relay": medians["relay"] / medians["relay_ceiling"],
        "apply": medians["apply"] / medians["apply_ceiling"],
    }
    passed = {k: v >= TARGET for k, v in ratios.items()}
    # the same ratio taken inside each round (ours and its ceiling ran seconds apart, so
    # a neighbour's load hits both), then the median: steadier on a shared machine
    round_ratios = {
        "relay": [d["relay"]["events_per_s"] / d["relay_ceiling"]["events_per_s"] for d in details],
        "apply": [d["apply"]["events_per_s"] / max(m["events_per_s"] for m in d["apply_ceiling"].values())
                  for d in details],
    }

    print()
    print(f"pipeline, {n:,} events, median of {args.repeat} ({env_info['cpus']} cpus, "
          f"PostgreSQL {env_info['postgresql_server']}, librdkafka {env_info['librdkafka']})")
    print(f"{'':<10}{'ours ev/s':>12}{'ceiling ev/s':>14}{'ratio':>8}  target       (ratio per round)")
    for k in ("relay", "apply"):
        print(f"{k:<10}{medians[k]:>12,.0f}{medians[k + '_ceiling']:>14,.0f}{ratios[k]:>8.2f}  "
              f">= {TARGET} {'PASS' if passed[k] else 'FAIL'}    ({', '.join(f'{r:.2f}' for r in round_ratios[k])})")
    print(f"{'floor':<10}{medians['relay_floor']:>12,.0f}{medians['relay_ceiling']:>14,.0f}"
          f"{medians['relay_floor'] / medians['relay_ceiling']:>8.2f}  (relay's database side alone: number + read)")
    print(f"{'floor':<10}{medians['apply_floor']:>12,.0f}{medians['apply_ceiling']:>14,.0f}"
          f"{medians['apply_floor'] / medians['apply_ceiling']:>8.2f}  (apply's writes alone: inbox+orders+row_meta)")
    if "e2e" in medians:
        print(f"{'e2e':<10}{medians['e2e']:>12,.0f}{'':>14}{'':>8}  (outbox -> Kafka -> {dest} rows)")
    print(f"apply ceiling = {best_raw}; all raw ways: "
          + ", ".join(f"{k.split(' (')[0]}: {v:,.0f}" for k, v in raw_medians.items()))

    doc = {
        "benchmark": "pipeline",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": n,
        "rounds": args.repeat,
        "batch_size": {"relay": args.relay_batch, "apply": args.apply_batch},
        "regions": {"origin": origin, "destination": dest},
        "workload": {
            "table": "orders (lww)",
            "inserts": (n + 1) // 2,
            "updates": n // 2,
            "payload_bytes_mean": statistics.fmean(payload_sizes),
            "message_bytes_mean": statistics.fmean(len(v) for _, v in (relayed or messages)),
        },
        "environment": {**env_info, "load_avg_after": list(os.getloadavg())},
        "methods": {
            "relay": "Relay.step() until all N published: number + read (server-built messages), produce, wait"
                     " for every ack, mark published; relay started, warmed up and idle before the outbox fills",
            "relay_ceiling": "raw confluent_kafka Producer from reconciler.transport.kafka.producer (idempotent,"
                             " acks=all, linger.ms=5), the N messages the relay published (same keys and bytes),"
                             " produce all then one flush, fresh topic, same broker",
            "apply": f"Applier.apply_remote on pre-decoded events, batches of {args.apply_batch}, fresh database",
            "apply_ceiling": f"fastest of RAW_METHODS: raw INSERT INTO orders ... ON CONFLICT (id) DO UPDATE,"
                             f" batches of {args.apply_batch}, one transaction each, fresh database, same server",
            "relay_floor": "pg.claim_messages until all N are numbered and read, nothing produced: the relay's"
                           " database side alone",
            "apply_floor": "pg.insert_inbox + pg.write_states with precomputed states: apply's writes alone",
            "e2e": "relay in its own process + InboxConsumer of the destination in this one, from go to the"
                   " last event applied and its offset committed",
        },
        "measurements_events_per_s": {**runs, **{f"apply_ceiling: {k}": v for k, v in raw.items()}},
        "rounds_detail": details,
        "medians_events_per_s": medians,
        "apply_ceiling_method": best_raw,
        "apply_ceiling_methods_median_events_per_s": raw_medians,
        "ratios": ratios,
        "per_round_ratios": round_ratios,
        "per_round_ratio_medians": {k: median(v) for k, v in round_ratios.items()},
        "relay_database_floor_ratio": medians["relay_floor"] / medians["relay_ceiling"],
        "apply_write_floor_ratio": medians["apply_floor"] / medians["apply_ceiling"],
        "targets": {"relay": TARGET, "apply": TARGET},
        "passed": passed,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")
    return 1 if args.check and not all(passed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
