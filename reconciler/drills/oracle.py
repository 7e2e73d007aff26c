"""The checker's own models of what every region must hold: written from the
definitions of the policies, never from :mod:`reconciler.policies`.

Each model is a small pure function of committed writes (what clients were told
was committed, plus in-doubt writes known to have committed). None of them reads
replication metadata or calls the code the drills judge; ``tests/unit`` parses
this module's imports to keep it that way. Where a model and the implementation
disagree, one of them is wrong, and the drill says so.

The order of versions is the one the design fixes: ``(hlc, origin region)``, the
packed HLC first and the region id breaking ties.

- **lww**: a key holds the row of its greatest write; a delete is absent. An
  update names only the columns it changes; its row is the row its writer saw
  (the write stamped ``prior``) with those columns replaced.
- **merge**: per column. Columns without a rule (or rule ``lww``) hold the value of
  the greatest write that set them, hidden (NULL) if that write is not newer than
  the row's greatest delete; ``counter`` is the sum of an insert's value and every
  delta ever committed, not reset by a delete; ``set`` is a last-writer-wins element
  set (below); ``max``/``min`` the greatest/least value ever written. The row is
  there iff its greatest insert/update is newer than its greatest delete.
- **set** (last-writer-wins element set): for each element, every add and every
  remove ever committed, each with its write's stamp; the element is present iff the
  greatest of them is an add (an add and a remove of one element in one write: the
  add) and that add is newer than the row's greatest delete. A remove stamped later
  therefore deletes a concurrent add it never saw: this is NOT an add-wins
  (observed-remove) set, and neither is the implementation.
- **manual**: a version is superseded when a later write's writer saw it (its
  ``prior`` is the version's HLC) or an operator's resolution is stamped after it.
  One version left (or only deletes left): every region holds it. Two or more:
  the key is a conflict an operator must see; until then each region holds one of
  them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Stamp = tuple[int, str]


@dataclass(frozen=True)
class Write:
    """One committed write, in the checker's shape.

    ``values`` is what the client asked to write: the whole row for an insert or an
    operator's resolution (None: resolved as deleted), only the changed columns for
    an update, None for a delete.
    """

    event_id: str
    origin: str
    table: str
    key: str
    op: str
    hlc: int
    prior: int | None
    values: Mapping[str, Any] | None
    deltas: Mapping[str, Any] = field(default_factory=dict)
    set_add: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    set_remove: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    acknowledged: bool = True
    #: the key columns and their values, as the client named the row
    key_values: Mapping[str, Any] | None = None
    #: how the checker knows of it: "acknowledged", "in-doubt" (the client recorded the
    #: attempt; a region holds it) or "unrecorded" (only an outbox knows it: an
    #: operator's resolution, or a writer outside the workload)
    source: str = "acknowledged"

    @property
    def stamp(self) -> Stamp:
        return (self.hlc, self.origin)

    @property
    def removes_row(self) -> bool:
        return self.op == "delete" or (self.op == "resolve" and self.values is None)


def key_text(values: Mapping[str, Any], columns: Sequence[str]) -> str:
    """The checker's own name for a row: one key column as its text, several as a
    JSON array of their values (the documented outbox ``aggregateid`` format)."""
    if len(columns) == 1:
        value = values[columns[0]]
        return value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps([values[c] for c in columns], separators=(",", ":"), default=str)


def element_text(element: Any) -> str:
    """Set elements are compared by their JSON text: 1, 1.0 and "1" stay distinct."""
    return json.dumps(element, separators=(",", ":"), sort_keys=True)


def visible(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A row for comparison: NULL columns dropped (a write may omit them)."""
    if row is None:
        return None
    return {k: v for k, v in row.items() if v is not None}


def _by_key(writes: Iterable[Write]) -> dict[str, list[Write]]:
    out: dict[str, list[Write]] = defaultdict(list)
    for w in writes:
        out[w.key].append(w)
    return out


# ---------------------------------------------------------------- whole rows


Row = dict[str, Any] | None

