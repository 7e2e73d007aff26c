"""Verification: is a replicated table identical in two regions, and repair where not.

One comparison routine, :func:`compare_table`, used by both callers: the gate back to
ACTIVE (:func:`reconciler.recovery.recover`) and the sidecar's continuous
anti-entropy. It reads the Merkle leaves from either source :mod:`reconciler.diff`
offers -- the maintained leaves (cheap) or a full scan of the rows (needed when the
leaves may be stale) -- and judges the differing keys as of an HLC watermark.

The watermark is *now minus the lag allowance* (``lifecycle.max_lag_seconds``):
an event stamped at or below it that one region has applied and the other has not
is older than the gate tolerates for lag, so it is missing (or quarantined, or
refused), never in flight. A differing key is left out of the comparison only when
every event that one side has and the other lacks is stamped above the watermark;
any other differing key, including one whose two regions applied exactly the same
events, is divergent. One exception to the age rule: an event its origin has not
published yet (still unnumbered or unacknowledged in its outbox) is on its way
whatever its age -- a region out of ACTIVE relays nothing, so its own writes made
during catch-up would otherwise hold the gate shut for good. Keys parked in the
manual queue (on either side) are left out too. Comparing the roots over the
remaining rows then amounts to "no divergent key": the differing keys are what the
Merkle walk narrows the roots' difference to.

An event stamped further ahead of now than ``hlc.max_offset_ms`` (a skewed clock) is
never in flight either: waiting for the watermark to pass it could take forever, so
a key it alone explains is divergent.

Why not "the lowest HLC every region has applied everything below": a quarantined or
refused event would hold that watermark back for good and excuse every later
difference, and computing it needs every origin reachable; the lag allowance needs
neither and is what the gate already trusts for "in flight".

Keys are named everywhere in the one canonical encoding of
:func:`reconciler.model.encode_key`; :func:`canonical_keys` turns the text a Merkle
walk reports for a key (PostgreSQL's output of each column) into it, through the
table's own column types.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .config import Config, TableConfig
from .conflict import counter_contribution, counter_total_with_lost, join_merge_states
from .diff import diff_regions
from .errors import ReconcilerError, StoreError
from .gaps import SeqRanges
from .hlc import Timestamp
from .lifecycle import RootComparison
from .merkle import DiffResult, Key
from .model import RowState, decode_key, encode_key
from .store import merkle_leaves
from .store import postgres as pg
from .store import quarantine as quarantine_store
from .store.counted import Counted, counted, keys_with_metadata
from .store.merkle_scan import bucket_sql, key_hash_sql, row_hash_sql
from .store.translate import translated

#: divergent keys a comparison names (the count covers them all)
MAX_NAMED_KEYS = 100


def watermark(now_ms: int, allowance_seconds: float) -> Timestamp:
    """The HLC as of which two regions must agree: now minus the lag allowance."""
    return Timestamp(max(0, now_ms - int(allowance_seconds * 1000)), 0)


def bounds(config: Config, now_ms: int) -> tuple[Timestamp, Timestamp]:
    """(watermark, ceiling): an event is in flight only when stamped above the first
    and at most the second (now plus the clock offset the HLC tolerates)."""
    ceiling = Timestamp.carried(now_ms + config.hlc_max_offset_ms, 0)
    return watermark(now_ms, config.lifecycle.max_lag_seconds), ceiling


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def reachable_peers(config: Config, region: str) -> list[str]:
    peers = []
    for peer in config.peers(region):
        try:
            pg.connect(config.region(peer).dsn, region=peer, timeout=3).close()
            peers.append(peer)
        except ReconcilerError:
            continue
    return peers


def parked_keys(config: Config, regions: Iterable[str]) -> dict[str, set[str]]:
    """Keys in the manual queue of any of ``regions``, per table."""
    parked: dict[str, set[str]] = {}
    for r in regions:
        with pg.connect(config.region(r).dsn, region=r) as conn:
            for table, keys in pg.open_conflict_keys(conn).items():
                parked.setdefault(table, set()).update(keys)
    return parked


# ---------------------------------------------------------------- keys


def _key_records(spec: TableConfig, keys: Sequence[str]) -> str:
    return json.dumps([decode_key(k, spec.key) for k in keys], default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # jsonb_populate_record reads a number from its text exactly
    raise TypeError(f"not JSON: {value!r}")


def canonical_keys(conn: pg.Connection, spec: TableConfig, keys: Sequence[Key]) -> list[str]:
    """The canonical encoding of keys given as PostgreSQL prints each key column (what
    a Merkle walk reports): each text goes through the column's own type, then
    ``to_jsonb`` under UTC, so ``7.50`` becomes ``7.5`` and ``["7","x"]`` ``[7,"x"]``."""
    if not keys:
        return []
    from psycopg import sql

    records = json.dumps([dict(zip(spec.key, k, strict=True)) for k in keys])
    query = sql.SQL(
        "SELECT k.ordinality, jsonb_build_array({cols})::text"
        " FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb) WITH ORDINALITY AS k ORDER BY k.ordinality"
    ).format(
        cols=sql.SQL(", ").join(sql.SQL("to_jsonb(k.{})").format(sql.Identifier(c)) for c in spec.key),
        t=sql.Identifier(spec.schema, spec.name),
    )
    with translated(table=spec.name, step="canonical keys"), conn.transaction():
        # the walk printed keys under the canonical settings; read them back the same way
        with merkle_leaves.canonical_settings(conn):
            found = conn.execute(query, (records,)).fetchall()
    return [encode_key(dict(zip(spec.key, json.loads(text, parse_float=Decimal), strict=True)), spec.key)
            for _ordinality, text in found]


def _rows_by_key(conn: pg.Connection, spec: TableConfig, keys: Sequence[str]) -> dict[str, Any]:
    """{key: the business row as JSON, or None}, matching keys by typed value."""
    from psycopg import sql

    if not keys:
        return {}
    match = sql.SQL(" AND ").join(sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in spec.key)
    query = sql.SQL(
        "SELECT k.ordinality, to_jsonb(t) FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb)"
        " WITH ORDINALITY AS k JOIN {t} t ON {match}"
    ).format(t=sql.Identifier(spec.schema, spec.name), match=match)
    rows: dict[str, Any] = dict.fromkeys(keys)
    for ordinality, row in conn.execute(query, (_key_records(spec, keys),)).fetchall():
        rows[keys[int(ordinality) - 1]] = row
    return rows


def leaf_buckets(conn: pg.Connection, spec: TableConfig, keys: Sequence[str]) -> int:
    """How many Merkle leaf buckets ``keys`` fall into."""
    if not keys:
        return 0
    from psycopg import sql

    query = sql.SQL("SELECT count(DISTINCT {b}) FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb) AS k").format(
        b=bucket_sql(key_hash_sql(spec.key), merkle_leaves.LEAF_BITS), t=sql.Identifier(spec.schema, spec.name))
    with translated(table=spec.name, step="leaf buckets"), conn.transaction():
        with merkle_leaves.canonical_settings(conn):
            row = conn.execute(query, (_key_records(spec, keys),)).fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------- judging keys


@dataclass(frozen=True)
class KeyView:
    """One region's view of some keys, read in one snapshot."""

    #: key -> (hlc, event id) of every event applied to it here (inbox and outbox)
    events: dict[str, tuple[tuple[int, str], ...]]
    #: key -> business row (None when absent)
    rows: dict[str, Any]
    #: events below this HLC may have been pruned
    horizon: int
    #: this region's own events not yet published to Kafka: no peer can have them
    #: before this region's relay runs, which it does only while ACTIVE
    pending: frozenset[str] = frozenset()


