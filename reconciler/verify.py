"""Verification: is a replicated table identical in two regions, and repair where not.

Everything that compares Merkle trees goes through one routine, :func:`diff_trees`:
walk both trees down from their first level (:func:`reconciler.merkle.walk` makes
every decision), collect the differing buckets' keys, fetch those keys' rows and
report them in key order. Two store modules feed it, through the same small
interface (:class:`TreePair`: a level's digests, some buckets' leaves, some rows):

- :mod:`reconciler.store.merkle_scan`: a full scan, the rows hashed and bucketed by
  ``GROUP BY`` on both sides; works on any table of any two databases;
- :mod:`reconciler.store.merkle_leaves`: the leaves maintained by triggers, whose
  first levels are sums over a log, so only the rows of differing leaves are read.

:func:`diff_replicated` picks the source (leaves where both sides can answer, else
a full scan, saying why); ``reconciler diff`` (:mod:`reconciler.diff`), the gate back
to ACTIVE (:func:`verify_and_repair`, called by :mod:`reconciler.recovery`) and the
sidecar's continuous anti-entropy (:mod:`reconciler.anti_entropy`) all come here.

:func:`compare_table` judges the differing keys of one table between two regions as
of an HLC watermark. The watermark is *now minus the lag allowance*
(``lifecycle.max_lag_seconds``): an event stamped at or below it that one region has
applied and the other has not is older than the gate tolerates for lag, so it is
missing (or quarantined, or refused), never in flight. A differing key is left out of
the comparison only when every event that one side has and the other lacks is
stamped above the watermark; any other differing key, including one whose two
regions applied exactly the same events, is divergent. One exception to the age
rule: an event its origin has not published yet (still unnumbered or unacknowledged
in its outbox) is on its way whatever its age -- a region out of ACTIVE relays
nothing, so its own writes made during catch-up would otherwise hold the gate shut
for good. Keys parked in the manual queue (on either side) are left out too.
Comparing the roots over the remaining rows then amounts to "no divergent key": the
differing keys are what the Merkle walk narrows the roots' difference to.

An event stamped further ahead of now than ``hlc.max_offset_ms`` (a skewed clock) is
never in flight either: waiting for the watermark to pass it could take forever, so
a key it alone explains is divergent.

Why not "the lowest HLC every region has applied everything below": a quarantined or
refused event would hold that watermark back for good and excuse every later
difference, and computing it needs every origin reachable; the lag allowance needs
neither and is what the gate already trusts for "in flight".

Keys are named everywhere in the one canonical encoding of
:func:`reconciler.model.encode_key`; :func:`reconciler.store.verify_queries.canonical_keys`
turns the text a Merkle walk reports for a key (PostgreSQL's output of each column)
into it, through the table's own column types.

This module decides and never speaks SQL: what it reads and writes goes through
:mod:`reconciler.store` (``merkle_scan``, ``merkle_leaves``, ``verify_queries``),
which translates driver errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import merkle
from .config import Config, TableConfig
from .errors import ConfigError, ReconcilerError, StoreError
from .gaps import SeqRanges
from .hlc import Timestamp, wall_ms
from .lifecycle import RootComparison
from .merkle import DiffResult, Digest, Key, KeyDifference, Leaf, LevelStats, Locator, Row, TreeShape, WalkLimits
from .model import RowState
from .policies import counter_contribution, counter_total_with_lost, join_merge_states
from .store import merkle_leaves
from .store.counted import Counted
from .store.merkle_scan import ScanOptions, open_scan
from .store.port import RegionStore
from .store.postgres_store import RegionDatabases
from .store.verify_queries import KeyView

__all__ = [
    "MAX_NAMED_KEYS",
    "KeyView",
    "LeafCheck",
    "RegionEvidence",
    "RepairOutcome",
    "TableComparison",
    "TableEvidence",
    "TreePair",
    "Verification",
    "bounds",
    "check_leaves",
    "compare_table",
    "diff_full_scan",
    "diff_regions",
    "diff_replicated",
    "diff_trees",
    "judge_keys",
    "judge_table",
    "key_view",
    "newest_state",
    "parked_keys",
    "reachable_peers",
    "rebuild_leaves",
    "repair_keys",
    "stale_buckets",
    "verify_and_repair",
    "watermark",
]

#: divergent keys a comparison names (the count covers them all)
MAX_NAMED_KEYS = 100


# ---------------------------------------------------------------- the comparison routine


class TreePair(Protocol):
    """Two sides' Merkle trees of one table, as a leaf source feeds them.

    Each call answers for both sides: ``level`` the digests of the non-empty buckets
    at ``bits`` (only under ``parents``, buckets at ``parent_bits``, when given),
    ``leaves`` every key of some buckets with its row hash, ``rows`` the rows at some
    locators. ``figures`` is what the source reports besides the walk (time per
    phase, ...), given the levels the walk read.
    """

    @property
    def shape(self) -> TreeShape: ...

    def level(
        self, bits: int, parent_bits: int | None, parents: Sequence[int]
    ) -> tuple[Mapping[int, Digest], Mapping[int, Digest]]: ...

    def leaves(self, bits: int, buckets: Sequence[int]) -> tuple[Mapping[Key, Leaf], Mapping[Key, Leaf]]: ...

    def rows(
        self, wanted_a: Sequence[Locator], wanted_b: Sequence[Locator]
    ) -> tuple[Mapping[Locator, Row], Mapping[Locator, Row]]: ...

    def figures(self, levels: Sequence[LevelStats]) -> Mapping[str, Any]: ...


def diff_trees(
    tree: TreePair,
    limits: WalkLimits | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    started: float | None = None,
) -> DiffResult:
    """The one comparison: walk both trees to the differing keys, fetch those keys'
    rows (from the snapshot the walk read) and report them in key order."""
    begun = clock() if started is None else started
    shape = tree.shape
    walked = merkle.walk(shape.estimated_rows, tree.level, tree.leaves, _leaf_hash, limits or WalkLimits(),
                         first_levels=shape.first_levels)
    rows_a, rows_b = tree.rows(
        [x.locator for _, _, x, _ in walked.found if x is not None and x.locator is not None],
        [y.locator for _, _, _, y in walked.found if y is not None and y.locator is not None],
    )
    differences = sorted(
        (KeyDifference(key, kind, _row_of(x, rows_a), _row_of(y, rows_b)) for key, kind, x, y in walked.found),
        key=lambda d: merkle.natural_order(d.key),
    )
    return DiffResult(
        table=shape.table,
        key_columns=shape.key_columns,
        rows_a=walked.rows_a,
        rows_b=walked.rows_b,
        buckets_compared=walked.buckets_compared,
        buckets_differing=walked.buckets_differing,
        differences=tuple(differences),
        seconds=clock() - begun,
        columns=shape.columns,
        columns_only_in_a=shape.columns_only_in_a,
        columns_only_in_b=shape.columns_only_in_b,
        truncated=walked.truncated,
        mode=shape.mode,
        levels=len(walked.levels),
        extra={"tree": [level.to_dict() for level in walked.levels], **tree.figures(walked.levels)},
    )


def _leaf_hash(leaf: Leaf) -> int:
    return leaf.hash


def _row_of(leaf: Leaf | None, rows: Mapping[Locator, Row]) -> Row | None:
    if leaf is None:
        return None
    if leaf.row is not None:
        return leaf.row
    if leaf.locator is None:
        return None
    return rows.get(leaf.locator)


def diff_full_scan(
    dsn_a: str, dsn_b: str, spec: TableConfig, *,
    options: ScanOptions | None = None, clock: Callable[[], float] = time.perf_counter,
) -> DiffResult:
    """Compare ``spec``'s table on two databases by hashing every row (nothing of ours
    needs to be installed: only its name, schema and key columns are used)."""
    opts = options or ScanOptions()
    started = clock()
    with open_scan(dsn_a, dsn_b, spec, opts, clock) as tree:
        result = diff_trees(tree, opts.limits, clock=clock, started=started)
    # closing both snapshots counts too
    return dataclasses.replace(result, seconds=clock() - started)


def diff_replicated(
    dsn_a: str,
    dsn_b: str,
    spec: TableConfig,
    *,
    options: ScanOptions | None = None,
    full_scan: bool = False,
    compact_min_rows: int = merkle_leaves.COMPACT_MIN_ROWS,
    clock: Callable[[], float] = time.perf_counter,
) -> DiffResult:
    """Compare a replicated table on two databases, through its maintained leaves.

    Uses the leaves (mode ``maintained-leaves``) when both databases have them and
    they describe the table as it is; otherwise, or with ``full_scan``, the full scan
    (mode ``full-scan``), whose ``extra["fallback_reason"]`` then says why. A long
    leaf log is compacted first (``compact_min_rows``; a standby is only read).
    """
    started = clock()
    opts = options or ScanOptions()
    reason = "requested"
    if not full_scan:
        try:
            with merkle_leaves.open_leaves(dsn_a, dsn_b, spec, options=opts, compact_min_rows=compact_min_rows,
                                           clock=clock) as tree:
                result = diff_trees(tree, opts.limits, clock=clock, started=started)
            return dataclasses.replace(result, seconds=clock() - started)
        except merkle_leaves.LeavesUnusable as exc:
            reason = exc.reason
    result = diff_full_scan(dsn_a, dsn_b, spec, options=opts, clock=clock)
    # the time spent finding out that the leaves could not answer counts too
    return dataclasses.replace(result, seconds=clock() - started, extra={**result.extra, "fallback_reason": reason})


def diff_regions(
    config: Config, table: str, region_a: str, region_b: str, *,
    options: ScanOptions | None = None, full_scan: bool = False,
) -> DiffResult:
    """:func:`diff_replicated` for a table of ``config`` between two of its regions;
    raises :class:`~reconciler.errors.ConfigError` for an unknown table or region."""
    spec = config.table(table)
    if region_a == region_b:
        raise ConfigError(f"diff compares two regions, got {region_a!r} twice", file=config.path)
    return diff_replicated(config.region(region_a).dsn, config.region(region_b).dsn, spec, options=options,
                           full_scan=full_scan)


# ---------------------------------------------------------------- watermark and peers


def watermark(now_ms: int, allowance_seconds: float) -> Timestamp:
    """The HLC as of which two regions must agree: now minus the lag allowance."""
    return Timestamp(max(0, now_ms - int(allowance_seconds * 1000)), 0)


def bounds(config: Config, now_ms: int) -> tuple[Timestamp, Timestamp]:
    """(watermark, ceiling): an event is in flight only when stamped above the first
    and at most the second (now plus the clock offset the HLC tolerates)."""
    ceiling = Timestamp.carried(now_ms + config.hlc_max_offset_ms, 0)
    return watermark(now_ms, config.lifecycle.max_lag_seconds), ceiling



def reachable_peers(config: Config, region: str) -> list[str]:
    peers = []
    for peer in config.peers(region):
        try:
            RegionDatabases(config).open(peer, timeout=3).close()
            peers.append(peer)
        except ReconcilerError:
            continue
    return peers


def parked_keys(config: Config, regions: Iterable[str]) -> dict[str, set[str]]:
    """Keys in the manual queue of any of ``regions``, per table."""
    parked: dict[str, set[str]] = {}
    for r in regions:
        with RegionDatabases(config).session(r, autocommit=True) as store:
            for table, keys in store.open_conflict_keys().items():
                parked.setdefault(table, set()).update(keys)
    return parked


# ---------------------------------------------------------------- judging keys


def key_view(config: Config, table: str, keys: list[str], region: str) -> KeyView:
    """``region``'s events, rows and retention horizon for ``keys``, in one snapshot."""
    with RegionDatabases(config).session(region) as store:
        return store.key_view(config.tables[table], keys)


