"""Gap analysis under live traffic: a relay numbering between the reads must never make
an event look lost, and an event nobody holds must still be reported lost.

The race (seen once in the clock-skew drill, reproduced on the real stack): analysis
reads each region's relay counter, then its outbox. A live relay numbers events in
between, so the outbox ends above the counter. The planner took the outbox's last
sequence as evidence of how far the region got, measured the region's own
"self-gap" from the older counter, and a self-gap is never sourced from the
region's own outbox, so the freshly numbered events came out as lost ("2 events are
lost (no source holds them); 2 still missing"), and recover's gate failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import recovery
from reconciler.config import Config, load_config
from reconciler.gap_analysis import GapReport
from reconciler.gaps import SeqRanges, Source, plan_gaps
from reconciler.hlc import Timestamp
from reconciler.store.port import GapStore

REGIONS = ("ap-south", "eu-west", "us-east")


def test_own_outbox_read_past_the_counter_is_not_a_self_gap() -> None:
    # eu-west's counter said 1823, its outbox, read just after, already ends at 1824;
    # Kafka (read earlier) and the peers' inboxes are behind both.
    plans = plan_gaps(
        origin_high={"ap-south": 1843, "eu-west": 1823, "us-east": 1843},
        applied={
            ("eu-west", "ap-south"): SeqRanges.span(1, 1704),
            ("eu-west", "us-east"): SeqRanges.span(1, 1690),
            ("ap-south", "eu-west"): SeqRanges.span(1, 1717),
            ("us-east", "eu-west"): SeqRanges.span(1, 1714),
        },
        kafka_retained={"eu-west": SeqRanges.span(1, 1753), "ap-south": SeqRanges.span(1, 1735),
                        "us-east": SeqRanges.span(1, 1807)},
        outbox_held={
            ("eu-west", "eu-west"): SeqRanges.span(1, 1824),
            ("ap-south", "ap-south"): SeqRanges.span(1, 1843),
            ("us-east", "us-east"): SeqRanges.span(1, 1843),
            ("ap-south", "eu-west"): SeqRanges.span(1, 1704),
            ("us-east", "eu-west"): SeqRanges.span(1, 1690),
        },
    )
    assert [p for p in plans if p.gap.origin == p.gap.destination] == []
    assert sum(p.lost.count() for p in plans) == 0
    # the peers still get eu-west's new tail, from its outbox where Kafka has not got it yet
    to_ap_south = next(p for p in plans if (p.gap.origin, p.gap.destination) == ("eu-west", "ap-south"))
    assert to_ap_south.gap.ranges == SeqRanges.span(1705, 1824)
    assert to_ap_south.ranges_from(Source.PEER_OUTBOX) == SeqRanges.span(1754, 1824)


def test_events_nobody_holds_are_still_lost_for_a_restored_origin() -> None:
    # a: restored from a backup ending at 100 (its outbox holds 1..100 plus 120, a row
    # the backup had not numbered, given back its number); b applied up to 105, Kafka
    # retains 108..110 and 120 is in a's outbox: 106..107 and 111..119 are held by
    # nobody, and only those are lost.
    plans = plan_gaps(
        origin_high={"a": 100, "b": 50},
        applied={("a", "b"): SeqRanges.span(1, 105)},
        kafka_retained={"a": SeqRanges.span(108, 110)},
        outbox_held={("a", "a"): SeqRanges([(1, 100), 120]), ("b", "a"): SeqRanges.span(1, 105),
                     ("b", "b"): SeqRanges.span(1, 50)},
    )
    own = next(p for p in plans if (p.gap.origin, p.gap.destination) == ("a", "a"))
    assert own.gap.ranges == SeqRanges([(101, 119)])
    assert own.lost == SeqRanges([(106, 107), (111, 119)])
    assert own.ranges_from(Source.PEER_INBOX) == SeqRanges.span(101, 105)
    assert own.ranges_from(Source.KAFKA) == SeqRanges.span(108, 110)


# ------------------------------------------------------------ analyze_gaps on simulated regions


class _Region:
    """One region's database as analysis sees it: a relay counter, a densely numbered
    outbox, and what it applied of its peers."""

    def __init__(self, name: str, numbered: int) -> None:
        self.name = name
        self.last_sequence = numbered
        self.inbox: dict[str, list[tuple[int, int]]] = {}

    def number(self, count: int) -> None:
        # the relay numbers rows and moves its counter in one transaction
        self.last_sequence += count


class _Session(GapStore):
    """A session on one simulated region: every read asks the world as it is now."""

    def __init__(self, world: _World, region: str) -> None:
        self.world, self.region = world, region

    def close(self) -> None:
        pass

    def relay_position(self, origin: str) -> tuple[int, int]:
        return self.world.relay_position(self.region, origin)

    def inbox_ranges(self) -> dict[str, list[tuple[int, int]]]:
        return {o: list(r) for o, r in self.world.regions[self.region].inbox.items()}

    def inbox_floors(self) -> dict[str, int]:
        return {}

    def outbox_ranges(self, origin: str) -> list[tuple[int, int]]:
        return self.world.outbox_ranges(origin)

    def own_ranges(self, origin: str) -> list[tuple[int, int]]:
        return self.world.own_ranges(origin)

    def refused(self) -> list[dict[str, Any]]:
        return []

    def discarded(self) -> dict[str, list[tuple[int, int]]]:
        return {}

    def hlc_span(self, origin: str, ranges: Sequence[tuple[int, int]], *,
                 holder_is_origin: bool) -> tuple[Timestamp | None, Timestamp | None]:
        return None, None

    def database_now_ms(self) -> int:
        return 0


class _World:
    """The three regions and their topics, and a relay that runs whenever analysis has
    just read a counter: exactly the interleaving counter read -> relay numbers ->
    outbox read. Analysis opens its sessions here and reads Kafka here."""

    def __init__(self) -> None:
        self.regions = {r: _Region(r, 500) for r in REGIONS}
        for dest in REGIONS:
            self.regions[dest].inbox = {o: [(1, 480)] for o in REGIONS if o != dest}
        self.published = {r: 490 for r in REGIONS}
        self.connected: list[str] = []

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> _Session:
        self.connected.append(region)
        return _Session(self, region)

    def relay_position(self, holder: str, origin: str) -> tuple[int, int]:
        region = self.regions[holder]
        position = (region.last_sequence, self.published[origin])
        region.number(2)
        return position

    def outbox_ranges(self, origin: str) -> list[tuple[int, int]]:
        return [(1, self.regions[origin].last_sequence)]

    def own_ranges(self, origin: str) -> list[tuple[int, int]]:
        return [(1, self.regions[origin].last_sequence)]

    def retained(self, origin: str) -> tuple[int, int] | None:
        return 1, self.published[origin]

    def retained_ranges(self, origin: str, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        return list(SeqRanges(list(wanted)).ranges)


@pytest.fixture
def world(tmp_path: Path) -> tuple[_World, Config]:
    doc = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "regions": {r: {"dsn": f"postgresql://u@127.0.0.1:{i + 1}/db"} for i, r in enumerate(REGIONS)},
        "tables": {"orders": {"key": ["id"], "policy": "lww"}},
    }
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(doc))
    return _World(), load_config(path)


def analyze(world: _World, config: Config, region: str) -> GapReport:
    return recovery.analyze_gaps(config, region, databases=world, events=world)  # type: ignore[arg-type]


def test_analysis_under_a_relay_numbering_between_its_reads_reports_nothing_lost(
    world: tuple[_World, Config],
) -> None:
    sim, config = world
    for region in REGIONS:
        report = analyze(sim, config, region)
        assert report.lost_events == 0, report.to_dict()
        assert [p for p in report.plans if p.gap.origin == p.gap.destination] == []
        # the peers' in-flight tails are all still planned, from Kafka and the origins' outboxes
        for plan in report.plans:
            assert plan.gap.ranges.last == report.facts[plan.gap.origin].outbox[-1][1]
    assert set(sim.connected) == set(REGIONS)


def test_analysis_still_reports_a_hole_nobody_holds(
    world: tuple[_World, Config], monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, config = world
    # no peer applied 200..201 of us-east, Kafka retains only from 300 and us-east's
    # own outbox lost them too: no source anywhere, whatever the relays do meanwhile
    for dest in ("eu-west", "ap-south"):
        sim.regions[dest].inbox["us-east"] = [(1, 199), (202, 480)]
    outbox_ranges, retained = sim.outbox_ranges, sim.retained

    def outbox_without_the_hole(origin: str) -> list[tuple[int, int]]:
        ranges = outbox_ranges(origin)
        return [(1, 199), (202, ranges[0][1])] if origin == "us-east" else ranges

    monkeypatch.setattr(sim, "outbox_ranges", outbox_without_the_hole)
    monkeypatch.setattr(sim, "retained", lambda origin: (300, 490) if origin == "us-east" else retained(origin))
    report = analyze(sim, config, "eu-west")
    lost = {(p.gap.origin, p.gap.destination): p.lost for p in report.plans if p.lost}
    assert lost == {("us-east", "eu-west"): SeqRanges.span(200, 201)}
    assert report.lost_events == 2


def test_a_pruned_prefix_counts_as_applied_but_is_served_by_nobody() -> None:
    """After pruning, a region's floor says "applied" for gap analysis, but its rows are
    gone: routing a peer's missing events to it would replay nothing."""
    facts = recovery.RegionFacts("eu-west", True, inbox={"us-east": [(1, 700), (705, 900)]},
                                 inbox_floors={"us-east": 600})
    assert facts.inbox_held("us-east") == SeqRanges([(601, 700), (705, 900)])
    assert facts.inbox_held("ap-south") == SeqRanges()
    applied = {("us-east", "eu-west"): SeqRanges(facts.inbox["us-east"]),
               ("us-east", "ap-south"): SeqRanges([(1, 100)])}
    held = {("eu-west", "us-east"): facts.inbox_held("us-east")}
    plans = {(p.gap.origin, p.gap.destination): p for p in plan_gaps({}, applied, {}, held)}
    # eu-west's own hole stays a hole; ap-south's missing 101..600 are nowhere, 601..700 from eu-west
    assert plans[("us-east", "eu-west")].gap.ranges == SeqRanges([(701, 704)])
    ap = plans[("us-east", "ap-south")]
    assert ap.lost == SeqRanges([(101, 600), (701, 704)])
    assert ap.ranges_from(Source.PEER_INBOX) == SeqRanges([(601, 700), (705, 900)])


