"""Small process, port and file helpers shared by the PostgreSQL and Kafka launchers.

They exist so that every "is it running?" question is answered the same way: by a
PID we recorded, checked for liveness (zombies count as dead), and never by a
process name, because killing by name would take down other people's servers.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True when ``pid`` names a live process (a zombie is not live).

    A zombie still answers ``kill(pid, 0)``; a broker we started in this process
    and then killed stays a zombie until reaped, and must not look running.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Exists but belongs to someone else: alive, but surely not ours.
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        # The state letter follows the parenthesised command, which may contain spaces.
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs (not Linux): kill(0) is the best we have
    return state not in ("Z", "X")


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def proc_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from procfs, or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_pid_file(path: Path) -> int | None:
    """The integer on the first line of ``path``, or None if absent or garbled."""
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages; empty if unreadable."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def with_log_tail(message: str, *logs: Path) -> str:
    """Append the tail of each non-empty log to ``message`` so one error says it all."""
    parts = [message]
    for log in logs:
        text = tail(log)
        if text:
            parts.append(f"--- last lines of {log} ---\n{text}")
    return "\n".join(parts)


class Deadline:
    """A monotonic point in time that waits count down to, shared across steps."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` or until the deadline, whichever comes first."""
        time.sleep(min(seconds, self.remaining()))
