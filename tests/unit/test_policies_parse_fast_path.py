"""The payload fast path of ``conflict._parse`` must be invisible: for any payload it
returns what the full checks return, or raises the same error."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.errors import EventError
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.policies import _parse, _parse_checked

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3))
_names = st.one_of(st.sampled_from(("id", "name", "n", "tags")), st.integers(0, 2), st.none())
_objects = st.dictionaries(_names, _scalars, max_size=3)
_members = st.sampled_from(("key", "values", "deltas", "set_add", "set_remove", "conflict_id", "by", "kind", "x"))
_payloads = st.one_of(
    st.dictionaries(_members, st.one_of(_scalars, _objects, st.lists(_scalars, max_size=2)), max_size=4),
    st.fixed_dictionaries({"key": _objects}, optional={"values": st.one_of(st.none(), _objects)}),
    st.lists(_scalars, max_size=2),
    _scalars,
)


def _outcome(event: Event, parse: Any) -> Any:
    try:
        return ("ok", parse(event))
    except EventError as err:
        return ("error", str(err), err.context)


@settings(max_examples=500, deadline=None)
@given(
    payload=_payloads,
    op=st.sampled_from(list(Operation)),
    hlc=st.integers(1, 5),
    prior=st.one_of(st.none(), st.integers(0, 6)),
)
def test_fast_path_answers_exactly_as_the_full_checks(payload: Any, op: Operation, hlc: int, prior: int | None) -> None:
    event = Event(origin="eu", event_id="e1", table="t", key="1", operation=op, hlc=Timestamp(hlc),
                  payload=payload, prior=None if prior is None else Timestamp(prior))
    assert _outcome(event, _parse) == _outcome(event, _parse_checked)


def test_fast_path_copies_what_it_returns() -> None:
    payload = {"key": {"id": 1}, "values": {"name": "a"}}
    event = Event(origin="eu", event_id="e1", table="t", key="1", operation=Operation.INSERT,
                  hlc=Timestamp(2), payload=payload)
    parsed = _parse(event)
    assert parsed.key == {"id": 1} and parsed.values == {"name": "a"}
    assert parsed.key is not payload["key"] and parsed.values is not payload["values"]
