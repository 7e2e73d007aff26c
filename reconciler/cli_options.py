"""Options and conventions every ``reconciler`` command shares.

Exit codes: 0 success; 1 the command worked and found something an operator must
act on; 2 an error, a refused operation, or a declined confirmation (nothing was
changed). A declined prompt is 2, not 1: scripts read 1 as "look at the findings",
and a question nobody answered found nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_ERROR = 2

#: log formats of long-running commands (``run``)
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def split_regions(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """``--region a --region b`` and ``--region a,b`` mean the same."""
    names = tuple(part.strip() for item in value for part in item.split(",") if part.strip())
    if value and not names:
        raise click.BadParameter("give at least one region name, e.g. us-east,eu-west", ctx=ctx, param=param)
    return names


class _RegionsOption(click.Option):
    """Lists only ``--region`` in help: ``--regions`` is the old spelling, still accepted."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        return record[0].replace(", --regions", ""), record[1]


def regions_option(help: str) -> Callable[[F], F]:
    """The one spelling for choosing several regions: ``--region`` repeated, or a comma list."""
    return click.option("--region", "--regions", "regions", cls=_RegionsOption, multiple=True,
                        callback=split_regions, metavar="REGION[,REGION...]", help=help)


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")


def confirm(question: str, yes: bool, as_json: bool = False) -> None:
    """Ask before a state change unless ``--yes``; a no, or no answer (stdin closed,
    Ctrl-C), exits 2 having changed nothing."""
    if yes:
        return
    try:
        answer = click.confirm(question, default=False, err=True)
    except click.Abort:
        answer = False
    if answer:
        return
    message = "declined: nothing changed (pass --yes to skip the question)"
    if as_json:
        click.echo(json.dumps({"error": message, "declined": True}, sort_keys=True), err=True)
    else:
        click.echo(f"\nerror: {message}", err=True)
    sys.exit(EXIT_ERROR)
