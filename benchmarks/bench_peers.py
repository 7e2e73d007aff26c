"""Usage: .venv/bin/python benchmarks/bench_peers.py [--events 20000] [--runs 1] [--json-out FILE]
                                                 [--dev-dir DIR] [--port-base P]
                                                 [--relay-rate 5000] [--apply-rate 1000] [--lag-seconds 10]
                                                 [--no-ceilings] [--keep]

reconciler against what users would deploy instead, on the same machine, the same two
PostgreSQL servers and the same Kafka broker, side by side in one run:

- relay: N committed outbox rows (~200-byte payloads) moved to Kafka by reconciler's
  relay (``Relay.run`` in its own process, as a sidecar runs it) and by Debezium's
  PostgreSQL connector (pgoutput, outbox EventRouter SMT) on a Kafka Connect worker in
  standalone mode (offsets in a file). Events/s from the commit of the rows to the last
  one acknowledged by the broker: the relay's recorded ``published_through`` (written
  after the acknowledgements) for reconciler, the target topic's end offset for
  Debezium (its producer is not transactional: offsets are messages). Then the lag
  from commit to Kafka at a steady write rate: each row's commit time (client clock,
  after COMMIT returned) against its message's broker append time (the topics are
  created with ``message.timestamp.type=LogAppendTime``).
- apply: the same N row changes of ``orders`` (inserts of N/10 keys, then updates
  cycling over them) applied from region A's server to region B's: by reconciler
  (events already in Kafka, ``InboxConsumer.run`` in its own process: inbox, policies,
  row metadata, Merkle leaves) and by a PostgreSQL publication/subscription (the
  changes already in A's WAL, the subscription enabled when the clock starts). Rows/s
  until B shows the last change. Then the lag from A's commit to B at a steady rate,
  through the whole pipeline for reconciler (outbox -> relay -> Kafka -> inbox ->
  apply) and the subscription for PostgreSQL, by a marker row that every writer
  transaction bumps and a poller on B watches.
- the earlier raw ceilings (``bench_pipeline.py``'s bare idempotent producer and bare
  batched upsert) on the same messages and rows, for continuity.

Debezium needs ``wal_level=logical``. When ``--dev-dir`` names a stack whose servers
already have it, they are used; otherwise two servers of the benchmark's own are
started with it (the dev stack's settings plus logical decoding) on ``--port-base``
and ``--port-base + 1``. Kafka is the dev stack's broker, or one started on
``--port-base + 3`` when there is no stack. Connect listens on ``--port-base + 2``.
Connect's and Debezium's jars are resolved by Maven from ``benchmarks/peers/pom.xml``
once into a cache directory. Everything started here is stopped by its PID at the end.

Medians over ``--runs`` rounds (who goes first alternates); the JSON keeps every
round, the machine (load average before and after) and the versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline as bp  # noqa: E402 - the raw ceilings and helpers are reused, not copied

from reconciler import wire  # noqa: E402
from reconciler.config import DEFAULT_APPLY_BATCH, Config, load_config  # noqa: E402
from reconciler.devstack import DevStack  # noqa: E402
from reconciler.devstack._process import Deadline, port_open  # noqa: E402
from reconciler.devstack.kafka import KafkaBroker, KafkaLibs, find_java, find_maven  # noqa: E402
from reconciler.devstack.postgres import PostgresServer, find_bindir, prepare_base, remove_base, server_identity  # noqa: E402
from reconciler.hlc import Timestamp  # noqa: E402
from reconciler.model import Event, Operation  # noqa: E402
from reconciler.provision import migrate  # noqa: E402
from reconciler.store import postgres as pg  # noqa: E402
from reconciler.transport import kafka  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS_POM = HERE / "peers" / "pom.xml"
ROOT_POM = HERE.parent / "pom.xml"
REGIONS = ("us-east", "eu-west")
LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}
POLL_S = 0.005
ORDER_COLS = "id, customer, status, total_cents, note"
CHECKSUM_SQL = ("SELECT count(*), coalesce(sum(hashtext(id || '|' || customer || '|' || status || '|' || total_cents"
                " || '|' || coalesce(note, ''))::bigint), 0) FROM public.orders WHERE id <> 'lagmark'")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- jars -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reconciler"


def resolve_connect_libs(libs: Path, timeout: float = 1200) -> tuple[Path, float]:
    """Connect's and Debezium's jars, copied by Maven from the peers pom once (again only
    when the pom changes); returns the directory and the seconds Maven took (0 if cached)."""
    stamp = hashlib.sha256(PEERS_POM.read_bytes()).hexdigest()
    if (libs / ".pom.sha256").exists() and (libs / ".pom.sha256").read_text() == stamp:
        return libs, 0.0
    tmp = libs.with_name(f"{libs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    libs.parent.mkdir(parents=True, exist_ok=True)
    log(f"resolving Kafka Connect + Debezium jars with Maven into {libs} (once)")
    started = time.perf_counter()
    result = subprocess.run(
        [find_maven(), "-q", "-B", "-Dstyle.color=never", "-f", str(PEERS_POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=libs.parent, check=False)
    if result.returncode != 0 or not any(tmp.glob("debezium-connector-postgres-*.jar")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"Maven could not resolve {PEERS_POM} (exit {result.returncode}):\n"
                           + (result.stdout + result.stderr)[-3000:])
    (tmp / ".pom.sha256").write_text(stamp)
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    return libs, time.perf_counter() - started


# --- servers ----------------------------------------------------------------------------------


class LogicalServer(PostgresServer):
    """The dev stack's server settings, plus logical decoding (Debezium, subscriptions)."""

    def configure(self) -> None:
        super().configure()
        with (self.data_dir / "reconciler.conf").open("a") as fh:
            fh.write("wal_level = logical\nmax_replication_slots = 16\nmax_wal_senders = 16\n")


def wal_level(dsn: str) -> str:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
    return str(row[0]) if row else ""


@dataclass
class Place:
    """Where the benchmark runs: two logical PostgreSQL servers, a broker, a Connect port."""

    dsn: dict[str, str]
    bootstrap: str
    connect_port: int
    workdir: Path
    started: list[str] = field(default_factory=list)


