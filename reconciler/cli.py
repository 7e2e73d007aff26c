"""The operator CLI: parse, load config, call a service, map errors to exit codes.

Exit codes: 0 success; 1 the command worked and found something an operator must
act on (differences, gaps, data loss); 2 an error (bad config, unreachable
service, refused operation, a declined confirmation), printed as one line on
stderr (JSON with --json). Every command that changes state asks first unless
--yes, and takes --json. Every option can also come from the environment:
RECONCILER_<COMMAND>_<OPTION> (click's prefix), plus RECONCILER_CONFIG.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__
from .cli_diff import diff
from .cli_options import EXIT_ERROR, EXIT_FOUND, EXIT_OK, LOG_FORMATS, LOG_LEVELS, confirm, regions_option, yes_option
from .config import Config, load_config
from .devstack.cli import dev
from .drills.cli import drill
from .errors import ReconcilerError
from .redact import guard_standard_streams

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["EXIT_ERROR", "EXIT_FOUND", "EXIT_OK", "main"]


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


def handle_errors(func: F) -> F:
    """Map ReconcilerError to a one-line message and exit code 2 (JSON with --json)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ReconcilerError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps(exc.to_dict(), sort_keys=True), err=True)
            else:
                click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=".dev/reconciler.yaml", show_default=True,
    envvar="RECONCILER_CONFIG", help="YAML config (env RECONCILER_CONFIG).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def load(config_path: str) -> Config:
    return load_config(config_path)


