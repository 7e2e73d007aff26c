"""The region store port: every statement services, the CLI and the drills run
against a region's database, behind one driver-free interface.

Services (apply, the outbox writer, the conflict queue, the saga) take a store,
never a connection, so the pure parts of the pipeline run on
:class:`reconciler.store.memory.MemoryRegionStore` in unit tests and on
:class:`reconciler.store.postgres_store.PostgresRegionStore` in production; one contract
suite (tests/contract/test_region_store.py) holds both to the same behaviour.

The port is split by who needs what, so the in-memory store implements exactly
the parts the pure code uses and is never asked to pretend it has Merkle leaves
or triggers:

- :class:`ApplyStore`: per-key locks, row states, the inbox's dedup, conflicts,
  quarantine and compensation events as apply writes them, the outbox insert of a
  local write;
- :class:`RelayStore`: the relay lease, claiming numbered messages, marking them
  published, the checks before numbering, compensation events;
- :class:`LifecycleStore`: the lifecycle state, the liveness marks (the relay's
  checks and the sidecar's start decision read them);
- :class:`GapStore`: what gap analysis compares: sequence ranges, refused and
  discarded events, a gap's stamps, the database's clock;
- :class:`ReplayStore`: a gap's events read from a peer, a region's own lost events
  given back with their numbers;
- :class:`PipelineStore`: all of those, what the in-memory store implements too
  (one contract suite, tests/contract/test_region_store.py, holds both to it);
- :class:`RegionStore`: that plus what only PostgreSQL has, tested against it in
  tests/integration: :class:`HealthStore` (status and the sidecar's gauges),
  :class:`OperatorStore` (schema, accepted losses, violations, retention),
  :class:`VerifyStore` (Merkle verification's key reads and repairs),
  :class:`SeedStore` (a new region copied from a live one's snapshot), the conflict
  queue and quarantine listings.

Sessions come from :class:`StoreSessions` (a ``PipelineStore``) or
:class:`RegionSessions` (a ``RegionStore``); outside ``reconciler.store`` nothing
holds a driver connection (tests/unit/test_import_rule.py).

Every implementation raises :class:`~reconciler.errors.ReconcilerError`
subclasses only: a driver error never crosses this boundary.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..config import TableConfig
from ..hlc import Timestamp
from ..invariants import Discard
from ..lifecycle import RegionStatus, State
from ..model import ConflictRecord, Event, RowState
from ..peers import PeerView

if TYPE_CHECKING:  # results of PostgreSQL-only statements; their modules hold the driver
    from ..merkle import Key
    from .capture import CaptureResult
    from .counted import Counted
    from .invariants import ViolationEntry
    from .merkle_leaves import InstallResult, LeafCounts
    from .retention import PruneResult
    from .seeding import SourceFacts
    from .verify_queries import KeyView

__all__ = [
    "CONFLICT_COLUMNS",
    "ApplyStore",
    "ApplyChecks",
    "ConflictRow",
    "DatabaseMark",
    "GapSessions",
    "GapStore",
    "HealthStore",
    "HeldEntry",
    "InboxProgress",
    "LifecycleStore",
    "ManualQueue",
    "Message",
    "OperatorStore",
    "OutboxBacklog",
    "ParkedEvents",
    "PipelineStore",
    "RegionSessions",
    "RegionStore",
    "RelayStore",
    "SeedStore",
    "ReplayStore",
    "StoreSessions",
    "StateRow",
    "StoredPeerView",
    "VerifyStore",
    "json_text",
    "session_on",
    "states_from_rows",
]

#: a row_meta row with its JSON still text: (key, packed hlc, origin, deleted, meta, values).
#: Kept encoded so apply can decode on its worker thread while the inbox insert runs.
StateRow = tuple[str, int, str, bool, str, str]

#: (relay sequence, message key, message value) of a claimed outbox row
Message = tuple[int, bytes, bytes]

#: key -> (conflict id, parked event) of a manual table's open queue entries
ParkedEvents = dict[str, list[tuple[str, Event]]]

#: the columns of a conflict-queue row, in the order :class:`ConflictRow` holds them
CONFLICT_COLUMNS: Final = (
    "conflict_id", "table_name", "row_key", "kind", "policy", "outcome", "status", "local_version",
    "remote_version", "event_id", "detected_at", "resolved_by", "resolved_at", "resolution_reason",
    "resolution", "resolution_event",
)
ConflictRow = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class HeldEntry:
    """An open (or discarded) quarantine entry of an event apply is about to meet."""

    id: int
    reason: str
    #: settled by an operator's discard: never applied, never quarantined again
    discarded: bool = False


#: (database time in ms, max offset in ms, held entries by (origin, sequence, event id))
ApplyChecks = tuple[int, int, dict[tuple[str, int, str], HeldEntry]]


#: one encoder for every document sent to a database (compact; str() for uuids, dates, decimals)
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def json_text(value: Any) -> str:
    return _encode(value)


def states_from_rows(rows: Iterable[StateRow]) -> dict[str, RowState]:
    """Decode :data:`StateRow` values (pure)."""
    loads = json.loads
    return {
        key: RowState(values=loads(values), hlc=Timestamp.unpack(hlc), origin=origin, deleted=deleted,
                      meta=loads(meta))
        for key, hlc, origin, deleted, meta, values in rows
    }


@dataclass(frozen=True)
class OutboxBacklog:
    events: int
    #: age of the oldest unpublished row; 0.0 when there is none
    oldest_age_seconds: float


@dataclass(frozen=True)
class InboxProgress:
    """What this region applied from one origin."""

    origin: str
    applied: int
    highest_sequence: int
    last_applied_at: datetime | None
    #: seconds since ``last_applied_at``, by the database's clock
    last_applied_age_seconds: float | None

    @property
    def holes(self) -> int:
        """Sequences below the highest applied one that are not applied.

        With one partition per topic the consumer reads in sequence order, so a hole is
        an event it went past: it will not come by itself. With several partitions a
        hole can be an event still queued on another partition, so it is transient.
        """
        return max(0, self.highest_sequence - self.applied)


@dataclass(frozen=True)
class ManualQueue:
    depth_by_table: dict[str, int]
    oldest_age_seconds: float

    @property
    def depth(self) -> int:
        return sum(self.depth_by_table.values())


@dataclass(frozen=True)
class StoredPeerView:
    """One row of ``reconciler.peer_heartbeat`` with ages computed by the database clock."""

    peer: str
    age_seconds: float | None
    peer_wall_ms: int | None
    peer_hlc: int | None
    skew_ms: float | None
    peer_state: str | None
    peer_epoch: int | None
    view_state: str | None
    #: seconds since the observing sidecar last wrote this row
    written_age_seconds: float


class ApplyStore(ABC):
    """What applying events (remote or local) needs from a region's database."""

    # ------------------------------------------------------------ transactions and catalogue

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One transaction (a savepoint when one is already open): all or nothing."""

    @abstractmethod
    def region_id(self) -> str: ...

    @abstractmethod
    def replicated_tables(self) -> dict[str, TableConfig]: ...

    # ------------------------------------------------------------ rows

    @abstractmethod
    def lock_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Per-key locks until the transaction ends, taken in one sorted order."""

    @abstractmethod
    def load_state_rows(self, table: str, keys: Sequence[str]) -> list[StateRow]: ...

    def load_states(self, table: str, keys: Sequence[str]) -> dict[str, RowState]:
        return states_from_rows(self.load_state_rows(table, keys))

    @abstractmethod
    def write_states(self, table: TableConfig, states: Mapping[str, RowState]) -> None:
        """Make the business rows and their metadata say what ``states`` say."""

    @abstractmethod
    def hlc_now(self) -> Timestamp:
        """A fresh stamp of the region's clock."""

    @abstractmethod
    def observe_hlc(self, stamp: Timestamp) -> Timestamp:
        """Move the region's clock past ``stamp`` (a remote event applied)."""

    # ------------------------------------------------------------ inbox

    @abstractmethod
    def insert_inbox(self, events: Sequence[Event]) -> set[tuple[str, int]]:
        """Record events as applied; returns the (origin, sequence) pairs that were new
        (not applied before, and above the origin's pruning floor)."""

    @abstractmethod
    def forget_inbox(self, pairs: Sequence[tuple[str, int]]) -> None:
        """Take (origin, sequence) pairs back out of the inbox: events whose policy refused
        them stay a gap, replayable once fixed."""

    # ------------------------------------------------------------ conflicts

    @abstractmethod
    def record_conflicts(self, records: Sequence[ConflictRecord]) -> None: ...

    @abstractmethod
    def record_resolutions(self, events: Sequence[Event]) -> None:
        """Close the queue entries that RESOLVE events among ``events`` decide."""

    @abstractmethod
    def open_parked_events(self, table: str, keys: Sequence[str]) -> ParkedEvents: ...

    @abstractmethod
    def close_parked(self, closed: Sequence[tuple[str, str]]) -> None:
        """Close (conflict id, outcome) entries found causally ordered."""

    @abstractmethod
    def queue_discards(self, discards: Sequence[Discard]) -> int:
        """Queue one compensation event per acknowledged write a decision threw away
        (once per lost write: a write already reported queues nothing); how many were new."""

    # ------------------------------------------------------------ quarantine as apply writes it

    @abstractmethod
    def quarantine(self, items: Sequence[Mapping[str, Any]]) -> None:
        """Keep what could not be applied, raw, with its reason (once per open reason)."""

    @abstractmethod
    def held_due(self, limit: int) -> list[tuple[int, bytes]]:
        """Held (clock_skew) entries whose stamp is near enough now: (id, raw message)."""

    @abstractmethod
    def apply_checks(self, events: Sequence[Event]) -> ApplyChecks:
        """The clock, the max offset and the held quarantine entries of ``events``."""

    @abstractmethod
    def still_refused(self, entry_id: int, reason: str, detail: str, actor: str, action: str) -> None: ...

    @abstractmethod
    def settle_quarantine(self, entry_ids: Sequence[int], how: str, actor: str, reason: str, action: str) -> None:
        ...

    # ------------------------------------------------------------ outbox

    @abstractmethod
    def insert_outbox(self, event: Event) -> None:
        """Queue a local write's event for the relay."""


