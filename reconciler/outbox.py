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
from typing import Any

from .config import TableConfig
from .conflict import policy_for
from .errors import EventError
from .model import Event, Operation, encode_key
from .store import postgres as pg
from .store.translate import translated

class _Catalogue:
    """What a connection's database says about itself, read once per connection."""

    def __init__(self, conn: pg.Connection) -> None:
        self.region = pg.region_id(conn)
        self.tables = pg.replicated_tables(conn)
        self.writers: dict[str, pg.TableWriter] = {}

    def writer(self, conn: pg.Connection, table: str) -> pg.TableWriter:
        if table not in self.writers:
            self.writers[table] = pg.TableWriter.build(conn, self.tables[table])
        return self.writers[table]


_catalogues: weakref.WeakKeyDictionary[Any, _Catalogue] = weakref.WeakKeyDictionary()


def _catalogue(conn: pg.Connection) -> _Catalogue:
    found = _catalogues.get(conn)
    if found is None:
        found = _catalogues[conn] = _Catalogue(conn)
    return found


def write(
    conn: pg.Connection,
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
    catalogue = _catalogue(conn)
    region, tables = catalogue.region, catalogue.tables
    if table not in tables:
        raise EventError(f"table {table!r} is not replicated (run `reconciler migrate`)", region=region)
    config = tables[table]
    try:
        key_text = encode_key(key, config.key)
    except KeyError as exc:
        raise EventError(f"key is missing column {exc.args[0]!r}", table=table, region=region) from exc
    with translated(region=region, table=table, key=key_text), conn.transaction():
        pg.lock_keys(conn, [(table, key_text)])
        current = pg.load_states(conn, table, [key_text]).get(key_text)
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
            hlc=pg.hlc_now(conn),
            payload=_plain_json(payload),
            prior=current.hlc if current is not None else None,
            event_type=event_type or f"{table}.{op.value}",
        )
        outcome = policy_for(config.policy, config.fields).apply(current, event)
        if outcome.state is not None:
            pg.write_states(conn, catalogue.writer(conn, table), {key_text: outcome.state})
        pg.insert_outbox(conn, event)
    return event


def _plain_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so the local apply sees exactly what peers will see
    (Decimal, datetime and UUID values become their JSON text)."""
    return dict(json.loads(pg.json_text(payload)))