@contextmanager
def place(args: argparse.Namespace) -> Iterator[Place]:
    """Use what the dev stack offers, start the rest; stop what was started (by PID)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    stack = DevStack.from_state(Path(args.dev_dir)) if args.dev_dir else None
    base = args.port_base or ((stack.kafka_port if stack else 29400) + 20)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        started: list[str] = []
        if stack is not None:
            bootstrap = stack.bootstrap_servers
        else:
            libs = KafkaLibs(ROOT_POM, cache_dir() / "bench-peers-kafka" / "libs")
            libs.ensure(workdir / "maven-kafka.log")
            broker = KafkaBroker(workdir / "kafka", workdir / "logs", base + 3, libs)
            broker.start(find_java())
            cleanup.callback(broker.stop)
            broker.wait_ready(Deadline(120))
            started.append(f"Kafka broker pid {broker.pid()} on {broker.bootstrap_servers}")
            bootstrap = broker.bootstrap_servers
        if stack is not None and all(wal_level(stack.dsn(r)) == "logical" for r in stack.regions[:2]):
            dsn = {REGIONS[i]: stack.dsn(r) for i, r in enumerate(stack.regions[:2])}
        else:
            run_as = server_identity()
            pg_base = prepare_base(workdir, run_as)
            cleanup.callback(remove_base, workdir)
            dsn = {}
            for i, region in enumerate(REGIONS):
                server = LogicalServer(region, pg_base / region, base + i, pg_base / f"{region}.log", find_bindir(),
                                       run_as)
                server.start()
                cleanup.callback(server.stop, "fast")
                started.append(f"PostgreSQL {region} pid {server.pid()} on port {base + i} (wal_level=logical)")
                dsn[region] = server.dsn("postgres")
        for line in started:
            log(f"started {line}")
        yield Place(dsn, bootstrap, base + 2, workdir, started)


# --- Kafka Connect + Debezium ----------------------------------------------------------------------


class ConnectWorker:
    """A standalone Kafka Connect worker (its own JVM, its own session, known PID)."""

    def __init__(self, libs: Path, workdir: Path, bootstrap: str, port: int) -> None:
        self.libs, self.home, self.bootstrap, self.port = libs, workdir / "connect", bootstrap, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> float:
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} (Kafka Connect's REST) is taken; choose another --port-base")
        self.home.mkdir(parents=True, exist_ok=True)
        worker = self.home / "worker.properties"
        worker.write_text("".join(f"{k}={v}\n" for k, v in {
            "bootstrap.servers": self.bootstrap,
            "key.converter": "org.apache.kafka.connect.storage.StringConverter",
            "value.converter": "org.apache.kafka.connect.storage.StringConverter",
            "offset.storage.file.filename": self.home / "offsets.dat",
            "offset.flush.interval.ms": "1000",
            "listeners": self.url,
        }.items()))
        log4j = self.home / "log4j.properties"
        log4j.write_text(
            "log4j.rootLogger=WARN, file\nlog4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self.home / 'connect.log'}\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.io.debezium=INFO\n")
        started = time.perf_counter()
        with (self.home / "connect.out").open("wb") as out:
            self.proc = subprocess.Popen(
                [find_java(), "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j.configuration=file:{log4j}",
                 "-cp", f"{self.libs}/*", "org.apache.kafka.connect.cli.ConnectStandalone", str(worker)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                start_new_session=True, close_fds=True)
        log(f"started Kafka Connect pid {self.proc.pid} on {self.url}")
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Kafka Connect exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.request("GET", "/connectors")
                return time.perf_counter() - started
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Kafka Connect did not answer on {self.url} in 180 s:\n{self.tail()}") from None
                time.sleep(0.5)

    def tail(self, lines: int = 40) -> str:
        text = ""
        for name in ("connect.out", "connect.log"):
            path = self.home / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log(f"stopped Kafka Connect pid {proc.pid}")


#: Debezium's batching matched to the relay's: at most one relay batch per poll, and an
#: empty queue looked at again after the relay's idle sleep (Relay.run's 50 ms) instead of
#: Debezium's default 500 ms; ``--debezium-defaults`` leaves all three at Debezium's defaults
#: (2048, 8192, 500 ms).
DEBEZIUM_MATCHED = {"poll.interval.ms": "50"}


def debezium_config(name: str, dsn: str, topic: str, batch: int | None = None) -> dict[str, str]:
    """The outbox pattern as Debezium's documentation sets it up, on reconciler's own
    outbox table (its id/aggregatetype/aggregateid/type/payload columns are the ones
    the EventRouter expects by default). ``batch``: match the relay's batching (see
    DEBEZIUM_MATCHED), else Debezium's defaults."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    slot = name.replace("-", "_")
    matched = {**DEBEZIUM_MATCHED, "max.batch.size": str(batch), "max.queue.size": str(4 * batch)} if batch else {}
    return {
        **matched,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": str(info.get("host", "127.0.0.1")),
        "database.port": str(info.get("port", 5432)),
        "database.user": str(info.get("user", "postgres")),
        "database.password": "unused-trust-auth",
        "database.dbname": str(info["dbname"]),
        "topic.prefix": slot,
        "table.include.list": "reconciler.outbox",
        "slot.name": slot,
        "publication.name": slot,
        "publication.autocreate.mode": "filtered",
        "snapshot.mode": "no_data",
        "tombstones.on.delete": "false",
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        "transforms.outbox.route.topic.replacement": topic,
    }


