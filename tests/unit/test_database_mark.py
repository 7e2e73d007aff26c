"""Recognising a database restored under a running relay, from what it remembers."""

from __future__ import annotations

from reconciler.store.postgres import DatabaseMark


def test_a_database_that_only_moved_forward_is_not_restored() -> None:
    seen = DatabaseMark(lsn=1000, last_sequence=50, published_through=48, epoch=3)
    assert DatabaseMark(1000, 50, 48, 4).behind(seen) == []
    assert DatabaseMark(2000, 70, 70, 9).behind(seen) == []


def test_anything_gone_back_is_a_restore() -> None:
    seen = DatabaseMark(lsn=1000, last_sequence=50, published_through=48, epoch=3)
    assert DatabaseMark(999, 50, 48, 4).behind(seen) == ["WAL position went back from 1000 to 999"]
    assert len(DatabaseMark(1200, 40, 40, 4).behind(seen)) == 2  # counters back, WAL moved on meanwhile
    # the lease epoch is bumped on every start: one not above the last is an older database
    assert DatabaseMark(1200, 50, 48, 3).behind(seen) == ["relay lease epoch 3 not above the 3 already held"]


def test_advanced_only_grows() -> None:
    seen = DatabaseMark(1000, 50, 48, 3).advanced(lsn=900, last_sequence=60, published_through=60)
    assert seen == DatabaseMark(1000, 60, 60, 3)