def judge_keys(
    a: KeyView, b: KeyView, keys: Iterable[str], mark: Timestamp, ceiling: Timestamp | None = None,
) -> tuple[set[str], set[str]]:
    """(divergent, in flight) among ``keys``; keys whose rows now agree are neither.

    In flight: some event one side applied and the other has not, and every such
    event either not yet published by its origin or stamped above ``mark`` (and not
    above ``ceiling``, the future). Everything else that differs is divergent.
    """
    # events below either region's retention horizon may be pruned on one side only; a
    # region's own event it has not published is pruned nowhere, however old
    horizon = max(a.horizon, b.horizon)
    packed = mark.pack()
    top = ceiling.pack() if ceiling is not None else None
    divergent: set[str] = set()
    in_flight: set[str] = set()
    for key in keys:
        if a.rows.get(key) == b.rows.get(key):
            continue
        ea = {e for e in a.events.get(key, ()) if e[0] >= horizon or e[1] in a.pending}
        eb = {e for e in b.events.get(key, ()) if e[0] >= horizon or e[1] in b.pending}
        differing = ea ^ eb
        # an event its origin has not published yet is on its way whatever its age: a
        # region out of ACTIVE relays nothing until the gate lets it back
        stamps = [hlc for hlc, e in differing if e not in a.pending and e not in b.pending]
        if differing and all(packed < hlc and (top is None or hlc <= top) for hlc in stamps):
            in_flight.add(key)
        else:
            divergent.add(key)
    return divergent, in_flight


