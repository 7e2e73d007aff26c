"""Parts of the sidecar that need no database or broker: start-up refusals and readiness."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from reconciler.config import Config, RegionConfig
from reconciler.errors import ConfigError
from reconciler.lifecycle import RegionStatus, State
from reconciler.sidecar import Sidecar


def config(address: str) -> Config:
    return Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={
            "us-east": RegionConfig("us-east", "postgresql://app@127.0.0.1:1/app", address),
            "eu-west": RegionConfig("eu-west", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
        },
        tables={},
        kafka={"bootstrap.servers": "127.0.0.1:1"},
    )


def test_a_busy_metrics_address_is_a_config_error_naming_the_key() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sidecar = Sidecar(config(f"127.0.0.1:{port}"), "us-east")
        with pytest.raises(ConfigError) as caught:
            sidecar.run(install_signals=False)
    assert caught.value.context["key"] == "regions.us-east.metrics_address"
    assert f"127.0.0.1:{port}" in str(caught.value)


def test_not_ready_until_the_state_is_read_and_only_while_active_and_fresh() -> None:
    sidecar = Sidecar(config("127.0.0.1:0"), "us-east")
    assert not sidecar.ready()  # nothing read yet: an operator may have fenced the region
    sidecar.view.status = RegionStatus("us-east", State.ACTIVE, 1, "test")
    sidecar.view.read_at = time.monotonic()
    assert sidecar.ready()
    sidecar.view.read_at = time.monotonic() - 60
    assert not sidecar.ready()  # the database has not answered for a minute
    for state in (State.CATCHING_UP, State.VERIFYING, State.FENCED, State.SUSPECT):
        sidecar.view.status = RegionStatus("us-east", state, 2, "test")
        sidecar.view.read_at = time.monotonic()
        assert not sidecar.ready(), state
    sidecar.view.status = RegionStatus("us-east", State.ACTIVE, 3, "test")
    sidecar.stop.set()
    assert not sidecar.ready()  # draining: the load balancer must stop sending traffic


def test_a_loop_waiting_on_the_view_wakes_when_the_state_moves() -> None:
    sidecar = Sidecar(config("127.0.0.1:0"), "us-east")
    view, log = sidecar.view, sidecar.log
    view.publish(RegionStatus("us-east", State.ACTIVE, 1, "test"), log)
    started = time.monotonic()
    view.wait_for_change(0.2, seen_epoch=1)  # nothing moves: the whole timeout
    assert time.monotonic() - started >= 0.19
    started = time.monotonic()
    view.wait_for_change(10, seen_epoch=None)  # already published: no wait
    assert time.monotonic() - started < 5
    mover = threading.Timer(0.1, lambda: view.publish(RegionStatus("us-east", State.CATCHING_UP, 2, "relay"), log))
    mover.start()
    started = time.monotonic()
    view.wait_for_change(10, seen_epoch=1)  # wakes on the move, or returns at once if it came first
    assert time.monotonic() - started < 5 and view.status is not None and view.status.epoch == 2
    mover.join()
