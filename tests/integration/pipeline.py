"""Helpers for integration tests of the replication pipeline on the real stack.

Each test gets its own databases (one per region, on that region's PostgreSQL
server) and its own Kafka topic prefix, so tests never see each other's events.
Loops run in-process on threads (``Cluster``) or as real `reconciler run`
processes (``SidecarProcess``) when a test must SIGKILL them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml

from reconciler import outbox
from reconciler.config import Config, load_config
from reconciler.drills.env import free_port
from reconciler.inbox import InboxConsumer
from reconciler.provision import migrate
from reconciler.relay import Relay

TABLES = {
    "orders": {"key": ["id"], "policy": "lww"},
    "inventory": {"key": ["sku"], "policy": "merge", "fields": {"stock": "counter", "tags": "set"}},
    "payments": {"key": ["id"], "policy": "manual"},
}


def admin_dsn(dsn: str, database: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + database


def make_env(stack: Any, tmp_path: Path, regions: tuple[str, ...] | None = None, **overrides: Any) -> Config:
    """Fresh databases + topic prefix + migrated schema; returns the loaded config."""
    tag = "t" + uuid.uuid4().hex[:10]
    chosen = regions or tuple(stack.regions)
    region_docs = {}
    for region in chosen:
        base = stack.dsn(region)
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{tag}"')
        region_docs[region] = {"dsn": admin_dsn(base, tag), "metrics_address": f"127.0.0.1:{free_port()}"}
    doc: dict[str, Any] = {
        "topic_prefix": tag,
        "hlc": {"max_offset_ms": 1000},
        "kafka": {"bootstrap.servers": stack.bootstrap_servers},
        "regions": region_docs,
        "tables": TABLES,
        "batch": {"relay": 500, "apply": 500},
    }
    doc.update(overrides)
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = load_config(path)
    migrate(config, demo_tables=True)
    return config


def connect(config: Config, region: str) -> psycopg.Connection[Any]:
    return psycopg.connect(config.region(region).dsn)


def rows(config: Config, region: str, table: str) -> dict[str, dict[str, Any]]:
    key = config.tables[table].key[0]
    with connect(config, region) as conn:
        found = conn.execute(f"SELECT {key}::text, to_jsonb(t) FROM public.{table} t").fetchall()
    return {k: v for k, v in found}


def write_orders(config: Config, region: str, count: int, prefix: str) -> None:
    """``count`` orders ``<prefix>0``.. written through the outbox, one transaction each."""
    with connect(config, region) as conn:
        for i in range(count):
            with conn.transaction():
                outbox.write(conn, "orders", "insert", {"id": f"{prefix}{i}"},
                             values={"customer": region, "status": "new", "total_cents": i})


def scalar(config: Config, region: str, query: str, params: Any = None) -> Any:
    with connect(config, region) as conn:
        row = conn.execute(query, params).fetchone()
    return row[0] if row else None


class Cluster:
    """Relay and inbox loops of several regions, on threads, each stoppable alone."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loops: dict[tuple[str, str], tuple[threading.Thread, threading.Event]] = {}
        self.errors: list[BaseException] = []

    def start(self, region: str, components: tuple[str, ...] = ("relay", "inbox")) -> None:
        for component in components:
            if (region, component) in self.loops:
                continue
            stop = threading.Event()
            worker: Any = Relay(self.config, region) if component == "relay" else InboxConsumer(self.config, region)

            def body(worker: Any = worker, stop: threading.Event = stop) -> None:
                try:
                    worker.run(stop)
                except BaseException as exc:  # noqa: BLE001 - surfaced by check()
                    self.errors.append(exc)

            thread = threading.Thread(target=body, daemon=True, name=f"{region}-{component}")
            thread.start()
            self.loops[(region, component)] = (thread, stop)

    def start_all(self) -> None:
        for region in self.config.regions:
            self.start(region)

    def stop(self, region: str, components: tuple[str, ...] = ("relay", "inbox")) -> None:
        for component in components:
            entry = self.loops.pop((region, component), None)
            if entry:
                entry[1].set()

    def stop_all(self) -> None:
        entries = list(self.loops.values())
        self.loops.clear()
        for _, stop in entries:
            stop.set()
        for thread, _ in entries:
            thread.join(30)

    def check(self) -> None:
        if self.errors:
            raise AssertionError(f"pipeline loop failed: {self.errors[0]!r}") from self.errors[0]


def outbox_count(config: Config, region: str) -> int:
    return int(scalar(config, region, "SELECT count(*) FROM reconciler.outbox"))


def published_through(config: Config, region: str) -> int:
    return int(scalar(config, region, "SELECT coalesce(max(published_through), 0) FROM reconciler.relay_state") or 0)


def inbox_count(config: Config, region: str, origin: str) -> int:
    return int(scalar(config, region, "SELECT count(*) FROM reconciler.inbox WHERE origin = %s", (origin,)))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fully_delivered(config: Config) -> bool:
    """Every region's outbox is published and applied by every other region."""
    for origin in config.regions:
        written = outbox_count(config, origin)
        if published_through(config, origin) != written:
            return False
        for dest in config.peers(origin):
            if inbox_count(config, dest, origin) != written:
                return False
    return True


class SidecarProcess:
    """A real `reconciler run` process, so a test can SIGKILL it."""

    def __init__(self, config: Config, region: str, log_path: Path) -> None:
        self.config = config
        self.region = region
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "run", "--config", str(self.config.path), "--region",
             self.region],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