# ---------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class TableComparison:
    """A :class:`RootComparison` plus every divergent key (not only the named ones)."""

    root: RootComparison
    divergent: tuple[str, ...]
    #: keys that differ only by events above the watermark
    in_flight: tuple[str, ...] = ()


class TableEvidence(Protocol):
    """What judging one table between a region (side a) and a peer (side b) reads:
    the Merkle diff, the canonical names of the keys it reports, both sides' view of
    some keys, and how many leaf buckets some keys fall into."""

    def diff(self) -> DiffResult: ...

    def canonical_keys(self, keys: Sequence[Key]) -> list[str]: ...

    def key_views(self, keys: list[str]) -> tuple[KeyView, KeyView]: ...

    def leaf_buckets(self, keys: Sequence[str]) -> int: ...


@dataclass(frozen=True)
class RegionEvidence:
    """:class:`TableEvidence` read from two regions' databases."""

    config: Config
    table: str
    region: str
    peer: str
    full_scan: bool = False

    def diff(self) -> DiffResult:
        return diff_regions(self.config, self.table, self.region, self.peer, full_scan=self.full_scan)

    def canonical_keys(self, keys: Sequence[Key]) -> list[str]:
        with RegionDatabases(self.config).session(self.region, autocommit=True) as store:
            return store.canonical_keys(self.config.tables[self.table], keys)

    def key_views(self, keys: list[str]) -> tuple[KeyView, KeyView]:
        return (key_view(self.config, self.table, keys, self.region),
                key_view(self.config, self.table, keys, self.peer))

    def leaf_buckets(self, keys: Sequence[str]) -> int:
        with RegionDatabases(self.config).session(self.region, autocommit=True) as store:
            return store.leaf_buckets(self.config.tables[self.table], keys)


