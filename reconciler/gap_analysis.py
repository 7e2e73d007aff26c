"""Gap analysis on the live system: what every region holds, what Kafka retains,
and, through the pure planner (:mod:`reconciler.gaps`), for every (origin,
destination) pair what is missing, where it can be replayed from, and the pair's
gap and lag.

``analyze_gaps`` asks every reachable region what it holds (outbox, inbox
islands, relay position) and Kafka (through the EventLog port) what it still
retains; ``reconciler gaps`` prints its report and ``recover`` acts on it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .errors import ReconcilerError
from .gaps import (
    GapPlan,
    Lag,
    SeqRanges,
    Source,
    by_origin,
    kafka_retained_from,
    measure_lag,
    origin_high_water,
    plan_gaps,
)
from .hlc import Timestamp, wall_ms
from .store.port import GapSessions, session_on
from .store.postgres_store import RegionDatabases
from .transport import kafka
from .transport.port import EventLog


@dataclass
class RegionFacts:
    region: str
    reachable: bool
    error: str | None = None
    last_sequence: int = 0
    published_through: int = 0
    #: applied sequences per origin, pruned ones included
    inbox: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: per origin, applied up to here with the rows pruned: applied, but not servable
    inbox_floors: dict[str, int] = field(default_factory=dict)
    outbox: list[tuple[int, int]] = field(default_factory=list)
    #: quarantined events not settled (see store.quarantine): missing, not in flight
    refused: list[dict[str, Any]] = field(default_factory=list)
    #: per origin, sequences discarded by an operator here (counted as settled in ``inbox``)
    discarded: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: own sequences this region accounts for (numbered rows and pruned prefix), never
    #: inferred from its counter; None: not read (an older caller), the counter stands in
    own: list[tuple[int, int]] | None = None

    def inbox_held(self, origin: str) -> SeqRanges:
        """Sequences of ``origin`` whose payload this region still has."""
        applied = SeqRanges(self.inbox.get(origin, [])) - SeqRanges(self.discarded.get(origin, []))
        floor = self.inbox_floors.get(origin, 0)
        return applied - SeqRanges.span(1, floor) if floor else applied


@dataclass
class GapReport:
    plans: list[GapPlan]
    facts: dict[str, RegionFacts]
    retained: dict[str, tuple[int, int] | None]
    #: per plan (origin, destination): sequences the destination has not applied although
    #: it applied later ones (holes), versus the in-flight tail a live consumer will still get
    holes: dict[tuple[str, str], int] = field(default_factory=dict)
    hlc_spans: dict[tuple[str, str], tuple[Timestamp | None, Timestamp | None]] = field(default_factory=dict)
    #: per (origin, destination), origin != destination: gap and lag as reconciler.gaps defines them
    lags: dict[tuple[str, str], Lag] = field(default_factory=dict)

    @property
    def lost_events(self) -> int:
        return sum(p.lost.count() for p in self.plans)

    def for_destination(self, region: str) -> list[GapPlan]:
        return [p for p in self.plans if p.gap.destination == region]

    def to_dict(self) -> dict[str, Any]:
        plans = []
        for plan in self.plans:
            pair = (plan.gap.origin, plan.gap.destination)
            doc = plan.to_dict()
            low, high = self.hlc_spans.get(pair, (None, None))
            doc["hlc_min"] = str(low) if low else None
            doc["hlc_max"] = str(high) if high else None
            doc["holes"] = self.holes.get(pair, 0)
            doc["stale_backup"] = plan.gap.origin == plan.gap.destination
            plans.append(doc)
        return {
            "gaps": plans,
            "total_missing": sum(p.gap.count for p in self.plans),
            "lost_events": self.lost_events,
            "regions": {
                r: {"reachable": f.reachable, "error": f.error, "last_sequence": f.last_sequence,
                    "published_through": f.published_through, "inbox_floors": dict(sorted(f.inbox_floors.items()))}
                for r, f in self.facts.items()
            },
            "kafka_retained": {o: list(r) if r else None for o, r in self.retained.items()},
            "refused": {r: f.refused for r, f in self.facts.items() if f.refused},
            "total_refused": sum(len(f.refused) for f in self.facts.values()),
            "lag": {d: {o: lag.to_dict() for (o, dd), lag in sorted(self.lags.items()) if dd == d}
                    for d in sorted({d for _, d in self.lags})},
        }


#: how long analysis waits for a region's database before counting it unreachable
CONNECT_TIMEOUT = 3


def collect_facts(config: Config, databases: GapSessions | None = None) -> dict[str, RegionFacts]:
    sessions: GapSessions = databases or RegionDatabases(config)
    facts: dict[str, RegionFacts] = {}
    for region in config.regions:
        try:
            with session_on(sessions, region, timeout=CONNECT_TIMEOUT) as store:
                last, published = store.relay_position(region)
                inbox = store.inbox_ranges()
                facts[region] = RegionFacts(
                    region=region, reachable=True, last_sequence=last, published_through=published,
                    # floors read after the ranges: a floor raised in between only makes
                    # this region claim fewer payloads than it has, never more
                    inbox=inbox, inbox_floors=store.inbox_floors(), outbox=store.outbox_ranges(region),
                    refused=store.refused(), own=store.own_ranges(region),
                )
                # events an operator discarded here are settled: not missing, but not held either
                for origin, ranges in store.discarded().items():
                    facts[region].inbox[origin] = list(SeqRanges([*inbox.get(origin, []), *ranges]).ranges)
                    facts[region].discarded[origin] = ranges
        except ReconcilerError as exc:
            facts[region] = RegionFacts(region=region, reachable=False, error=str(exc))
    return facts


def kafka_retention(config: Config, events: EventLog | None = None) -> dict[str, tuple[int, int] | None]:
    """What each origin's topic retains, every origin asked at once: each answer is a
    consumer's start and a few reads, tens of milliseconds of waiting on the broker
    that one origin after another would add up (twice per recover)."""
    log = events or _reader_log(config)
    origins = list(config.regions)
    with ThreadPoolExecutor(max_workers=len(origins), thread_name_prefix="kafka-retention") as pool:
        return dict(zip(origins, pool.map(log.retained, origins), strict=True))


def kafka_held(log: EventLog, wanted: dict[str, SeqRanges]) -> dict[str, SeqRanges]:
    """Which of ``wanted`` (per origin) each origin's topic really holds, read from where
    each range starts: between the first and the last retained sequence there can be
    holes (an aborted batch of a fenced relay, compaction), and a hole routed to Kafka
    would be replayed from there forever, never from a peer that has it."""
    return {o: SeqRanges(log.retained_ranges(o, r.ranges)) for o, r in wanted.items() if r}


#: librdkafka prefetches up to 100,000 messages (or 64 MiB) per partition ahead of a
#: reader by default: ~100 MiB of the recover's RSS while it reads a long range. A
#: replay reads one partition front to back and decodes and applies far slower than
#: the broker sends, so a small queue costs nothing; the backoff once the queue is
#: full is cut from 1 s to 10 ms so that the reader never waits for it. A config's
#: own values win.
READER_SETTINGS = {"queued.min.messages": "5000", "queued.max.messages.kbytes": "8192",
                   "fetch.queue.backoff.ms": "10"}


def reader_settings(config: Config, region: str) -> dict[str, str]:
    """``region``'s Kafka settings for reading a topic front to back (replay, retention)."""
    return {**READER_SETTINGS, **config.kafka_settings(region)}


