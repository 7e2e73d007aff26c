"""Gap analysis (``analyze_gaps``) and replay over in-memory regions and an in-memory
event log: the events really numbered by the daemon's relay, really held in
inboxes, really expired from the topic; the plan read from those facts alone, and
replayed through the daemon's own sink until nothing is missing."""

from __future__ import annotations

import itertools
from pathlib import Path

from reconciler import outbox
from reconciler.apply import Applier
from reconciler.config import Config, RegionConfig, TableConfig
from reconciler.gap_analysis import GapReport, analyze_gaps
from reconciler.gaps import SeqRanges, Source
from reconciler.relay import Relay
from reconciler.replay import ApplierSink, Replayer, merged_by_hlc, plan_events
from reconciler.store.memory import MemoryRegionStore
from reconciler.transport.memory import MemoryEventLog
from tests.unit.memory_sessions import Databases, OneDatabase

ORIGIN, LATE, FULL = "us-east", "eu-west", "ap-south"
TABLES = {"orders": TableConfig("orders", ("id",), "lww")}


class World:
    def __init__(self) -> None:
        ticks = itertools.count(1_700_000_000_000)
        self.config = Config(
            path=Path("/etc/reconciler/reconciler.yaml"),
            regions={r: RegionConfig(r, "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0")
                     for r in (ORIGIN, LATE, FULL)},
            tables=TABLES, kafka={"bootstrap.servers": "127.0.0.1:1"},
        )
        self.databases = Databases(MemoryRegionStore(r, TABLES, now_ms=lambda: next(ticks))
                                   for r in self.config.regions)
        self.log = MemoryEventLog(self.config.events_topic)

    def write(self, writes: int) -> None:
        """``writes`` new orders in the origin, not numbered yet."""
        first = len(self.databases[ORIGIN].rows("orders"))
        for i in range(first, first + writes):
            outbox.write(self.databases[ORIGIN], "orders", "insert", {"id": i}, values={"status": "new"})

    def publish(self, writes: int = 0) -> None:
        """``writes`` new orders in the origin, then everything numbered and published by its relay."""
        self.write(writes)
        relay = Relay(self.config, ORIGIN, holder="unit", databases=OneDatabase(self.databases[ORIGIN]),
                      events=self.log, peers_seen=dict)
        relay.start()
        try:
            while relay.step() > 0:
                pass
        finally:
            relay.close()

    def deliver(self, region: str, lo: int, hi: int) -> None:
        events = [d.event for batch in self.log.read_range(ORIGIN, lo, hi) for d in batch if d.event]
        Applier(self.databases[region], region, TABLES, max_offset_ms=1000).apply_remote(events)

    def analyze(self, region: str | None = None) -> GapReport:
        return analyze_gaps(self.config, region, databases=self.databases, events=self.log)

    def replay(self, region: str) -> int:
        """What recover's replay does: every planned event into the region, through the
        daemon's sink (peers' events applied as the inbox does, its own given back)."""
        store = self.databases[region]
        sink = ApplierSink(store, Applier(store, region, TABLES, max_offset_ms=1000))
        streams = [plan_events(p, log_for=lambda _o: self.log, databases=self.databases, batch=3)
                   for p in self.analyze(region).for_destination(region)]
        return Replayer(sink, batch=3).replay(merged_by_hlc(streams, lookahead=3))


def plan_of(report: GapReport, origin: str, destination: str) -> dict[Source, SeqRanges]:
    plan = next(p for p in report.plans if (p.gap.origin, p.gap.destination) == (origin, destination))
    return {source: plan.ranges_from(source) for source in Source if plan.ranges_from(source)}


def test_a_tail_still_in_kafka_is_replayed_from_kafka_and_is_lag_not_gap() -> None:
    world = World()
    world.publish(10)
    world.deliver(LATE, 1, 6)
    world.deliver(FULL, 1, 10)
    report = world.analyze(LATE)
    assert plan_of(report, ORIGIN, LATE) == {Source.KAFKA: SeqRanges.span(7, 10)}
    assert report.lost_events == 0
    lag = report.lags[(ORIGIN, LATE)]
    assert (lag.gap, lag.events) == (0, 4)
    assert report.hlc_spans[(ORIGIN, LATE)][0] is not None
    assert [p.gap.destination for p in report.plans] == [LATE]


