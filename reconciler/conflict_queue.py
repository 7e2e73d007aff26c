"""The manual conflict queue as operators work it: list, show, resolve; and the
quarantine list next to it.

Each region keeps its own copy of ``reconciler.conflicts``. Conflict ids are
derived from the two competing versions, so every region that parked the same
conflict names it the same way, and an operator can resolve it once, from any
region: the resolution is a replicated RESOLVE event (see
:func:`reconciler.outbox.write_resolution`) that every region applies through the
table's policy and uses to close its own copy of the entry.

This module checks what the operator asked for (which version, which value) and
turns every refusal into a :class:`~reconciler.errors.ConflictError` whose message
says what to do next; the CLI prints it and exits 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from . import outbox, wire
from .apply import Applier, ApplyReport, event_key
from .errors import ConflictError, EventError
from .hlc import Timestamp
from .model import Event, Version, encode_key
from .store.port import ApplyStore, RegionStore
from .store.postgres_store import as_region_store, as_store

__all__ = [
    "STATUSES",
    "ConflictEntry",
    "QuarantineEntry",
    "Resolution",
    "list_conflicts",
    "list_quarantine",
    "resolve_conflict",
    "show_conflict",
]

#: what ``list --status`` accepts; "all" (or None) does not filter
STATUSES: Final = ("open", "resolved", "auto", "all")

def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Resolution:
    """Who decided a conflict, when, why, and what they chose (None: the row is deleted)."""

    by: str | None
    at: datetime | None
    reason: str | None
    values: Mapping[str, Any] | None
    event_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "at": self.at.isoformat() if self.at else None,
            "reason": self.reason,
            "values": dict(self.values) if self.values is not None else None,
            "event_id": self.event_id,
        }


@dataclass(frozen=True, slots=True)
class ConflictEntry:
    """One row of a region's conflict table, as an operator needs to see it.

    ``local`` is the version this region held when the conflicting event arrived,
    ``remote`` the event's version; in another region the two may be swapped.
    """

    conflict_id: str
    table: str
    key: str
    kind: str
    policy: str
    outcome: str
    status: str
    local: Version
    remote: Version
    event_id: str | None
    detected_at: datetime
    resolution: Resolution | None

    def versions(self) -> tuple[Version, ...]:
        """The sides that exist (an update for a never-seen row has no local side)."""
        return tuple(v for v in (self.local, self.remote) if v.origin)

    def age_seconds(self, now: datetime) -> float:
        return max(0.0, (now - self.detected_at).total_seconds())

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "conflict_id": self.conflict_id,
            "table": self.table,
            "key": self.key,
            "kind": self.kind,
            "policy": self.policy,
            "outcome": self.outcome,
            "status": self.status,
            "local": self.local.to_dict(),
            "remote": self.remote.to_dict(),
            "event_id": self.event_id,
            "detected_at": self.detected_at.isoformat(),
            "age_seconds": round(self.age_seconds(now or _utcnow()), 3),
            "resolution": self.resolution.to_dict() if self.resolution else None,
        }


def _entry(row: Sequence[Any]) -> ConflictEntry:
    (cid, table, key, kind, policy, outcome, status, local, remote, event_id, detected_at, resolved_by,
     resolved_at, reason, resolution, resolution_event) = row
    decided = None
    if status == "resolved":
        decided = Resolution(
            by=resolved_by,
            at=resolved_at,
            reason=reason,
            values=dict(resolution) if isinstance(resolution, Mapping) else None,
            event_id=str(resolution_event) if resolution_event else None,
        )
    return ConflictEntry(
        conflict_id=cid,
        table=table,
        key=key,
        kind=kind,
        policy=policy,
        outcome=outcome,
        status=status,
        local=Version.from_dict(local),
        remote=Version.from_dict(remote),
        event_id=str(event_id) if event_id else None,
        detected_at=detected_at,
        resolution=decided,
    )


def list_conflicts(conn: RegionStore | Any, table: str | None = None, status: str | None = None
                   ) -> list[ConflictEntry]:
    """Conflicts recorded in this region, oldest first.

    ``status``: ``open`` (the manual queue), ``resolved``, ``auto`` (decided by an
    lww/merge policy, kept as audit trail), or ``all``/None.
    """
    if status is not None and status not in STATUSES:
        raise ConflictError(f"unknown conflict status {status!r}; expected one of {', '.join(STATUSES)}")
    store = as_region_store(conn)
    # transaction(): a read must not leave the session idle in an open transaction
    with store.transaction():
        rows = store.conflict_rows(table, status)
    return [_entry(r) for r in rows]


def show_conflict(conn: RegionStore | Any, conflict_id: str) -> ConflictEntry:
    """One conflict of this region; refused with a hint when it is not here."""
    store = as_region_store(conn)
    with store.transaction():
        row = store.conflict_row(conflict_id)
        if row is None:
            raise _missing(store, conflict_id)
    return _entry(row)


def _missing(store: RegionStore, conflict_id: str) -> ConflictError:
    region = store.region_id()
    return ConflictError(
        f"no conflict {conflict_id} in region {region}; `reconciler conflicts list --status all` shows the ids"
        " this region knows (a conflict not yet replicated here may be listed in another region)",
        conflict_id=conflict_id,
        region=region,
    )


def resolve_conflict(
    conn: RegionStore | Any,
    conflict_id: str,
    *,
    take_region: str | None = None,
    value: str | Mapping[str, Any] | None = None,
    by: str,
    reason: str,
    now: Callable[[], datetime] = _utcnow,
) -> Event:
    """Decide a parked conflict; returns the RESOLVE event that carries the decision.

    Exactly one of:

    - ``take_region``: keep the version written in that region (one of the two
      stored versions must come from it);
    - ``value``: the row to keep, as JSON text or a mapping: an object with every
      column of the table, key columns equal to the conflict's key (so a pasted id
      cannot silently overwrite another row), or JSON ``null`` for "the row is
      deleted".

    ``by`` and ``reason`` are the audit trail and must not be empty. Everything
    happens in one transaction in this region; the relay ships the decision to the
    others. Refusals raise :class:`ConflictError` and change nothing.
    """
    if (take_region is None) == (value is None):
        raise ConflictError("give exactly one of --take REGION or --value JSON", conflict_id=conflict_id)
    if not by.strip():
        raise ConflictError("--by must name who decides (audit trail)", conflict_id=conflict_id)
    if not reason.strip():
        raise ConflictError("--reason must say why (audit trail)", conflict_id=conflict_id)
    store = as_region_store(conn)
    with store.transaction():
        # lock: a second resolver of this entry waits here until the first commits,
        # then reads the entry as resolved and is refused below
        row = store.conflict_row(conflict_id, lock=True)
        if row is None:
            raise _missing(store, conflict_id)
        entry = _entry(row)
        _check_open(entry)
        if take_region is not None:
            values = _take(entry, take_region)
        else:
            values = _given_value(store, entry, value)
        return outbox.write_resolution(conn, conflict_id, values, by.strip(), reason.strip(), at=now())


def _check_open(entry: ConflictEntry) -> None:
    if entry.status == "resolved" and entry.resolution is not None:
        res = entry.resolution
        at = res.at.isoformat(timespec="seconds") if res.at else "an unknown time"
        raise ConflictError(
            f"conflict {entry.conflict_id} is already resolved by {res.by} at {at}: {res.reason}",
            conflict_id=entry.conflict_id,
        )
    if entry.status != "open":
        raise ConflictError(
            f"conflict {entry.conflict_id} is not in the manual queue: table {entry.table} uses policy"
            f" {entry.policy}, which already decided it ({entry.outcome}); nothing to resolve",
            conflict_id=entry.conflict_id,
        )


def _take(entry: ConflictEntry, region: str) -> dict[str, Any] | None:
    sides = [v for v in entry.versions() if v.origin == region]
    if not sides:
        origins = " and ".join(sorted({v.origin for v in entry.versions()})) or "nowhere"
        raise ConflictError(
            f"neither version of conflict {entry.conflict_id} was written in {region}: they come from {origins};"
            " use --take with one of those, or --value",
            conflict_id=entry.conflict_id,
        )
    # both sides from one region cannot be concurrent writes; if it ever happens,
    # the later of them is that region's last word
    chosen = max(sides, key=lambda v: v.hlc)
    return None if chosen.deleted or chosen.values is None else dict(chosen.values)


def _given_value(
    store: RegionStore, entry: ConflictEntry, value: str | Mapping[str, Any] | None
) -> dict[str, Any] | None:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConflictError(f"--value is not valid JSON: {exc}", conflict_id=entry.conflict_id) from None
    else:
        parsed = value
    if parsed is None:
        return None
    if not isinstance(parsed, Mapping):
        raise ConflictError(
            "--value must be a JSON object (the full row) or null (delete the row)", conflict_id=entry.conflict_id
        )
    tables = store.replicated_tables()
    config = tables.get(entry.table)
    if config is None:
        raise ConflictError(f"table {entry.table} is no longer replicated", conflict_id=entry.conflict_id)
    missing_key = [c for c in config.key if c not in parsed]
    if missing_key:
        raise ConflictError(
            f"--value must contain the key column(s) {', '.join(missing_key)} (this conflict is about"
            f" {_key_text(config.key, entry.key)})",
            conflict_id=entry.conflict_id,
        )
    if encode_key(parsed, config.key) != entry.key:
        raise ConflictError(
            f"--value is for key {encode_key(parsed, config.key)!r}, but this conflict is about key {entry.key!r}",
            conflict_id=entry.conflict_id,
        )
    # the chosen value replaces the whole row in every region, so a partial row
    # would null the columns it leaves out: ask for them rather than guess
    columns = store.table_columns(config)
    unknown = sorted(c for c in parsed if c not in columns)
    if unknown:
        raise ConflictError(
            f"--value names column(s) {', '.join(unknown)} that table {entry.table} does not have",
            conflict_id=entry.conflict_id,
        )
    absent = [c for c in columns if c not in parsed]
    if absent:
        raise ConflictError(
            f"--value must give the full row; missing column(s) {', '.join(absent)}"
            " (use null for an empty column)",
            conflict_id=entry.conflict_id,
        )
    return dict(parsed)


def _key_text(columns: tuple[str, ...], key: str) -> str:
    return f"{columns[0]}={key}" if len(columns) == 1 else f"({', '.join(columns)})={key}"


# ---------------------------------------------------------------- quarantine

#: characters of a quarantined message shown; the table keeps all of it
RAW_PREVIEW: Final = 200


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """An event this region set aside instead of applying, with why and where from.

    ``status``: ``refused`` (open and missing: gaps, the gate and the metrics count
    it), ``superseded`` (open, but this region applied its (origin, sequence)
    anyway), ``unidentified`` (open, bytes naming no event: no sequence, no event
    id), ``applied`` or ``discarded`` (settled).
    """

    id: int
    origin: str | None
    sequence: int | None
    topic: str | None
    partition: int | None
    offset: int | None
    reason: str
    detail: str
    raw: bytes | None
    received_at: datetime
    retried_at: datetime | None
    event_id: str | None = None
    hlc: int | None = None
    settled_at: datetime | None = None
    settled_by: str | None = None
    settlement: str | None = None
    settle_reason: str | None = None
    refused: bool = False

    @property
    def status(self) -> str:
        if self.settlement:
            return self.settlement
        if self.refused:
            return "refused"
        return "unidentified" if self.sequence is None and self.event_id is None else "superseded"

    def raw_preview(self) -> str | None:
        if self.raw is None:
            return None
        text = self.raw.decode("utf-8", errors="replace")
        return text if len(text) <= RAW_PREVIEW else text[:RAW_PREVIEW] + "…"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "origin": self.origin,
            "sequence": self.sequence,
            "event_id": self.event_id,
            "hlc": str(Timestamp.unpack(self.hlc)) if self.hlc is not None else None,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "reason": self.reason,
            "detail": self.detail,
            "raw_bytes": len(self.raw) if self.raw is not None else None,
            "raw_preview": self.raw_preview(),
            "received_at": self.received_at.isoformat(),
            "retried_at": self.retried_at.isoformat() if self.retried_at else None,
            "settled": None if self.settled_at is None else {
                "at": self.settled_at.isoformat(), "by": self.settled_by, "how": self.settlement,
                "reason": self.settle_reason,
            },
        }


#: what ``quarantine list --status`` accepts
QUARANTINE_STATUSES: Final = ("open", "refused", "settled", "all")


def _quarantine_entry(r: Sequence[Any]) -> QuarantineEntry:
    return QuarantineEntry(
        id=r[0], origin=r[1], sequence=r[2], topic=r[3], partition=r[4], offset=r[5], reason=r[6],
        detail=r[7], raw=bytes(r[8]) if r[8] is not None else None, received_at=r[9], retried_at=r[10],
        event_id=r[11], hlc=r[12], settled_at=r[13], settled_by=r[14], settlement=r[15], settle_reason=r[16],
        refused=bool(r[17]),
    )


def list_quarantine(conn: RegionStore | Any, limit: int = 100, status: str = "all") -> list[QuarantineEntry]:
    """The most recent ``limit`` quarantined events of this region, newest first."""
    if status not in QUARANTINE_STATUSES:
        raise ConflictError(f"unknown quarantine status {status!r}; expected one of {', '.join(QUARANTINE_STATUSES)}")
    store = as_region_store(conn)
    with store.transaction():
        rows = store.quarantine_entries(limit=limit, status=status)
    return [_quarantine_entry(r) for r in rows]


def show_quarantined(conn: RegionStore | Any, entry_id: int) -> tuple[QuarantineEntry, list[dict[str, Any]]]:
    """One entry and its audit trail (every retry and discard, who, when, why)."""
    store = as_region_store(conn)
    with store.transaction():
        rows = store.quarantine_entries(ids=[entry_id], limit=1)
        if not rows:
            raise ConflictError(
                f"no quarantine entry {entry_id} in region {store.region_id()}; `reconciler quarantine list`"
                " shows the ids", quarantine_id=entry_id)
        trail = store.quarantine_audit(entry_id)
    return _quarantine_entry(rows[0]), [
        {"at": at.isoformat(), "action": action, "outcome": outcome, "actor": actor, "reason": reason}
        for at, action, outcome, actor, reason in trail
    ]


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    id: int
    outcome: str  # applied | still_refused
    reason: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "outcome": self.outcome, "reason": self.reason, "detail": self.detail}


def _settle_check(conn: RegionStore | Any, entry_id: int, verb: str) -> QuarantineEntry:
    entry, _trail = show_quarantined(conn, entry_id)
    if entry.settlement:
        raise ConflictError(
            f"quarantine entry {entry_id} is already settled ({entry.settlement} by {entry.settled_by}):"
            f" nothing to {verb}", quarantine_id=entry_id)
    return entry


def retry_quarantined(conn: RegionStore | Any, applier: Applier, entry_id: int, *, by: str) -> RetryOutcome:
    """Apply a quarantined event again through the normal apply path (after its cause
    was fixed: a column type, a policy, a clock). Success settles the entry as
    applied; a new refusal keeps it open with the new reason. Audited as ``by``."""
    if not by.strip():
        raise ConflictError("--by must name who retries (audit trail)", quarantine_id=entry_id)
    entry = _settle_check(conn, entry_id, "retry")
    if entry.reason == "origin_mismatch":
        raise ConflictError(
            f"quarantine entry {entry_id} arrived on a topic its claimed origin does not own; it is never applied"
            " (discard it with a reason)", quarantine_id=entry_id)
    try:
        event = wire.decode(entry.raw, topic=entry.topic or "")
    except EventError as exc:
        raise ConflictError(
            f"quarantine entry {entry_id} cannot be applied: {exc.message}; if its origin still holds the event,"
            " `reconciler recover` replays it, otherwise discard the entry with a reason",
            quarantine_id=entry_id) from None
    report = applier.apply_remote([event], retry={event_key(event): entry_id}, actor=by.strip(), action="retry")
    if entry_id in report.settled:
        return RetryOutcome(entry_id, "applied")
    if report.refused:  # another open entry holds the same event
        raise ConflictError(f"the event of entry {entry_id} is held by another open entry; retry that one",
                            quarantine_id=entry_id)
    again = report.quarantined[0] if report.quarantined else {}
    return RetryOutcome(entry_id, "still_refused", again.get("reason"), again.get("detail"))


def discard_quarantined(conn: RegionStore | Any, entry_id: int, *, by: str, reason: str) -> QuarantineEntry:
    """Settle an entry without applying it: gaps and the gate stop counting it. The
    entry, its raw message and the audit trail are kept."""
    if not by.strip():
        raise ConflictError("--by must name who discards (audit trail)", quarantine_id=entry_id)
    if not reason.strip():
        raise ConflictError("--reason must say why the event is given up (audit trail)", quarantine_id=entry_id)
    store = as_region_store(conn)
    with store.transaction():
        _settle_check(store, entry_id, "discard")
        store.settle_quarantine([entry_id], "discarded", by.strip(), reason.strip(), "discard")
    entry, _trail = show_quarantined(store, entry_id)
    return entry


def retry_held(conn: ApplyStore | Any, applier: Applier, limit: int) -> ApplyReport:
    """Apply the held events (future stamps) whose stamp is no longer too far ahead
    of the database's clock; each one applied settles its entry."""
    store = as_store(conn)
    with store.transaction():
        due = store.held_due(limit)
    report = ApplyReport()
    if not due:
        return report
    events, retry = [], {}
    for entry_id, raw in due:
        try:
            event = wire.decode(raw)
        except EventError:
            continue
        events.append(event)
        retry[event_key(event)] = entry_id
    report.merge(applier.apply_remote(events, retry=retry, actor="inbox", action="auto_retry"))
    return report
