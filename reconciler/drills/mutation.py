"""The mutation run: does every drill check fail when the code it guards is wrong?

Each :class:`Mutant` is one deliberate bug written as a patch (file, exact old
text, new text) against the package. For each mutant the run copies the package
into a temporary directory, applies the one patch there (the worktree's files are
never touched), and runs a few drills with that copy first on ``sys.path`` (in
the drill process, its in-process loops, and every sidecar and CLI command it
starts). A mutant is *caught* when a drill fails. Before any mutant, a self-test
runs the same drills on an unpatched copy: they must pass, or nothing a mutant
run says would mean anything.

A patch whose old text is not found exactly once stops the run with an error
naming the mutant and the file, so a mutant that the code has moved away from is
repaired rather than silently never applied (``--check`` verifies every patch
without running a drill).

Some mutants are declared *equivalent*: a bug the design is built to absorb (a
relay publishing a message twice: the inbox deduplicates). They are run too, to
show the drills do not cry wolf, and are left out of the score.

    python -m reconciler.drills.mutation --dev-dir /tmp/dev --json-out mutation.json
    python -m reconciler.drills.mutation --check
    python -m reconciler.drills.mutation --only counter-delta-twice --drills split-brain
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent

#: the drills a mutant is tried against when it names none, short ones first
DEFAULT_DRILLS = ("split-brain", "duplicate-reorder")


class PatchError(ConfigError):
    """A mutant's old text is not in its file exactly once."""