#: most candidate rows kept per write (ties on a prior multiply them)
_MAX_CANDIDATES = 8


def whole_rows(writes: Sequence[Write]) -> dict[str, tuple[Row, ...]]:
    """Event id -> the whole rows a write of an lww/manual table may stand for (None:
    it removes the row). An update is the row its writer saw, changed.

    Usually one row. A ``prior`` is an HLC without its region, so when two regions
    stamped versions of the key with the same HLC the history cannot say which one
    the writer saw: each is a candidate, and the checker accepts any of them.
    """
    by_stamp: dict[tuple[str, int], list[Write]] = defaultdict(list)
    for w in writes:
        by_stamp[(w.key, w.hlc)].append(w)
    memo: dict[str, tuple[Row, ...]] = {}
    # in stamp order, so that the version an update saw is always decided first
    for w in sorted(writes, key=lambda x: x.stamp):
        if w.removes_row:
            memo[w.event_id] = (None,)
            continue
        own = {**dict(w.key_values or {}), **dict(w.values or {})}
        if w.op != "update" or w.prior is None:
            memo[w.event_id] = (own,)
            continue
        # an update is refused on a deleted row, so only versions that leave a row count
        seen = [s for s in by_stamp.get((w.key, w.prior), []) if s.hlc < w.hlc and not s.removes_row]
        rows: list[Row] = []
        for version in seen:
            for base in memo.get(version.event_id, ()):
                row = {**(base or {}), **own}
                if row not in rows and len(rows) < _MAX_CANDIDATES:
                    rows.append(row)
        memo[w.event_id] = tuple(rows) or (own,)
    return memo


def lww_candidates(writes: Iterable[Write]) -> dict[str, tuple[Row, ...]]:
    """Per key, the rows its greatest ``(hlc, origin)`` write may stand for (usually
    one; (None,): the key is absent)."""
    chosen = list(writes)
    rows = whole_rows(chosen)
    out: dict[str, tuple[Row, ...]] = {}
    for key, group in _by_key(chosen).items():
        winner = max(group, key=lambda w: w.stamp)
        out[key] = tuple(visible(r) for r in rows[winner.event_id])
    return out


def lww_model(writes: Iterable[Write]) -> dict[str, Row]:
    """Per key, the whole row of its greatest ``(hlc, origin)`` write (None: absent);
    the first candidate when a tie on a prior leaves several."""
    return {key: rows[0] for key, rows in lww_candidates(writes).items()}


# ---------------------------------------------------------------- merge


@dataclass
class ElementSet:
    """A last-writer-wins element set, from its definition: every add and remove with
    its stamp; an element is present iff its greatest operation is an add."""

    ops: dict[str, list[tuple[Stamp, int, Any]]] = field(default_factory=dict)

    def add(self, element: Any, stamp: Stamp) -> None:
        self.ops.setdefault(element_text(element), []).append((stamp, 1, element))

    def remove(self, element: Any, stamp: Stamp) -> None:
        self.ops.setdefault(element_text(element), []).append((stamp, 0, element))

    def members(self, hidden_through: Stamp | None = None) -> list[Any]:
        out = []
        for text in sorted(self.ops):
            # (stamp, 1) > (stamp, 0): in one write, an add of an element beats its remove
            stamp, is_add, element = max(self.ops[text], key=lambda op: (op[0], op[1]))
            if is_add and (hidden_through is None or stamp > hidden_through):
                out.append(element)
        return out


@dataclass
class _MergeRow:
    written: Stamp | None = None
    deleted: Stamp | None = None
    key: tuple[Stamp, dict[str, Any]] | None = None
    registers: dict[str, tuple[Stamp, Any]] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    sets: dict[str, ElementSet] = field(default_factory=dict)
    extremes: dict[str, list[Any]] = field(default_factory=dict)


def _greater(a: Stamp | None, b: Stamp) -> Stamp:
    return b if a is None or b > a else a


def _rank(value: Any) -> tuple[int, Any]:
    return (1, value) if isinstance(value, str) else (0, value)


