"""KRaft cluster ids the storage tool's argument parser cannot misread."""

from __future__ import annotations

import itertools

import pytest

from reconciler.devstack import kafka


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xf8 encodes to "-" as the first base64url character: the parser took such an
    # id for an option and `dev up` failed about once in 64 fresh stacks
    draws = itertools.chain([b"\xf8" + bytes(15), b"\xfb" + bytes(15)], iter(lambda: b"\x01" * 16, None))
    monkeypatch.setattr(kafka.os, "urandom", lambda n: next(draws))
    cid = kafka.new_cluster_id()
    assert not cid.startswith("-") and len(cid) == 22
    assert cid == "AQEBAQEBAQEBAQEBAQEBAQ"
