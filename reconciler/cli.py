"""The operator CLI: parse, load config, call a service, map errors to exit codes."""

from __future__ import annotations

import click

from . import __version__


@click.group()
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """reconciler: multi-region disaster-recovery reconciliation for PostgreSQL + Kafka."""