def merge_model(
    writes: Iterable[Write], rules: Mapping[str, str], key_columns: Sequence[str] = (),
) -> dict[str, dict[str, Any] | None]:
    """Per key, the whole visible row of a merge table (None: absent); set columns
    as lists sorted by :func:`element_text`."""
    rows: dict[str, _MergeRow] = defaultdict(_MergeRow)
    for w in writes:
        r = rows[w.key]
        s = w.stamp
        if w.op == "delete":
            r.deleted = _greater(r.deleted, s)
            continue
        r.written = _greater(r.written, s)
        values = dict(w.values or {})
        key_part = {c: values.pop(c) for c in key_columns if c in values}
        key_part.update({c: v for c, v in (w.key_values or {}).items() if c in key_columns})
        if key_part and (r.key is None or s > r.key[0]):
            r.key = (s, key_part)
        for column, value in values.items():
            rule = rules.get(column, "lww")
            if rule == "counter":
                if value is not None:
                    r.counters[column] = r.counters.get(column, 0) + value
            elif rule == "set":
                members = r.sets.setdefault(column, ElementSet())
                for element in value or []:
                    members.add(element, s)
            elif rule in ("max", "min"):
                if value is not None:
                    r.extremes.setdefault(column, []).append(value)
            elif column not in r.registers or s > r.registers[column][0]:
                r.registers[column] = (s, value)
        for column, delta in w.deltas.items():
            r.counters[column] = r.counters.get(column, 0) + delta
        for column, added in w.set_add.items():
            for element in added:
                r.sets.setdefault(column, ElementSet()).add(element, s)
        for column, removed in w.set_remove.items():
            for element in removed:
                r.sets.setdefault(column, ElementSet()).remove(element, s)
    out: dict[str, dict[str, Any] | None] = {}
    for key, r in rows.items():
        if r.written is None or (r.deleted is not None and r.deleted >= r.written):
            out[key] = None
            continue
        row: dict[str, Any] = dict(r.key[1]) if r.key else {}
        for column, (stamp, value) in r.registers.items():
            row[column] = value if r.deleted is None or stamp > r.deleted else None
        row.update(r.counters)
        for column, elements in r.sets.items():
            row[column] = sorted(elements.members(r.deleted), key=element_text)
        for column, seen in r.extremes.items():
            pick = max if rules.get(column) == "max" else min
            row[column] = pick(seen, key=_rank)
        out[key] = visible(row)
    return out


# ---------------------------------------------------------------- manual


@dataclass(frozen=True)
class ManualKey:
    """What the manual model says about one key."""

    #: the versions nothing superseded, greatest stamp first
    heads: tuple[Write, ...]
    #: every row a head may stand for (None: the head removes the row); see whole_rows
    rows: tuple[Row, ...]

    @property
    def conflicted(self) -> bool:
        """Two live versions nobody reconciled (concurrent deletes agree)."""
        return len(self.heads) > 1 and not all(h.removes_row and h.op == "delete" for h in self.heads)

    @property
    def row(self) -> Row:
        """The row every region must hold, when not conflicted (the first candidate)."""
        return self.rows[0] if self.rows else None


def manual_model(writes: Iterable[Write]) -> dict[str, ManualKey]:
    chosen = list(writes)
    whole = whole_rows(chosen)
    out: dict[str, ManualKey] = {}
    for key, group in _by_key(chosen).items():
        resolutions = [w.stamp for w in group if w.op == "resolve"]
        last_resolution = max(resolutions) if resolutions else None
        heads = []
        for v in group:
            if any(w.prior == v.hlc and w.stamp > v.stamp for w in group):
                continue  # a later writer saw this version and replaced it
            if last_resolution is not None and v.stamp < last_resolution:
                continue  # the operator decided after it
            heads.append(v)
        heads.sort(key=lambda w: w.stamp, reverse=True)
        rows: list[Row] = []
        for h in heads:
            rows += [visible(r) for r in whole[h.event_id] if visible(r) not in rows]
        out[key] = ManualKey(tuple(heads), tuple(rows))
    return out