def key_view(config: Config, table: str, keys: list[str], region: str) -> KeyView:
    from psycopg import IsolationLevel

    spec = config.tables[table]
    with pg.connect(config.region(region).dsn, region=region) as conn, translated(region=region, step="verify keys"):
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            events: dict[str, tuple[tuple[int, str], ...]] = {}
            pending: set[str] = set()
            for k, hlc, e, unpublished in conn.execute(
                "SELECT row_key, hlc, event_id::text, false FROM reconciler.inbox"
                " WHERE table_name = %s AND row_key = ANY(%s)"
                " UNION ALL SELECT o.aggregateid, o.hlc, o.id::text,"
                " s.relay_sequence IS NULL OR s.relay_sequence > coalesce(r.published_through, 0)"
                " FROM reconciler.outbox o"
                " LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position"
                " LEFT JOIN reconciler.relay_state r ON r.origin = o.origin"
                " WHERE o.aggregatetype = %s AND o.aggregateid = ANY(%s)",
                (table, keys, table, keys)).fetchall():
                events[k] = (*events.get(k, ()), (int(hlc), e))
                if unpublished:
                    pending.add(e)
            row = conn.execute("SELECT horizon_hlc FROM reconciler.retention_state").fetchone()
            horizon = int(row[0]) if row else 0
            rows = _rows_by_key(conn, spec, keys)
    return KeyView(events, rows, horizon, frozenset(pending))


