"""Peer failure detection and skew estimation (reconciler.peers), with time injected."""

from __future__ import annotations

import json

import pytest

from reconciler.peers import (
    ACTIVE,
    FAILED,
    SUSPECT,
    Heartbeat,
    PeerTracker,
    SkewEstimator,
    liveness,
)


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0.0, ACTIVE), (1.9, ACTIVE), (2.0, ACTIVE), (2.01, SUSPECT), (4.0, SUSPECT), (4.01, FAILED), (1e9, FAILED)],
)
def test_liveness_from_age(age: float, expected: str) -> None:
    assert liveness(age, suspect_after_seconds=2.0, failed_after_seconds=4.0) == expected


def test_liveness_is_monotonic_in_age() -> None:
    order = {ACTIVE: 0, SUSPECT: 1, FAILED: 2}
    ranks = [order[liveness(a / 10, 2.0, 4.0)] for a in range(100)]
    assert ranks == sorted(ranks)


def test_skew_first_sample_is_taken_as_is_then_smoothed() -> None:
    est = SkewEstimator(alpha=0.5)
    assert est.value_ms is None
    assert est.add(peer_wall_ms=1_000_100, received_wall_ms=1_000_000) == 100.0
    # a 20 ms slower delivery moves the estimate only half way
    assert est.add(peer_wall_ms=1_001_100, received_wall_ms=1_001_020) == 90.0
    assert est.add(peer_wall_ms=1_002_100, received_wall_ms=1_002_020) == 85.0


def test_skew_converges_to_a_constant_offset_and_damps_jitter() -> None:
    est = SkewEstimator(alpha=0.2)
    for i in range(200):
        jitter = 6 if i % 2 else -6  # delivery delay noise around a true offset of -250 ms
        est.add(peer_wall_ms=i * 500 - 250 + jitter, received_wall_ms=i * 500)
    assert est.value_ms is not None
    assert abs(est.value_ms - (-250)) < 2.0


def test_skew_resets_on_a_clock_step_instead_of_crawling() -> None:
    est = SkewEstimator(alpha=0.1, reset_ms=5_000)
    est.add(0, 0)
    est.add(1000, 1000)
    # the peer's clock was stepped 60 s ahead: the estimate follows at once
    assert est.add(62_000, 2000) == 60_000.0


def test_skew_rejects_a_meaningless_alpha() -> None:
    with pytest.raises(ValueError):
        SkewEstimator(alpha=0.0)


def beat(region: str, wall_ms: int, **more: object) -> Heartbeat:
    return Heartbeat(region=region, wall_ms=wall_ms, **more)  # type: ignore[arg-type]


def test_tracker_goes_active_suspect_failed_and_back() -> None:
    tracker = PeerTracker(["eu-west"], suspect_after_seconds=2.0, failed_after_seconds=4.0, started_mono=100.0)
    assert tracker.observe(beat("eu-west", 5_000, state="ACTIVE", epoch=3), received_mono=100.0,
                           received_wall_ms=5_010)
    states = {t: tracker.view(100.0 + t)["eu-west"].liveness for t in (0.5, 1.9, 2.5, 3.9, 4.5, 60)}
    assert states == {0.5: ACTIVE, 1.9: ACTIVE, 2.5: SUSPECT, 3.9: SUSPECT, 4.5: FAILED, 60: FAILED}
    tracker.observe(beat("eu-west", 70_000, state="ACTIVE", epoch=3), received_mono=170.0, received_wall_ms=70_000)
    view = tracker.view(170.2)["eu-west"]
    assert view.liveness == ACTIVE
    assert view.age_seconds == pytest.approx(0.2)
    assert view.last_heartbeat is not None and view.last_heartbeat.epoch == 3


def test_a_peer_never_heard_is_aged_from_the_observer_start() -> None:
    tracker = PeerTracker(["ap-south"], 2.0, 4.0, started_mono=10.0)
    early, late = tracker.view(11.0)["ap-south"], tracker.view(15.0)["ap-south"]
    assert (early.heard, early.liveness) == (False, ACTIVE)
    assert (late.heard, late.liveness) == (False, FAILED)
    assert late.skew_ms is None and late.last_heartbeat is None


def test_tracker_ignores_itself_strangers_and_older_heartbeats() -> None:
    tracker = PeerTracker(["eu-west"], 2.0, 4.0, started_mono=0.0)
    assert not tracker.observe(beat("us-east", 1), 0.0, 1)  # our own heartbeat
    assert not tracker.observe(beat("mars-1", 1), 0.0, 1)  # not in the config: label sets stay bounded
    assert tracker.observe(beat("eu-west", 10_000), 10.0, 10_000)
    # a redelivered old heartbeat must not make a silent peer look alive
    assert not tracker.observe(beat("eu-west", 9_000), 13.0, 13_000)
    assert tracker.view(13.0)["eu-west"].liveness == SUSPECT


def test_believed_state_reports_the_peer_own_state_only_while_it_is_heard() -> None:
    tracker = PeerTracker(["eu-west"], 2.0, 4.0, started_mono=0.0)
    tracker.observe(beat("eu-west", 1_000, state="CATCHING_UP"), 0.0, 1_000)
    assert tracker.view(1.0)["eu-west"].believed_state == "CATCHING_UP"
    assert tracker.view(3.0)["eu-west"].believed_state == SUSPECT
    assert tracker.view(9.0)["eu-west"].believed_state == FAILED


def test_skew_is_tracked_per_peer() -> None:
    tracker = PeerTracker(["eu-west", "ap-south"], 2.0, 4.0, started_mono=0.0)
    tracker.observe(beat("eu-west", 10_300), 0.0, 10_000)
    tracker.observe(beat("ap-south", 9_900), 0.0, 10_000)
    view = tracker.view(0.1)
    assert view["eu-west"].skew_ms == 300.0
    assert view["ap-south"].skew_ms == -100.0


def test_heartbeat_round_trips_and_tolerates_what_it_does_not_know() -> None:
    original = Heartbeat("us-east", 1_700_000_000_123, hlc=(1_700_000_000_123 << 16) + 4, state="ACTIVE",
                         epoch=7, outbox_backlog=12)
    assert Heartbeat.decode(original.encode()) == original
    doc = json.loads(original.encode())
    doc["added_by_a_newer_version"] = {"x": 1}
    assert Heartbeat.decode(json.dumps(doc).encode()) == original
    minimal = Heartbeat.decode(b'{"region": "eu-west", "wall_ms": 5}')
    assert minimal == Heartbeat("eu-west", 5)


@pytest.mark.parametrize("raw", [
    None, b"", b"not json", b"[]", b'{"kind": "other", "region": "x", "wall_ms": 1}',
    b'{"region": 3, "wall_ms": 1}', b'{"region": "x", "wall_ms": "1"}', b'{"region": "x", "wall_ms": true}',
    b'{"region": "x"}', b"\xff\xfe",
])
def test_anything_else_on_the_control_topic_is_skipped(raw: bytes | None) -> None:
    assert Heartbeat.decode(raw) is None