class _Main(click.Group):
    """Keeps an interrupted command inside the exit-code rule (2, not click's 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("\nerror: interrupted", err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=_Main, context_settings={"auto_envvar_prefix": "RECONCILER"})
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """reconciler: multi-region disaster-recovery reconciliation for PostgreSQL + Kafka."""
    # whatever any command (or a traceback) prints is scrubbed of the config's secrets
    guard_standard_streams()


main.add_command(dev)
main.add_command(diff)
main.add_command(drill)


@main.command()
@config_option
@regions_option("Only these regions (default: every region in config).")
@click.option("--demo-tables", is_flag=True, help="Also create the checkout demo tables (orders, inventory, payments).")
@click.option("--rebuild-leaves", is_flag=True,
              help="Count the Merkle leaves again from the rows (every replicated table, or --table): after writes"
                   " the leaf triggers could not see. Locks each table against writes while it is counted.")
@click.option("--table", "tables", multiple=True, help="With --rebuild-leaves: only these tables.")
@click.option("--uninstall-capture", is_flag=True,
              help="Remove the write-capture triggers from every replicated table (services must then write"
                   " their outbox rows themselves). Locks each table against writes while its triggers go.")
@yes_option
@json_option
@handle_errors
def migrate(config_path: str, regions: tuple[str, ...], demo_tables: bool, rebuild_leaves: bool,
            tables: tuple[str, ...], uninstall_capture: bool, yes: bool, as_json: bool) -> None:
    """Apply schema migrations in each region's database and create the Kafka topics.

    Plain migrate only adds what is missing and asks nothing; --rebuild-leaves and
    --uninstall-capture lock tables, so they ask first unless --yes.
    """
    from .provision import migrate as run_migrate

    if tables and not rebuild_leaves:
        raise click.UsageError("--table goes with --rebuild-leaves")
    config = load(config_path)
    rebuild = (list(tables) or list(config.tables)) if rebuild_leaves else []
    for name in regions:
        config.region(name)  # a typo is an error before any work (or question), not after
    for table in tables:
        config.table(table)
    if rebuild or uninstall_capture:
        what = ([f"rebuild the Merkle leaves of {', '.join(rebuild)}"] if rebuild else []) + (
            ["remove the capture triggers of every replicated table"] if uninstall_capture else [])
        confirm(f"In {', '.join(regions or config.regions)}: {' and '.join(what)}, locking each table against"
                " writes meanwhile?", yes, as_json)
    report = run_migrate(config, list(regions) or None, demo_tables=demo_tables, rebuild_leaves=rebuild,
                         uninstall_capture_all=uninstall_capture)
    if as_json:
        print_json(report.to_dict())
        return
    for region, names in report.applied.items():
        done = ", ".join(names) if names else "nothing to apply"
        click.echo(f"{region}: schema version {report.schema_versions[region]} ({done})")
        for leaf in report.leaves_rebuilt.get(region, []):
            if leaf["action"] == "skipped":
                click.echo(f"{region}: leaves of {leaf['table']} not rebuilt: {leaf['reason']}")
            else:
                click.echo(f"{region}: leaves of {leaf['table']} counted again from {leaf['rows']:,} rows"
                           f" in {leaf['seconds']:.1f}s")
        for cap in report.capture.get(region, []):
            triggers = cap["triggers"]
            assert isinstance(triggers, list)
            if cap["action"] == "installed":
                click.echo(f"{region}: capture on {cap['table']}: triggers {', '.join(triggers)}"
                           f" ({cap['rows_registered']:,} existing rows registered; held {cap['lock']}"
                           f" for {cap['seconds']:.2f}s)")
            elif cap["action"] == "skipped":
                click.echo(f"{region}: capture on {cap['table']} not installed: {cap['reason']}")
            elif cap["action"] == "removed":
                click.echo(f"{region}: capture removed from {cap['table']} (held {cap['lock']})")
    if report.topics_created:
        click.echo(f"topics created: {', '.join(report.topics_created)}")


@main.command()
@config_option
@click.option("--region", required=True, help="The region this sidecar serves.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              show_default=True, envvar="RECONCILER_LOG_LEVEL", help="env RECONCILER_LOG_LEVEL.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="json", show_default=True,
              envvar="RECONCILER_LOG_FORMAT",
              help="json: one object a line, tracebacks in a field; text: for a terminal (env RECONCILER_LOG_FORMAT).")
@handle_errors
def run(config_path: str, region: str, log_level: str, log_format: str) -> None:
    """Run the sidecar: relay, inbox consumer, lifecycle, /metrics /healthz /readyz."""
    from .logs import configure
    from .sidecar import Sidecar

    configure(log_level.upper(), fmt=log_format)
    sys.exit(Sidecar(load(config_path), region).run())


@main.command()
@config_option
@json_option
@handle_errors
def status(config_path: str, as_json: bool) -> None:
    """Every region on one screen: state, heartbeats, backlog, lag, gaps, queues, skew.

    A region whose database is unreachable is shown DOWN, not an error. Exit 0 when
    every region is reachable, ACTIVE and seen alive by its peers; 1 otherwise.
    """
    from .status import collect_status, render

    report = collect_status(load(config_path))
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(render(report), nl=False)
    sys.exit(EXIT_OK if report.ok else EXIT_FOUND)


@main.group("config")
def config_group() -> None:
    """The config file: check it before a sidecar or a deploy reads it."""


@config_group.command("validate")
@config_option
@json_option
@handle_errors
def config_validate(config_path: str, as_json: bool) -> None:
    """Load the config with every check the sidecar makes (DSNs parsed, tables, regions).

    Connects to nothing. Exit 0 when valid, 2 with the error (region and key, never a
    secret) otherwise.
    """
    config = load(config_path)
    if as_json:
        print_json({"config": str(config.path), "valid": True, "regions": list(config.regions),
                    "tables": list(config.tables)})
        return
    click.echo(f"{config.path}: OK ({len(config.regions)} regions: {', '.join(config.regions)};"
               f" {len(config.tables)} tables: {', '.join(config.tables)})")


# ---------------------------------------------------------------- conflicts, quarantine

region_option = click.option(
    "--region", default=None, help="Region whose database to use (default: the first region in the config)."
)


def _region_store(config: Config, region: str | None) -> tuple[str, Any]:
    """The chosen region (default: the config's first) and its region store."""
    from .store.postgres_store import RegionDatabases

    name = region or next(iter(config.regions))
    return name, RegionDatabases(config).open(name)


def _age(seconds: float) -> str:
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _wall(version: Any) -> str:
    """An HLC's wall part as UTC time: what an operator lines up with other logs."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(version.hlc.wall_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


@main.group()
def conflicts() -> None:
    """The conflict queue: what the policies decided, and what waits for an operator."""


@conflicts.command("list")
@config_option
@region_option
@click.option("--table", default=None, help="Only this table.")
@click.option(
    "--status", type=click.Choice(("open", "resolved", "auto", "all")), default="open", show_default=True,
    help="open: the manual queue; auto: decided by lww/merge (audit trail); resolved: decided by an operator.",
)
@json_option
@handle_errors
def conflicts_list(config_path: str, region: str | None, table: str | None, status: str, as_json: bool) -> None:
    """List the conflicts recorded in one region, oldest first."""
    from datetime import UTC, datetime

    from .conflict_queue import list_conflicts

    config = load(config_path)
    if table is not None:
        config.table(table)  # an unknown table is a typo, not an empty queue
    name, conn = _region_store(config, region)
    with conn:
        found = list_conflicts(conn, table=table, status=status)
    now = datetime.now(UTC)
    if as_json:
        print_json({"region": name, "table": table, "status": status, "count": len(found),
                    "conflicts": [c.to_dict(now) for c in found]})
        return
    label = "" if status == "all" else f"{status} "
    if not found:
        click.echo(f"region {name}: no {label}conflicts")
        return
    click.echo(f"region {name}: {len(found)} {label}conflict{'s' if len(found) != 1 else ''}")
    _table(
        ("ID", "TABLE", "KEY", "KIND", "POLICY", "STATUS", "OUTCOME", "AGE"),
        [(c.conflict_id, c.table, c.key, c.kind, c.policy, c.status, c.outcome, _age(c.age_seconds(now)))
         for c in found],
    )


@conflicts.command("show")
@config_option
@region_option
@click.argument("conflict_id")
@json_option
@handle_errors
def conflicts_show(config_path: str, region: str | None, conflict_id: str, as_json: bool) -> None:
    """Show one conflict: both versions side by side, and its resolution if any."""
    from datetime import UTC, datetime

    from .conflict_queue import show_conflict

    config = load(config_path)
    name, conn = _region_store(config, region)
    with conn:
        entry = show_conflict(conn, conflict_id)
    now = datetime.now(UTC)
    if as_json:
        print_json({"region": name, **entry.to_dict(now)})
        return
    click.echo(f"conflict {entry.conflict_id} (region {name})")
    click.echo(f"  table {entry.table}, key {entry.key}, kind {entry.kind}, policy {entry.policy}")
    status = entry.status if entry.outcome == entry.status else f"{entry.status} ({entry.outcome})"
    click.echo(f"  status {status}, detected {entry.detected_at.isoformat(timespec='seconds')}"
               f" ({_age(entry.age_seconds(now))} ago), event {entry.event_id or '-'}")
    click.echo("")
    local, remote = entry.local, entry.remote

    def side(version: Any, column: str) -> str:
        if not version.origin:
            return "(no row)"
        if version.deleted or version.values is None:
            return "(deleted)"
        return _cell(version.values.get(column))

    columns = sorted({*(local.values or {}), *(remote.values or {})})
    rows: list[tuple[str, ...]] = [
        ("origin", local.origin or "-", remote.origin or "-", ""),
        ("hlc", str(local.hlc) if local.origin else "-", str(remote.hlc), ""),
        ("written", _wall(local) if local.origin else "-", _wall(remote), ""),
    ]
    for column in columns:
        a, b = side(local, column), side(remote, column)
        rows.append((column, a, b, "*" if a != b else ""))
    if not columns:
        rows.append(("row", side(local, ""), side(remote, ""), ""))
    _table(("", "LOCAL (held here)", "REMOTE (arriving event)", "DIFFERS"), rows)
    click.echo("")
    if entry.resolution is not None:
        res = entry.resolution
        at = res.at.isoformat(timespec="seconds") if res.at else "?"
        chosen = "delete the row" if res.values is None else _cell(res.values)
        click.echo(f"resolved by {res.by} at {at}: {res.reason}")
        click.echo(f"  chosen: {chosen}")
        click.echo(f"  event {res.event_id or '-'}")
    elif entry.status == "open":
        origins = ", ".join(v.origin for v in entry.versions())
        click.echo(f"open: decide with `reconciler conflicts resolve {entry.conflict_id} --take REGION`"
                   f" ({origins}) or --value JSON, plus --by NAME --reason TEXT")
    else:
        click.echo(f"decided automatically by policy {entry.policy} ({entry.outcome}); nothing to resolve")


@conflicts.command("resolve")
@config_option
@region_option
@click.argument("conflict_id")
@click.option("--take", "take_region", default=None, metavar="REGION", help="Keep the version written in REGION.")
@click.option("--value", default=None, metavar="JSON",
              help="Keep this row: a JSON object with every column (key included), or null to delete the row.")
@click.option("--by", required=True, help="Who decides (kept in the audit trail).")
@click.option("--reason", required=True, help="Why (kept in the audit trail): a ticket, the system of record.")
@yes_option
@json_option
@handle_errors
def conflicts_resolve(
    config_path: str, region: str | None, conflict_id: str, take_region: str | None, value: str | None, by: str,
    reason: str, yes: bool, as_json: bool,
) -> None:
    """Decide a parked conflict, once, from any region; the decision replicates to every region."""
    from .conflict_queue import resolve_conflict

    config = load(config_path)
    if take_region is not None:
        config.region(take_region)  # a mistyped region is a clearer error here than "neither version"
    chosen = f"{take_region}'s version" if take_region else f"the value {value}"
    confirm(f"Resolve conflict {conflict_id} with {chosen}, replicated to every region?", yes, as_json)
    name, conn = _region_store(config, region)
    with conn:
        event = resolve_conflict(conn, conflict_id, take_region=take_region, value=value, by=by, reason=reason)
    values = event.payload.get("values")
    if as_json:
        print_json({"region": name, "conflict_id": conflict_id, "event_id": event.event_id, "hlc": str(event.hlc),
                    "table": event.table, "key": event.key, "values": values, "by": by, "reason": reason})
        return
    chosen = f"{take_region}'s version" if take_region else "the given value"
    click.echo(f"resolved {conflict_id} in {name}: {event.table} {event.key} <- {chosen}"
               f" {'(row deleted)' if values is None else _cell(values)}")
    click.echo(f"  event {event.event_id} at hlc {event.hlc}; the relay ships it to {', '.join(config.peers(name))}")


@main.group()
def quarantine() -> None:
    """Events a region set aside instead of applying, with the reason; settle them.

    An entry stays refused -- missing for `gaps`, the metrics and the lifecycle gate --
    until it is settled: applied (`retry`, or automatically for a held future stamp)
    or given up (`discard`, with a reason). Every settlement is audited.
    """


@quarantine.command("list")
@config_option
@region_option
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Newest entries shown.")
@click.option("--status", type=click.Choice(["open", "refused", "settled", "all"]), default="all",
              show_default=True, help="refused: open and still missing; open: not settled; settled: applied or"
              " discarded.")
@json_option
@handle_errors
def quarantine_list(config_path: str, region: str | None, limit: int, status: str, as_json: bool) -> None:
    """List one region's quarantined events, newest first."""
    from .conflict_queue import list_quarantine

    config = load(config_path)
    name, conn = _region_store(config, region)
    with conn:
        found = list_quarantine(conn, limit, status)
    if as_json:
        print_json({"region": name, "count": len(found), "entries": [q.to_dict() for q in found]})
        return
    if not found:
        click.echo(f"region {name}: quarantine is empty" if status == "all"
                   else f"region {name}: no {status} quarantine entries")
        return
    click.echo(f"region {name}: {len(found)} quarantined event{'s' if len(found) != 1 else ''} (newest first)")
    _table(
        ("ID", "RECEIVED", "STATUS", "ORIGIN", "SEQ", "EVENT", "REASON", "DETAIL"),
        [(str(q.id), q.received_at.isoformat(timespec="seconds"), q.status, q.origin or "-",
          str(q.sequence) if q.sequence is not None else "-", q.event_id or "-", q.reason,
          q.detail if len(q.detail) <= 60 else q.detail[:59] + "…") for q in found],
    )


@quarantine.command("show")
@config_option
@region_option
@click.argument("entry_id", type=int)
@json_option
@handle_errors
def quarantine_show(config_path: str, region: str | None, entry_id: int, as_json: bool) -> None:
    """One quarantined event: why, where from, the raw message, and its audit trail."""
    from .conflict_queue import show_quarantined

    config = load(config_path)
    name, conn = _region_store(config, region)
    with conn:
        entry, trail = show_quarantined(conn, entry_id)
    if as_json:
        print_json({"region": name, **entry.to_dict(), "audit": trail})
        return
    doc = entry.to_dict()
    click.echo(f"quarantine entry {entry.id} in region {name}: {entry.status}")
    for label in ("reason", "detail", "origin", "sequence", "event_id", "hlc", "topic", "partition", "offset",
                  "received_at", "raw_preview"):
        click.echo(f"  {label:<12} {doc[label] if doc[label] is not None else '-'}")
    for step in trail:
        click.echo(f"  {step['at']}  {step['action']} by {step['actor']}: {step['outcome']} ({step['reason']})")
    if not entry.settlement:
        click.echo(f"settle with `reconciler quarantine retry {entry.id} --by NAME` (once the cause is fixed) or"
                   f" `reconciler quarantine discard {entry.id} --by NAME --reason TEXT`")


@quarantine.command("retry")
@config_option
@region_option
@click.argument("entry_ids", type=int, nargs=-1, required=True)
@click.option("--by", default=None, help="Who retries (audit trail; default: the operator's user name).")
@yes_option
@json_option
@handle_errors
def quarantine_retry(config_path: str, region: str | None, entry_ids: tuple[int, ...], by: str | None,
                     yes: bool, as_json: bool) -> None:
    """Apply quarantined events again through the normal apply path.

    For after the cause was fixed (a column's type, a constraint, a clock). Applied
    entries are settled; an entry refused again stays open with the new reason.
    Exit 1 when any entry is still refused.
    """
    from .apply import Applier
    from .conflict_queue import retry_quarantined
    from .store.postgres_store import RegionDatabases

    config = load(config_path)
    name = region or next(iter(config.regions))
    actor = by or f"cli:{_operator()}"
    confirm(f"Apply {len(entry_ids)} quarantined event(s) in region {name} again?", yes, as_json)
    with RegionDatabases(config).session(name, autocommit=True) as store:
        applier = Applier(store, name, config.tables, config.hlc_max_offset_ms)
        outcomes = [retry_quarantined(store, applier, entry_id, by=actor) for entry_id in entry_ids]
    if as_json:
        print_json({"region": name, "actor": actor, "results": [o.to_dict() for o in outcomes]})
    else:
        for o in outcomes:
            click.echo(f"entry {o.id}: " + ("applied and settled" if o.outcome == "applied"
                                            else f"still refused ({o.reason}): {o.detail}"))
    if any(o.outcome != "applied" for o in outcomes):
        sys.exit(EXIT_FOUND)


@quarantine.command("discard")
@config_option
@region_option
@click.argument("entry_ids", type=int, nargs=-1, required=True)
@click.option("--reason", required=True, help="Why the event is given up (audit trail).")
@click.option("--by", default=None, help="Who discards (audit trail; default: the operator's user name).")
@yes_option
@json_option
@handle_errors
def quarantine_discard(config_path: str, region: str | None, entry_ids: tuple[int, ...], reason: str,
                       by: str | None, yes: bool, as_json: bool) -> None:
    """Settle quarantined events without applying them: `gaps` and the gate stop
    counting them; the entries, their raw messages and the audit trail are kept."""
    from .conflict_queue import discard_quarantined

    config = load(config_path)
    name, conn = _region_store(config, region)
    actor = by or f"cli:{_operator()}"
    confirm(f"Give up {len(entry_ids)} quarantined event(s) in region {name} for good? Reason: {reason}", yes,
            as_json)
    with conn:
        settled = [discard_quarantined(conn, entry_id, by=actor, reason=reason) for entry_id in entry_ids]
    if as_json:
        print_json({"region": name, "actor": actor, "entries": [e.to_dict() for e in settled]})
        return
    for entry in settled:
        click.echo(f"entry {entry.id}: discarded by {actor} ({reason}); kept in reconciler.quarantine")


# ---------------------------------------------------------------- recovery and lifecycle


@main.command()
@config_option
@click.option("--region", default=None, help="Only gaps whose destination is this region.")
@json_option
@handle_errors
def gaps(config_path: str, region: str | None, as_json: bool) -> None:
    """Missing event ranges per (origin, destination) and where to replay them from,
    and the events each region refused (quarantined, held) and has not settled.

    Exit 1 when events are lost (no source holds them any more) or refused, or when
    a region is unreachable (the answer is then incomplete).
    """
    from .recovery import analyze_gaps

    report = analyze_gaps(load(config_path), region)
    doc = report.to_dict()
    if region is not None:
        doc["refused"] = {r: v for r, v in doc["refused"].items() if r == region}
        doc["total_refused"] = sum(len(v) for v in doc["refused"].values())
    if as_json:
        print_json(doc)
    else:
        _print_gaps(doc)
    unreachable = any(not facts["reachable"] for facts in doc["regions"].values())
    if report.lost_events or doc["total_refused"] or unreachable:
        sys.exit(EXIT_FOUND)


def _print_gaps(doc: dict[str, Any]) -> None:
    for name, facts in doc["regions"].items():
        if not facts["reachable"]:
            click.echo(f"region {name}: UNREACHABLE ({facts['error']})")
    _print_refused(doc.get("refused", {}))
    if not doc["gaps"]:
        click.echo("no gaps: every reachable region has applied every event"
                   + (" it has not refused" if doc.get("refused") else ""))
        return
    click.echo(f"{doc['total_missing']} events missing, {doc['lost_events']} lost")
    for gap in doc["gaps"]:
        label = " (stale backup: the origin lost its own events)" if gap["stale_backup"] else ""
        click.echo(f"{gap['origin']} -> {gap['destination']}: {gap['count']} missing, "
                   f"HLC {gap['hlc_min']} .. {gap['hlc_max']}{label}")
        refused = [e["sequence"] for e in doc.get("refused", {}).get(gap["destination"], [])
                   if e["origin"] == gap["origin"] and e["sequence"] is not None]
        for part in gap["parts"]:
            where = part["source"] + (f" ({part['holder']})" if part["holder"] else "")
            marker = "  !! DATA LOSS" if part["source"] == "nowhere" else ""
            held_back = sum(1 for seq in refused if part["lo"] <= seq <= part["hi"])
            if held_back:
                marker += f"  ({held_back} REFUSED here: not replayed until settled)"
            click.echo(f"    seq {part['lo']}..{part['hi']}  {part['count']:>8}  from {where}{marker}")


@main.command()
@config_option
@click.option("--region", required=True, help="The new or emptied region to fill.")
@click.option("--from", "source", required=True, help="The live (ACTIVE) region to copy.")
@click.option("--no-recover", is_flag=True, help="Only copy; leave the region CATCHING_UP for a later `recover`.")
@click.option("--numbering-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the source's relay to number the events of the snapshot.")
@yes_option
@json_option
@handle_errors
def seed(config_path: str, region: str, source: str, no_recover: bool, numbering_timeout: float, yes: bool,
         as_json: bool) -> None:
    """Fill an empty region from a live one while writers go on: one snapshot of the
    source's rows, metadata and applied events, copied in one transaction; then
    `recover` catches up what was written since and gates the region to ACTIVE only
    once its Merkle roots match every peer's. Exit 1 when that gate did not pass."""
    from .seed import seed as run_seed

    config = load(config_path)
    config.region(region), config.region(source)
    confirm(f"Seed region {region} from {source} (the region must be empty), then recover it?", yes, as_json)

    def progress(message: str) -> None:
        if not as_json:
            click.echo(message, err=True)

    report = run_seed(config, region, source, actor=f"cli:{_operator()}", then_recover=not no_recover,
                      numbering_timeout=numbering_timeout, progress=progress)
    doc = report.to_dict()
    if as_json:
        print_json(doc)
    else:
        rows = ", ".join(f"{t} {n}" for t, n in sorted(report.rows.items()))
        events = ", ".join(f"{o} {n}" for o, n in sorted(report.events.items())) or "none"
        click.echo(f"region {region}: seeded from {source} in {report.copy_seconds:.2f}s: rows {rows}; "
                   f"events recorded as applied: {events} ({report.numbered_after_snapshot} numbered after the "
                   "snapshot)")
        if doc["recovery"] is not None:
            _print_recovery(doc["recovery"])
        else:
            click.echo(f"region {region}: CATCHING_UP; run `reconciler recover --region {region}` to catch up "
                       "and verify it")
    if report.recovery is not None and (report.recovery.gate is None or not report.recovery.gate.passed):
        sys.exit(EXIT_FOUND)


@main.command()
@config_option
@click.option("--region", required=True, help="The region to bring back.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing (asks nothing).")
@yes_option
@json_option
@handle_errors
def recover(config_path: str, region: str, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Fence, replay what the region misses, verify with Merkle trees, repair, gate to ACTIVE.

    Resumable: a re-run after any interruption continues where the last batch
    committed. Exit 1 when the gate did not pass (the report says why).
    """
    from .recovery import Progress
    from .recovery import recover as run_recover

    config = load(config_path)
    config.region(region)
    if not dry_run:
        confirm(f"Recover region {region}: fence it, replay, repair and gate it back to ACTIVE?", yes, as_json)
    bar: dict[str, Any] = {}

    def progress(p: Progress) -> None:
        if as_json or not sys.stderr.isatty() and p.phase == "replay" and p.done not in (0, p.total):
            return
        if p.phase == "replay" and p.total:
            width = 30
            filled = width * p.done // p.total
            click.echo(f"\rreplay [{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total}", nl=False, err=True)
            bar["open"] = p.done < p.total
            if p.done >= p.total:
                click.echo("", err=True)
        else:
            click.echo(f"{p.phase}: {p.detail}", err=True)

    report = run_recover(config, region, dry_run=dry_run, actor=f"cli:{_operator()}", progress=progress)
    doc = report.to_dict()
    if as_json:
        print_json(doc)
    else:
        _print_recovery(doc)
    if not dry_run and (report.gate is None or not report.gate.passed):
        sys.exit(EXIT_FOUND)
    if dry_run and report.lost_events:
        sys.exit(EXIT_FOUND)


@main.command()
@config_option
@click.option("--region", required=True, help="The region whose inbox and outbox are pruned.")
@click.option("--keep-hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Keep events younger than this (default: retention.keep_hours).")
@click.option("--dry-run", is_flag=True, help="Count what would go and delete nothing (asks nothing).")
@yes_option
@json_option
@handle_errors
def prune(config_path: str, region: str, keep_hours: float | None, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Delete relayed and applied events older than the retention window.

    Per origin only a gap-free prefix of the inbox goes (the region remembers it was
    applied, so a late duplicate is still recognised); from the outbox only events
    already published. The sidecar does this every retention.interval_seconds.
    """
    from .prune import prune_region

    config = load(config_path)
    config.region(region)
    if not dry_run:
        window = f"{keep_hours}h" if keep_hours is not None else "retention.keep_hours"
        confirm(f"Delete region {region}'s relayed and applied events older than {window}?", yes, as_json)
    result = prune_region(config, region, keep_hours=keep_hours, dry_run=dry_run)
    doc = {"region": region, "enabled": result is not None, **(result.to_dict() if result else {})}
    if as_json:
        print_json(doc)
        return
    if result is None:
        click.echo(f"region {region}: retention.keep_hours is null, events are kept forever (nothing pruned)")
        return
    verb = "would prune" if dry_run else "pruned"
    click.echo(f"region {region}: {verb} events stamped before {result.cutoff} "
               f"({_iso(result.cutoff.wall_ms)})")
    click.echo(f"  outbox: {result.outbox_rows} relayed events"
               + (f" (sequences up to {result.outbox_through})" if result.outbox_through else ""))
    click.echo(f"  inbox:  {result.inbox_rows} applied events")
    click.echo(f"  compensation outbox: {result.compensation_rows} published compensation events")
    for origin, (before, after) in sorted(result.inbox_floors.items()):
        click.echo(f"    from {origin}: everything up to sequence {after} applied (was {before})")


def _iso(wall_ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(wall_ms / 1000, UTC).isoformat(timespec="seconds")


def _print_refused(refused: dict[str, list[dict[str, Any]]]) -> None:
    for region, entries in sorted(refused.items()):
        click.echo(f"region {region}: {len(entries)} events REFUSED (missing until settled:"
                   " `reconciler quarantine list --status refused`)")
        for e in entries[:20]:
            seq = e["sequence"] if e["sequence"] is not None else "-"
            click.echo(f"    entry {e['id']}  {e['origin'] or '-'}:{seq}  event {e['event_id'] or '-'}"
                       f"  {e['reason']}: {e['detail'][:80]}")
        if len(entries) > 20:
            click.echo(f"    … {len(entries) - 20} more")


def _print_recovery(doc: dict[str, Any]) -> None:
    title = "recover plan (dry run, nothing changed)" if doc["dry_run"] else "recover"
    click.echo(f"{title}: region {doc['region']}, state {doc['state']} (epoch {doc['epoch']})")
    _print_gaps(doc["plan"])
    if doc["dry_run"]:
        return
    for key, count in sorted(doc["replayed"].items()):
        origin, source = key.split(":", 1)
        click.echo(f"replayed {count:>8} events of {origin} from {source}")
    if doc["own_events_returned"]:
        click.echo(f"returned {doc['own_events_returned']} of the region's own lost events")
    for table, keys in doc["repaired"].items():
        click.echo(f"repaired {table}: {len(keys)} keys ({', '.join(keys[:5])}{' …' if len(keys) > 5 else ''})")
    for table, keys in doc["parked"].items():
        click.echo(f"parked for an operator in {table}: {len(keys)} keys (excluded from the gate)")
    for table, keys in doc["divergent"].items():
        click.echo(f"STILL DIFFERENT in {table}: {', '.join(keys[:10])}")
    roots = doc.get("roots") or []
    if roots:
        equal = sum(1 for r in roots if r["equal"])
        click.echo(f"Merkle roots equal at the watermark for {equal} of {len(roots)} table/peer pairs")
    gate_doc = doc["gate"] or {}
    verdict = "passed" if gate_doc.get("passed") else "FAILED: " + "; ".join(gate_doc.get("reasons", []))
    click.echo(f"gate {verdict}")
    click.echo(f"transitions: {' -> '.join(doc['transitions'])}")
    click.echo(f"state {doc['state']} (epoch {doc['epoch']}) after {doc['seconds']:.1f}s")


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def _lifecycle_override(config_path: str, region: str, target: str, reason: str, yes: bool, force: bool,
                        as_json: bool) -> None:
    from .lifecycle import State
    from .store.postgres_store import RegionDatabases

    config = load(config_path)
    with RegionDatabases(config).session(region, autocommit=True) as store:
        before = store.region_status()
        confirm(f"Move region {region} from {before.state.value} (epoch {before.epoch}) to {target}? "
                f"Reason: {reason}", yes, as_json)
        after = store.transition(State(target), reason, f"cli:{_operator()}", force=force,
                                 expected_epoch=before.epoch)
    if as_json:
        print_json({"region": region, "from": before.state.value, "to": after.state.value,
                    "epoch_before": before.epoch, "epoch": after.epoch, "reason": reason})
        return
    click.echo(f"region {region}: {before.state.value} -> {after.state.value} (epoch {after.epoch}); "
               f"audited in reconciler.lifecycle_log")


@main.command("accept-loss")
@config_option
@click.option("--region", required=True, help="The region that misses the events.")
@click.option("--origin", default=None, help="Only the events of this origin (default: every peer's).")
@click.option("--reason", required=True, help="Why the loss is accepted, e.g. an incident id (audit trail).")
@click.option("--by", default=None, help="Who accepts (audit trail; default: the operator's user name).")
@click.option("--dry-run", is_flag=True, help="Show what is lost; record nothing.")
@yes_option
@json_option
@handle_errors
def accept_loss_command(config_path: str, region: str, origin: str | None, reason: str, by: str | None,
                        dry_run: bool, yes: bool, as_json: bool) -> None:
    """Settle events no source holds any more (Kafka expired them, the origin's outbox and
    every peer's inbox pruned them), so that gaps and the gate stop counting them;
    `recover` then repairs the rows from the peers and gates as usual. Each sequence is
    recorded in the region's quarantine (reason `lost`) with who and why. Refused while
    any region is unreachable. Exit 1 when the region's own events are lost too (not
    settled here: see the stale-backup runbook)."""
    from .losses import accept_loss

    config = load(config_path)
    actor = by or f"cli:{_operator()}"
    if not dry_run:
        preview = accept_loss(config, region, actor=actor, reason=reason, origin=origin, dry_run=True)
        if preview.count:
            confirm(f"Accept {preview.count} event(s) as lost for region {region} for good? Reason: {reason}", yes,
                    as_json)
    result = accept_loss(config, region, actor=actor, reason=reason, origin=origin, dry_run=dry_run)
    if as_json:
        print_json(result.to_dict())
    else:
        verb = "would accept" if dry_run else "accepted"
        if not result.lost:
            click.echo(f"region {region}: no event of a peer is lost" + (f" from {origin}" if origin else ""))
        for source, ranges in sorted(result.lost.items()):
            shown = ", ".join(f"{lo}..{hi}" if lo != hi else str(lo) for lo, hi in ranges)
            click.echo(f"region {region}: {verb} as lost from {source}: {shown}"
                       + ("" if dry_run else f" ({result.recorded.get(source, 0)} recorded now, by {actor})"))
        if result.own_lost:
            click.echo(f"region {region}: {result.own_lost} of its own events are lost too; not settled here "
                       "(runbooks/stale-backup-restore.md)")
    if result.own_lost:
        sys.exit(EXIT_FOUND)


@main.command()
@config_option
@click.option("--region", required=True)
@click.option("--reason", required=True, help="Why (kept in the audit log).")
@yes_option
@json_option
@handle_errors
def fence(config_path: str, region: str, reason: str, yes: bool, as_json: bool) -> None:
    """Fence a region: /readyz turns 503 and it relays nothing new until recovered."""
    _lifecycle_override(config_path, region, "FENCED", reason, yes, force=False, as_json=as_json)


@main.command()
@config_option
@click.option("--region", required=True)
@click.option("--force", is_flag=True, required=True, help="Required: this bypasses the recovery gate.")
@click.option("--reason", required=True, help="Why (kept in the audit log).")
@yes_option
@json_option
@handle_errors
def activate(config_path: str, region: str, force: bool, reason: str, yes: bool, as_json: bool) -> None:
    """Operator override: mark a region ACTIVE without passing the gate (audited)."""
    if not force:
        raise click.UsageError("activate needs --force: it bypasses the recovery gate")
    _lifecycle_override(config_path, region, "ACTIVE", reason, yes, force=True, as_json=as_json)



# ---------------------------------------------------------------- violations

@main.group()
def violations() -> None:
    """Business invariants that a merge broke (table invariants in the config), and their resolution."""


def _violation_line(v: Any) -> tuple[str, ...]:
    return (v.violation_id, v.table, v.key, v.invariant, v.status, v.detected_at.isoformat(timespec="seconds"),
            str(len(v.contributing)))


@violations.command("list")
@config_option
@region_option
@click.option("--table", default=None, help="Only this table.")
@click.option("--status", type=click.Choice(("open", "resolved", "all")), default="open", show_default=True)
@json_option
@handle_errors
def violations_list(config_path: str, region: str | None, table: str | None, status: str, as_json: bool) -> None:
    """List the invariant violations recorded in one region, oldest first."""
    config = load(config_path)
    if table is not None:
        config.table(table)
    name, store = _region_store(config, region)
    with store:
        found = store.violations(table=table, status=status)
    if as_json:
        print_json({"region": name, "table": table, "status": status, "count": len(found),
                    "violations": [v.to_dict() for v in found]})
        return
    label = "" if status == "all" else f"{status} "
    if not found:
        click.echo(f"region {name}: no {label}violations")
        return
    click.echo(f"region {name}: {len(found)} {label}violation{'s' if len(found) != 1 else ''}")
    _table(("ID", "TABLE", "KEY", "INVARIANT", "STATUS", "DETECTED", "EVENTS"), [_violation_line(v) for v in found])


@violations.command("show")
@config_option
@region_option
@click.argument("violation_id")
@json_option
@handle_errors
def violations_show(config_path: str, region: str | None, violation_id: str, as_json: bool) -> None:
    """One violation: the row now, the invariant, the events that made it, its resolution."""
    from .errors import ReconcilerError

    config = load(config_path)
    name, store = _region_store(config, region)
    with store:
        found = store.violation(violation_id)
    if found is None:
        raise ReconcilerError("no such violation (see `reconciler violations list --status all`)",
                              region=name, violation_id=violation_id, retryable=False)
    if as_json:
        print_json({"region": name, **found.to_dict()})
        return
    click.echo(f"violation {found.violation_id} in {name}: {found.status}")
    click.echo(f"  {found.table} {found.key}: invariant {found.invariant} ({found.expression}) is false")
    click.echo(f"  row now: {_cell(dict(found.row))}")
    click.echo(f"  detected at {found.detected_at.isoformat()}")
    click.echo(f"  contributing events, newest first ({len(found.contributing)}):")
    for event in found.contributing:
        sequence = event.get("sequence")
        click.echo(f"    {event['event_id']}  {event['origin']}#{sequence if sequence is not None else '-'}"
                   f"  hlc {event['hlc']}  {event['type'] or event['operation']}  {_cell(event.get('payload'))}")
    if found.resolved_at is not None:
        click.echo(f"  resolved by {found.resolved_by} at {found.resolved_at.isoformat()}: {found.resolution_reason}")


@violations.command("resolve")
@config_option
@regions_option("Only in these regions (default: every region, where each recorded it).")
@click.argument("violation_id")
@click.option("--reason", required=True, help="Why (kept in the audit trail): the compensation done, a ticket.")
@click.option("--by", default=None, help="Who (kept in the audit trail; default: the login name).")
@yes_option
@json_option
@handle_errors
def violations_resolve(config_path: str, regions: tuple[str, ...], violation_id: str, reason: str, by: str | None,
                       yes: bool, as_json: bool) -> None:
    """Close an open violation with who and why, in every region that recorded it."""
    import getpass

    from .errors import ReconcilerError
    from .store.postgres_store import RegionDatabases

    config = load(config_path)
    chosen = list(regions) or list(config.regions)
    for name in chosen:
        config.region(name)
    actor = by or getpass.getuser()
    confirm(f"resolve violation {violation_id} in {', '.join(chosen)} as {actor}?", yes, as_json)
    outcome: dict[str, str] = {}
    for name in chosen:
        try:
            with RegionDatabases(config).session(name, autocommit=True) as store:
                done = store.resolve_violation(violation_id, actor, reason)
                if done is not None:
                    outcome[name] = "resolved"
                else:
                    found = store.violation(violation_id)
                    outcome[name] = "not recorded" if found is None else f"already {found.status}"
        except ReconcilerError as exc:  # one region down must not hide what was done in the others
            outcome[name] = f"not reached: {exc.message}"
    if "resolved" not in outcome.values():
        states = "; ".join(f"{r}: {state}" for r, state in outcome.items())
        raise ReconcilerError(f"no open violation {violation_id} ({states})", violation_id=violation_id,
                              retryable=False)
    if as_json:
        print_json({"violation_id": violation_id, "by": actor, "reason": reason, "regions": outcome})
    else:
        for name, state in outcome.items():
            click.echo(f"{name}: {state}")
    if any(state.startswith("not reached") for state in outcome.values()):
        sys.exit(EXIT_FOUND)  # resolve again later for the regions not reached



def _name_environment_variables(group: click.Group, prefix: str) -> None:
    """Every option readable from RECONCILER_<COMMAND>_<FLAG>: named after the flag an
    operator types (``--json`` -> ..._JSON), where click's prefix alone would use the
    parameter's internal name (..._AS_JSON). Options with their own variable keep it."""
    for name, command in group.commands.items():
        path = f"{prefix}_{name.upper().replace('-', '_')}"
        if isinstance(command, click.Group):
            _name_environment_variables(command, path)
            continue
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None and not param.is_eager:
                flag = next((o for o in param.opts if o.startswith("--")), None)
                if flag is not None:
                    param.envvar = f"{path}_{flag[2:].upper().replace('-', '_')}"
            if isinstance(param, click.Option):
                param.show_envvar = True


_name_environment_variables(main, "RECONCILER")

if __name__ == "__main__":
    main()