def compare_table(
    config: Config,
    table: str,
    region: str,
    peer: str,
    *,
    mark: Timestamp,
    ceiling: Timestamp | None = None,
    parked: set[str] | frozenset[str] = frozenset(),
    full_scan: bool = False,
) -> TableComparison:
    """Compare ``table`` between ``region`` and ``peer`` as of ``mark`` (see module doc)."""
    config.tables[table]  # an unknown table is a KeyError before anything connects
    return judge_table(RegionEvidence(config, table, region, peer, full_scan), table, peer,
                       mark=mark, ceiling=ceiling, parked=parked)


def judge_table(
    evidence: TableEvidence,
    table: str,
    peer: str,
    *,
    mark: Timestamp,
    ceiling: Timestamp | None = None,
    parked: set[str] | frozenset[str] = frozenset(),
) -> TableComparison:
    """The verdict of :func:`compare_table` from its evidence: the differing keys the
    Merkle diff found, less parked keys and keys in flight (:func:`judge_keys`)."""
    diff = evidence.diff()
    notes = []
    if diff.columns_only_in_a or diff.columns_only_in_b:
        notes.append(f"columns differ ({', '.join([*diff.columns_only_in_a, *diff.columns_only_in_b])})")
    if diff.truncated:
        notes.append(f"more than {len(diff.differences)} keys differ; the walk stopped there")
    keys = evidence.canonical_keys([d.key for d in diff.differences]) if diff.differences else []
    candidates = set(keys)
    parked_here = candidates & set(parked)
    candidates -= parked_here
    divergent: set[str] = set()
    in_flight: set[str] = set()
    if candidates:
        ordered = sorted(candidates)
        divergent, in_flight = judge_keys(*evidence.key_views(ordered), ordered, mark, ceiling)
    buckets = evidence.leaf_buckets(sorted(divergent)) if divergent else 0
    named = tuple(sorted(divergent)[:MAX_NAMED_KEYS])
    root = RootComparison(
        table=table, peer=peer, equal=not divergent and not notes, watermark=str(mark), mode=diff.mode,
        divergent_keys=named, divergent_key_count=len(divergent), divergent_buckets=buckets,
        in_flight_keys=len(in_flight), parked_keys=len(parked_here), note="; ".join(notes),
    )
    return TableComparison(root=root, divergent=tuple(sorted(divergent)), in_flight=tuple(sorted(in_flight)))


