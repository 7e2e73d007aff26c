"""Running one drill end to end: the single entry point of ``reconciler drill``, the
demo and the integration tests, so that all three exercise exactly the same thing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..devstack import DevStack
from ..errors import ConfigError
from ..logs import JsonFormatter
from .harness import Drill, Scenario
from .scenarios import SCENARIOS

#: the keys every drill report has, whatever happened
REQUIRED_KEYS = ("scenario", "passed", "events_written", "events_lost", "duplicates_applied", "regions_converged",
                 "rto_seconds", "checks")


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ConfigError(f"unknown drill {name!r}; known drills: {', '.join(SCENARIOS)}") from None


def default_dev_dir() -> Path:
    return Path(os.environ.get("RECONCILER_DEV_DIR", ".dev"))


def run_drill(
    name: str,
    *,
    scale: float = 1.0,
    dev_dir: Path | None = None,
    json_out: Path | None = None,
    log: Callable[[str], None] | None = None,
    keep_workdir: bool = False,
    seed: int | None = None,
    minutes: float | None = None,
    writes_per_second: float | None = None,
) -> dict[str, Any]:
    """Run scenario ``name`` against the local stack; returns (and writes) the report.

    The drill's databases, topics and consumer groups are removed afterwards,
    whatever the outcome. Its working directory (config, sidecar logs) is removed
    when the drill passed and kept, named in the report, when it did not.
    """
    chosen = scenario(name)
    if scale <= 0:
        raise ConfigError(f"--scale must be positive, got {scale}")
    stack = DevStack.from_state(dev_dir or default_dev_dir())
    workdir = Path(tempfile.mkdtemp(prefix=f"reconciler-drill-{name}-"))
    history = json_out.with_name(json_out.stem + ".history.jsonl") if json_out else workdir / "history.jsonl"
    if minutes is not None and minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    if writes_per_second is not None and writes_per_second <= 0:
        raise ConfigError(f"--writes-per-second must be positive, got {writes_per_second}")
    drill = Drill(chosen, stack, scale, workdir, history, log=log or (lambda _m: None), seed=seed, minutes=minutes,
                  writes_per_second=writes_per_second)
    started = time.monotonic()
    with _pipeline_log(workdir / "pipeline.log"):
        report = _run(drill, chosen)
    report["wall_seconds"] = round(time.monotonic() - started, 2)
    if report["passed"] and not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        report["workdir"] = str(workdir)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    return report


def _run(drill: Drill, chosen: Scenario) -> dict[str, Any]:
    error: BaseException | None = None
    report: dict[str, Any]
    try:
        try:
            drill.setup()
            chosen.run(drill)
        except Exception as exc:  # noqa: BLE001 - the report says what broke; the cleanup below must run
            error = exc
        if hasattr(drill, "sampler"):
            report = drill.finish(error)
        else:
            report = _setup_failed(chosen, error)
    finally:
        env = getattr(drill, "env", None)
        problems = env.cleanup() if env is not None else []
    report["cleanup_problems"] = problems
    return report


@contextlib.contextmanager
def _pipeline_log(path: Path) -> Iterator[None]:
    """In-process loops log their retries (every outage makes many): to a file in the
    drill's working directory, not over the drill's own output."""
    logger = logging.getLogger("reconciler")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
        handler.close()


def _setup_failed(chosen: Scenario, error: BaseException | None) -> dict[str, Any]:
    detail = f"{type(error).__name__}: {error}" if error else "setup did not complete"
    return {
        "scenario": chosen.name, "passed": False, "events_written": 0, "events_lost": 0, "duplicates_applied": 0,
        "regions_converged": False, "rto_seconds": None,
        "checks": [{"name": "setup", "passed": False, "detail": detail}],
        "description": chosen.summary,
    }