# ---------------------------------------------------------------- concurrency


def concurrent_pairs(group: Sequence[Write]) -> bool:
    """Whether two regions wrote the key without either writer having seen the
    other's write (each one's ``prior`` is below the other's stamp). Two deletes
    agree; operator resolutions end conflicts rather than make them."""
    plain = [w for w in group if w.op != "resolve"]
    for i, a in enumerate(plain):
        for b in plain[i + 1:]:
            if a.origin == b.origin or (a.op == "delete" and b.op == "delete"):
                continue
            a_saw_b = a.prior is not None and a.prior >= b.hlc
            b_saw_a = b.prior is not None and b.prior >= a.hlc
            if not a_saw_b and not b_saw_a:
                return True
    return False


def concurrent_keys(writes: Iterable[Write]) -> dict[str, set[str]]:
    """table -> keys written concurrently by two regions."""
    by_key: dict[tuple[str, str], list[Write]] = defaultdict(list)
    for w in writes:
        by_key[(w.table, w.key)].append(w)
    out: dict[str, set[str]] = defaultdict(set)
    for (table, key), group in by_key.items():
        if len({w.origin for w in group}) > 1 and concurrent_pairs(group):
            out[table].add(key)
    return dict(out)


# ---------------------------------------------------------------- the gate, sampled


@dataclass(frozen=True)
class EventFacts:
    """What the checker knows of one committed event, from its origin's outbox."""

    event_id: str
    origin: str
    #: its relay sequence, None while unnumbered
    sequence: int | None
    table: str
    key: str
    #: packed HLC (wall milliseconds << 16 | logical)
    hlc: int


def unexplained_differences(
    rows: tuple[Mapping[str, Mapping[str, Mapping[str, Any]]], Mapping[str, Mapping[str, Mapping[str, Any]]]],
    applied: tuple[set[str], set[str]],
    events: Mapping[str, EventFacts],
    watermark: int,
    published: Mapping[str, int],
    excused: Mapping[str, set[str]],
) -> dict[str, list[str]]:
    """table -> keys two regions hold differently with no excuse: what a gate that
    passed must never leave.

    The definition, from the design's gate and nothing of its code: as of an HLC
    ``watermark``, two regions agree on every key except those parked for an operator
    (or otherwise ``excused``, e.g. written around the pipeline just now) and those
    whose difference is explained by events in flight -- every event one region
    applied and the other did not is stamped above the watermark, or was not
    published by its origin yet when the gate passed (its sequence is above
    ``published[origin]``, or it has none). A key whose rows differ although both
    applied the same events is never explained (a write around the pipeline, a
    non-deterministic policy). ``rows`` are per region table -> key -> row,
    ``applied`` per region the event ids it applied or wrote itself; ``events`` must
    know every event of both: an applied event it does not know makes the keys it
    might explain unjudgeable, so they are left out rather than guessed at.
    """
    by_key: dict[tuple[str, str], list[EventFacts]] = defaultdict(list)
    for facts in events.values():
        by_key[(facts.table, facts.key)].append(facts)
    unknown = (applied[0] ^ applied[1]) - events.keys()
    out: dict[str, list[str]] = {}
    for table in sorted(set(rows[0]) | set(rows[1])):
        a, b = rows[0].get(table, {}), rows[1].get(table, {})
        bad = []
        for key in sorted(set(a) | set(b)):
            if key in excused.get(table, set()) or visible(a.get(key)) == visible(b.get(key)):
                continue
            differing = [e for e in by_key.get((table, key), [])
                         if (e.event_id in applied[0]) != (e.event_id in applied[1])]
            in_flight = [e.hlc > watermark or e.sequence is None or e.sequence > published.get(e.origin, 0)
                         for e in differing]
            if differing and all(in_flight):
                continue
            if not differing and unknown:
                continue  # an event nobody's outbox shows may be what differs
            bad.append(key)
        if bad:
            out[table] = bad
    return out