def judge_keys(
    a: KeyView, b: KeyView, keys: Iterable[str], mark: Timestamp, ceiling: Timestamp | None = None,
) -> tuple[set[str], set[str]]:
    """(divergent, in flight) among ``keys``; keys whose rows now agree are neither.

    In flight: some event one side applied and the other has not, and every such
    event either not yet published by its origin or stamped above ``mark`` (and not
    above ``ceiling``, the future). Everything else that differs is divergent.
    """
    # events below either region's retention horizon may be pruned on one side only
    horizon = max(a.horizon, b.horizon)
    packed = mark.pack()
    top = ceiling.pack() if ceiling is not None else None
    divergent: set[str] = set()
    in_flight: set[str] = set()
    for key in keys:
        if a.rows.get(key) == b.rows.get(key):
            continue
        ea = {e for e in a.events.get(key, ()) if e[0] >= horizon}
        eb = {e for e in b.events.get(key, ()) if e[0] >= horizon}
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
    spec = config.tables[table]
    diff: DiffResult = diff_regions(config, table, region, peer, full_scan=full_scan)
    notes = []
    if diff.columns_only_in_a or diff.columns_only_in_b:
        notes.append(f"columns differ ({', '.join([*diff.columns_only_in_a, *diff.columns_only_in_b])})")
    if diff.truncated:
        notes.append(f"more than {len(diff.differences)} keys differ; the walk stopped there")
    keys: list[str] = []
    if diff.differences:
        with pg.connect(config.region(region).dsn, region=region) as conn:
            keys = canonical_keys(conn, spec, [d.key for d in diff.differences])
    candidates = set(keys)
    parked_here = candidates & set(parked)
    candidates -= parked_here
    divergent: set[str] = set()
    in_flight: set[str] = set()
    if candidates:
        ordered = sorted(candidates)
        divergent, in_flight = judge_keys(
            key_view(config, table, ordered, region), key_view(config, table, ordered, peer), ordered, mark, ceiling)
    buckets = 0
    if divergent:
        with pg.connect(config.region(region).dsn, region=region) as conn:
            buckets = leaf_buckets(conn, spec, sorted(divergent))
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
      peers' states (:func:`reconciler.conflict.join_merge_states`) and a manual row
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
        with pg.connect(config.region(r).dsn, region=r) as conn:
            # one snapshot: a merge row's counters are judged against the events its region counted
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            states[r] = pg.load_states(conn, table, keys)
            if policy != "lww":
                donors[r] = counted(conn, r, table, keys)
            conn.commit()
    outcome = RepairOutcome([], [])
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
            try:
                _repair_one(config, table, key, r, policy, present, donors)
            except StoreError as exc:
                if exc.retryable:
                    raise
                outcome.refused.append((key, r, exc.message))
                refused = True
        if not refused:
            outcome.repaired.append(key)
    return outcome


