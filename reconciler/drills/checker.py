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
- **regions converged**: the checker's own comparison of the rows every region
  holds, keys its manual model says an operator must still decide excepted (and
  listed); ``diff_tables`` and the Merkle roots are judged against that comparison
  (they are code under test, not the oracle);
- **conflicts accounted for**: every key written concurrently in two regions has a
  record in ``reconciler.conflicts`` somewhere, every undecided manual key is
  parked in every region and no other manual key is, and no lww/merge conflict
  waits for an operator;
- **models**: every row is what the checker's own models in
  :mod:`reconciler.drills.oracle` say (lww, per-field merge with counters and a
  last-writer-wins element set, manual). This module and its helpers import
  nothing of the implementation and read no replication metadata; a unit test
  keeps it so.

"Committed" means acknowledged (the history) plus in-doubt attempts that a region
holds (their content from the client's own record) plus events only an outbox
knows (operator resolutions, writers outside the workload). The models must use
them, since they are real writes; the loss check uses only what was acknowledged.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import WriteRecord
from .oracle import (
    Write,
    concurrent_keys,
    element_text,
    key_text,
    lww_candidates,
    lww_model,
    manual_model,
    merge_model,
    visible,
)

__all__ = [
    "Check", "CommittedEvent", "StoredConflict", "Expectations", "InboxEntry", "PairDiff", "RegionSnapshot",
    "TableSpec", "Verdict", "Write", "check", "committed_writes", "concurrent_keys", "expected_parked",
    "lww_oracle", "merge_oracle", "row_key",
]

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
class StoredConflict:
    """A row of a region's ``reconciler.conflicts`` table, as the checker reads it."""

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
    conflicts: tuple[StoredConflict, ...] = ()
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
    #: manual keys parked though their versions are causally ordered are noted, not
    #: failed: the manual policy parks an ancestor that arrives after its descendant
    #: (documented in reconciler.policies); drills that replay out of order meet it
    needless_parking_ok: bool = False


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


def row_key(values: Mapping[str, Any], columns: Sequence[str]) -> str:
    """The checker's name for a row (its own encoding, see :func:`oracle.key_text`)."""
    return key_text(values, columns)


def _record_key(r: WriteRecord, tables: Mapping[str, TableSpec]) -> str:
    spec = tables.get(r.table)
    if r.key_values is not None and spec is not None and all(c in r.key_values for c in spec.key):
        return key_text(r.key_values, spec.key)
    return r.key


def _from_record(r: WriteRecord, tables: Mapping[str, TableSpec], source: str) -> Write:
    return Write(r.event_id, r.region, r.table, _record_key(r, tables), r.op, r.hlc, r.prior, r.values,
                 dict(r.deltas), dict(r.set_add), dict(r.set_remove), source == "acknowledged",
                 dict(r.key_values) if r.key_values is not None else None, source)


def _from_outbox(e: CommittedEvent, tables: Mapping[str, TableSpec]) -> Write:
    p = e.payload
    values = p.get("values")
    key_values = p.get("key") if isinstance(p.get("key"), Mapping) else None
    spec = tables.get(e.table)
    key = e.key
    if key_values is not None and spec is not None and all(c in key_values for c in spec.key):
        key = key_text(key_values, spec.key)
    return Write(
        e.event_id, e.origin, e.table, key, e.op, e.hlc, e.prior,
        dict(values) if isinstance(values, Mapping) else None,
        dict(p.get("deltas") or {}), dict(p.get("set_add") or {}), dict(p.get("set_remove") or {}), False,
        dict(key_values) if key_values is not None else None, "unrecorded",
    )


def committed_writes(
    history: Sequence[WriteRecord], snapshots: Mapping[str, RegionSnapshot],
    attempts: Sequence[WriteRecord] = (), tables: Mapping[str, TableSpec] | None = None,
    forgotten: Mapping[str, frozenset[str]] | None = None,
) -> list[Write]:
    """The writes the models start from.

    The acknowledged writes, as their clients recorded them; in-doubt attempts (also
    as their clients recorded them) that some region holds, the event id being the
    only thing read from the regions; and, last, events found only in an origin's
    outbox (an operator's resolution, or a writer outside the drill's workload),
    which only the outbox can describe.
    """
    specs = tables or {}
    out = [_from_record(r, specs, "acknowledged") for r in history]
    seen = {r.event_id for r in history}
    held: set[str] = set()
    for snap in snapshots.values():
        held.update(e.event_id for e in snap.inbox)
        held.update(e.event_id for e in snap.outbox if e.origin == snap.region)
    for ids in (forgotten or {}).values():
        held.update(ids)
    for r in attempts:
        if r.event_id in held and r.event_id not in seen:
            seen.add(r.event_id)
            out.append(_from_record(r, specs, "in-doubt"))
    for snap in snapshots.values():
        for event in snap.outbox:
            if event.origin == snap.region and event.event_id not in seen:
                seen.add(event.event_id)
                out.append(_from_outbox(event, specs))
    return out


# ---------------------------------------------------------------- the models (see oracle.py)


def lww_oracle(writes: Iterable[Write]) -> dict[str, dict[str, Any] | None]:
    """Per key, the whole row of the greatest ``(hlc, origin)`` write (None: deleted)."""
    return lww_model(writes)


def merge_oracle(
    writes: Iterable[Write], rules: Mapping[str, str], key_columns: Sequence[str] = (),
) -> dict[str, dict[str, Any] | None]:
    """Per key, the merge row: per-field LWW, counters as sums, last-writer-wins
    element sets (sorted), None when the row is deleted."""
    return merge_model(writes, rules, key_columns)


def expected_parked(
    history: Sequence[WriteRecord], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
    attempts: Sequence[WriteRecord] = (),
) -> dict[str, set[str]]:
    """table -> manual-policy keys the model says an operator must still decide:
    the keys regions may legitimately disagree on."""
    writes = committed_writes(history, snapshots, attempts, tables)
    return _model_parked(writes, tables)


def _model_parked(writes: Sequence[Write], tables: Mapping[str, TableSpec]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, spec in tables.items():
        if spec.policy != "manual":
            continue
        model = manual_model(w for w in writes if w.table == name)
        keys = {k for k, m in model.items() if m.conflicted}
        if keys:
            out[name] = keys
    return out


# ---------------------------------------------------------------- the verdict


def check(
    history: Sequence[WriteRecord],
    snapshots: Mapping[str, RegionSnapshot],
    diffs: Sequence[PairDiff],
    tables: Mapping[str, TableSpec],
    expectations: Expectations = Expectations(),
    rto_seconds: float | None = None,
    attempts: Sequence[WriteRecord] = (),
    forgotten: Mapping[str, frozenset[str]] | None = None,
) -> Verdict:
    """Judge a drill. Every check is computed even when an earlier one fails, so a
    report always says everything that went wrong, not just the first thing.

    ``attempts`` are the workload's in-doubt writes (commit outcome unknown).
    ``forgotten``: per region, event ids it no longer holds by the scenario's own
    doing, which the scenario recorded as it did it (rows retention pruned after the
    region held them, events an operator accepted as lost there); the models still
    count those writes, since their effect on the rows must survive."""
    regions = sorted(snapshots)
    checks: list[Check] = []
    forgotten = forgotten or {}
    writes = committed_writes(history, snapshots, attempts, tables, forgotten)
    in_doubt = sum(1 for w in writes if not w.acknowledged and w.op != "resolve")
    expected_open = _model_parked(writes, tables)
    parked = _parked(snapshots)

    unreachable = [r for r in regions if snapshots[r].state is None]
    checks.append(Check(
        "regions_reachable", not unreachable,
        "every region's database answered" if not unreachable else
        "unreachable: " + ", ".join(f"{r} ({snapshots[r].error})" for r in unreachable),
    ))

    lost_check, events_lost = _lost(history, snapshots, forgotten)
    checks.append(lost_check)
    dup_check, duplicates = _duplicates(snapshots)
    checks.append(dup_check)
    checks.append(_delivered(snapshots, forgotten))
    checks.append(_counters(writes, snapshots, tables))
    checks.append(_sets(writes, snapshots, tables))
    checks.append(_merge_rows(writes, snapshots, tables))
    checks.append(_lww(writes, snapshots, tables))
    checks.append(_manual(writes, snapshots, tables))
    converged_check = _converged(snapshots, tables, expected_open)
    checks.append(converged_check)
    checks.append(_tools_agree(snapshots, diffs, tables, expected_open))
    checks.append(_conflicts_accounted(writes, snapshots, tables, expected_open, expectations.needless_parking_ok))
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


def _lost(history: Sequence[WriteRecord], snapshots: Mapping[str, RegionSnapshot],
          forgotten: Mapping[str, frozenset[str]]) -> tuple[Check, int]:
    held = {r: _held(s) | forgotten.get(r, frozenset()) for r, s in snapshots.items()}
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


def _delivered(snapshots: Mapping[str, RegionSnapshot], forgotten: Mapping[str, frozenset[str]]) -> Check:
    """Inbox rows per origin == that origin's relayed outbox rows, by event id; and
    nothing left unrelayed. Holds for in-doubt events too (they committed). Events
    forgotten anywhere are left out of the comparison on both sides."""
    problems: list[str] = []
    gone = frozenset().union(*forgotten.values()) if forgotten else frozenset()
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
            have, want = by_origin.get(origin, set()) - gone, relayed.get(origin, set()) - gone
            if have != want:
                problems.append(f"{dest} holds {len(have)} events of {origin}, whose outbox relayed {len(want)} "
                                f"({len(want - have)} missing, {len(have - want)} unknown to the origin)")
    detail = ("every region's inbox holds exactly each peer's relayed outbox" if not problems
              else "; ".join(problems))
    return Check("inbox_matches_outbox", not problems, detail)


def _rows(snap: RegionSnapshot, table: str) -> Mapping[str, Mapping[str, Any]]:
    return snap.rows.get(table, {})


def _sorted_set(value: Any) -> Any:
    return sorted(value, key=element_text) if isinstance(value, list) else value


def _set_view(row: Mapping[str, Any] | None, sets: set[str]) -> dict[str, Any] | None:
    """A merge row with its set columns sorted, and empty ones left out (a set column
    nobody ever touched may read as NULL or as an empty array)."""
    if row is None:
        return None
    return {c: _sorted_set(v) if c in sets else v for c, v in row.items() if not (c in sets and v in (None, []))}


def _merge_expected(writes: Sequence[Write], spec: TableSpec) -> dict[str, dict[str, Any] | None]:
    return merge_model([w for w in writes if w.table == spec.name], spec.fields, spec.key)


def _counters(
    writes: Sequence[Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
) -> Check:
    wrong: list[str] = []
    compared = 0
    for name, spec in tables.items():
        counters = {c: r for c, r in spec.fields.items() if r == "counter"}
        if spec.policy != "merge" or not counters:
            continue
        expected = _merge_expected(writes, spec)
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


def _sets(writes: Sequence[Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec]) -> Check:
    wrong: list[str] = []
    compared = 0
    for name, spec in tables.items():
        sets = [c for c, r in spec.fields.items() if r == "set"]
        if spec.policy != "merge" or not sets:
            continue
        expected = _merge_expected(writes, spec)
        for region, snap in sorted(snapshots.items()):
            rows = _rows(snap, name)
            for key, want in expected.items():
                got = rows.get(key)
                if want is None or got is None:
                    if (want is None) != (got is None):
                        state = "deleted" if want is None else "present"
                        wrong.append(f"{region} {name}[{key}] exists={got is not None}, the model says {state}")
                    continue
                for column in sets:
                    compared += 1
                    have = _sorted_set(got.get(column) or [])
                    should = _sorted_set(want.get(column) or [])
                    if have != should:
                        wrong.append(f"{region} {name}.{column}[{key}] = {have}, the element-set model says "
                                     f"{should}")
    detail = (f"{compared} set values follow the last-writer-wins element set model" if not wrong
              else f"{len(wrong)} sets differ: " + "; ".join(wrong[:5]))
    return Check("sets_match_oracle", not wrong, detail)


def _merge_rows(
    writes: Sequence[Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
) -> Check:
    """Whole merge rows: per-field LWW columns, max/min, presence (counters and sets
    are judged above, and again here as part of the row)."""
    wrong: list[str] = []
    total = 0
    for name, spec in tables.items():
        if spec.policy != "merge":
            continue
        sets = {c for c, r in spec.fields.items() if r == "set"}
        expected = _merge_expected(writes, spec)
        total += len(expected)
        for region, snap in sorted(snapshots.items()):
            rows = _rows(snap, name)
            for key in sorted(set(expected) | set(rows)):
                want, got = _set_view(expected.get(key), sets), _set_view(visible(rows.get(key)), sets)
                if got != want:
                    wrong.append(f"{region} {name}[{key}] = {got}, the merge model says {want}")
    detail = (f"{total} merge rows equal the per-field model in every region" if not wrong
              else f"{len(wrong)} merge rows differ: " + "; ".join(wrong[:5]))
    return Check("merge_oracle", not wrong, detail)


def _lww(writes: Sequence[Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec]) -> Check:
    wrong: list[str] = []
    total = 0
    for name, spec in tables.items():
        if spec.policy != "lww":
            continue
        expected = lww_candidates(w for w in writes if w.table == name)
        total += len(expected)
        for region, snap in sorted(snapshots.items()):
            rows = _rows(snap, name)
            for key in sorted(set(expected) | set(rows)):
                want = expected.get(key, (None,))
                got = visible(rows.get(key))
                if got not in want:
                    wrong.append(f"{region} {name}[{key}] = {got}, the greatest (hlc, origin) write says "
                                 + " or ".join(str(w) for w in want))
    detail = (f"{total} last-writer-wins keys hold the greatest (hlc, origin) committed write in every region"
              if not wrong else f"{len(wrong)} rows differ from the LWW model: " + "; ".join(wrong[:5]))
    return Check("lww_oracle", not wrong, detail)


def _manual(
    writes: Sequence[Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
) -> Check:
    """Manual keys with one version left hold it everywhere; keys with concurrent
    versions hold one of them in each region."""
    wrong: list[str] = []
    settled = conflicted = 0
    for name, spec in tables.items():
        if spec.policy != "manual":
            continue
        model = manual_model(w for w in writes if w.table == name)
        for region, snap in sorted(snapshots.items()):
            rows = _rows(snap, name)
            for key in sorted(set(model) | set(rows)):
                m = model.get(key)
                got = visible(rows.get(key))
                if m is None:
                    wrong.append(f"{region} {name}[{key}] = {got}, but nobody wrote that key")
                elif not m.conflicted:
                    if got not in m.rows:
                        wrong.append(f"{region} {name}[{key}] = {got}, its one remaining version is {m.row}")
                elif got not in m.rows:
                    wrong.append(f"{region} {name}[{key}] = {got}, which is none of its {len(m.heads)} "
                                 f"concurrent versions")
        settled += sum(1 for m in model.values() if not m.conflicted)
        conflicted += sum(1 for m in model.values() if m.conflicted)
    detail = (f"{settled} manual keys hold their one remaining version everywhere, {conflicted} with concurrent "
              f"versions hold one of them" if not wrong
              else f"{len(wrong)} manual rows differ from the model: " + "; ".join(wrong[:5]))
    return Check("manual_oracle", not wrong, detail)


def _converged(
    snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec], excepted: Mapping[str, set[str]],
) -> Check:
    """The checker's own comparison of the rows every region holds, except the keys
    its manual model says an operator has still to decide."""
    problems: list[str] = []
    regions = [r for r in sorted(snapshots) if snapshots[r].state is not None]
    for name in tables:
        skip = excepted.get(name, set())
        views = {r: {k: v for k, v in _rows(snapshots[r], name).items() if k not in skip} for r in regions}
        first = regions[0] if regions else None
        for r in regions[1:]:
            if first is not None and views[r] != views[first]:
                keys = sorted(k for k in set(views[r]) | set(views[first]) if views[r].get(k) != views[first].get(k))
                problems.append(f"{name} rows of {first} and {r} differ at {len(keys)} keys ({', '.join(keys[:5])})")
    note = "; undecided manual keys excepted: " + ", ".join(
        f"{t} {sorted(k)}" for t, k in sorted(excepted.items()) if k) if any(excepted.values()) else ""
    detail = (f"every region holds the same rows in {len(tables)} tables{note}" if not problems
              else "; ".join(problems[:6]))
    return Check("regions_converged", not problems, detail,
                 {"parked": {t: sorted(k) for t, k in excepted.items() if k}})


def _tools_agree(
    snapshots: Mapping[str, RegionSnapshot], diffs: Sequence[PairDiff], tables: Mapping[str, TableSpec],
    excepted: Mapping[str, set[str]],
) -> Check:
    """``reconciler diff`` and the Merkle roots are judged too: they must find a
    difference exactly where the checker's own row comparison finds one."""
    problems: list[str] = []
    for d in diffs:
        if d.error:
            problems.append(f"diff {d.table} {d.a}/{d.b} failed: {d.error}")
            continue
        if d.a not in snapshots or d.b not in snapshots or d.table not in tables:
            continue
        skip = excepted.get(d.table, set())
        a, b = _rows(snapshots[d.a], d.table), _rows(snapshots[d.b], d.table)
        truth = {k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k)}
        reported = set(d.keys) - skip
        if "(more)" in reported:
            reported.discard("(more)")
            if not truth:
                problems.append(f"diff {d.table} {d.a}/{d.b} reports differing buckets, the rows are equal")
            continue
        if reported != truth:
            problems.append(f"diff {d.table} {d.a}/{d.b} reports {sorted(reported)[:5]}, the rows differ at "
                            f"{sorted(truth)[:5]}")
    regions = [r for r in sorted(snapshots) if snapshots[r].state is not None]
    for name in tables:
        roots = {r: snapshots[r].roots.get(name) for r in regions}
        if not any(v is not None for v in roots.values()):
            continue
        skip = excepted.get(name, set())
        views = {r: {k: v for k, v in _rows(snapshots[r], name).items() if k not in skip} for r in regions}
        same_rows = all(views[r] == views[regions[0]] for r in regions)
        same_roots = len(set(roots.values())) == 1
        if same_rows != same_roots:
            problems.append(f"{name} Merkle roots {'agree' if same_roots else 'differ'} but the rows "
                            f"{'differ' if not same_rows else 'are equal'}: " + ", ".join(
                                f"{r}={v[0]:016x}/{v[1]} rows" if v else f"{r}=none" for r, v in roots.items()))
    detail = (f"diff_tables ({len({(d.a, d.b) for d in diffs})} region pairs) and the Merkle roots agree with the "
              f"rows" if not problems else "; ".join(problems[:6]))
    return Check("diff_and_merkle_agree", not problems, detail)


def _conflicts_accounted(
    writes: Sequence[Write], snapshots: Mapping[str, RegionSnapshot], tables: Mapping[str, TableSpec],
    expected_open: Mapping[str, set[str]], needless_ok: bool = False,
) -> Check:
    recorded: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for snap in snapshots.values():
        for c in snap.conflicts:
            recorded[c.table][c.key].add(c.status)
    problems: list[str] = []
    notes: list[str] = []
    expected = concurrent_keys(writes)
    count = 0
    for table, keys in sorted(expected.items()):
        for key in sorted(keys):
            count += 1
            if not recorded.get(table, {}).get(key):
                problems.append(f"{table}[{key}] was written concurrently in two regions but no region recorded "
                                f"a conflict")
    for table, keys in sorted(expected_open.items()):
        for key in sorted(keys):
            not_parked = sorted(r for r, s in snapshots.items() if s.state is not None and not any(
                c.table == table and c.key == key and c.status == "open" for c in s.conflicts))
            if not_parked:
                problems.append(f"{table}[{key}] (manual) has concurrent versions nobody decided, but "
                                f"{', '.join(not_parked)} did not park it")
    for table, by_key in recorded.items():
        spec = tables.get(table)
        waiting = sorted(k for k, s in by_key.items() if "open" in s)
        if spec is not None and spec.policy != "manual" and waiting:
            problems.append(f"{table} ({spec.policy}) has conflicts waiting for an operator: {waiting[:5]}")
        elif spec is not None and spec.policy == "manual":
            needless = [k for k in waiting if k not in expected_open.get(table, set())]
            if needless:
                note = (f"{table} (manual) parks keys whose versions are causally ordered or already decided: "
                        f"{needless[:5]}")
                if needless_ok:
                    notes.append(note + " (tolerated by this drill)")
                else:
                    problems.append(note)
    summary = _conflict_summary(snapshots)
    detail = (f"{count} concurrently written keys all recorded as conflicts, "
              f"{sum(len(k) for k in expected_open.values())} undecided manual keys parked everywhere "
              f"(per table and status: {_plain(summary)})" + "".join(f"; {n}" for n in notes)
              if not problems else "; ".join(problems[:6]))
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