@dataclass(frozen=True)
class DatabaseMark:
    """What a relay remembers of its database, to recognise a restore under it.

    A physical restore keeps the system identifier and, without a point-in-time
    target, the timeline; what it cannot keep is anything written after the backup:
    the WAL insert position goes back, and so do the relay's own counters and the
    lease epoch it bumped. Each of these only ever grows on a database that was not
    restored (crash recovery replays to the end of the written WAL).
    """

    lsn: int
    last_sequence: int
    published_through: int
    epoch: int

    def behind(self, seen: DatabaseMark) -> list[str]:
        """Why this (newer) reading shows a database older than ``seen``; empty: not restored."""
        why = []
        if self.lsn < seen.lsn:
            why.append(f"WAL position went back from {seen.lsn} to {self.lsn}")
        if self.last_sequence < seen.last_sequence:
            why.append(f"relay counter went back from {seen.last_sequence} to {self.last_sequence}")
        if self.published_through < seen.published_through:
            why.append(f"published_through went back from {seen.published_through} to {self.published_through}")
        if self.epoch <= seen.epoch:
            why.append(f"relay lease epoch {self.epoch} not above the {seen.epoch} already held")
        return why

    def advanced(self, lsn: int = 0, last_sequence: int = 0, published_through: int = 0) -> DatabaseMark:
        return DatabaseMark(max(self.lsn, lsn), max(self.last_sequence, last_sequence),
                            max(self.published_through, published_through), self.epoch)