def test_what_kafka_expired_comes_from_the_peers_and_counts_as_gap() -> None:
    world = World()
    world.publish(10)
    world.deliver(LATE, 1, 6)
    world.deliver(FULL, 1, 10)
    world.log.expire(world.config.events_topic(ORIGIN), before=8)  # offsets 0..7: sequences 1..8
    report = world.analyze(LATE)
    sources = plan_of(report, ORIGIN, LATE)
    assert sources[Source.KAFKA] == SeqRanges.span(9, 10)
    assert sources.get(Source.PEER_OUTBOX, SeqRanges()) | sources.get(Source.PEER_INBOX, SeqRanges()) == (
        SeqRanges.span(7, 8))
    assert report.lags[(ORIGIN, LATE)].gap == 2
    # with the origin's database down, ap-south's inbox still holds them
    world.databases.down.add(ORIGIN)
    down = world.analyze(LATE)
    assert not down.facts[ORIGIN].reachable and "unreachable" in (down.facts[ORIGIN].error or "")
    assert plan_of(down, ORIGIN, LATE)[Source.PEER_INBOX] == SeqRanges.span(7, 8)
    assert down.lost_events == 0


def test_events_nobody_holds_any_more_are_lost() -> None:
    world = World()
    world.publish(10)
    world.deliver(LATE, 1, 6)
    world.log.expire(world.config.events_topic(ORIGIN), before=8)
    world.databases.down.add(ORIGIN)
    report = world.analyze(LATE)
    plan = next(p for p in report.plans if (p.gap.origin, p.gap.destination) == (ORIGIN, LATE))
    assert plan.lost == SeqRanges.span(7, 8)
    assert report.lost_events == 2


def test_a_region_restored_from_an_older_backup_gets_its_own_events_back_from_peers() -> None:
    world = World()
    world.publish(5)
    backup = world.databases[ORIGIN].snapshot()
    world.publish(5)
    world.deliver(LATE, 1, 10)
    world.deliver(FULL, 1, 10)
    world.log.expire(world.config.events_topic(ORIGIN), before=10)
    world.databases[ORIGIN].restore(backup)
    report = world.analyze(ORIGIN)
    own = plan_of(report, ORIGIN, ORIGIN)
    assert own == {Source.PEER_INBOX: SeqRanges.span(6, 10)}, report.to_dict()
    assert report.to_dict()["gaps"][0]["stale_backup"] is True


def test_a_refused_event_is_missing_not_in_flight() -> None:
    world = World()
    world.publish(4)
    world.deliver(LATE, 1, 2)
    world.deliver(LATE, 4, 4)
    refused = next(d for batch in world.log.read_range(ORIGIN, 3, 3) for d in batch)
    assert refused.event is not None
    world.databases[LATE].quarantine([{"origin": ORIGIN, "sequence": 3, "reason": "apply_failed", "detail": "why",
                                       "event_id": refused.event.event_id, "raw": refused.raw}])
    report = world.analyze(LATE)
    assert [r["sequence"] for r in report.facts[LATE].refused] == [3]
    lag = report.lags[(ORIGIN, LATE)]
    assert (lag.gap, lag.events) == (1, 0)


def test_replay_closes_a_gap_from_kafka_and_from_the_peers() -> None:
    world = World()
    world.publish(10)
    world.deliver(LATE, 1, 3)
    world.deliver(FULL, 1, 10)
    world.log.expire(world.config.events_topic(ORIGIN), before=6)  # Kafka keeps 7..10
    world.databases.down.add(ORIGIN)  # 4..6 only in ap-south's inbox
    assert world.replay(LATE) == 7
    assert world.analyze(LATE).plans == []
    assert world.databases[LATE].rows("orders") == world.databases[FULL].rows("orders") != {}


def test_a_restored_region_gets_its_own_events_back_with_their_numbers() -> None:
    world = World()
    world.publish(5)
    world.write(2)  # in the backup, but not numbered yet when it was taken
    backup = world.databases[ORIGIN].snapshot()
    world.publish(3)  # numbers the two as 6, 7, then 8..10
    world.deliver(LATE, 1, 10)
    world.deliver(FULL, 1, 10)
    before = world.databases[FULL].rows("orders")
    world.databases[ORIGIN].restore(backup)
    assert world.databases[ORIGIN].outbox_ranges(ORIGIN) == [(1, 5)]
    assert world.replay(ORIGIN) == 5
    origin = world.databases[ORIGIN]
    assert origin.own_ranges(ORIGIN) == origin.outbox_ranges(ORIGIN) == [(1, 10)]
    assert origin.relay_position(ORIGIN) == (10, 10)
    assert origin.rows("orders") == before
    assert world.analyze(ORIGIN).plans == []
    # the relay has nothing left to number: the two pending rows kept 6 and 7
    published_before = world.log.watermarks(world.config.events_topic(ORIGIN))[1]
    world.publish()
    assert world.log.watermarks(world.config.events_topic(ORIGIN))[1] == published_before
