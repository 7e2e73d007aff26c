"""The local development stack: PostgreSQL per region plus one Kafka broker.

``DevStack`` is what ``reconciler dev up|down|status``, the integration tests and the
chaos drills all drive, so that "kill eu-west's database" or "bounce the broker"
means the same thing everywhere. ``up()`` records what it started in
``<root>/stack.json`` so that a later process (pytest, a drill) can rebuild the same
object with :meth:`DevStack.from_state`, and writes ``<root>/reconciler.yaml``, a
config every other command accepts as is.

Everything is idempotent and keyed by recorded PIDs: ``up()`` twice leaves the same
servers running, ``down()`` stops only servers we started, and nothing is ever found
or killed by process name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError, DevStackError
from ..resources import data_path
from ._process import Deadline
from .kafka import KafkaBroker, KafkaLibs, find_java, find_maven, pom_kafka_version
from .kafka_security import ADMIN_USER, MECHANISM, provision, wait_for_login
from .postgres import PostgresServer, RunAs, find_bindir, prepare_base, remove_base, server_identity

DEFAULT_REGIONS: tuple[str, ...] = ("us-east", "eu-west", "ap-south")
DEFAULT_PG_BASE_PORT = 54321
DEFAULT_KAFKA_PORT = 19092
STATE_VERSION = 1
TOPIC_PREFIX = "reconciler"

_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

Progress = Callable[[str], None]


def _default_pom() -> Path:
    """The pom.xml the package carries (installed from a wheel) or its checkout's, else cwd's."""
    try:
        return data_path("pom.xml")
    except ConfigError:
        return Path.cwd() / "pom.xml"


def _check_port(name: str, port: int) -> None:
    if not 1024 <= port <= 65535:
        raise DevStackError(f"{name} must be between 1024 and 65535, got {port}")


class DevStack:
    """PostgreSQL ×N regions + one KRaft Kafka broker, on loopback, under ``root``."""

    def __init__(
        self,
        root: Path = Path(".dev"),
        regions: Sequence[str] = DEFAULT_REGIONS,
        pg_base_port: int = DEFAULT_PG_BASE_PORT,
        kafka_port: int = DEFAULT_KAFKA_PORT,
        *,
        pom: Path | None = None,
        progress: Progress | None = None,
        kafka_auth: str = "none",
    ) -> None:
        regions = tuple(regions)
        if not regions:
            raise DevStackError("at least one region is needed")
        if len(set(regions)) != len(regions):
            raise DevStackError(f"duplicate region in {', '.join(regions)}")
        for region in regions:
            if not _REGION_RE.match(region):
                raise DevStackError(
                    f"invalid region name {region!r}: use lowercase letters, digits, '-' and '_'",
                    region=region,
                )
        _check_port("pg_base_port", pg_base_port)
        _check_port("pg_base_port + regions", pg_base_port + len(regions) - 1)
        _check_port("kafka_port", kafka_port)
        _check_port("kafka_port + 1 (controller)", kafka_port + 1)
        pg_ports = set(range(pg_base_port, pg_base_port + len(regions)))
        if pg_ports & {kafka_port, kafka_port + 1}:
            raise DevStackError(f"Kafka ports {kafka_port}-{kafka_port + 1} overlap the PostgreSQL ports")
        self.root = root.absolute()
        self.regions = regions
        self.pg_base_port = pg_base_port
        self.kafka_port = kafka_port
        self.pom = pom or _default_pom()
        self._progress = progress or (lambda _msg: None)
        self._lock_depth = 0
        self._lock_fh: TextIO | None = None
        self._run_as: RunAs | None = None
        self._pg_base: Path | None = None
        self.libs = KafkaLibs(self.pom, self.root / "kafka" / "libs")
        self.kafka_auth = kafka_auth
        self.kafka = KafkaBroker(self.root / "kafka", self.logs_dir, kafka_port, self.libs, auth=kafka_auth)
        self._servers: dict[str, PostgresServer] = {}

    # --- construction from a previous `up` -------------------------------------
    @classmethod
    def from_state(cls, root: Path = Path(".dev"), *, progress: Progress | None = None) -> DevStack:
        """Rebuild the stack ``up()`` recorded in ``<root>/stack.json``."""
        path = root.absolute() / "stack.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise DevStackError(f"no dev stack state at {path}; run `reconciler dev up --dir {root}` first") from None
        except (OSError, ValueError) as exc:
            raise DevStackError(f"cannot read dev stack state {path}: {exc}") from exc
        try:
            return cls(
                root,
                regions=tuple(str(r) for r in state["regions"]),
                pg_base_port=int(state["pg_base_port"]),
                kafka_port=int(state["kafka_port"]),
                progress=progress,
                kafka_auth=str(state.get("kafka_auth", "none")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DevStackError(f"dev stack state {path} is malformed: {exc!r}") from exc

    # --- names and addresses -----------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / "stack.json"

    @property
    def config_path(self) -> Path:
        return self.root / "reconciler.yaml"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers

    def pg_port(self, region: str) -> int:
        return self.pg_base_port + self._index(region)

    def dsn(self, region: str) -> str:
        """libpq URL of ``region``'s ``reconciler`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.pg_port(region)}/reconciler"

    def metrics_address(self, region: str) -> str:
        # beside the broker's ports, so stacks started with other ports never share one
        return f"127.0.0.1:{self.kafka_port + 10 + self._index(region)}"

    def _index(self, region: str) -> int:
        try:
            return self.regions.index(region)
        except ValueError:
            raise DevStackError(
                f"unknown region {region!r}; this stack has {', '.join(self.regions)}", region=region
            ) from None

    # --- lazily resolved machine facts -------------------------------------------
    def _identity(self) -> RunAs:
        if self._run_as is None:
            self._run_as = server_identity()
        return self._run_as

    def _base(self, create: bool) -> Path | None:
        """Where the clusters live; None when nothing was ever created and ``create`` is false."""
        if self._pg_base is not None:
            return self._pg_base
        link = self.root / "pg"
        if not create:
            if not (link.exists() or link.is_symlink()):
                return None
            return link.resolve() if link.is_symlink() else link
        self.root.mkdir(parents=True, exist_ok=True)
        self._pg_base = prepare_base(self.root, self._identity())
        # Launchers made before the directory existed point at the unresolved link,
        # which the postgres user may not be able to traverse.
        self._servers.clear()
        return self._pg_base

    def server(self, region: str) -> PostgresServer:
        """The launcher object of ``region``'s PostgreSQL (for drills that need more)."""
        self._index(region)
        if region not in self._servers:
            base = self._base(create=False) or self.root / "pg"
            self._servers[region] = PostgresServer(
                region,
                base / region,
                self.pg_port(region),
                base / f"{region}.log",
                find_bindir(),
                self._identity(),
            )
        return self._servers[region]

    # --- locking -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise stack changes across processes (two `dev up` at once would race)."""
        if self._lock_depth == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fh = (self.root / ".lock").open("w")
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fh is not None:
                fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
                self._lock_fh.close()
                self._lock_fh = None

    # --- state ---------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "regions": list(self.regions),
            "pg_base_port": self.pg_base_port,
            "kafka_port": self.kafka_port,
            "kafka_auth": self.kafka_auth,
        }

    def _check_previous_state(self, stop: bool) -> None:
        """Refuse to start a differently shaped stack over a running one (or stop it)."""
        try:
            previous = DevStack.from_state(self.root, progress=self._progress)
        except DevStackError:
            return
        if previous._state() == self._state():
            return
        running = previous._running_parts()
        if running and stop:
            previous._stop_all()
        elif running:
            raise DevStackError(
                f"a stack with other settings is running in {self.root} ({', '.join(running)}); "
                f"run `reconciler dev down --dir {self.root}` first, or `dev up --fresh`"
            )

    def _running_parts(self) -> list[str]:
        parts = []
        if self._base(create=False) is not None:
            parts += [f"postgres {r}" for r in self.regions if self.server(r).pid() is not None]
        if self.kafka.pid() is not None:
            parts.append("kafka")
        return parts

    def _write_state(self) -> None:
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        tmp.replace(self.state_path)

    # --- up / down ------------------------------------------------------------
    def up(self, *, fresh: bool = False, timeout: float = 120) -> dict[str, float]:
        """Start whatever is not running, wait until all of it answers, write the config.

        ``fresh`` first stops everything and discards all PostgreSQL and Kafka data
        (the Kafka jars are kept), so a test run starts from empty databases.
        Returns seconds: ``total``; ``kafka_libs`` spent in Maven (0 when the jars
        were already there); ``postgres`` and ``kafka``, from the moment the servers
        were started in parallel until the last database / the broker answered.
        """
        t0 = time.monotonic()
        timings: dict[str, float] = {"kafka_libs": 0.0, "postgres": 0.0, "kafka": 0.0}
        with self._locked():
            self._check_previous_state(stop=fresh)
            # Missing binaries fail here, before anything is started.
            find_bindir()
            self._identity()
            java = find_java()
            if self.kafka.pid() is None and not self.libs.ready():
                find_maven()
            if fresh:
                self._stop_all()
                self._wipe()
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self._write_state()

            self._base(create=True)
            servers = [self.server(region) for region in self.regions]
            self._start_parallel(servers, java, timeout, timings)
            if self.kafka_auth == "scram":
                self.grant_kafka_access()
            self.write_config()
        timings["total"] = time.monotonic() - t0
        return {k: round(v, 2) for k, v in timings.items()}

    def _start_parallel(
        self, servers: list[PostgresServer], java: str, timeout: float, timings: dict[str, float]
    ) -> None:
        """Start every server at once and wait for all of them.

        Each start is mostly waiting on a child process (initdb, pg_ctl, Maven, the
        JVM), so threads overlap them well even on two cores: a cold `dev up` costs
        roughly the slowest part, not the sum.
        """
        started = time.monotonic()

        def kafka_task() -> None:
            if self.kafka.pid() is None:
                if not self.libs.ready():
                    self._progress("kafka: resolving broker jars with Maven (first run only)")
                    t = time.monotonic()
                    self.libs.ensure(self.logs_dir / "maven.log")
                    timings["kafka_libs"] = time.monotonic() - t
                self._progress(f"kafka: starting broker on {self.bootstrap_servers}")
                self.kafka.start(java)
            # Its own deadline: a cold Maven run must not eat the broker's start time.
            self.kafka.wait_ready(Deadline(timeout))
            timings["kafka"] = time.monotonic() - started

        pg_deadline = Deadline(timeout)

        def postgres_task(server: PostgresServer) -> None:
            if server.pid() is None:
                self._progress(f"postgres {server.region}: starting on port {server.port}")
                server.start()
            server.wait_ready(pg_deadline)
            timings["postgres"] = max(timings["postgres"], time.monotonic() - started)

        with ThreadPoolExecutor(max_workers=1 + len(servers), thread_name_prefix="devstack") as pool:
            futures = [pool.submit(kafka_task), *(pool.submit(postgres_task, s) for s in servers)]
            wait(futures)
        errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
        for exc in errors:
            if not isinstance(exc, DevStackError):
                raise exc  # a bug, not a stack problem: keep its own traceback
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise DevStackError(
                f"{len(errors)} parts of the stack failed to start: "
                + "; ".join(str(e).splitlines()[0] for e in errors)
                + "\n"
                + "\n".join(str(e) for e in errors)
            ) from errors[0]

    def down(self, *, purge: bool = False) -> dict[str, Any]:
        """Stop the servers we started (PostgreSQL fast, Kafka SIGTERM then SIGKILL).

        ``purge`` also deletes their data (the Kafka jars are kept).
        """
        with self._locked():
            stopped = self._stop_all()
            if purge:
                self._wipe()
        return {"stopped": stopped, "purged": purge}

    def _stop_all(self) -> list[str]:
        stopped: list[str] = []
        if self.kafka.pid() is not None:
            self._progress("kafka: stopping")
            self.kafka.stop()
            stopped.append("kafka")
        if self._base(create=False) is not None:
            for region in self.regions:
                server = self.server(region)
                if server.pid() is not None:
                    self._progress(f"postgres {region}: stopping")
                    server.stop("fast")
                    stopped.append(f"postgres {region}")
        return stopped

    def _wipe(self) -> None:
        remove_base(self.root)
        self._pg_base = None
        self._servers.clear()
        self.kafka.wipe()
        self.config_path.unlink(missing_ok=True)

    # --- single parts, for tests and chaos drills -------------------------------------
    def stop_postgres(self, region: str, mode: str = "fast") -> None:
        """Stop one region's database (``immediate`` = crash-like, recovery on start)."""
        with self._locked():
            self.server(region).stop(mode)

    def start_postgres(self, region: str, *, timeout: float = 180) -> None:
        """Start one region's database again and wait until it answers."""
        with self._locked():
            server = self.server(region)
            self._base(create=True)
            server.start(timeout=timeout)
            server.wait_ready(Deadline(timeout))

    def stop_kafka(self) -> None:
        with self._locked():
            self.kafka.stop()

    def start_kafka(self, *, timeout: float = 120) -> None:
        """Start the broker (resolving jars if needed) and wait until it answers."""
        with self._locked():
            java = find_java()
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self.libs.ensure(self.logs_dir / "maven.log")
            self.kafka.start(java)
            self.kafka.wait_ready(Deadline(timeout))

    def restart_kafka(self, *, timeout: float = 120) -> None:
        with self._locked():
            self.stop_kafka()
            self.start_kafka(timeout=timeout)

    def backup_postgres(self, region: str, name: str = "backup") -> Path:
        """Take a base backup of ``region`` now, for a later :meth:`restore_postgres`.

        Drills use it to model a region restored from a stale backup: back up,
        keep writing, then restore. Backups live beside the clusters (where the
        ``postgres`` user can write) as ``backups/<region>-<name>``; an older backup
        of the same name is replaced.
        """
        if not _REGION_RE.match(name):
            raise DevStackError(f"invalid backup name {name!r}", region=region)
        with self._locked():
            server = self.server(region)
            base = self._base(create=True)
            assert base is not None
            backups = base / "backups"
            if not backups.exists():
                backups.mkdir(mode=0o700)
                run_as = self._identity()
                if run_as.uid is not None and run_as.gid is not None:
                    os.chown(backups, run_as.uid, run_as.gid)
            target = backups / f"{region}-{name}"
            if target.exists():
                shutil.rmtree(target)
            server.base_backup(target)
            return target

    def restore_postgres(self, region: str, backup: Path, *, timeout: float = 180) -> None:
        """Crash ``region``'s database, replace its data with ``backup``, start it again.

        Everything committed after the backup is gone from that region, exactly as
        after a real restore; the backup itself is kept and can be restored again.
        """
        with self._locked():
            server = self.server(region)
            self._base(create=True)
            server.stop("immediate")
            server.replace_data(backup)
            server.start(timeout=timeout)
            server.wait_ready(Deadline(timeout))

    # --- status ------------------------------------------------------------------
    def status(self, *, probe: bool = True) -> dict[str, Any]:
        """What runs, where, and (``probe``) whether it answers; JSON-serialisable."""
        base = self._base(create=False)
        postgres: dict[str, Any] = {}
        for region in self.regions:
            entry: dict[str, Any] = {"port": self.pg_port(region), "dsn": self.dsn(region)}
            if base is None:
                entry.update(pid=None, running=False, ready=False, data_dir=None, log=None)
            else:
                server = self.server(region)
                pid = server.pid()
                entry.update(
                    pid=pid,
                    running=pid is not None,
                    ready=bool(pid is not None and probe and server.ping()),
                    data_dir=str(server.data_dir),
                    log=str(server.log_path),
                )
            postgres[region] = entry
        kpid = self.kafka.pid()
        kafka: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "auth": self.kafka_auth,
            "controller_port": self.kafka.controller_port,
            "pid": kpid,
            "running": kpid is not None,
            "ready": bool(kpid is not None and probe and self.kafka.ping()[0]),
            "libs_ready": self.libs.ready() if self.pom.exists() else False,
            "kafka_version": pom_kafka_version(self.pom) if self.pom.exists() else None,
            "data_dir": str(self.kafka.data_dir),
            "log": str(self.kafka.log_path),
        }
        parts_ready = [p["ready"] for p in postgres.values()] + [kafka["ready"]]
        return {
            "root": str(self.root),
            "state_path": str(self.state_path),
            "config_path": str(self.config_path) if self.config_path.exists() else None,
            "regions": list(self.regions),
            "healthy": all(parts_ready) if probe else None,
            "postgres": postgres,
            "kafka": kafka,
        }

    # --- Kafka security (--kafka-auth scram) -------------------------------------
    def grant_kafka_access(self, topic_prefix: str = TOPIC_PREFIX) -> None:
        """Create each region's SCRAM user and its ACLs for ``topic_prefix``, then
        wait until every region can log in (idempotent; tests call it per prefix)."""
        self._progress(f"kafka: SCRAM users and ACLs for {', '.join(self.regions)} on {topic_prefix}.*")
        provision(self.kafka.client_settings(), self.kafka.credentials, topic_prefix, self.regions)
        for region in self.regions:
            wait_for_login(self.kafka.client_settings(region))

    def _kafka_config_lines(self) -> list[str]:
        """The shared ``kafka:`` block, and with SCRAM the admin block used by migrate."""
        lines = [
            "kafka:                     # librdkafka properties for every region, passed through as given",
            f"  bootstrap.servers: {self.bootstrap_servers}",
        ]
        if self.kafka_auth == "scram":
            lines += [
                "  security.protocol: SASL_PLAINTEXT",
                f"  sasl.mechanism: {MECHANISM}",
                "kafka_admin:               # only `reconciler migrate` logs in as admin (it creates the topics)",
                f"  sasl.username: {ADMIN_USER}",
                f"  sasl.password: file:{self.kafka.credentials.path(ADMIN_USER)}",
            ]
        return lines

    def _region_kafka_lines(self, region: str) -> list[str]:
        if self.kafka_auth != "scram":
            return []
        return [
            "    kafka:                 # this region's own principal: see docs/security.md",
            f"      sasl.username: {region}",
            f"      sasl.password: file:{self.kafka.credentials.path(region)}",
        ]

    # --- config ------------------------------------------------------------------
    def config_text(self) -> str:
        """The YAML every other command reads (shape fixed with reconciler/config.py)."""
        lines = [
            "# written by `reconciler dev up`",
            f"topic_prefix: {TOPIC_PREFIX}",
            "hlc:",
            "  max_offset_ms: 1000",
            *self._kafka_config_lines(),
            "regions:",
        ]
        for region in self.regions:
            lines += [
                f"  {region}:",
                f"    dsn: {self.dsn(region)}",
                f"    metrics_address: {self.metrics_address(region)}",
                *self._region_kafka_lines(region),
            ]
        lines += [
            "tables:",
            "  orders:    {key: [id], policy: lww}",
            "  inventory: {key: [sku], policy: merge, fields: {stock: counter, tags: set}}",
            "  payments:  {key: [id], policy: manual}",
        ]
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(self.config_text())
        tmp.replace(self.config_path)
        return self.config_path
