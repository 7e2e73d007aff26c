"""``reconciler dev up|down|status``: the local stack from the command line.

Thin on purpose: parse options, build a :class:`DevStack`, call it, print. Progress
goes to stderr so that ``--json`` leaves exactly one JSON document on stdout.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from ..cli_options import regions_option
from ..errors import ReconcilerError
from .kafka_security import AUTH_MODES
from .stack import DEFAULT_KAFKA_PORT, DEFAULT_PG_BASE_PORT, DEFAULT_REGIONS, DevStack

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 2


def _fails_cleanly(func: F) -> F:
    """Turn a ReconcilerError into one line on stderr and exit code 2, not a traceback.

    Same contract as the rest of the CLI: with ``--json`` the line is the error as
    JSON. Stack errors carry the tail of the failing server's log after their first
    line; ``--verbose`` prints it too, because that is usually where the cause is.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ReconcilerError as exc:
            verbose = bool(kwargs.get("verbose"))
            if kwargs.get("as_json"):
                doc = exc.to_dict()
                if not verbose:
                    doc["message"] = exc.message.splitlines()[0] if exc.message else ""
                click.echo(json.dumps(doc, sort_keys=True), err=True)
                sys.exit(EXIT_ERROR)
            lines = str(exc).splitlines() or [type(exc).__name__]
            first = lines[0]
            if len(lines) > 1 and not verbose:
                first += " [log tail: rerun with --verbose]"
            click.echo(f"error: {first}", err=True)
            if verbose:
                for line in lines[1:]:
                    click.echo(line, err=True)
            sys.exit(EXIT_ERROR)

    return cast(F, wrapper)


def _parse_regions(value: tuple[str, ...]) -> tuple[str, ...] | None:
    return value or None


def _progress(message: str) -> None:
    click.echo(f"dev: {message}", err=True)


def _load(root: Path, regions: tuple[str, ...] | None) -> DevStack:
    """The stack recorded in ``root`` (explicit --regions win), or a default one."""
    try:
        recorded = DevStack.from_state(root, progress=_progress)
    except ReconcilerError:
        return DevStack(root, regions or DEFAULT_REGIONS, progress=_progress)
    if regions is None or regions == recorded.regions:
        return recorded
    return DevStack(root, regions, recorded.pg_base_port, recorded.kafka_port, progress=_progress,
                    kafka_auth=recorded.kafka_auth)


_dir_option = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".dev"),
    show_default=True,
    help="Where the stack keeps data, logs, state and the written config.",
)
_regions_option = regions_option(
    f"Region names, repeated or comma-separated [up: {','.join(DEFAULT_REGIONS)}; down/status: as recorded by up].",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
_verbose_option = click.option(
    "--verbose", "-v", is_flag=True, help="On error, also print the tail of the failing server's log."
)


@click.group()
def dev() -> None:
    """Local stack: one PostgreSQL per region and a Kafka broker, on loopback."""


@dev.command()
@_dir_option
@_regions_option
@click.option("--pg-base-port", type=int, default=None, help=f"First region's port [{DEFAULT_PG_BASE_PORT}].")
@click.option("--kafka-port", type=int, default=None, help=f"Broker port; +1 is the controller [{DEFAULT_KAFKA_PORT}].")
@click.option("--fresh", is_flag=True, help="Discard all database and topic data first (jars are kept).")
@click.option(
    "--kafka-auth",
    type=click.Choice(AUTH_MODES),
    default="none",
    show_default=True,
    help="scram: SASL/SCRAM users per region and ACLs (docs/security.md); switching needs --fresh.",
)
@_json_option
@_verbose_option
@_fails_cleanly
def up(
    root: Path,
    regions: tuple[str, ...],
    pg_base_port: int | None,
    kafka_port: int | None,
    fresh: bool,
    kafka_auth: str,
    as_json: bool,
    verbose: bool,
) -> None:
    """Start (or keep) the stack, wait until it answers, write <dir>/reconciler.yaml."""
    # Defaults, not what was recorded: `make test` must get the same three regions
    # whatever someone last brought up by hand in this directory.
    stack = DevStack(
        root,
        _parse_regions(regions) or DEFAULT_REGIONS,
        pg_base_port or DEFAULT_PG_BASE_PORT,
        kafka_port or DEFAULT_KAFKA_PORT,
        progress=_progress,
        kafka_auth=kafka_auth,
    )
    timings = stack.up(fresh=fresh)
    if as_json:
        doc = {"timings": timings, **stack.status()}
        click.echo(json.dumps(doc, indent=2))
        return
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
    click.echo(f"dev stack up in {timings['total']:.1f}s ({parts})")
    for region in stack.regions:
        click.echo(f"  postgres {region:<10} {stack.dsn(region)}")
    click.echo(f"  kafka {'':<13} {stack.bootstrap_servers}")
    click.echo(f"  config {'':<12} {stack.config_path}")


@dev.command()
@_dir_option
@_regions_option
@click.option("--purge", is_flag=True, help="Also delete database and topic data (jars are kept).")
@_json_option
@_verbose_option
@_fails_cleanly
def down(root: Path, regions: tuple[str, ...], purge: bool, as_json: bool, verbose: bool) -> None:
    """Stop the servers this stack started (only those, found by their recorded PIDs)."""
    stack = _load(root, _parse_regions(regions))
    result = stack.down(purge=purge)
    if as_json:
        click.echo(json.dumps({"root": str(stack.root), **result}, indent=2))
        return
    stopped = result["stopped"]
    click.echo(f"dev stack down: stopped {', '.join(stopped)}" if stopped else "dev stack down: nothing was running")


@dev.command()
@_dir_option
@_regions_option
@_json_option
@_verbose_option
@_fails_cleanly
def status(root: Path, regions: tuple[str, ...], as_json: bool, verbose: bool) -> None:
    """Show what runs, on which ports, and whether it answers."""
    stack = _load(root, _parse_regions(regions))
    doc = stack.status()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return

    def word(entry: dict[str, Any]) -> str:
        if not entry["running"]:
            return "stopped"
        return "ready" if entry["ready"] else "NOT ANSWERING"

    for region, entry in doc["postgres"].items():
        pid = f"pid {entry['pid']}" if entry["pid"] else ""
        click.echo(f"postgres {region:<10} {word(entry):<14} {entry['dsn']}  {pid}")
    kafka = doc["kafka"]
    pid = f"pid {kafka['pid']}" if kafka["pid"] else ""
    click.echo(f"kafka {'':<13} {word(kafka):<14} {kafka['bootstrap_servers']}  {pid}")
    click.echo(f"config {'':<12} {doc['config_path'] or '(not written yet)'}")
