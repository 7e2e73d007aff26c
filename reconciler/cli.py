"""The operator CLI: parse, load config, call a service, map errors to exit codes.

Exit codes: 0 success; 1 the command worked and found something an operator must
act on (differences, gaps, data loss); 2 an error (bad config, unreachable
service, refused operation), printed as one line on stderr (JSON with --json).
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
from .config import Config, load_config
from .devstack.cli import dev
from .errors import ReconcilerError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_ERROR = 2


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


@click.group()
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """reconciler: multi-region disaster-recovery reconciliation for PostgreSQL + Kafka."""


main.add_command(dev)
main.add_command(diff)


@main.command()
@config_option
@click.option("--region", "regions", multiple=True, help="Only these regions (default: every region in config).")
@click.option("--demo-tables", is_flag=True, help="Also create the checkout demo tables (orders, inventory, payments).")
@json_option
@handle_errors
def migrate(config_path: str, regions: tuple[str, ...], demo_tables: bool, as_json: bool) -> None:
    """Apply schema migrations in each region's database and create the Kafka topics."""
    from .provision import migrate as run_migrate

    config = load(config_path)
    report = run_migrate(config, list(regions) or None, demo_tables=demo_tables)
    if as_json:
        print_json(report.to_dict())
        return
    for region, names in report.applied.items():
        done = ", ".join(names) if names else "nothing to apply"
        click.echo(f"{region}: schema version {report.schema_versions[region]} ({done})")
    if report.topics_created:
        click.echo(f"topics created: {', '.join(report.topics_created)}")


@main.command()
@config_option
@click.option("--region", required=True, help="The region this sidecar serves.")
@click.option("--log-level", default="INFO", show_default=True)
@handle_errors
def run(config_path: str, region: str, log_level: str) -> None:
    """Run the sidecar: relay, inbox consumer, lifecycle, /metrics /healthz /readyz."""
    from .logs import configure
    from .sidecar import Sidecar

    configure(log_level)
    sys.exit(Sidecar(load(config_path), region).run())


if __name__ == "__main__":
    main()