class LifecycleStore(ABC):
    """The region's lifecycle: its state and epoch, and the sidecar's liveness marks."""

    @abstractmethod
    def region_status(self) -> RegionStatus: ...

    @abstractmethod
    def transition(self, target: State, reason: str, actor: str, *, force: bool = False,
                   expected_epoch: int | None = None) -> RegionStatus:
        """Move the region to ``target`` (epoch + 1); LifecycleError when ``expected_epoch``
        is given and the lifecycle moved on meanwhile, or the move is not allowed."""

    @abstractmethod
    def mark_alive(self, clean_stop: bool = False) -> None:
        """Stamp ``last_alive_at`` now; ``clean_stop`` says whether the sidecar stopped
        as planned (false while it runs, so a SIGKILL shows on the next start)."""

    @abstractmethod
    def holds_rows(self, tables: Sequence[TableConfig]) -> bool:
        """Whether any of ``tables`` holds a row (an empty region must not serve as if caught up)."""


class RelayStore(LifecycleStore):
    """The relay's side of the outbox: lease, claim, mark published; what it checks
    before numbering (the database's mark, the lifecycle); compensation events."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def acquire_lease(self, origin: str, holder: str) -> int:
        """Take the region's relay lease; returns the new epoch (FencedError when held)."""

    @abstractmethod
    def claim_messages(self, origin: str, epoch: int, after: int, limit: int, number: bool = True) -> list[Message]:
        """Numbered but unpublished messages above ``after``; else (``number``) up to
        ``limit`` pending rows numbered densely. Fenced by ``epoch``."""

    @abstractmethod
    def mark_published(self, origin: str, epoch: int, through: int) -> int:
        """Record ``through`` as published (fenced by ``epoch``); returns a WAL-like position."""

    @abstractmethod
    def relay_position(self, origin: str) -> tuple[int, int]:
        """(last sequence assigned, last sequence published)."""

    @abstractmethod
    def database_mark(self, origin: str, epoch: int) -> DatabaseMark:
        """The database as it is now, ``epoch`` being the lease just taken."""

    @abstractmethod
    def pending_compensations(self, limit: int) -> list[tuple[str, str]]:
        """(id, JSON text) of compensation events not yet acknowledged by the broker, oldest first."""

    @abstractmethod
    def mark_compensations_published(self, ids: Sequence[str]) -> None: ...


