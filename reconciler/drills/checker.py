"""The checker that judges a drill: pure, from the history and what every region holds.

Inputs are plain values: the acknowledged writes (the history file), one
:class:`RegionSnapshot` per region (outbox, inbox, rows, conflicts, quarantine,
Merkle roots) and the pairwise ``diff_tables`` results, all read by
:mod:`reconciler.drills.observe` once the drill has quiesced. Nothing here talks
to a database, so every verdict can be unit-tested with hand-made states and
re-derived later from a saved history.

What is proved, and how:

- **no acknowledged write lost**: every acknowledged event id is in every region,
  either in its inbox or (for its own events) in its outbox;
- **nothing applied twice**: no event id twice in one inbox, no region applying its
  own events as remote ones, inbox rows per origin equal to that origin's relayed
  outbox rows, and counters equal to the sum of every committed delta (a double
  apply of a delta cannot hide there);
- **regions converged**: ``diff_tables`` finds no differing key between any pair
  and the Merkle roots (sum of row hashes, row count) agree, keys parked in the
  manual queue excepted (and listed);
- **conflicts accounted for**: every key written concurrently in two regions has a
  record in ``reconciler.conflicts`` somewhere (decided by its policy, or parked /
  resolved for manual tables), and no lww/merge conflict waits for an operator;
- **oracles**: lww rows are the greatest ``(hlc, origin)`` committed write; merge
  counters are sums and set columns follow add-wins observed-remove; manual keys
  that never conflicted hold their last write.

"Committed" means acknowledged (the history) plus in-doubt: rows found in an
origin's outbox that the client never saw acknowledged (a commit whose reply was
lost to a crash) and operator resolutions. The oracles must use them, since they
are real writes; the loss check uses only what was acknowledged.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import WriteRecord

# ---------------------------------------------------------------- input values


@dataclass(frozen=True)
class CommittedEvent:
    """A row of an origin's outbox: an event that committed there."""

    event_id: str
    origin: str
    sequence: int | None
    table: str
    key: str
    op: str
    hlc: int
    prior: int | None
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class InboxEntry:
    origin: str
    sequence: int
    event_id: str


@dataclass(frozen=True)
class ConflictEntry:
    conflict_id: str
    table: str
    key: str
    kind: str
    policy: str
    outcome: str
    status: str


@dataclass(frozen=True)
class RegionSnapshot:
    """Everything the checker needs of one region, read after the drill quiesced.

    ``state`` is None when the region's database could not be reached.
    ``roots`` are per-table Merkle roots (hash sum mod 2**64, row count) computed
    without the keys parked anywhere, so that regions holding different versions of
    a parked key can still be compared.
    """

    region: str
    state: str | None
    outbox: tuple[CommittedEvent, ...] = ()
    inbox: tuple[InboxEntry, ...] = ()
    rows: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    conflicts: tuple[ConflictEntry, ...] = ()
    quarantine: Mapping[str, int] = field(default_factory=dict)
    roots: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class PairDiff:
    """What ``diff_tables`` said about one table between two regions."""

    table: str
    a: str
    b: str
    keys: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    key: tuple[str, ...]
    policy: str
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Expectations:
    """What a scenario declares about its outcome beyond the universal rules."""

    #: quarantine reason -> minimum count summed over regions (the scenario injected them)
    quarantine_required: Mapping[str, int] = field(default_factory=dict)
    #: reasons that may appear without being required (e.g. a retention-rolling marker)
    quarantine_allowed: frozenset[str] = frozenset()
    #: every region must end ACTIVE
    all_active: bool = True
    #: the scenario restarts or heals something, so an RTO must have been measured
    rto_expected: bool = True
    rto_limit_seconds: float | None = None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "passed": self.passed, "detail": self.detail}
        if self.data:
            doc["data"] = dict(self.data)
        return doc