def test_a_counter_raised_past_unreturned_own_events_hides_none_of_them(
    world: tuple[_World, Config], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """us-east was restored from a backup ending at 300 and a recover, killed, gave back
    one batch (HLC order: 420..480) and raised the counter to 480, or reserved up to
    what peers saw: the self-gap is still 301..419, and what nobody holds is lost."""
    sim, config = world
    sim.regions["us-east"].last_sequence = 480
    for dest in ("eu-west", "ap-south"):
        sim.regions[dest].inbox["us-east"] = [(1, 350), (400, 480)]  # 351..399 held by nobody

    own_ranges = sim.own_ranges

    def own(origin: str) -> list[tuple[int, int]]:
        return [(1, 300), (420, 480)] if origin == "us-east" else own_ranges(origin)

    monkeypatch.setattr(sim, "own_ranges", own)
    monkeypatch.setattr(sim, "outbox_ranges", own)
    monkeypatch.setattr(sim, "relay_position", lambda holder, origin: (sim.regions[holder].last_sequence, 480))
    monkeypatch.setattr(sim, "retained", lambda origin: None)
    report = analyze(sim, config, "us-east")
    own_gap = next(p for p in report.plans if p.gap.origin == p.gap.destination == "us-east")
    assert own_gap.gap.ranges == SeqRanges.span(301, 419)
    assert own_gap.lost == SeqRanges.span(351, 399)
    assert own_gap.ranges_from(Source.PEER_INBOX) == SeqRanges([(301, 350), (400, 419)])
    assert report.lost_events == 49
    gate_input = recovery._gate_input(config, "us-east", report, recovery.RecoveryReport("us-east", False, {}))
    assert gate_input.lost_events == 49 and gate_input.gap_events >= 119


def test_a_hole_inside_kafkas_bounds_is_routed_to_a_peer_not_to_kafka(
    world: tuple[_World, Config], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka's bounds for us-east are 1..490, but 300..309 were a fenced relay's aborted
    batch (republished later elsewhere in the log, or never): read, they are not there."""
    sim, config = world
    sim.regions["eu-west"].inbox["us-east"] = [(1, 299)]

    def held(origin: str, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        ranges = SeqRanges(list(wanted))
        return list((ranges - SeqRanges.span(300, 309) if origin == "us-east" else ranges).ranges)

    monkeypatch.setattr(sim, "retained_ranges", held)
    report = analyze(sim, config, "eu-west")
    plan = next(p for p in report.plans if (p.gap.origin, p.gap.destination) == ("us-east", "eu-west"))
    assert not plan.ranges_from(Source.KAFKA) & SeqRanges.span(300, 309)
    assert not SeqRanges.span(300, 309) - (plan.ranges_from(Source.PEER_OUTBOX) | plan.ranges_from(Source.PEER_INBOX))
    assert plan.lost == SeqRanges()


def test_the_gates_lag_counts_every_planned_tail_under_a_live_relay(world: tuple[_World, Config]) -> None:
    """The lag the gate reads (gaps.measure_lag) reaches as high as the plan: the origin's
    outbox, read after its counter, is evidence too."""
    sim, config = world
    for region in REGIONS:
        report = analyze(sim, config, region)
        tails = {(p.gap.origin, p.gap.destination): p.gap.count for p in report.plans}
        assert tails, report.to_dict()
        for pair, count in tails.items():
            lag = report.lags[pair]
            assert (lag.gap, lag.events) == (0, count), (pair, lag)
