"""One PostgreSQL server per region, started from the distribution's binaries.

Each region gets its own cluster (initdb) so that a chaos drill can kill one region's
database while the others keep serving. Servers listen on 127.0.0.1 only and trust
local connections: this is a throwaway development stack, never a deployment.

PostgreSQL refuses to run as root. When we are root, every server tool runs as the
``postgres`` OS user, and the clusters live under ``/tmp/reconciler-pg-<hash>`` (owned
by that user) rather than inside the repository, because CI clones the repository
into a ``mktemp -d`` directory (mode 0700) that the ``postgres`` user cannot enter.
``<root>/pg`` is then a symlink to that directory so that people find the data where
they expect it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from ..errors import DevStackError
from ._process import Deadline, pid_alive, port_open, proc_cmdline, with_log_tail

# Where Debian installs each major version's server tools (outside PATH).
PG_LIB_DIR = Path("/usr/lib/postgresql")
INSTALL_HINT = "install the PostgreSQL server: `apt-get install -y postgresql` (or `make postgres-bin`)"
DATABASE = "reconciler"
SUPERUSER = "postgres"

# Appended once to postgresql.conf by initdb time; the included file is rewritten on
# every start so that a changed port takes effect without touching initdb's file.
_INCLUDE_LINE = "include_if_exists = 'reconciler.conf'\n"


@dataclass(frozen=True)
class RunAs:
    """The OS identity PostgreSQL's tools run under (None fields: our own)."""

    uid: int | None = None
    gid: int | None = None

    @property
    def switching(self) -> bool:
        return self.uid is not None


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl/postgres, the newest version when several exist.

    Debian keeps the server tools out of PATH (under /usr/lib/postgresql/N/bin), so
    that is searched first; PATH is the fallback for other layouts.
    """
    candidates: list[tuple[int, Path]] = []
    for initdb in PG_LIB_DIR.glob("*/bin/initdb"):
        version = initdb.parent.parent.name
        if version.isdigit():
            candidates.append((int(version), initdb.parent))
    if candidates:
        return max(candidates)[1]
    found = shutil.which("initdb")
    if found:
        bindir = Path(found).resolve().parent
        if (bindir / "pg_ctl").exists() and (bindir / "postgres").exists():
            return bindir
    raise DevStackError(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; {INSTALL_HINT}")


def server_identity() -> RunAs:
    """Who runs the servers: ourselves, or the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return RunAs()
    try:
        entry = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise DevStackError(
            "running as root, but PostgreSQL refuses root and there is no `postgres` OS user "
            f"to run it as; {INSTALL_HINT} (it creates the user), or `useradd --system postgres`"
        ) from None
    return RunAs(uid=entry.pw_uid, gid=entry.pw_gid)


def shared_base(dev_root: Path) -> Path:
    """The postgres-owned directory a root run keeps ``dev_root``'s clusters in.

    Named by a hash of the absolute ``dev_root`` so that two checkouts never share
    clusters, and so that a fresh checkout at the same path finds (and discards)
    what an earlier one left behind.
    """
    digest = hashlib.sha256(str(dev_root.resolve()).encode()).hexdigest()[:10]
    return Path(f"/tmp/reconciler-pg-{digest}")


def prepare_base(dev_root: Path, run_as: RunAs) -> Path:
    """Create (if needed) the directory that holds every region's cluster and return it.

    As root the real directory is outside the repository (see module docstring) and
    ``<dev_root>/pg`` links to it. A fresh ``<dev_root>`` (no link yet) with a leftover
    directory from an earlier checkout at the same path means that directory is
    orphaned: its servers are stopped through their own data directories and the
    data is discarded, so that "fresh .dev" really starts fresh.
    """
    link = dev_root / "pg"
    if not run_as.switching:
        if link.is_symlink():
            # A stack made as root, now used as a normal user: we cannot use it.
            raise DevStackError(f"{link} is a symlink made by a root run; remove {dev_root} and retry")
        link.mkdir(parents=True, exist_ok=True)
        return link
    base = shared_base(dev_root)
    if link.is_symlink() and Path(os.readlink(link)) == base and base.is_dir():
        _check_owned(base, run_as)
        return base
    if link.exists() or link.is_symlink():
        if link.is_symlink():
            link.unlink()
        else:
            raise DevStackError(f"{link} exists and is not our symlink; remove it and retry")
    if base.exists() or base.is_symlink():
        _check_owned(base, run_as)
        _discard_orphan(base, run_as)
    base.mkdir(mode=0o700)
    assert run_as.uid is not None and run_as.gid is not None
    os.chown(base, run_as.uid, run_as.gid)
    link.symlink_to(base)
    return base