@dataclass(frozen=True)
class Verdict:
    events_written: int
    events_lost: int
    duplicates_applied: int
    regions_converged: bool
    checks: tuple[Check, ...]
    in_doubt: int = 0
    parked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    conflicts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    quarantine: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


# ---------------------------------------------------------------- committed writes


@dataclass(frozen=True)
class _Write:
    """A committed write in one shape, whichever side (history or outbox) it came from."""

    event_id: str
    origin: str
    table: str
    key: str
    op: str
    hlc: int
    prior: int | None
    values: Mapping[str, Any] | None
    deltas: Mapping[str, Any]
    set_add: Mapping[str, Sequence[Any]]
    set_remove: Mapping[str, Sequence[Any]]
    acknowledged: bool

    @property
    def stamp(self) -> tuple[int, str]:
        return (self.hlc, self.origin)


def _from_record(r: WriteRecord) -> _Write:
    return _Write(r.event_id, r.region, r.table, r.key, r.op, r.hlc, r.prior, r.values, r.deltas, r.set_add,
                  r.set_remove, True)


def _from_outbox(e: CommittedEvent) -> _Write:
    p = e.payload
    values = p.get("values")
    return _Write(
        e.event_id, e.origin, e.table, e.key, e.op, e.hlc, e.prior,
        dict(values) if isinstance(values, Mapping) else None,
        dict(p.get("deltas") or {}), dict(p.get("set_add") or {}), dict(p.get("set_remove") or {}), False,
    )


def committed_writes(history: Sequence[WriteRecord], snapshots: Mapping[str, RegionSnapshot]) -> list[_Write]:
    """Acknowledged writes plus the committed ones the client never saw acknowledged."""
    known = {r.event_id for r in history}
    out = [_from_record(r) for r in history]
    seen = set(known)
    for snap in snapshots.values():
        for event in snap.outbox:
            if event.origin == snap.region and event.event_id not in seen:
                seen.add(event.event_id)
                out.append(_from_outbox(event))
    return out


# ---------------------------------------------------------------- oracles (pure)


