"""The one definition of gap and lag (reconciler.gaps.measure_lag), checked with hand-made
values, and the three places that report it (``status``, the sidecar's metrics and the
recovery gate, which ``gaps`` prints) fed one scenario and made to agree."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler import recovery, sidecar
from reconciler.config import Config, load_config
from reconciler.gaps import (
    SeqRanges,
    by_origin,
    kafka_retained_from,
    measure_lag,
    origin_high_water,
    self_gap,
)
from reconciler.hlc import Timestamp
from reconciler.lifecycle import RegionStatus, State
from reconciler.stats import Measurement
from reconciler.status import _assemble, _Facts
from reconciler.store.health import InboxProgress, ManualQueue, OutboxBacklog
from reconciler.store.port import GapStore
from reconciler.transport import kafka

# ------------------------------------------------------------------ the definition


def test_nothing_missing_nothing_in_flight() -> None:
    lag = measure_lag(applied=10, highest_applied=10, origin_high=10, oldest_unapplied_age=9.0)
    assert (lag.gap, lag.events, lag.seconds, lag.first_in_flight) == (0, 0, 0.0, None)


def test_holes_are_gap_and_carry_no_lag_seconds() -> None:
    lag = measure_lag(applied=7, highest_applied=10, origin_high=10, oldest_unapplied_age=9.0)
    assert (lag.holes, lag.gap, lag.events, lag.seconds) == (3, 3, 0, 0.0)


def test_the_tail_is_lag_aged_by_its_oldest_event() -> None:
    lag = measure_lag(applied=10, highest_applied=10, origin_high=25, oldest_unapplied_age=4.5,
                      kafka_retained_from=1)
    assert (lag.gap, lag.events, lag.seconds, lag.first_in_flight) == (0, 15, 4.5, 11)


def test_refused_events_are_missing_never_in_flight() -> None:
    # 11 and 12 were quarantined: the tail is entirely refused, nothing is on its way
    lag = measure_lag(applied=10, highest_applied=10, origin_high=12, refused=SeqRanges([11, 12]),
                      oldest_unapplied_age=30.0)
    assert (lag.refused, lag.gap, lag.events, lag.seconds) == (2, 2, 0, 0.0)


def test_a_refused_hole_is_counted_once() -> None:
    # 9 and 10 unapplied below 12: 9 was refused, 10 is a plain hole
    lag = measure_lag(applied=10, highest_applied=12, origin_high=12, refused=SeqRanges([9]))
    assert (lag.holes, lag.refused, lag.gap) == (1, 1, 2)


def test_a_refused_sequence_is_evidence_of_the_high_water() -> None:
    lag = measure_lag(applied=10, highest_applied=10, origin_high=10, refused=SeqRanges([15]))
    assert (lag.origin_high, lag.refused, lag.events, lag.first_in_flight) == (15, 1, 4, 11)


def test_settled_events_are_neither_applied_nor_missing() -> None:
    lag = measure_lag(applied=9, highest_applied=10, origin_high=11, settled=SeqRanges([9, 11]),
                      refused=SeqRanges([11]))
    assert (lag.gap, lag.events) == (0, 0)


def test_a_tail_kafka_no_longer_holds_is_gap_the_rest_lag() -> None:
    lag = measure_lag(applied=10, highest_applied=10, origin_high=30, kafka_retained_from=21,
                      refused=SeqRanges([12]), oldest_unapplied_age=2.0)
    assert (lag.expired, lag.refused, lag.gap, lag.events, lag.first_in_flight) == (9, 1, 10, 10, 21)


def test_unknown_retention_expires_nothing() -> None:
    lag = measure_lag(applied=10, highest_applied=10, origin_high=30, kafka_retained_from=None)
    assert (lag.expired, lag.events) == (0, 20)


def test_where_kafka_starts() -> None:
    assert kafka_retained_from((21, 30), 30, 40) == 21
    # an empty topic expired what its relay published; numbered-not-published still comes
    assert kafka_retained_from(None, 25, 40) == 26
    assert kafka_retained_from(None, None, 40) == 41


def test_high_water_is_the_highest_evidence_anyone_has() -> None:
    assert origin_high_water(None, 3, 7, None) == 7
    assert origin_high_water() == 0


def test_self_gap_ignores_the_counter_and_counts_what_is_not_held() -> None:
    assert self_gap(SeqRanges([(1, 6), 9]), 10) == SeqRanges([(7, 8), 10])
    assert self_gap(SeqRanges.span(1, 12), 10) == SeqRanges()


def test_refused_entries_by_origin() -> None:
    entries = [{"origin": "a", "sequence": 3}, {"origin": "a", "sequence": 3}, {"origin": None, "sequence": None},
               {"origin": "b", "sequence": None}, {"origin": "a", "sequence": 4}]
    assert by_origin(entries) == {"a": SeqRanges.span(3, 4)}


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        measure_lag(applied=-1, highest_applied=0, origin_high=0)


# ------------------------------------------------------------------ the callers agree

REGIONS = ("ap-south", "eu-west", "us-east")
ORIGIN, DEST = "us-east", "eu-west"
#: the scenario: us-east numbered 40 and published 35, Kafka holds 21..35 of it;
#: eu-west applied 1..4, 6..8, 10..12 (5 a hole, 9 refused), refused 13 too;
#: ap-south applied all 40; the oldest in-flight event (21) is 30 s old.
COUNTER, PUBLISHED, KAFKA = 40, 35, (21, 35)
DEST_INBOX = [(1, 4), (6, 8), (10, 12)]
REFUSED = [{"id": 1, "origin": ORIGIN, "sequence": 9, "event_id": "e9", "reason": "policy", "detail": ""},
           {"id": 2, "origin": ORIGIN, "sequence": 13, "event_id": "e13", "reason": "value", "detail": ""}]
AGE = 30.0
#: by the definition: gap = hole 5 + refused 9, 13 + expired 14..20; lag = 21..40
EXPECTED_GAP, EXPECTED_LAG = 1 + 2 + 7, 20


@pytest.fixture
def config(tmp_path: Path) -> Config:
    doc = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "regions": {r: {"dsn": f"postgresql://u@127.0.0.1:{i + 1}/{r}"} for i, r in enumerate(REGIONS)},
        "tables": {"orders": {"key": ["id"], "policy": "lww"}},
    }
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


def inbox(dest: str) -> dict[str, list[tuple[int, int]]]:
    peers = [o for o in REGIONS if o != dest]
    return {o: DEST_INBOX if (o, dest) == (ORIGIN, DEST) else [(1, COUNTER if o == ORIGIN else 10)] for o in peers}


def counter(region: str) -> int:
    return COUNTER if region == ORIGIN else 10


def published(region: str) -> int:
    return PUBLISHED if region == ORIGIN else 10


def progress(dest: str) -> dict[str, InboxProgress]:
    out = {}
    for origin, ranges in inbox(dest).items():
        seqs = SeqRanges(ranges)
        out[origin] = InboxProgress(origin, seqs.count(), seqs.last or 0, None, 1.0)
    return out


def retained(topic: str) -> tuple[int, int] | None:
    return KAFKA if topic.endswith(ORIGIN) else (1, 10)


@pytest.fixture
def facts_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka answers from the scenario, whoever asks (the regions are _ScenarioSession)."""
    monkeypatch.setattr(kafka, "retained_sequences", lambda _s, topic, **_k: retained(topic))