def _repair_one(config: Config, table: str, key: str, region: str, policy: str,
                present: dict[str, RowState], donors: dict[str, Counted]) -> None:
    with pg.connect(config.region(region).dsn, region=region) as conn, translated(region=region, step="repair"), \
            conn.transaction():
        pg.lock_keys(conn, [(table, key)])
        # read again under the key lock: the inbox may have applied an event since
        # `present` was read, and writing an older state over it would undo it
        fresh = pg.load_states(conn, table, [key]).get(key)
        state: RowState | None
        if policy == "lww":
            state = max([*present.values(), *([fresh] if fresh else [])], key=lambda s: (s.hlc, s.origin))
        else:
            # merge and manual rows are rewritten from their own metadata (a write
            # around the pipeline) and otherwise left to their events, but for the
            # events this region accepted as lost: those never come, a peer's merge
            # state has what they counted
            state = fresh
            if policy == "merge":
                state = _join_lost(conn, key, region, table, fresh, present, donors)
            else:
                state = _newest_lost(conn, key, region, fresh, present, donors)
            if state is None:
                return
        writer = pg.TableWriter.build(conn, config.tables[table])
        pg.write_states(conn, writer, {key: state})


def _join_lost(conn: pg.Connection, key: str, region: str, table: str, fresh: RowState | None,
               present: dict[str, RowState], donors: dict[str, Counted]) -> RowState | None:
    lost = {o: SeqRanges(r) for o, r in quarantine_store.lost(conn).items()}
    if not lost:
        return fresh
    mine = counted(conn, region, table, [key])
    applied = {o: SeqRanges(r) for o, r in pg.applied_ranges(conn).items()}
    state = fresh
    for name, theirs in present.items():
        if name != region and name in donors:
            state = join_merge_states(state, theirs, _totals_with_lost(key, region, theirs, donors[name], mine,
                                                                      applied, lost))
    return state


def _newest_lost(conn: pg.Connection, key: str, region: str, fresh: RowState | None,
                 present: dict[str, RowState], donors: dict[str, Counted]) -> RowState | None:
    """A peer's newer manual version whose event this region will never apply (it
    accepted it as lost), taken as the event would have; else the region's own."""
    lost = {o: SeqRanges(r) for o, r in quarantine_store.lost(conn).items()}
    if not lost:
        return fresh
    applied = {o: SeqRanges(r) for o, r in pg.applied_ranges(conn).items()}
    state = fresh
    for name, theirs in sorted(present.items(), key=lambda item: (item[1].hlc, item[1].origin), reverse=True):
        if name == region or name not in donors or theirs.origin == region:
            continue
        if state is not None and (state.hlc, state.origin) >= (theirs.hlc, theirs.origin):
            break
        if _written_by_a_lost_event(key, theirs, donors[name], applied, lost):
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
    lost events counted (:func:`reconciler.conflict.counter_total_with_lost`), for
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
    from psycopg import sql

    spec = config.tables[table]
    ident = sql.Identifier(spec.schema, table)
    with pg.connect(config.region(source).dsn, region=source) as src, translated(region=source, step="repair read"):
        row = _rows_by_key(src, spec, [key])[key]
    match = sql.SQL(" AND ").join(sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in spec.key)
    with pg.connect(config.region(target).dsn, region=target) as dst, translated(region=target, step="repair"), \
            dst.transaction():
        pg.lock_keys(dst, [(table, key)])
        if pg.load_states(dst, table, [key]):
            return False
        # a copy of a row nobody has metadata for is a repair, not a new write to replicate
        dst.execute("SELECT set_config('reconciler.capture', 'off', true)")
        dst.execute(sql.SQL("DELETE FROM {t} AS t USING jsonb_populate_recordset(NULL::{t}, %s::jsonb) AS k"
                            " WHERE ").format(t=ident) + match, (_key_records(spec, [key]),))
        if row is not None:
            writer = pg.TableWriter.build(dst, spec)
            dst.execute(writer.upsert, (pg.json_text([row]),))
    return True


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
    from psycopg import IsolationLevel, sql

    spec = config.tables[table]
    with pg.connect(config.region(region).dsn, region=region) as conn, \
            translated(region=region, table=table, step="check leaves against rows"):
        leaf = merkle_leaves.load_leaf_table(conn, table)
        conn.commit()
        if leaf is None:
            return LeafCheck(table, None, "no maintained leaves")
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        with conn.transaction(), merkle_leaves.canonical_settings(conn):
            logged = {
                int(b): (int(h) % (1 << 64), int(n)) for b, h, n in conn.execute(
                    "SELECT bucket, sum(digest_delta)::text, sum(count_delta)::int8"
                    " FROM reconciler.merkle_leaf_delta WHERE table_id = %s GROUP BY bucket", (leaf.table_id,))
            }
            counted = {
                int(b): (int(h) % (1 << 64), int(n)) for b, h, n in conn.execute(sql.SQL(
                    "SELECT {b}, sum({h})::text, count(*) FROM {t} GROUP BY 1").format(
                    b=bucket_sql(key_hash_sql(leaf.key_columns), leaf.bits), h=row_hash_sql(leaf.columns),
                    t=sql.Identifier(spec.schema, spec.name)))
            }
    empty = (0, 0)
    stale = sorted(b for b in logged.keys() | counted.keys() if logged.get(b, empty) != counted.get(b, empty))
    return LeafCheck(table, tuple(stale))


