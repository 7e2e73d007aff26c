"""The region lifecycle: states, allowed transitions, and the gate back to ACTIVE.

Pure: the decision functions take measured values and return decisions; the
store persists states with a monotonically increasing epoch and logs every
transition with its reason and actor.

::

    ACTIVE ──(peer silence)──> SUSPECT ──> ACTIVE
      │  ╲                         │
      │   ╲(unclean restart,      (operator fence)
      │    ╲ long absence)         v
      │     ╲──────────────────> CATCHING_UP <── FENCED (recover)
      │ (operator fence)            │
      └──────────> FENCED           v
                                VERIFYING ──(gate passes)──> ACTIVE
                                    │
                                    └──(gate fails)──> CATCHING_UP

``activate --force`` may move any state to ACTIVE: an audited operator override.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .errors import LifecycleError


class State(enum.StrEnum):
    ACTIVE = "ACTIVE"
    SUSPECT = "SUSPECT"
    FENCED = "FENCED"
    CATCHING_UP = "CATCHING_UP"
    VERIFYING = "VERIFYING"


_ALLOWED: dict[State, frozenset[State]] = {
    State.ACTIVE: frozenset({State.SUSPECT, State.FENCED, State.CATCHING_UP}),
    State.SUSPECT: frozenset({State.ACTIVE, State.FENCED, State.CATCHING_UP}),
    State.FENCED: frozenset({State.CATCHING_UP}),
    State.CATCHING_UP: frozenset({State.VERIFYING, State.FENCED}),
    State.VERIFYING: frozenset({State.ACTIVE, State.CATCHING_UP, State.FENCED}),
}


def check_transition(current: State, target: State, *, force: bool = False) -> None:
    """Refuse a transition the lifecycle does not allow (``force`` only to ACTIVE)."""
    if current == target:
        return
    if force and target is State.ACTIVE:
        return
    if target not in _ALLOWED[current]:
        raise LifecycleError(
            f"transition {current.value} -> {target.value} is not allowed",
            current=current.value,
            target=target.value,
        )


@dataclass(frozen=True)
class RegionStatus:
    region: str
    state: State
    epoch: int
    reason: str
    since: Any = None
    last_alive_at: Any = None
    clean_stop: bool = True


@dataclass(frozen=True)
class RootComparison:
    """One replicated table compared with one peer, as of an agreed HLC watermark.

    ``equal`` means the two Merkle roots agree once both sides leave out the keys
    touched by events above ``watermark`` that one side has not applied yet (in flight)
    and the keys parked in the manual queue. Every other differing key is divergent,
    whatever its events say: an event at or below the watermark that one side lacks is
    missing, not in flight.
    """

    table: str
    peer: str
    equal: bool
    watermark: str = ""
    #: how the leaves were read: maintained-leaves or full-scan
    mode: str = ""
    #: divergent keys (canonical encoding), bounded; ``divergent_key_count`` counts them all
    divergent_keys: tuple[str, ...] = ()
    divergent_key_count: int = 0
    #: Merkle leaf buckets holding divergent keys
    divergent_buckets: int = 0
    in_flight_keys: int = 0
    parked_keys: int = 0
    #: why the roots cannot be equal beyond differing keys (columns differ, walk truncated)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table, "peer": self.peer, "equal": self.equal, "watermark": self.watermark,
            "mode": self.mode, "divergent_keys": list(self.divergent_keys),
            "divergent_key_count": self.divergent_key_count, "divergent_buckets": self.divergent_buckets,
            "in_flight_keys": self.in_flight_keys, "parked_keys": self.parked_keys, "note": self.note,
        }


@dataclass(frozen=True)
class GateInput:
    """What the gate measures about one region."""

    gap_events: int
    lost_events: int
    lag_events: int
    lag_seconds: float
    #: table -> number of differing keys outside the manual queue (parked keys excluded)
    divergent_keys: dict[str, int] = field(default_factory=dict)
    parked_keys: int = 0
    #: events this region set aside (quarantined, policy-refused, held future stamps) and
    #: has not settled: missing, never "in flight"
    refused_events: int = 0
    #: every replicated table against every reachable peer at the watermark
    roots: tuple[RootComparison, ...] = ()


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons)}


def gate(measured: GateInput, max_lag_events: int, max_lag_seconds: float) -> GateDecision:
    """ACTIVE only when nothing is missing, lag is within bounds and every replicated
    table's Merkle root equals every reachable peer's at the watermark (keys parked for
    an operator, and keys whose only differing events are above the watermark, excepted).
    A table with no root comparison at all is not checked: the caller compares every
    replicated table with every reachable peer."""
    reasons = []
    if measured.lost_events:
        reasons.append(f"{measured.lost_events} events are lost (no source holds them)")
    if measured.gap_events:
        reasons.append(f"{measured.gap_events} events still missing")
    if measured.refused_events:
        reasons.append(f"{measured.refused_events} events refused (quarantined or held) and not settled:"
                       " see `reconciler quarantine list --status refused`")
    if measured.lag_events > max_lag_events:
        reasons.append(f"inbox lag {measured.lag_events} events > {max_lag_events}")
    if measured.lag_seconds > max_lag_seconds:
        reasons.append(f"inbox lag {measured.lag_seconds:.1f}s > {max_lag_seconds:.1f}s")
    for table, count in sorted(measured.divergent_keys.items()):
        if count:
            reasons.append(f"{table}: {count} keys differ from peers")
    for root in sorted(measured.roots, key=lambda r: (r.table, r.peer)):
        if not root.equal:
            detail = f"{root.divergent_key_count} keys in {root.divergent_buckets} buckets"
            if root.note:
                detail += f"; {root.note}"
            reasons.append(f"{root.table}: Merkle root differs from {root.peer} at watermark {root.watermark}"
                           f" ({detail})")
    return GateDecision(passed=not reasons, reasons=tuple(reasons))


def needs_catch_up(clean_stop: bool, absent_seconds: float | None, absence_threshold_seconds: float, *,
                   empty_beside_peers: bool = False) -> str | None:
    """Why a starting sidecar must put its region through catch-up, or None.

    ``empty_beside_peers``: no sidecar has run on this database yet, its replicated
    tables are empty and a peer's are not. ``migrate`` creates a region ACTIVE, right
    for regions that start together, wrong for one added empty to a running
    deployment: it must not serve before it holds the peers' rows."""
    if empty_beside_peers:
        return ("first start on an empty database while a peer holds rows: fill it with `reconciler seed`, or"
                " catch-up repairs what it can from the peers")
    if not clean_stop:
        return "sidecar restarted after an unclean stop"
    if absent_seconds is not None and absent_seconds > absence_threshold_seconds:
        return f"sidecar was absent {absent_seconds:.0f}s (> {absence_threshold_seconds:.0f}s)"
    return None