# ---------------------------------------------------------------- repair


@dataclass
class RepairOutcome:
    repaired: list[str]
    #: keys no region holds metadata for: only copying a row can fix them
    unmanaged: list[str]
    #: (key, region, why) where that region's database refused the winning version (a
    #: constraint the event's origin does not have): left divergent for the gate to report
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    #: merge keys whose counters miss events accepted as lost, where no peer's state
    #: gives those events' contribution exactly yet: divergent, however their rows compare
    incomplete: list[str] = field(default_factory=list)


def repair_keys(
    config: Config, table: str, keys: list[str], regions: list[str], *,
    targets: list[str] | None = None, copy_unmanaged: bool = True,
) -> RepairOutcome:
    """Make the business rows of ``keys`` in ``targets`` (default: every one of
    ``regions``) say what the replication metadata of ``regions`` says.

    - a row that disagrees with its own region's metadata (written around the
      pipeline) is rewritten from that metadata;
    - where regions' metadata disagree, last-writer-wins tables take the newest
      version by (HLC, region) everywhere, so a repair never puts an older version
      over a newer one (idempotent: the event that produced it, arriving later,
      changes nothing); merge and manual tables keep each region's own state and are
      left to their events (a manual version copied in ahead of its event would make
      that event a no-op there, so two concurrent versions would be parked only in
      the regions that met them as events), except what events this region
      accepted as lost wrote: those never come, so a merge row joins it in from the
      peers' states (:func:`reconciler.policies.join_merge_states`) and a manual row
      takes a peer's newer version that such an event wrote;
    - a row no region has metadata for exists only by direct writes: with
      ``copy_unmanaged`` the first region is made to match the second, otherwise it
      is only reported.
    """
    policy = config.tables[table].policy
    targets = list(regions) if targets is None else targets
    states: dict[str, dict[str, RowState]] = {}
    donors: dict[str, Counted] = {}
    for r in regions:
        with RegionDatabases(config).session(r) as store:
            states[r], held = store.states_and_counted(table, keys, with_counted=policy != "lww")
        if held is not None:
            donors[r] = held
    outcome = RepairOutcome([], [])
    losses: dict[str, _Losses] = {}
    with contextlib.ExitStack() as sessions:
        stores: dict[str, RegionStore] = {}
        for key in keys:
            present = {r: s[key] for r, s in states.items() if key in s}
            if not present:
                if copy_unmanaged and len(regions) > 1 and _copy_unmanaged_row(
                        config, table, key, source=regions[1], target=regions[0]):
                    outcome.repaired.append(key)
                else:
                    outcome.unmanaged.append(key)
                continue
            refused = False
            for r in targets:
                if r not in stores:  # one session per region for every key, not one per key
                    stores[r] = sessions.enter_context(RegionDatabases(config).session(r))
                try:
                    if not _repair_one(stores[r], config.tables[table], key, r, present, donors, losses):
                        outcome.incomplete.append(key)
                        refused = True
                except StoreError as exc:
                    if exc.retryable:
                        raise
                    outcome.refused.append((key, r, exc.message))
                    refused = True
            if not refused:
                outcome.repaired.append(key)
    return outcome


