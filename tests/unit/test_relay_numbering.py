"""The relay numbers the region's own events only while the region is in service.

Found by the nemesis (seed 2): a stale-restored region whose recover was killed in
VERIFYING, after it raised the relay counter and before its pending own events got
their original numbers back, numbered those events anew; peers applied them twice."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from reconciler.lifecycle import State
from reconciler.relay import Relay


def relay_in(state: State, monkeypatch: pytest.MonkeyPatch) -> Any:
    relay = Relay.__new__(Relay)
    relay._store = SimpleNamespace(  # type: ignore[assignment]
        region_status=lambda: SimpleNamespace(state=state, epoch=1), relay_position=lambda _origin: (10, 10))
    relay._stale_checked_at = None
    relay._stale = False

    def no_kafka(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a region out of service is not even checked for a stale counter")

    monkeypatch.setattr("reconciler.relay.kafka.retained_sequences", no_kafka)
    return relay


@pytest.mark.parametrize("state", [State.CATCHING_UP, State.VERIFYING, State.FENCED])
def test_nothing_is_numbered_out_of_service(state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    assert relay_in(state, monkeypatch)._numbering_allowed() is False


@pytest.mark.parametrize("state", [State.ACTIVE, State.SUSPECT])
def test_a_region_in_service_numbers_unless_its_counter_is_stale(state: State,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    relay = relay_in(state, monkeypatch)
    relay.config = SimpleNamespace(kafka_settings=lambda _r: {}, peers=lambda _r: [], region=lambda _p: None)
    relay.region, relay.topic = "us-east", "t.us-east"
    monkeypatch.setattr("reconciler.relay.kafka.retained_sequences", lambda *_a, **_k: (1, 10))
    monkeypatch.setattr("reconciler.relay.peers_seen_through", lambda *_a, **_k: {})
    assert relay._numbering_allowed() is True
