"""regional-failover: a whole region (database, sidecar, its users' writes) goes
down under load and comes back, recovered by the operator following the runbooks.

Timeline: three sidecars (``reconciler run``) and writers in every region; the
failed region's sidecar is SIGKILLed and its PostgreSQL stopped immediately. Its
users keep failing for a moment (nothing they attempt is acknowledged), then the
traffic layer sends them to a survivor, where they write the same orders and
SKUs as everyone else. The operator works through ``regional-failover.md``
(status, gaps; its fence step needs the failed database and cannot run while it
is down), the database returns, and the operator works through
``failback-and-reconcile.md``: diagnosis, ``reconciler run`` (the region's
sidecar), ``reconciler recover``, verification. Users go back once recover has
passed the gate. The runbooks' example region us-east is mapped to the failed
region.
"""

from __future__ import annotations

import time

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..runbook import RunbookCommand
from ..workload import WorkloadSpec
from ._common import phase


def _accept(command: RunbookCommand, code: int) -> bool:
    if command.subcommand == "recover" and "--dry-run" not in command.argv:
        return code == 0  # the gate passed: anything else is re-run, as an operator would
    # status/gaps/diff exit 1 while a region is down, behind, or (diff, under live traffic)
    # holds events still in flight: that is what they are there to show
    return code in (0, 1)


def run(drill: Drill) -> None:
    failed, survivors = drill.regions[0], drill.regions[1:]
    drill.sleep(4)
    outage = drill.outage_begin(failed, "regional outage")
    started = time.monotonic()
    drill.kill_sidecar(failed)
    drill.stop_postgres(failed, mode="immediate")
    time.sleep(1.5)  # users of the failed region keep trying until the traffic layer reacts
    drill.workload.route(failed, survivors[0])
    drill.mark("traffic moved", failed, to=survivors[0])
    drill.run_runbook("regional-failover.md", failed, execute=("status", "gaps"), accept=_accept)
    phase(drill, 10, started)
    drill.start_postgres(failed)
    drill.outage_end(outage)

    def start_sidecar(argv: tuple[str, ...]) -> None:
        drill.start_sidecar(failed, argv)

    steps = drill.run_runbook("failback-and-reconcile.md", failed,
                              execute=("status", "gaps", "recover", "migrate", "conflicts list", "diff"),
                              on_run=start_sidecar, accept=_accept, retry_seconds=90)
    recovers = [s for s in steps if s.executed and " recover " in f" {s.command} " and "--dry-run" not in s.command]
    drill.check("runbook_recover_passed", bool(recovers) and all(s.exit_code == 0 for s in recovers),
                "; ".join(f"{s.where}: exit {s.exit_code} ({s.note or 'first try'})" for s in recovers)
                or "the failback runbook has no recover command")
    active = drill.wait_until(lambda: drill.state(failed) == "ACTIVE", 60, f"{failed} ACTIVE")
    drill.workload.route(failed, failed)
    drill.mark("traffic back", failed)
    drill.check("failed_region_active_after_recover", active, f"{failed} is {drill.state(failed)}")
    unreachable = sum(s.failures.get("unreachable", 0) for s in drill.workload.stats if s.home == failed)
    drill.check("down_region_writes_unacknowledged", unreachable > 0,
                f"{unreachable} writes to {failed} failed while its database was down; none is in the history")
    drill.sleep(4)


SCENARIO = Scenario(
    name="regional-failover",
    summary="a region's database, sidecar and writers go down under load; back via the operator runbooks",
    run=run,
    pipeline="sidecars",
    workload=lambda scale: WorkloadSpec(rate=6.0, seconds=90 * scale),
    expectations=Expectations(rto_limit_seconds=120),
)