class _ScenarioSession(GapStore):
    """A gap-analysis session on one region of the scenario."""

    def __init__(self, region: str) -> None:
        self.region = region
        # the gaps' oldest HLC: us-east's hole 5 is older than the in-flight tail, and the
        # gate errs on the older stamp; stamp it the tail's age so the three can be compared
        self.oldest = Timestamp(int(time.time() * 1000 - AGE * 1000), 0)

    def close(self) -> None:
        pass

    def relay_position(self, origin: str) -> tuple[int, int]:
        return counter(origin), published(origin)

    def inbox_ranges(self) -> dict[str, list[tuple[int, int]]]:
        return inbox(self.region)

    def inbox_floors(self) -> dict[str, int]:
        return {}

    def outbox_ranges(self, origin: str) -> list[tuple[int, int]]:
        return [(1, counter(origin))]

    def own_ranges(self, origin: str) -> list[tuple[int, int]]:
        return [(1, counter(origin))]

    def refused(self) -> list[dict[str, Any]]:
        return list(REFUSED) if self.region == DEST else []

    def discarded(self) -> dict[str, list[tuple[int, int]]]:
        return {}

    def hlc_span(self, origin: str, ranges: Sequence[tuple[int, int]], *,
                 holder_is_origin: bool) -> tuple[Timestamp | None, Timestamp | None]:
        return (self.oldest, self.oldest) if origin == ORIGIN else (None, None)

    def database_now_ms(self) -> int:
        return int(time.time() * 1000)

    # what status and the sidecar's measurements read besides

    def outbox_backlog(self, origin: str) -> OutboxBacklog:
        return OutboxBacklog(0, 0.0)

    def inbox_progress(self) -> dict[str, InboxProgress]:
        return progress(self.region)

    def relay_high_water(self, origin: str) -> int:
        return counter(origin)

    def event_age(self, origin: str, sequence: int) -> float | None:
        # only the first in-flight event's age is the lag's: any other answer would be wrong
        return AGE if (origin, sequence) == (ORIGIN, KAFKA[0]) else 999.0

    def manual_queue(self, tables: Sequence[str] = ()) -> ManualQueue:
        return ManualQueue({}, 0.0)

    def quarantined(self) -> int:
        return len(self.refused())

    def refused_counts(self) -> dict[tuple[str, str], int]:
        return {}

    def open_violation_counts(self) -> dict[tuple[str, str], int]:
        return {}


