"""Regional recovery: fence, catch-up replay, verification and repair, and the gate
back to ACTIVE.

``recover`` takes the region's recover lock, plans from :func:`analyze_gaps`
(:mod:`reconciler.gap_analysis`), fences the region, replays what it misses
(:mod:`reconciler.replay`: through the same inbox/apply path as live traffic, so
dedup and conflict policies hold and a re-run after SIGKILL just finds smaller gaps;
a region restored from a stale backup gets the events it lost back), verifies every
replicated table against every reachable peer with Merkle trees
(:mod:`reconciler.verify`), repairs what differs, and moves the region to ACTIVE
only when the gate passes. Its own SQL is in :mod:`reconciler.store.recovery_queries`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .apply import Applier
from .config import Config
from .errors import FencedError, StoreError
from .gap_analysis import GapReport, RegionFacts, analyze_gaps, database_now_ms, reader_settings
from .lifecycle import GateDecision, GateInput, RootComparison, State, gate
from .logs import component_logger
from .metrics import Metrics
from .replay import ApplierSink, Replayed, Replayer, merged_by_hlc, plan_events
from .store.port import RegionStore
from .store.postgres_store import RegionDatabases
from .transport import kafka
from .transport.port import EventLog
from .verify import verify_and_repair

#: gap analysis lives in its own module; these names are what callers of recover know
__all__ = ["GapReport", "Progress", "RecoveryReport", "RegionFacts", "analyze_gaps", "event_log", "recover"]



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
    databases = RegionDatabases(config)
    with recover_lease(databases, region, "another recover is already running for this region") as lease:
        report = analyze_gaps(config, region, databases=databases)
        result = RecoveryReport(region=region, dry_run=dry_run, plan=report.to_dict())
        result.refused = report.facts[region].refused if region in report.facts else []
        status = lease.region_status()
        result.state, result.epoch = status.state.value, status.epoch
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        if status.state in (State.ACTIVE, State.SUSPECT):
            status = lease.transition(State.FENCED, "recover: fencing before catch-up", actor)
            result.transitions.append(f"{State.FENCED.value} (epoch {status.epoch})")
        if status.state in (State.FENCED, State.VERIFYING):
            status = lease.transition(State.CATCHING_UP, "recover: catch-up replay", actor)
            result.transitions.append(f"{State.CATCHING_UP.value} (epoch {status.epoch})")
        log.bind(epoch=status.epoch)
        log.info("recover started", extra={"fields": {"missing": report.to_dict()["total_missing"],
                                                      "lost": report.lost_events}})
        decision: GateDecision | None = None
        for _round in range(verify_rounds):
            _replay(config, databases, region, report, result, notify, metrics)
            _reserve_own_sequences(databases, region, report)
            if status.state is State.CATCHING_UP:
                status = lease.transition(State.VERIFYING, "recover: replay done, verifying", actor)
                result.transitions.append(f"{State.VERIFYING.value} (epoch {status.epoch})")
            notify(Progress(region, "verify", detail="Merkle comparison"))
            result.divergent, result.parked = {}, {}
            _verify_and_repair(config, region, result)
            report = analyze_gaps(config, region, databases=databases)
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
            status = lease.transition(State.ACTIVE, "recover: gate passed", actor)
        else:
            status = lease.transition(State.CATCHING_UP, "recover: gate failed: " + "; ".join(decision.reasons),
                                   actor)
        result.transitions.append(f"{status.state.value} (epoch {status.epoch})")
        result.state, result.epoch = status.state.value, status.epoch
        result.seconds = time.monotonic() - started
        log.info("recover finished", extra={"fields": {"state": status.state.value, "gate": decision.to_dict(),
                                                       "replayed": result.replayed}})
        return result


@contextmanager
def recover_lease(databases: RegionDatabases, region: str, busy: str) -> Iterator[RegionStore]:
    """The region's recover lock on a session of its own (FencedError saying ``busy``
    when another holds it), given back before the session closes: a closed session's
    server may hold it a moment longer, long enough to refuse the recover that follows."""
    lease = databases.open(region, autocommit=True)
    try:
        if not lease.try_recover_lock():
            raise FencedError(busy, region=region)
        try:
            yield lease
        finally:
            with contextlib.suppress(StoreError):
                lease.release_recover_lock()
    finally:
        lease.close()


def _replay(
    config: Config, databases: RegionDatabases, region: str, report: GapReport, result: RecoveryReport,
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

    streams = [plan_events(p, log_for=log_for, databases=databases, batch=batch) for p in plans]
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
    with databases.session(region, autocommit=True) as store:
        sink = ApplierSink(store, Applier(store, region, config.tables, config.hlc_max_offset_ms))
        Replayer(sink, batch=batch, on_batch=counted).replay(merged_by_hlc(streams, lookahead=batch))


def event_log(config: Config, origin: str) -> EventLog:
    """The event log ``origin``'s topic is read through, with that region's Kafka
    settings (its principal may read its own topic)."""
    return kafka.KafkaEventLog(reader_settings(config, origin), config.events_topic, region=origin)


def _reserve_own_sequences(databases: RegionDatabases, region: str, report: GapReport) -> None:
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
        with databases.session(region) as store:
            # asked again now: a reservation above a live counter would leave numbers no
            # event ever gets, a gap every peer would wait for forever
            last, _ = store.relay_position(region)
            if seen > last:
                store.reserve_sequences(region, seen)


# ---------------------------------------------------------------- verify and repair

def _verify_and_repair(config: Config, region: str, result: RecoveryReport) -> None:
    """Compare and repair through :mod:`reconciler.verify`; the roots feed the gate.
    The watermark is read off the region's database clock, as the stamps are: a host
    whose wall clock is off would otherwise compare keys still in flight (host ahead)
    or take every recent event for a future one (host behind)."""
    found = verify_and_repair(config, region, now_ms=lambda: database_now_ms(config, region))
    for table, keys in found.repaired.items():
        done = result.repaired.setdefault(table, [])
        done.extend(k for k in keys if k not in done)
    result.divergent, result.parked, result.roots = found.divergent, found.parked, found.roots


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
