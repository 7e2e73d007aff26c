"""Regional recovery: gap analysis, catch-up replay, Merkle verification, repair,
and the gate back to ACTIVE.

``analyze_gaps`` asks every reachable region what it holds (outbox, inbox
islands, relay position) and Kafka what it still retains, and lets the pure
planner (:mod:`reconciler.gaps`) say, for every (origin, destination) pair, what
is missing and where it can be replayed from.

``recover`` then fences the region, replays what it misses (:mod:`reconciler.replay`:
through the same inbox/apply path as live traffic, so dedup and conflict policies
hold and a re-run after SIGKILL just finds smaller gaps; a region restored from a
stale backup gets the events it lost back), verifies every replicated table against
every reachable peer with Merkle trees (:mod:`reconciler.verify`), repairs what
differs, and moves the region to ACTIVE only when the gate passes. Its own SQL is in
:mod:`reconciler.store.recovery_queries`; Kafka is read through the EventLog port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .apply import Applier
from .config import Config
from .errors import FencedError, ReconcilerError
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
from .hlc import Timestamp
from .lifecycle import GateDecision, GateInput, RootComparison, State, gate
from .logs import component_logger
from .metrics import Metrics
from .replay import ApplierSink, Replayed, Replayer, merged_by_hlc, plan_events
from .store import postgres as pg
from .store import quarantine as quarantine_store
from .store import recovery_queries, retention
from .transport import kafka
from .transport.port import EventLog
from .verify import verify_and_repair


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


def collect_facts(config: Config) -> dict[str, RegionFacts]:
    facts: dict[str, RegionFacts] = {}
    for region in config.regions:
        try:
            with pg.connect(config.region(region).dsn, region=region, timeout=3) as conn:
                last, published = pg.relay_position(conn, region)
                inbox = pg.inbox_ranges(conn)
                facts[region] = RegionFacts(
                    region=region, reachable=True, last_sequence=last, published_through=published,
                    # floors read after the ranges: a floor raised in between only makes
                    # this region claim fewer payloads than it has, never more
                    inbox=inbox, inbox_floors=retention.inbox_floors(conn), outbox=pg.outbox_ranges(conn, region),
                    refused=quarantine_store.refused(conn),
                    own=pg.own_ranges(conn, region),
                )
                # events an operator discarded here are settled: not missing, but not held either
                for origin, ranges in quarantine_store.discarded(conn).items():
                    facts[region].inbox[origin] = list(SeqRanges([*inbox.get(origin, []), *ranges]).ranges)
                    facts[region].discarded[origin] = ranges
        except ReconcilerError as exc:
            facts[region] = RegionFacts(region=region, reachable=False, error=str(exc))
    return facts


def kafka_retention(config: Config) -> dict[str, tuple[int, int] | None]:
    log = _reader_log(config)
    return {o: log.retained(o) for o in config.regions}


def kafka_held(config: Config, wanted: dict[str, SeqRanges]) -> dict[str, SeqRanges]:
    """Which of ``wanted`` (per origin) each origin's topic really holds, read from where
    each range starts: between the first and the last retained sequence there can be
    holes (an aborted batch of a fenced relay, compaction), and a hole routed to Kafka
    would be replayed from there forever, never from a peer that has it."""
    log = _reader_log(config)
    return {o: SeqRanges(log.retained_ranges(o, r.ranges)) for o, r in wanted.items() if r}


def _reader_log(config: Config) -> EventLog:
    """Gap analysis reads every origin's topic with the first region's settings."""
    return kafka.KafkaEventLog(config.kafka_settings(next(iter(config.regions))), config.events_topic)


def analyze_gaps(config: Config, region: str | None = None) -> GapReport:
    """Every (origin, destination) gap, each range tagged with where to replay it from."""
    if region is not None:
        config.region(region)
    facts = collect_facts(config)
    retained = kafka_retention(config)
    _reread_counters(config, facts)
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
        verified = kafka_held(config, asked)
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
        report.hlc_spans[pair] = _hlc_span(config, plan, reachable)
    report.lags = _lags(facts, retained, applied, kafka_ranges, region, report.hlc_spans,
                        _clock_ms(config, region if region in reachable else next(iter(reachable), None)))
    return report


def _clock_ms(config: Config, region: str | None) -> float:
    """Now by a region database's clock (the one stamps are judged by); the host's
    clock only when no database answers."""
    if region is not None:
        try:
            return float(_database_now_ms(config, region))
        except ReconcilerError:
            pass
    return time.time() * 1000


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


def _reread_counters(config: Config, facts: dict[str, RegionFacts]) -> None:
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
            with pg.connect(config.region(region).dsn, region=region, timeout=3) as conn:
                last, published = pg.relay_position(conn, region)
                outbox = pg.outbox_ranges(conn, region)
                own = pg.own_ranges(conn, region)
        except ReconcilerError:
            continue
        f.last_sequence = max(f.last_sequence, last)
        f.published_through = max(f.published_through, published)
        f.outbox = outbox
        f.own = own


def _hlc_span(
    config: Config, plan: GapPlan, reachable: dict[str, RegionFacts]
) -> tuple[Timestamp | None, Timestamp | None]:
    """HLC bounds of a gap's events, asked of whichever region still holds them."""
    origin = plan.gap.origin
    holders = [origin] if origin in reachable and origin != plan.gap.destination else []
    holders += [p.holder for p in plan.parts if p.holder and p.holder in reachable and p.holder not in holders]
    for holder in holders:
        try:
            with pg.connect(config.region(holder).dsn, region=holder, timeout=3) as conn:
                low, high = recovery_queries.hlc_span(conn, origin, plan.gap.ranges.ranges,
                                                      holder_is_origin=holder == origin)
        except ReconcilerError:
            continue
        if low is not None:
            return low, high
    return None, None