@dataclass(frozen=True)
class Mutant:
    name: str
    #: path inside the package, e.g. "policies.py"
    file: str
    old: str
    new: str
    why: str
    #: drills to try, in order; the first that fails catches the mutant
    drills: tuple[str, ...] = DEFAULT_DRILLS
    #: a bug the design absorbs by construction: expected to survive, not scored
    equivalent: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"mutant": self.name, "file": f"reconciler/{self.file}", "why": self.why,
                "equivalent": self.equivalent}


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "lww-region-before-clock", "policies.py",
        "        wins = current is None or not current.wins_over(event.hlc, event.origin)\n",
        "        wins = current is None or (event.origin, event.hlc.pack()) > (current.origin, current.hlc.pack())\n",
        "lww tie-break applied first: the region id decides before the HLC",
        ("split-brain", "duplicate-reorder"),
    ),
    Mutant(
        "lww-tie-to-lower-region", "policies.py",
        "        wins = current is None or not current.wins_over(event.hlc, event.origin)\n",
        "        wins = current is None or (event.hlc, current.origin) > (current.hlc, event.origin)\n",
        "lww ties (and only ties) go to the lower region id; every other order is right",
        ("split-brain", "duplicate-reorder"),
    ),
    Mutant(
        "counter-delta-twice", "policies.py",
        "        _count(slot(column, \"counter\"), event.origin, delta)\n",
        "        _count(slot(column, \"counter\"), event.origin, delta)\n"
        "        _count(slot(column, \"counter\"), event.origin, delta)\n",
        "a counter delta is applied twice",
        ("split-brain",),
    ),
    Mutant(
        "counter-delta-dropped", "policies.py",
        "    by_origin[origin] = _add_numbers(by_origin.get(origin, 0), delta)\n",
        "    by_origin[origin] = _add_numbers(0, delta)\n",
        "a counter keeps only each origin's latest delta: the earlier ones are dropped",
        ("split-brain",),
    ),
    Mutant(
        "set-first-stamp-kept", "policies.py",
        "    if _newer(stamps.get(k), stamp):\n        stamps[k] = _stamp_list(stamp)\n",
        "    if stamps.get(k) is None:\n        stamps[k] = _stamp_list(stamp)\n",
        "set element rule: the first add/remove stamp of an element is kept, not the greatest",
        ("split-brain", "duplicate-reorder"),
    ),
    Mutant(
        "set-remove-ignored", "policies.py",
        "            if removed is None or added >= removed:\n",
        "            if removed is None or added >= removed or True:\n",
        "set element rule: a remove never takes an element out once it was added",
        ("split-brain",),
    ),
    Mutant(
        "manual-concurrent-applied", "policies.py",
        "        return Applied(None, _record(self.name, kind, Outcome.PARKED, current, event, payload))\n",
        "        return Applied(_whole_row_state(event, payload, carried),\n"
        "                       _record(self.name, kind, Outcome.APPLIED, current, event, payload))\n",
        "manual policy: a concurrent version overwrites the row instead of being parked",
        ("split-brain",),
    ),
    Mutant(
        "manual-ordered-parked", "policies.py",
        "        if kind is None:\n"
        "            if current is not None and current.wins_over(event.hlc, event.origin):\n",
        "        if kind is None and current is not None and event.origin != current.origin:\n"
        "            return Applied(None, _record(self.name, ConflictKind.UPDATE_UPDATE, Outcome.PARKED, current,\n"
        "                                         event, payload))\n"
        "        if kind is None:\n"
        "            if current is not None and current.wins_over(event.hlc, event.origin):\n",
        "manual policy: a causally later write from another region is parked as if concurrent",
        ("split-brain",),
    ),
    Mutant(
        "gaps-off-by-one", "gaps.py",
        "        return SeqRanges.span(1, high).difference(self)\n",
        "        return SeqRanges.span(1, high - 1).difference(self)\n",
        "gap analysis: the highest missing sequence is never reported",
        ("stale-backup-restore", "retention-expiry"),
    ),
    Mutant(
        "gaps-self-hole-hidden", "gaps.py",
        "                have = have | claimed | outbox_held.get((origin, origin), EMPTY)\n",
        "                have = SeqRanges.span(1, high)\n",
        "gap analysis: a region's own lost events (stale backup) are never reported as a hole",
        ("stale-backup-restore",),
    ),
    Mutant(
        "gaps-peer-hole-hidden", "gaps.py",
        "            if not missing:\n                continue\n",
        "            if not missing or destination != origin:\n                continue\n",
        "gap analysis: holes of a destination in another origin's events are not reported",
        ("retention-expiry", "stale-backup-restore"),
    ),
    Mutant(
        "gate-ignores-gaps", "lifecycle.py",
        "    if measured.gap_events:\n",
        "    if False and measured.gap_events:\n",
        "the lifecycle gate lets a region with missing events become ACTIVE",
        ("lost-beyond-retention", "stale-backup-restore"),
    ),
    Mutant(
        "gate-ignores-lost", "lifecycle.py",
        "    if measured.lost_events:\n",
        "    if False and measured.lost_events:\n",
        "the lifecycle gate lets a region become ACTIVE although events are lost",
        ("lost-beyond-retention", "stale-backup-restore"),
    ),
    Mutant(
        "gate-ignores-roots", "lifecycle.py",
        "        if count:\n            reasons.append(f\"{table}: {count} keys differ from peers\")\n"
        "    for root in sorted(measured.roots, key=lambda r: (r.table, r.peer)):\n        if not root.equal:\n",
        "        if False and count:\n            reasons.append(f\"{table}: {count} keys differ from peers\")\n"
        "    for root in sorted(measured.roots, key=lambda r: (r.table, r.peer)):\n"
        "        if False and not root.equal:\n",
        "the lifecycle gate lets a region become ACTIVE while keys differ from a peer below the watermark"
        " (the roots' comparison is left to the sampled gate check)",
        ("nemesis",),
    ),
    Mutant(
        "relay-skips-a-row", "relay.py",
        "            self._publisher.publish(self.topic, [(key, value) for _sequence, key, value in batch])\n",
        "            self._publisher.publish(self.topic, [(key, value) for _sequence, key, value in batch[1:]])\n",
        "the relay skips the first row of every batch and still marks it published",
        ("split-brain", "duplicate-reorder"),
    ),
    Mutant(
        "relay-publishes-twice", "relay.py",
        "            self._publisher.publish(self.topic, [(key, value) for _sequence, key, value in batch])\n",
        "            self._publisher.publish(self.topic, [(key, value) for _sequence, key, value in batch"
        " for _ in (1, 2)])\n",
        "the relay publishes every message twice (at-least-once by design: the inbox must absorb it)",
        ("split-brain",),
        equivalent=True,
    ),
    Mutant(
        "inbox-dedup-off", "apply.py",
        "            fresh = [e for e in candidates if (e.origin, e.sequence) in new]\n",
        "            fresh = list(candidates)\n",
        "the inbox records a redelivered event as seen but applies it again",
        ("duplicate-reorder",),
    ),
)