def via_status(config: Config) -> tuple[int, int, float]:
    facts = {}
    for region in REGIONS:
        session = _ScenarioSession(region)
        f = _Facts(region=region, dsn="postgresql://u@host/db", store=session,  # type: ignore[arg-type]
                   status=RegionStatus(region, State.ACTIVE, 1, "test"), backlog=OutboxBacklog(0, 0.0),
                   progress=progress(region), relay_high=counter(region), published=published(region),
                   refused=by_origin(session.refused()), own=SeqRanges.span(1, counter(region)),
                   queue=ManualQueue({}, 0.0))
        facts[region] = f
    report = _assemble(config, facts, [], kafka_timeout=1.0)
    lag = report.regions[DEST].lag[ORIGIN]
    assert report.regions[DEST].gaps == lag.gaps  # nothing missing from ap-south, no self-gap
    return lag.gaps, lag.events, lag.seconds


class _Db:
    """A sidecar's reconnecting session on one region's database."""

    def __init__(self, region: str) -> None:
        self.session = _ScenarioSession(region)
        self.error: str | None = None

    def store(self) -> _ScenarioSession:
        return self.session

    def run(self, query: Any) -> Any:
        return query(self.session)


def via_sidecar(config: Config) -> tuple[int, int, float]:
    car = sidecar.Sidecar(config, DEST)
    peers = {p: _Db(p) for p in config.peers(DEST)}
    Measurement(car.ctx, car.log, car.events)(_Db(DEST), peers)  # type: ignore[arg-type]
    samples = {
        (family.name, sample.labels.get("origin")): sample.value
        for family in text_string_to_metric_families(car.metrics.render().decode())
        for sample in family.samples if sample.labels.get("destination") == DEST
    }
    return (int(samples[("reconciler_gaps_events", ORIGIN)]),
            int(samples[("reconciler_replication_lag_events", ORIGIN)]),
            samples[("reconciler_replication_lag_seconds", ORIGIN)])


class _Scenario:
    """The scenario's regions and topics, as gap analysis opens and reads them."""

    def open(self, region: str, **_kw: Any) -> _ScenarioSession:
        return _ScenarioSession(region)

    def retained(self, origin: str) -> tuple[int, int] | None:
        return retained(origin)

    def retained_ranges(self, origin: str, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        bounds = retained(origin)
        return list((SeqRanges(list(wanted)) & SeqRanges.span(*bounds)).ranges) if bounds else []


def via_gate(config: Config) -> tuple[int, int, float]:
    scenario = _Scenario()
    report = recovery.analyze_gaps(config, DEST, databases=scenario, events=scenario)  # type: ignore[arg-type]
    doc = report.to_dict()["lag"][DEST][ORIGIN]
    gate = recovery._gate_input(config, DEST, report, recovery.RecoveryReport(DEST, False, {}))
    assert (doc["gap"], doc["events"]) == (gate.gap_events, gate.lag_events)  # what `gaps --json` prints
    assert gate.refused_events == len(REFUSED)
    return gate.gap_events, gate.lag_events, gate.lag_seconds


@pytest.mark.usefixtures("facts_everywhere")
def test_status_the_sidecar_and_the_gate_agree_on_one_scenario(config: Config) -> None:
    status = via_status(config)
    metrics = via_sidecar(config)
    gate = via_gate(config)
    for gap, events, seconds in (status, metrics, gate):
        assert (gap, events) == (EXPECTED_GAP, EXPECTED_LAG), (status, metrics, gate)
        assert seconds == pytest.approx(AGE, abs=1.0), (status, metrics, gate)


@pytest.mark.parametrize(("own_now", "expected"), [(12, 0), (6, 6)])
def test_status_reads_a_region_own_events_again_before_calling_them_lost(
    config: Config, monkeypatch: pytest.MonkeyPatch, own_now: int, expected: int,
) -> None:
    """us-east answered with 1..10 while its peers, asked a moment later, had applied 12:
    read again, a live region holds them (no gap); a restored one still lacks them."""
    from reconciler.status import _reread_own

    class Restarted(_ScenarioSession):
        def own_ranges(self, origin: str) -> list[tuple[int, int]]:
            return [(1, own_now)]

        def relay_high_water(self, origin: str) -> int:
            return own_now

    facts = {}
    for region in REGIONS:
        facts[region] = _Facts(
            region=region, dsn="postgresql://u@host/db", store=Restarted(region),  # type: ignore[arg-type]
            status=RegionStatus(region, State.ACTIVE, 1, "test"), backlog=OutboxBacklog(0, 0.0),
            progress={o: InboxProgress(o, 12 if o == ORIGIN else 10, 12 if o == ORIGIN else 10, None, 0.1)
                      for o in REGIONS if o != region},
            relay_high=10, own=SeqRanges.span(1, 10), queue=ManualQueue({}, 0.0))
    _reread_own(facts)
    monkeypatch.setattr(kafka, "retained_sequences", lambda *_a, **_k: (1, 10**9))
    report = _assemble(config, facts, [], kafka_timeout=1.0)
    assert report.regions[ORIGIN].gaps == expected
