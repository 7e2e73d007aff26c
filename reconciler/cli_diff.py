"""``reconciler diff``: which rows of a table differ between databases.

Two forms, one command:

- ``--config F --table T [--region a,b,...]``: a replicated table between the
  regions of a config, through the maintained Merkle leaves (a full scan where the
  leaves cannot answer, or with ``--full-scan``). The first listed region is
  compared with each other one.
- ``--dsn-a URL --dsn-b URL --table T --key COL``: any table of any two databases.
  With nothing of ours installed this is a full scan; where both databases carry
  our schema and maintained leaves for the table, the leaves answer (as DESIGN.md
  promises), and ``--full-scan`` hashes every row instead, trusting nothing of ours.

Thin by design: parse options, call :mod:`reconciler.diff`, render. Exit status is
the contract scripts rely on: 0 equal, 1 differences, 2 error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from . import redact
from .cli_options import regions_option
from .config import Config, TableConfig, load_config
from .diff import ScanOptions, diff_regions, diff_replicated, diff_tables, parse_key_columns
from .errors import ConfigError, ReconcilerError
from .merkle import DifferenceKind, DiffResult, KeyDifference, WalkLimits
from .store.dsn import redact_dsn, secret_forms

EXIT_EQUAL = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2

#: differences listed in human output; --json always carries all that were found
SHOWN = 50
WIDTH = 40
DEFAULT_CONFIG = ".dev/reconciler.yaml"

#: options that belong to one form only, by parameter name (--full-scan is accepted
#: by both)
_AD_HOC_ONLY = ("dsn_a", "dsn_b", "keys", "schema")
_CONFIG_ONLY = ("config_path", "regions")


@click.command("diff")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"YAML config: compare TABLE between its regions (env RECONCILER_CONFIG, else {DEFAULT_CONFIG}).",
)
@regions_option("Regions, repeated or comma-separated; the first is compared with each other one"
                " (default: every region in the config, in config order).")
@click.option("--full-scan", is_flag=True, help="Hash every row instead of reading the maintained leaves.")
@click.option("--dsn-a", default=None, envvar="RECONCILER_DSN_A", help="Ad hoc: database A (libpq URL or key=value).")
@click.option("--dsn-b", default=None, envvar="RECONCILER_DSN_B", help="Ad hoc: database B.")
@click.option("--table", required=True, help="Table (or, ad hoc, view) name, unqualified.")
@click.option(
    "--key",
    "keys",
    multiple=True,
    help="Ad hoc: key column; repeat it or separate with commas for a composite key.",
)
@click.option("--schema", default=None, help="Ad hoc: schema of the table on both sides  [default: public]")
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
    help="Full scan: connections per database; more split each pass into block ranges (PostgreSQL 14+).",
)
@click.pass_context
def diff(
    ctx: click.Context,
    config_path: str | None,
    regions: tuple[str, ...],
    full_scan: bool,
    dsn_a: str | None,
    dsn_b: str | None,
    table: str,
    keys: Sequence[str],
    schema: str | None,
    as_json: bool,
    max_differences: int,
    jobs: int,
) -> None:
    """Compare TABLE between regions (--config) or two databases (--dsn-a/--dsn-b).

    Rows are hashed and bucketed by key inside PostgreSQL; only differing buckets
    are narrowed down and only the differing keys' rows are fetched. With --config,
    replicated tables are compared through the Merkle leaves the triggers maintain,
    so a large table costs reading its leaves. Exit status: 0 equal, 1 different,
    2 error.
    """
    options = ScanOptions(limits=WalkLimits(max_differences=max_differences), jobs=jobs)
    ad_hoc = _ad_hoc(ctx, dsn_a, dsn_b, keys)
    # ad hoc DSNs bypass the config, where secrets are registered for masking
    redact.register(form for dsn in (dsn_a, dsn_b) if dsn for form in secret_forms(dsn))
    try:
        if ad_hoc:
            if not dsn_a or not dsn_b or not keys:
                raise ConfigError("the ad hoc form needs --dsn-a, --dsn-b and --key")
            key_columns = parse_key_columns(keys)
            if full_scan:
                result = diff_tables(dsn_a, dsn_b, table, key_columns, schema=schema or "public", options=options)
            else:
                # with our schema and leaves on both sides the leaves answer; on any other
                # table (no schema of ours) this is the full scan, and says why
                spec = TableConfig(name=table, key=key_columns, policy="lww", schema=schema or "public")
                result = diff_replicated(dsn_a, dsn_b, spec, options=options)
            results = [(redact_dsn(dsn_a), redact_dsn(dsn_b), result)]
        else:
            _refuse(ctx, _AD_HOC_ONLY, "--config (the config gives keys, schema and DSNs)")
            config = load_config(config_path or _default_config())
            results = [
                (a, b, diff_regions(config, table, a, b, options=options, full_scan=full_scan))
                for a, b in _pairs(config, regions)
            ]
    except ReconcilerError as exc:
        # the CLI's convention: one line on stderr, JSON when --json; stdout stays empty
        if as_json:
            click.echo(json.dumps(exc.to_dict(), sort_keys=True), err=True)
        else:
            click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        if ad_hoc:
            where_a, where_b, result = results[0]
            doc = {**result.to_dict(), "dsn_a": where_a, "dsn_b": where_b}
        else:
            doc = regions_document(table, results)
        click.echo(json.dumps(doc, sort_keys=True, default=str))
    else:
        click.echo("\n\n".join(render(r, a, b) for a, b, r in results))
    sys.exit(EXIT_EQUAL if all(r.equal for _, _, r in results) else EXIT_DIFFERENT)


def regions_document(table: str, results: Sequence[tuple[str, str, DiffResult]]) -> dict[str, Any]:
    """The --config form's one JSON document: every pair's result, and the verdict."""
    pairs = [{**r.to_dict(), "region_a": a, "region_b": b} for a, b, r in results]
    return {"table": table, "pairs": pairs, "equal": all(r.equal for _, _, r in results)}


def _ad_hoc(ctx: click.Context, dsn_a: str | None, dsn_b: str | None, keys: Sequence[str]) -> bool:
    """The ad hoc form unless --config/--regions say otherwise; DSNs
    that only come from the environment do not override an explicit --config."""
    if any(_given(ctx, name) for name in _CONFIG_ONLY):
        return False
    return bool(dsn_a or dsn_b or keys)


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def _refuse(ctx: click.Context, names: Sequence[str], form: str) -> None:
    flags = {p.name: p.opts[0] for p in ctx.command.params if isinstance(p, click.Option)}
    given = [flags[n] for n in names if _given(ctx, n)]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be combined with {form}")


def _default_config() -> str:
    import os  # noqa: PLC0415 - only the --config form reads the environment

    return os.environ.get("RECONCILER_CONFIG") or DEFAULT_CONFIG


def _pairs(config: Config, regions: Sequence[str]) -> list[tuple[str, str]]:
    names = list(regions) or list(config.regions)
    for name in names:
        config.region(name)  # an unknown region is a ConfigError naming the known ones
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"--region needs at least two distinct regions, got {','.join(names)}", file=config.path)
    return [(names[0], other) for other in names[1:]]


def render(result: DiffResult, where_a: str, where_b: str) -> str:
    """Human report: a summary line, then one line per differing column of each key."""
    lines = [
        f"{result.table}: a={where_a} ({result.rows_a:,} rows), b={where_b} ({result.rows_b:,} rows)",
        f"{result.buckets_compared:,} buckets compared over {result.levels} level(s),"
        f" {result.buckets_differing:,} differing; {len(result.differences):,}"
        f"{'+' if result.truncated else ''} differing keys in {result.seconds:.2f}s ({result.mode})",
    ]
    if result.extra.get("fallback_reason"):
        lines.append(f"full scan because: {result.extra['fallback_reason']}")
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
