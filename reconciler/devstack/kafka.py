"""A single-node Apache Kafka broker in KRaft mode, started from jars Maven resolved.

There is no Docker engine and no Kafka distribution on our machines, but there is
Java 17 and Maven: ``pom.xml`` names the broker jars, ``mvn dependency:copy-dependencies``
copies them (and their runtime dependencies) into ``<root>/kafka/libs`` once, and the
broker runs as ``java -cp 'libs/*' kafka.Kafka server.properties``. A stamp file
records which pom the jars came from, so Maven is only started when the pom changes.

The broker is a detached process (its own session) whose PID we record; it is only
ever signalled through that PID, after checking that the PID still runs *our*
broker (argv names our server.properties), so a recycled PID is never killed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ..errors import DevStackError
from ._process import Deadline, pid_alive, port_open, proc_cmdline, read_pid_file, reap, with_log_tail
from .kafka_security import ADMIN_USER, AUTH_MODES, MECHANISM, Credentials
from .kafka_security import server_properties as secure_server_properties

JAVA_HINT = "install Java 17: `apt-get install -y openjdk-17-jre-headless` (or set JAVA_HOME)"
MAVEN_HINT = "install Maven: `apt-get install -y maven`"
_STAMP = ".resolved.json"
_MAIN_CLASS = "kafka.Kafka"


def find_java() -> str:
    """Path of a ``java`` (JAVA_HOME first, then PATH) that is at least Java 11."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.exists() else shutil.which("java")
    if not java:
        raise DevStackError(f"Java not found (needed for the Kafka broker); {JAVA_HINT}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevStackError(f"{java} -version failed: {exc}; {JAVA_HINT}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):  # "1.8.0_x" style
            major = int(match.group(2))
        if major < 11:
            raise DevStackError(f"{java} is Java {major}; Kafka 3.9 needs 11 or newer; {JAVA_HINT}")
    return java


def find_maven() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise DevStackError(f"Maven (mvn) not found (needed once to fetch the Kafka jars); {MAVEN_HINT}")
    return mvn