def newest_state(policy: str, present: Mapping[str, RowState], fresh: RowState | None) -> RowState | None:
    """What a repair writes for one key in a region whose state, read under the key's
    lock, is ``fresh``; None writes nothing.

    Last-writer-wins tables: the newest version by (HLC, region) among every
    region's (``present``) and ``fresh``, so a repair never puts an older version over
    a newer one. Merge and manual tables: the region's own state (its row rewritten
    from its own metadata), left to the events otherwise (a manual version copied in
    ahead of its event would make that event a no-op there, so two concurrent
    versions would be parked only in the regions that met them as events).
    """
    if policy != "lww":
        return fresh
    return max([*present.values(), *([fresh] if fresh else [])], key=lambda s: (s.hlc, s.origin))


@dataclass(frozen=True)
class _Losses:
    """What a region accepted as lost and what it applied, per origin."""

    lost: dict[str, SeqRanges]
    applied: dict[str, SeqRanges]


def _losses_of(store: RegionStore, region: str, cache: dict[str, _Losses]) -> _Losses:
    """Read once per repair pass: the lost ranges do not change under it, and applied
    ranges only grow, which can only make a later key's exact total knowable sooner."""
    if region not in cache:
        lost = {o: SeqRanges(r) for o, r in store.lost().items()}
        applied = {o: SeqRanges(r) for o, r in store.applied_ranges().items()} if lost else {}
        cache[region] = _Losses(lost, applied)
    return cache[region]


def _repair_one(store: RegionStore, spec: TableConfig, key: str, region: str, present: dict[str, RowState],
                donors: dict[str, Counted], losses: dict[str, _Losses]) -> bool:
    """Repair one key in one region; False when a merge row's counters miss events
    accepted as lost and no peer gives their contribution exactly (nothing written)."""
    exact = True

    def choose(fresh: RowState | None) -> RowState | None:
        nonlocal exact
        # merge and manual rows are left to their events, except for the events this
        # region accepted as lost: those never come, and a peer's state has them
        if spec.policy == "lww":
            return newest_state(spec.policy, present, fresh)
        known = _losses_of(store, region, losses)
        if not known.lost:
            return fresh
        if spec.policy == "merge":
            state, exact = join_with_lost(key, region, fresh, present, donors,
                                          store.counted(spec.name, [key]), known.applied, known.lost)
            return state if exact else None
        return _newest_lost(key, region, fresh, present, donors, known)

    store.rewrite_key(spec, key, choose)
    return exact


def join_with_lost(key: str, region: str, fresh: RowState | None, present: Mapping[str, RowState],
                   donors: Mapping[str, Counted], mine: Counted, applied: dict[str, SeqRanges],
                   lost: dict[str, SeqRanges]) -> tuple[RowState | None, bool]:
    """(``fresh`` joined with every peer's state, exact) for a merge key of ``region``,
    which accepted ``lost`` as lost: each peer's counter totals for an origin are
    taken where they can be worked out exactly (:func:`_totals_with_lost`). Not exact
    when the key has counters and some origin with lost events got no exact total from
    any peer: the counter may then miss what those events counted, and nothing else
    (the rows may well compare as in flight) would say so."""
    state = fresh
    known: set[str] = set()
    counters = False
    for name, theirs in present.items():
        if name != region and name in donors:
            totals = _totals_with_lost(key, region, theirs, donors[name], mine, applied, lost)
            known.update(origin for by_origin in totals.values() for origin in by_origin)
            counters = counters or _has_counters(theirs)
            state = join_merge_states(state, theirs, totals)
    unknown = {o for o in lost if o != region} - known
    return state, not (counters and unknown)


def _has_counters(state: RowState) -> bool:
    return any(entry.get("rule") == "counter" for entry in (state.meta.get("fields") or {}).values())