def _reader_log(config: Config) -> EventLog:
    """Gap analysis reads every origin's topic with the first region's settings."""
    return kafka.KafkaEventLog(reader_settings(config, next(iter(config.regions))), config.events_topic)


def analyze_gaps(config: Config, region: str | None = None, *, databases: GapSessions | None = None,
                 events: EventLog | None = None) -> GapReport:
    """Every (origin, destination) gap, each range tagged with where to replay it from.

    ``databases`` and ``events`` are where regions and their topics are read
    (the configured PostgreSQL servers and Kafka unless given)."""
    if region is not None:
        config.region(region)
    sessions: GapSessions = databases or RegionDatabases(config)
    log = events or _reader_log(config)
    facts = collect_facts(config, sessions)
    retained = kafka_retention(config, log)
    _reread_counters(sessions, facts)
    reachable = {r: f for r, f in facts.items() if f.reachable}
    origin_high = {r: f.last_sequence for r, f in reachable.items()}
    applied: dict[tuple[str, str], SeqRanges] = {}
    held: dict[tuple[str, str], SeqRanges] = {}
    for dest, f in reachable.items():
        held[(dest, dest)] = SeqRanges(f.outbox)
        for origin, ranges in f.inbox.items():
            applied[(origin, dest)] = SeqRanges(ranges)
            held[(dest, origin)] = f.inbox_held(origin)
    kafka_ranges = {o: SeqRanges.span(*r) for o, r in retained.items() if r}
    own_held = {r: SeqRanges(f.own) for r, f in reachable.items() if f.own is not None}
    plans = [
        p for p in plan_gaps(origin_high, applied, kafka_ranges, held, own_held)
        if p.gap.destination in reachable and (region is None or p.gap.destination == region)
    ]
    # the bounds said Kafka; ask it which of those it really has, then plan again
    asked: dict[str, SeqRanges] = {}
    for plan in plans:
        asked[plan.gap.origin] = asked.get(plan.gap.origin, SeqRanges()) | plan.ranges_from(Source.KAFKA)
    if any(asked.values()):
        verified = kafka_held(log, asked)
        for origin, span in list(kafka_ranges.items()):
            # what was not asked about keeps its bounds (it routes nothing); the last
            # retained sequence was read, so it stays evidence of the origin's high-water
            kafka_ranges[origin] = (span - asked.get(origin, SeqRanges())) | verified.get(origin, SeqRanges())
        plans = [
            p for p in plan_gaps(origin_high, applied, kafka_ranges, held, own_held)
            if p.gap.destination in reachable and (region is None or p.gap.destination == region)
        ]
    report = GapReport(plans=plans, facts=facts, retained=retained)
    for plan in plans:
        pair = (plan.gap.origin, plan.gap.destination)
        top = applied.get(pair, SeqRanges()).last or 0
        report.holes[pair] = plan.gap.ranges.intersection(SeqRanges.span(1, top)).count() if top else 0
        report.hlc_spans[pair] = _hlc_span(sessions, plan, reachable)
    report.lags = _lags(facts, retained, applied, kafka_ranges, region, report.hlc_spans,
                        _clock_ms(sessions, region if region in reachable else next(iter(reachable), None)))
    return report


