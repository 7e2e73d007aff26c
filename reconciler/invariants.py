"""Business invariants after a merge: the values of a violation and of the
compensation event published for it. Pure: no I/O (the checks themselves run in
SQL, see :mod:`reconciler.store.invariants`).

A violation's id is derived from what it is about, never from where or when it
was seen: (table, key, invariant, the set of contributing event ids). Regions that
detect the same violation over the same events name it the same way, and the
compensation event each of them publishes carries that id, which is the
idempotency key consumers dedupe by (docs/compensation-events.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .hlc import Timestamp
from .model import ConflictRecord, Outcome, Version

#: the ``schema`` member of every compensation event this version publishes
COMPENSATION_SCHEMA: Final = "reconciler.compensation/1"
#: kind of a compensation event for a failing invariant
KIND_INVARIANT: Final = "invariant_violation"
#: kind of a compensation event for an acknowledged write a conflict decision threw away
KIND_DISCARDED: Final = "discarded_write"
#: the newest events of a key that a violation lists as contributing (bounded, so a hot
#: key with a long history does not make every violation and event huge)
MAX_CONTRIBUTING: Final = 50


@dataclass(frozen=True, slots=True)
class Contribution:
    """One event applied to (or written in) this region for the violating key."""

    event_id: str
    origin: str
    #: the origin's relay sequence; None while this region's own event is not yet numbered
    sequence: int | None
    #: HLC as "wall_ms.logical", as everywhere operators read stamps
    hlc: str
    operation: str
    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id, "origin": self.origin, "sequence": self.sequence, "hlc": self.hlc,
            "operation": self.operation, "type": self.type, "payload": dict(self.payload),
        }


@dataclass(frozen=True, slots=True)
class Violation:
    """An invariant found false for one row, as recorded in reconciler.violations."""

    violation_id: str
    table: str
    key: str
    invariant: str
    expression: str
    row: Mapping[str, Any]
    contributing: Sequence[Contribution]


def violation_id(table: str, key: str, invariant: str, event_ids: Iterable[str]) -> str:
    """Deterministic: the same inputs name the same violation in every region, whatever
    the order the events were applied in or listed in."""
    digest = hashlib.sha256()
    for part in ("invariant", table, key, invariant, *sorted(set(event_ids))):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def compensation_event(violation: Violation, region: str, detected_at: str) -> dict[str, Any]:
    """The JSON document published on the compensation topic (docs/compensation-events.md)."""
    return {
        "schema": COMPENSATION_SCHEMA,
        "id": violation.violation_id,
        "kind": KIND_INVARIANT,
        "table": violation.table,
        "key": violation.key,
        "invariant": violation.invariant,
        "expression": violation.expression,
        "row": dict(violation.row),
        "contributing": [c.to_dict() for c in violation.contributing],
        "detected_by": region,
        "detected_at": detected_at,
    }


# -- discarded writes ---------------------------------------------------------------

_NEVER_WRITTEN = Timestamp(0, 0)


@dataclass(frozen=True, slots=True)
class Discard:
    """An acknowledged write that lost a conflict: its region told its client it
    succeeded, and the row no longer says so."""

    table: str
    key: str
    lost: Version
    kept: Version
    #: what decided: {"policy", "conflict_id", "conflict_kind"} and, for an operator's
    #: decision, "resolved_by" and "reason"
    decision: Mapping[str, Any]
    #: the lost write's replicated event id, when this region holds its event
    lost_event_id: str | None = None

    @property
    def discard_id(self) -> str:
        return discard_id(self.table, self.key, self.lost.origin, self.lost.hlc)


def discard_id(table: str, key: str, origin: str, hlc: Timestamp) -> str:
    """Named after the lost write alone (its stamp and origin are unique), so every
    region that sees the same write lose, to whichever winner, names it the same way."""
    digest = hashlib.sha256()
    for part in ("discarded", table, key, origin, str(hlc.pack())):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def discard_of(record: ConflictRecord) -> Discard | None:
    """The write an automatic last-writer-wins decision threw away, if it threw one.

    Only lww decides automatically by discarding a whole write: merge keeps both
    sides' fields and counters, manual parks (its discards are the operator's
    resolution, see :func:`resolution_discards`). A version that was never written
    (the row was absent) is nothing lost.
    """
    if record.policy != "lww":
        return None
    if record.outcome is Outcome.APPLIED:
        lost, kept, lost_event = record.local, record.remote, None
    elif record.outcome is Outcome.DISCARDED:
        lost, kept, lost_event = record.remote, record.local, record.event_id or None
    else:
        return None
    if lost.hlc == _NEVER_WRITTEN:
        return None
    decision = {"policy": record.policy, "conflict_id": record.conflict_id, "conflict_kind": record.kind.value}
    return Discard(record.table, record.key, lost, kept, decision, lost_event)


def resolution_discards(
    table: str, key: str, sides: Sequence[Version], kept: Version, decision: Mapping[str, Any]
) -> list[Discard]:
    """The sides of a parked conflict an operator's decision did not keep: every side
    whose row (or deletion) differs from the row the decision keeps."""
    lost = []
    for side in sides:
        if side.hlc == _NEVER_WRITTEN:
            continue
        if side.deleted or kept.deleted:
            same = side.deleted and kept.deleted
        else:
            same = side.values == kept.values
        if not same:
            lost.append(Discard(table, key, side, kept, decision))
    return lost


def _version_doc(version: Version) -> dict[str, Any]:
    values = None if version.deleted or version.values is None else dict(version.values)
    return {"origin": version.origin, "hlc": str(version.hlc), "deleted": version.deleted, "values": values}


def discard_event(discard: Discard, region: str, detected_at: str) -> dict[str, Any]:
    """The JSON document published for a discarded write (docs/compensation-events.md)."""
    kept = _version_doc(discard.kept)
    return {
        "schema": COMPENSATION_SCHEMA,
        "id": discard.discard_id,
        "kind": KIND_DISCARDED,
        "table": discard.table,
        "key": discard.key,
        "decision": dict(discard.decision),
        "row": kept["values"],
        "discarded": {"event_id": discard.lost_event_id, **_version_doc(discard.lost)},
        "kept": kept,
        "detected_by": region,
        "detected_at": detected_at,
    }
