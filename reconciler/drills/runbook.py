"""Runbooks as executable procedures: the drill runs the operator's commands for real.

A drill that recovered a region by calling ``recover()`` directly would prove the
code works, not that the runbook does. :func:`runbook_commands` reads the
```shell blocks of a runbook, and :func:`adapt` rewrites one command for the
drill's environment (its config file instead of ``/etc/reconciler/...``, its
regions instead of the runbook's example names). Which commands a drill executes
is the drill's choice (read-only diagnosis and ``recover``; not ``activate
--force``, which would bypass the very gate being tested). Parsing is pure; only
:func:`execute` starts a process.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..resources import CHECKOUT, PACKAGED

#: the config path every runbook uses in its examples
RUNBOOK_CONFIG = "/etc/reconciler/reconciler.yaml"
#: the example regions runbooks are written with: the failed one first
RUNBOOK_REGIONS = ("us-east", "eu-west", "ap-south")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})([^`]*)$")
_SHELL = {"shell", "sh", "bash", "console"}


@dataclass(frozen=True)
class RunbookCommand:
    """One logical command line of a runbook (continuations joined)."""

    source: str
    line: int
    argv: tuple[str, ...]

    @property
    def subcommand(self) -> str:
        """``recover``, ``gaps``, ``status``, ``conflicts list`` …"""
        words = [a for a in self.argv[1:] if not a.startswith("-")]
        if not words:
            return ""
        if words[0] in ("conflicts", "quarantine", "dev") and len(words) > 1:
            return f"{words[0]} {words[1]}"
        return words[0]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def runbook_commands(text: str, source: str = "runbook") -> list[RunbookCommand]:
    """The ``reconciler`` commands of every shell block, in document order."""
    commands: list[RunbookCommand] = []
    fence: str | None = None
    lang = ""
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, lang = match.group(1), (match.group(2).strip().split(" ")[0].lower())
            continue
        if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not match.group(2).strip():
            fence = None
            continue
        if lang not in _SHELL:
            continue
        stripped = line.strip()
        if pending is None and (not stripped or stripped.startswith("#")):
            continue
        start, joined = pending if pending is not None else (number, "")
        joined = f"{joined} {stripped.removesuffix(chr(92)).strip()}".strip()
        if stripped.endswith("\\"):
            pending = (start, joined)
            continue
        pending = None
        argv = tuple(shlex.split(joined.removeprefix("$ ")))
        if argv and argv[0] == "reconciler":
            commands.append(RunbookCommand(source, start, argv))
    return commands


def adapt(command: RunbookCommand, config_path: str, regions: Mapping[str, str]) -> tuple[str, ...]:
    """The command with the drill's config and regions (``regions`` maps the runbook's
    example region names to the drill's). Only whole arguments and comma-separated
    lists are rewritten, never free text such as a ``--reason``."""
    out: list[str] = []
    previous = ""
    for arg in command.argv:
        if arg == RUNBOOK_CONFIG:
            out.append(config_path)
        elif arg.startswith("--config="):
            out.append(f"--config={config_path}")
        elif previous in ("--region", "--take", "--regions") or arg in regions:
            out.append(",".join(regions.get(part, part) for part in arg.split(",")))
        else:
            out.append(arg)
        previous = arg
    return tuple(out)


def region_mapping(failed: str, survivors: Sequence[str]) -> dict[str, str]:
    """Runbook example names -> drill names: the runbooks' us-east is the failed region."""
    drill = [failed, *[s for s in survivors if s != failed]]
    return {example: mine for example, mine in zip(RUNBOOK_REGIONS, drill, strict=False)}


def find_runbook(name: str, start: Path | None = None) -> Path:
    """``runbooks/<name>``: the installed package's, the checkout's it runs from, or the cwd's."""
    candidates = [PACKAGED / "runbooks" / name, CHECKOUT / "runbooks" / name, Path.cwd() / "runbooks" / name]
    if start is not None:
        candidates.insert(0, start / name)
    for path in candidates:
        if path.exists():
            return path
    raise ConfigError(f"runbook {name} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


@dataclass
class StepResult:
    """One runbook command as the drill executed it (or chose not to)."""

    where: str
    command: str
    executed: bool
    exit_code: int | None = None
    seconds: float = 0.0
    output: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "where": self.where, "command": self.command, "executed": self.executed, "exit_code": self.exit_code,
            "seconds": round(self.seconds, 2), "output": self.output, "note": self.note,
        }


def run_cli(argv: Sequence[str], timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``reconciler ...`` as the operator would, with this interpreter (so the
    drill tests the installed code, not whatever ``reconciler`` is first on PATH).
    Returns (exit code, stdout, stderr); exit -1 when it timed out."""
    try:
        # no stdin: a command that asks for confirmation without --yes exits 2 at once
        done = subprocess.run([sys.executable, "-m", "reconciler.cli", *argv[1:]], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, partial, f"timed out after {timeout:.0f}s"
    return done.returncode, done.stdout, done.stderr


def execute(argv: Sequence[str], timeout: float = 120.0) -> tuple[int, str, float]:
    """:func:`run_cli`, returning (exit code, the output's first and last lines, seconds):
    the last ones hold a recover's verdict and the gate's reasons."""
    started = time.monotonic()
    code, out, err = run_cli(argv, timeout)
    # stderr carries progress bars besides errors: only its error lines are kept
    lines = [line for line in out.splitlines() if line.strip()]
    lines += [line for line in err.splitlines() if line.startswith(("error", "warning", "timed out"))]
    if len(lines) > 20:
        lines = [*lines[:12], f"… ({len(lines) - 20} lines left out)", *lines[-8:]]
    summary = "\n".join(lines)
    return code, summary, time.monotonic() - started
