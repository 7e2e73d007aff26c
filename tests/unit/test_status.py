"""How `reconciler status` puts regions' answers together, without databases.

The collection half talks to PostgreSQL and is tested on the real stack
(tests/integration/test_sidecar.py); here the answers are given, so the rules
(lag against the origin or against what was seen, freshest heartbeat from a live
observer, DOWN regions, exit verdict) can be checked exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler.config import Config, HeartbeatConfig, RegionConfig
from reconciler.lifecycle import RegionStatus, State
from reconciler.status import _assemble, _Facts, render
from reconciler.store.health import InboxProgress, ManualQueue, OutboxBacklog, StoredPeerView

REGIONS = ("us-east", "eu-west", "ap-south")
SECRET = "hunter2-do-not-print"


def config() -> Config:
    return Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={
            r: RegionConfig(r, f"postgresql://app:{SECRET}@db.{r}.internal:5432/app", f"127.0.0.1:{9400 + i}")
            for i, r in enumerate(REGIONS)
        },
        tables={},
        kafka={"bootstrap.servers": "k:9092"},
        heartbeat=HeartbeatConfig(interval_seconds=0.5, suspect_after_seconds=2.0, failed_after_seconds=4.0),
    )


def view(peer: str, age: float | None, written_age: float = 0.2, skew: float | None = 1.0) -> StoredPeerView:
    return StoredPeerView(peer=peer, age_seconds=age, peer_wall_ms=None, peer_hlc=None, skew_ms=skew,
                          peer_state="ACTIVE", peer_epoch=1, view_state=None, written_age_seconds=written_age)


class FakeStore:
    """Answers the one read status makes late (an event's age): "not held"."""

    def event_age(self, origin: str, sequence: int) -> float | None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def kafka_retains_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reconciler.status.kafka.retained_sequences", lambda *_a, **_k: (1, 10**9))


def up(region: str, *, state: State = State.ACTIVE, relay_high: int = 10,
       applied: dict[str, tuple[int, int]] | None = None, views: list[StoredPeerView] | None = None) -> _Facts:
    progress = {
        origin: InboxProgress(origin, count, high, None, 0.5) for origin, (count, high) in (applied or {}).items()
    }
    return _Facts(
        region=region, dsn=f"postgresql://app:***@db.{region}.internal:5432/app",
        store=FakeStore(),  # type: ignore[arg-type]
        status=RegionStatus(region, state, 3, "because"),
        backlog=OutboxBacklog(0, 0.0), progress=progress, relay_high=relay_high,
        queue=ManualQueue({"orders": 0}, 0.0), quarantine=0,
        views={v.peer: v for v in views or []},
    )


def down(region: str) -> _Facts:
    return _Facts(region=region, dsn=f"postgresql://app:***@db.{region}.internal:5432/app",
                  error="PostgreSQL unreachable: connection refused")


def assemble(facts: dict[str, _Facts]) -> Any:
    return _assemble(config(), facts, [], kafka_timeout=1.0)


def healthy() -> dict[str, _Facts]:
    return {
        r: up(r, applied={o: (10, 10) for o in REGIONS if o != r},
              views=[view(p, 0.3) for p in REGIONS if p != r])
        for r in REGIONS
    }


def test_all_active_and_heard_is_ok() -> None:
    report = assemble(healthy())
    assert report.ok
    assert all(r.seen_as == "ACTIVE" for r in report.regions.values())
    assert report.to_dict()["problems"] == []
    assert "OK: every region ACTIVE and reachable" in render(report)


def test_a_down_region_is_a_row_with_its_redacted_dsn_and_error() -> None:
    facts = healthy()
    facts["ap-south"] = down("ap-south")
    for r in ("us-east", "eu-west"):
        facts[r].views["ap-south"] = view("ap-south", 6.0)
    report = assemble(facts)
    assert not report.ok
    south = report.regions["ap-south"]
    assert (south.reachable, south.seen_as) == (False, "FAILED")
    assert south.heartbeat_age_seconds == 6.0
    doc = report.to_dict()["regions"]["ap-south"]
    assert doc["state"] == "DOWN" and "connection refused" in doc["error"]
    text = render(report)
    assert "ap-south  DOWN" in text
    assert "unreachable: postgresql://app:***@db.ap-south.internal:5432/app" in text
    assert SECRET not in text and SECRET not in str(report.to_dict())


def test_lag_is_measured_against_the_origin_or_against_what_was_seen() -> None:
    facts = healthy()
    facts["us-east"].relay_high = 25  # us-east numbered 25; eu-west applied 10 of them
    facts["ap-south"].progress["us-east"] = InboxProgress("us-east", 12, 12, None, 0.5)
    report = assemble(facts)
    lag = report.regions["eu-west"].lag["us-east"]
    assert (lag.events, lag.measured_against, lag.origin_high) == (15, "origin", 25)
    facts["us-east"] = down("us-east")
    report = assemble(facts)
    lag = report.regions["eu-west"].lag["us-east"]
    # us-east cannot be asked: the best bound is ap-south's 12
    assert (lag.events, lag.measured_against, lag.origin_high) == (2, "seen", 12)
    assert "origin unreachable" in render(report)


def test_an_unapplied_tail_kafka_no_longer_holds_is_a_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    facts = healthy()
    facts["us-east"].relay_high = 30
    monkeypatch.setattr("reconciler.status.kafka.retained_sequences", lambda *_a, **_k: (21, 30))
    report = assemble(facts)
    lag = report.regions["eu-west"].lag["us-east"]
    # 11..20 expired before eu-west read them: a gap, not lag; 21..30 are still on their way
    assert (lag.events, lag.gaps, lag.expired) == (10, 10, 10)


def test_holes_count_as_gaps() -> None:
    facts = healthy()
    facts["eu-west"].progress["us-east"] = InboxProgress("us-east", 7, 10, None, 0.5)  # 3 holes below 10
    report = assemble(facts)
    assert report.regions["eu-west"].gaps == 3
    assert not report.ok


def test_events_a_region_lost_are_gaps_of_its_own() -> None:
    facts = healthy()
    facts["us-east"].relay_high = 6  # restored from a backup; peers applied up to 10
    report = assemble(facts)
    assert report.regions["us-east"].gaps == 4


def test_heartbeat_age_prefers_observers_whose_sidecar_runs() -> None:
    facts = healthy()
    facts["us-east"].views["ap-south"] = view("ap-south", 1.0, written_age=120.0)  # us-east's sidecar is gone
    facts["eu-west"].views["ap-south"] = view("ap-south", 3.0)
    report = assemble(facts)
    south = report.regions["ap-south"]
    assert (south.heartbeat_age_seconds, south.seen_as) == (3.0, "SUSPECT")
    assert south.seen_by["us-east"].stale
    assert "view stale" in render(report)
    assert any("peers see it SUSPECT" in p for p in report.to_dict()["problems"])


def test_skew_is_the_median_of_live_observers() -> None:
    facts = healthy()
    facts["us-east"].views["ap-south"] = view("ap-south", 0.2, skew=-40.0)
    facts["eu-west"].views["ap-south"] = view("ap-south", 0.2, skew=-60.0)
    assert assemble(facts).regions["ap-south"].skew_ms == pytest.approx(-50.0)


@pytest.mark.parametrize("state", [State.CATCHING_UP, State.FENCED, State.VERIFYING])
def test_a_region_not_active_is_not_ok(state: State) -> None:
    facts = healthy()
    facts["eu-west"].status = RegionStatus("eu-west", state, 4, "operator said so")
    report = assemble(facts)
    assert not report.ok
    assert f"{state.value}: operator said so" in render(report)


def test_never_heard_is_not_a_verdict() -> None:
    """Right after `dev up` no sidecar runs: status reports, but does not cry FAILED."""
    facts = {r: up(r, applied={o: (10, 10) for o in REGIONS if o != r}) for r in REGIONS}
    report = assemble(facts)
    assert report.ok
    assert all(r.heartbeat_age_seconds is None for r in report.regions.values())


def test_open_invariant_violations_are_counted_per_table_without_failing_status() -> None:
    facts = healthy()
    facts["eu-west"].violations = {"inventory": 2}
    report = assemble(facts)
    assert report.regions["eu-west"].to_dict()["violations_open"] == {"inventory": 2}
    assert report.regions["us-east"].to_dict()["violations_open"] == {}
    screen = render(report)
    assert "OPEN INVARIANT VIOLATIONS" in screen and "eu-west: inventory 2" in screen
    assert report.ok, "a business invariant is the services' to compensate, not a replication fault"
    assert "OPEN INVARIANT VIOLATIONS" not in render(assemble(healthy()))
