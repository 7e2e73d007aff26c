"""Writing replicated changes from a Python service: ``reconciler.outbox.write``.

Call it inside the service's own transaction. In that transaction it stamps the
change with the region's HLC, applies it to the business table through the
table's conflict policy (so local and remote writes produce rows the same way),
and inserts the outbox row the relay will publish. Either all of it commits with
the service's transaction or none of it does.

Services in other languages stamp with the SQL function ``reconciler.hlc_now()``
and insert into ``reconciler.outbox`` themselves (see README).
"""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import ConflictError, EventError
from .invariants import resolution_discards
from .model import Event, Operation, Version, encode_key
from .policies import policy_for
from .store.port import CONFLICT_COLUMNS, ApplyStore, RegionStore, json_text
from .store.postgres_store import as_region_store, as_store


class _Catalogue:
    """What a database says about itself, read once per connection (or store), and the
    statements prepared for it. Holds nothing that refers back to the connection, or
    the weak key below could never die."""

    def __init__(self, store: ApplyStore) -> None:
        self.region = store.region_id()
        self.tables = store.replicated_tables()
        self.prepared: dict[str, Any] = {}


_catalogues: weakref.WeakKeyDictionary[Any, _Catalogue] = weakref.WeakKeyDictionary()


def _catalogue(target: ApplyStore | Any) -> tuple[_Catalogue, ApplyStore]:
    """Keyed by what the caller holds (a service's connection, or a store), so a
    service calling write() on one connection many times reads the catalogue once."""
    store = as_store(target)
    found = _catalogues.get(target)
    if found is None:
        found = _catalogues[target] = _Catalogue(store)
    if store is not target:
        store = as_store(target, prepared=found.prepared)
    return found, store


def write(
    conn: ApplyStore | Any,
    table: str,
    operation: Operation | str,
    key: Mapping[str, Any],
    *,
    values: Mapping[str, Any] | None = None,
    deltas: Mapping[str, int | float] | None = None,
    set_add: Mapping[str, Iterable[Any]] | None = None,
    set_remove: Mapping[str, Iterable[Any]] | None = None,
    event_type: str | None = None,
) -> Event:
    """Record one change to a replicated row; returns the event as it will be relayed.

    ``values`` may be partial for an update: the columns not given keep their
    current values (the event carries the whole row, so every region ends with the
    same row whatever it held before).
    """
    op = Operation(operation)
    if op is Operation.RESOLVE:
        raise EventError("resolutions are written by `reconciler conflicts resolve`, not by services", table=table)
    catalogue, store = _catalogue(conn)
    region, tables = catalogue.region, catalogue.tables
    if table not in tables:
        raise EventError(f"table {table!r} is not replicated (run `reconciler migrate`)", region=region)
    config = tables[table]
    try:
        key_text = encode_key(key, config.key)
    except KeyError as exc:
        raise EventError(f"key is missing column {exc.args[0]!r}", table=table, region=region) from exc
    with store.transaction():
        store.lock_keys([(table, key_text)])
        current = store.load_states(table, [key_text]).get(key_text)
        live = current is not None and not current.deleted
        if op is Operation.INSERT and live:
            raise EventError("insert of a row that already exists", table=table, key=key_text, region=region)
        if op in (Operation.UPDATE, Operation.DELETE) and not live:
            raise EventError(f"{op.value} of a row that does not exist", table=table, key=key_text, region=region)
        payload: dict[str, Any] = {"key": dict(key)}
        row = dict(values or {})
        if op is Operation.UPDATE and config.policy != "merge" and current is not None:
            row = {**current.values, **row}
        if op is not Operation.DELETE:
            payload["values"] = {**row, **dict(key)}
        if deltas:
            payload["deltas"] = dict(deltas)
        if set_add:
            payload["set_add"] = {c: list(v) for c, v in set_add.items()}
        if set_remove:
            payload["set_remove"] = {c: list(v) for c, v in set_remove.items()}
        event = Event(
            origin=region,
            event_id=str(uuid.uuid4()),
            table=table,
            key=key_text,
            operation=op,
            hlc=store.hlc_now(),
            payload=_plain_json(payload),
            prior=current.hlc if current is not None else None,
            event_type=event_type or f"{table}.{op.value}",
        )
        outcome = policy_for(config.policy, config.fields).apply(current, event)
        # queued before the row is written: the invariant check in write_states lists
        # the key's events, this one included
        store.insert_outbox(event)
        if outcome.state is not None:
            store.write_states(config, {key_text: outcome.state})
    return event