class GapStore(ABC):
    """What gap analysis reads of one region: the sequence ranges it compares, what
    the quarantine keeps out, the stamps of a gap's events and the database's clock."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def relay_position(self, origin: str) -> tuple[int, int]:
        """(last sequence numbered, last published) of ``origin``'s relay here."""

    @abstractmethod
    def inbox_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Applied sequences per origin as closed ranges, the pruning floor included."""

    @abstractmethod
    def inbox_floors(self) -> dict[str, int]:
        """Per origin, the sequence up to which everything was applied and pruned."""

    @abstractmethod
    def outbox_ranges(self, origin: str) -> list[tuple[int, int]]:
        """Numbered sequences of ``origin`` the outbox still holds."""

    @abstractmethod
    def own_ranges(self, origin: str) -> list[tuple[int, int]]:
        """Sequences of ``origin`` accounted for as its own: numbered rows and the pruned prefix."""

    @abstractmethod
    def refused(self) -> list[dict[str, Any]]:
        """Quarantined events still missing here (neither settled nor applied since), oldest
        first: ``id``, ``origin``, ``sequence``, ``event_id``, ``reason``, ``detail``."""

    @abstractmethod
    def discarded(self) -> dict[str, list[tuple[int, int]]]:
        """Per origin, the sequences an operator discarded here: settled, not held. A
        discarded forged copy (origin_mismatch) settles nothing of the origin it claimed."""

    @abstractmethod
    def hlc_span(self, origin: str, ranges: Sequence[tuple[int, int]], *,
                 holder_is_origin: bool) -> tuple[Timestamp | None, Timestamp | None]:
        """Lowest and highest stamp of ``origin``'s events in ``ranges`` held here: the
        origin's own numbered outbox rows, or a peer's inbox."""

    @abstractmethod
    def database_now_ms(self) -> int:
        """The database's clock in ms: the one clock stamps and skew are judged by."""


