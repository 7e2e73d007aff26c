"""The workload's history: one JSON line per ACKNOWLEDGED write (and per in-doubt attempt).

A write enters the history as acknowledged only after its transaction committed
and the client saw the commit succeed; that is the promise the checker holds the
system to (an acknowledged write must reach every region). A write whose commit
outcome the client never learned (the connection died during COMMIT) is recorded
too, marked ``acknowledged: false``: :func:`load_history` leaves it out, and the
checker counts it as a write only if some region holds its event id.

What a record says is what the client asked for (``values``: the whole row of an
insert, only the changed columns of an update), not the row the implementation
built from it, so that the checker's models start from the client's side. The
HLC stamp and ``prior`` are what the write was acknowledged with.

Pure apart from :class:`HistoryWriter` (an append-only file) and
:func:`load_history`, which read and write nothing but the given path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol


class _Stamp(Protocol):
    def pack(self) -> int: ...


class _Operation(Protocol):
    @property
    def value(self) -> str: ...


class AcknowledgedEvent(Protocol):
    """What a write returned to its client (``reconciler.model.Event`` has this shape;
    the history does not import the implementation)."""

    @property
    def event_id(self) -> str: ...
    @property
    def origin(self) -> str: ...
    @property
    def table(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def operation(self) -> _Operation: ...
    @property
    def hlc(self) -> _Stamp: ...
    @property
    def prior(self) -> _Stamp | None: ...
    @property
    def payload(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class WriteRecord:
    """One acknowledged write, as the client saw it acknowledged."""

    event_id: str
    region: str
    table: str
    key: str
    op: str
    #: packed HLC stamp (wall_ms << 16 | logical): totally ordered with ``region``
    hlc: int
    prior: int | None
    values: Mapping[str, Any] | None
    deltas: Mapping[str, float] = field(default_factory=dict)
    set_add: Mapping[str, list[Any]] = field(default_factory=dict)
    set_remove: Mapping[str, list[Any]] = field(default_factory=dict)
    #: wall time (seconds since the epoch) of the acknowledgement
    at: float = 0.0
    writer: str = ""
    #: False: the client never learned whether the commit succeeded
    acknowledged: bool = True
    #: the key columns and their values, as the client named the row
    key_values: Mapping[str, Any] | None = None

    @property
    def stamp(self) -> tuple[int, str]:
        return (self.hlc, self.region)

    @classmethod
    def of_event(
        cls, event: AcknowledgedEvent, at: float, writer: str = "", *,
        key: Mapping[str, Any] | None = None, requested: Mapping[str, Any] | None = None,
        acknowledged: bool = True,
    ) -> WriteRecord:
        """The record of a write the client made. With ``key``/``requested`` (the key
        and the values the client passed), ``values`` is what the client asked for
        plus its key; without them, the event's payload stands in (older callers)."""
        payload = event.payload
        values = payload.get("values")
        if key is not None and event.operation.value != "delete":
            values = {**dict(requested or {}), **dict(key)}
        return cls(
            event_id=event.event_id,
            region=event.origin,
            table=event.table,
            key=event.key,
            op=event.operation.value,
            hlc=event.hlc.pack(),
            prior=event.prior.pack() if event.prior is not None else None,
            values=dict(values) if isinstance(values, Mapping) else None,
            deltas=dict(payload.get("deltas") or {}),
            set_add={c: list(v) for c, v in (payload.get("set_add") or {}).items()},
            set_remove={c: list(v) for c, v in (payload.get("set_remove") or {}).items()},
            at=at,
            writer=writer,
            acknowledged=acknowledged,
            key_values=dict(key) if key is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "region": self.region,
            "table": self.table,
            "key": self.key,
            "op": self.op,
            "hlc": self.hlc,
            "prior": self.prior,
            "values": dict(self.values) if self.values is not None else None,
            "deltas": dict(self.deltas),
            "set_add": {c: list(v) for c, v in self.set_add.items()},
            "set_remove": {c: list(v) for c, v in self.set_remove.items()},
            "at": self.at,
            "writer": self.writer,
            "acknowledged": self.acknowledged,
            "key_values": dict(self.key_values) if self.key_values is not None else None,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> WriteRecord:
        return cls(
            event_id=str(doc["event_id"]),
            region=str(doc["region"]),
            table=str(doc["table"]),
            key=str(doc["key"]),
            op=str(doc["op"]),
            hlc=int(doc["hlc"]),
            prior=None if doc.get("prior") is None else int(doc["prior"]),
            values=doc.get("values"),
            deltas=dict(doc.get("deltas") or {}),
            set_add=dict(doc.get("set_add") or {}),
            set_remove=dict(doc.get("set_remove") or {}),
            at=float(doc.get("at") or 0.0),
            writer=str(doc.get("writer") or ""),
            acknowledged=bool(doc.get("acknowledged", True)),
            key_values=doc.get("key_values"),
        )


def record_line(record: WriteRecord) -> str:
    """A record as one history line (without its newline)."""
    return json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True, default=str)


class HistoryWriter:
    """JSONL, one line per acknowledged write, flushed per line so that a drill that
    dies still leaves every acknowledgement it made on disk. Starts a new file.

    The file is opened for appending, so that other processes (the drill's writer
    processes, see :mod:`reconciler.drills.workload`) may append whole lines to it
    too, each with one write: lines never interleave, whoever wrote them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        path.open("w", encoding="utf-8").close()
        self._fh: IO[str] | None = path.open("a", encoding="utf-8")
        self.records: list[WriteRecord] = []

    def append(self, record: WriteRecord) -> None:
        line = record_line(record)
        with self._lock:
            if self._fh is None:
                raise RuntimeError(f"history {self.path} is closed")
            self._fh.write(line + "\n")
            self._fh.flush()
            self.records.append(record)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def load_history(path: Path) -> list[WriteRecord]:
    """The acknowledged writes of a history file; a torn last line (a killed drill)
    is ignored."""
    return [r for r in _load(path) if r.acknowledged]


def load_attempts(path: Path) -> list[WriteRecord]:
    """The in-doubt attempts of a history file (commit outcome never learned)."""
    return [r for r in _load(path) if not r.acknowledged]


def _load(path: Path) -> list[WriteRecord]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(WriteRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return records
