"""The sidecar on the real stack: drain, crash, readiness, metrics, failure detection, secrets.

Sidecars run as real `reconciler run` processes where a signal is the point (SIGTERM,
SIGKILL, what the process prints), and in-process on a thread elsewhere (cheaper on
two cores, and lets a test inject a stand-in for catch-up).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from reconciler import outbox
from reconciler.cli import main
from reconciler.config import Config, load_config
from reconciler.lifecycle import RegionStatus, State
from reconciler.metrics import REGION_STATES
from reconciler.sidecar import Sidecar
from reconciler.store import postgres as pg
from reconciler.store.postgres import key_lock_id

from .pipeline import (
    SidecarProcess,
    connect,
    fully_delivered,
    inbox_count,
    make_env,
    outbox_count,
    rows,
    scalar,
    write_orders,
)

FAST_HEARTBEATS = {"interval_seconds": 0.5, "suspect_after_seconds": 2, "failed_after_seconds": 4}


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rewrite(config: Config, change: Callable[[dict[str, Any]], None]) -> Config:
    doc = yaml.safe_load(config.path.read_text())
    change(doc)
    config.path.write_text(yaml.safe_dump(doc))
    return load_config(config.path)


def env(stack: Any, tmp_path: Path, regions: tuple[str, ...], **overrides: Any) -> Config:
    """make_env with metrics on free ports: its fixed ports would collide with other
    test runs sharing the machine."""
    config = make_env(stack, tmp_path, regions=regions, **overrides)

    def ports(doc: dict[str, Any]) -> None:
        for spec in doc["regions"].values():
            spec["metrics_address"] = f"127.0.0.1:{free_port()}"

    return rewrite(config, ports)


def http(config: Config, region: str, path: str) -> tuple[int, str]:
    url = f"http://{config.region(region).metrics_address}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening (yet, or any more)


def ready(config: Config, region: str) -> bool:
    return http(config, region, "/readyz")[0] == 200


def metric(config: Config, region: str, name: str, **labels: str) -> float | None:
    status, body = http(config, region, "/metrics")
    if status != 200:
        return None
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def eventually(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def region_state(config: Config, region: str) -> RegionStatus:
    with pg.connect(config.region(region).dsn, region=region) as conn:
        return pg.region_status(conn)


def move(config: Config, region: str, target: State, reason: str) -> None:
    with pg.connect(config.region(region).dsn, region=region) as conn:
        pg.transition(conn, target, reason, actor="test")


class InProcess:
    """A Sidecar on a thread of the test process."""

    def __init__(self, config: Config, region: str, **kwargs: Any) -> None:
        self.sidecar = Sidecar(config, region, **kwargs)
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"test-sidecar-{region}", daemon=True)

    def _run(self) -> None:
        try:
            self.code = self.sidecar.run(install_signals=False)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def start(self) -> InProcess:
        self.thread.start()
        return self

    def stop(self) -> int | None:
        self.sidecar.stop.set()
        self.thread.join(90)
        assert not self.thread.is_alive(), "sidecar did not stop"
        if self.error is not None:
            raise AssertionError(f"sidecar failed: {self.error!r}") from self.error
        return self.code


@pytest.fixture
def running() -> Iterator[list[InProcess]]:
    """In-process sidecars started by a test, stopped whatever happens."""
    started: list[InProcess] = []
    yield started
    for sidecar in started:
        if sidecar.thread.is_alive():
            sidecar.sidecar.stop.set()
    for sidecar in started:
        sidecar.thread.join(90)


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None:
            proc.kill()


def status_json(config: Config) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["status", "--config", str(config.path), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


# ------------------------------------------------------------------ SIGTERM, SIGKILL


def test_sigterm_publishes_everything_committed_before_it_and_exits_clean(
    stack: Any, tmp_path: Path, processes: list[SidecarProcess],
) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west"), batch={"relay": 20, "apply": 200})
    sidecar = SidecarProcess(config, "us-east", tmp_path / "us-east.log")
    processes.append(sidecar)
    sidecar.start()
    eventually(lambda: http(config, "us-east", "/readyz")[0] == 200, 60, "us-east ready")
    # Hold the relay at its next claim (it locks relay_state FOR UPDATE), so that the
    # whole batch below is still in the outbox when SIGTERM arrives.
    blocker = connect(config, "us-east")
    blocker.execute("SELECT 1 FROM reconciler.relay_state WHERE origin = 'us-east' FOR UPDATE")
    write_orders(config, "us-east", 500, "t")
    assert scalar(config, "us-east", "SELECT published_through FROM reconciler.relay_state") < 500
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the signal is in; the relay is still held
    blocker.rollback()
    blocker.close()
    assert sidecar.proc.wait(90) == 0
    sidecar.proc = None
    # 25 batches of 20 after the signal: a relay that stopped after the batch in hand
    # would have left 480 events stranded
    assert scalar(config, "us-east", "SELECT published_through FROM reconciler.relay_state") == 500
    assert outbox_count(config, "us-east") == 500
    status = region_state(config, "us-east")
    assert status.clean_stop is True and status.state is State.ACTIVE
    events = [(line.get("logger"), line.get("event")) for line in sidecar.log_lines()]
    assert ("reconciler.sidecar", "draining") in events
    assert ("reconciler.relay", "relay drained") in events
    assert events[-1] == ("reconciler.sidecar", "sidecar stopped cleanly")
    for line in sidecar.log_lines():
        assert line["region"] == "us-east" and "component" in line
        if line["logger"] in ("reconciler.sidecar", "reconciler.lifecycle") and line["event"] != "sidecar started":
            assert line["epoch"] == 1, line
    # a clean, recent stop does not send the region through catch-up
    sidecar.start()
    eventually(lambda: http(config, "us-east", "/readyz")[0] == 200, 60, "us-east ready again")
    assert sidecar.stop() == 0
    assert region_state(config, "us-east").epoch == status.epoch


def test_sigkill_mid_flow_loses_nothing_and_applies_nothing_twice(
    stack: Any, tmp_path: Path, processes: list[SidecarProcess],
) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west"), batch={"relay": 25, "apply": 100})
    sidecars = {r: SidecarProcess(config, r, tmp_path / f"{r}.log") for r in config.regions}
    processes.extend(sidecars.values())
    for proc in sidecars.values():
        proc.start()
    for region in config.regions:
        eventually(partial(ready, config, region), 60, f"{region} ready")
    stop_writing = threading.Event()

    def writer(region: str) -> None:
        with connect(config, region) as conn:
            i = 0
            while not stop_writing.is_set():
                with conn.transaction():
                    outbox.write(conn, "orders", "insert", {"id": f"{region}-{i}"},
                                 values={"customer": region, "status": "new", "total_cents": i})
                i += 1

    writers = [threading.Thread(target=writer, args=(r,)) for r in config.regions]
    for w in writers:
        w.start()
    try:
        eventually(lambda: inbox_count(config, "eu-west", "us-east") > 200
                   and inbox_count(config, "us-east", "eu-west") > 200, 60, "traffic flowing both ways")
        assert sidecars["us-east"].kill() == -signal.SIGKILL
        # both regions keep taking writes while us-east's sidecar is dead
        time.sleep(1.0)
    finally:
        stop_writing.set()
        for w in writers:
            w.join()
    # Writers stop before the restart: the region comes back through catch-up, whose
    # gate wants zero lag, which a writer racing it at full speed would never allow.
    assert outbox_count(config, "us-east") > scalar(
        config, "us-east", "SELECT published_through FROM reconciler.relay_state"), "nothing was left in flight"
    sidecars["us-east"].start()
    eventually(lambda: fully_delivered(config), 180, "every event delivered after the kill")
    for origin, dest in (("us-east", "eu-west"), ("eu-west", "us-east")):
        assert inbox_count(config, dest, origin) == outbox_count(config, origin)  # once each
        assert {k for k in rows(config, dest, "orders") if k.startswith(origin)} == {
            k for k in rows(config, origin, "orders") if k.startswith(origin)
        }
    # the unclean stop was noticed: the region went through catch-up and came back by itself
    eventually(partial(ready, config, "us-east"), 90, "us-east ACTIVE after catch-up")
    with connect(config, "us-east") as conn:
        log = conn.execute("SELECT to_state, reason, actor FROM reconciler.lifecycle_log ORDER BY id").fetchall()
    assert ("CATCHING_UP", "sidecar restarted after an unclean stop", "sidecar") in log
    assert log[-1] == ("ACTIVE", "recover: gate passed", "sidecar")
    for proc in sidecars.values():
        assert proc.stop() == 0


# ------------------------------------------------------------------ readiness


def test_readyz_follows_the_persisted_lifecycle(stack: Any, tmp_path: Path, running: list[InProcess]) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west"), heartbeat=FAST_HEARTBEATS)
    calls: list[str] = []
    release = threading.Event()

    def fake_recover(config: Config, region: str, *, actor: str = "", metrics: Any = None) -> Any:
        """Stands in for catch-up: waits for the test, then passes the gate."""
        calls.append(actor)
        release.wait(60)
        move(config, region, State.VERIFYING, "test: replayed")
        move(config, region, State.ACTIVE, "test: gate passed")
        return type("Report", (), {"state": "ACTIVE"})()

    sidecar = InProcess(config, "us-east", recover=fake_recover).start()
    running.append(sidecar)
    eventually(lambda: http(config, "us-east", "/readyz") == (200, "ready ACTIVE\n"), 30, "ready while ACTIVE")

    move(config, "us-east", State.FENCED, "test: operator fence")
    assert eventually(lambda: http(config, "us-east", "/readyz") == (503, "not ready FENCED\n"), 10, "503 FENCED")
    time.sleep(2.0)
    assert calls == [], "a fenced region waits for an operator; the sidecar must not recover it"
    assert http(config, "us-east", "/healthz")[0] == 200  # alive, just not serving

    move(config, "us-east", State.CATCHING_UP, "test: operator recover")
    eventually(lambda: http(config, "us-east", "/readyz") == (503, "not ready CATCHING_UP\n"), 10, "503 CATCHING_UP")
    eventually(lambda: calls == ["sidecar"], 10, "the sidecar starting catch-up")
    assert http(config, "us-east", "/readyz")[0] == 503
    release.set()
    eventually(lambda: http(config, "us-east", "/readyz")[0] == 200, 10, "ready again once ACTIVE")
    assert metric(config, "us-east", "reconciler_region_state", state="ACTIVE") == 1.0
    epoch = region_state(config, "us-east").epoch
    assert metric(config, "us-east", "reconciler_region_epoch") == float(epoch)
    transitions = metric(config, "us-east", "reconciler_lifecycle_transitions_total",
                         from_state="ACTIVE", to_state="FENCED")
    assert transitions == 1.0
    assert calls == ["sidecar"], "recover must not run again once the region is ACTIVE"
    assert sidecar.stop() == 0
    assert region_state(config, "us-east").clean_stop is True


# ------------------------------------------------------------------ metrics


def test_metrics_move_with_load(stack: Any, tmp_path: Path, running: list[InProcess]) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west"), heartbeat=FAST_HEARTBEATS)
    for region in config.regions:
        running.append(InProcess(config, region, stats_interval=0.5).start())
    for region in config.regions:
        eventually(partial(ready, config, region), 30, f"{region} ready")
    lag = {"origin": "us-east", "destination": "eu-west"}
    assert metric(config, "us-east", "reconciler_events_relayed_total") == 0.0

    relay_hold = connect(config, "us-east")  # hold the relay: backlog builds up
    relay_hold.execute("SELECT 1 FROM reconciler.relay_state WHERE origin = 'us-east' FOR UPDATE")
    apply_hold = connect(config, "eu-west")  # hold eu-west's apply of key m0: lag builds up there
    apply_hold.execute("SELECT pg_advisory_xact_lock(%s)", (key_lock_id("orders", "m0"),))
    write_orders(config, "us-east", 25, "m")
    eventually(lambda: metric(config, "us-east", "reconciler_outbox_backlog_events") == 25.0, 15, "backlog 25")
    eventually(lambda: (metric(config, "us-east", "reconciler_outbox_oldest_unrelayed_age_seconds") or 0) > 0.5,
               15, "the oldest unrelayed event ageing")

    relay_hold.rollback()
    eventually(lambda: metric(config, "us-east", "reconciler_events_relayed_total") == 25.0, 15, "25 relayed")
    eventually(lambda: metric(config, "us-east", "reconciler_outbox_backlog_events") == 0.0, 15, "backlog drained")
    assert metric(config, "us-east", "reconciler_outbox_oldest_unrelayed_age_seconds") == 0.0
    eventually(lambda: metric(config, "eu-west", "reconciler_replication_lag_events", **lag) == 25.0, 15,
               "eu-west 25 events behind while its apply is held")
    eventually(lambda: (metric(config, "eu-west", "reconciler_replication_lag_seconds", **lag) or 0) > 0.5, 15,
               "lag in seconds growing")

    apply_hold.rollback()
    eventually(lambda: metric(config, "eu-west", "reconciler_events_applied_total", origin="us-east") == 25.0,
               15, "25 applied in eu-west")
    eventually(lambda: metric(config, "eu-west", "reconciler_replication_lag_events", **lag) == 0.0, 15, "lag 0")
    assert metric(config, "eu-west", "reconciler_replication_lag_seconds", **lag) == 0.0
    assert metric(config, "eu-west", "reconciler_gaps_events", **lag) == 0.0
    assert metric(config, "eu-west", "reconciler_quarantine_events") == 0.0
    assert metric(config, "eu-west", "reconciler_manual_queue_depth", table="orders") == 0.0
    assert metric(config, "eu-west", "reconciler_hlc_max_offset_seconds") == 1.0
    now = time.time()
    for component in ("relay", "inbox", "lifecycle", "heartbeat", "stats"):
        stamp = metric(config, "eu-west", "reconciler_loop_last_success_timestamp_seconds", component=component)
        assert stamp is not None and now - stamp < 10, component
    skew = metric(config, "eu-west", "reconciler_hlc_skew_seconds", peer="us-east")
    assert skew is not None and abs(skew) < 0.2, "one machine, one clock: skew is the delivery delay at most"
    relay_hold.close()
    apply_hold.close()
    for sidecar in running:
        assert sidecar.stop() == 0


# ------------------------------------------------------------------ failure detection


def peer_state(doc: dict[str, Any], observer: str, peer: str) -> str | None:
    view = doc["regions"][observer]["peer_views"].get(peer)
    return view["state"] if view else None


def exports(config: Config, observer: str, peer: str, state: str) -> bool:
    return metric(config, observer, "reconciler_peer_state", peer=peer, state=state) == 1.0


def test_a_stopped_peer_becomes_suspect_then_failed_and_comes_back(
    stack: Any, tmp_path: Path, running: list[InProcess],
) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west", "ap-south"), heartbeat=FAST_HEARTBEATS)
    sidecars = {r: InProcess(config, r).start() for r in config.regions}
    running.extend(sidecars.values())
    observers = ("us-east", "eu-west")

    def all_active() -> bool:
        code, doc = status_json(config)
        return code == 0 and all(
            peer_state(doc, o, p) == "ACTIVE" for o in config.regions for p in config.peers(o)
        )

    eventually(all_active, 60, "every region seeing every other ACTIVE")
    stopped = time.monotonic()  # its last heartbeat left at most one interval before this
    assert sidecars["ap-south"].stop() == 0
    seen: dict[str, list[tuple[float, str]]] = {o: [] for o in observers}

    def record() -> bool:
        _code, doc = status_json(config)
        for o in observers:
            state = peer_state(doc, o, "ap-south")
            assert state is not None
            if not seen[o] or seen[o][-1][1] != state:
                seen[o].append((time.monotonic() - stopped, state))
        return all(seen[o][-1][1] == "FAILED" for o in observers)

    eventually(record, 30, "ap-south FAILED in both survivors' views", interval=0.1)
    for o in observers:
        states = [s for _, s in seen[o]]
        assert states[-2:] == ["SUSPECT", "FAILED"], f"{o} saw {seen[o]}"
        suspect_at = next(t for t, s in seen[o] if s == "SUSPECT")
        failed_at = next(t for t, s in seen[o] if s == "FAILED")
        # silent > 2 s is SUSPECT, > 4 s FAILED; the last heartbeat left up to 0.5 s
        # before `stopped`, and each status call takes a moment of its own
        assert 1.4 <= suspect_at <= 3.5, seen[o]
        assert 3.4 <= failed_at <= 6.0, seen[o]
    code, doc = status_json(config)
    south = doc["regions"]["ap-south"]
    assert code == 1
    assert south["reachable"] and south["state"] == "ACTIVE"  # its database is fine: only its sidecar is gone
    assert south["seen_as"] == "FAILED" and south["heartbeat_age_seconds"] >= 4
    assert any("ap-south: peers see it FAILED" in p for p in doc["problems"])
    for o in observers:
        # the sidecar refreshes its gauges once per interval; status computed the age just now
        eventually(partial(exports, config, o, "ap-south", "FAILED"), 5, f"{o} exporting ap-south FAILED")
        assert (metric(config, o, "reconciler_heartbeat_age_seconds", peer="ap-south") or 0) >= 4
        others = [metric(config, o, "reconciler_peer_state", peer="ap-south", state=s)
                  for s in REGION_STATES if s != "FAILED"]
        assert others == [0.0] * len(others)

    sidecars["ap-south"] = InProcess(config, "ap-south").start()
    running.append(sidecars["ap-south"])
    eventually(all_active, 30, "ap-south ACTIVE again in every view")
    for o in observers:
        eventually(partial(exports, config, o, "ap-south", "ACTIVE"), 5, f"{o} exporting ap-south ACTIVE")
    code, doc = status_json(config)
    assert code == 0 and doc["ok"]
    for sidecar in sidecars.values():
        assert sidecar.stop() == 0


# ------------------------------------------------------------------ secrets


def test_secrets_in_the_config_never_reach_logs_or_metrics(
    stack: Any, tmp_path: Path, processes: list[SidecarProcess],
) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west"), heartbeat=FAST_HEARTBEATS)
    role = f"h7_{uuid.uuid4().hex[:8]}"
    pg_secret = f"pg-S3cret-{uuid.uuid4().hex}"
    kafka_secret = f"kafka-S3cret-{uuid.uuid4().hex}"
    for region in config.regions:
        with psycopg.connect(stack.dsn(region), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{pg_secret}'")
    try:
        def plant(doc: dict[str, Any]) -> None:
            for spec in doc["regions"].values():
                spec["dsn"] = spec["dsn"].replace("postgres@", f"{role}:{pg_secret}@")
            # unused with PLAINTEXT, accepted by librdkafka: it must still never be printed
            doc["kafka"]["sasl.password"] = kafka_secret
            # a peer whose database cannot be reached: its DSN ends up in an error message
            doc["regions"]["ap-south"] = {
                "dsn": f"postgresql://{role}:{pg_secret}@127.0.0.1:{free_port()}/nowhere",
                "metrics_address": f"127.0.0.1:{free_port()}",
            }

        config = rewrite(config, plant)
        assert pg_secret in config.region("us-east").dsn
        sidecar = SidecarProcess(config, "us-east", tmp_path / "us-east.log")
        processes.append(sidecar)
        sidecar.start()
        eventually(lambda: http(config, "us-east", "/readyz")[0] == 200, 60, "us-east ready")
        write_orders(config, "us-east", 10, "s")
        eventually(lambda: metric(config, "us-east", "reconciler_events_relayed_total") == 10.0, 30, "relayed")
        eventually(lambda: any(line.get("event", "").startswith("origin database unreachable")
                               for line in sidecar.log_lines()), 30, "the unreachable peer logged")
        scraped = "".join(http(config, "us-east", path)[1] for path in ("/metrics", "/healthz", "/readyz"))
        assert sidecar.stop() == 0
        text = sidecar.log_path.read_text()
        status = CliRunner().invoke(main, ["status", "--config", str(config.path)]).output
        for secret in (pg_secret, kafka_secret):
            assert secret not in text, "a secret reached the sidecar's log"
            assert secret not in scraped, "a secret reached /metrics"
            assert secret not in status, "a secret reached `reconciler status`"
        # the DSNs were printed, redacted: the test did exercise the redaction
        started = next(line for line in sidecar.log_lines() if line["event"] == "sidecar started")
        assert started["dsn"] == config.region("us-east").redacted_dsn
        assert f"{role}:***@" in started["dsn"]
        assert started["kafka"]["sasl.password"] == "***"
        assert "DOWN" in status and f"{role}:***@127.0.0.1" in status
    finally:
        for region in ("us-east", "eu-west"):
            with psycopg.connect(stack.dsn(region), autocommit=True) as conn:
                conn.execute(f"DROP ROLE IF EXISTS {role}")


# ------------------------------------------------------------------ a region's database goes away


def test_a_region_whose_database_stops_is_down_then_catches_up_when_it_returns(
    stack: Any, tmp_path: Path, running: list[InProcess],
) -> None:
    config = env(stack, tmp_path, ("us-east", "eu-west", "ap-south"), heartbeat=FAST_HEARTBEATS,
                 lifecycle={"absence_threshold_seconds": 3})
    for region in config.regions:
        running.append(InProcess(config, region).start())
    eventually(lambda: status_json(config)[0] == 0, 60, "every region ACTIVE and heard")
    write_orders(config, "ap-south", 20, "before")
    eventually(lambda: inbox_count(config, "us-east", "ap-south") == 20, 30, "ap-south's events delivered")
    stack.stop_postgres("ap-south")
    try:
        def down_and_failed() -> bool:
            code, doc = status_json(config)
            south = doc["regions"]["ap-south"]
            return code == 1 and south["state"] == "DOWN" and all(
                peer_state(doc, o, "ap-south") == "FAILED" for o in ("us-east", "eu-west"))

        # its sidecar still runs, but sends no heartbeat without its database
        eventually(down_and_failed, 30, "ap-south DOWN and FAILED in its peers' views")
        _code, doc = status_json(config)
        south = doc["regions"]["ap-south"]
        assert not south["reachable"] and "unreachable" in south["error"]
        assert south["dsn"] == config.region("ap-south").redacted_dsn
        for region in ("us-east", "eu-west"):
            assert doc["regions"][region]["state"] == "ACTIVE"
        assert http(config, "ap-south", "/readyz")[0] == 503  # not knowing its state is not ready
        assert http(config, "ap-south", "/healthz")[0] == 200  # the process itself is fine
        write_orders(config, "us-east", 10, "during")  # ap-south will have to take these on return
    finally:
        stack.start_postgres("ap-south")
    # away longer than lifecycle.absence_threshold_seconds: back through catch-up, by itself
    eventually(lambda: status_json(config)[0] == 0, 90, "ap-south ACTIVE and heard again")
    with connect(config, "ap-south") as conn:
        log = conn.execute("SELECT to_state, reason, actor FROM reconciler.lifecycle_log ORDER BY id").fetchall()
    outage = [entry for entry in log if entry[1].startswith("database was out of reach")]
    assert outage and outage[0][0] == "CATCHING_UP" and outage[0][2] == "sidecar", log
    assert log[-1] == ("ACTIVE", "recover: gate passed", "sidecar")
    eventually(lambda: inbox_count(config, "ap-south", "us-east") == 10, 30, "us-east's events in ap-south")
    for sidecar in running:
        if sidecar.thread.is_alive():
            assert sidecar.stop() == 0
