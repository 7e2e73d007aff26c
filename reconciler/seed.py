"""Seeding: a new or emptied region gets a live region's data without stopping writers.

A region added to a running deployment cannot catch up from Kafka alone: rows that
existed before reconciler was installed (registered by ``migrate``) were never
events, and events older than the topics' retention are gone. ``seed`` copies the
source region as one consistent snapshot (``REPEATABLE READ``; its writers go on)
into the new region's database, in one transaction there, so that the new region
knows exactly which events its rows already contain:

- the business rows of every replicated table and their ``row_meta``;
- every event the source applied: its inbox rows, its floors, the losses it
  accepted, and the source's own relayed events, all recorded as applied;
- the source's own events committed before the snapshot but not numbered by its
  relay yet: their sequences are waited for and recorded too, or they would be
  applied a second time (a counter delta counted twice) when they arrive;
- the source's retention horizon, and a clock past every copied stamp.

The region is then CATCHING_UP, and ``recover`` replays what the peers wrote since
the snapshot, compares Merkle roots with every peer and only then lets it go ACTIVE.

Refused with a reason when the region is not empty, when it has events of its own
anywhere in the source (it is not new: restore it from a backup and recover), when
the source is not ACTIVE, has open manual conflicts (the parked versions would not
travel) or runs another schema version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .errors import SeedError
from .lifecycle import State
from .recovery import RecoveryReport, recover, recover_lease
from .store.port import RegionStore
from .store.postgres_store import RegionDatabases
from .store.seeding import SourceFacts


@dataclass
class SeedReport:
    region: str
    source: str
    #: business rows copied per table
    rows: dict[str, int] = field(default_factory=dict)
    #: events recorded as applied per origin (the source's inbox and its own events)
    events: dict[str, int] = field(default_factory=dict)
    #: own events of the source numbered after the snapshot and recorded
    numbered_after_snapshot: int = 0
    copy_seconds: float = 0.0
    seconds: float = 0.0
    recovery: RecoveryReport | None = None

    @property
    def active(self) -> bool:
        return self.recovery is not None and self.recovery.state == State.ACTIVE.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region, "source": self.source, "rows": dict(sorted(self.rows.items())),
            "events": dict(sorted(self.events.items())), "numbered_after_snapshot": self.numbered_after_snapshot,
            "copy_seconds": round(self.copy_seconds, 3), "seconds": round(self.seconds, 3),
            "recovery": self.recovery.to_dict() if self.recovery else None,
        }


def seed(config: Config, region: str, source: str, *, actor: str = "operator", then_recover: bool = True,
         numbering_timeout: float = 60.0, progress: Callable[[str], None] = lambda _m: None) -> SeedReport:
    """Copy ``source`` into the empty ``region`` (see the module doc), then recover it."""
    if region == source:
        raise SeedError("a region cannot be seeded from itself", region=region)
    config.region(region), config.region(source)  # unknown names fail here, naming the region
    started = time.monotonic()
    report = SeedReport(region, source)
    tables = list(config.tables.values())
    databases = RegionDatabases(config)
    with recover_lease(databases, region, "a recover or seed is already running for this region"), \
            databases.session(region) as dst, databases.session(source, autocommit=True) as src:
        _copy(src, dst, report, tables, actor, numbering_timeout, progress)
    report.copy_seconds = time.monotonic() - started
    if then_recover:
        progress(f"recovering {region}: catch-up since the snapshot, then Merkle verification against every peer")
        report.recovery = recover(config, region, actor=actor)
    report.seconds = time.monotonic() - started
    return report


def _copy(src: RegionStore, dst: RegionStore, report: SeedReport, tables: list[Any], actor: str,
          numbering_timeout: float, progress: Callable[[str], None]) -> None:
    region, source = report.region, report.source
    identity, state = dst.lock_target(tables)
    if identity != region:
        raise SeedError(f"the database configured for {region} says it is region {identity or '(none)'}: run "
                        "`reconciler migrate` for it, or fix its dsn", region=region)
    problems = dst.target_problems(tables)
    if problems:
        raise SeedError(f"region {region} is not empty ({'; '.join(problems)}): only a new or emptied region "
                        "can be seeded", region=region)
    src.begin_snapshot()
    facts = src.source_facts(region)
    _check_source(facts, region, source, dst.schema_version())
    for table in tables:
        report.rows[table.name] = dst.copy_table_from(src, table)
        progress(f"copied {table.name}: {report.rows[table.name]} rows")
    report.events = dst.copy_events_from(src)
    src.end_snapshot()
    if facts.unnumbered:
        progress(f"waiting for {source}'s relay to number {len(facts.unnumbered)} event(s) of the snapshot")
        deadline = time.monotonic() + numbering_timeout
        while (left := src.still_unnumbered(facts.unnumbered)) > 0:
            if time.monotonic() > deadline:
                raise SeedError(f"{left} event(s) of {source} in the snapshot were not numbered within "
                                f"{numbering_timeout:g} s: is its sidecar's relay running? Nothing was written "
                                f"to {region}", region=region, source=source)
            time.sleep(0.05)
        report.numbered_after_snapshot = dst.copy_numbered_from(src, facts.unnumbered)
        report.events[source] = report.events.get(source, 0) + report.numbered_after_snapshot
    dst.finish_seed(facts.horizon_hlc, facts.newest_hlc)
    # commits the whole copy with the state that keeps the region out of ACTIVE until recover's gate
    if state != State.CATCHING_UP.value:
        dst.transition(State.CATCHING_UP, f"seeded from {source}; catch-up and verification pending", actor)


def _check_source(facts: SourceFacts, region: str, source: str, target_version: int) -> None:
    if facts.state != State.ACTIVE.value:
        raise SeedError(f"source {source} is {facts.state}, not ACTIVE: seed from a region that passed its gate",
                        region=region, source=source)
    if facts.schema_version != target_version:
        raise SeedError(f"schema versions differ ({source}: {facts.schema_version}, {region}: {target_version}):"
                        " run `reconciler migrate` in both", region=region, source=source)
    if facts.open_conflicts:
        raise SeedError(f"source {source} has {facts.open_conflicts} open manual conflict(s), whose parked "
                        "versions a seed cannot carry: resolve them first (`reconciler conflicts list`)",
                        region=region, source=source)
    if facts.target_events:
        raise SeedError(f"{source} holds {facts.target_events} event(s) written by {region}: it is not a new "
                        "region; restore its database from a backup and run `reconciler recover` "
                        "(runbooks/stale-backup-restore.md)", region=region, source=source)