def _clock_ms(sessions: GapSessions, region: str | None) -> float:
    """Now by a region database's clock (the one stamps are judged by); the host's
    clock only when no database answers."""
    if region is not None:
        try:
            with session_on(sessions, region, timeout=CONNECT_TIMEOUT) as store:
                return float(store.database_now_ms())
        except ReconcilerError:
            pass
    return float(wall_ms())


def _lags(
    facts: dict[str, RegionFacts], retained: dict[str, tuple[int, int] | None],
    applied: dict[tuple[str, str], SeqRanges], kafka_ranges: dict[str, SeqRanges], region: str | None,
    hlc_spans: dict[tuple[str, str], tuple[Timestamp | None, Timestamp | None]], now_ms: float,
) -> dict[tuple[str, str], Lag]:
    """Gap and lag of every (origin, destination) pair, destinations limited to ``region``
    when given. The lag's age is the oldest missing event's stamp: the in-flight tail's
    age, or older when the pair also has holes (an overstatement the gate errs on)."""
    lags: dict[tuple[str, str], Lag] = {}
    for dest, f in facts.items():
        if not f.reachable or (region is not None and dest != region):
            continue
        refused = by_origin(f.refused)
        for origin, of in facts.items():
            if origin == dest:
                continue
            settled = SeqRanges(f.discarded.get(origin, []))
            done = SeqRanges(f.inbox.get(origin, [])) - settled
            high = origin_high_water(
                of.last_sequence if of.reachable else None, kafka_ranges.get(origin, SeqRanges()).last,
                # the outbox is read after the counter: a live relay may have numbered past it
                SeqRanges(of.outbox).last if of.reachable else None,
                *(r.last for (o, _), r in applied.items() if o == origin),
            )
            low = hlc_spans.get((origin, dest), (None, None))[0]
            lags[(origin, dest)] = measure_lag(
                applied=done.count(), highest_applied=done.last or 0, origin_high=high,
                refused=refused.get(origin, SeqRanges()), settled=settled,
                kafka_retained_from=kafka_retained_from(
                    retained.get(origin), of.published_through if of.reachable else None, high),
                oldest_unapplied_age=max(0.0, (now_ms - low.wall_ms) / 1000) if low is not None else None,
            )
    return lags


def _reread_counters(sessions: GapSessions, facts: dict[str, RegionFacts]) -> None:
    """Read every origin's counter and outbox again, after its peers' inboxes and Kafka.

    A live origin keeps numbering while the others are read; a counter read first
    would be below sequences a peer or Kafka then shows, and the planner would take
    the live region for one restored from a stale backup (a false self-gap). Read
    last, a counter is at least everything anyone had seen of it (a really stale
    counter, after a restore, stays below the evidence, as it must), and the outbox
    read after it holds every sequence up to it, so no recent event looks lost. The
    outbox may also hold a few more, numbered between the two reads; the planner
    counts those as the origin's own, never as a self-gap nobody can fill.
    """
    for region, f in facts.items():
        if not f.reachable:
            continue
        try:
            with session_on(sessions, region, timeout=CONNECT_TIMEOUT) as store:
                last, published = store.relay_position(region)
                outbox = store.outbox_ranges(region)
                own = store.own_ranges(region)
        except ReconcilerError:
            continue
        f.last_sequence = max(f.last_sequence, last)
        f.published_through = max(f.published_through, published)
        f.outbox = outbox
        f.own = own


def _hlc_span(
    sessions: GapSessions, plan: GapPlan, reachable: dict[str, RegionFacts]
) -> tuple[Timestamp | None, Timestamp | None]:
    """HLC bounds of a gap's events, asked of whichever region still holds them."""
    origin = plan.gap.origin
    holders = [origin] if origin in reachable and origin != plan.gap.destination else []
    holders += [p.holder for p in plan.parts if p.holder and p.holder in reachable and p.holder not in holders]
    for holder in holders:
        try:
            with session_on(sessions, holder, timeout=CONNECT_TIMEOUT) as store:
                low, high = store.hlc_span(origin, plan.gap.ranges.ranges, holder_is_origin=holder == origin)
        except ReconcilerError:
            continue
        if low is not None:
            return low, high
    return None, None


def database_now_ms(config: Config, region: str) -> int:
    """The region's database clock, ms: the one clock stamps and skew are judged by."""
    with RegionDatabases(config).session(region, autocommit=True) as store:
        return store.database_now_ms()