def _check_owned(base: Path, run_as: RunAs) -> None:
    """Refuse a /tmp directory that someone else planted: /tmp is world-writable."""
    st = base.lstat()
    if base.is_symlink() or not base.is_dir() or st.st_uid != run_as.uid:
        raise DevStackError(f"{base} exists but is not a directory owned by the postgres user; remove it and retry")


def _discard_orphan(base: Path, run_as: RunAs) -> None:
    bindir = find_bindir()
    for data_dir in sorted(p for p in base.iterdir() if (p / "PG_VERSION").exists()):
        server = PostgresServer(data_dir.name, data_dir, 0, base / f"{data_dir.name}.log", bindir, run_as)
        if server.pid() is not None:
            server.stop("immediate")
    shutil.rmtree(base)


def remove_base(dev_root: Path) -> None:
    """Delete every cluster of ``dev_root`` (servers must be stopped) and the link to them.

    Only the directory this module itself would have made is deleted, whatever
    ``<dev_root>/pg`` happens to point at, so a hand-edited link cannot aim rmtree
    somewhere else.
    """
    link = dev_root / "pg"
    if link.is_symlink():
        base = shared_base(dev_root)
        if base.is_dir() and not base.is_symlink():
            shutil.rmtree(base)
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)


class PostgresServer:
    """One region's PostgreSQL cluster: create, configure, start, stop, check."""

    def __init__(
        self,
        region: str,
        data_dir: Path,
        port: int,
        log_path: Path,
        bindir: Path,
        run_as: RunAs,
    ) -> None:
        self.region = region
        self.data_dir = data_dir
        self.port = port
        self.log_path = log_path
        self.bindir = bindir
        self.run_as = run_as

    def dsn(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def _run(self, args: Sequence[str], what: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a server tool as the server's OS user; a failure becomes DevStackError."""
        tool = Path(args[0]) if Path(args[0]).is_absolute() else self.bindir / args[0]
        if not tool.exists():
            raise DevStackError(f"{tool} not found; {INSTALL_HINT}", region=self.region)
        # Start in a directory the postgres user can read: the caller's working
        # directory may be a 0700 CI checkout the tools cannot even stat.
        cwd = self.data_dir.parent
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        if self.run_as.switching:
            env["HOME"] = str(cwd)
        try:
            result = subprocess.run(
                [str(tool), *args[1:]],
                cwd=cwd,
                env=env,
                user=self.run_as.uid,
                group=self.run_as.gid,
                extra_groups=[] if self.run_as.switching else None,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevStackError(
                with_log_tail(f"{what} timed out after {timeout:.0f}s", self.log_path), region=self.region
            ) from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise DevStackError(
                with_log_tail(f"{what} failed (exit {result.returncode}): {output}", self.log_path),
                region=self.region,
            )
        return result

    def init(self) -> None:
        """Create the cluster (initdb), trusting loopback, UTF-8, no locale."""
        self._run(
            [
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                # Throwaway clusters: flushing initdb's files is seconds of nothing.
                "--no-sync",
            ],
            f"initdb of {self.data_dir}",
        )
        with (self.data_dir / "postgresql.conf").open("a") as fh:
            fh.write("\n# added by reconciler dev up\n" + _INCLUDE_LINE)

    def configure(self) -> None:
        """(Re)write the settings we own; applied at the next start."""
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            # No Unix socket: nothing of ours uses one, and a shared /var/run path
            # would collide with a system PostgreSQL.
            "unix_socket_directories": "''",
            "shared_buffers": "32MB",
            "max_connections": "100",
            # So that pg_basebackup works for stale-backup restore drills.
            "wal_level": "replica",
            "max_wal_senders": "4",
            "max_replication_slots": "4",
            # crash recovery replays the WAL since the last checkpoint: under a drill's
            # load the default five minutes of it took longer than a start may wait
            "checkpoint_timeout": "'30s'",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] '",
        }
        path = self.data_dir / "reconciler.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        if self.run_as.switching:
            assert self.run_as.uid is not None and self.run_as.gid is not None
            os.chown(path, self.run_as.uid, self.run_as.gid)
        path.chmod(0o600)

    def pid(self) -> int | None:
        """PID of our running postmaster, from its own postmaster.pid, or None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, IndexError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        # A postmaster.pid left by a crash can name a PID the kernel has since given
        # to another program; pg_ctl stop would signal it. Require our data dir in argv.
        argv = proc_cmdline(pid)
        if argv is not None:
            try:
                given = Path(argv[argv.index("-D") + 1])
            except (ValueError, IndexError):
                return None
            if given.resolve() != self.data_dir.resolve():
                return None
        return pid

    def running_port(self) -> int | None:
        """The port the running postmaster listens on (postmaster.pid line 4)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, IndexError, ValueError):
            return None

    def start(self, timeout: float = 180) -> None:
        """Start the server and wait until pg_ctl sees it ready; no-op when running."""
        if self.pid() is not None:
            if self.running_port() != self.port:
                raise DevStackError(
                    f"PostgreSQL for {self.region} is running on port {self.running_port()}, "
                    f"not {self.port}; run `reconciler dev down` first",
                    region=self.region,
                )
            return
        if port_open(self.port):
            raise DevStackError(
                f"port {self.port} is already in use by a process we did not start; "
                "free it or choose another --pg-base-port",
                region=self.region,
            )
        if not self.initialized:
            self.init()
        self.configure()
        self._run(
            [
                "pg_ctl",
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(timeout)),
                "-s",
            ],
            f"pg_ctl start for {self.region}",
            timeout=timeout + 10,
        )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server (pg_ctl stop -m MODE); no-op when it is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise DevStackError(f"unknown stop mode {mode!r}; use fast or immediate", region=self.region)
        if self.pid() is None:
            return
        self._run(
            ["pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(timeout)), "-s"],
            f"pg_ctl stop -m {mode} for {self.region}",
            timeout=timeout + 10,
        )

    def ping(self, timeout: float = 2.0, database: str = DATABASE) -> bool:
        """True when the server answers ``SELECT 1`` on ``database``."""
        try:
            with psycopg.connect(self.dsn(database), connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def wait_ready(self, deadline: Deadline) -> None:
        """Wait until ``SELECT 1`` works over TCP, then make sure our database exists."""
        last: Exception | None = None
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
                    if exists is None:
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
                return
            except psycopg.Error as exc:
                last = exc
            if self.pid() is None:
                raise DevStackError(
                    with_log_tail(f"PostgreSQL for {self.region} exited while starting", self.log_path),
                    region=self.region,
                )
            if deadline.expired():
                raise DevStackError(
                    with_log_tail(
                        f"PostgreSQL for {self.region} on port {self.port} did not answer SELECT 1 in time: {last}",
                        self.log_path,
                    ),
                    region=self.region,
                )
            deadline.sleep(0.2)

    def base_backup(self, target: Path, timeout: float = 300) -> None:
        """Copy the running cluster into ``target`` with pg_basebackup (WAL included).

        ``target`` must not exist and its parent must be writable by the server's OS
        user. The copy starts as an ordinary primary once restored: no standby
        signal file is written, so recovery ends at the backup's end point.
        """
        if self.pid() is None:
            raise DevStackError(f"cannot back up {self.region}: its PostgreSQL is not running", region=self.region)
        self._run(
            [
                "pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-D",
                str(target),
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            f"pg_basebackup of {self.region}",
            timeout=timeout,
        )

    def replace_data(self, source: Path) -> None:
        """Make the (stopped) cluster a copy of ``source``; ``source`` stays usable.

        Copied as the server's OS user (``cp -a``) so ownership and the 0700 mode
        PostgreSQL insists on come out right without a recursive chown.
        """
        if self.pid() is not None:
            raise DevStackError(f"stop {self.region} before replacing its data", region=self.region)
        if not (source / "PG_VERSION").exists():
            raise DevStackError(f"{source} is not a PostgreSQL data directory", region=self.region)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        cp = shutil.which("cp") or "/bin/cp"
        self._run([cp, "-a", str(source), str(self.data_dir)], f"copying {source} over {self.region}")
