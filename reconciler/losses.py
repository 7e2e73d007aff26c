"""Accepting a loss: settling events that no source holds any more.

A region away longer than every copy of its peers' events was kept (Kafka's
retention, the origin's outbox and every other region's inbox, the last two pruned
after ``retention.keep_hours``) misses events that nothing can replay. Gap analysis
reports them as lost and the gate keeps the region out of ACTIVE, rightly: its rows
may be stale. Nothing automatic should decide that a write is gone, so an operator
does, once no region is unreachable (an unreachable region might still hold them):
each lost sequence is recorded in the region's quarantine as an entry with reason
``lost``, settled as discarded, with who and why (``reconciler.quarantine_log``).
Gaps, the metrics and the gate then count those sequences as settled, and
``recover`` can pass once Merkle verification finds, and repairs, the rows equal
to the peers'. A region's own events lost to a stale backup are not settled here:
the stale-backup runbook returns them from the peers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .errors import DataLossError
from .gap_analysis import RegionFacts, analyze_gaps, collect_facts
from .store.postgres_store import RegionDatabases


@dataclass
class AcceptedLoss:
    region: str
    actor: str
    reason: str
    dry_run: bool
    #: origin -> the lost ranges (accepted, or that a dry run would accept)
    lost: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: origin -> sequences recorded now (0 for ones an earlier acceptance settled)
    recorded: dict[str, int] = field(default_factory=dict)
    #: the region's own events no source holds (not settled here)
    own_lost: int = 0

    @property
    def count(self) -> int:
        return sum(hi - lo + 1 for ranges in self.lost.values() for lo, hi in ranges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region, "actor": self.actor, "reason": self.reason, "dry_run": self.dry_run,
            "lost": {o: [list(r) for r in ranges] for o, ranges in sorted(self.lost.items())},
            "lost_events": self.count, "recorded": dict(sorted(self.recorded.items())), "own_lost": self.own_lost,
        }


def _require_reachable(facts: Mapping[str, RegionFacts], region: str) -> None:
    unreachable = sorted(r for r, f in facts.items() if not f.reachable)
    if unreachable:
        raise DataLossError(
            f"{', '.join(unreachable)} unreachable: a region that cannot be asked may still hold the events;"
            " bring it back (or remove it from the config) before accepting a loss", region=region)


def accept_loss(config: Config, region: str, *, actor: str, reason: str, origin: str | None = None,
                dry_run: bool = False) -> AcceptedLoss:
    """Settle the events of peers (``origin``: one peer only) that ``region`` misses and
    no reachable source holds. Refuses while any region is unreachable."""
    config.region(region)
    if origin is not None and origin not in config.regions:
        raise DataLossError(f"unknown origin {origin!r}: the config's regions are {', '.join(config.regions)}",
                            region=region)
    _require_reachable(collect_facts(config), region)  # before the analysis, which also waits on Kafka
    report = analyze_gaps(config, region)
    _require_reachable(report.facts, region)
    result = AcceptedLoss(region=region, actor=actor, reason=reason, dry_run=dry_run)
    for plan in report.for_destination(region):
        lost = plan.lost
        if not lost:
            continue
        if plan.gap.origin == region:
            result.own_lost += lost.count()
        elif origin is None or plan.gap.origin == origin:
            result.lost[plan.gap.origin] = list(lost.ranges)
    if dry_run or not result.lost:
        return result
    retained = report.retained
    with RegionDatabases(config).session(region, autocommit=True) as store, store.transaction():
        for source, ranges in sorted(result.lost.items()):
            kept = retained.get(source)
            detail = (f"no source held it when accepted: {source}'s topic retained "
                      + (f"sequences {kept[0]}..{kept[1]}" if kept else "nothing")
                      + f", and neither {source}'s outbox nor any peer's inbox had it")
            result.recorded[source] = store.settle_lost(source, ranges, actor, reason, detail)
    return result