def rebuild_leaves(config: Config, table: str, region: str) -> None:
    """Count ``table``'s leaves again from its rows (locks the table against writes meanwhile)."""
    with pg.connect(config.region(region).dsn, region=region) as conn:
        merkle_leaves.install_leaves(conn, config.tables[table], rebuild=True)
        conn.commit()


# ---------------------------------------------------------------- the gate's verification


@dataclass
class Verification:
    repaired: dict[str, list[str]]
    divergent: dict[str, list[str]]
    parked: dict[str, list[str]]
    roots: list[RootComparison]
    #: tables whose leaves here disagreed with the rows (recounted before comparing)
    leaves_rebuilt: dict[str, int] = field(default_factory=dict)


def _all_keys(config: Config, table: str, regions: list[str]) -> set[str]:
    keys: set[str] = set()
    for r in regions:
        with pg.connect(config.region(r).dsn, region=r) as conn:
            keys.update(keys_with_metadata(conn, table))
    return keys


def _has_accepted_losses(config: Config, region: str) -> bool:
    with pg.connect(config.region(region).dsn, region=region) as conn:
        found = bool(quarantine_store.lost(conn))
        conn.commit()
    return found


def verify_and_repair(
    config: Config, region: str, *, now_ms: Callable[[], int] = wall_ms, repair: bool = True,
) -> Verification:
    """Compare every replicated table of ``region`` with every reachable peer at the
    watermark; repair the divergent keys (``region`` and the peer both written, see
    :func:`repair_keys`) and compare again. The last comparisons are the gate's roots.

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
        differing: set[str] = set()
        for peer in peers:
            mark, ceiling = bounds(config, now_ms())
            found = compare_table(config, name, region, peer, mark=mark, ceiling=ceiling,
                                  parked=parked.get(name, set()))
            # after a loss every merge key may miss what the lost events counted, and
            # neither the gate's view (a busy key is always in flight) nor the rows
            # (other in-flight events can offset the loss) shows which: all are joined,
            # which brings in the lost contributions only (never an event on its way)
            suspects = sorted({*found.divergent, *_all_keys(config, name, [region, peer])}) if merge_losses \
                else list(found.divergent)
            if suspects and repair:
                done = out.repaired.setdefault(name, [])
                fixed = repair_keys(config, name, suspects, [region, peer])
                done.extend(k for k in fixed.repaired if k not in done)
                mark, ceiling = bounds(config, now_ms())
                found = compare_table(config, name, region, peer, mark=mark, ceiling=ceiling,
                                      parked=parked.get(name, set()))
            differing.update(found.divergent)
            out.roots.append(found.root)
        if differing:
            out.divergent[name] = sorted(differing)
        if parked.get(name):
            out.parked[name] = sorted(parked[name])
    return out
