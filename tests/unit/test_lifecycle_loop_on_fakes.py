"""The sidecar's start decision, the lifecycle loop's own code, on in-memory stores:
a region that stopped badly, was away too long, or is empty beside peers that hold
rows goes through catch-up before it serves; one an operator fenced stays fenced."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler import outbox
from reconciler.config import Config, LifecycleConfig, RegionConfig, TableConfig
from reconciler.errors import StoreUnavailable
from reconciler.lifecycle import State
from reconciler.lifecycle_loop import LifecycleSteps
from reconciler.logs import component_logger
from reconciler.metrics import Metrics
from reconciler.region_view import LoopContext, RegionView
from reconciler.store.memory import MemoryRegionStore

HERE, PEER = "us-east", "eu-west"
TABLES = {"orders": TableConfig("orders", ("id",), "lww")}
THRESHOLD = 60.0


class Databases:
    """Each region's in-memory database; a region in ``down`` refuses connections."""

    def __init__(self) -> None:
        self.stores = {r: MemoryRegionStore(r, TABLES) for r in (HERE, PEER)}
        self.down: set[str] = set()

    def open(self, region: str, *, autocommit: bool = False) -> MemoryRegionStore:
        if region in self.down:
            raise StoreUnavailable("connection refused", region=region)
        return self.stores[region]


def decide(databases: Databases) -> LifecycleSteps:
    config = Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={r: RegionConfig(r, "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0") for r in (HERE, PEER)},
        tables=TABLES,
        kafka={"bootstrap.servers": "127.0.0.1:1"},
        lifecycle=LifecycleConfig(absence_threshold_seconds=THRESHOLD),
    )
    metrics = Metrics.create(HERE, peers=[PEER], tables=list(TABLES))
    ctx = LoopContext(config, HERE, metrics, threading.Event(), RegionView(metrics, fresh_for_seconds=60))
    steps = LifecycleSteps(ctx, component_logger("lifecycle", HERE), databases)
    steps.start()
    return steps


def ran_before(store: MemoryRegionStore, *, clean: bool, seconds_ago: float = 1.0) -> None:
    store.mark_alive(clean_stop=clean)
    at = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    store._state.lifecycle = replace(store.region_status(), last_alive_at=at)


def test_a_clean_recent_stop_serves_at_once() -> None:
    dbs = Databases()
    ran_before(dbs.stores[HERE], clean=True)
    steps = decide(dbs)
    assert dbs.stores[HERE].region_status().state is State.ACTIVE
    assert steps.ctx.view.active() and steps.ctx.view.fresh()
    assert dbs.stores[HERE].region_status().clean_stop is False  # a SIGKILL from now on shows next time


@pytest.mark.parametrize("clean, seconds_ago, why", [
    (False, 1.0, "unclean stop"),
    (True, THRESHOLD * 2, "absent"),
])
def test_a_bad_or_long_absence_goes_through_catch_up(clean: bool, seconds_ago: float, why: str) -> None:
    dbs = Databases()
    ran_before(dbs.stores[HERE], clean=clean, seconds_ago=seconds_ago)
    decide(dbs)
    status = dbs.stores[HERE].region_status()
    assert status.state is State.CATCHING_UP and why in status.reason


def test_a_fenced_region_waits_for_its_operator() -> None:
    dbs = Databases()
    dbs.stores[HERE].transition(State.FENCED, "operator", "test")
    ran_before(dbs.stores[HERE], clean=False)
    decide(dbs)
    assert dbs.stores[HERE].region_status().state is State.FENCED


@pytest.mark.parametrize("peer_rows, peer_down, expected", [
    (True, False, State.CATCHING_UP),
    (False, False, State.ACTIVE),
    (True, True, State.ACTIVE),  # an unreachable peer cannot say; nobody else here holds rows
])
def test_a_first_start_on_an_empty_database(peer_rows: bool, peer_down: bool, expected: State) -> None:
    dbs = Databases()
    if peer_rows:
        outbox.write(dbs.stores[PEER], "orders", "insert", {"id": 1}, values={"status": "new"})
    if peer_down:
        dbs.down.add(PEER)
    decide(dbs)
    status = dbs.stores[HERE].region_status()
    assert status.state is expected
    if expected is State.CATCHING_UP:
        assert "empty database" in status.reason


def test_after_an_outage_only_a_long_one_costs_a_catch_up() -> None:
    dbs = Databases()
    ran_before(dbs.stores[HERE], clean=True)
    steps = decide(dbs)
    ran_before(dbs.stores[HERE], clean=False, seconds_ago=5)  # a blip: the sidecar never stopped
    steps.decide_after_outage(dbs.stores[HERE])
    assert dbs.stores[HERE].region_status().state is State.ACTIVE
    ran_before(dbs.stores[HERE], clean=False, seconds_ago=THRESHOLD + 30)
    steps.decide_after_outage(dbs.stores[HERE])
    status = dbs.stores[HERE].region_status()
    assert status.state is State.CATCHING_UP and "out of reach" in status.reason
    assert time.monotonic() - steps.ctx.view.read_at < 5