def _newest_lost(key: str, region: str, fresh: RowState | None, present: dict[str, RowState],
                 donors: dict[str, Counted], known: _Losses) -> RowState | None:
    """A peer's newer manual version whose event this region will never apply (it
    accepted it as lost), taken as the event would have; else the region's own."""
    state = fresh
    for name, theirs in sorted(present.items(), key=lambda item: (item[1].hlc, item[1].origin), reverse=True):
        if name == region or name not in donors or theirs.origin == region:
            continue
        if state is not None and (state.hlc, state.origin) >= (theirs.hlc, theirs.origin):
            break
        if _written_by_a_lost_event(key, theirs, donors[name], known.applied, known.lost):
            state = theirs
            break
    return state


def _written_by_a_lost_event(key: str, version: RowState, donor: Counted, applied: dict[str, SeqRanges],
                             lost: dict[str, SeqRanges]) -> bool:
    """Whether the event that wrote ``version`` in the donor is one this region accepted
    as lost: the donor still holds it under a lost sequence, or it lies below the
    donor's floor, where this region applied everything but its lost events."""
    origin = version.origin
    for event in donor.events.get(key, []):
        if event.origin == origin and event.hlc == version.hlc.pack():
            return event.sequence is not None and event.sequence in lost.get(origin, SeqRanges())
    floor = donor.floors.get(origin, 0)
    return floor > 0 and bool(lost.get(origin)) and \
        not (SeqRanges.span(1, floor) - applied.get(origin, SeqRanges()) - lost[origin])


def _totals_with_lost(key: str, region: str, donor_state: RowState, donor: Counted, mine: Counted,
                      applied: dict[str, SeqRanges], lost: dict[str, SeqRanges]) -> dict[str, dict[str, int | str]]:
    """column -> origin -> the counter total this region must hold for ``key`` with its
    lost events counted (:func:`reconciler.policies.counter_total_with_lost`), for
    each origin where that can be known exactly: the donor applied everything of it up
    to its floor, and this region everything below that floor but its lost events,
    with nothing of its own pruned above it."""
    totals: dict[str, dict[str, int | str]] = {}
    fields = donor_state.meta.get("fields") or {}
    for origin, floor in donor.floors.items():
        if origin == region or floor <= 0 or not lost.get(origin):
            continue
        missing = SeqRanges.span(1, floor) - applied.get(origin, SeqRanges()) - lost[origin]
        if missing or mine.floors.get(origin, 0) > floor:
            continue
        theirs, ours = donor.newer(key, origin, floor), mine.newer(key, origin, floor)
        for column, entry in fields.items():
            if entry.get("rule") != "counter":
                continue
            totals.setdefault(column, {})[origin] = counter_total_with_lost(
                entry["by_origin"].get(origin, 0),
                [counter_contribution(e.operation, e.payload, column) for e in theirs],
                [counter_contribution(e.operation, e.payload, column) for e in ours])
    return totals


def _copy_unmanaged_row(config: Config, table: str, key: str, source: str, target: str) -> bool:
    """Copy a row nobody has metadata for; False (nothing written) if the target has
    metadata for it by the time its key lock is held."""
    databases = RegionDatabases(config)
    with databases.session(source) as src, databases.session(target) as dst:
        return dst.copy_unmanaged_row(src, config.tables[table], key)


# ---------------------------------------------------------------- leaves against rows


@dataclass(frozen=True)
class LeafCheck:
    table: str
    #: leaf buckets whose maintained digest disagrees with the rows (writes the
    #: triggers did not see); None when the table has no usable leaves
    stale_buckets: tuple[int, ...] | None
    reason: str = ""


def check_leaves(config: Config, table: str, region: str) -> LeafCheck:
    """Recount ``table``'s leaves from its rows and compare with the maintained ones,
    in one snapshot (a write logs its leaf delta in its own transaction, so the two
    agree exactly unless a write bypassed the triggers)."""
    with RegionDatabases(config).session(region) as store:
        found = store.leaves_and_rows(config.tables[table])
    if found is None:
        return LeafCheck(table, None, "no maintained leaves")
    return LeafCheck(table, tuple(stale_buckets(*found)))


