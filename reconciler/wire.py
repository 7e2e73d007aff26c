"""Event encoding on Kafka: JSON, versioned, validated strictly on the way in.

A message that fails validation raises :class:`EventError` naming what is wrong,
so the consumer can quarantine it with that reason and go on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from .errors import EventError
from .hlc import Timestamp
from .model import Event, Operation

WIRE_VERSION = 1
#: sequences and HLC stamps are stored as PostgreSQL bigint: anything larger cannot be applied
MAX_INTEGER = 2**63 - 1


def encode(event: Event) -> bytes:
    return json.dumps(event.to_wire(), separators=(",", ":"), default=str).encode()


def decode(raw: bytes | None, *, topic: str = "", offset: int | None = None) -> Event:
    where: dict[str, Any] = {"topic": topic or None, "offset": offset}
    if raw is None:
        raise EventError("message has no value", **where)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError(f"message is not JSON: {exc}", **where) from exc
    if not isinstance(doc, Mapping):
        raise EventError("message is not a JSON object", **where)
    if doc.get("v") != WIRE_VERSION:
        raise EventError(f"unsupported wire version {doc.get('v')!r}", **where)
    origin = _text(doc, "origin", where)
    where["origin"] = origin
    sequence = _integer(doc, "sequence", where)
    if sequence < 1:
        raise EventError("sequence must be >= 1", sequence=sequence, **where)
    event_id = _text(doc, "id", where)
    try:
        uuid.UUID(event_id)
    except ValueError as exc:
        raise EventError("id is not a UUID", event_id=event_id, **where) from exc
    try:
        operation = Operation(str(doc.get("op")))
    except ValueError as exc:
        raise EventError(f"unknown operation {doc.get('op')!r}", **where) from exc
    payload = doc.get("payload")
    if not isinstance(payload, Mapping) or not isinstance(payload.get("key"), Mapping):
        raise EventError("payload must be an object with a 'key' object", sequence=sequence, **where)
    hlc = _integer(doc, "hlc", where)
    prior = doc.get("prior")
    if prior is not None and (not isinstance(prior, int) or isinstance(prior, bool) or prior < 0):
        raise EventError("prior must be a packed HLC stamp or null", sequence=sequence, **where)
    if prior is not None and prior > MAX_INTEGER:
        raise EventError(f"prior {prior} is out of range (at most 2^63-1)", sequence=sequence, event_id=event_id,
                         **where)
    return Event(
        origin=origin,
        event_id=event_id,
        table=_text(doc, "aggregatetype", where),
        key=_text(doc, "aggregateid", where),
        operation=operation,
        hlc=Timestamp.unpack(hlc),
        payload=dict(payload),
        prior=Timestamp.unpack(prior) if prior is not None else None,
        sequence=sequence,
        event_type=str(doc.get("type") or ""),
    )


def _text(doc: Mapping[str, Any], name: str, where: Mapping[str, Any]) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise EventError(f"field {name!r} must be a non-empty string", **where)
    return value


def _integer(doc: Mapping[str, Any], name: str, where: Mapping[str, Any]) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EventError(f"field {name!r} must be a non-negative integer", **where)
    if value > MAX_INTEGER:
        # checked here, not left to the database: a value it cannot store would fail the
        # whole batch's transaction rather than this one message
        raise EventError(f"field {name!r} is out of range: {value} (at most 2^63-1)", event_id=_peek_id(doc), **where)
    return value


def _peek_id(doc: Mapping[str, Any]) -> str | None:
    value = doc.get("id")
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def peek(raw: bytes | None) -> dict[str, Any]:
    """What can be read of a message that did not decode, for its quarantine entry:
    the event id and sequence when they are well formed, else None."""
    try:
        doc = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, Mapping):
        return {"event_id": None, "sequence": None, "origin": None}
    sequence = doc.get("sequence")
    origin = doc.get("origin")
    return {
        "event_id": _peek_id(doc),
        "sequence": sequence if isinstance(sequence, int) and not isinstance(sequence, bool)
        and 1 <= sequence <= MAX_INTEGER else None,
        "origin": origin if isinstance(origin, str) and origin else None,
    }
