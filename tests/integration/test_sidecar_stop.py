"""SIGTERM stops a real `reconciler run` process within a bounded time: at once and cleanly
when its loops can finish, and within the drain budget plus a grace period (not the sum
of one wait per loop) when some of them are stuck in calls that do not return."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.relay import Relay
from reconciler.sidecar import DRAIN_SECONDS, JOIN_GRACE_SECONDS

from .pipeline import SidecarProcess, connect, inbox_count, outbox_count, scalar, write_orders
from .test_sidecar import env, eventually, http, region_state

#: what the drills (drills/loops.py SidecarProcess.kill) and docker compose give a sidecar
#: between SIGTERM and SIGKILL
STOP_GRACE = 60.0


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None:
            proc.kill()


def exits_within(sidecar: SidecarProcess, seconds: float) -> tuple[int, float]:
    assert sidecar.proc is not None
    began = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    try:
        code = sidecar.proc.wait(seconds)
    except Exception:  # noqa: BLE001 - reported as the failure it is
        pytest.fail(f"the sidecar did not exit within {seconds}s of SIGTERM")
    took = time.monotonic() - began
    sidecar.proc = None
    return code, took


def test_sigterm_stops_a_busy_sidecar_at_once_and_cleanly(
    stack: Any, tmp_path: Path, processes: list[SidecarProcess],
) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west"))
    sidecars = {r: SidecarProcess(config, r, tmp_path / f"{r}.log") for r in ("us-east", "eu-west")}
    processes.extend(sidecars.values())
    for sidecar in sidecars.values():
        sidecar.start()
    for region in sidecars:
        eventually(lambda region=region: http(config, region, "/readyz")[0] == 200, 60, f"{region} ready")
    # traffic both ways while the signal arrives: every loop is busy, none idle
    writers = [threading.Thread(target=write_orders, args=(config, r, 200, f"{r}-"), daemon=True)
               for r in sidecars]
    for writer in writers:
        writer.start()
    eventually(lambda: inbox_count(config, "us-east", "eu-west") > 0, 30, "us-east applying eu-west's events")
    committed = outbox_count(config, "us-east")  # at least this much before the signal
    code, took = exits_within(sidecars["us-east"], 20.0)
    for writer in writers:
        writer.join(60)
    assert code == 0, sidecars["us-east"].log_lines()[-5:]
    assert took < 20.0
    status = region_state(config, "us-east")
    assert status.clean_stop is True
    events = [line.get("event") for line in sidecars["us-east"].log_lines()]
    assert events[-1] == "sidecar stopped cleanly"
    assert "loops did not stop in time" not in events and "loop died" not in events
    # everything us-east committed before the signal was published (the drain)
    assert scalar(config, "us-east", "SELECT published_through FROM reconciler.relay_state") >= committed


def test_sigterm_ends_the_process_in_bounded_time_while_loops_are_stuck_in_the_database(
    stack: Any, tmp_path: Path, processes: list[SidecarProcess],
) -> None:
    """Before: one wait per loop in turn (lifecycle 15 s, relay 45 s, inbox 60 s, ...),
    minutes in all, and a pool worker stuck in a query kept the interpreter from exiting
    at all: past every orchestrator's grace period, a sidecar 'ignoring' SIGTERM."""
    config = env(stack, tmp_path, ("us-east", "eu-west"))
    sidecar = SidecarProcess(config, "us-east", tmp_path / "us-east.log")
    processes.append(sidecar)
    sidecar.start()
    eventually(lambda: http(config, "us-east", "/readyz")[0] == 200, 60, "us-east ready")
    write_orders(config, "us-east", 50, "before-")
    eventually(lambda: scalar(config, "us-east", "SELECT published_through FROM reconciler.relay_state") == 50,
               30, "the first orders relayed")
    # The region's lifecycle row (its state, its clock) and the relay's position, locked
    # by a transaction that never ends: lifecycle, relay, catch-up and the inbox (whose
    # apply advances the region's clock) all hang in their next query. Not the inbox
    # table: the peer's relay reads it before numbering.
    blocker = connect(config, "us-east")
    blocker.execute("LOCK TABLE reconciler.region, reconciler.relay_state IN ACCESS EXCLUSIVE MODE")
    # a peer publishing, so the inbox has a batch to apply and hangs in it
    stop_peer = threading.Event()
    peer = Relay(config, "eu-west")
    peer_thread = threading.Thread(target=peer.run, args=(stop_peer,), daemon=True)
    peer_thread.start()
    try:
        write_orders(config, "eu-west", 20, "peer-")
        eventually(lambda: scalar(config, "eu-west", "SELECT published_through FROM reconciler.relay_state") == 20,
                   30, "eu-west's orders published")
        time.sleep(2.0)  # let every loop of us-east reach its next (now hanging) query
        bound = DRAIN_SECONDS + JOIN_GRACE_SECONDS + 5.0
        assert bound <= STOP_GRACE
        code, took = exits_within(sidecar, STOP_GRACE)
    finally:
        blocker.rollback()
        blocker.close()
        stop_peer.set()
        peer_thread.join(30)
    assert took < bound, f"SIGTERM took {took:.1f}s"
    # not drained, so no clean stop is claimed: the next start catches up
    assert code == 1
    events = [line.get("event") for line in sidecar.log_lines()]
    assert "loops did not stop in time" in events
    assert "exiting with loops still running" in events
    assert region_state(config, "us-east").clean_stop is False
