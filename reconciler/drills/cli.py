"""``reconciler drill``: list the chaos drills, or run one against the local stack.

Exit codes: 0 the drill passed; 1 it ran and the checker found a problem; 2 it
could not run (no stack, unknown drill).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("name", required=False)
@click.option("--list", "list_only", is_flag=True, help="List the drills (name and what each breaks).")
@click.option("--scale", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Multiply the load and the phase lengths.")
@click.option("--dev-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="RECONCILER_DEV_DIR", help="The stack `reconciler dev up` started (env RECONCILER_DEV_DIR; "
              "default .dev).")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the drill report (JSON) here; the history goes beside it (*.history.jsonl).")
@click.option("--keep", is_flag=True,
              help="Keep the drill's working directory (config, sidecar logs) even if it passed.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--seed", type=int, default=None,
              help="Seed of a randomized drill's fault schedule and workload (nemesis); same seed, same schedule.")
@click.option("--minutes", type=click.FloatRange(min=0.1), default=None,
              help="How long a randomized drill injects faults under traffic (nemesis).")
@click.option("--writes-per-second", type=click.FloatRange(min=0.1), default=None,
              help="Acknowledged writes per second to aim at in each region, instead of the drill's own load "
                   "(writers are added so none is asked for more than 40 a second).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (the list, or the report).")
def drill(name: str | None, list_only: bool, scale: float, dev_dir: Path | None, json_out: Path | None, keep: bool,
          quiet: bool, seed: int | None, minutes: float | None, writes_per_second: float | None,
          as_json: bool) -> None:
    """Run a chaos drill under live traffic and prove its outcome.

    The drill gets its own databases and topics on the running local stack, breaks
    something, lets the system recover, and checks from the history of acknowledged
    writes and every region's final state: nothing lost, nothing applied twice,
    regions identical, conflicts accounted for, and the RTO. Exit 0 when passed.
    """
    from ..errors import ReconcilerError
    from .scenarios import SCENARIOS

    if list_only or not name:
        if as_json:
            click.echo(json.dumps({"drills": [{"name": s.name, "description": s.summary, "pipeline": s.pipeline}
                                              for s in SCENARIOS.values()]}, indent=2))
        else:
            width = max(len(n) for n in SCENARIOS)
            for scenario in SCENARIOS.values():
                click.echo(f"{scenario.name.ljust(width)}  {scenario.summary}")
        if not list_only and not name:
            click.echo("\nrun one with: reconciler drill NAME [--scale N] [--json-out FILE]", err=True)
        return
    from .runner import run_drill

    def progress(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    try:
        report = run_drill(name, scale=scale, dev_dir=dev_dir, json_out=json_out, log=progress, keep_workdir=keep,
                           seed=seed, minutes=minutes, writes_per_second=writes_per_second)
    except ReconcilerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(summary(report))
    sys.exit(0 if report["passed"] else 1)


def summary(report: dict[str, Any]) -> str:
    """The verdict in a few lines, for people."""
    rto = report.get("rto_seconds")
    lines = [
        f"drill {report['scenario']}: {'PASSED' if report['passed'] else 'FAILED'}"
        + (f" in {report['wall_seconds']:.0f}s" if report.get("wall_seconds") else ""),
        f"  acknowledged writes {report['events_written']}, lost {report['events_lost']}, "
        f"applied twice {report['duplicates_applied']}, regions converged {report['regions_converged']}, "
        f"RTO {'-' if rto is None else f'{rto:.1f}s'}",
    ]
    rate = report.get("workload_rate")
    if rate and rate.get("window_seconds"):
        achieved = ", ".join(f"{r} {v:.1f}" for r, v in rate["per_second"].items())
        lines.append(f"  acknowledged writes/s per region over {rate['window_seconds']:.0f}s of writing: {achieved}"
                     f" (asked for {rate['target_per_region']:.0f})")
    for check in report["checks"]:
        lines.append(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    if report.get("workdir"):
        lines.append(f"  logs and config kept in {report['workdir']}")
    return "\n".join(lines)