# ---------------------------------------------------------------- replay

@dataclass
class Progress:
    region: str
    phase: str
    done: int = 0
    total: int = 0
    detail: str = ""


@dataclass
class RecoveryReport:
    region: str
    dry_run: bool
    plan: dict[str, Any]
    replayed: dict[str, int] = field(default_factory=dict)
    own_events_returned: int = 0
    repaired: dict[str, list[str]] = field(default_factory=dict)
    divergent: dict[str, list[str]] = field(default_factory=dict)
    parked: dict[str, list[str]] = field(default_factory=dict)
    #: the last Merkle root comparisons, per table and reachable peer, at the watermark
    roots: list[RootComparison] = field(default_factory=list)
    gate: GateDecision | None = None
    state: str = ""
    epoch: int = 0
    seconds: float = 0.0
    transitions: list[str] = field(default_factory=list)
    #: events this region refused and nobody settled yet: reported, not replayed again
    refused: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lost_events(self) -> int:
        return int(self.plan.get("lost_events", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "dry_run": self.dry_run,
            "plan": self.plan,
            "replayed": self.replayed,
            "replayed_total": sum(self.replayed.values()),
            "own_events_returned": self.own_events_returned,
            "repaired": self.repaired,
            "divergent": self.divergent,
            "parked": self.parked,
            "roots": [r.to_dict() for r in self.roots],
            "gate": self.gate.to_dict() if self.gate else None,
            "state": self.state,
            "epoch": self.epoch,
            "transitions": self.transitions,
            "seconds": round(self.seconds, 3),
            "refused": self.refused,
        }


def recover(
    config: Config,
    region: str,
    *,
    dry_run: bool = False,
    actor: str = "operator",
    progress: Callable[[Progress], None] | None = None,
    metrics: Metrics | None = None,
    verify_rounds: int = 3,
) -> RecoveryReport:
    """Bring ``region`` to the state of its peers, verified, then back to ACTIVE."""
    started = time.monotonic()
    log = component_logger("replay", region)
    notify = progress or (lambda _p: None)
    dsn = config.region(region).dsn
    lease = pg.connect(dsn, autocommit=True, region=region)
    try:
        if not recovery_queries.try_recover_lock(lease, region):
            raise FencedError("another recover is already running for this region", region=region)
        report = analyze_gaps(config, region)
        result = RecoveryReport(region=region, dry_run=dry_run, plan=report.to_dict())
        result.refused = report.facts[region].refused if region in report.facts else []
        status = pg.region_status(lease)
        result.state, result.epoch = status.state.value, status.epoch
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        if status.state in (State.ACTIVE, State.SUSPECT):
            status = pg.transition(lease, State.FENCED, "recover: fencing before catch-up", actor)
            result.transitions.append(f"{State.FENCED.value} (epoch {status.epoch})")
        if status.state in (State.FENCED, State.VERIFYING):
            status = pg.transition(lease, State.CATCHING_UP, "recover: catch-up replay", actor)
            result.transitions.append(f"{State.CATCHING_UP.value} (epoch {status.epoch})")
        log.bind(epoch=status.epoch)
        log.info("recover started", extra={"fields": {"missing": report.to_dict()["total_missing"],
                                                      "lost": report.lost_events}})
        decision: GateDecision | None = None
        for _round in range(verify_rounds):
            _replay(config, region, report, result, notify, metrics)
            _reserve_own_sequences(config, region, report)
            if status.state is State.CATCHING_UP:
                status = pg.transition(lease, State.VERIFYING, "recover: replay done, verifying", actor)
                result.transitions.append(f"{State.VERIFYING.value} (epoch {status.epoch})")
            notify(Progress(region, "verify", detail="Merkle comparison"))
            result.divergent, result.parked = {}, {}
            _verify_and_repair(config, region, result)
            report = analyze_gaps(config, region)
            decision = gate(_gate_input(config, region, report, result), config.lifecycle.max_lag_events,
                            config.lifecycle.max_lag_seconds)
            if decision.passed:
                break
            if report.lost_events:
                break  # more rounds cannot bring back what nobody holds
        assert decision is not None
        result.gate = decision
        result.refused = report.facts[region].refused if region in report.facts else []
        result.plan = report.to_dict() if not result.replayed else result.plan
        if decision.passed:
            status = pg.transition(lease, State.ACTIVE, "recover: gate passed", actor)
        else:
            status = pg.transition(lease, State.CATCHING_UP, "recover: gate failed: " + "; ".join(decision.reasons),
                                   actor)
        result.transitions.append(f"{status.state.value} (epoch {status.epoch})")
        result.state, result.epoch = status.state.value, status.epoch
        result.seconds = time.monotonic() - started
        log.info("recover finished", extra={"fields": {"state": status.state.value, "gate": decision.to_dict(),
                                                       "replayed": result.replayed}})
        return result
    finally:
        lease.close()


def _replay(
    config: Config, region: str, report: GapReport, result: RecoveryReport,
    notify: Callable[[Progress], None], metrics: Metrics | None,
) -> None:
    plans = [p for p in report.for_destination(region) if p.gap.count - p.lost.count()]
    total = sum(p.gap.count - p.lost.count() for p in plans)
    if not total:
        return
    batch = config.apply_batch_size
    logs: dict[str, EventLog] = {}

    def log_for(origin: str) -> EventLog:
        if origin not in logs:
            logs[origin] = event_log(config, origin)
        return logs[origin]

    streams = [plan_events(p, log_for=log_for, dsn_of=lambda r: config.region(r).dsn, batch=batch) for p in plans]
    done = 0

    def counted(replayed: Sequence[Replayed]) -> None:
        nonlocal done
        result.own_events_returned += sum(1 for r in replayed if r.event.origin == region)
        for item in replayed:
            result.replayed[item.key] = result.replayed.get(item.key, 0) + 1
            if metrics is not None:
                metrics.record_replayed(item.event.origin, item.source.value)
        done += len(replayed)
        if metrics is not None:
            metrics.replay_remaining_events.set(max(total - done, 0))
        notify(Progress(region, "replay", done, total))

    notify(Progress(region, "replay", 0, total))
    with pg.connect(config.region(region).dsn, region=region, autocommit=True) as conn:
        sink = ApplierSink(conn, Applier(conn, region, config.tables, config.hlc_max_offset_ms))
        Replayer(sink, batch=batch, on_batch=counted).replay(merged_by_hlc(streams, lookahead=batch))


def event_log(config: Config, origin: str) -> EventLog:
    """The event log ``origin``'s topic is read through, with that region's Kafka
    settings (its principal may read its own topic)."""
    return kafka.KafkaEventLog(config.kafka_settings(origin), config.events_topic, region=origin)


def _reserve_own_sequences(config: Config, region: str, report: GapReport) -> None:
    """Peers and Kafka may know sequences of this region beyond its own counter (stale
    backup): make sure the relay never numbers a new event with one of them."""
    seen = 0
    for dest, facts in report.facts.items():
        if dest != region and facts.reachable:
            for lo_hi in facts.inbox.get(region, []):
                seen = max(seen, lo_hi[1])
    retained = report.retained.get(region)
    if retained:
        seen = max(seen, retained[1])
    own = report.facts.get(region)
    if own and own.reachable and seen > own.last_sequence:
        with pg.connect(config.region(region).dsn, region=region) as conn:
            # asked again now: a reservation above a live counter would leave numbers no
            # event ever gets, a gap every peer would wait for forever
            last, _ = pg.relay_position(conn, region)
            if seen > last:
                pg.reserve_sequences(conn, region, seen)


# ---------------------------------------------------------------- verify and repair

def _verify_and_repair(config: Config, region: str, result: RecoveryReport) -> None:
    """Compare and repair through :mod:`reconciler.verify`; the roots feed the gate.
    The watermark is read off the region's database clock, as the stamps are: a host
    whose wall clock is off would otherwise compare keys still in flight (host ahead)
    or take every recent event for a future one (host behind)."""
    found = verify_and_repair(config, region, now_ms=lambda: _database_now_ms(config, region))
    for table, keys in found.repaired.items():
        done = result.repaired.setdefault(table, [])
        done.extend(k for k in keys if k not in done)
    result.divergent, result.parked, result.roots = found.divergent, found.parked, found.roots


def _database_now_ms(config: Config, region: str) -> int:
    """The region's database clock, ms: the one clock stamps and skew are judged by."""
    with pg.connect(config.region(region).dsn, autocommit=True, region=region) as conn:
        return recovery_queries.database_now_ms(conn, region)


def _gate_input(config: Config, region: str, report: GapReport, result: RecoveryReport) -> GateInput:
    lags = [lag for (_origin, dest), lag in report.lags.items() if dest == region]
    stale_self = sum(p.gap.count for p in report.for_destination(region) if p.gap.origin == region)
    return GateInput(
        gap_events=sum(lag.gap for lag in lags) + stale_self,
        lost_events=report.lost_events,
        lag_events=sum(lag.events for lag in lags),
        lag_seconds=max((lag.seconds for lag in lags), default=0.0),
        divergent_keys={t: len(k) for t, k in result.divergent.items()},
        parked_keys=sum(len(k) for k in result.parked.values()),
        refused_events=len(report.facts[region].refused) if region in report.facts else 0,
        roots=tuple(result.roots),
    )
