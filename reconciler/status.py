"""``reconciler status``: every region on one screen, even when some are down.

Each region's database is asked about itself (lifecycle state, outbox, inbox,
queues) and about its peers (the heartbeat view its sidecar keeps). Cross-region
figures are then put together from whatever answered:

- inbox lag and gaps of (origin -> destination) follow the one definition in
  :mod:`reconciler.gaps` (``measure_lag``), counted up to the origin's own relay
  counter when the origin answers, and the highest sequence of that origin any region
  has seen otherwise (a lower bound, flagged as such);
- a region's heartbeat age is the freshest news any reachable peer has of it, so a
  region whose database is down is still seen alive or dead through its peers;
- gaps are events that will not arrive by themselves: holes below what a region
  applied, events it refused (quarantined, policy-refused, held), an unapplied tail
  Kafka no longer retains, and events a region itself lost (restored from a stale
  backup) that peers have seen (``gaps.self_gap``). ``reconciler gaps`` gives the
  full plan with sources; this is the count an operator glances at.

An unreachable region is a row of the report (DOWN, with the redacted DSN and the
error), never an exception: status is what an operator runs when things are broken.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .config import Config
from .errors import ReconcilerError
from .gaps import SeqRanges, by_origin, kafka_retained_from, measure_lag, origin_high_water, self_gap
from .lifecycle import State
from .peers import ACTIVE, liveness
from .store.port import InboxProgress, ManualQueue, OutboxBacklog, RegionSessions, RegionStore, StoredPeerView
from .store.postgres_store import RegionDatabases
from .transport import kafka

#: an observer that has not rewritten its view for this long has no running sidecar
STALE_VIEW_FACTOR = 3.0


@dataclass(frozen=True)
class PeerOpinion:
    """What ``observer``'s sidecar last recorded about ``peer``."""

    observer: str
    peer: str
    heard: bool
    age_seconds: float | None
    liveness: str | None
    skew_ms: float | None
    peer_state: str | None
    peer_epoch: int | None
    #: the observer's sidecar has not refreshed this view recently (it is not running)
    stale: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "observer": self.observer, "peer": self.peer, "heard": self.heard,
            "age_seconds": _round(self.age_seconds), "state": self.liveness, "skew_ms": _round(self.skew_ms),
            "peer_state": self.peer_state, "peer_epoch": self.peer_epoch, "stale": self.stale,
        }


@dataclass(frozen=True)
class Lag:
    origin: str
    destination: str
    events: int
    seconds: float
    gaps: int
    #: "origin" when measured against the origin's relay counter, "seen" otherwise
    measured_against: str
    applied: int
    origin_high: int
    #: the parts of ``gaps`` (see reconciler.gaps.measure_lag)
    holes: int = 0
    refused: int = 0
    expired: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin, "destination": self.destination, "events": self.events,
            "seconds": _round(self.seconds), "gaps": self.gaps, "measured_against": self.measured_against,
            "applied": self.applied, "origin_high": self.origin_high,
            "holes": self.holes, "refused": self.refused, "expired": self.expired,
        }