# ---------------------------------------------------------------- patching


def patch_text(text: str, mutant: Mutant) -> str:
    """``text`` with the mutant's one change; :class:`PatchError` unless its old
    text occurs exactly once."""
    found = text.count(mutant.old)
    if found != 1:
        raise PatchError(
            f"mutant {mutant.name!r}: its old text occurs {found} times in reconciler/{mutant.file} (expected "
            "exactly once); the code moved: update the mutant", mutant=mutant.name, file=mutant.file)
    return text.replace(mutant.old, mutant.new, 1)


def copy_package(dest_root: Path, mutant: Mutant | None = None, source: Path = PACKAGE) -> Path:
    """A copy of the package under ``dest_root/reconciler``, with the mutant applied
    to the copy only; returns ``dest_root`` (the directory to put on sys.path)."""
    target = dest_root / "reconciler"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pom = source.parent / "pom.xml"
    if pom.is_file():  # a drill that restarts the broker finds its jars through it (devstack's default pom)
        shutil.copy2(pom, dest_root / "pom.xml")
    if mutant is not None:
        path = target / mutant.file
        if not path.is_file():
            raise PatchError(f"mutant {mutant.name!r}: reconciler/{mutant.file} does not exist",
                             mutant=mutant.name, file=mutant.file)
        path.write_text(patch_text(path.read_text(), mutant))
    return dest_root


def check_patches(mutants: Iterable[Mutant] = MUTANTS, source: Path = PACKAGE) -> list[str]:
    """Every patch applies to the current code (raises on the first that does not)."""
    names = []
    for mutant in mutants:
        patch_text((source / mutant.file).read_text(), mutant)
        names.append(mutant.name)
    return names


# ---------------------------------------------------------------- running drills


@dataclass
class DrillRun:
    drill: str
    passed: bool
    failed_checks: list[str] = field(default_factory=list)
    passed_checks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    #: the drill's report (its history beside it), kept under the run's directory
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"drill": self.drill, "passed": self.passed, "failed_checks": self.failed_checks,
                "passed_checks": self.passed_checks, "seconds": round(self.seconds, 1), "error": self.error,
                "report": self.report}


Runner = Callable[[str, Path, Path], DrillRun]


def drill_runner(dev_dir: Path, scale: float, timeout: float) -> Runner:
    """Runs ``reconciler drill NAME`` in a child process whose ``reconciler`` is the
    copy under ``root`` (PYTHONPATH and the working directory both point there, since
    ``python -m`` puts the working directory first on sys.path)."""

    def run(name: str, root: Path, out_dir: Path) -> DrillRun:
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{name}.json"
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [sys.executable, "-m", "reconciler.cli", "drill", name, "--dev-dir", str(dev_dir.resolve()),
                "--scale", str(scale), "--json-out", str(out), "--quiet"]
        started = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return DrillRun(name, False, ["timed_out"], seconds=time.monotonic() - started,
                            error=f"no report within {timeout:.0f}s")
        seconds = time.monotonic() - started
        if not out.is_file():
            tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
            return DrillRun(name, False, ["no_report"], seconds=seconds,
                            error=f"exit {done.returncode}: {' | '.join(tail)}")
        report = json.loads(out.read_text())
        checks = report.get("checks", [])
        return DrillRun(name, bool(report.get("passed")),
                        [c["name"] for c in checks if not c.get("passed")],
                        [c["name"] for c in checks if c.get("passed")], seconds, report=str(out))

    return run