def write_resolution(
    conn: RegionStore | Any,
    conflict_id: str,
    values: Mapping[str, Any] | None,
    by: str,
    reason: str,
    *,
    at: datetime | None = None,
) -> Event:
    """Record an operator's decision on a parked conflict: ``values`` is the row to
    keep (the key columns included), or None for "the row is deleted".

    The decision is a replicated write like any other (a RESOLVE event), so it takes
    the same path as :func:`write`: stamped, applied here through the table's policy
    and queued in the outbox in one transaction, and every peer applies the same
    event and closes its own copy of the queue entry. The entry is locked FOR UPDATE
    first, so of two operators resolving it at once the second waits for the first
    and is then refused instead of overwriting a decision it never saw.

    Validating what an operator typed is the caller's job
    (:func:`reconciler.conflict_queue.resolve_conflict`); this function only refuses
    what would corrupt the queue: an unknown entry, or one that is not open.
    """
    catalogue, some_store = _catalogue(conn)
    store, region = as_region_store(some_store), catalogue.region
    when = at or datetime.now(UTC)
    with store.transaction():
        found = store.conflict_row(conflict_id, lock=True)
        if found is None:
            raise ConflictError("no such conflict", conflict_id=conflict_id, region=region)
        row = dict(zip(CONFLICT_COLUMNS, found, strict=True))
        table, key_text, kind, status = row["table_name"], row["row_key"], row["kind"], row["status"]
        local, remote = row["local_version"], row["remote_version"]
        if status != "open":
            raise ConflictError(f"conflict is not open (status {status})", conflict_id=conflict_id, region=region)
        config = catalogue.tables.get(table)
        if config is None:
            raise ConflictError(f"table {table!r} is no longer replicated", conflict_id=conflict_id, region=region)
        key = _resolution_key(config.key, key_text, values, (local, remote))
        if encode_key(key, config.key) != key_text:
            raise ConflictError("the chosen row's key is not the conflict's key", conflict_id=conflict_id,
                                key=key_text, region=region)
        store.lock_keys([(table, key_text)])
        current = store.load_states(table, [key_text]).get(key_text)
        payload = {
            "key": key,
            "conflict_id": conflict_id,
            "kind": kind,
            "values": None if values is None else {**values, **key},
            "by": by,
            "reason": reason,
            "at": when.isoformat(),
        }
        event = Event(
            origin=region,
            event_id=str(uuid.uuid4()),
            table=table,
            key=key_text,
            operation=Operation.RESOLVE,
            hlc=store.hlc_now(),
            payload=_plain_json(payload),
            prior=current.hlc if current is not None else None,
            event_type=f"{table}.resolve",
        )
        outcome = policy_for(config.policy, config.fields).apply(current, event)
        store.insert_outbox(event)  # before the row: the invariant check lists this event too
        if outcome.state is not None:
            store.write_states(config, {key_text: outcome.state})
        store.record_resolutions([event])
        kept = Version(None if values is None else {**values, **key}, event.hlc, region, values is None)
        decision = {"policy": config.policy, "conflict_id": conflict_id, "conflict_kind": kind,
                    "resolved_by": by, "reason": reason}
        sides = [Version.from_dict(local), Version.from_dict(remote)]
        store.queue_discards(resolution_discards(table, key_text, sides, kept, decision))
    return event


def _resolution_key(
    columns: tuple[str, ...], key_text: str, values: Mapping[str, Any] | None, versions: Iterable[Any]
) -> dict[str, Any]:
    """The conflict's key with its columns' JSON types (a key of 7 must stay 7, not
    "7", or peers would see a payload whose key disagrees with its values): from the
    chosen row, else from a stored version, else decoded from the key text."""
    sources = [values] + [v.get("values") for v in versions if isinstance(v, Mapping)]
    for source in sources:
        if isinstance(source, Mapping) and all(c in source for c in columns):
            return {c: source[c] for c in columns}
    if len(columns) == 1:
        return {columns[0]: key_text}
    return dict(zip(columns, json.loads(key_text), strict=True))


def _plain_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so the local apply sees exactly what peers will see
    (Decimal, datetime and UUID values become their JSON text)."""
    return dict(json.loads(json_text(payload)))


#: what services call; ``write_resolution`` is the conflict queue's (``reconciler conflicts resolve``)
__all__ = ["write"]