class ReplayStore(ABC):
    """What replay reads of a region that holds a gap's events, and writes when a
    region gets back its own events that a stale backup lost."""

    @abstractmethod
    def outbox_events(self, origin: str, low: int, high: int, limit: int) -> list[Event]:
        """``origin``'s numbered outbox events with sequence in [low, high], in sequence order."""

    @abstractmethod
    def inbox_events(self, origin: str, low: int, high: int, limit: int) -> list[Event]:
        """``origin``'s events applied here with sequence in [low, high] (payload kept), in order."""

    @abstractmethod
    def outbox_ids_known(self, event_ids: Sequence[str]) -> set[str]:
        """Which of ``event_ids`` the outbox holds (lower-case text)."""

    @abstractmethod
    def give_back_numbers(self, origin: str, events: Sequence[Event]) -> None:
        """Number the pending outbox rows of ``events`` with the events' own sequences;
        rows already numbered keep theirs."""

    @abstractmethod
    def restore_own_events(self, events: Sequence[Event]) -> None:
        """Put lost own events back in the outbox with their original numbers, counted as
        numbered and published (peers hold them already)."""

    @abstractmethod
    def reserve_sequences(self, origin: str, through: int) -> None:
        """Never number a new event of ``origin`` at or below ``through``."""


class PipelineStore(ApplyStore, RelayStore, GapStore, ReplayStore):
    """What the pipeline's services (relay, inbox, apply, gap analysis, replay) use:
    all the in-memory store implements."""


class StoreSessions(Protocol):
    """Where services open their sessions on a region's database
    (:class:`~reconciler.store.postgres_store.RegionDatabases` in production)."""

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> PipelineStore: ...


class RegionSessions(Protocol):
    """Where the sidecar's measurements and ``reconciler status`` open whole-port sessions."""

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> RegionStore: ...


class GapSessions(Protocol):
    """Where gap analysis opens its reads of every region (``StoreSessions`` are too)."""

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> GapStore: ...


@contextmanager
def session_on(sessions: GapSessions, region: str, *, timeout: int = 5) -> Iterator[GapStore]:
    """An autocommit session on ``region`` from any provider, closed when the block ends."""
    store = sessions.open(region, autocommit=True, timeout=timeout)
    try:
        yield store
    finally:
        store.close()


class HealthStore(ABC):
    """What the sidecar's measurements, its heartbeats and ``reconciler status`` read
    of one region's health (PostgreSQL only: the in-memory store has no clock-aged
    rows, leaves or invariants to report)."""

    @abstractmethod
    def outbox_backlog(self, origin: str) -> OutboxBacklog:
        """Outbox rows of ``origin`` not published yet, and the oldest one's age."""

    @abstractmethod
    def inbox_progress(self) -> dict[str, InboxProgress]:
        """Per origin, what this region applied of it."""

    @abstractmethod
    def relay_high_water(self, origin: str) -> int:
        """The highest sequence ``origin``'s relay numbered here."""

    @abstractmethod
    def event_age(self, origin: str, sequence: int) -> float | None:
        """Seconds since ``origin`` stamped its event ``sequence`` (None: not held here)."""

    @abstractmethod
    def manual_queue(self, tables: Sequence[str] = ()) -> ManualQueue:
        """Open manual conflicts per table, and the oldest one's age."""

    @abstractmethod
    def quarantined(self) -> int:
        """Quarantine entries not settled."""

    @abstractmethod
    def refused_counts(self) -> dict[tuple[str, str], int]:
        """(origin, reason) -> refused events, for the metric."""

    @abstractmethod
    def open_violation_counts(self) -> dict[tuple[str, str], int]:
        """Open invariant violations per (table, invariant)."""

    @abstractmethod
    def peer_views(self) -> dict[str, StoredPeerView]:
        """What this region's sidecar last wrote about each peer."""

    @abstractmethod
    def save_peer_views(self, views: Sequence[PeerView]) -> None:
        """Overwrite this region's opinion of its peers."""

    @abstractmethod
    def anti_entropy_divergence(self) -> dict[str, dict[str, Any]]:
        """Per table, what the anti-entropy loop last found (divergent buckets and when)."""

    @abstractmethod
    def compact_leaves(self, tables: Iterable[str]) -> dict[str, int]:
        """Fold the Merkle leaves' delta log of ``tables``; rows folded per table."""


