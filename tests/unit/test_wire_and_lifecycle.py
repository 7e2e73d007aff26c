"""Wire decoding refuses bad messages with a reason; the lifecycle gate and
transitions decide as documented."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import wire
from reconciler.errors import EventError, LifecycleError
from reconciler.hlc import Timestamp
from reconciler.lifecycle import GateInput, State, check_transition, gate, needs_catch_up
from reconciler.model import Event, Operation


def event(**over: object) -> Event:
    fields: dict[str, object] = dict(
        origin="us-east", event_id=str(uuid.uuid4()), table="orders", key="o1", operation=Operation.UPDATE,
        hlc=Timestamp(1_700_000_000_000, 3), payload={"key": {"id": "o1"}, "values": {"status": "paid"}},
        prior=Timestamp(1_700_000_000_000, 1), sequence=42, event_type="orders.update",
    )
    fields.update(over)
    return Event(**fields)  # type: ignore[arg-type]


# walls up to 2^47 - 1: a packed stamp is stored as a PostgreSQL bigint
@given(st.integers(min_value=1, max_value=2**40), st.integers(min_value=0, max_value=2**47 - 1),
       st.sampled_from(list(Operation)))
def test_round_trip(sequence: int, wall: int, op: Operation) -> None:
    original = event(sequence=sequence, hlc=Timestamp(wall, 0), operation=op)
    assert wire.decode(wire.encode(original)) == original


@pytest.mark.parametrize("field", ["sequence", "hlc", "prior"])
def test_integers_no_bigint_holds_are_refused_at_decoding(field: str) -> None:
    """A sequence or stamp of 2^63 or more decodes today but no database can store it:
    refused here, naming the field and keeping the event id, instead of failing the
    whole batch's transaction."""
    doc = {**event().to_wire(), field: 2**63}
    with pytest.raises(EventError, match=f"'{field}' is out of range|{field} .* is out of range") as caught:
        wire.decode(json.dumps(doc).encode(), topic="t", offset=1)
    assert caught.value.context["event_id"] == doc["id"]
    assert wire.peek(json.dumps(doc).encode())["event_id"] == doc["id"]
    doc[field] = 2**63 - 1
    wire.decode(json.dumps(doc).encode())  # the largest bigint is fine


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "no value"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 2}', "unsupported wire version"),
        (json.dumps({**event().to_wire(), "sequence": 0}).encode(), "sequence must be >= 1"),
        (json.dumps({**event().to_wire(), "id": "nope"}).encode(), "not a UUID"),
        (json.dumps({**event().to_wire(), "op": "upsert"}).encode(), "unknown operation"),
        (json.dumps({**event().to_wire(), "payload": {"values": {}}}).encode(), "'key' object"),
        (json.dumps({**event().to_wire(), "hlc": -1}).encode(), "'hlc' must be"),
        (json.dumps({**event().to_wire(), "origin": ""}).encode(), "'origin' must be"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(EventError, match=reason) as caught:
        wire.decode(raw, topic="t", offset=7)
    assert caught.value.context["topic"] == "t" and caught.value.context["offset"] == 7


def test_gate_passes_only_when_everything_agrees() -> None:
    clean = GateInput(gap_events=0, lost_events=0, lag_events=0, lag_seconds=0.0, divergent_keys={"orders": 0})
    assert gate(clean, 0, 5.0).passed
    for bad, words in [
        (GateInput(3, 0, 0, 0.0), "3 events still missing"),
        (GateInput(0, 2, 0, 0.0), "2 events are lost"),
        (GateInput(0, 0, 10, 0.0), "inbox lag 10 events"),
        (GateInput(0, 0, 0, 9.0), "inbox lag 9.0s"),
        (GateInput(0, 0, 0, 0.0, {"orders": 4}), "orders: 4 keys differ"),
    ]:
        decision = gate(bad, 0, 5.0)
        assert not decision.passed and any(words in r for r in decision.reasons), decision
    assert gate(GateInput(0, 0, 0, 0.0, {}, parked_keys=7), 0, 5.0).passed  # parked keys never block


def test_refused_events_are_missing_for_the_gate_even_with_no_gap_or_lag() -> None:
    """A quarantined or held event is missing, never in flight: within the lag limit
    and with no hole, the gate still refuses until it is settled."""
    decision = gate(GateInput(0, 0, 1, 0.0, refused_events=1), 10, 5.0)
    assert not decision.passed and any("1 events refused" in r for r in decision.reasons), decision


def test_transitions() -> None:
    check_transition(State.ACTIVE, State.FENCED)
    check_transition(State.CATCHING_UP, State.VERIFYING)
    check_transition(State.VERIFYING, State.ACTIVE)
    with pytest.raises(LifecycleError, match="FENCED -> ACTIVE"):
        check_transition(State.FENCED, State.ACTIVE)
    check_transition(State.FENCED, State.ACTIVE, force=True)
    with pytest.raises(LifecycleError):
        check_transition(State.ACTIVE, State.VERIFYING, force=True)


def test_needs_catch_up() -> None:
    assert needs_catch_up(False, 1.0, 30.0) == "sidecar restarted after an unclean stop"
    assert "absent 60s" in (needs_catch_up(True, 60.0, 30.0) or "")
    assert needs_catch_up(True, 5.0, 30.0) is None
    assert needs_catch_up(True, None, 30.0) is None
    assert "reconciler seed" in (needs_catch_up(True, None, 30.0, empty_beside_peers=True) or "")