def start_connector(worker: ConnectWorker, name: str, config: dict[str, str], dsn: str) -> None:
    worker.request("POST", "/connectors", {"name": name, "config": config})
    deadline = time.monotonic() + 120
    while True:
        try:
            status = worker.request("GET", f"/connectors/{name}/status")
        except urllib.error.HTTPError:
            status = {}
        tasks = status.get("tasks") or []
        if any(t.get("state") == "FAILED" for t in tasks):
            raise RuntimeError(f"Debezium task failed: {tasks[0].get('trace', '')[:2000]}")
        if tasks and tasks[0].get("state") == "RUNNING" and slot_active(dsn, config["slot.name"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Debezium connector not streaming after 120 s: {status}\n{worker.tail()}")
        time.sleep(0.2)


def stop_connector(worker: ConnectWorker, name: str, dsn: str, slot: str) -> None:
    try:
        worker.request("DELETE", f"/connectors/{name}")
    except OSError as exc:
        log(f"  (could not delete connector {name}: {exc})")
    deadline = time.monotonic() + 30
    while slot_active(dsn, slot) and time.monotonic() < deadline:
        time.sleep(0.2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                     (slot,))


def slot_active(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return bool(row and row[0])


# --- databases, configs, topics ------------------------------------------------------------------


class Databases:
    """Fresh databases on the two servers and topic prefixes, dropped at the end."""

    def __init__(self, where: Place, keep: bool, relay_batch: int, apply_batch: int) -> None:
        self.where, self.keep = where, keep
        self.relay_batch, self.apply_batch = relay_batch, apply_batch
        self.made: list[tuple[str, str]] = []
        self.prefixes: list[str] = []
        #: Debezium's batch matched to the relay's, or None for Debezium's defaults
        self.debezium_batch: int | None = relay_batch

    def database(self, region: str, tag: str) -> str:
        server = self.where.dsn[region]
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{tag}"')
        self.made.append((server, tag))
        return server.rsplit("/", 1)[0] + "/" + tag

    def reconciler(self, apply_workers: int = 1) -> Config:
        """Both regions migrated (orders lww, Merkle leaves): what the sidecars would run on."""
        tag = "peers" + uuid.uuid4().hex[:10]
        regions = {r: {"dsn": self.database(r, tag),
                       "metrics_address": f"127.0.0.1:{self.where.connect_port + 8 + i}"}
                   for i, r in enumerate(REGIONS)}
        doc = {
            "topic_prefix": tag,
            "hlc": {"max_offset_ms": 1000},
            "kafka": {"bootstrap.servers": self.where.bootstrap},
            "regions": regions,
            "tables": {"orders": {"key": ["id"], "policy": "lww"}},
            "batch": {"relay": self.relay_batch, "apply": self.apply_batch},
            "apply": {"workers": apply_workers},
        }
        path = self.where.workdir / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(doc))
        config = load_config(path)
        migrate(config, demo_tables=True)
        self.prefixes.append(tag)
        return config

    def plain(self) -> tuple[str, dict[str, str]]:
        """The demo tables alone, on both servers (what a logical-replication user has)."""
        tag = "peers" + uuid.uuid4().hex[:10]
        dsns = {}
        for region in REGIONS:
            dsns[region] = self.database(region, tag)
            with psycopg.connect(dsns[region]) as conn:
                pg.create_demo_tables(conn)
        self.prefixes.append(tag)
        return tag, dsns

    def cleanup(self) -> None:
        if self.keep:
            return
        for server, name in reversed(self.made):
            try:
                with psycopg.connect(server, autocommit=True) as conn:
                    for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                                                (name,)).fetchall():
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.Error as exc:
                log(f"  (could not drop database {name}: {exc})")
        try:
            client = kafka.admin({"bootstrap.servers": self.where.bootstrap})
            topics = [t for t in client.list_topics(timeout=10).topics if t.split(".", 1)[0] in self.prefixes]
            if topics:
                for future in client.delete_topics(topics, operation_timeout=30).values():
                    future.result(30)
        except Exception as exc:  # noqa: BLE001 - leftover topics are harmless, say so and go on
            log(f"  (could not delete benchmark topics: {exc})")


def end_offset(consumer: Any, topic: str) -> int:
    _low, high = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, 0), timeout=10, cached=False)
    return int(high)


def read_append_times(bootstrap: str, topic: str, expected: int, timeout: float = 120) -> dict[bytes, float]:
    """Key -> broker append time (s) of every committed message of a one-partition topic."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-peers-reader",
                                        "enable.auto.commit": False, "isolation.level": "read_committed",
                                        "enable.partition.eof": True})
    out: dict[bytes, float] = {}
    try:
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while len(out) < expected:
            for msg in consumer.consume(2000, timeout=1):
                if msg.error() is None:
                    out[msg.key()] = msg.timestamp()[1] / 1000
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: read {len(out)} of {expected} messages")
    finally:
        consumer.close()
    return out


# --- workloads ---------------------------------------------------------------------------------


def outbox_events(n: int, origin: str, prefix: str, seed: int) -> list[Event]:
    """N insert events of distinct ``orders`` keys, ~200-byte payloads (the relay's load)."""
    rnd = random.Random(seed)
    base = Timestamp(time.time_ns() // 1_000_000 - 60_000, 0).pack()
    out = []
    for i in range(n):
        key = f"{prefix}{i:09d}"
        values = {"id": key, "customer": f"customer-{rnd.randrange(100_000):05d}",
                  "status": rnd.choice(("new", "paid", "shipped", "delivered")),
                  "total_cents": rnd.randint(100, 1_000_000),
                  "note": "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz ", k=rnd.randint(70, 90)))}
        out.append(Event(origin=origin, event_id=str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                         table="orders", key=key, operation=Operation.INSERT, hlc=Timestamp.unpack(base + i),
                         payload={"key": {"id": key}, "values": values}, prior=None, event_type="orders.insert"))
    return out


@dataclass
class Change:
    index: int
    key: str
    insert: bool
    values: dict[str, Any]

    def row(self) -> tuple[Any, ...]:
        v = self.values
        return (v["id"], v["customer"], v["status"], v["total_cents"], v["note"])


def order_changes(n: int, seed: int = 11) -> list[Change]:
    """N changes of ``orders``: N/10 inserts, then updates cycling over those keys; each
    change's note names it, so the last change is recognisable on the other side."""
    rnd = random.Random(seed)
    keys = max(1, n // 10)
    out = []
    for i in range(n):
        key = f"o{i % keys:08d}"
        note = f"c{i:09d} " + "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz ", k=rnd.randint(60, 80)))
        out.append(Change(i, key, i < keys, {
            "id": key, "customer": f"customer-{rnd.randrange(100_000):05d}",
            "status": rnd.choice(("new", "paid", "shipped", "delivered")),
            "total_cents": rnd.randint(100, 1_000_000), "note": note}))
    return out


def change_events(changes: Sequence[Change], origin: str, base_ms: int) -> list[Event]:
    """The changes as the origin's outbox would record them (causal: each update's prior
    is the key's previous stamp)."""
    base = Timestamp(base_ms, 0).pack()
    last: dict[str, Timestamp] = {}
    out = []
    for c in changes:
        hlc = Timestamp.unpack(base + c.index)
        out.append(Event(origin=origin, event_id=str(uuid.uuid4()), table="orders", key=c.key,
                         operation=Operation.INSERT if c.insert else Operation.UPDATE, hlc=hlc,
                         payload={"key": {"id": c.key}, "values": c.values}, prior=last.get(c.key),
                         event_type="orders.insert" if c.insert else "orders.update"))
        last[c.key] = hlc
    return out


