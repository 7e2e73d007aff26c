"""Usage: .venv/bin/python benchmarks/bench_rto.py [--dev-dir DIR] [--missing 1000,10000] [--repeat 3]
                                               [--json-out benchmarks/results/rto.json] [--baseline REV]

The machine's part of a failback: how long a region's sidecar takes, from the moment
it is started, to bring a region that missed N events back to ACTIVE (issue 15,
item 6; goal: under 2 s for 1,000 missing events).

Per size and round, on the local stack: three regions, each with its sidecar (a real
``reconciler run`` process); us-east's sidecar is SIGKILLed; N events are written in
eu-west through ``reconciler.outbox.write`` (orders, 100 per transaction) and relayed
by eu-west's sidecar; then us-east's sidecar is started again. Its region's lifecycle
log splits the time: start -> CATCHING_UP (process start and the start decision),
-> VERIFYING (replay), -> ACTIVE (verification and the gate). Every round checks
that us-east holds every one of the N events.

``--baseline REV``: the same rounds, alternated, with us-east's sidecar running the
code of git revision REV (a worktree put first on its ``PYTHONPATH``), so a change is
measured against what it replaced in one run on the same machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler import outbox  # noqa: E402
from reconciler.devstack import DevStack  # noqa: E402
from reconciler.drills.env import DrillEnv  # noqa: E402
from reconciler.drills.loops import SidecarProcess  # noqa: E402
from reconciler.drills.runner import default_dev_dir  # noqa: E402
from reconciler.store.inspection import Inspector  # noqa: E402
from reconciler.store.postgres_store import open_store  # noqa: E402

DOWN, WRITER = "us-east", "eu-west"


def wait_for(what: str, check: Any, timeout: float, poll: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
    return time.monotonic()


def write_events(dsn: str, n: int, tag: str) -> None:
    with open_store(dsn, region=WRITER) as store:
        for start in range(0, n, 100):
            with store.transaction():
                for i in range(start, min(n, start + 100)):
                    outbox.write(store, "orders", "insert", {"id": f"{tag}-{i}"},
                                 values={"customer": "bench", "status": "new", "total_cents": i})


def published(db: Inspector) -> int:
    return int(db.scalar("SELECT coalesce(max(published_through), 0) FROM reconciler.relay_state"
                         " WHERE origin = %s", (WRITER,)))


@contextmanager
def code_of(tree: Path | None) -> Iterator[None]:
    """Processes started inside run the package found in ``tree`` (None: this one)."""
    before = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def one_round(env: DrillEnv, sidecars: dict[str, SidecarProcess], n: int, tag: str,
              tree: Path | None = None) -> dict[str, Any]:
    db = {r: Inspector(env.direct.region(r).dsn, r, timeout=10) for r in env.regions}
    sidecars[DOWN].kill()
    before = published(db[WRITER])
    write_events(env.direct.region(WRITER).dsn, n, tag)
    wait_for("eu-west to relay the events", lambda: published(db[WRITER]) >= before + n, 300)
    missing = published(db[WRITER]) - db[DOWN].applied_through(WRITER)
    transitions_before = len(db[DOWN].lifecycle_rows())
    started_wall = time.time()
    started = time.monotonic()
    with code_of(tree):
        sidecars[DOWN].start()
    active = wait_for("us-east ACTIVE again", lambda: _back(db[DOWN], transitions_before), 600)
    rows = db[DOWN].lifecycle_rows()[transitions_before:]
    held = db[DOWN].scalar("SELECT count(*) FROM orders WHERE id LIKE %s", (f"{tag}-%",))
    if held != n:
        raise SystemExit(f"us-east holds {held} of the {n} events written in eu-west")
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for t, _f, to, _e, _r, _a in rows:
        first.setdefault(to, t - started_wall)
        last[to] = t - started_wall
    return {
        "missing_events": missing,
        "start_to_active_s": round(active - started, 3),
        "start_to_catching_up_s": _rounded(first.get("CATCHING_UP")),
        "start_to_verifying_s": _rounded(last.get("VERIFYING")),
        "verifying_to_active_s": _rounded(last["ACTIVE"] - last["VERIFYING"]) if "VERIFYING" in last else None,
        "transitions": [f"{f}->{to} ({r[:60]})" for _t, f, to, _e, r, _a in rows],
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rounds": rounds,
        "median_start_to_active_s": round(statistics.median(r["start_to_active_s"] for r in rounds), 3),
        "median_seconds_per_1000_missing": round(statistics.median(
            r["start_to_active_s"] / max(1, r["missing_events"]) * 1000 for r in rounds), 3),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _back(db: Inspector, transitions_before: int) -> bool:
    """ACTIVE through a catch-up this round (not the ACTIVE it was killed in)."""
    rows = db.lifecycle_rows()[transitions_before:]
    return any(to == "ACTIVE" for _t, _f, to, _e, _r, _a in rows) and db.state() == "ACTIVE"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=None)
    parser.add_argument("--missing", default="1000,10000", help="comma-separated event counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=Path("benchmarks/results/rto.json"))
    parser.add_argument("--baseline", default=None, help="a git revision to measure against, alternating rounds")
    args = parser.parse_args()
    sizes = [int(s) for s in args.missing.split(",")]
    stack = DevStack.from_state(args.dev_dir or default_dev_dir())
    workdir = Path(tempfile.mkdtemp(prefix="bench-rto-"))
    baseline = None
    if args.baseline:
        baseline = workdir / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline], check=True)
    env = DrillEnv.create(stack, workdir, lifecycle={"absence_threshold_seconds": 300.0})
    sidecars = {r: SidecarProcess(env.config, r, workdir / f"sidecar-{r}.log") for r in env.regions}
    results: dict[str, Any] = {}
    try:
        for sidecar in sidecars.values():
            sidecar.start()
        probe = {r: Inspector(env.direct.region(r).dsn, r, timeout=10) for r in env.regions}
        wait_for("every region ACTIVE", lambda: all(p.state() == "ACTIVE" for p in probe.values()), 120)
        for n in sizes:
            rounds: dict[str, list[dict[str, Any]]] = {"current": [], **({"baseline": []} if baseline else {})}
            for i in range(args.repeat):
                if baseline is not None:
                    rounds["baseline"].append(one_round(env, sidecars, n, f"rto{n}b{i}", baseline))
                rounds["current"].append(one_round(env, sidecars, n, f"rto{n}r{i}"))
            results[str(n)] = {code: summary(done) for code, done in rounds.items()}
            if baseline is not None:
                results[str(n)]["ratio_baseline_to_current"] = round(
                    results[str(n)]["baseline"]["median_start_to_active_s"]
                    / results[str(n)]["current"]["median_start_to_active_s"], 2)
            for code, done in rounds.items():
                print(f"{n} missing, {code}: start to ACTIVE {[r['start_to_active_s'] for r in done]} s", flush=True)
    finally:
        for sidecar in sidecars.values():
            sidecar.kill()
        env.cleanup()
        if baseline is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], check=False)
    doc = {
        "benchmark": "rto",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                    "python": platform.python_version()},
        "method": __doc__.split("\n\n", 1)[1].strip(),
        "goal": "start to ACTIVE under 2 s for 1,000 missing events",
        "baseline": args.baseline,
        "revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),
        "results": results,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
