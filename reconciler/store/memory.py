"""The region store port in memory, for unit tests of the pure parts of the pipeline.

Implements what apply, the relay, the lifecycle checks, gap analysis and replay
ask of a region (:class:`~reconciler.store.port.PipelineStore`) with plain
dictionaries, and is held to PostgreSQL's behaviour by the contract
suite (tests/contract/test_region_store.py). It has no Merkle leaves, capture
triggers or invariant checks: what needs those is tested against PostgreSQL.

One store is one session on one region. Transactions are real (a failure inside
``transaction()`` leaves nothing behind, nested ones are savepoints); per-key
locks are not needed in one thread and are only checked for their order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .. import wire
from ..config import TableConfig
from ..errors import FencedError, LifecycleError, StoreError
from ..hlc import HybridLogicalClock, Timestamp, wall_ms
from ..invariants import Discard, discard_event
from ..lifecycle import RegionStatus, State, check_transition
from ..model import ConflictRecord, Event, Operation, RowState
from .port import (
    ApplyChecks,
    DatabaseMark,
    HeldEntry,
    Message,
    ParkedEvents,
    PipelineStore,
    StateRow,
    json_text,
    once_per_event,
)

__all__ = ["MemoryRegionStore"]

_MAX_BIGINT = 2**63 - 1


def _bigint(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_BIGINT else None


@dataclass
class _RelayState:
    epoch: int = 0
    holder: str | None = None
    last_sequence: int = 0
    published_through: int = 0
    pruned_through: int = 0


@dataclass
class _State:
    """Everything a transaction may change (copied for rollback)."""

    clock: Timestamp = field(default_factory=lambda: Timestamp(0, 0))
    #: table -> key -> business row
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: (table, key) -> the row_meta row, encoded as PostgreSQL returns it
    meta: dict[tuple[str, str], StateRow] = field(default_factory=dict)
    inbox: dict[tuple[str, int], Event] = field(default_factory=dict)
    inbox_floor: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    quarantine: dict[int, dict[str, Any]] = field(default_factory=dict)
    quarantine_log: list[dict[str, Any]] = field(default_factory=list)
    #: position -> the outbox row's event
    outbox: dict[int, Event] = field(default_factory=dict)
    pending: list[int] = field(default_factory=list)
    #: (origin, relay sequence) -> position
    numbered: dict[tuple[str, int], int] = field(default_factory=dict)
    relay: dict[str, _RelayState] = field(default_factory=dict)
    #: compensation event id -> its document, in the order queued
    compensations: dict[str, dict[str, Any]] = field(default_factory=dict)
    compensations_published: set[str] = field(default_factory=set)
    lifecycle: RegionStatus | None = None
    #: grows with every change, as a WAL position does
    lsn: int = 0


class MemoryRegionStore(PipelineStore):
    """One region's database in memory (see the module doc for what it leaves out)."""

    def __init__(
        self, region: str, tables: Mapping[str, TableConfig], *, max_offset_ms: int = 1000,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.region = region
        self.tables = dict(tables)
        self.max_offset_ms = max_offset_ms
        self.now_ms = now_ms or wall_ms
        self._state = _State()
        self._savepoints: list[_State] = []
        self._next_position = 1
        self._next_quarantine_id = 1
        #: the key locks taken in the open transaction, in the order taken
        self.locked: list[tuple[str, str]] = []

    # ------------------------------------------------------------ reading what tests look at

    def rows(self, table: str) -> dict[str, dict[str, Any]]:
        """The business table as it stands: key -> row."""
        return copy.deepcopy(self._state.rows.get(table, {}))

    def conflict(self, conflict_id: str) -> dict[str, Any] | None:
        found = self._state.conflicts.get(conflict_id)
        return dict(found) if found is not None else None

    def quarantined(self) -> list[dict[str, Any]]:
        return [dict(q) for q in self._state.quarantine.values()]

    # ------------------------------------------------------------ transactions and catalogue

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._savepoints.append(copy.deepcopy(self._state))
        try:
            yield
        except BaseException:
            self._state = self._savepoints.pop()
            if not self._savepoints:
                self.locked = []
            raise
        self._savepoints.pop()
        if not self._savepoints:
            self.locked = []

    def _changed(self) -> None:
        self._state.lsn += 1

    def region_id(self) -> str:
        return self.region

    def replicated_tables(self) -> dict[str, TableConfig]:
        return dict(self.tables)

    # ------------------------------------------------------------ rows

    def lock_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.locked.extend(sorted(set(pairs)))

    def load_state_rows(self, table: str, keys: Sequence[str]) -> list[StateRow]:
        return [self._state.meta[(table, k)] for k in dict.fromkeys(keys) if (table, k) in self._state.meta]

    def write_states(self, table: TableConfig, states: Mapping[str, RowState]) -> None:
        if not states:
            return
        if table.name not in self.tables:
            raise StoreError("replicated table does not exist", table=table.name)
        # encoded and decoded once, as the JSON document sent to PostgreSQL is
        doc = json.loads(json_text({k: (s.meta, s.values) for k, s in states.items()}))
        rows = self._state.rows.setdefault(table.name, {})
        for key, state in states.items():
            meta, values = doc[key]
            self._state.meta[(table.name, key)] = (key, state.hlc.pack(), state.origin, state.deleted,
                                                   json_text(meta), json_text(values))
            if state.deleted:
                rows.pop(key, None)
            else:
                rows[key] = values
        self._changed()

    def _clock(self) -> HybridLogicalClock:
        return HybridLogicalClock(self.now_ms, self.max_offset_ms, start=self._state.clock)

    def hlc_now(self) -> Timestamp:
        clock = self._clock()
        stamp = clock.now()
        self._state.clock = clock.last
        return stamp

    def observe_hlc(self, stamp: Timestamp) -> Timestamp:
        clock = self._clock()
        seen = clock.update(stamp)  # ClockSkewError, as SQL hlc_observe's RC001 becomes
        self._state.clock = clock.last
        return seen

    # ------------------------------------------------------------ inbox

    def insert_inbox(self, events: Sequence[Event]) -> set[tuple[str, int]]:
        held_before = {e.event_id.lower() for e in self._state.inbox.values()}
        added: dict[tuple[str, int], tuple[str, bool]] = {}
        for event in events:
            pair = (event.origin, event.sequence or 0)
            if pair[1] <= self._state.inbox_floor.get(event.origin, 0) or pair in self._state.inbox:
                continue
            self._state.inbox[pair] = event
            added[pair] = (event.event_id, event.event_id.lower() in held_before)
        if added:
            self._changed()
        return once_per_event(events, added)

    def forget_inbox(self, pairs: Sequence[tuple[str, int]]) -> None:
        for pair in pairs:
            self._state.inbox.pop(pair, None)
        self._changed()

    # ------------------------------------------------------------ conflicts

    def record_conflicts(self, records: Sequence[ConflictRecord]) -> None:
        for r in records:
            if r.outcome.value == "resolved" or r.conflict_id in self._state.conflicts:
                continue
            self._state.conflicts[r.conflict_id] = {
                "conflict_id": r.conflict_id, "table_name": r.table, "row_key": r.key, "kind": r.kind.value,
                "policy": r.policy, "outcome": r.outcome.value,
                "status": "open" if r.outcome.value == "parked" else "auto",
                "local_version": r.local.to_dict(), "remote_version": r.remote.to_dict(),
                "event_id": r.event_id or None, "resolved_by": None, "resolution_event": None,
            }
        self._changed()

    def _stamp_of(self, event_id: str | None) -> tuple[Timestamp, str] | None:
        for event in [*self._state.outbox.values(), *self._state.inbox.values()]:
            if event.event_id == event_id:
                return event.hlc, event.origin
        return None

    def record_resolutions(self, events: Sequence[Event]) -> None:
        for e in events:
            if e.operation is not Operation.RESOLVE:
                continue
            p = e.payload
            entry = self._state.conflicts.get(str(p.get("conflict_id")))
            if entry is None:
                continue
            decided = self._stamp_of(entry["resolution_event"])
            # the later-stamped of two decisions wins everywhere, as the policy's row does
            if entry["status"] != "resolved" or (decided is not None and decided < (e.hlc, e.origin)):
                entry.update(status="resolved", outcome="resolved", resolved_by=p.get("by"),
                             resolution_reason=p.get("reason"), resolution=p.get("values"),
                             resolution_event=e.event_id)
        self._changed()

    def open_parked_events(self, table: str, keys: Sequence[str]) -> ParkedEvents:
        wanted = set(keys)
        by_id = {e.event_id: e for e in self._state.inbox.values()}
        out: ParkedEvents = {}
        for cid, c in self._state.conflicts.items():
            if (c["status"], c["outcome"], c["table_name"]) != ("open", "parked", table) or c["row_key"] not in wanted:
                continue
            event = by_id.get(c["event_id"])
            if event is not None and (event.table, event.key) == (table, c["row_key"]):
                out.setdefault(event.key, []).append((cid, event))
        return out

    def close_parked(self, closed: Sequence[tuple[str, str]]) -> None:
        for cid, outcome in closed:
            entry = self._state.conflicts.get(cid)
            if entry is not None and entry["status"] == "open":
                entry.update(status="auto", outcome=outcome, resolved_by="reconciler")
        self._changed()

    def queue_discards(self, discards: Sequence[Discard]) -> int:
        held = [*self._state.inbox.values(), *self._state.outbox.values()]
        queued = 0
        for discard in discards:
            if discard.discard_id in self._state.compensations:
                continue
            if discard.lost_event_id is None:
                found = [e.event_id for e in held if (e.table, e.key, e.origin, e.hlc) ==
                         (discard.table, discard.key, discard.lost.origin, discard.lost.hlc)]
                discard = replace(discard, lost_event_id=found[0] if found else None)
            at = datetime.fromtimestamp(self.now_ms() / 1000, UTC).isoformat()
            self._state.compensations[discard.discard_id] = discard_event(discard, self.region, at)
            queued += 1
        self._changed()
        return queued

    def compensations(self) -> dict[str, dict[str, Any]]:
        """The compensation events queued, by id."""
        return copy.deepcopy(self._state.compensations)

    # ------------------------------------------------------------ quarantine

    def quarantine(self, items: Sequence[Mapping[str, Any]]) -> None:
        for item in items:
            event_id = item.get("event_id")
            row = {
                "origin": item.get("origin"), "sequence": _bigint(item.get("sequence")), "topic": item.get("topic"),
                "partition": item.get("partition"), "offset": item.get("offset"), "reason": item["reason"],
                "detail": item["detail"], "raw": item.get("raw"),
                "event_id": str(event_id).lower() if event_id is not None else None,
                "hlc": _bigint(item.get("hlc")), "settled": False, "settlement": None,
            }
            if row["event_id"] is not None and any(
                not q["settled"] and (q["event_id"], q["reason"], q["origin"], q["sequence"])
                == (row["event_id"], row["reason"], row["origin"], row["sequence"])
                for q in self._state.quarantine.values()
            ):
                continue
            row["id"] = self._next_quarantine_id
            self._next_quarantine_id += 1
            self._state.quarantine[row["id"]] = row
        self._changed()

    def held_due(self, limit: int) -> list[tuple[int, bytes]]:
        now = self.now_ms()
        due = [(entry_id, q["raw"]) for entry_id, q in sorted(self._state.quarantine.items())
               if not q["settled"] and q["reason"] == "clock_skew" and q["hlc"] is not None
               and q["raw"] is not None and Timestamp.unpack(q["hlc"]).wall_ms - now <= self.max_offset_ms]
        return due[:limit]

    def apply_checks(self, events: Sequence[Event]) -> ApplyChecks:
        pairs = {(e.origin, e.sequence) for e in events if e.sequence is not None}
        held = {
            (q["origin"], q["sequence"], q["event_id"]): HeldEntry(q["id"], q["reason"], q["settled"])
            for q in sorted(self._state.quarantine.values(), key=lambda q: q["id"])
            if (q["origin"], q["sequence"]) in pairs and (not q["settled"] or q["settlement"] == "discarded")
            and q["event_id"] is not None and q["reason"] != "origin_mismatch"
        }
        return self.now_ms(), self.max_offset_ms, held

    def still_refused(self, entry_id: int, reason: str, detail: str, actor: str, action: str) -> None:
        entry = self._state.quarantine[entry_id]
        entry.update(reason=reason, detail=detail)
        self._state.quarantine_log.append({"id": entry_id, "action": action, "outcome": f"still refused: {reason}",
                                           "actor": actor, "reason": detail})
        self._changed()

    def settle_quarantine(self, entry_ids: Sequence[int], how: str, actor: str, reason: str, action: str) -> None:
        for entry_id in entry_ids:
            entry = self._state.quarantine.get(entry_id)
            if entry is not None and not entry["settled"]:
                entry.update(settled=True, settlement=how, settled_by=actor, settle_reason=reason)
            self._state.quarantine_log.append({"id": entry_id, "action": action, "outcome": how, "actor": actor,
                                               "reason": reason})
        self._changed()

    # ------------------------------------------------------------ outbox and relay

    def insert_outbox(self, event: Event) -> None:
        position = self._next_position
        self._next_position += 1
        self._state.outbox[position] = event
        self._state.pending.append(position)
        self._changed()

    def acquire_lease(self, origin: str, holder: str) -> int:
        relay = self._state.relay.setdefault(origin, _RelayState())
        relay.epoch += 1
        relay.holder = holder
        self._changed()
        return relay.epoch

    def _check_epoch(self, origin: str, epoch: int) -> _RelayState:
        relay = self._state.relay.get(origin)
        if relay is None or relay.epoch != epoch:
            raise FencedError("relay epoch moved on: a newer relay holds the lease", region=origin, epoch=epoch)
        return relay

    def claim_messages(self, origin: str, epoch: int, after: int, limit: int, number: bool = True) -> list[Message]:
        with self.transaction():
            relay = self._check_epoch(origin, epoch)
            after = max(after, relay.published_through)
            sequences: list[int] = []
            if relay.last_sequence > after:
                sequences = sorted(s for (o, s) in self._state.numbered if o == origin and s > after)[:limit]
            if not sequences and number:
                taken = [p for p in sorted(self._state.pending) if self._state.outbox[p].origin == origin][:limit]
                for n, position in enumerate(taken, start=relay.last_sequence + 1):
                    self._state.numbered[(origin, n)] = position
                    self._state.pending.remove(position)
                    sequences.append(n)
                if taken:
                    relay.last_sequence += len(taken)
                    self._changed()
            out = []
            for sequence in sequences:
                event = replace(self._state.outbox[self._state.numbered[(origin, sequence)]], sequence=sequence)
                out.append((sequence, event.key.encode(), wire.encode(event)))
            return out

    def mark_published(self, origin: str, epoch: int, through: int) -> int:
        with self.transaction():
            relay = self._check_epoch(origin, epoch)
            if through > relay.published_through:
                relay.published_through = through
                self._changed()
            return self._state.lsn

    def relay_position(self, origin: str) -> tuple[int, int]:
        relay = self._state.relay.get(origin)
        return (relay.last_sequence, relay.published_through) if relay else (0, 0)

    def database_mark(self, origin: str, epoch: int) -> DatabaseMark:
        last, published = self.relay_position(origin)
        return DatabaseMark(self._state.lsn, last, published, epoch)

    def pending_compensations(self, limit: int) -> list[tuple[str, str]]:
        published = self._state.compensations_published
        return [(ident, json.dumps(doc)) for ident, doc in self._state.compensations.items()
                if ident not in published][:limit]

    def mark_compensations_published(self, ids: Sequence[str]) -> None:
        self._state.compensations_published.update(ids)
        self._changed()

    def close(self) -> None:
        pass

    # ------------------------------------------------------------ lifecycle

    def region_status(self) -> RegionStatus:
        if self._state.lifecycle is None:
            self._state.lifecycle = RegionStatus(self.region, State.ACTIVE, 1, "migrated")
        return self._state.lifecycle

    def mark_alive(self, clean_stop: bool = False) -> None:
        now = datetime.fromtimestamp(self.now_ms() / 1000, UTC)
        self._state.lifecycle = replace(self.region_status(), last_alive_at=now, clean_stop=clean_stop)
        self._changed()

    def holds_rows(self, tables: Sequence[TableConfig]) -> bool:
        return any(self._state.rows.get(t.name) for t in tables)

    def transition(self, target: State, reason: str, actor: str, *, force: bool = False,
                   expected_epoch: int | None = None) -> RegionStatus:
        current = self.region_status()
        if expected_epoch is not None and expected_epoch != current.epoch:
            raise LifecycleError("lifecycle moved on meanwhile", region=self.region,
                                 expected_epoch=expected_epoch, epoch=current.epoch)
        check_transition(current.state, target, force=force)
        if current.state is not target:
            self._state.lifecycle = replace(current, state=target, epoch=current.epoch + 1, reason=reason)
            self._changed()
        return self._state.lifecycle or current

    def restore(self, snapshot: MemoryRegionStore) -> None:
        """Become ``snapshot`` (taken with :meth:`snapshot`): a database restored from a backup."""
        self._state = copy.deepcopy(snapshot._state)
        self._next_position = snapshot._next_position

    def snapshot(self) -> MemoryRegionStore:
        """A copy of this database as it is now (a backup)."""
        taken = MemoryRegionStore(self.region, self.tables, max_offset_ms=self.max_offset_ms, now_ms=self.now_ms)
        taken._state = copy.deepcopy(self._state)
        taken._next_position = self._next_position
        return taken

    # ------------------------------------------------------------ gaps

    def inbox_ranges(self) -> dict[str, list[tuple[int, int]]]:
        by_origin: dict[str, list[int]] = {}
        for origin, sequence in self._state.inbox:
            by_origin.setdefault(origin, []).append(sequence)
        out: dict[str, list[tuple[int, int]]] = {}
        for origin in sorted(set(by_origin) | set(self._state.inbox_floor)):
            floor = self._state.inbox_floor.get(origin, 0)
            runs = [(1, floor)] if floor > 0 else []
            out[origin] = _runs(runs, sorted(by_origin.get(origin, [])))
        return out

    def outbox_ranges(self, origin: str) -> list[tuple[int, int]]:
        return _runs([], sorted(s for (o, s), p in self._state.numbered.items()
                                if o == origin and p in self._state.outbox))

    def own_ranges(self, origin: str) -> list[tuple[int, int]]:
        relay = self._state.relay.get(origin)
        pruned = relay.pruned_through if relay else 0
        return _runs([(1, pruned)] if pruned > 0 else [], sorted(s for (o, s) in self._state.numbered if o == origin))

    def inbox_floors(self) -> dict[str, int]:
        return {origin: through for origin, through in self._state.inbox_floor.items() if through > 0}

    def refused(self) -> list[dict[str, Any]]:
        def applied_since(q: dict[str, Any]) -> bool:
            sequence = q["sequence"]
            return sequence is not None and (
                (q["origin"], sequence) in self._state.inbox or sequence <= self._state.inbox_floor.get(q["origin"], 0))

        return [{"id": entry_id, "origin": q["origin"], "sequence": q["sequence"], "event_id": q["event_id"],
                 "reason": q["reason"], "detail": q["detail"]}
                for entry_id, q in sorted(self._state.quarantine.items())
                if not q["settled"] and (q["sequence"] is not None or q["event_id"] is not None)
                and not applied_since(q)]

    def discarded(self) -> dict[str, list[tuple[int, int]]]:
        pairs = sorted({(q["origin"], q["sequence"]) for q in self._state.quarantine.values()
                        if q["settlement"] == "discarded" and q["origin"] is not None and q["sequence"] is not None
                        and q["reason"] != "origin_mismatch"})
        out: dict[str, list[tuple[int, int]]] = {}
        for origin, sequence in pairs:
            out.setdefault(str(origin), []).append((sequence, sequence))
        return out

    def hlc_span(self, origin: str, ranges: Sequence[tuple[int, int]], *,
                 holder_is_origin: bool) -> tuple[Timestamp | None, Timestamp | None]:
        def wanted(sequence: int) -> bool:
            return any(lo <= sequence <= hi for lo, hi in ranges)

        if holder_is_origin:
            stamps = [self._state.outbox[p].hlc for (o, s), p in self._state.numbered.items()
                      if o == origin and wanted(s) and p in self._state.outbox]
        else:
            stamps = [e.hlc for (o, s), e in self._state.inbox.items() if o == origin and wanted(s)]
        return (min(stamps), max(stamps)) if stamps else (None, None)

    def database_now_ms(self) -> int:
        return self.now_ms()

    # ------------------------------------------------------------ replay

    def outbox_events(self, origin: str, low: int, high: int, limit: int) -> list[Event]:
        numbered = sorted((s, p) for (o, s), p in self._state.numbered.items()
                          if o == origin and low <= s <= high and p in self._state.outbox)
        return [replace(self._state.outbox[p], sequence=s) for s, p in numbered[:limit]]

    def inbox_events(self, origin: str, low: int, high: int, limit: int) -> list[Event]:
        held = sorted((s, e) for (o, s), e in self._state.inbox.items() if o == origin and low <= s <= high)
        return [e for _s, e in held[:limit]]

    def outbox_ids_known(self, event_ids: Sequence[str]) -> set[str]:
        wanted = {i.lower() for i in event_ids}
        return {e.event_id.lower() for e in self._state.outbox.values() if e.event_id.lower() in wanted}

    def give_back_numbers(self, origin: str, events: Sequence[Event]) -> None:
        position_of = {self._state.outbox[p].event_id.lower(): p for p in self._state.pending}
        taken = set(self._state.numbered.values())
        for event in events:
            position = position_of.get(event.event_id.lower())
            pair = (origin, event.sequence or 0)
            if position is None or position in taken or pair in self._state.numbered:
                continue
            self._state.numbered[pair] = position
            self._state.pending.remove(position)
            taken.add(position)
        self._changed()

    def restore_own_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        known = self.outbox_ids_known([e.event_id for e in events])
        for event in events:
            if event.event_id.lower() not in known:
                self.insert_outbox(replace(event, sequence=None))
        origin = events[0].origin
        self.give_back_numbers(origin, events)
        self.reserve_sequences(origin, max(e.sequence or 0 for e in events))

    def reserve_sequences(self, origin: str, through: int) -> None:
        relay = self._state.relay.setdefault(origin, _RelayState())
        relay.last_sequence = max(relay.last_sequence, through)
        relay.published_through = max(relay.published_through, through)
        self._changed()


def _runs(start: list[tuple[int, int]], sequences: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted sequences as closed ranges, after (and merged with) ``start``."""
    out = list(start)
    for s in sequences:
        if out and out[-1][1] + 1 >= s:
            out[-1] = (out[-1][0], max(out[-1][1], s))
        else:
            out.append((s, s))
    return out