def checksum(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(CHECKSUM_SQL).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def write_changes(dsn: str, changes: Sequence[Change], batch: int) -> None:
    """The changes as SQL on a plain ``orders`` table, ``batch`` per transaction."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for start in range(0, len(changes), batch):
            chunk = changes[start:start + batch]
            inserts = [c.row() for c in chunk if c.insert]
            updates = [c.row()[1:] + (c.key,) for c in chunk if not c.insert]
            if inserts:
                cur.executemany(f"INSERT INTO public.orders ({ORDER_COLS}) VALUES (%s, %s, %s, %s, %s)", inserts)
            if updates:
                cur.executemany("UPDATE public.orders SET customer = %s, status = %s, total_cents = %s, note = %s"
                                " WHERE id = %s", updates)
            conn.commit()


# --- the reconciler side in processes of its own (as sidecars run it) --------------------------------


def _loop_process(kind: str, config_path: str, region: str, origin: str, ready: Any, go: Any, stop: Any,
                  warm_topic: str | None) -> None:
    from reconciler.inbox import InboxConsumer
    from reconciler.relay import Relay

    config = load_config(config_path)
    loop: Any
    if kind == "relay":
        loop = Relay(config, region, holder="bench-peers")
        loop.start()
        if warm_topic:  # connect and get the producer id before the clock starts, as a running relay has
            bp.warm_up(loop._publisher._producer, config.kafka_settings(region), config.topic_prefix)
    else:
        loop = InboxConsumer(config, region, origins=[origin])
    ready.set()
    go.wait(600)
    loop.run(stop)


@dataclass
class Loop:
    proc: Any
    stop: Any
    go: Any


def spawn_loop(kind: str, config: Config, region: str, origin: str = "", warm: bool = True) -> Loop:
    ctx = mp.get_context("spawn")
    ready, go, stop = ctx.Event(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_loop_process, daemon=True,
                       args=(kind, str(config.path), region, origin, ready, go, stop, "warm" if warm else None))
    proc.start()
    if not ready.wait(120):
        proc.terminate()
        raise RuntimeError(f"{kind} process did not start")
    return Loop(proc, stop, go)


def end_loop(loop: Loop) -> None:
    loop.stop.set()
    loop.go.set()
    loop.proc.join(60)
    if loop.proc.is_alive():
        loop.proc.terminate()
        loop.proc.join(10)
    if loop.proc.exitcode not in (0, None):
        raise RuntimeError(f"loop process exited with {loop.proc.exitcode}")


def published_through(dsn: str, origin: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT published_through FROM reconciler.relay_state WHERE origin = %s",
                           (origin,)).fetchone()
    return int(row[0]) if row else 0


def wait_for(what: str, check: Any, timeout: float, interval: float = POLL_S) -> float:
    """Poll ``check()`` until true; returns the wall time it first was."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.time()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- relay: reconciler vs Debezium ---------------------------------------------------------------


def relay_reconciler(dbs: Databases, events: list[Event], warm: list[Event]) -> dict[str, Any]:
    config = dbs.reconciler()
    origin = REGIONS[0]
    dsn = config.region(origin).dsn
    settings = config.kafka_settings(origin)
    topic = config.events_topic(origin)
    kafka.ensure_topics(settings, [topic], config.topic_partitions, topic_config=LOG_APPEND)
    loop = spawn_loop("relay", config, origin)
    try:
        loop.go.set()
        bp.prefill_outbox(dsn, warm)
        wait_for("relay warm-up", lambda: published_through(dsn, origin) >= len(warm), 120, 0.05)
        total = len(warm) + len(events)
        bp.prefill_outbox(dsn, events)  # one transaction: every row commits at once
        committed = time.time()
        done = wait_for("relay", lambda: published_through(dsn, origin) >= total, max(120, len(events) / 500), 0.02)
    finally:
        end_loop(loop)
    on_topic = len(bp.read_topic(settings, topic))
    if on_topic != total:
        raise RuntimeError(f"relay topic holds {on_topic} events, expected {total}")
    seconds = done - committed
    return {"events": len(events), "seconds": seconds, "events_per_s": len(events) / seconds, "on_topic": on_topic}


def relay_debezium(dbs: Databases, worker: ConnectWorker, events: list[Event], warm: list[Event]) -> dict[str, Any]:
    config = dbs.reconciler()
    origin = REGIONS[0]
    dsn = config.region(origin).dsn
    topic = f"{config.topic_prefix}.debezium.outbox"
    kafka.ensure_topics(config.kafka_settings(origin), [topic], 1, topic_config=LOG_APPEND)
    name = f"{config.topic_prefix}-dbz"
    connector = debezium_config(name, dsn, topic, dbs.debezium_batch)
    start_connector(worker, name, connector, dsn)
    consumer = confluent_kafka.Consumer({"bootstrap.servers": dbs.where.bootstrap, "group.id": "bench-peers-w"})
    try:
        bp.prefill_outbox(dsn, warm)
        wait_for("Debezium warm-up", lambda: end_offset(consumer, topic) >= len(warm), 120, 0.05)
        total = len(warm) + len(events)
        bp.prefill_outbox(dsn, events)
        committed = time.time()
        done = wait_for("Debezium", lambda: end_offset(consumer, topic) >= total, max(180, len(events) / 200), 0.02)
        on_topic = end_offset(consumer, topic)
    finally:
        consumer.close()
        stop_connector(worker, name, dsn, connector["slot.name"])
    if on_topic != total:
        raise RuntimeError(f"Debezium topic holds {on_topic} messages, expected {total}")
    seconds = done - committed
    return {"events": len(events), "seconds": seconds, "events_per_s": len(events) / seconds, "on_topic": on_topic}


class SteadyWriter:
    """Commits ``rate`` rows/s for ``seconds`` in ``ticks`` transactions a second and
    records each transaction's commit time (after COMMIT returned)."""

    def __init__(self, rate: int, seconds: float, ticks: int = 50) -> None:
        self.rate, self.seconds, self.ticks = rate, seconds, ticks
        self.per_tick = max(1, round(rate / ticks))
        self.count = max(1, int(seconds * ticks))
        self.commits: list[float] = []
        self.behind_s = 0.0

    def run(self, write: Any) -> float:
        """``write(i)`` writes and commits tick i; returns the achieved rows/s."""
        start = time.perf_counter()
        for i in range(self.count):
            due = start + i / self.ticks
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                self.behind_s = max(self.behind_s, -wait)
            write(i)
            self.commits.append(time.time())
        elapsed = max(time.perf_counter() - start, self.count / self.ticks)
        return self.count * self.per_tick / elapsed


def _copy_outbox(conn: psycopg.Connection[Any], events: Sequence[Event]) -> None:
    with conn.cursor() as cur, cur.copy(
        "COPY reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc, operation)"
        " FROM STDIN"
    ) as copy:
        for e in events:
            copy.write_row((e.event_id, e.table, e.key, e.event_type, json.dumps(e.payload, separators=(",", ":")),
                            e.origin, e.hlc.pack(), e.prior.pack() if e.prior else None, e.operation.value))
    conn.commit()


def lag_stats(lags: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": percentile(lags, 0.5) * 1000, "p99_ms": percentile(lags, 0.99) * 1000,
            "max_ms": max(lags) * 1000, "samples": len(lags)}


def relay_lag(dbs: Databases, worker: ConnectWorker | None, rate: int, seconds: float) -> dict[str, Any]:
    """Commit-to-Kafka lag at a steady rate: reconciler's relay, or Debezium with ``worker``."""
    config = dbs.reconciler()
    origin = REGIONS[0]
    dsn = config.region(origin).dsn
    settings = config.kafka_settings(origin)
    writer = SteadyWriter(rate, seconds)
    events = outbox_events(writer.count * writer.per_tick, origin, "lag", seed=5)
    warm = outbox_events(200, origin, "warm", seed=6)
    stop: Any
    if worker is None:
        topic = config.events_topic(origin)
        kafka.ensure_topics(settings, [topic], config.topic_partitions, topic_config=LOG_APPEND)
        loop = spawn_loop("relay", config, origin)
        loop.go.set()
        bp.prefill_outbox(dsn, warm)
        wait_for("relay warm-up", lambda: published_through(dsn, origin) >= len(warm), 120, 0.05)
        stop = lambda: end_loop(loop)  # noqa: E731
    else:
        topic = f"{config.topic_prefix}.debezium.outbox"
        kafka.ensure_topics(settings, [topic], 1, topic_config=LOG_APPEND)
        name = f"{config.topic_prefix}-dbz"
        connector = debezium_config(name, dsn, topic, dbs.debezium_batch)
        start_connector(worker, name, connector, dsn)
        consumer = confluent_kafka.Consumer({"bootstrap.servers": dbs.where.bootstrap, "group.id": "bench-peers-w"})
        bp.prefill_outbox(dsn, warm)
        wait_for("Debezium warm-up", lambda: end_offset(consumer, topic) >= len(warm), 120, 0.05)
        consumer.close()
        stop = lambda: stop_connector(worker, name, dsn, connector["slot.name"])  # noqa: E731
    try:
        with psycopg.connect(dsn) as conn:
            k = writer.per_tick
            achieved = writer.run(lambda i: _copy_outbox(conn, events[i * k:(i + 1) * k]))
        times = read_append_times(dbs.where.bootstrap, topic, len(warm) + len(events), timeout=max(120, seconds * 6))
    finally:
        stop()
    lags = [times[e.key.encode()] - writer.commits[i // writer.per_tick] for i, e in enumerate(events)]
    return {"rate_wanted": rate, "rate_achieved": achieved, "seconds": seconds, "writer_behind_max_s": writer.behind_s,
            **lag_stats(lags)}


# --- apply: reconciler vs logical replication -----------------------------------------------------------


def last_note_visible(dsn: str, change: Change) -> Any:
    conn = psycopg.connect(dsn, autocommit=True)

    def check() -> bool:
        row = conn.execute("SELECT note FROM public.orders WHERE id = %s", (change.key,)).fetchone()
        return bool(row and row[0] == change.values["note"])

    check.conn = conn  # type: ignore[attr-defined]
    return check


def any_row(dsn: str) -> bool:
    return bool(bp.scalar(dsn, "SELECT EXISTS (SELECT 1 FROM public.orders)"))


def apply_rates(n: int, batch: int, started: float, first: float, done: float) -> dict[str, Any]:
    """Rows/s two ways: from the clock's start (so with the applier's start-up: a process,
    a consumer group join, or a subscription worker), and over the drain, from the first
    transaction visible (``batch`` rows, on both sides) to the last; the drain is the
    headline figure, start-up is a once-per-restart cost."""
    drain = done - first
    rows_per_s = (n - batch) / drain if n > 2 * batch and drain > 0 else n / (done - started)
    return {"rows": n, "seconds": done - started, "startup_s": first - started, "drain_s": drain,
            "rows_per_s": rows_per_s, "rows_per_s_with_startup": n / (done - started)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(dsn: str) -> float:
    """CPU time of a PostgreSQL server's postmaster and its live children (backends,
    background processes): what its share of a measurement cost, read before and after."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    postmaster = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return total


def apply_reconciler(dbs: Databases, changes: list[Change], workers: int = 1) -> dict[str, Any]:
    config = dbs.reconciler(workers)
    origin, dest = REGIONS
    events = change_events(changes, origin, time.time_ns() // 1_000_000 - 120_000)
    # the events reach Kafka first, through the relay (not timed here: that is the relay figure)
    relay = spawn_loop("relay", config, origin)
    relay.go.set()
    bp.prefill_outbox(config.region(origin).dsn, events)
    wait_for("relay of the apply events", lambda: published_through(config.region(origin).dsn, origin) >= len(events),
             max(300, len(events) / 500), 0.05)
    end_loop(relay)
    inbox = spawn_loop("inbox", config, dest, origin)
    check = last_note_visible(config.region(dest).dsn, changes[-1])
    try:
        dsn = config.region(dest).dsn
        python_before, server_before = cpu_seconds(inbox.proc.pid), server_cpu_seconds(dsn)
        started = time.time()
        inbox.go.set()
        first = wait_for("reconciler's first applied batch", lambda: any_row(dsn), 120)
        done = wait_for("reconciler apply", check, max(300, len(changes) / 200))
        cpu = {"inbox_process_cpu_s": cpu_seconds(inbox.proc.pid) - python_before,
               "destination_server_cpu_s": server_cpu_seconds(dsn) - server_before}
    finally:
        check.conn.close()
        end_loop(inbox)
    inbox_rows = bp.scalar(dsn, "SELECT count(*) FROM reconciler.inbox")
    if inbox_rows != len(changes):
        raise RuntimeError(f"reconciler apply: {inbox_rows} inbox rows, expected {len(changes)}")
    return {**apply_rates(len(changes), config.apply_batch_size, started, first, done),
            "inbox_rows": inbox_rows, "checksum": checksum(dsn), "workers": workers, **cpu,
            "cpu_us_per_row": {"inbox_process": cpu["inbox_process_cpu_s"] / len(changes) * 1e6,
                               "destination_server": cpu["destination_server_cpu_s"] / len(changes) * 1e6}}


def subscribe(tag: str, dsns: dict[str, str], enabled: bool) -> None:
    origin, dest = REGIONS
    with psycopg.connect(dsns[origin], autocommit=True) as conn:
        conn.execute(f'CREATE PUBLICATION "{tag}" FOR TABLE public.orders')
    info = psycopg.conninfo.conninfo_to_dict(dsns[origin])
    source = f"host={info.get('host', '127.0.0.1')} port={info.get('port', 5432)} dbname={info['dbname']} " \
             f"user={info.get('user', 'postgres')}"
    with psycopg.connect(dsns[dest], autocommit=True) as conn:
        conn.execute(f"CREATE SUBSCRIPTION \"{tag}\" CONNECTION '{source}' PUBLICATION \"{tag}\""
                     f" WITH (copy_data = false, enabled = {'true' if enabled else 'false'})")


def unsubscribe(tag: str, dsns: dict[str, str]) -> None:
    with psycopg.connect(dsns[REGIONS[1]], autocommit=True) as conn:
        conn.execute(f'DROP SUBSCRIPTION IF EXISTS "{tag}"')  # drops its slot on the publisher too


def apply_logical(dbs: Databases, changes: list[Change], batch: int) -> dict[str, Any]:
    tag, dsns = dbs.plain()
    origin, dest = REGIONS
    subscribe(tag, dsns, enabled=False)
    try:
        write_changes(dsns[origin], changes, batch)
        check = last_note_visible(dsns[dest], changes[-1])
        try:
            server_before = server_cpu_seconds(dsns[dest])
            with psycopg.connect(dsns[dest], autocommit=True) as conn:
                started = time.time()
                conn.execute(f'ALTER SUBSCRIPTION "{tag}" ENABLE')
            first = wait_for("the subscription's first transaction", lambda: any_row(dsns[dest]), 120)
            done = wait_for("logical replication", check, max(300, len(changes) / 200))
            server_cpu = server_cpu_seconds(dsns[dest]) - server_before
        finally:
            check.conn.close()
        source, copied = checksum(dsns[origin]), checksum(dsns[dest])
    finally:
        unsubscribe(tag, dsns)
    if source != copied:
        raise RuntimeError(f"logical replication: subscriber {copied} != publisher {source}")
    return {**apply_rates(len(changes), batch, started, first, done), "checksum": copied,
            "destination_server_cpu_s": server_cpu,
            "cpu_us_per_row": {"destination_server": server_cpu / len(changes) * 1e6}}


class MarkerWatch:
    """Polls the marker row on the destination; records when each tick's value first shows."""

    def __init__(self, dsn: str, ticks: int) -> None:
        self.dsn, self.seen = dsn, [0.0] * ticks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> MarkerWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                upto = 0
                while upto < len(self.seen) and not self._stop.is_set():
                    row = conn.execute("SELECT total_cents FROM public.orders WHERE id = 'lagmark'").fetchone()
                    value = int(row[0]) if row else 0
                    now = time.time()
                    while upto < min(value, len(self.seen)):
                        self.seen[upto] = now
                        upto += 1
                    time.sleep(POLL_S)
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"marker poller failed: {self.error}")
        if self._thread.is_alive():
            raise RuntimeError(f"destination showed {sum(1 for s in self.seen if s)} of {len(self.seen)} marker"
                               f" ticks after {timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def marker_values(tick: int) -> dict[str, Any]:
    return {"id": "lagmark", "customer": "marker", "status": "tick", "total_cents": tick + 1, "note": None}


def apply_lag_logical(dbs: Databases, rate: int, seconds: float) -> dict[str, Any]:
    tag, dsns = dbs.plain()
    origin, dest = REGIONS
    writer = SteadyWriter(rate, seconds)
    changes = order_changes(writer.count * writer.per_tick, seed=13)
    subscribe(tag, dsns, enabled=True)
    try:
        # the marker row goes through the subscription too (copy_data is off), so its arrival
        # also says the subscription streams
        with psycopg.connect(dsns[origin]) as conn:
            conn.execute("INSERT INTO public.orders (id, customer, status, total_cents)"
                         " VALUES ('lagmark', 'm', 't', 0)")
            conn.commit()
        wait_for("the subscription to copy the marker", lambda: bp.scalar(
            dsns[dest], "SELECT count(*) FROM public.orders WHERE id = 'lagmark'") == 1, 120, 0.05)
        k = writer.per_tick
        with MarkerWatch(dsns[dest], writer.count) as watch, psycopg.connect(dsns[origin]) as conn:
            def tick(i: int) -> None:
                with conn.cursor() as cur:
                    chunk = changes[i * k:(i + 1) * k]
                    ins = [c.row() for c in chunk if c.insert]
                    upd = [c.row()[1:] + (c.key,) for c in chunk if not c.insert]
                    if ins:
                        cur.executemany(f"INSERT INTO public.orders ({ORDER_COLS}) VALUES (%s, %s, %s, %s, %s)", ins)
                    if upd:
                        cur.executemany("UPDATE public.orders SET customer = %s, status = %s, total_cents = %s,"
                                        " note = %s WHERE id = %s", upd)
                    cur.execute("UPDATE public.orders SET total_cents = %s WHERE id = 'lagmark'", (i + 1,))
                conn.commit()

            achieved = writer.run(tick)
            watch.wait(max(120, seconds * 6))
            lags = [s - c for s, c in zip(watch.seen, writer.commits, strict=True)]
    finally:
        unsubscribe(tag, dsns)
    return {"rate_wanted": rate, "rate_achieved": achieved, "seconds": seconds,
            "writer_behind_max_s": writer.behind_s, **lag_stats(lags)}


def apply_lag_reconciler(dbs: Databases, rate: int, seconds: float) -> dict[str, Any]:
    """The whole pipeline: origin outbox -> relay -> Kafka -> destination inbox -> apply."""
    config = dbs.reconciler()
    origin, dest = REGIONS
    writer = SteadyWriter(rate, seconds)
    k = writer.per_tick
    changes = order_changes(writer.count * k, seed=13)
    # one marker change per tick, numbered into the same causal history
    stream: list[Change] = [Change(0, "lagmark", True, marker_values(-1))]
    for i in range(writer.count):
        for c in changes[i * k:(i + 1) * k]:
            stream.append(Change(len(stream), c.key, c.insert, c.values))
        stream.append(Change(len(stream), "lagmark", False, marker_values(i)))
    events = change_events(stream, origin, time.time_ns() // 1_000_000 - 120_000)
    relay = spawn_loop("relay", config, origin)
    inbox = spawn_loop("inbox", config, dest, origin)
    try:
        relay.go.set()
        inbox.go.set()
        bp.prefill_outbox(config.region(origin).dsn, events[:1])
        wait_for("the pipeline to apply the marker", lambda: bp.scalar(
            config.region(dest).dsn, "SELECT count(*) FROM public.orders WHERE id = 'lagmark'") == 1, 120, 0.05)
        with MarkerWatch(config.region(dest).dsn, writer.count) as watch, \
                psycopg.connect(config.region(origin).dsn) as conn:
            per = k + 1
            achieved = writer.run(lambda i: _copy_outbox(conn, events[1 + i * per:1 + (i + 1) * per]))
            watch.wait(max(120, seconds * 6))
            lags = [s - c for s, c in zip(watch.seen, writer.commits, strict=True)]
    finally:
        end_loop(inbox)
        end_loop(relay)
    return {"rate_wanted": rate, "rate_achieved": achieved, "seconds": seconds,
            "writer_behind_max_s": writer.behind_s, **lag_stats(lags)}


# --- raw ceilings (bench_pipeline's, reused) --------------------------------------------------------


def ceilings(dbs: Databases, n: int, batch: int) -> dict[str, Any]:
    config = dbs.reconciler()
    origin, dest = REGIONS
    events = bp.make_events(n, origin)
    messages = [(e.key.encode(), wire.encode(e)) for e in events]
    producer = bp.bench_producer_ceiling(config, origin, messages)
    rows = [tuple(e.payload["values"][c] for c in bp.ORDER_COLUMNS) for e in events]
    # make_events updates every key it inserted: a batch over half of N would upsert a key twice
    batch = min(batch, max(1, n // 2))
    _tag, dsns = dbs.plain()
    upserts = {name: n / bp.bench_insert_ceiling(dsns[dest], rows, batch, method)
               for name, method in bp.RAW_METHODS.items()}
    best = max(upserts, key=lambda k: upserts[k])
    return {"producer_eps": producer["events_per_s"], "upsert_rps": upserts[best], "upsert_method": best,
            "upsert_all_rps": upserts}


# --- the run ----------------------------------------------------------------------------------------


def machine(where: Place, libs: Path) -> dict[str, Any]:
    dsn = where.dsn[REGIONS[0]]
    settings = {name: bp.scalar(dsn, f"SHOW {name}") for name in
                ("server_version", "wal_level", "shared_buffers", "synchronous_commit", "fsync")}
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        uptime = ""
    return {
        "cpus": os.cpu_count(),
        "uptime_before": uptime,
        "load_avg_before": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": settings,
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka_connect_jars": sorted(p.name for p in libs.glob("connect-runtime-*.jar")),
        "debezium_jars": sorted(p.name for p in libs.glob("debezium-connector-postgres-*.jar")),
        "note": "shared 2-core machine: other engineers' tests ran meanwhile (see the load averages)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="N outbox rows and N row changes (issue: 200,000)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--json-out", default=str(HERE / "results" / "peers.json"))
    p.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR"),
                   help="a running `reconciler dev up` stack (default: env RECONCILER_DEV_DIR; none: own broker)")
    p.add_argument("--port-base", type=int, default=0,
                   help="own servers on P, P+1, Connect on P+2, own broker on P+3/P+4 (default: broker port + 20)")
    p.add_argument("--relay-rate", default="5000,1000",
                   help="rows/s for the relay lag, comma-separated (the issue's is 5,000; the first one is the"
                        " headline)")
    p.add_argument("--apply-rate", type=int, default=1000, help="row changes/s for the apply lag")
    p.add_argument("--apply-workers", default="1",
                   help="comma list of apply.workers to measure apply with, e.g. 1,2,4; the first is the headline")
    p.add_argument("--apply-only", action="store_true",
                   help="measure apply (and its lag) only: no Kafka Connect worker, no relay figures")
    p.add_argument("--lag-seconds", type=float, default=10.0, help="how long each steady-rate phase writes")
    p.add_argument("--relay-batch", type=int, default=5000)
    p.add_argument("--apply-batch", type=int, default=DEFAULT_APPLY_BATCH)
    p.add_argument("--debezium-defaults", action="store_true",
                   help="Debezium's own batch size, queue size and poll interval instead of the relay's")
    p.add_argument("--jvm-warm-up", type=int, default=20_000,
                   help="outbox rows Debezium relays once, not counted, before the first round (0: none)")
    p.add_argument("--no-ceilings", action="store_true", help="skip the raw producer / upsert ceilings")
    p.add_argument("--keep", action="store_true", help="keep the benchmark databases and topics")
    p.add_argument("--resolve-only", action="store_true",
                   help="only resolve Connect's and Debezium's jars (once), print where, and exit")
    args = p.parse_args(argv)
    n = args.events
    relay_rates = [int(r) for r in str(args.relay_rate).split(",") if r.strip()]
    workers = [int(w) for w in str(args.apply_workers).split(",") if w.strip()]
    timings: dict[str, float] = {}

    libs, maven_s = resolve_connect_libs(cache_dir() / "bench-peers-connect" / "libs")
    timings["maven_resolve_s"] = maven_s
    if args.resolve_only:
        print(f"{libs} ({sum(1 for _ in libs.glob('*.jar'))} jars; Maven took {maven_s:.0f} s)")
        return 0
    warm_n = min(5000, max(100, n // 10))
    relay_events = outbox_events(n, REGIONS[0], "r", seed=3)
    warm_events = outbox_events(warm_n, REGIONS[0], "w", seed=4)
    changes = order_changes(n)
    rounds: list[dict[str, Any]] = []
    with place(args) as where:
        where_dsn = where.dsn[REGIONS[0]]
        info = machine(where, libs)
        log(f"peer benchmark: {n:,} events, {args.runs} run(s), {info['cpus']} cpus, {info['uptime_before']}")
        worker = ConnectWorker(libs, where.workdir, where.bootstrap, where.connect_port)
        try:
            if not args.apply_only:
                timings["connect_start_s"] = worker.start()
            dbs = Databases(where, args.keep, args.relay_batch, args.apply_batch)
            if args.debezium_defaults:
                dbs.debezium_batch = None
            try:
                if args.jvm_warm_up and not args.apply_only:
                    # a JVM starts interpreted and compiles the hot code as it runs: without this
                    # the first Debezium measurement is partly of the compilers (seen: 0.7k ev/s in a
                    # first round, 20k in the next, same worker)
                    t0 = time.perf_counter()
                    warmed = relay_debezium(dbs, worker, relay_events[:args.jvm_warm_up], warm_events[:100])
                    timings["debezium_jvm_warm_up_s"] = time.perf_counter() - t0
                    log(f"  (Debezium warm-up pass, not counted: {warmed['events_per_s']:,.0f} ev/s)")
                for rnd in range(args.runs):
                    log(f"run {rnd + 1}/{args.runs}")
                    r: dict[str, Any] = {"run": rnd + 1, "load_avg": list(os.getloadavg())}
                    ours_first = rnd % 2 == 0
                    t0 = time.perf_counter()
                    for side in ("reconciler", "debezium") if ours_first else ("debezium", "reconciler"):
                        if args.apply_only:
                            break
                        if side == "reconciler":
                            r["relay_reconciler"] = relay_reconciler(dbs, relay_events, warm_events)
                        else:
                            r["relay_debezium"] = relay_debezium(dbs, worker, relay_events, warm_events)
                        log(f"  relay {side:<12} {r['relay_' + side]['events_per_s']:>10,.0f} ev/s")
                    for i, rate in enumerate([] if args.apply_only else relay_rates):
                        for side in ("reconciler", "debezium") if ours_first else ("debezium", "reconciler"):
                            key = f"relay_lag_{side}" + (f"_{rate}" if i else "")
                            r[key] = relay_lag(dbs, worker if side == "debezium" else None, rate, args.lag_seconds)
                            lag = r[key]
                            log(f"  relay lag {side:<8} p50 {lag['p50_ms']:.0f} ms, p99 {lag['p99_ms']:.0f} ms"
                                f" at {lag['rate_achieved']:,.0f} rows/s (wanted {rate:,})")
                    r["relay_seconds"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    for side in ("reconciler", "logical") if ours_first else ("logical", "reconciler"):
                        if side == "reconciler":
                            for w in workers:
                                key = "apply_reconciler" + ("" if w == workers[0] else f"_w{w}")
                                r[key] = apply_reconciler(dbs, changes, w)
                                log(f"  apply reconciler, {w} worker(s) {r[key]['rows_per_s']:>10,.0f} rows/s")
                        else:
                            r["apply_logical"] = apply_logical(dbs, changes, args.apply_batch)
                            log(f"  apply logical      {r['apply_logical']['rows_per_s']:>10,.0f} rows/s")
                    for w in workers:
                        key = "apply_reconciler" + ("" if w == workers[0] else f"_w{w}")
                        if r[key]["checksum"] != r["apply_logical"]["checksum"]:
                            raise RuntimeError(f"reconciler ({w} workers) and logical replication left different"
                                               f" orders tables: {r[key]['checksum']} vs"
                                               f" {r['apply_logical']['checksum']}")
                    for side in ("reconciler", "logical") if ours_first else ("logical", "reconciler"):
                        fn = apply_lag_reconciler if side == "reconciler" else apply_lag_logical
                        r["apply_lag_" + side] = fn(dbs, args.apply_rate, args.lag_seconds)
                        lag = r["apply_lag_" + side]
                        log(f"  apply lag {side:<8} p50 {lag['p50_ms']:.0f} ms, p99 {lag['p99_ms']:.0f} ms"
                            f" at {lag['rate_achieved']:,.0f} rows/s")
                    r["apply_seconds"] = time.perf_counter() - t0
                    if not args.no_ceilings:
                        t0 = time.perf_counter()
                        r["ceilings"] = ceilings(dbs, n, args.apply_batch)
                        r["ceilings_seconds"] = time.perf_counter() - t0
                        log(f"  raw producer {r['ceilings']['producer_eps']:>10,.0f} ev/s,"
                            f" raw upsert {r['ceilings']['upsert_rps']:>10,.0f} rows/s")
                    rounds.append(r)
            finally:
                dbs.cleanup()
        finally:
            if not args.apply_only:
                worker.stop()

    def med(key: str, metric: str) -> float:
        value = median([r[key][metric] for r in rounds])
        assert value is not None
        return value

    relay: dict[str, Any] | None = None
    if not args.apply_only:
        relay = {"reconciler_eps": med("relay_reconciler", "events_per_s"),
                 "debezium_eps": med("relay_debezium", "events_per_s")}
        relay["ratio"] = relay["reconciler_eps"] / relay["debezium_eps"]
        relay["lag"] = {side: {m: med(f"relay_lag_{side}", m) for m in ("p50_ms", "p99_ms", "rate_achieved")}
                        for side in ("reconciler", "debezium")}
        relay["lag"]["rate_wanted"] = relay_rates[0]
        relay["lag_at_other_rates"] = {
            str(rate): {side: {m: med(f"relay_lag_{side}_{rate}", m) for m in ("p50_ms", "p99_ms", "rate_achieved")}
                        for side in ("reconciler", "debezium")} for rate in relay_rates[1:]}
        relay["events_moved"] = {"reconciler": rounds[-1]["relay_reconciler"]["events"],
                                 "debezium": rounds[-1]["relay_debezium"]["events"]}
    apply = {"reconciler_rps": med("apply_reconciler", "rows_per_s"),
             "logical_replication_rps": med("apply_logical", "rows_per_s")}
    apply["ratio"] = apply["reconciler_rps"] / apply["logical_replication_rps"]
    apply["lag"] = {side: {m: med(f"apply_lag_{side}", m) for m in ("p50_ms", "p99_ms", "rate_achieved")}
                    for side in ("reconciler", "logical")}
    apply["lag"]["rate_wanted"] = args.apply_rate
    apply["rows_moved"] = {"reconciler": rounds[-1]["apply_reconciler"]["rows"],
                           "logical_replication": rounds[-1]["apply_logical"]["rows"]}
    apply["workers"] = workers[0]
    # the same changes applied with each apply.workers, against the same logical replication runs
    apply["by_workers"] = {
        str(w): {"reconciler_rps": (rps := med("apply_reconciler" + ("" if w == workers[0] else f"_w{w}"),
                                             "rows_per_s")),
                 "ratio": rps / apply["logical_replication_rps"]}
        for w in workers}
    doc: dict[str, Any] = {
        "benchmark": "peers",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": n,
        "relay": relay,
        "apply": apply,
        "machine": {**info, "load_avg_after": list(os.getloadavg())},
        "runs": len(rounds),
        "rounds": rounds,
        "timings": timings,
        "settings": {"relay_batch": args.relay_batch, "apply_batch": args.apply_batch, "warm_up_events": warm_n,
                     "lag_seconds": args.lag_seconds, "debezium_jvm_warm_up_events": args.jvm_warm_up,
                     "debezium": {k: v for k, v in debezium_config(
                         "name", where_dsn, "topic", None if args.debezium_defaults else args.relay_batch).items()
                         if not k.startswith("database.")},
                     "connect": "standalone worker, defaults but StringConverter and offsets flushed every 1 s",
                     "logical_replication": "CREATE SUBSCRIPTION defaults, copy_data = false"},
    }
    if not args.no_ceilings:
        doc["ceilings"] = {"producer_eps": med("ceilings", "producer_eps"), "upsert_rps": med("ceilings", "upsert_rps"),
                           "relay_ratio": relay["reconciler_eps"] / med("ceilings", "producer_eps") if relay else None,
                           "apply_ratio": apply["reconciler_rps"] / med("ceilings", "upsert_rps")}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\npeers, {n:,} events, median of {len(rounds)} run(s) ({info['cpus']} cpus; {info['uptime_before']})")
    if relay:
        print(f"relay  reconciler {relay['reconciler_eps']:>9,.0f} ev/s   Debezium {relay['debezium_eps']:>9,.0f} ev/s"
              f"   ratio {relay['ratio']:.2f}")
    for lags in (relay["lag"], *relay["lag_at_other_rates"].values()) if relay else ():
        for side in ("reconciler", "debezium"):
            lag = lags[side]
            print(f"  lag {side:<10} p50 {lag['p50_ms']:>7.0f} ms  p99 {lag['p99_ms']:>7.0f} ms"
                  f"  at {lag['rate_achieved']:,.0f} rows/s")
    print(f"apply  reconciler {apply['reconciler_rps']:>9,.0f} rows/s logical {apply['logical_replication_rps']:>9,.0f}"
          f" rows/s ratio {apply['ratio']:.2f}")
    for w, figures in apply["by_workers"].items():
        print(f"  apply.workers {w:>2}: {figures['reconciler_rps']:>9,.0f} rows/s  ratio {figures['ratio']:.2f}")
    for side in ("reconciler", "logical"):
        lag = apply["lag"][side]
        print(f"  lag {side:<10} p50 {lag['p50_ms']:>7.0f} ms  p99 {lag['p99_ms']:>7.0f} ms"
              f"  at {lag['rate_achieved']:,.0f} rows/s")
    if "ceilings" in doc:
        print(f"raw producer {doc['ceilings']['producer_eps']:,.0f} ev/s,"
              f" raw upsert {doc['ceilings']['upsert_rps']:,.0f} rows/s")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