@dataclass(frozen=True)
class RegionStatusReport:
    region: str
    reachable: bool
    dsn: str
    error: str | None = None
    state: str | None = None
    epoch: int | None = None
    reason: str | None = None
    clean_stop: bool | None = None
    #: seconds since this region's own sidecar last stamped its database
    sidecar_alive_age_seconds: float | None = None
    outbox_backlog: int | None = None
    outbox_oldest_age_seconds: float | None = None
    lag: dict[str, Lag] = field(default_factory=dict)
    gaps: int | None = None
    manual_queue: dict[str, int] = field(default_factory=dict)
    quarantine: int | None = None
    #: open invariant violations per table (only tables that have some)
    violations: dict[str, int] = field(default_factory=dict)
    #: freshest heartbeat age over the peers that answered, and the verdict it gives
    heartbeat_age_seconds: float | None = None
    seen_as: str | None = None
    skew_ms: float | None = None
    #: what each reachable peer thinks of this region
    seen_by: dict[str, PeerOpinion] = field(default_factory=dict)
    #: what this region thinks of its peers
    views: dict[str, PeerOpinion] = field(default_factory=dict)
    #: the last anti-entropy pass's findings that are not clean, per "table/peer"
    #: ("table/" for this region's leaves against its rows)
    divergence: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.reachable:
            out.append(f"{self.region}: database unreachable ({self.error})")
        elif self.state != State.ACTIVE.value:
            out.append(f"{self.region}: {self.state} ({self.reason})")
        if self.seen_as is not None and self.seen_as != ACTIVE:
            out.append(f"{self.region}: peers see it {self.seen_as} "
                       f"(last heartbeat {_seconds(self.heartbeat_age_seconds)} ago)")
        if self.gaps:
            out.append(f"{self.region}: {self.gaps} events missing that will not arrive by themselves")
        for where, found in sorted(self.divergence.items()):
            table, _, peer = where.partition("/")
            what = (f"{table} differs from {peer}: {found['keys']} keys in {found['buckets']} buckets" if peer
                    else f"{table}: {found['buckets']} Merkle leaves disagree with the rows")
            out.append(f"{self.region}: anti-entropy: {what} (checked {_seconds(found['age_seconds'])} ago)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region, "reachable": self.reachable, "dsn": self.dsn, "error": self.error,
            "state": self.state if self.reachable else "DOWN", "epoch": self.epoch, "reason": self.reason,
            "clean_stop": self.clean_stop, "sidecar_alive_age_seconds": _round(self.sidecar_alive_age_seconds),
            "outbox_backlog": self.outbox_backlog,
            "outbox_oldest_age_seconds": _round(self.outbox_oldest_age_seconds),
            "inbox_lag": {o: lag.to_dict() for o, lag in self.lag.items()},
            "gaps": self.gaps,
            "manual_queue": self.manual_queue,
            "manual_queue_depth": sum(self.manual_queue.values()) if self.reachable else None,
            "quarantine": self.quarantine,
            "violations_open": self.violations,
            "heartbeat_age_seconds": _round(self.heartbeat_age_seconds),
            "seen_as": self.seen_as,
            "skew_ms": _round(self.skew_ms),
            "seen_by": {o: v.to_dict() for o, v in self.seen_by.items()},
            "peer_views": {p: v.to_dict() for p, v in self.views.items()},
            "divergence": self.divergence,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class StatusReport:
    config_path: str
    generated_at: str
    regions: dict[str, RegionStatusReport]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Every region reachable, ACTIVE, and not seen SUSPECT/FAILED by its peers."""
        return not any(r.problems for r in self.regions.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "generated_at": self.generated_at,
            "config": self.config_path,
            "regions": {name: r.to_dict() for name, r in self.regions.items()},
            "problems": [p for r in self.regions.values() for p in r.problems],
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------ collection


@dataclass
class _Facts:
    """One region's answers, before cross-region figures are put together."""

    region: str
    dsn: str
    store: RegionStore | None = None
    error: str | None = None
    status: Any = None
    alive_age: float | None = None
    backlog: OutboxBacklog | None = None
    progress: dict[str, InboxProgress] = field(default_factory=dict)
    relay_high: int = 0
    #: this region's relay published through here (None: not read)
    published: int | None = None
    #: per origin, sequences refused here (open quarantine entries) and discarded here
    refused: dict[str, SeqRanges] = field(default_factory=dict)
    settled: dict[str, SeqRanges] = field(default_factory=dict)
    #: own sequences this region holds (None: not read, its counter stands in)
    own: SeqRanges | None = None
    queue: ManualQueue | None = None
    quarantine: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    views: dict[str, StoredPeerView] = field(default_factory=dict)
    divergence: dict[str, dict[str, Any]] = field(default_factory=dict)


def _collect(config: Config, databases: RegionSessions, region: str, timeout: int) -> _Facts:
    facts = _Facts(region, config.region(region).redacted_dsn)
    try:
        store = databases.open(region, autocommit=True, timeout=timeout)
    except ReconcilerError as exc:
        facts.error = exc.message
        return facts
    facts.store = store
    try:
        facts.status = store.region_status()
        if facts.status.last_alive_at is not None:
            facts.alive_age = max(0.0, time.time() - facts.status.last_alive_at.timestamp())
        facts.backlog = store.outbox_backlog(region)
        facts.progress = store.inbox_progress()
        facts.relay_high = store.relay_high_water(region)
        facts.published = store.relay_position(region)[1]
        facts.own = SeqRanges(store.own_ranges(region))
        facts.refused = by_origin(store.refused())
        facts.settled = {o: SeqRanges(r) for o, r in store.discarded().items()}
        facts.queue = store.manual_queue(list(config.tables))
        facts.quarantine = store.quarantined()
        facts.divergence = store.anti_entropy_divergence()
        for (table, _invariant), count in store.open_violation_counts().items():
            facts.violations[table] = facts.violations.get(table, 0) + count
        facts.views = store.peer_views()
    except ReconcilerError as exc:
        facts.error = exc.message
        _close(facts)
    return facts


def _close(facts: _Facts) -> None:
    if facts.store is not None:
        try:
            facts.store.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not hide the report
            pass
        facts.store = None


def collect_status(config: Config, *, timeout: int = 3, kafka_timeout: float = 5.0,
                   databases: RegionSessions | None = None) -> StatusReport:
    """Ask every region at once (a dead host costs one connect timeout, not one per region)."""
    regions = list(config.regions)
    sessions: RegionSessions = databases or RegionDatabases(config)
    with ThreadPoolExecutor(max_workers=len(regions)) as pool:
        collected = dict(zip(regions, pool.map(lambda r: _collect(config, sessions, r, timeout), regions),
                             strict=True))
    _reread_own(collected)
    notes: list[str] = []
    try:
        return _assemble(config, collected, notes, kafka_timeout)
    finally:
        for facts in collected.values():
            _close(facts)


def _reread_own(collected: dict[str, _Facts]) -> None:
    """Read again, now that every region answered, the own events of a region that seems
    to lack some its peers applied: regions are asked in parallel, and a live region read
    before its peers has numbered (and they applied) events after it answered. A region
    restored from a stale backup still lacks them the second time."""
    seen: dict[str, int] = {}
    for f in collected.values():
        for origin, p in f.progress.items():
            seen[origin] = max(seen.get(origin, 0), p.highest_sequence)
    for region, f in collected.items():
        if f.store is None or f.own is None or not self_gap(f.own, seen.get(region, 0)):
            continue
        try:
            f.relay_high = f.store.relay_high_water(region)
            f.own = SeqRanges(f.store.own_ranges(region))
        except ReconcilerError:
            pass  # the first answer stands


def _assemble(config: Config, facts: dict[str, _Facts], notes: list[str], kafka_timeout: float) -> StatusReport:
    hb = config.heartbeat
    up = {r: f for r, f in facts.items() if f.store is not None}
    # the highest sequence of each origin anyone has evidence of
    seen_high: dict[str, int] = {}
    for f in up.values():
        for origin, p in f.progress.items():
            seen_high[origin] = max(seen_high.get(origin, 0), p.highest_sequence)
    retained = _Retention(config, kafka_timeout, notes)
    opinions: dict[str, dict[str, PeerOpinion]] = {r: {} for r in facts}
    for observer, f in up.items():
        stale_after = max(STALE_VIEW_FACTOR * hb.interval_seconds, hb.suspect_after_seconds)
        for peer, v in f.views.items():
            if peer not in opinions:
                continue  # a region no longer in the config
            opinions[peer][observer] = PeerOpinion(
                observer=observer, peer=peer, heard=v.age_seconds is not None, age_seconds=v.age_seconds,
                liveness=(liveness(v.age_seconds, hb.suspect_after_seconds, hb.failed_after_seconds)
                          if v.age_seconds is not None else None),
                skew_ms=v.skew_ms, peer_state=v.peer_state, peer_epoch=v.peer_epoch,
                stale=v.written_age_seconds > stale_after,
            )
    reports = {}
    for region, f in facts.items():
        seen_by = opinions[region]
        age = _freshest(seen_by)
        skews = [o.skew_ms for o in seen_by.values() if o.skew_ms is not None and not o.stale]
        common: dict[str, Any] = {
            "region": region, "dsn": f.dsn, "seen_by": seen_by,
            "heartbeat_age_seconds": age,
            "seen_as": liveness(age, hb.suspect_after_seconds, hb.failed_after_seconds) if age is not None else None,
            "skew_ms": statistics.median(skews) if skews else None,
        }
        if f.store is None:
            reports[region] = RegionStatusReport(reachable=False, error=f.error, **common)
            continue
        lags = {
            origin: _lag(origin, region, f, facts.get(origin), seen_high, retained)
            for origin in config.peers(region)
        }
        # events this region wrote, lost (stale backup) and peers have seen
        own = f.own if f.own is not None else SeqRanges.span(1, f.relay_high)
        own_lost = self_gap(own, seen_high.get(region, 0)).count()
        assert f.backlog is not None and f.queue is not None
        reports[region] = RegionStatusReport(
            reachable=True, error=None,
            state=f.status.state.value, epoch=f.status.epoch, reason=f.status.reason,
            clean_stop=f.status.clean_stop, sidecar_alive_age_seconds=f.alive_age,
            outbox_backlog=f.backlog.events, outbox_oldest_age_seconds=f.backlog.oldest_age_seconds,
            lag=lags, gaps=sum(lag.gaps for lag in lags.values()) + own_lost,
            manual_queue=f.queue.depth_by_table, quarantine=f.quarantine, violations=f.violations,
            views={p: opinions[p][region] for p in config.peers(region) if region in opinions[p]},
            divergence=f.divergence,
            **common,
        )
    return StatusReport(
        config_path=str(config.path),
        generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        regions=reports,
        notes=tuple(notes),
    )


def _freshest(opinions: Mapping[str, PeerOpinion]) -> float | None:
    """The freshest heartbeat age, preferring observers whose sidecar still runs:
    a stopped observer's last view ages with the clock and says nothing new."""
    live = [o.age_seconds for o in opinions.values() if o.age_seconds is not None and not o.stale]
    if live:
        return min(live)
    old = [o.age_seconds for o in opinions.values() if o.age_seconds is not None]
    return min(old) if old else None


class _Retention:
    """What Kafka still holds of each origin's topic, asked only when a lag needs it."""

    def __init__(self, config: Config, timeout: float, notes: list[str]) -> None:
        self.config = config
        self.timeout = timeout
        self.notes = notes
        self._cache: dict[str, tuple[int, int] | None] = {}
        self._failed = False

    def of(self, origin: str) -> tuple[int, int] | None | bool:
        """(first, last) retained, None when the topic holds nothing, False when unknown."""
        if self._failed:
            return False
        if origin not in self._cache:
            try:
                settings = self.config.kafka_settings(origin)
                self._cache[origin] = kafka.retained_sequences(
                    settings, self.config.events_topic(origin), timeout=self.timeout
                )
            except ReconcilerError as exc:
                self._failed = True
                self.notes.append(f"Kafka retention unknown ({exc.message}): expired tails are not counted as gaps")
                return False
        return self._cache[origin]


def _lag(
    origin: str, destination: str, dest: _Facts, origin_facts: _Facts | None, seen_high: Mapping[str, int],
    retained: _Retention,
) -> Lag:
    mine = dest.progress.get(origin)
    applied = mine.applied if mine else 0
    highest = mine.highest_sequence if mine else 0
    reachable = origin_facts is not None and origin_facts.store is not None
    if reachable:
        assert origin_facts is not None
        origin_high, against = origin_high_water(origin_facts.relay_high, seen_high.get(origin, 0)), "origin"
    else:
        origin_high, against = seen_high.get(origin, 0), "seen"
    refused = dest.refused.get(origin, SeqRanges())
    settled = dest.settled.get(origin, SeqRanges())
    measure = partial(measure_lag, applied=applied, highest_applied=highest, origin_high=origin_high,
                      refused=refused, settled=settled)
    measured = measure()
    if measured.events:
        # Kafka is asked only when there is a tail that might have expired
        held = retained.of(origin)
        if held is not False:
            assert held is None or isinstance(held, tuple)
            published = origin_facts.published if reachable and origin_facts is not None else None
            measure = partial(measure, kafka_retained_from=kafka_retained_from(held, published, measured.origin_high))
            measured = measure()
    if measured.events:
        age = None
        if reachable and origin_facts is not None and origin_facts.store is not None:
            try:
                age = origin_facts.store.event_age(origin, measured.first_in_flight or highest + 1)
            except ReconcilerError:
                age = None
        if age is None and mine is not None:
            age = mine.last_applied_age_seconds
        measured = measure(oldest_unapplied_age=age)
    return Lag(origin, destination, measured.events, measured.seconds, measured.gap, against, applied,
               measured.origin_high, measured.holes, measured.refused, measured.expired)


# ------------------------------------------------------------------ rendering


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _seconds(value: float | None) -> str:
    if value is None:
        return "never"
    if value < 100:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _skew(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:+.3f}s"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def render(report: StatusReport) -> str:
    """The one screen an operator reads (plain text, fixed columns, no colour)."""
    lines = [f"reconciler status  {report.generated_at}  config {report.config_path}", ""]
    header = ("REGION", "STATE", "EPOCH", "HEARTBEAT", "OUTBOX", "LAG", "GAPS", "MANUAL", "QUARANTINE", "SKEW")
    rows: list[tuple[str, ...]] = []
    details: list[tuple[int, str]] = []
    for r in report.regions.values():
        heartbeat = _seconds(r.heartbeat_age_seconds) + (f" {r.seen_as}" if r.seen_as else "")
        if not r.reachable:
            rows.append((r.region, "DOWN", "-", heartbeat, "-", "-", "-", "-", "-", _skew(r.skew_ms)))
            details.append((len(rows) - 1, f"unreachable: {r.dsn}: {r.error}"))
            continue
        lag_events = sum(lag.events for lag in r.lag.values())
        rows.append((
            r.region, _dash(r.state), _dash(r.epoch), heartbeat, _dash(r.outbox_backlog), str(lag_events),
            _dash(r.gaps), str(sum(r.manual_queue.values())), _dash(r.quarantine), _skew(r.skew_ms),
        ))
        if r.state != State.ACTIVE.value:
            details.append((len(rows) - 1, f"{r.state}: {r.reason}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    numeric = {2, 4, 5, 6, 7, 8}

    def line(cells: tuple[str, ...]) -> str:
        out = [c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    lines.append(line(header))
    for i, row in enumerate(rows):
        lines.append(line(row))
        lines += [" " * (widths[0] + 2) + text for at, text in details if at == i]

    lines += ["", "INBOX LAG  origin -> destination: events behind, seconds behind, gaps"]
    for r in report.regions.values():
        for lag in r.lag.values():
            flag = "" if lag.measured_against == "origin" else "  (origin unreachable: against events seen)"
            lines.append(f"  {lag.origin:>10} -> {lag.destination:<10} {lag.events:>7} ev  "
                         f"{lag.seconds:7.1f}s  {lag.gaps:>5} gaps{flag}")
        if not r.reachable:
            lines.append(f"  {'*':>10} -> {r.region:<10} unknown (database unreachable)")

    lines += ["", "PEER VIEW  observer: peer state (heartbeat age, clock skew)"]
    for r in report.regions.values():
        if not r.reachable:
            lines.append(f"  {r.region:>10}: unknown (database unreachable)")
            continue
        parts = []
        for peer, v in r.views.items():
            verdict = v.liveness or "never heard"
            stale = ", view stale: sidecar not running" if v.stale else ""
            parts.append(f"{peer} {verdict} ({_seconds(v.age_seconds)}, {_skew(v.skew_ms)}{stale})")
        lines.append(f"  {r.region:>10}: " + ("; ".join(parts) if parts else "no heartbeats recorded"))

    violated = [(r.region, t, n) for r in report.regions.values() for t, n in sorted(r.violations.items())]
    if violated:
        lines += ["", "OPEN INVARIANT VIOLATIONS  region: table count (`reconciler violations list`)"]
        lines += [f"  {region:>10}: {table} {count}" for region, table, count in violated]

    problems = [p for r in report.regions.values() for p in r.problems]
    lines += ["", "OK: every region ACTIVE and reachable" if report.ok else "PROBLEMS"]
    lines += [f"  - {p}" for p in problems]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
