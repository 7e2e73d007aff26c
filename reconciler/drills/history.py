"""The workload's history: one JSON line per ACKNOWLEDGED write.

A write enters the history only after its transaction committed and the client
saw the commit succeed; that is the promise the checker holds the system to (an
acknowledged write must reach every region). Writes that failed, or whose commit
outcome the client never learned, are not in it: the checker finds the latter in
the outboxes and calls them in-doubt.

Pure apart from :class:`HistoryWriter` (an append-only file) and
:func:`load_history`, which read and write nothing but the given path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..model import Event


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

    @property
    def stamp(self) -> tuple[int, str]:
        return (self.hlc, self.region)

    @classmethod
    def of_event(cls, event: Event, at: float, writer: str = "") -> WriteRecord:
        payload = event.payload
        values = payload.get("values")
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
        )


class HistoryWriter:
    """JSONL, one line per acknowledged write, flushed per line so that a drill that
    dies still leaves every acknowledgement it made on disk. Starts a new file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh: IO[str] | None = path.open("w", encoding="utf-8")
        self.records: list[WriteRecord] = []

    def append(self, record: WriteRecord) -> None:
        line = json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True, default=str)
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
    """Every record of a history file; a torn last line (a killed drill) is ignored."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(WriteRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return records


def dump_history(records: Iterable[WriteRecord], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True, default=str) + "\n")
