"""Continuous anti-entropy: an ACTIVE region keeps comparing itself with its peers.

One pass compares every replicated table with every reachable peer through
:func:`reconciler.verify.compare_table` (the gate's own comparison, at the same kind
of watermark), publishes ``reconciler_merkle_divergent_buckets`` and
``reconciler_merkle_divergent_keys`` per table and peer, logs the divergent keys and
records the result in ``reconciler.anti_entropy`` for ``reconciler status``.

Most passes read the maintained leaves, which cost a small ``GROUP BY`` per side.
Those leaves only see writes that fire triggers, so every
``full_scan_interval_seconds`` a pass hashes the rows instead and recounts this
region's leaves from its rows. A full scan that took T seconds puts the next one off
by at least T / ``full_scan_max_share``, so it never holds more than that share of
the database. A table and peer a full scan found divergent stay on full scans until
one finds them equal: the leaves would otherwise call them equal and the gauge would
drop to 0 while the rows still differ.

With ``repair`` the divergent keys of this region are rewritten from replication
metadata (:func:`reconciler.verify.repair_keys`, this region only: each region's
sidecar repairs its own rows), stale leaves are recounted, and both are logged and
counted; rows that no region has metadata for are only reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config
from .hlc import Timestamp, wall_ms
from .lifecycle import RootComparison
from .logs import ComponentLogger
from .loop import Pause
from .metrics import Metrics
from .region_view import LoopContext
from .store.postgres_store import RegionDatabases
from .verify import (
    bounds,
    check_leaves,
    compare_table,
    parked_keys,
    reachable_peers,
    rebuild_leaves,
    repair_keys,
)


@dataclass
class PassResult:
    full_scan: bool
    roots: list[RootComparison] = field(default_factory=list)
    stale_leaves: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def divergent(self) -> bool:
        return any(not r.equal for r in self.roots) or any(self.stale_leaves.values())


class AntiEntropy:
    """The state between passes: when the next full scan is due, which pairs need one."""

    def __init__(
        self, config: Config, region: str, metrics: Metrics, log: ComponentLogger, *,
        now_ms: Callable[[], int] = wall_ms, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.region = region
        self.metrics = metrics
        self.log = log
        self.now_ms = now_ms
        self.clock = clock
        self.settings = config.anti_entropy
        self.next_full = clock() + self.settings.full_scan_interval_seconds
        #: (table, peer) a full scan found divergent, or whose leaves here are stale
        self.sticky: set[tuple[str, str]] = set()

    def run_pass(self) -> PassResult:
        started = self.clock()
        full = started >= self.next_full
        result = PassResult(full_scan=full)
        peers = reachable_peers(self.config, self.region)
        parked = parked_keys(self.config, [self.region, *peers])
        for table in self.config.tables:
            for peer in peers:
                by_scan = full or (table, peer) in self.sticky
                mark, ceiling = bounds(self.config, self.now_ms())
                found = compare_table(self.config, table, self.region, peer, mark=mark, ceiling=ceiling,
                                      parked=parked.get(table, set()), full_scan=by_scan)
                if found.divergent and self.settings.repair:
                    fixed = repair_keys(self.config, table, list(found.divergent), [self.region, peer],
                                        targets=[self.region], copy_unmanaged=False)
                    self._audit_repair(table, peer, fixed.repaired, fixed.unmanaged, result)
                    if fixed.repaired:
                        mark, ceiling = bounds(self.config, self.now_ms())
                        found = compare_table(self.config, table, self.region, peer, mark=mark, ceiling=ceiling,
                                              parked=parked.get(table, set()), full_scan=by_scan)
                if by_scan:
                    if found.root.equal:
                        self.sticky.discard((table, peer))
                    else:
                        self.sticky.add((table, peer))
                self._publish(found.root)
                result.roots.append(found.root)
            if full:
                stale = self._check_leaves(table, result)
                for peer in peers if stale else ():
                    self.sticky.add((table, peer))
        result.seconds = self.clock() - started
        if full:
            wait = max(self.settings.full_scan_interval_seconds, result.seconds / self.settings.full_scan_max_share)
            self.next_full = self.clock() + wait
        return result

    def _check_leaves(self, table: str, result: PassResult) -> int:
        check = check_leaves(self.config, table, self.region)
        if check.stale_buckets is None:
            return 0
        stale = len(check.stale_buckets)
        if stale and self.settings.repair:
            rebuild_leaves(self.config, table, self.region)
            self.log.warning("anti-entropy recounted stale Merkle leaves from the rows", extra={"fields": {
                "table": table, "stale_buckets": stale, "audit": "repair"}})
            check = check_leaves(self.config, table, self.region)
            stale = len(check.stale_buckets or ())
        if stale:
            self.log.warning("Merkle leaves disagree with the rows: a write bypassed the triggers",
                             extra={"fields": {"table": table, "stale_buckets": stale,
                                               "buckets": list(check.stale_buckets or ())[:self.settings.log_keys]}})
        self.metrics.merkle_stale_leaf_buckets.labels(table=table).set(stale)
        result.stale_leaves[table] = stale
        self._record(table, "", "leaves-vs-rows", None, stale, stale, [])
        return stale

    def _audit_repair(
        self, table: str, peer: str, repaired: list[str], unmanaged: list[str], result: PassResult,
    ) -> None:
        if repaired:
            self.metrics.anti_entropy_repaired_keys.labels(table=table).inc(len(repaired))
            done = result.repaired.setdefault(table, [])
            done.extend(k for k in repaired if k not in done)
            self.log.warning("anti-entropy repaired keys from replication metadata", extra={"fields": {
                "table": table, "peer": peer, "count": len(repaired), "keys": repaired[:self.settings.log_keys],
                "audit": "repair"}})
        if unmanaged:
            self.log.warning("divergent keys without replication metadata: not repaired automatically",
                             extra={"fields": {"table": table, "peer": peer, "count": len(unmanaged),
                                               "keys": unmanaged[:self.settings.log_keys]}})

    def _publish(self, root: RootComparison) -> None:
        m = self.metrics
        # roots that differ for a reason other than keys (columns, a truncated walk)
        # still count as one bucket, so the alert sees them
        buckets = root.divergent_buckets or (0 if root.equal else 1)
        m.merkle_divergent_buckets.labels(table=root.table, peer=root.peer).set(buckets)
        m.merkle_divergent_keys.labels(table=root.table, peer=root.peer).set(root.divergent_key_count)
        if not root.equal:
            self.log.warning("table differs from peer at the watermark", extra={"fields": {
                "table": root.table, "peer": root.peer, "watermark": root.watermark, "mode": root.mode,
                "divergent_keys": root.divergent_key_count, "divergent_buckets": root.divergent_buckets,
                "keys": list(root.divergent_keys[:self.settings.log_keys]), "note": root.note}})
        self._record(root.table, root.peer, root.mode, root.watermark, root.divergent_key_count, buckets,
                     list(root.divergent_keys[:self.settings.log_keys]))

    def _record(
        self, table: str, peer: str, mode: str, mark: str | None, keys: int, buckets: int, sample: list[str],
    ) -> None:
        with RegionDatabases(self.config).session(self.region, autocommit=True) as store:
            store.record_anti_entropy(table, peer, mode, Timestamp.parse(mark) if mark else None, keys, buckets,
                                      sample)


class AntiEntropySteps:
    """The sidecar's anti-entropy loop as a :class:`~reconciler.loop.Worker`: a pass
    every ``anti_entropy.interval_seconds`` while the region is ACTIVE; in any other
    state there is nothing to compare, which is progress too."""

    def __init__(self, ctx: LoopContext, log: ComponentLogger) -> None:
        self.ctx = ctx
        self.settings = ctx.config.anti_entropy
        self.runner = AntiEntropy(ctx.config, ctx.region, ctx.metrics, log) if self.settings.enabled else None
        self.next_pass = time.monotonic() + self.settings.interval_seconds

    def start(self) -> None:
        pass

    def step(self) -> Pause:
        if self.runner is None:
            return Pause(float("inf"))  # alive all the same: /healthz wants every loop running
        now = time.monotonic()
        if now < self.next_pass:
            return Pause(self.next_pass - now)
        self.next_pass = now + self.settings.interval_seconds
        if self.ctx.view.active():
            self.runner.run_pass()
        return Pause(self.settings.interval_seconds)

    def close(self) -> None:
        pass
