"""``reconciler diff``: which rows of a table differ between two databases.

Thin by design: parse options, call :func:`reconciler.diff.diff_tables`, render.
Exit status is the contract scripts rely on: 0 equal, 1 differences, 2 error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from .diff import ScanOptions, diff_tables, parse_key_columns
from .errors import ReconcilerError
from .merkle import DifferenceKind, DiffResult, KeyDifference, WalkLimits
from .store.dsn import redact_dsn

EXIT_EQUAL = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2

#: differences listed in human output; --json always carries all that were found
SHOWN = 50
WIDTH = 40


@click.command("diff")
@click.option("--dsn-a", required=True, envvar="RECONCILER_DSN_A", help="Database A (libpq URL or key=value).")
@click.option("--dsn-b", required=True, envvar="RECONCILER_DSN_B", help="Database B.")
@click.option("--table", required=True, help="Table (or view) name, unqualified.")
@click.option(
    "--key",
    "keys",
    required=True,
    multiple=True,
    help="Key column; repeat it or separate with commas for a composite key.",
)
@click.option("--schema", default="public", show_default=True, help="Schema of the table on both sides.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
@click.option(
    "--max-differences",
    type=click.IntRange(min=1),
    default=WalkLimits().max_differences,
    show_default=True,
    help="Stop after this many differing keys (the result says it was truncated).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Connections per database; more split each pass into block ranges scanned at once (PostgreSQL 14+).",
)
def diff(
    dsn_a: str,
    dsn_b: str,
    table: str,
    keys: Sequence[str],
    schema: str,
    as_json: bool,
    max_differences: int,
    jobs: int,
) -> None:
    """Compare TABLE on two databases with Merkle trees computed inside PostgreSQL.

    Works on any table, with nothing of ours installed: rows are hashed and bucketed
    by key on each server, only differing buckets are narrowed down, and only the
    differing keys' rows are fetched. Exit status: 0 equal, 1 different, 2 error.
    """
    try:
        result = diff_tables(
            dsn_a,
            dsn_b,
            table,
            parse_key_columns(keys),
            schema=schema,
            options=ScanOptions(limits=WalkLimits(max_differences=max_differences), jobs=jobs),
        )
    except ReconcilerError as exc:
        # the CLI's convention: one line on stderr, JSON when --json; stdout stays empty
        if as_json:
            click.echo(json.dumps(exc.to_dict(), sort_keys=True), err=True)
        else:
            click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        doc = result.to_dict()
        doc["dsn_a"], doc["dsn_b"] = redact_dsn(dsn_a), redact_dsn(dsn_b)
        click.echo(json.dumps(doc, sort_keys=True, default=str))
    else:
        click.echo(render(result, redact_dsn(dsn_a), redact_dsn(dsn_b)))
    sys.exit(EXIT_EQUAL if result.equal else EXIT_DIFFERENT)


def render(result: DiffResult, where_a: str, where_b: str) -> str:
    """Human report: a summary line, then one line per differing column of each key."""
    lines = [
        f"{result.table}: a={where_a} ({result.rows_a:,} rows), b={where_b} ({result.rows_b:,} rows)",
        f"{result.buckets_compared:,} buckets compared over {result.levels} level(s),"
        f" {result.buckets_differing:,} differing; {len(result.differences):,}"
        f"{'+' if result.truncated else ''} differing keys in {result.seconds:.2f}s",
    ]
    if result.columns_only_in_a or result.columns_only_in_b:
        lines.append(
            "columns not compared: only in a: "
            f"{', '.join(result.columns_only_in_a) or '-'}; only in b: {', '.join(result.columns_only_in_b) or '-'}"
        )
    if result.equal:
        lines.append("tables are equal")
        return "\n".join(lines)
    if not result.differences:
        return "\n".join(lines)
    table: list[tuple[str, str, str, str, str]] = [("KIND", "KEY", "COLUMN", "A", "B")]
    for d in result.differences[:SHOWN]:
        table.extend(_rows_of(d, result.key_columns))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines.append("")
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)
    hidden = len(result.differences) - SHOWN
    if hidden > 0:
        lines.append(f"... and {hidden:,} more (use --json for all)")
    if result.truncated:
        lines.append("search stopped at --max-differences; more keys differ")
    return "\n".join(lines)


def _rows_of(d: KeyDifference, key_columns: Sequence[str]) -> list[tuple[str, str, str, str, str]]:
    key = ", ".join(f"{c}={_show(v)}" for c, v in zip(key_columns, d.key, strict=True))
    if d.kind is DifferenceKind.CHANGED and d.row_a is not None and d.row_b is not None:
        cols = d.changed_columns() or ["(row)"]
        return [
            (d.kind.value if i == 0 else "", key if i == 0 else "", c, _show(d.row_a.get(c)), _show(d.row_b.get(c)))
            for i, c in enumerate(cols)
        ]
    row = d.row_a if d.row_a is not None else d.row_b
    text = _clip(", ".join(f"{c}={_show(v)}" for c, v in (row or {}).items())) if row else "?"
    a, b = (text, "-") if d.kind is DifferenceKind.ONLY_IN_A else ("-", text)
    return [(d.kind.value, key, "(row)", a, b)]


def _show(value: str | None) -> str:
    return "NULL" if value is None else _clip(repr(value) if value == "" or value != value.strip() else value)


def _clip(text: str) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= WIDTH else flat[: WIDTH - 1] + "…"