class OperatorStore(ABC):
    """What operators' commands and the maintenance loops change in one region:
    the schema, accepted losses, invariant violations, retention, anti-entropy's
    findings (PostgreSQL only)."""

    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def migrate(self, max_offset_ms: int, tables: Iterable[TableConfig]) -> list[str]:
        """Apply the pending migrations and record the region's tables; returns the ones applied."""

    @abstractmethod
    def create_demo_tables(self) -> None: ...

    @abstractmethod
    def install_capture(self, table: TableConfig) -> CaptureResult: ...

    @abstractmethod
    def uninstall_capture(self, table: TableConfig) -> CaptureResult: ...

    @abstractmethod
    def rebuild_leaves(self, table: TableConfig) -> InstallResult:
        """Count ``table``'s Merkle leaves again from its rows (writes the triggers missed)."""

    @abstractmethod
    def settle_lost(self, origin: str, ranges: Sequence[tuple[int, int]], actor: str, reason: str,
                    detail: str) -> int:
        """Record ``origin``'s sequences in ``ranges`` not applied here as lost, accepted by
        ``actor``; returns how many were recorded."""

    @abstractmethod
    def violations(self, table: str | None = None, status: str | None = "open") -> list[ViolationEntry]: ...

    @abstractmethod
    def violation(self, violation_id: str) -> ViolationEntry | None: ...

    @abstractmethod
    def resolve_violation(self, violation_id: str, by: str, reason: str) -> ViolationEntry | None:
        """Close an open violation with who and why; None when no such open one."""

    @abstractmethod
    def prune(self, origins: Iterable[str], cutoff: Timestamp, batch: int, dry_run: bool = False,
              stop: Callable[[], bool] = lambda: False) -> PruneResult:
        """Drop applied and published events older than ``cutoff``, ``batch`` rows at a time."""

    @abstractmethod
    def record_anti_entropy(self, table: str, peer: str, mode: str, watermark: Timestamp | None, keys: int,
                            buckets: int, sample: Sequence[str]) -> None:
        """What an anti-entropy pass found against ``peer`` (status and the alert read it)."""


class VerifyStore(ABC):
    """What Merkle verification and repair read and write in one region, key by key
    (the tree walks themselves open their own sessions inside ``reconciler.store``)."""

    @abstractmethod
    def open_conflict_keys(self) -> dict[str, set[str]]:
        """Keys parked in the manual queue, per table."""

    @abstractmethod
    def key_view(self, table: TableConfig, keys: Sequence[str]) -> KeyView:
        """The region's events, rows and retention horizon for ``keys``, in one snapshot."""

    @abstractmethod
    def canonical_keys(self, table: TableConfig, keys: Sequence[Key]) -> list[str]:
        """``keys`` (as a diff names them) in the key encoding the pipeline stores."""

    @abstractmethod
    def leaf_buckets(self, table: TableConfig, keys: Sequence[str]) -> int:
        """How many Merkle leaf buckets ``keys`` fall in."""

    @abstractmethod
    def keys_with_metadata(self, table: str) -> list[str]: ...

    @abstractmethod
    def states_and_counted(self, table: str, keys: Sequence[str],
                           with_counted: bool) -> tuple[dict[str, RowState], Counted | None]:
        """The keys' row states and, when asked, the counter contributions of their events."""

    @abstractmethod
    def counted(self, table: str, keys: Sequence[str]) -> Counted: ...

    @abstractmethod
    def lost(self) -> dict[str, list[tuple[int, int]]]:
        """Per origin, the sequences accepted as lost here."""

    @abstractmethod
    def applied_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """:meth:`GapStore.inbox_ranges` inside the caller's transaction."""

    @abstractmethod
    def rewrite_key(self, table: TableConfig, key: str,
                    choose: Callable[[RowState | None], RowState | None]) -> None:
        """Under ``key``'s lock, write what ``choose`` picks given the key's state now."""

    @abstractmethod
    def copy_unmanaged_row(self, source: RegionStore, table: TableConfig, key: str) -> bool:
        """Make a row nobody has metadata for match ``source``'s; False (nothing written)
        if this region has metadata for it once its key lock is held."""

    @abstractmethod
    def leaves_and_rows(self, table: TableConfig) -> tuple[LeafCounts, LeafCounts] | None:
        """(logged, counted) leaf digests in one snapshot; None without maintained leaves."""


