"""Plain frozen values shared by the pure core, the adapters and the services.

Nothing here performs I/O. An :class:`Event` is one replicated change as it
travels outbox -> Kafka -> inbox; a :class:`RowState` is what one region holds for
one key of a replicated table (visible values plus the metadata conflict policies
need: the winning stamp, tombstones, per-field stamps); an :class:`Outcome` is what
a policy decides when an event meets a row.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .hlc import Timestamp

JsonDict = Mapping[str, Any]


class Operation(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    #: an operator's decision on a parked conflict, replicated like any write
    RESOLVE = "resolve"


class ConflictKind(enum.StrEnum):
    """Named as PostgreSQL multi-master systems name them."""

    INSERT_INSERT = "insert_insert"
    UPDATE_UPDATE = "update_update"
    UPDATE_DELETE = "update_delete"  # an update arrives for a row deleted concurrently
    DELETE_UPDATE = "delete_update"  # a delete arrives for a row updated concurrently
    UPDATE_MISSING = "update_missing"  # an update arrives for a row never seen


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # the incoming version won
    DISCARDED = "discarded"  # the current version won; the event changed nothing
    MERGED = "merged"  # field rules combined both versions
    PARKED = "parked"  # manual policy: kept current, queued for an operator
    RESOLVED = "resolved"  # an operator's decision was applied


@dataclass(frozen=True, slots=True)
class Event:
    """One replicated change.

    ``payload`` is the outbox payload, a JSON object with these members (all optional
    except ``key``):

    - ``key``: {key column: value} identifying the row;
    - ``values``: {column: new value} for plain (last-writer-wins) columns;
    - ``deltas``: {counter column: signed increment};
    - ``set_add`` / ``set_remove``: {set column: [elements]};
    - for ``RESOLVE``: ``conflict_id``, ``values`` (the chosen row, or null for a
      deleted row), ``by``, ``reason``.

    ``prior`` is the stamp of the row version the writer saw when it wrote (``None``
    when it saw no row): it is what tells a causally later write from a concurrent one.
    ``sequence`` is the dense per-origin number the relay assigns in commit order;
    ``None`` until relayed.
    """

    origin: str
    event_id: str
    table: str
    key: str
    operation: Operation
    hlc: Timestamp
    payload: JsonDict
    prior: Timestamp | None = None
    sequence: int | None = None
    event_type: str = ""

    @property
    def key_values(self) -> JsonDict:
        key = self.payload.get("key")
        return key if isinstance(key, Mapping) else {}

    def to_wire(self) -> dict[str, Any]:
        """The JSON document published to Kafka."""
        return {
            "v": 1,
            "origin": self.origin,
            "sequence": self.sequence,
            "id": self.event_id,
            "aggregatetype": self.table,
            "aggregateid": self.key,
            "type": self.event_type,
            "op": self.operation.value,
            "hlc": self.hlc.pack(),
            "prior": self.prior.pack() if self.prior is not None else None,
            "payload": dict(self.payload),
        }


def encode_key(key_values: Mapping[str, Any], key_columns: tuple[str, ...]) -> str:
    """Canonical text of a row key (the outbox ``aggregateid``, the inbox, ``row_meta``
    and conflicts ``row_key``, and every key verify and repair name).

    One column: its canonical value as text (what Debezium users expect); several: a
    JSON array of canonical values. A value is canonical as PostgreSQL's ``to_jsonb``
    renders it with ``TimeZone = UTC``, numbers normalized: ``7``, ``7.5`` for
    ``Decimal("7.50")``/``7.5``/``7.50::numeric``, ``"2024-05-01T10:00:00+00:00"`` for a
    ``timestamptz``, whatever zone the datetime was in. So a key written by a service
    with typed values and the same key read back from the table's rows (see
    :func:`reconciler.verify.canonical_keys`) are one string.
    """
    values = [canonical_value(key_values[c]) for c in key_columns]
    if len(key_columns) == 1:
        return _scalar_text(values[0])
    return "[" + ",".join(_json_text(v) for v in values) + "]"


def decode_key(key: str, key_columns: tuple[str, ...]) -> dict[str, Any]:
    """The key column values of a canonical key (JSON values; numbers as Decimal or int),
    fit for ``jsonb_populate_record`` of the table's row type."""
    if len(key_columns) == 1:
        return {key_columns[0]: key}
    parsed = json.loads(key, parse_float=Decimal)
    if not isinstance(parsed, list) or len(parsed) != len(key_columns):
        raise ValueError(f"key {key!r} does not name the {len(key_columns)} columns {list(key_columns)}")
    return dict(zip(key_columns, parsed, strict=True))


def canonical_value(value: Any) -> Any:
    """One key column's value in canonical form: bool, int, Decimal (normalized, never
    integral), str, or None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        if value == value.to_integral_value():
            return int(value)
        return value.normalize()
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        text = value.isoformat()
        if value.microsecond:
            # PostgreSQL prints fractional seconds without trailing zeros
            head, _, rest = text.partition(".")
            digits = rest[:6].rstrip("0")
            text = f"{head}.{digits}{rest[6:]}"
        return text
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _json_text(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class RowState:
    """What one region holds for one key.

    ``values`` are the visible columns (empty when ``deleted``). ``hlc``/``origin``
    stamp the version that currently wins at row level; a deleted row keeps them as
    its tombstone so an older update cannot bring it back. ``meta`` holds what a
    policy needs beyond that (per-field stamps, set element stamps); it is stored as
    JSON and must contain only JSON values.
    """

    values: JsonDict
    hlc: Timestamp
    origin: str
    deleted: bool = False
    meta: JsonDict = field(default_factory=dict)

    def wins_over(self, hlc: Timestamp, origin: str) -> bool:
        """Row-level last-writer-wins order: higher HLC, then higher region id."""
        return (self.hlc, self.origin) > (hlc, origin)


@dataclass(frozen=True, slots=True)
class Version:
    """One side of a conflict as shown to operators."""

    values: JsonDict | None
    hlc: Timestamp
    origin: str
    deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": dict(self.values) if self.values is not None else None,
            "hlc": str(self.hlc),
            "origin": self.origin,
            "deleted": self.deleted,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Version:
        values = doc.get("values")
        return cls(
            values=dict(values) if isinstance(values, Mapping) else None,
            hlc=Timestamp.parse(str(doc.get("hlc") or "0.0")),
            origin=str(doc.get("origin") or ""),
            deleted=bool(doc.get("deleted")),
        )


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    """A detected conflict, kept whatever the outcome (audit trail)."""

    conflict_id: str
    table: str
    key: str
    kind: ConflictKind
    policy: str
    outcome: Outcome
    local: Version
    remote: Version
    event_id: str


def conflict_id(table: str, key: str, event_ids: tuple[str, ...]) -> str:
    """Deterministic id, so every region names the same conflict the same way."""
    digest = hashlib.sha256()
    for part in (table, key, *sorted(event_ids)):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Applied:
    """A policy's decision: the row's new state (None: leave the row untouched) and
    the conflict it saw, if any."""

    state: RowState | None
    conflict: ConflictRecord | None = None