def stale_buckets(logged: Mapping[int, tuple[int, int]], counted: Mapping[int, tuple[int, int]]) -> list[int]:
    """Leaf buckets whose logged (digest, rows) differ from the counted ones, ascending.

    :func:`reconciler.merkle.differing_buckets`' rule on raw pairs: a log that missed
    inserts (triggers disabled) and saw their deletes sums to a negative count, which
    a :class:`~reconciler.merkle.Digest` refuses."""
    empty = (0, 0)
    return sorted(b for b in logged.keys() | counted.keys() if logged.get(b, empty) != counted.get(b, empty))


def rebuild_leaves(config: Config, table: str, region: str) -> None:
    """Count ``table``'s leaves again from its rows (locks the table against writes meanwhile)."""
    with RegionDatabases(config).session(region) as store:
        store.rebuild_leaves(config.tables[table])


# ---------------------------------------------------------------- the gate's verification


@dataclass
class Verification:
    repaired: dict[str, list[str]]
    divergent: dict[str, list[str]]
    parked: dict[str, list[str]]
    roots: list[RootComparison]
    #: tables whose leaves here disagreed with the rows (recounted before comparing)
    leaves_rebuilt: dict[str, int] = field(default_factory=dict)


def _compare_now(config: Config, table: str, region: str, peer: str, parked: set[str],
                 now_ms: Callable[[], int]) -> TableComparison:
    mark, ceiling = bounds(config, now_ms())
    return compare_table(config, table, region, peer, mark=mark, ceiling=ceiling, parked=parked)


def _all_keys(config: Config, table: str, regions: list[str]) -> set[str]:
    keys: set[str] = set()
    for r in regions:
        with RegionDatabases(config).session(r, autocommit=True) as store:
            keys.update(store.keys_with_metadata(table))
    return keys


def _has_accepted_losses(config: Config, region: str) -> bool:
    with RegionDatabases(config).session(region, autocommit=True) as store:
        return bool(store.lost())


def verify_and_repair(
    config: Config, region: str, *, now_ms: Callable[[], int] = wall_ms, repair: bool = True,
) -> Verification:
    """Compare every replicated table of ``region`` with every reachable peer at the
    watermark; repair the divergent keys in ``region`` and every reachable peer at
    once (see :func:`repair_keys`) and compare again. The last comparisons, all taken
    after the last repair, are the gate's roots.

    ``region``'s own leaves are first checked against its rows and recounted when a
    write bypassed their triggers (a restore, a fix with triggers disabled): the
    comparison then reads leaves that describe the rows. Peers' leaves are their own
    sidecars' business (anti-entropy full scans).
    """
    peers = reachable_peers(config, region)
    parked = parked_keys(config, [region, *peers])
    out = Verification({}, {}, {}, [])
    losses = _has_accepted_losses(config, region)
    for name in config.tables:
        merge_losses = losses and config.tables[name].policy == "merge"
        stale = check_leaves(config, name, region).stale_buckets
        if stale and repair:
            rebuild_leaves(config, name, region)
            out.leaves_rebuilt[name] = len(stale)
        keep = parked.get(name, set())
        differing: set[str] = set()
        found = {peer: _compare_now(config, name, region, peer, keep, now_ms) for peer in peers}
        # after a loss every merge key may miss what the lost events counted, and neither
        # the gate's view (a busy key is always in flight) nor the rows (other in-flight
        # events can offset the loss) shows which: all are joined, which brings in the
        # lost contributions only (never an event on its way)
        suspects = {k for f in found.values() for k in f.divergent}
        if merge_losses and peers:
            suspects |= _all_keys(config, name, [region, *peers])
        if suspects and repair:
            # every reachable region at once: repairing against one peer at a time
            # would change rows already compared with another
            fixed = repair_keys(config, name, sorted(suspects), [region, *peers])
            out.repaired[name] = list(fixed.repaired)
            found = {peer: _compare_now(config, name, region, peer, keep, now_ms) for peer in peers}
            # a counter still missing lost events may compare as in flight: it is divergent
            differing.update(fixed.incomplete)
        for peer in peers:
            differing.update(found[peer].divergent)
            out.roots.append(found[peer].root)
        if differing:
            out.divergent[name] = sorted(differing)
        if parked.get(name):
            out.parked[name] = sorted(parked[name])
    return out