class SeedStore(ABC):
    """Seeding a new region: the live source read in one snapshot, the empty target
    written in one transaction (both PostgreSQL)."""

    # the source

    @abstractmethod
    def begin_snapshot(self) -> None:
        """Start the read-only snapshot every later read of the source shares."""

    @abstractmethod
    def end_snapshot(self) -> None: ...

    @abstractmethod
    def source_facts(self, target: str) -> SourceFacts:
        """What the source holds beyond its rows, as the target ``target`` needs it."""

    @abstractmethod
    def still_unnumbered(self, event_ids: Sequence[str]) -> int:
        """How many of ``event_ids`` the source's relay has not numbered yet."""

    # the target

    @abstractmethod
    def lock_target(self, tables: Sequence[TableConfig]) -> tuple[str, str]:
        """Lock the target against writers; (the region it says it is, its lifecycle state)."""

    @abstractmethod
    def target_problems(self, tables: Sequence[TableConfig]) -> list[str]:
        """Why the target is not empty (rows, events), or nothing."""

    @abstractmethod
    def copy_table_from(self, source: RegionStore, table: TableConfig) -> int:
        """``table``'s rows and their metadata from the snapshot; the rows copied."""

    @abstractmethod
    def copy_events_from(self, source: RegionStore) -> dict[str, int]:
        """The source's applied and own events as this region's inbox; rows per origin."""

    @abstractmethod
    def copy_numbered_from(self, source: RegionStore, event_ids: Sequence[str]) -> int:
        """The snapshot's own events the source numbered after it; how many."""

    @abstractmethod
    def finish_seed(self, horizon_hlc: int, newest_hlc: int) -> None:
        """The retention horizon and clock the copy needs before it commits."""


class RegionStore(PipelineStore, HealthStore, OperatorStore, VerifyStore, SeedStore):
    """Everything services, the CLI and the drills ask of one region's database."""

    # ------------------------------------------------------------ catalogue

    @abstractmethod
    def table_columns(self, table: TableConfig) -> tuple[str, ...]:
        """The business table's columns in order (StoreError when it does not exist)."""

    # ------------------------------------------------------------ the conflict queue

    @abstractmethod
    def conflict_rows(self, table: str | None = None, status: str | None = None) -> list[ConflictRow]:
        """Queue rows (:data:`CONFLICT_COLUMNS`), oldest first; ``status`` None: all."""

    @abstractmethod
    def conflict_row(self, conflict_id: str, *, lock: bool = False) -> ConflictRow | None:
        """One queue row; ``lock``: held until the transaction ends (a second resolver waits)."""

    # ------------------------------------------------------------ quarantine as operators read it

    @abstractmethod
    def quarantine_entries(self, *, limit: int = 100, status: str = "all",
                           ids: Sequence[int] | None = None) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def quarantine_audit(self, entry_id: int) -> list[tuple[Any, ...]]: ...


    # ------------------------------------------------------------ the recover lease

    @abstractmethod
    def try_recover_lock(self) -> bool:
        """Take the region's recover lock for as long as this session lives (False: held
        by another session: another recover or seed is running)."""

    @abstractmethod
    def release_recover_lock(self) -> None:
        """Give the lock back now; a closed session's server may hold it a moment longer."""

    # ------------------------------------------------------------ events held anywhere here

    @abstractmethod
    def events_held(self, event_ids: Sequence[str]) -> int:
        """How many of ``event_ids`` this region holds, in its inbox or its outbox."""



def once_per_event(events: Sequence[Event], added: Mapping[tuple[str, int], tuple[str, bool]]) -> set[tuple[str, int]]:
    """Of the pairs ``added`` to the inbox (pair -> (event id, id held before)), those
    to apply: the first, in ``events``' order, of each id the inbox did not hold."""
    apply: set[tuple[str, int]] = set()
    taken: set[str] = set()
    for event in events:
        pair = (event.origin, event.sequence or 0)
        found = added.get(pair)
        if found is None:
            continue
        event_id, held_before = found
        if held_before or event_id.lower() in taken:
            continue
        taken.add(event_id.lower())
        apply.add(pair)
    return apply
