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

#: the ``schema`` member of every compensation event this version publishes
COMPENSATION_SCHEMA: Final = "reconciler.compensation/1"
#: kind of a compensation event for a failing invariant
KIND_INVARIANT: Final = "invariant_violation"
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