def _which_runs_prove_source(root: Path) -> str:
    """What the child will import: a guard against testing the worktree by mistake."""
    done = subprocess.run([sys.executable, "-c", "import reconciler; print(reconciler.__file__)"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def run_mutants(
    mutants: Sequence[Mutant], runner: Runner, *, drills: Sequence[str] | None = None, self_test: bool = True,
    workdir: Path | None = None, log: Callable[[str], None] = lambda _m: None, package: Path = PACKAGE,
) -> dict[str, Any]:
    """Self-test, then every mutant in turn; returns the JSON document."""
    base = Path(tempfile.mkdtemp(prefix="reconciler-mutation-", dir=workdir))
    results: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"workdir": str(base), "self_test": None, "mutants": results}
    try:
        # one snapshot of the package, taken now: every copy below comes from it, so
        # editing the worktree during a run cannot mix versions into it
        source = copy_package(base / "snapshot", source=package) / "reconciler"
        if self_test:
            wanted = sorted({d for m in mutants for d in (drills or m.drills)})
            root = copy_package(base / "unmutated", source=source)
            imported = _which_runs_prove_source(root)
            if not imported.startswith(str(root)):
                raise PatchError(f"the drill process would import {imported}, not the copy under {root}")
            runs = []
            for name in wanted:
                log(f"self-test: {name} on the unmutated code")
                runs.append(runner(name, root, base / "reports" / "unmutated"))
                log(f"  {'passed' if runs[-1].passed else 'FAILED ' + str(runs[-1].failed_checks)}")
            doc["self_test"] = {"passed": all(r.passed for r in runs), "drills": [r.to_dict() for r in runs]}
            if not doc["self_test"]["passed"]:
                doc["score"] = None
                return doc
        for mutant in mutants:
            root = copy_package(base / mutant.name, mutant, source=source)
            runs = []
            caught_by = None
            for name in drills or mutant.drills:
                log(f"{mutant.name}: {name}")
                run = runner(name, root, base / "reports" / mutant.name)
                runs.append(run)
                log(f"  {'survived' if run.passed else 'caught: ' + ', '.join(run.failed_checks)}")
                if not run.passed:
                    caught_by = name
                    break
            results.append({**mutant.to_dict(), "caught_by": caught_by,
                            "failed_checks": runs[-1].failed_checks if caught_by else [],
                            "passed_checks": runs[-1].passed_checks if runs else [],
                            "drills": [r.to_dict() for r in runs]})
            shutil.rmtree(root, ignore_errors=True)
    finally:
        doc["score"] = score(results)
    return doc


def score(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in results if not r["equivalent"]]
    caught = [r for r in scored if r["caught_by"]]
    return {
        "caught": len(caught),
        "scored": len(scored),
        "ratio": round(len(caught) / len(scored), 3) if scored else None,
        "survived": [r["mutant"] for r in scored if not r["caught_by"]],
        "equivalent_flagged": [r["mutant"] for r in results if r["equivalent"] and r["caught_by"]],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.drills.mutation", description=__doc__.split("\n")[0])
    parser.add_argument("--dev-dir", type=Path, default=Path(os.environ.get("RECONCILER_DEV_DIR", ".dev")))
    parser.add_argument("--json-out", type=Path, default=Path("mutation-report.json"))
    parser.add_argument("--only", action="append", default=[], metavar="MUTANT", help="run these mutants only")
    parser.add_argument("--drills", default="", help="comma-separated drills instead of each mutant's own")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per drill run")
    parser.add_argument("--no-self-test", action="store_true")
    parser.add_argument("--check", action="store_true", help="only verify that every patch applies")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28} {m.file:12} {m.why}{' (equivalent)' if m.equivalent else ''}")
        return 0
    try:
        names = check_patches(chosen)
    except PatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(names)} mutants apply to the current code")
        return 0
    drills = [d for d in args.drills.split(",") if d] or None
    doc = run_mutants(chosen, drill_runner(args.dev_dir, args.scale, args.timeout), drills=drills,
                      self_test=not args.no_self_test, log=lambda m: print(m, file=sys.stderr, flush=True))
    args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    if doc["self_test"] is not None and not doc["self_test"]["passed"]:
        print("self-test FAILED: the unmutated code does not pass the drills; no mutant was run", file=sys.stderr)
        return 1
    s = doc["score"]
    for r in doc["mutants"]:
        print(f"{r['mutant']:28} {'caught by ' + r['caught_by'] if r['caught_by'] else 'SURVIVED':34} "
              f"{', '.join(r['failed_checks'][:4])}{'  (equivalent)' if r['equivalent'] else ''}")
    print(f"mutation score: {s['caught']}/{s['scored']} caught"
          + (f" ({100 * s['ratio']:.0f}%)" if s["ratio"] is not None else "")
          + (f"; equivalent mutants flagged by a drill: {s['equivalent_flagged']}" if s["equivalent_flagged"] else ""))
    return 0 if not s["survived"] and not s["equivalent_flagged"] else 1


if __name__ == "__main__":
    sys.exit(main())
