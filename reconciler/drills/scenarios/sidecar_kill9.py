"""sidecar-kill9: the region's sidecar is SIGKILLed again and again, each time while
the catch-up it started after the previous kill is running; then an operator's
``reconciler recover`` is SIGKILLed mid-replay too.

Every start after a SIGKILL is an unclean start, so the sidecar sends its region
to CATCHING_UP and replays what it missed; killing it there leaves the region
half caught up, with a batch possibly applied but not committed to Kafka offsets.
The region's users keep writing throughout (the database is up), so its outbox
fills while no relay runs. What must hold: the last sidecar finishes the job,
nothing is lost or applied twice, and the region ends ACTIVE.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec

CATCHING = ("CATCHING_UP", "VERIFYING")


def run(drill: Drill) -> None:
    region = drill.regions[1]
    rnd = random.Random(9)
    drill.sleep(3)
    kills: list[dict[str, object]] = []
    for _ in range(max(2, round(2 * drill.scale))):
        outage = drill.outage_begin(region, "sidecar SIGKILL")
        drill.kill_sidecar(region)
        time.sleep(1.5)  # peers and the region's own users keep writing meanwhile
        drill.start_sidecar(region)
        drill.outage_end(outage, watch=False)
        if drill.wait_until(lambda: drill.state(region) in CATCHING, 20, f"{region} sent to catch-up",
                            interval=0.05):
            time.sleep(rnd.uniform(0.05, 0.6))
        state = drill.state(region)
        drill.kill_sidecar(region)
        kills.append({"state_at_kill": state})
    # the operator's recover, killed while it replays (no sidecar runs meanwhile)
    argv = [sys.executable, "-m", "reconciler.cli", "recover", "--config", str(drill.config.path), "--region",
            region, "--yes", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    drill.mark("$ reconciler recover (to be killed)", region)
    time.sleep(1.2 + rnd.uniform(0.0, 0.5))  # the interpreter starts, fences, plans, replays
    state_at_kill = drill.state(region)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait(30)
    drill.mark("recover SIGKILL", region, exit_code=code, state=state_at_kill)
    drill.extra["kills"] = kills
    drill.extra["recover_killed"] = {"exit_code": code, "state_at_kill": state_at_kill}
    # the last start: this sidecar must finish the catch-up by itself
    outage = drill.outage_begin(region, "sidecar down")
    time.sleep(0.5)
    drill.start_sidecar(region)
    drill.outage_end(outage)
    active = drill.wait_until(lambda: drill.state(region) == "ACTIVE", 90, f"{region} ACTIVE")
    landed = sum(1 for k in kills if k["state_at_kill"] in CATCHING)
    drill.check("kills_landed_during_catch_up", landed >= 1,
                f"{landed} of {len(kills)} sidecar SIGKILLs hit the region in CATCHING_UP/VERIFYING; recover "
                f"SIGKILLed in state {state_at_kill} (exit {code})")
    drill.check("sidecar_finished_catch_up", active, f"{region} is {drill.state(region)} after the last start")
    drill.sleep(3)


SCENARIO = Scenario(
    name="sidecar-kill9",
    summary="SIGKILL a region's sidecar repeatedly during its catch-up, and an operator's recover mid-replay",
    run=run,
    pipeline="sidecars",
    workload=lambda scale: WorkloadSpec(rate=6.0, seconds=90 * scale),
    expectations=Expectations(rto_limit_seconds=90),
)
