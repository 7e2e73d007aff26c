"""`--writes-per-second`: a drill's load re-aimed at a per-region rate, what it achieved, and the
writers' processes."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from reconciler.drills.history import HistoryWriter, WriteRecord, load_history, record_line
from reconciler.drills.workload import (
    WRITER_CEILING,
    Workload,
    WorkloadSpec,
    WriterStats,
    _plain_statement,
    _take_counts,
)


@pytest.mark.parametrize("per_region", [1.0, 16.0, 300.0, 1000.0])
def test_the_rate_is_spread_over_enough_writers_and_lasts_the_time_budget(per_region: float) -> None:
    base = WorkloadSpec(writers_per_region=2, rate=8.0, seconds=90.0, max_writes=2000)
    spec = base.at_rate(per_region)
    assert spec.writers_per_region * spec.rate == pytest.approx(per_region)
    assert spec.rate <= WRITER_CEILING
    assert spec.writers_per_region >= base.writers_per_region
    assert spec.max_writes >= spec.rate * spec.seconds  # the write budget does not end the load early
    assert (spec.seconds, spec.order_keys, spec.mix) == (base.seconds, base.order_keys, base.mix)



def test_the_processes_switch_follows_the_cores_when_left_to_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.drills import workload

    assert WorkloadSpec().in_processes is False
    assert WorkloadSpec(processes=True).in_processes is True
    monkeypatch.setattr(workload.os, "cpu_count", lambda: workload.PROCESS_CORES - 1)
    assert WorkloadSpec(processes=None).in_processes is False
    monkeypatch.setattr(workload.os, "cpu_count", lambda: workload.PROCESS_CORES)
    assert WorkloadSpec(processes=None).in_processes is True
    assert WorkloadSpec(processes=None).at_rate(300.0).processes is None  # kept through at_rate


def test_the_achieved_rate_is_taken_over_the_time_the_writers_ran(tmp_path: Path) -> None:
    """Not over the whole drill: setup, drain and the checker's reads write nothing."""
    history = HistoryWriter(tmp_path / "h.jsonl")
    load = Workload({"a": "postgresql://unused/a", "b": "postgresql://unused/b"}, history,
                    WorkloadSpec(writers_per_region=2, rate=50.0))
    load.stats = [WriterStats("a/w0", "a", by_target=Counter({"a": 300})),
                  WriterStats("a/w1", "a", by_target=Counter({"a": 290, "b": 10})),
                  WriterStats("b/w0", "b", by_target=Counter({"b": 200}))]
    load.started_at, load.ended_at = 100.0, 110.0
    rates = load.rates()
    assert rates["window_seconds"] == 10.0
    assert rates["acknowledged"] == {"a": 590, "b": 210}
    assert rates["per_second"] == {"a": 59.0, "b": 21.0}
    assert rates["target_per_region"] == 100.0
    history.close()


def test_a_writer_process_report_replaces_each_count_whole() -> None:
    stats = WriterStats("a/w0", "a", acknowledged=3, by_target=Counter({"a": 3}))
    before = stats.by_target
    _take_counts(stats, {"acknowledged": 7, "failed": 2, "failures": {"unreachable": 2},
                         "by_target": {"a": 5, "b": 2}, "last_error": "OperationalError: gone"})
    assert (stats.acknowledged, stats.failed, stats.last_error) == (7, 2, "OperationalError: gone")
    assert stats.failures == Counter({"unreachable": 2}) and stats.by_target == Counter({"a": 5, "b": 2})
    assert before == Counter({"a": 3}), "a reader holding the old counter never sees it change"


def test_lines_appended_by_another_process_and_the_drill_all_load(tmp_path: Path) -> None:
    """The history is opened for appending: a writer process's whole lines and the
    drill's own land one after another, none overwritten."""
    path = tmp_path / "h.jsonl"
    history = HistoryWriter(path)
    other = os.open(path, os.O_WRONLY | os.O_APPEND)
    ids = []
    for i in range(20):
        mine, theirs = _record(f"d{i}"), _record(f"p{i}")
        history.append(mine)
        os.write(other, (record_line(theirs) + "\n").encode())
        ids += [mine.event_id, theirs.event_id]
    os.close(other)
    history.close()
    assert [r.event_id for r in load_history(path)] == ids


def _record(event_id: str) -> WriteRecord:
    return WriteRecord(event_id=event_id, region="a", table="orders", key="ord-1", op="update", hlc=1 << 16,
                       prior=None, values={"id": "ord-1", "status": "new"}, writer="a/w0")


def test_plain_sql_statements_are_what_a_service_would_send() -> None:
    assert _plain_statement("orders", "insert", "id", ("customer", "status")) == \
        'INSERT INTO public."orders" ("id", "customer", "status") VALUES (%s, %s, %s)'
    assert _plain_statement("orders", "update", "id", ("status", "note")) == \
        'UPDATE public."orders" SET "status" = %s, "note" = %s WHERE "id" = %s'
    # a counter is incremented where it stands, so capture records the client's delta
    assert _plain_statement("inventory", "update", "sku", (), ("stock",)) == \
        'UPDATE public."inventory" SET "stock" = "stock" + %s WHERE "sku" = %s'
    assert _plain_statement("orders", "delete", "id", ()) == 'DELETE FROM public."orders" WHERE "id" = %s'
    assert _plain_statement("odd", "delete", 'k"y', ()) == 'DELETE FROM public."odd" WHERE "k""y" = %s'
