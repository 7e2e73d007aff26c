"""Human output of ``reconciler diff`` (pure: renders a DiffResult)."""

from __future__ import annotations

from reconciler.cli_diff import render
from reconciler.diff import parse_key_columns
from reconciler.merkle import DifferenceKind, DiffResult, KeyDifference


def result(*differences: KeyDifference, truncated: bool = False) -> DiffResult:
    return DiffResult(
        table="public.orders",
        key_columns=("id",),
        rows_a=3,
        rows_b=3,
        buckets_compared=1024,
        buckets_differing=len(differences),
        differences=differences,
        seconds=0.25,
        truncated=truncated,
    )


def test_equal_tables_say_so() -> None:
    text = render(result(), "a-dsn", "b-dsn")
    assert "tables are equal" in text
    assert "public.orders" in text and "a-dsn" in text


def test_changed_rows_show_only_the_differing_columns() -> None:
    changed = KeyDifference(
        ("7",), DifferenceKind.CHANGED, {"id": "7", "note": None, "qty": "1"}, {"id": "7", "note": "", "qty": "1"}
    )
    gone = KeyDifference(("9",), DifferenceKind.ONLY_IN_A, {"id": "9", "note": "x" * 100, "qty": "2"}, None)
    text = render(result(changed, gone), "a", "b")
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("KIND"))
    body = lines[header + 1 :]
    assert body[0].split() == ["changed", "id=7", "note", "NULL", "''"]  # NULL and empty string told apart
    assert "qty" not in body[0]
    assert body[1].startswith("only_in_a") and body[1].rstrip().endswith("-")
    assert "…" in body[1]  # long values are clipped


def test_truncated_results_are_flagged() -> None:
    d = KeyDifference(("1",), DifferenceKind.ONLY_IN_B, None, {"id": "1"})
    assert "more keys differ" in render(result(d, truncated=True), "a", "b")


def test_key_columns_from_repeats_and_commas() -> None:
    assert parse_key_columns(["tenant,seq", "seq", " region "]) == ("tenant", "seq", "region")
    assert parse_key_columns([","]) == ()
