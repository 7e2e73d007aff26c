"""Every sidecar loop keeps ``reconciler_loop_last_success_timestamp_seconds`` fresh while
it is healthy, idle ones included, and lets it age while it fails.

ReconcilerLoopStalled (config/prometheus/alerts.yml) fires on a stamp older than five
minutes, so a loop that only stamps when it has work (catch-up, retention) would page
on a healthy idle region, and a loop that never stamps would never be caught.
No database or broker: the loops' database calls are replaced by fakes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from reconciler import lifecycle_loop
from reconciler import prune as prune_module
from reconciler import sidecar as sidecar_module
from reconciler.config import Config, RegionConfig, RetentionConfig
from reconciler.errors import StoreUnavailable
from reconciler.lifecycle import RegionStatus, State
from reconciler.loop import Pause, SupervisedLoop
from reconciler.sidecar import Sidecar

METRIC = "reconciler_loop_last_success_timestamp_seconds"


def make_sidecar(retention: RetentionConfig) -> Sidecar:
    config = Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={
            "us-east": RegionConfig("us-east", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
            "eu-west": RegionConfig("eu-west", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
        },
        tables={},
        kafka={"bootstrap.servers": "127.0.0.1:1"},
        retention=retention,
    )
    return Sidecar(config, "us-east")


def stamp(sidecar: Sidecar, component: str) -> float | None:
    return sidecar.metrics.registry.get_sample_value(METRIC, {"component": component, "region": "us-east"})


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def advances(sidecar: Sidecar, component: str) -> bool:
    """True when the stamp moves forward within a second (it is refreshed, not just set once)."""
    wait_for(lambda: stamp(sidecar, component) is not None, f"a first {component} stamp")
    first = stamp(sidecar, component)
    assert first is not None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        now = stamp(sidecar, component)
        if now is not None and now > first:
            return True
        time.sleep(0.01)
    return False


@contextmanager
def running(sidecar: Sidecar, loop: str) -> Iterator[None]:
    thread = threading.Thread(target=sidecar.run_loop, args=(loop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        sidecar.stop.set()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture(autouse=True)
def quick_idle_stamps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sidecar_module, "IDLE_STAMP_SECONDS", 0.02)


def test_a_loop_is_stamped_when_it_starts_so_one_that_never_succeeds_still_ages() -> None:
    sidecar = make_sidecar(RetentionConfig())

    class NeverCompletes:
        def start(self) -> None:
            sidecar.stop.wait()

        def step(self) -> Pause:
            raise AssertionError("never reached")

        def close(self) -> None:
            pass

    thread = sidecar._start(SupervisedLoop("stats", NeverCompletes(), sidecar.stop, log=sidecar.log,
                                           metrics=sidecar.metrics))
    try:
        wait_for(lambda: stamp(sidecar, "stats") is not None, "the start stamp")
        assert abs((stamp(sidecar, "stats") or 0) - time.time()) < 5
    finally:
        sidecar.stop.set()
        thread.join(5)


def test_disabled_retention_keeps_stamping_while_it_idles() -> None:
    sidecar = make_sidecar(RetentionConfig(keep_hours=None))
    with running(sidecar, "retention"):
        assert advances(sidecar, "retention")


def test_retention_stamps_between_passes_only_while_its_last_pass_succeeded(monkeypatch: pytest.MonkeyPatch) -> None:
    outcome: dict[str, Any] = {"fail": False, "passes": 0}

    def prune(*_args: object, **_kwargs: object) -> None:
        outcome["passes"] += 1
        if outcome["fail"]:
            raise StoreUnavailable("database unreachable", region="us-east")

    monkeypatch.setattr(prune_module, "prune_region", prune)
    sidecar = make_sidecar(RetentionConfig(keep_hours=1.0, interval_seconds=1.2))
    with running(sidecar, "retention"):
        # before the first pass (one interval, longer than advances() waits) and after good ones
        assert advances(sidecar, "retention")
        wait_for(lambda: outcome["passes"] >= 1, "a first pass")
        assert advances(sidecar, "retention")
        # once a pass fails, the stamp stays where the last good one left it
        outcome["fail"] = True
        failed_from = outcome["passes"]
        wait_for(lambda: outcome["passes"] >= failed_from + 2, "two failing passes")
        assert not advances(sidecar, "retention")


class _FakeDb:
    """Stands for store.reconnecting.Reconnecting: answers region_status with a set state."""

    def __init__(self, status: RegionStatus | None) -> None:
        self.status = status

    def run(self, _query: object) -> RegionStatus | None:
        return self.status

    def close(self) -> None:
        pass


def test_catch_up_loop_stamps_while_there_is_nothing_to_catch_up(monkeypatch: pytest.MonkeyPatch) -> None:
    active = RegionStatus("us-east", State.ACTIVE, 1, "test")
    monkeypatch.setattr(lifecycle_loop, "Reconnecting", lambda *a, **k: _FakeDb(active))
    sidecar = make_sidecar(RetentionConfig())
    sidecar.recover = lambda *a, **k: pytest.fail("an ACTIVE region must not be recovered")
    sidecar.view.status = active
    with running(sidecar, "replay"):
        assert advances(sidecar, "replay")


def test_catch_up_loop_stamps_when_the_gate_refuses_but_not_while_its_database_is_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catching_up = RegionStatus("us-east", State.CATCHING_UP, 1, "test")
    db = _FakeDb(catching_up)
    monkeypatch.setattr(lifecycle_loop, "Reconnecting", lambda *a, **k: db)
    calls: list[int] = []

    def refused(*_args: object, **_kwargs: object) -> SimpleNamespace:
        calls.append(1)
        return SimpleNamespace(state="VERIFYING")

    sidecar = make_sidecar(RetentionConfig())
    sidecar.recover = refused
    sidecar.view.status = catching_up
    with running(sidecar, "replay"):
        wait_for(lambda: bool(calls) and stamp(sidecar, "replay") is not None, "a refused catch-up")
        db.status = None  # the database stops answering
        time.sleep(0.6)  # the loop's own poll period, so a stamp in flight lands first
        assert not advances(sidecar, "replay")
