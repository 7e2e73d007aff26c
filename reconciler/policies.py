"""Conflict policies: what a region's copy of a row becomes when a replicated event
meets it.

Every region applies every event, in whatever order the network delivers them. The
one rule that makes active-active safe is that regions which have applied the same
set of events hold the same row, so each policy here is a pure function
``(current state, event) -> new state`` whose result does not depend on delivery
order (and, except for counter sums, on duplicates): its state is built from
max-registers and sums only, and the visible values are computed from the stored
metadata, never carried along from history.

Policies
--------
``lww``
    Row-level last-writer-wins on ``(hlc, origin)``. The winner's full row is the
    row; a delete is a tombstone with its own stamp, so an older write arriving
    late cannot resurrect it. ``meta`` is ``{}``.
``merge``
    Per-column rules (``lww``, ``counter``, ``set``, ``max``, ``min``); columns
    without a rule are ``lww`` with their own stamp. See :class:`MergePolicy`.
``manual``
    A causally later write applies; a concurrent one is parked for an operator and
    the region keeps what it has. A replicated ``RESOLVE`` event carries the
    operator's decision and makes every region converge. See :class:`ManualPolicy`.

Conflict detection is the same for every policy: an event is *concurrent* with the
region's current version when its ``prior`` (the stamp the writer saw) is not the
current stamp. The stamp alone cannot tell "concurrent" from "arrived out of
causal order" (an older ancestor delivered after its descendant), so the audit
trail of lww/merge may hold records for the latter too; they are harmless there.
``manual``, where a record means an operator's time, remembers the stamp its
current version's writer saw (and the older ancestors it has not applied yet), so
a version arriving after its successor is recognised as older and not parked. A
version arriving before its predecessor cannot be told from a concurrent one when
it arrives and is parked; :func:`settle_parked`, which the applier runs whenever
such a key's row changes, applies it once its predecessor is in (or closes it as
superseded), so every delivery order of a causal chain ends in its last version
with no open entry.

Versions are ordered by ``(hlc, origin)``: the region id breaks ties between
regions. Merge metadata stores stamps as ``[hlc.pack(), origin]``, which is JSON and
sorts the way SQL sorts the packed ``bigint`` column.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any, Final, Protocol

from .errors import ConfigError, EventError
from .hlc import Timestamp
from .model import (
    Applied,
    ConflictKind,
    ConflictRecord,
    Event,
    Operation,
    Outcome,
    RowState,
    Version,
    conflict_id,
)

__all__ = [
    "FIELD_RULES",
    "ConflictPolicy",
    "LwwPolicy",
    "ManualPolicy",
    "MergePolicy",
    "POLICY_NAMES",
    "classify",
    "policy_for",
    "settle_parked",
]

POLICY_NAMES: Final = ("lww", "merge", "manual")
FIELD_RULES: Final = ("lww", "counter", "set", "max", "min")

#: the total order every policy uses: packed HLC, then region id
Stamp = tuple[int, str]

#: the "no version" side of an update_missing conflict record
_ABSENT = Version(values=None, hlc=Timestamp(0, 0), origin="", deleted=False)


class ConflictPolicy(Protocol):
    """What the inbox and the replayer call for every event of a replicated table."""

    @property
    def name(self) -> str: ...

    def apply(self, current: RowState | None, event: Event) -> Applied:
        """Decide the row's new state. ``current`` is None when this region never
        saw the key (no row, no tombstone). Raises :class:`EventError` for a payload
        the policy cannot apply; the caller quarantines the event."""
        ...


# -- payload decoding ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Payload:
    """An event payload, checked once, so policies only see well-formed input."""

    key: dict[str, Any]
    values: dict[str, Any] | None
    deltas: dict[str, int | float]
    set_add: dict[str, list[Any]]
    set_remove: dict[str, list[Any]]
    conflict_id: str | None = None
    kind: ConflictKind | None = None

    @property
    def has_ops(self) -> bool:
        return bool(self.deltas or self.set_add or self.set_remove)


def _bad(event: Event, message: str, **context: Any) -> EventError:
    return EventError(
        message,
        table=event.table,
        key=event.key,
        event_id=event.event_id,
        origin=event.origin,
        operation=event.operation.value,
        **context,
    )


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _columns(event: Event, payload: Mapping[str, Any], member: str) -> dict[str, Any]:
    raw = payload.get(member)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(c, str) for c in raw):
        raise _bad(event, f"payload '{member}' must be an object keyed by column name")
    return dict(raw)


def _element(event: Event, column: str, value: object) -> object:
    # only scalars: elements become JSON object keys in meta and need a total order
    if isinstance(value, str) or _is_number(value):
        return value
    raise _bad(event, "set elements must be strings or finite numbers", column=column, element=repr(value))


#: members of the commonest payload (a whole-row INSERT/UPDATE), parsed by the fast path
_PLAIN_MEMBERS: Final = frozenset(("key", "values"))
_PLAIN_OPERATIONS: Final = (Operation.INSERT, Operation.UPDATE)


def _parse(event: Event) -> _Payload:
    """Check a payload once; the same checks, errors and result for every input.

    The commonest payload -- an INSERT or UPDATE made of plain dicts with only
    ``key`` and ``values`` -- is recognised with exact-type tests first and built
    directly; anything else (or anything the fast tests cannot vouch for) takes the
    full path below, so a bad payload gets exactly the error it always got.
    """
    payload = event.payload
    if (
        type(payload) is dict
        and event.operation in _PLAIN_OPERATIONS
        and payload.keys() <= _PLAIN_MEMBERS
        and (event.prior is None or event.prior < event.hlc)
    ):
        key = payload.get("key")
        values = payload.get("values")
        if (
            type(key) is dict and key and all(type(c) is str for c in key)
            and (values is None or (type(values) is dict and all(type(c) is str for c in values)))
        ):
            return _Payload(dict(key), dict(values) if values is not None else {}, {}, {}, {})
    return _parse_checked(event)


def _parse_checked(event: Event) -> _Payload:
    payload = event.payload
    if not isinstance(payload, Mapping):
        raise _bad(event, "payload must be a JSON object")
    key = payload.get("key")
    if not isinstance(key, Mapping) or not key or not all(isinstance(c, str) for c in key):
        raise _bad(event, "payload has no 'key' object naming the row")
    if event.prior is not None and not event.prior < event.hlc:
        # a writer's stamp is always after the version it read; anything else is a
        # corrupt event that would break every causality test below
        raise _bad(event, "event stamp is not after its prior stamp", hlc=str(event.hlc), prior=str(event.prior))

    values: dict[str, Any] | None
    if event.operation is Operation.RESOLVE:
        if "values" not in payload:
            raise _bad(event, "RESOLVE must state 'values' (the chosen row, or null for deleted)")
        values = None if payload["values"] is None else _columns(event, payload, "values")
    else:
        values = _columns(event, payload, "values")

    deltas = _columns(event, payload, "deltas")
    for column, delta in deltas.items():
        if not _is_number(delta):
            raise _bad(event, "counter delta is not a finite number", column=column, delta=repr(delta))

    sets: dict[str, dict[str, list[Any]]] = {}
    for member in ("set_add", "set_remove"):
        ops = _columns(event, payload, member)
        for column, elements in ops.items():
            if not isinstance(elements, list):
                raise _bad(event, f"'{member}' of a set column must be a list", column=column)
            for element in elements:
                _element(event, column, element)
        sets[member] = ops

    if (deltas or any(sets.values())) and event.operation in (Operation.DELETE, Operation.RESOLVE):
        raise _bad(event, "counter deltas and set operations are only valid on INSERT and UPDATE")

    cid: str | None = None
    kind: ConflictKind | None = None
    if event.operation is Operation.RESOLVE:
        cid = payload.get("conflict_id")
        if not isinstance(cid, str) or not cid:
            raise _bad(event, "RESOLVE has no 'conflict_id'")
        for member in ("by", "reason"):
            if payload.get(member) is not None and not isinstance(payload.get(member), str):
                raise _bad(event, f"RESOLVE '{member}' must be a string")
        hint = payload.get("kind")
        if hint is not None:
            try:
                kind = ConflictKind(hint)
            except ValueError:
                raise _bad(event, "RESOLVE 'kind' is not a conflict kind", kind=repr(hint)) from None

    return _Payload(dict(key), values, deltas, sets["set_add"], sets["set_remove"], cid, kind)


def _full_row(event: Event, payload: _Payload) -> dict[str, Any]:
    """The row an INSERT/UPDATE/RESOLVE writes: its values with the key columns."""
    row = dict(payload.values or {})
    for column, value in payload.key.items():
        if column in row and row[column] != value:
            raise _bad(event, "key column in 'values' disagrees with 'key'", column=column)
        row[column] = value
    return row


# -- conflict detection -------------------------------------------------------------


def classify(current: RowState | None, event: Event) -> ConflictKind | None:
    """The conflict an event makes with the region's current version, if any.

    Causally later events (the writer saw exactly the current version), a first
    insert, and a delete meeting a tombstone (both sides agree the row is gone)
    are not conflicts. RESOLVE events are the end of a conflict, not one.
    """
    op = event.operation
    if op is Operation.RESOLVE:
        return None
    if current is None:
        return None if op is Operation.INSERT else ConflictKind.UPDATE_MISSING
    if event.prior == current.hlc:
        return None
    if current.deleted:
        return None if op is Operation.DELETE else ConflictKind.UPDATE_DELETE
    if op is Operation.INSERT:
        return ConflictKind.INSERT_INSERT
    if op is Operation.UPDATE:
        return ConflictKind.UPDATE_UPDATE
    return ConflictKind.DELETE_UPDATE


def _label(hlc: Timestamp, origin: str) -> str:
    return f"{origin}@{hlc.pack()}"


def _conflict_id(current: RowState | None, event: Event) -> str:
    # RowState carries no event id; the pair of versions names the conflict just as
    # well and is known identically to every region that meets the same pair
    local = "absent" if current is None else _label(current.hlc, current.origin)
    return conflict_id(event.table, event.key, (local, _label(event.hlc, event.origin)))


def _local_version(current: RowState | None) -> Version:
    if current is None:
        return _ABSENT
    values = None if current.deleted else dict(current.values)
    return Version(values, current.hlc, current.origin, current.deleted)


def _remote_version(event: Event, payload: _Payload) -> Version:
    deleted = event.operation is Operation.DELETE or (event.operation is Operation.RESOLVE and payload.values is None)
    if deleted:
        return Version(None, event.hlc, event.origin, True)
    values: dict[str, Any] = dict(payload.values or {})
    values.update(payload.key)
    return Version(values, event.hlc, event.origin, False)


def _record(
    policy: str,
    kind: ConflictKind,
    outcome: Outcome,
    current: RowState | None,
    event: Event,
    payload: _Payload,
    cid: str | None = None,
) -> ConflictRecord:
    return ConflictRecord(
        conflict_id=cid or _conflict_id(current, event),
        table=event.table,
        key=event.key,
        kind=kind,
        policy=policy,
        outcome=outcome,
        local=_local_version(current),
        remote=_remote_version(event, payload),
        event_id=event.event_id,
    )


def _same_version(current: RowState | None, event: Event) -> bool:
    return current is not None and current.hlc == event.hlc and current.origin == event.origin


def _whole_row_state(event: Event, payload: _Payload, meta: Mapping[str, Any]) -> RowState:
    if event.operation is Operation.DELETE or (event.operation is Operation.RESOLVE and payload.values is None):
        return RowState({}, event.hlc, event.origin, deleted=True, meta=dict(meta))
    return RowState(_full_row(event, payload), event.hlc, event.origin, deleted=False, meta=dict(meta))


# -- lww ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LwwPolicy:
    """Row-level last-writer-wins.

    The final row is the row of the greatest ``(hlc, origin)`` event ever applied,
    which is why any delivery order and any duplication give the same state: a max
    does not care about order. A RESOLVE on an lww table is a write like any other
    (an operator forcing a value), reported as RESOLVED.
    """

    @property
    def name(self) -> str:
        return "lww"

    def apply(self, current: RowState | None, event: Event) -> Applied:
        payload = _parse(event)
        if payload.has_ops:
            raise _bad(event, "lww tables take whole rows in 'values', not deltas or set operations")
        if _same_version(current, event):
            return Applied(None)
        wins = current is None or not current.wins_over(event.hlc, event.origin)
        state = _whole_row_state(event, payload, {}) if wins else None
        if event.operation is Operation.RESOLVE:
            outcome = Outcome.RESOLVED if wins else Outcome.DISCARDED
            closes = payload.kind or _resolve_kind(current, payload)
            return Applied(state, _record(self.name, closes, outcome, current, event, payload, payload.conflict_id))
        kind = classify(current, event)
        if kind is None:
            return Applied(state)
        outcome = Outcome.APPLIED if wins else Outcome.DISCARDED
        return Applied(state, _record(self.name, kind, outcome, current, event, payload))


def _resolve_kind(current: RowState | None, payload: _Payload) -> ConflictKind:
    """Best guess of the kind a RESOLVE closes when its payload does not say; the
    queue keeps the kind it parked, so this only labels the audit line."""
    if current is None:
        return ConflictKind.UPDATE_MISSING
    if current.deleted:
        return ConflictKind.UPDATE_DELETE
    if payload.values is None:
        return ConflictKind.DELETE_UPDATE
    return ConflictKind.UPDATE_UPDATE


# -- manual -------------------------------------------------------------------------


def _resolution(current: RowState | None) -> Stamp | None:
    if current is None:
        return None
    res = current.meta.get("resolution")
    if not isinstance(res, Mapping):
        return None
    return (int(res["hlc"]), str(res["origin"]))


#: manual meta key: the stamp the current version's writer saw (so that version,
#: arriving after its successor, is known to be older rather than concurrent)
_PRIOR: Final = "prior"


#: manual meta key: stamps of versions the current one descends from that this region
#: has not applied (it took a descendant first: a key never seen, or a tombstone met
#: by a delete). When one arrives it is known to be older, not concurrent, and its
#: own prior takes its place; so once the whole chain is here the list is empty
#: again, as in a region that got the chain in order (absent when empty).
_UNSEEN: Final = "unseen"


def _unseen(current: RowState | None) -> list[int]:
    raw = current.meta.get(_UNSEEN) if current is not None else None
    return sorted({int(s) for s in raw}) if isinstance(raw, list) else []


def _ancestor_of_current(current: RowState | None, event: Event) -> bool:
    if current is None or not current.wins_over(event.hlc, event.origin):
        return False
    stamp = event.hlc.pack()
    return current.meta.get(_PRIOR) == stamp or stamp in _unseen(current)


def _with_unseen(meta: dict[str, Any], unseen: set[int]) -> dict[str, Any]:
    if unseen:
        meta[_UNSEEN] = sorted(unseen)
    else:
        meta.pop(_UNSEEN, None)
    return meta


def settle_parked(
    policy: ConflictPolicy, current: RowState | None, parked: Sequence[tuple[str, Event]],
) -> tuple[RowState | None, list[tuple[str, Outcome]]]:
    """Take the parked versions of one key again after its row changed.

    A version is parked when its prior is not the current stamp; that is also what
    a causally later version looks like when it arrives before its predecessor
    (v3 before v2, the region holding v1). Once the predecessor is applied, the
    policy applies the parked version as it would have in order, and may unlock
    another (a chain of any length); a parked ancestor of what the region now
    holds is superseded. Whatever the policy still calls a conflict stays parked.
    ``parked`` is (conflict id, event); returns the key's state and the entries
    that closed, APPLIED (the version became the row) or DISCARDED (it was an
    ancestor), so that every delivery order of a causal chain ends in its last
    version with no open entry.
    """
    state = current
    waiting = sorted(parked, key=lambda p: (p[1].hlc, p[1].origin))
    closed: list[tuple[str, Outcome]] = []
    progress = True
    while progress and waiting:
        progress = False
        for item in list(waiting):
            cid, event = item
            try:
                outcome = policy.apply(state, event)
            except EventError:
                continue  # it parked once, so it parses; an operator looks at it if not
            if outcome.conflict is not None:
                continue
            waiting.remove(item)
            took = outcome.state is not None and (outcome.state.hlc, outcome.state.origin) == (
                event.hlc, event.origin)
            closed.append((cid, Outcome.APPLIED if took else Outcome.DISCARDED))
            if outcome.state is not None:
                state = outcome.state
            progress = True
    return state, closed


@dataclass(frozen=True, slots=True)
class ManualPolicy:
    """Apply what is causally later, park what is concurrent, converge on RESOLVE.

    - An event applies when the writer saw the current version (``prior`` equals
      the current stamp), when it inserts a key never seen, when it is the first
      sight of a key at all (an update/delete for a missing row: there is no local
      version to protect, so taking it loses nothing; recorded as update_missing),
      or when it deletes a row already deleted (both sides agree; the greater
      tombstone stamp is kept).
    - A version the current one's writer saw (its stamp is the current version's
      ``prior``, kept in ``meta["prior"]``, or an older ancestor this region has
      not applied, kept in ``meta["unseen"]``) is older, not concurrent: it arrived
      after its successor, typically through a faster origin's topic, and changes
      only that bookkeeping. (A prior is a stamp without its region: a concurrent write stamped
      in another region in the same millisecond with the same logical counter
      would pass for the seen version here; the regions that meet it in the other
      order still park it.)
    - Anything else is concurrent: the region keeps its current row and returns a
      PARKED record. Until an operator decides, regions may hold different rows.
      A causally later version that merely arrived before its predecessor parks
      too; :func:`settle_parked` takes it again once the predecessor applied.
    - A RESOLVE overwrites the row with the chosen value and its own stamp, whatever
      the region holds (even a concurrent write stamped later: the operator's
      decision must win everywhere or regions would not converge). Its stamp is
      kept in ``meta["resolution"]``; events older than it are superseded by the
      decision (DISCARDED), an older RESOLVE is ignored. So once every region has
      the RESOLVE, every delivery order ends in the same state.
    """

    @property
    def name(self) -> str:
        return "manual"

    def apply(self, current: RowState | None, event: Event) -> Applied:
        payload = _parse(event)
        if payload.has_ops:
            raise _bad(event, "manual tables take whole rows in 'values', not deltas or set operations")
        if _same_version(current, event):
            return Applied(None)
        stamp = (event.hlc.pack(), event.origin)
        resolution = _resolution(current)

        if event.operation is Operation.RESOLVE:
            if resolution is not None and resolution >= stamp:
                return Applied(None)
            meta = {"resolution": {"conflict_id": payload.conflict_id, "hlc": stamp[0], "origin": stamp[1]}}
            state = _whole_row_state(event, payload, meta)
            closes = payload.kind or _resolve_kind(current, payload)
            record = _record(self.name, closes, Outcome.RESOLVED, current, event, payload, payload.conflict_id)
            return Applied(state, record)

        if current is not None and _ancestor_of_current(current, event):
            # the current version's writer saw this very version and replaced it: it
            # arrived late (another origin's topic was faster), it is not concurrent;
            # its own prior is now the ancestor still to come
            unseen = set(_unseen(current)) - {stamp[0]}
            if event.prior is not None:
                unseen.add(event.prior.pack())
            meta = _with_unseen(dict(current.meta), unseen)
            if meta == current.meta:
                return Applied(None)
            return Applied(RowState(dict(current.values), current.hlc, current.origin, current.deleted, meta))
        kind = classify(current, event)
        if resolution is not None and stamp < resolution:
            # the operator decided with both sides of the conflict in view and stamped
            # the decision after them; what is older is settled
            return Applied(None, _record(self.name, kind, Outcome.DISCARDED, current, event, payload) if kind else None)

        carried: dict[str, Any] = (
            {"resolution": dict(current.meta["resolution"])} if resolution is not None and current is not None else {}
        )
        if event.prior is not None:
            carried[_PRIOR] = event.prior.pack()
        unseen = set(_unseen(current))
        if event.prior is not None and (current is None or event.prior != current.hlc):
            # taking a version without the one its writer saw: that one is still to come
            unseen.add(event.prior.pack())
        _with_unseen(carried, unseen)
        if kind is None:
            if current is not None and current.wins_over(event.hlc, event.origin):
                return Applied(None)  # an older tombstone meeting a newer one
            return Applied(_whole_row_state(event, payload, carried))
        if kind is ConflictKind.UPDATE_MISSING:
            state = _whole_row_state(event, payload, carried)
            return Applied(state, _record(self.name, kind, Outcome.APPLIED, current, event, payload))
        return Applied(None, _record(self.name, kind, Outcome.PARKED, current, event, payload))


# -- merge --------------------------------------------------------------------------


def _elem_key(element: object) -> str:
    """Canonical text of a set element: distinct for 1, 1.0 and "1"."""
    return json.dumps(element, separators=(",", ":"))


def _order_key(value: object) -> tuple[int, Any, str]:
    """A total order over the scalars max/min/set accept: numbers before strings."""
    if isinstance(value, str):
        return (1, value, _elem_key(value))
    return (0, value, _elem_key(value))


def _newer(a: list[Any] | None, b: Stamp) -> bool:
    return a is None or (int(a[0]), str(a[1])) < b


def _later(a: Any, b: Any) -> Any:
    """The greater of two stored stamps (``[hlc, origin]`` or None); ``a`` on a tie."""
    mine, theirs = _as_stamp(a), _as_stamp(b)
    return a if theirs is None or (mine is not None and mine >= theirs) else b


def _stamp_list(stamp: Stamp) -> list[Any]:
    return [stamp[0], stamp[1]]


def _as_stamp(value: Any) -> Stamp | None:
    return None if value is None else (int(value[0]), str(value[1]))


def _add_numbers(total: int | str, delta: int | float | str) -> int | str:
    """Exact addition, so that sums do not depend on the order they were made in.

    Integers stay integers. Anything fractional is summed as a decimal of the
    shortest text that round-trips each float (float addition is not associative,
    which would let two regions drift apart by an ulp) and stored as decimal text.
    """
    if isinstance(total, int) and isinstance(delta, int):
        return total + delta
    with localcontext() as ctx:
        ctx.prec = 200
        exact = _decimal(total) + _decimal(delta)
        if exact == exact.to_integral_value():
            return int(exact)
        return format(exact.normalize(), "f")


def _decimal(number: int | float | str) -> Decimal:
    return Decimal(repr(number)) if isinstance(number, float) else Decimal(number)


def _number_value(total: int | str) -> int | float:
    return total if isinstance(total, int) else float(Decimal(total))


@dataclass(frozen=True, slots=True)
class MergePolicy:
    """Per-column rules, each a commutative merge, so rows converge without winners.

    ``rules`` maps column -> ``lww`` | ``counter`` | ``set`` | ``max`` | ``min``;
    other columns are ``lww``, each with its own stamp, so two regions updating
    different columns of one row both keep their change (writers should therefore
    put only the columns they changed in ``values``).

    - ``counter``: the sum of every delta (an INSERT's value counts as a delta from
      0), kept per origin. Sums are not idempotent: the inbox's exactly-once
      delivery is what makes them right.
    - ``set``: a last-writer-wins element set (not an add-wins / observed-remove
      set): per element the greatest add stamp and the greatest remove stamp,
      ``(hlc, origin)`` so the region id breaks HLC ties; present iff add >= remove
      (equal only when one event adds and removes it: the add stays) and the add is
      newer than the row tombstone. A remove stamped later therefore deletes a
      concurrent add its writer never saw. Elements are set with
      ``set_add``/``set_remove`` (or an INSERT's list value). The metadata format
      (``{"add": {elem: stamp}, "remove": {elem: stamp}}``) is shared with the SQL
      capture triggers; an observed-remove set would need per-add tags in it.
    - ``max``/``min``: monotone registers over every value ever written (null is
      no value).
    - Row delete: a tombstone stamp, the greatest DELETE's. The row is visible iff
      the greatest INSERT/UPDATE stamp is above it. A re-created row shows lww
      columns and set elements only if written after the tombstone (older ones
      read as null / absent); counters and max/min are not reset by a delete,
      since resetting them consistently would need the deleter's observed
      per-origin totals, which events do not carry.
    """

    rules: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return "merge"

    def rule(self, column: str) -> str:
        for col, rule in self.rules:
            if col == column:
                return rule
        return "lww"

    def apply(self, current: RowState | None, event: Event) -> Applied:
        payload = _parse(event)
        if event.operation is Operation.RESOLVE:
            raise _bad(event, "merge tables never park conflicts; write an UPDATE instead of a RESOLVE")
        if _same_version(current, event) and not (current is not None and current.meta.get(ADOPTED_STAMP)):
            # the newest event again: only a duplicate can have the same stamp, and
            # a counter must not count it twice. Not after a repair's join: the stamp
            # came from a peer, and its event, still on its way here, is not a duplicate
            return Applied(None)
        meta = _merge_meta(self, current, event, payload)
        if current is not None and current.meta.get(ADOPTED_STAMP) and (event.hlc, event.origin) < (
                current.hlc, current.origin):
            meta[ADOPTED_STAMP] = True  # an older event: the peer's stamp is still the row's
        state = _render(meta)
        kind = classify(current, event)
        if current is not None and state == current:
            state_out = None
        else:
            state_out = state
        if kind is None:
            return Applied(state_out)
        if kind is ConflictKind.UPDATE_MISSING:
            outcome = Outcome.APPLIED
        else:
            outcome = Outcome.DISCARDED if state_out is None else Outcome.MERGED
        return Applied(state_out, _record(self.name, kind, outcome, current, event, payload))


def _fresh_field(rule: str) -> dict[str, Any]:
    if rule == "lww":
        return {"rule": "lww", "at": None, "value": None}
    if rule == "counter":
        return {"rule": "counter", "by_origin": {}}
    if rule == "set":
        return {"rule": "set", "add": {}, "remove": {}}
    return {"rule": rule, "value": None}


def _merge_meta(policy: MergePolicy, current: RowState | None, event: Event, payload: _Payload) -> dict[str, Any]:
    """The metadata after the event: every member is a max-register or a sum."""
    # deep copy through JSON: meta is JSON by contract, and a copy keeps the input
    # state untouched (callers may hold on to it)
    old: dict[str, Any] = json.loads(json.dumps(dict(current.meta))) if current is not None else {}
    if current is not None and "write" not in old and "delete" not in old:
        old = _adopt(policy, current, event, payload)
    meta: dict[str, Any] = {
        "key": old.get("key"),
        "write": old.get("write"),
        "delete": old.get("delete"),
        "fields": old.get("fields", {}),
    }
    stamp = (event.hlc.pack(), event.origin)
    fields: dict[str, Any] = meta["fields"]
    top = max((s for s in (_as_stamp(meta["write"]), _as_stamp(meta["delete"])) if s is not None), default=None)
    if top is None or top < stamp:
        # the key columns never change in practice; taking the newest makes even a
        # disagreement resolve the same way everywhere
        meta["key"] = dict(payload.key)

    if event.operation is Operation.DELETE:
        if _newer(meta["delete"], stamp):
            meta["delete"] = _stamp_list(stamp)
        return meta

    if _newer(meta["write"], stamp):
        meta["write"] = _stamp_list(stamp)

    def slot(column: str, rule: str) -> dict[str, Any]:
        entry = fields.get(column)
        if entry is None:
            entry = fields[column] = _fresh_field(rule)
        elif entry.get("rule") != rule:
            raise _bad(
                event,
                "column's merge rule differs from the one its stored state was built with",
                column=column,
                configured=rule,
                stored=entry.get("rule"),
            )
        return entry

    for column, value in (payload.values or {}).items():
        if column in payload.key:
            if value != payload.key[column]:
                raise _bad(event, "key column in 'values' disagrees with 'key'", column=column)
            continue
        rule = policy.rule(column)
        entry = slot(column, rule)
        if rule == "lww":
            if _newer(entry["at"], stamp):
                entry["at"] = _stamp_list(stamp)
                entry["value"] = value
        elif rule == "counter":
            if event.operation is not Operation.INSERT:
                raise _bad(event, "counter columns change by 'deltas', not by 'values'", column=column)
            if value is not None:
                if not _is_number(value):
                    raise _bad(event, "counter value is not a finite number", column=column)
                _count(entry, event.origin, value)
        elif rule == "set":
            if event.operation is not Operation.INSERT:
                raise _bad(event, "set columns change by 'set_add'/'set_remove', not by 'values'", column=column)
            if value is not None:
                if not isinstance(value, list):
                    raise _bad(event, "set column value must be a list", column=column)
                for element in value:
                    _stamp_element(entry["add"], _element(event, column, element), stamp)
        else:  # max / min
            if value is None:
                continue
            _element(event, column, value)  # same scalar domain as set elements
            held = entry["value"]
            if held is None:
                entry["value"] = value
            elif rule == "max" and _order_key(value) > _order_key(held):
                entry["value"] = value
            elif rule == "min" and _order_key(value) < _order_key(held):
                entry["value"] = value

    for column, delta in payload.deltas.items():
        if policy.rule(column) != "counter":
            raise _bad(event, "'deltas' names a column that is not a counter", column=column)
        _count(slot(column, "counter"), event.origin, delta)
    for member, ops in (("add", payload.set_add), ("remove", payload.set_remove)):
        for column, elements in ops.items():
            if policy.rule(column) != "set":
                raise _bad(event, f"'set_{member}' names a column that is not a set", column=column)
            entry = slot(column, "set")
            for element in elements:
                _stamp_element(entry[member], element, stamp)
    return meta


def _adopt(policy: MergePolicy, current: RowState, event: Event, payload: _Payload) -> dict[str, Any]:
    """Metadata for a row that has none: one written before the table was managed
    (or under another policy). Its visible values become one write at its stamp,
    so the first merge keeps them instead of rebuilding the row from nothing;
    regions holding the same row adopt it identically."""
    stamp: Stamp = (current.hlc.pack(), current.origin)
    at = _stamp_list(stamp)
    meta: dict[str, Any] = {"key": dict(payload.key), "write": None, "delete": None, "fields": {}}
    if current.deleted:
        meta["delete"] = at
        return meta
    meta["write"] = at
    for column, value in current.values.items():
        if column in payload.key:
            continue
        rule = policy.rule(column)
        entry = _fresh_field(rule)
        if rule == "lww":
            entry.update(at=list(at), value=value)
        elif rule == "counter" and value is not None:
            if not _is_number(value):
                raise _bad(event, "existing counter value is not a number", column=column)
            entry["by_origin"][current.origin] = _add_numbers(0, value)
        elif rule == "set" and value is not None:
            if not isinstance(value, list):
                raise _bad(event, "existing set value is not a list", column=column)
            for element in value:
                _stamp_element(entry["add"], _element(event, column, element), stamp)
        elif rule in ("max", "min"):
            entry["value"] = value
        meta["fields"][column] = entry
    return meta


def _count(entry: dict[str, Any], origin: str, delta: int | float) -> None:
    by_origin: dict[str, Any] = entry["by_origin"]
    by_origin[origin] = _add_numbers(by_origin.get(origin, 0), delta)


def _stamp_element(stamps: dict[str, Any], element: object, stamp: Stamp) -> None:
    k = _elem_key(element)
    if _newer(stamps.get(k), stamp):
        stamps[k] = _stamp_list(stamp)


def _top(meta: Mapping[str, Any]) -> Stamp:
    """The row's stamp: its newest write or delete."""
    return max(s for s in (_as_stamp(meta["write"]), _as_stamp(meta["delete"])) if s is not None)


def _render(meta: dict[str, Any]) -> RowState:
    """Visible values and row stamp, a pure function of the metadata."""
    write, delete = _as_stamp(meta["write"]), _as_stamp(meta["delete"])
    top = _top(meta)
    visible = write is not None and (delete is None or write > delete)
    values: dict[str, Any] = {}
    if visible:
        for column in sorted(meta["fields"]):
            values[column] = _field_value(meta["fields"][column], delete)
        values.update(meta["key"])
    return RowState(values, Timestamp.unpack(top[0]), top[1], deleted=not visible, meta=meta)


def _field_value(entry: Mapping[str, Any], tombstone: Stamp | None) -> Any:
    rule = entry["rule"]
    if rule == "lww":
        at = _as_stamp(entry["at"])
        return entry["value"] if at is not None and (tombstone is None or at > tombstone) else None
    if rule == "counter":
        total: int | str = 0
        for part in entry["by_origin"].values():
            total = _add_numbers(total, part)
        return _number_value(total)
    if rule == "set":
        present = []
        removes = entry["remove"]
        for k, add in entry["add"].items():
            added = (int(add[0]), str(add[1]))
            if tombstone is not None and added <= tombstone:
                continue
            removed = _as_stamp(removes.get(k))
            if removed is None or added >= removed:
                present.append(json.loads(k))
        return sorted(present, key=_order_key)
    return entry["value"]


#: row metadata member a repair's join sets when the row's stamp (its newest write
#: or delete) was taken from a peer: that event may not have arrived here yet, so
#: meeting it is not meeting a duplicate. Applying that event, or a newer one, drops it.
ADOPTED_STAMP: Final = "stamp_from_peer"


def join_merge_states(target: RowState | None, donor: RowState,
                      counter_totals: Mapping[str, Mapping[str, int | str]]) -> RowState:
    """A merge row holding what both states hold, for a repair that cannot wait for
    events that will never come (accepted as lost).

    Every member of the metadata but a counter's per-origin totals is a max-register
    (row write and delete stamps, lww fields' stamped values, set elements' add and
    remove stamps, max/min values) and joins by taking the greater. A total is a sum,
    which no join can merge: the caller works out what each origin's total must be
    (:func:`counter_total_with_lost`) and passes them as ``counter_totals`` (column ->
    origin -> total); other totals stay the target's. With no target state the
    target counted nothing of the key: the donor's state is taken, its counters
    only as ``counter_totals`` says (the rest of them may still be on their way).
    """
    if target is None:
        if "fields" not in donor.meta:
            return donor
        taken = json.loads(json.dumps(dict(donor.meta)))
        for column, entry in taken["fields"].items():
            if entry.get("rule") == "counter":
                entry["by_origin"] = dict(counter_totals.get(column, {}))
        taken[ADOPTED_STAMP] = True
        return _render(taken)
    mine, theirs = json.loads(json.dumps(dict(target.meta))), dict(donor.meta)
    if "fields" not in mine or "fields" not in theirs:
        return target  # a row without merge metadata: nothing to join by
    for member in ("write", "delete"):
        mine[member] = _later(mine.get(member), theirs.get(member))

    def top(meta: Mapping[str, Any]) -> Stamp:
        return _as_stamp(_later(meta.get("write"), meta.get("delete"))) or (0, "")

    mine["key"] = max((theirs, dict(target.meta)), key=top).get("key")
    fields: dict[str, Any] = mine["fields"]
    for column, other in theirs["fields"].items():
        rule = other.get("rule")
        entry = fields.setdefault(column, _fresh_field(str(rule)))
        if entry.get("rule") != rule:
            continue
        if rule == "lww":
            if _later(entry["at"], other["at"]) is not entry["at"]:
                entry["at"], entry["value"] = other["at"], other["value"]
        elif rule == "counter":
            entry["by_origin"].update(counter_totals.get(column, {}))
        elif rule == "set":
            for member in ("add", "remove"):
                for element, stamp in other[member].items():
                    entry[member][element] = _later(entry[member].get(element), stamp)
        else:  # max / min
            value, held = other.get("value"), entry.get("value")
            if value is not None and (held is None or (rule == "max" and _order_key(value) > _order_key(held))
                                      or (rule == "min" and _order_key(value) < _order_key(held))):
                entry["value"] = value
    if top(mine) != top(dict(target.meta)):
        mine[ADOPTED_STAMP] = True
    return _render(mine)


def counter_contribution(operation: str, payload: Mapping[str, Any], column: str) -> int | str:
    """What one event adds to a counter column, as :class:`MergePolicy` counts it: an
    INSERT's value and any delta."""
    total: int | str = 0
    value = (payload.get("values") or {}).get(column) if operation == Operation.INSERT.value else None
    for part in (value, (payload.get("deltas") or {}).get(column)):
        if part is not None and _is_number(part):
            total = _add_numbers(total, part)
    return total


def counter_total_with_lost(donor_total: int | str, donor_newer: Iterable[int | str],
                            target_newer: Iterable[int | str]) -> int | str:
    """An origin's counter total for a region that lost some of its events, exactly.

    Below a floor the donor counted every event of the origin and the target all of
    them but the ones accepted as lost; above it each counted what it applied. So the
    target's right total is the donor's without the donor's contributions above the
    floor (``donor_newer``), plus the target's own above it (``target_newer``): the
    lost events come in, whatever is still in flight either way does not."""
    total: int | str = donor_total
    for part in donor_newer:
        total = _add_numbers(total, _negated(part))
    for part in target_newer:
        total = _add_numbers(total, part)
    return total


def _negated(number: int | str) -> int | str:
    return -number if isinstance(number, int) else format(-Decimal(number), "f")


# -- selection ----------------------------------------------------------------------


def policy_for(name: str, fields: Mapping[str, str] | None = None) -> ConflictPolicy:
    """The policy a table's configuration names.

    Raises :class:`ConfigError` for an unknown policy or rule, and for field rules
    given to a policy that would silently ignore them.
    """
    fields = dict(fields or {})
    if name not in POLICY_NAMES:
        raise ConfigError("unknown conflict policy", policy=name, expected="|".join(POLICY_NAMES))
    for column, rule in fields.items():
        if rule not in FIELD_RULES:
            raise ConfigError("unknown merge field rule", column=column, rule=rule, expected="|".join(FIELD_RULES))
    if name == "merge":
        return MergePolicy(tuple(sorted(fields.items())))
    if fields:
        raise ConfigError("field rules only apply to the merge policy", policy=name, fields=",".join(sorted(fields)))
    return LwwPolicy() if name == "lww" else ManualPolicy()
