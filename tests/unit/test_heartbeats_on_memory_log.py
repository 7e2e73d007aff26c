"""The heartbeat loop's steps, run by two regions over the in-memory event log: each
judges the other from what arrives on the control channel, and a region whose
database does not answer falls silent rather than vouching for itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler import heartbeats
from reconciler.config import Config, HeartbeatConfig, RegionConfig
from reconciler.hlc import Timestamp
from reconciler.lifecycle import RegionStatus, State
from reconciler.logs import component_logger
from reconciler.metrics import Metrics
from reconciler.peers import ACTIVE, SUSPECT
from reconciler.region_view import LoopContext, RegionView
from reconciler.transport.memory import MemoryEventLog

REGIONS = ("us-east", "eu-west")


class FakeDb:
    """Stands for the heartbeat's reconnecting session, and the store it runs queries on:
    a stamp while ``up``."""

    def __init__(self) -> None:
        self.up = True
        self.error: str | None = None

    def run(self, query: Any) -> Any:
        if not self.up:
            self.error = "database unreachable"
            return None
        self.error = None
        return query(self)

    def hlc_now(self) -> Timestamp:
        return Timestamp(int(time.time() * 1000), 0)

    def save_peer_views(self, views: Any) -> None:
        pass  # nothing to save them to here

    def close(self) -> None:
        pass


def config() -> Config:
    return Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={r: RegionConfig(r, "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0") for r in REGIONS},
        tables={},
        kafka={"bootstrap.servers": "127.0.0.1:1"},
        heartbeat=HeartbeatConfig(interval_seconds=0.05, suspect_after_seconds=0.4, failed_after_seconds=5.0),
    )


def steps(region: str, log: MemoryEventLog, db: FakeDb, monkeypatch: pytest.MonkeyPatch) -> heartbeats.HeartbeatSteps:
    monkeypatch.setattr(heartbeats, "Reconnecting", lambda *_a, **_k: db)
    cfg = config()
    metrics = Metrics.create(region, peers=cfg.peers(region), tables=[])
    view = RegionView(metrics, fresh_for_seconds=60)
    view.publish(RegionStatus(region, State.ACTIVE, 1, "test"), component_logger("t", region))
    worker = heartbeats.HeartbeatSteps(LoopContext(cfg, region, metrics, threading.Event(), view),
                                       component_logger("heartbeat", region), log)
    worker.start()
    return worker


def run_for(seconds: float, *workers: heartbeats.HeartbeatSteps) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for worker in workers:
            worker.step()


def liveness(worker: heartbeats.HeartbeatSteps, peer: str) -> str:
    return worker.tracker.view(time.monotonic())[peer].liveness


def test_two_regions_see_each_other_and_a_region_without_its_database_goes_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = MemoryEventLog()
    east_db, west_db = FakeDb(), FakeDb()
    east = steps("us-east", log, east_db, monkeypatch)
    west = steps("eu-west", log, west_db, monkeypatch)
    try:
        run_for(0.3, east, west)
        assert liveness(east, "eu-west") == ACTIVE and liveness(west, "us-east") == ACTIVE
        assert west.tracker.view(time.monotonic())["us-east"].believed_state == State.ACTIVE.value

        east_db.up = False  # its heartbeats would vouch for a region that serves nothing
        run_for(0.8, east, west)
        assert east.withheld
        assert liveness(west, "us-east") == SUSPECT
        assert liveness(east, "eu-west") == ACTIVE  # the other way round nothing changed

        east_db.up = True
        run_for(0.3, east, west)
        assert not east.withheld and liveness(west, "us-east") == ACTIVE
    finally:
        east.close()
        west.close()


def test_no_heartbeat_goes_out_before_the_state_is_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    log = MemoryEventLog()
    east = steps("us-east", log, FakeDb(), monkeypatch)
    west = steps("eu-west", log, FakeDb(), monkeypatch)
    try:
        east.ctx.view.forget()  # the lifecycle loop has not read the state (yet, or again)
        run_for(0.6, east, west)
        assert liveness(west, "us-east") == SUSPECT
    finally:
        east.close()
        west.close()