def pom_kafka_version(pom: Path) -> str:
    """The ``kafka.version`` property of the pom, for status output and the stamp."""
    try:
        root = ET.parse(pom).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DevStackError(f"cannot read {pom}: {exc}") from exc
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = root.find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise DevStackError(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


class KafkaLibs:
    """The broker's classpath directory, resolved by Maven from the pom at most once."""

    def __init__(self, pom: Path, libs_dir: Path) -> None:
        self.pom = pom
        self.libs_dir = libs_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._log: Path | None = None

    def _wanted_stamp(self) -> dict[str, str]:
        if not self.pom.exists():
            raise DevStackError(f"{self.pom} not found: it lists the Kafka jars to fetch")
        return {
            "pom_sha256": hashlib.sha256(self.pom.read_bytes()).hexdigest(),
            "kafka_version": pom_kafka_version(self.pom),
        }

    def ready(self) -> bool:
        """True when the libs dir holds jars resolved from this very pom."""
        try:
            stamp = json.loads((self.libs_dir / _STAMP).read_text())
        except (OSError, ValueError):
            return False
        return bool(stamp == self._wanted_stamp() and any(self.libs_dir.glob("kafka_*.jar")))

    def begin(self, log: Path) -> None:
        """Start Maven in the background (so PostgreSQL can start meanwhile)."""
        if self._proc is not None:
            return
        self._wanted_stamp()  # fail fast on a missing or broken pom
        mvn = find_maven()
        self._tmp = self.libs_dir.with_name(f"{self.libs_dir.name}.tmp-{os.getpid()}")
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            self._proc = subprocess.Popen(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-Dstyle.color=never",
                    "-f",
                    str(self.pom),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={self._tmp}",
                    "-DincludeScope=runtime",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # not the pom's directory: inside an installed package it may be read-only
                cwd=self.libs_dir.parent,
            )

    def finish(self, timeout: float = 900) -> None:
        """Wait for Maven, then swap the new jars in and write the stamp."""
        if self._proc is None:
            return
        proc, tmp, log = self._proc, self._tmp, self._log
        assert tmp is not None and log is not None
        self._proc = None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise DevStackError(with_log_tail(f"Maven did not resolve the Kafka jars in {timeout:.0f}s", log)) from exc
        if code != 0 or not any(tmp.glob("kafka_*.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            raise DevStackError(
                with_log_tail(
                    f"Maven failed to resolve the Kafka jars from {self.pom} (exit {code}); "
                    "is Maven Central reachable?",
                    log,
                )
            )
        (tmp / _STAMP).write_text(json.dumps(self._wanted_stamp()))
        # Swap whole directories so a broker never sees a half-copied classpath.
        if self.libs_dir.exists():
            shutil.rmtree(self.libs_dir)
        tmp.rename(self.libs_dir)

    def ensure(self, log: Path) -> bool:
        """Resolve synchronously if needed; True when Maven had to run."""
        if self.ready():
            return False
        self.begin(log)
        self.finish()
        return True


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (22 chars).

    Never one starting with "-" (1 in 64 would): the storage tool's argument parser
    takes such a value for an option, and formatting fails.
    """
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class KafkaBroker:
    """One KRaft node acting as broker and controller, on loopback ports."""

    def __init__(
        self,
        home: Path,
        logs_dir: Path,
        port: int,
        libs: KafkaLibs,
        heap_mb: int = 512,
        auth: str = "none",
    ) -> None:
        if auth not in AUTH_MODES:
            raise DevStackError(f"unknown Kafka auth mode {auth!r}; expected one of {', '.join(AUTH_MODES)}")
        self.auth = auth
        self.credentials = Credentials(home / "secrets")
        self.home = home
        self.logs_dir = logs_dir
        self.port = port
        self.controller_port = port + 1
        self.libs = libs
        self.heap_mb = heap_mb
        self._proc: subprocess.Popen[bytes] | None = None

    # paths -----------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def server_properties(self) -> Path:
        return self.home / "server.properties"

    @property
    def log4j_properties(self) -> Path:
        return self.home / "log4j.properties"

    @property
    def pid_file(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def cluster_id_file(self) -> Path:
        return self.home / "cluster.id"

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "kafka.log"

    @property
    def out_path(self) -> Path:
        """stdout/stderr of the JVM: crashes before log4j is up land here."""
        return self.logs_dir / "kafka.out"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def auth_mode_file(self) -> Path:
        """Which auth the storage was formatted for: SCRAM users are created at format time."""
        return self.home / "auth.mode"

    def client_settings(self, user: str = ADMIN_USER) -> dict[str, str]:
        """librdkafka settings to reach this broker (as ``user`` when auth is on)."""
        if self.auth == "none":
            return {"bootstrap.servers": self.bootstrap_servers}
        return self.credentials.client_settings(self.bootstrap_servers, user)

    # configuration -----------------------------------------------------------
    def cluster_id(self) -> str:
        """The cluster id, generated once and kept, because the storage is formatted with it."""
        try:
            cid = self.cluster_id_file.read_text().strip()
            if len(cid) == 22:
                return cid
        except OSError:
            pass
        cid = new_cluster_id()
        self.cluster_id_file.write_text(cid + "\n")
        return cid

    def write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50: creating 50 on the first consumer group
            # costs seconds per test session for nothing on a single node.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "auto.create.topics.enable": "false",
            "group.initial.rebalance.delay.ms": "0",
            # Tests set tiny per-topic retention and expect it to bite within seconds.
            "log.retention.check.interval.ms": "1000",
            "log.initial.task.delay.ms": "1000",
            "log.segment.delete.delay.ms": "1000",
            # The cleaner's default 128 MB dedupe buffer would be a quarter of the heap.
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
        }
        if self.auth == "scram":
            admin_password = self.credentials.password(ADMIN_USER)
            props.update(secure_server_properties(self.port, self.controller_port, admin_password))
        # it may hold the admin password (the broker's own SCRAM login)
        self.server_properties.touch(mode=0o600)
        os.chmod(self.server_properties, 0o600)
        self.server_properties.write_text(
            "# written by `reconciler dev up`; rewritten on every start\n"
            + "".join(f"{k}={v}\n" for k, v in props.items())
        )
        log = str(self.log_path)
        self.log4j_properties.write_text(
            "# written by `reconciler dev up`: broker log to a file, warnings and up\n"
            "log4j.rootLogger=WARN, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={log}\n"
            "log4j.appender.file.Append=true\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            # One INFO line that says the broker finished starting, for humans reading the log.
            "log4j.logger.kafka.server.KafkaRaftServer=INFO\n"
        )

    @property
    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").exists()

    def _classpath(self) -> str:
        return f"{self.libs.libs_dir}/*"

    def _java_base(self, java: str) -> list[str]:
        return [
            java,
            "-Xms256m",
            f"-Xmx{self.heap_mb}m",
            # C1 only: the broker starts ~30% faster on our two busy cores, and a test
            # broker never runs long enough for C2's peak code to pay back.
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.log4j_properties}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            self._classpath(),
        ]

    def format(self, java: str) -> None:
        """Format the KRaft storage once with our cluster id (StorageTool, in kafka_2.13).

        With SCRAM on, the admin user is created here (KRaft records it in the
        metadata log at format time): nobody could log in to create it later.
        Region users are added through the admin API once the broker runs.
        """
        if self.formatted:
            recorded = self.auth_mode_file.read_text().strip() if self.auth_mode_file.exists() else "none"
            if recorded != self.auth and self.auth == "scram":
                raise DevStackError(
                    f"Kafka storage in {self.data_dir} was formatted without SCRAM users; "
                    "start with `dev up --fresh` to switch --kafka-auth"
                )
            return
        scram = (
            [f"--add-scram={MECHANISM}=[name={ADMIN_USER},password={self.credentials.password(ADMIN_USER)}]"]
            if self.auth == "scram" else []
        )
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j.configuration=file:{self.log4j_properties}",
            "-cp",
            self._classpath(),
            "kafka.tools.StorageTool",
            "format",
            # the "=" forms: a value starting with "-" (an id kept from an older run)
            # is still a value, not an option
            f"--cluster-id={self.cluster_id()}",
            f"--config={self.server_properties}",
            *scram,
        ]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise DevStackError("formatting Kafka storage timed out after 120s") from exc
        if result.returncode != 0:
            raise DevStackError(
                with_log_tail(
                    f"formatting Kafka storage failed (exit {result.returncode}): "
                    f"{self._masked(result.stdout + result.stderr).strip()}",
                    self.log_path,
                )
            )
        self.auth_mode_file.write_text(self.auth + "\n")

    def _masked(self, text: str) -> str:
        """Tool output with the admin password (it was on the command line) masked."""
        if self.auth == "none" or not self.credentials.path(ADMIN_USER).exists():
            return text
        return text.replace(self.credentials.password(ADMIN_USER), "***")

    # process ------------------------------------------------------------------
    def pid(self) -> int | None:
        """PID of our running broker, or None.

        The PID file alone could name a recycled PID, so the process must also be
        live and its argv must name our main class and our server.properties.
        """
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        pid = read_pid_file(self.pid_file)
        if pid is None or not pid_alive(pid):
            return None
        argv = proc_cmdline(pid)
        if argv is not None and (_MAIN_CLASS not in argv or str(self.server_properties) not in argv):
            return None
        return pid

    def start(self, java: str) -> None:
        """Launch the broker detached and return at once; see :meth:`wait_ready`."""
        if self.pid() is not None:
            return
        self.write_config()
        if port_open(self.port) or port_open(self.controller_port):
            raise DevStackError(
                f"port {self.port} or {self.controller_port} is already in use by a process we did not "
                "start (a broker from a deleted .dev directory?); free it or choose another --kafka-port"
            )
        self.format(java)
        with self.out_path.open("ab") as out:
            out.write(f"\n=== starting broker at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            out.flush()
            # Own session: Ctrl-C in the terminal that ran `dev up` must not reach it.
            self._proc = subprocess.Popen(
                [*self._java_base(java), _MAIN_CLASS, str(self.server_properties)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
                close_fds=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")

    def _exited(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is not None
        return self.pid() is None

    def wait_ready(self, deadline: Deadline) -> None:
        """Wait until the broker answers a metadata request naming itself."""
        last = "port not open"
        while True:
            if self._exited():
                raise DevStackError(with_log_tail("Kafka broker exited while starting", self.out_path, self.log_path))
            if port_open(self.port):
                ok, last = self.ping(timeout=min(5.0, max(1.0, deadline.remaining())))
                if ok:
                    return
            if deadline.expired():
                raise DevStackError(
                    with_log_tail(
                        f"Kafka broker on {self.bootstrap_servers} did not answer a metadata request in time ({last})",
                        self.out_path,
                        self.log_path,
                    )
                )
            deadline.sleep(0.25)

    def ping(self, timeout: float = 3.0) -> tuple[bool, str]:
        """(True, "") when a metadata request lists this broker; else (False, why)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        conf: dict[str, Any] = {
            **self.client_settings(),
            # librdkafka would print every refused connection to stderr.
            "log_level": 0,
            "socket.connection.setup.timeout.ms": int(max(1.0, timeout) * 1000),
        }
        try:
            metadata = AdminClient(conf).list_topics(timeout=timeout)
        except KafkaException as exc:
            return False, str(exc)
        if not metadata.brokers:
            return False, "metadata lists no broker"
        return True, ""

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM our broker, SIGKILL it after ``timeout``; True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal(pid, signal.SIGTERM)
        if not self._wait_gone(pid, Deadline(timeout)):
            _signal(pid, signal.SIGKILL)
            if not self._wait_gone(pid, Deadline(10)):
                raise DevStackError(f"Kafka broker (pid {pid}) survived SIGKILL")
        self._proc = None
        self.pid_file.unlink(missing_ok=True)
        return True

    def _wait_gone(self, pid: int, deadline: Deadline) -> bool:
        while True:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            else:
                reap(pid)
                if not pid_alive(pid):
                    return True
            if deadline.expired():
                return False
            deadline.sleep(0.1)

    def wipe(self) -> None:
        """Forget all topics and the cluster id (the broker must be stopped)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.cluster_id_file.unlink(missing_ok=True)
        self.auth_mode_file.unlink(missing_ok=True)
        shutil.rmtree(self.credentials.secrets_dir, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    """Signal ``pid``, ignoring that it may have exited since we looked."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