def _visible(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A row for comparison: NULL columns dropped (a payload may omit them)."""
    if row is None:
        return None
    return {k: v for k, v in row.items() if v is not None}


def lww_oracle(writes: Iterable[_Write]) -> dict[str, dict[str, Any] | None]:
    """Per key, the row of the greatest ``(hlc, origin)`` write (None: deleted)."""
    best: dict[str, _Write] = {}
    for w in writes:
        held = best.get(w.key)
        if held is None or w.stamp > held.stamp:
            best[w.key] = w
    out: dict[str, dict[str, Any] | None] = {}
    for key, w in best.items():
        gone = w.op == "delete" or (w.op == "resolve" and w.values is None)
        out[key] = None if gone else _visible(w.values)
    return out


@dataclass
class _MergeKey:
    write: tuple[int, str] | None = None
    delete: tuple[int, str] | None = None
    counters: dict[str, int | float] = field(default_factory=dict)
    #: column -> canonical element text -> (greatest stamp, element)
    adds: dict[str, dict[str, tuple[tuple[int, str], Any]]] = field(default_factory=dict)
    removes: dict[str, dict[str, tuple[tuple[int, str], Any]]] = field(default_factory=dict)


def _element_key(element: Any) -> str:
    return json.dumps(element, separators=(",", ":"))


def merge_oracle(writes: Iterable[_Write], rules: Mapping[str, str]) -> dict[str, dict[str, Any] | None]:
    """Per key: counter columns as sums, set columns as add-wins observed-remove sets
    (sorted), None when the row is deleted. Other columns are not predicted."""
    state: dict[str, _MergeKey] = defaultdict(_MergeKey)
    for w in writes:
        k = state[w.key]
        if w.op == "delete":
            k.delete = w.stamp if k.delete is None else max(k.delete, w.stamp)
            continue
        k.write = w.stamp if k.write is None else max(k.write, w.stamp)
        for column, value in (w.values or {}).items():
            rule = rules.get(column)
            if rule == "counter" and w.op == "insert" and isinstance(value, int | float):
                k.counters[column] = k.counters.get(column, 0) + value
            elif rule == "set" and w.op == "insert" and isinstance(value, list):
                for element in value:
                    _stamp(k.adds.setdefault(column, {}), element, w.stamp)
        for column, delta in w.deltas.items():
            k.counters[column] = k.counters.get(column, 0) + delta
        for column, elements in w.set_add.items():
            for element in elements:
                _stamp(k.adds.setdefault(column, {}), element, w.stamp)
        for column, elements in w.set_remove.items():
            for element in elements:
                _stamp(k.removes.setdefault(column, {}), element, w.stamp)
    out: dict[str, dict[str, Any] | None] = {}
    for key, k in state.items():
        if k.write is None or (k.delete is not None and k.delete > k.write):
            out[key] = None
            continue
        row: dict[str, Any] = dict(k.counters)
        for column, rule in rules.items():
            if rule != "set":
                continue
            adds, removes = k.adds.get(column, {}), k.removes.get(column, {})
            present = [
                element for text, (stamp, element) in adds.items()
                if (text not in removes or stamp >= removes[text][0]) and (k.delete is None or stamp > k.delete)
            ]
            row[column] = sorted(present, key=_element_key)
        out[key] = row
    return out


def _stamp(stamps: dict[str, tuple[tuple[int, str], Any]], element: Any, stamp: tuple[int, str]) -> None:
    text = _element_key(element)
    held = stamps.get(text)
    if held is None or stamp > held[0]:
        stamps[text] = (stamp, element)


def concurrent_keys(writes: Iterable[_Write]) -> dict[str, set[str]]:
    """table -> keys written by two regions where neither writer had seen the other's
    write (each one's ``prior`` is below the other's stamp). Two deletes agree and are
    left out; operator resolutions end conflicts rather than make them."""
    by_key: dict[tuple[str, str], list[_Write]] = defaultdict(list)
    for w in writes:
        if w.op != "resolve":
            by_key[(w.table, w.key)].append(w)
    out: dict[str, set[str]] = defaultdict(set)
    for (table, key), group in by_key.items():
        if len({w.origin for w in group}) < 2:
            continue
        if _has_concurrent_pair(group):
            out[table].add(key)
    return out


def _has_concurrent_pair(group: list[_Write]) -> bool:
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            if a.origin == b.origin or (a.op == "delete" and b.op == "delete"):
                continue
            a_saw_b = a.prior is not None and a.prior >= b.hlc
            b_saw_a = b.prior is not None and b.prior >= a.hlc
            if not a_saw_b and not b_saw_a:
                return True
    return False


# ---------------------------------------------------------------- the verdict


def check(
    history: Sequence[WriteRecord],
    snapshots: Mapping[str, RegionSnapshot],
    diffs: Sequence[PairDiff],
    tables: Mapping[str, TableSpec],
    expectations: Expectations = Expectations(),
    rto_seconds: float | None = None,
) -> Verdict:
    """Judge a drill. Every check is computed even when an earlier one fails, so a
    report always says everything that went wrong, not just the first thing."""
    regions = sorted(snapshots)
    checks: list[Check] = []
    writes = committed_writes(history, snapshots)
    in_doubt = sum(1 for w in writes if not w.acknowledged and w.op != "resolve")
    parked = _parked(snapshots)

    unreachable = [r for r in regions if snapshots[r].state is None]
    checks.append(Check(
        "regions_reachable", not unreachable,
        "every region's database answered" if not unreachable else
        "unreachable: " + ", ".join(f"{r} ({snapshots[r].error})" for r in unreachable),
    ))

    lost_check, events_lost = _lost(history, snapshots)
    checks.append(lost_check)
    dup_check, duplicates = _duplicates(snapshots)
    checks.append(dup_check)
    checks.append(_delivered(snapshots))
    checks.append(_counters(writes, snapshots, tables))
    checks.append(_sets(writes, snapshots, tables))
    checks.append(_lww(writes, snapshots, tables))
    checks.append(_manual_single_writer(writes, snapshots, tables))
    converged_check = _converged(snapshots, diffs, tables, parked)
    checks.append(converged_check)
    checks.append(_conflicts_accounted(writes, snapshots, tables))
    checks.append(_quarantine(snapshots, expectations))
    if expectations.all_active:
        states = {r: snapshots[r].state for r in regions}
        not_active = {r: s for r, s in states.items() if s != "ACTIVE"}
        checks.append(Check("regions_active", not not_active,
                            "every region ended ACTIVE" if not not_active else f"not ACTIVE: {not_active}"))
    if expectations.rto_expected:
        ok = rto_seconds is not None and (
            expectations.rto_limit_seconds is None or rto_seconds <= expectations.rto_limit_seconds)
        limit = f" (limit {expectations.rto_limit_seconds:.0f}s)" if expectations.rto_limit_seconds else ""
        checks.append(Check(
            "rto_measured", ok,
            f"recovered {rto_seconds:.2f}s after the fault ended{limit}" if rto_seconds is not None
            else "the region never became ACTIVE and caught up after the fault ended",
        ))
    return Verdict(
        events_written=len(history),
        events_lost=events_lost,
        duplicates_applied=duplicates,
        regions_converged=converged_check.passed and not unreachable,
        checks=tuple(checks),
        in_doubt=in_doubt,
        parked={t: tuple(sorted(k)) for t, k in parked.items() if k},
        conflicts=_conflict_summary(snapshots),
        quarantine={r: dict(snapshots[r].quarantine) for r in regions if snapshots[r].quarantine},
    )


def _parked(snapshots: Mapping[str, RegionSnapshot]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for snap in snapshots.values():
        for c in snap.conflicts:
            if c.status == "open":
                out[c.table].add(c.key)
    return out


def _held(snap: RegionSnapshot) -> set[str]:
    ids = {e.event_id for e in snap.inbox}
    ids.update(e.event_id for e in snap.outbox if e.origin == snap.region)
    return ids


def _lost(history: Sequence[WriteRecord], snapshots: Mapping[str, RegionSnapshot]) -> tuple[Check, int]:
    held = {r: _held(s) for r, s in snapshots.items()}
    missing: dict[str, list[str]] = {}
    for record in history:
        absent = [r for r, ids in held.items() if record.event_id not in ids]
        if absent:
            missing[record.event_id] = absent
    examples = [f"{eid} missing in {', '.join(where)}" for eid, where in list(missing.items())[:5]]
    detail = (f"all {len(history)} acknowledged writes are in every region" if not missing else
              f"{len(missing)} of {len(history)} acknowledged writes are missing somewhere: " + "; ".join(examples))
    return Check("no_acknowledged_write_lost", not missing, detail, {"lost": len(missing)}), len(missing)


def _duplicates(snapshots: Mapping[str, RegionSnapshot]) -> tuple[Check, int]:
    """Event-level double applies, per region: an event id twice in the inbox (the
    same event under two sequences), a sequence twice, or a region's own event
    applied as a remote one."""
    extra = 0
    notes: list[str] = []
    for region, snap in sorted(snapshots.items()):
        ids = Counter(e.event_id for e in snap.inbox)
        twice = sum(n - 1 for n in ids.values() if n > 1)
        seqs = Counter((e.origin, e.sequence) for e in snap.inbox)
        twice_seq = sum(n - 1 for n in seqs.values() if n > 1)
        own = sum(1 for e in snap.inbox if e.origin == region)
        if twice or twice_seq or own:
            notes.append(f"{region}: {twice} event ids and {twice_seq} (origin, sequence) pairs applied more than "
                         f"once, {own} own events applied as remote")
        extra += twice + twice_seq + own
    detail = "no event applied twice in any region" if not extra else "; ".join(notes)
    return Check("nothing_applied_twice", not extra, detail, {"duplicates": extra}), extra


def _delivered(snapshots: Mapping[str, RegionSnapshot]) -> Check:
    """Inbox rows per origin == that origin's relayed outbox rows, by event id; and
    nothing left unrelayed. Holds for in-doubt events too (they committed)."""
    problems: list[str] = []
    relayed: dict[str, set[str]] = {}
    for origin, snap in snapshots.items():
        own = [e for e in snap.outbox if e.origin == origin]
        relayed[origin] = {e.event_id for e in own if e.sequence is not None}
        stranded = sum(1 for e in own if e.sequence is None)
        if stranded:
            problems.append(f"{origin}: {stranded} outbox rows never relayed")
    for dest, snap in sorted(snapshots.items()):
        by_origin: dict[str, set[str]] = defaultdict(set)
        for e in snap.inbox:
            by_origin[e.origin].add(e.event_id)
        for origin in sorted(snapshots):
            if origin == dest:
                continue
            have, want = by_origin.get(origin, set()), relayed.get(origin, set())
            if have != want:
                problems.append(f"{dest} holds {len(have)} events of {origin}, whose outbox relayed {len(want)} "
                                f"({len(want - have)} missing, {len(have - want)} unknown to the origin)")
    detail = ("every region's inbox holds exactly each peer's relayed outbox" if not problems
              else "; ".join(problems))
    return Check("inbox_matches_outbox", not problems, detail)


def _rows(snap: RegionSnapshot, table: str) -> Mapping[str, Mapping[str, Any]]:
    return snap.rows.get(table, {})


def _counters(
    writes: Sequence[_Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
) -> Check:
    wrong: list[str] = []
    compared = 0
    for name, spec in tables.items():
        counters = {c: r for c, r in spec.fields.items() if r == "counter"}
        if spec.policy != "merge" or not counters:
            continue
        expected = merge_oracle([w for w in writes if w.table == name], spec.fields)
        for region, snap in sorted(snapshots.items()):
            rows = _rows(snap, name)
            for key, want in expected.items():
                if want is None:
                    continue
                got = rows.get(key)
                for column in counters:
                    compared += 1
                    value = None if got is None else got.get(column)
                    if value != want.get(column, 0):
                        wrong.append(f"{region} {name}.{column}[{key}] = {value}, committed deltas sum to "
                                     f"{want.get(column, 0)}")
    detail = (f"{compared} counter values equal the sum of committed deltas" if not wrong
              else f"{len(wrong)} counters differ: " + "; ".join(wrong[:5]))
    return Check("counters_exact", not wrong, detail)


def _sets(writes: Sequence[_Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec]) -> Check:
    wrong: list[str] = []
    compared = 0
    for name, spec in tables.items():
        sets = [c for c, r in spec.fields.items() if r == "set"]
        if spec.policy != "merge" or not sets:
            continue
        expected = merge_oracle([w for w in writes if w.table == name], spec.fields)
        for region, snap in sorted(snapshots.items()):
            rows = _rows(snap, name)
            for key, want in expected.items():
                got = rows.get(key)
                if want is None or got is None:
                    if (want is None) != (got is None):
                        state = "deleted" if want is None else "present"
                        wrong.append(f"{region} {name}[{key}] exists={got is not None}, oracle says {state}")
                    continue
                for column in sets:
                    compared += 1
                    value = got.get(column)
                    have = sorted(value, key=_element_key) if isinstance(value, list) else value
                    should = sorted(want.get(column, []), key=_element_key)
                    if have != should:
                        wrong.append(f"{region} {name}.{column}[{key}] = {have}, add-wins oracle says {should}")
    detail = (f"{compared} set values follow the add-wins oracle" if not wrong
              else f"{len(wrong)} sets differ: " + "; ".join(wrong[:5]))
    return Check("sets_match_oracle", not wrong, detail)


def _compare_to_oracle(
    name: str, expected: Mapping[str, Mapping[str, Any] | None], snapshots: Mapping[str, RegionSnapshot],
    table: str, keys: Iterable[str] | None = None,
) -> tuple[list[str], int]:
    wrong: list[str] = []
    chosen = set(expected) if keys is None else set(keys)
    for region, snap in sorted(snapshots.items()):
        rows = _rows(snap, table)
        scope = chosen | (set(rows) if keys is None else set())
        for key in sorted(scope):
            want = expected.get(key)
            got = _visible(rows.get(key))
            if got != want:
                wrong.append(f"{region} {table}[{key}] = {got}, {name} says {want}")
    return wrong, len(chosen)


def _lww(writes: Sequence[_Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec]) -> Check:
    wrong: list[str] = []
    total = 0
    for name, spec in tables.items():
        if spec.policy != "lww":
            continue
        expected = lww_oracle(w for w in writes if w.table == name)
        bad, n = _compare_to_oracle("the greatest (hlc, origin) write", expected, snapshots, name)
        wrong += bad
        total += n
    detail = (f"{total} last-writer-wins keys hold the greatest (hlc, origin) committed write in every region"
              if not wrong else f"{len(wrong)} rows differ from the LWW oracle: " + "; ".join(wrong[:5]))
    return Check("lww_oracle", not wrong, detail)


def _manual_single_writer(
    writes: Sequence[_Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
) -> Check:
    """Manual-policy keys that no region ever saw conflict must hold their latest write."""
    wrong: list[str] = []
    total = 0
    conflicted = {(c.table, c.key) for s in snapshots.values() for c in s.conflicts}
    for name, spec in tables.items():
        if spec.policy != "manual":
            continue
        mine = [w for w in writes if w.table == name]
        expected = lww_oracle(mine)
        keys = [k for k in expected if (name, k) not in conflicted]
        bad, n = _compare_to_oracle("its latest write", expected, snapshots, name, keys)
        wrong += bad
        total += n
    detail = (f"{total} manual-policy keys without conflicts hold their latest write everywhere" if not wrong
              else f"{len(wrong)} manual rows differ: " + "; ".join(wrong[:5]))
    return Check("manual_oracle", not wrong, detail)


def _converged(
    snapshots: Mapping[str, RegionSnapshot], diffs: Sequence[PairDiff], tables: Mapping[str, TableSpec],
    parked: Mapping[str, set[str]],
) -> Check:
    problems: list[str] = []
    for d in diffs:
        if d.error:
            problems.append(f"diff {d.table} {d.a}/{d.b} failed: {d.error}")
            continue
        keys = sorted(set(d.keys) - parked.get(d.table, set()))
        if keys:
            problems.append(f"{d.table} differs between {d.a} and {d.b} at {len(keys)} keys ({', '.join(keys[:5])})")
    regions = sorted(snapshots)
    for name in tables:
        roots = {r: snapshots[r].roots.get(name) for r in regions}
        if len(set(roots.values())) > 1:
            problems.append(f"{name} Merkle roots differ: " + ", ".join(
                f"{r}={v[0]:016x}/{v[1]} rows" if v else f"{r}=none" for r, v in roots.items()))
        # the checker's own look at the rows, independent of diff_tables
        views = {r: {k: v for k, v in _rows(snapshots[r], name).items() if k not in parked.get(name, set())}
                 for r in regions}
        first = regions[0] if regions else None
        for r in regions[1:]:
            if first is not None and views[r] != views[first]:
                keys = sorted(k for k in set(views[r]) | set(views[first]) if views[r].get(k) != views[first].get(k))
                problems.append(f"{name} rows read from {first} and {r} differ at {', '.join(keys[:5])}")
    tested = len({(d.a, d.b) for d in diffs})
    parked_note = "; parked keys excepted: " + ", ".join(
        f"{t} {sorted(k)}" for t, k in sorted(parked.items()) if k) if any(parked.values()) else ""
    detail = (f"diff_tables equal for {tested} region pairs x {len(tables)} tables, Merkle roots equal{parked_note}"
              if not problems else "; ".join(problems[:6]))
    return Check("regions_converged", not problems, detail,
                 {"parked": {t: sorted(k) for t, k in parked.items() if k}})


def _conflicts_accounted(
    writes: Sequence[_Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
) -> Check:
    recorded: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for snap in snapshots.values():
        for c in snap.conflicts:
            recorded[c.table][c.key].add(c.status)
    problems: list[str] = []
    expected = concurrent_keys(writes)
    count = 0
    for table, keys in sorted(expected.items()):
        spec = tables.get(table)
        for key in sorted(keys):
            count += 1
            statuses = recorded.get(table, {}).get(key, set())
            if not statuses:
                problems.append(f"{table}[{key}] was written concurrently in two regions but no region recorded "
                                f"a conflict")
            elif spec is not None and spec.policy == "manual" and not statuses & {"open", "resolved"}:
                problems.append(f"{table}[{key}] (manual) conflicted but was neither parked nor resolved "
                                f"({sorted(statuses)})")
    for table, by_key in recorded.items():
        spec = tables.get(table)
        if spec is not None and spec.policy != "manual":
            waiting = sorted(k for k, s in by_key.items() if "open" in s)
            if waiting:
                problems.append(f"{table} ({spec.policy}) has conflicts waiting for an operator: {waiting[:5]}")
    summary = _conflict_summary(snapshots)
    detail = (f"{count} concurrently written keys all recorded as conflicts "
              f"(per table and status: {_plain(summary)})" if not problems else "; ".join(problems[:6]))
    return Check("conflicts_accounted", not problems, detail, {"concurrent_keys": count})


def _conflict_summary(snapshots: Mapping[str, RegionSnapshot]) -> dict[str, dict[str, int]]:
    """Distinct conflict ids per table and status (a conflict seen by three regions is one)."""
    seen: dict[str, dict[str, str]] = defaultdict(dict)
    rank = {"auto": 0, "open": 1, "resolved": 2}
    for snap in snapshots.values():
        for c in snap.conflicts:
            held = seen[c.table].get(c.conflict_id)
            if held is None or rank.get(c.status, 0) > rank.get(held, 0):
                seen[c.table][c.conflict_id] = c.status
    return {t: dict(Counter(ids.values())) for t, ids in sorted(seen.items())}


def _plain(summary: Mapping[str, Mapping[str, int]]) -> str:
    if not summary:
        return "none"
    return ", ".join(f"{t} " + "/".join(f"{n} {s}" for s, n in sorted(v.items())) for t, v in summary.items())


def _quarantine(snapshots: Mapping[str, RegionSnapshot], expectations: Expectations) -> Check:
    totals: Counter[str] = Counter()
    for snap in snapshots.values():
        totals.update(snap.quarantine)
    problems = []
    for reason, at_least in sorted(expectations.quarantine_required.items()):
        if totals.get(reason, 0) < at_least:
            problems.append(f"expected at least {at_least} quarantined as {reason}, found {totals.get(reason, 0)}")
    allowed = set(expectations.quarantine_allowed) | set(expectations.quarantine_required)
    unexpected = {r: n for r, n in totals.items() if r not in allowed}
    if unexpected:
        problems.append(f"unexpected quarantine: {dict(sorted(unexpected.items()))}")
    seen = ", ".join(f"{n} {r}" for r, n in sorted(totals.items())) or "nothing"
    detail = f"quarantined as expected: {seen}" if not problems else "; ".join(problems)
    return Check("quarantine_as_expected", not problems, detail, {"totals": dict(totals)})
