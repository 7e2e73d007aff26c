"""The drill harness: what a scenario drives, and the report it ends with.

A scenario is a function of a :class:`Drill`. The harness has already built the
isolated environment, seeded the shared rows, started the pipeline (loops or
sidecars), the sampler and the workload; the scenario injects its faults through
the harness (so outages are timed and shown on the timeline), starts RTO
stopwatches when a fault ends, and may add checks of its own. Whatever happens in
the scenario, :meth:`Drill.finish` then restores what the scenario may have left
broken, stops the writers, lets the pipeline drain, stops it, reads every region
and hands everything to the pure checker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..devstack import DevStack
from ..errors import StoreError
from ..store.inspection import Inspector
from . import observe, runbook
from .checker import Check, Expectations, TableSpec, Verdict, expected_parked
from .checker import check as judge
from .env import DrillEnv
from .history import HistoryWriter, load_attempts, load_history
from .loops import LoopCluster, SidecarProcess
from .workload import Workload, WorkloadSpec


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Drill], None]
    #: "loops" (in-process relay/inbox threads) or "sidecars" (``reconciler run`` processes)
    pipeline: str = "loops"
    workload: Callable[[float], WorkloadSpec] = lambda scale: WorkloadSpec()
    expectations: Expectations = Expectations()
    #: regions (by position in the stack's region list) whose PostgreSQL connections go
    #: through a cuttable proxy
    proxied: tuple[int, ...] = ()
    #: how long the pipeline may take to deliver everything once the writers stop
    quiesce_seconds: float = 45.0
    #: config keys this scenario sets on top of the drill's (e.g. table invariants)
    config: Mapping[str, Any] = field(default_factory=dict)
    #: statements run in every region's fresh database before `migrate` (tables of its own)
    ddl: tuple[str, ...] = ()


@dataclass
class Outage:
    region: str
    kind: str
    start: float
    end: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "kind": self.kind, "start": round(self.start, 3),
                "end": None if self.end is None else round(self.end, 3)}


@dataclass
class Drill:
    scenario: Scenario
    stack: DevStack
    scale: float
    workdir: Path
    history_path: Path
    env: DrillEnv = field(init=False)
    workload: Workload = field(init=False)
    sampler: observe.Sampler = field(init=False)
    loops: LoopCluster | None = None
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    marks: list[dict[str, Any]] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    runbook_steps: list[runbook.StepResult] = field(default_factory=list)
    log: Callable[[str], None] = lambda _msg: None
    #: a randomized drill's seed and length (``reconciler drill nemesis --seed S --minutes M``)
    seed: int | None = None
    minutes: float | None = None
    #: acknowledged writes per second per region to aim at instead of the scenario's load
    writes_per_second: float | None = None
    #: keys a scenario adds to the top of its report (the nemesis: seed, faults)
    report_fields: dict[str, Any] = field(default_factory=dict)
    #: per region, event ids the scenario made it stop holding on purpose (pruned,
    #: accepted as lost), recorded as it did it, for the checker
    forgotten: dict[str, set[str]] = field(default_factory=dict)
    _history: HistoryWriter = field(init=False)
    _stopped_pg: set[str] = field(default_factory=set)
    _kafka_stopped: bool = False

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        proxied = tuple(self.stack.regions[i] for i in self.scenario.proxied)
        self.env = DrillEnv.create(self.stack, self.workdir, proxied=proxied, ddl=self.scenario.ddl,
                                   **self.scenario.config)
        self._history = HistoryWriter(self.history_path)
        spec = self.scenario.workload(self.scale)
        if self.minutes is not None:
            spec = dataclasses.replace(spec, seconds=self.minutes * 60)
        if self.seed is not None:
            spec = dataclasses.replace(spec, seed=self.seed)
        if self.writes_per_second is not None:
            spec = spec.at_rate(self.writes_per_second)
        self.workload = Workload({r: self.env.direct.region(r).dsn for r in self.env.regions}, self._history, spec)
        self.sampler = observe.Sampler(self.config, self.workload.acknowledged)
        self.sampler.start()
        self.mark("environment ready", detail=f"databases and topics {self.env.tag}")
        if self.scenario.pipeline == "sidecars":
            for region in self.regions:
                self.start_sidecar(region)
        else:
            self.loops = LoopCluster(self.config)
            self.loops.start_all()
        self.workload.seed()
        self.extra["tied_order"] = self.workload.tied  # the lww tie-break, exercised on purpose
        if not self.wait_delivered(60, "seed rows delivered to every region"):
            raise RuntimeError("the pipeline did not deliver the seed rows within 60s")
        self.mark("workload started")
        self.workload.start()

    @property
    def config(self) -> Any:
        return self.env.config

    @property
    def regions(self) -> list[str]:
        return self.env.regions

    # ---------------------------------------------------------------- time and marks

    def now(self) -> float:
        return self.sampler.now()

    def seconds(self, base: float) -> float:
        """A phase length at this drill's scale."""
        return base * self.scale

    def sleep(self, base: float) -> None:
        time.sleep(self.seconds(base))

    def mark(self, label: str, region: str | None = None, **fields: Any) -> None:
        entry = {"t": round(self.now(), 3), "label": label, **({"region": region} if region else {}), **fields}
        self.marks.append(entry)
        self.log(f"[{entry['t']:7.2f}s] {label}" + (f" ({region})" if region else ""))

    def outage_begin(self, region: str, kind: str) -> Outage:
        outage = Outage(region, kind, self.now())
        self.outages.append(outage)
        self.mark(f"{kind} begins", region)
        return outage

    def outage_end(self, outage: Outage, *, watch: bool = True) -> None:
        """The fault is over: close the shaded interval and start the RTO stopwatch."""
        outage.end = self.now()
        self.mark(f"{outage.kind} ends", outage.region)
        if watch:
            self.sampler.watch(outage.region, outage.kind)

    def watch(self, region: str, label: str) -> None:
        self.sampler.watch(region, label)

    def check(self, name: str, passed: bool, detail: str, **data: Any) -> bool:
        self.checks.append(Check(name, bool(passed), detail, data))
        self.log(f"  check {name}: {'ok' if passed else 'FAILED'} - {detail}")
        return bool(passed)

    # ---------------------------------------------------------------- faults, tracked for restoring

    def stop_postgres(self, region: str, mode: str = "immediate") -> None:
        self._stopped_pg.add(region)
        self.stack.stop_postgres(region, mode=mode)

    def start_postgres(self, region: str) -> None:
        self.stack.start_postgres(region)
        self._stopped_pg.discard(region)

    def stop_kafka(self) -> None:
        self._kafka_stopped = True
        self.stack.stop_kafka()

    def start_kafka(self) -> None:
        self.stack.start_kafka()
        self._kafka_stopped = False

    # ---------------------------------------------------------------- pipeline

    def start_sidecar(self, region: str, argv: tuple[str, ...] | None = None) -> SidecarProcess:
        sidecar = self.sidecars.get(region)
        if sidecar is None:
            sidecar = SidecarProcess(self.config, region, self.workdir / f"sidecar-{region}.log", argv)
            self.sidecars[region] = sidecar
        elif argv is not None:
            sidecar.argv = argv
        sidecar.start()
        self.mark("sidecar started", region)
        return sidecar

    def kill_sidecar(self, region: str, sig: int = signal.SIGKILL) -> int | None:
        if not self.sidecars[region].alive:
            return None
        code = self.sidecars[region].kill(sig)
        self.mark(f"sidecar {signal.Signals(sig).name}", region, exit_code=code)
        return code

    # ---------------------------------------------------------------- reading the regions

    def db(self, region: str, *, timeout: int = 3) -> Inspector:
        """The drill's reads of a region's database, made directly (never through a proxy)."""
        return Inspector(self.env.direct.region(region).dsn, region, timeout=timeout)

    def scalar(self, region: str, query: str, params: Sequence[Any] | None = None) -> Any:
        """One value of an ad hoc query on a region's database, read directly."""
        return self.db(region).scalar(query, params)

    def state(self, region: str) -> str | None:
        try:
            return str(self.db(region).state())
        except StoreError:
            return None

    def _counts(self) -> dict[str, tuple[int, int, dict[str, int]]] | None:
        """Per region: (own events written, published through, {origin: events applied}).
        Pruned rows count as written and applied (pruning takes a relayed prefix of the
        outbox and an applied prefix of the inbox), events accepted as lost as applied."""
        counts: dict[str, tuple[int, int, dict[str, int]]] = {}
        try:
            for region in self.regions:
                counts[region] = self.db(region, timeout=2).delivery_counts(region)
        except StoreError:
            return None
        return counts

    def delivered(self) -> bool:
        """Every outbox row relayed and applied by every peer (only ever true once the
        writers have stopped)."""
        counts = self._counts()
        if counts is None:
            return False
        for origin, (written, published, _) in counts.items():
            if published != written:
                return False
            for dest in self.regions:
                if dest != origin and int(counts[dest][2].get(origin, 0)) != written:
                    return False
        return True

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return True
            except (StoreError, OSError):  # a region's database not answering yet
                pass
            time.sleep(interval)
        self.mark(f"timed out after {timeout:.0f}s waiting for {what}")
        return False

    def wait_delivered(self, timeout: float, what: str = "every event delivered everywhere") -> bool:
        return self.wait_until(self.delivered, timeout, what, interval=0.3)

    def wait_caught_up(self, timeout: float, what: str = "everything committed so far delivered everywhere") -> bool:
        """Under live traffic: wait until every event committed anywhere before this
        call is published and applied by every peer (later ones may still be in flight)."""
        marks: dict[str, int] | None = None
        deadline = time.monotonic() + timeout
        while marks is None and time.monotonic() < deadline:
            counts = self._counts()
            marks = {r: c[0] for r, c in counts.items()} if counts else None
            if marks is None:
                time.sleep(0.3)
        if marks is None:
            self.mark(f"timed out after {timeout:.0f}s waiting for {what}")
            return False
        high = marks

        def caught_up() -> bool:
            counts = self._counts()
            if counts is None:
                return False
            return all(counts[o][1] >= n and all(int(counts[d][2].get(o, 0)) >= n for d in counts if d != o)
                       for o, n in high.items())

        return self.wait_until(caught_up, max(1.0, deadline - time.monotonic()), what, interval=0.3)

    # ---------------------------------------------------------------- operator commands

    def cli(self, *args: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run ``reconciler ARGS --config <drill config>`` as an operator would."""
        argv = ("reconciler", *args, "--config", str(self.config.path))
        code, output, seconds = runbook.execute(argv, timeout)
        self.mark(f"$ reconciler {' '.join(args)} -> exit {code}", seconds=round(seconds, 2))
        return code, output

    def recover(self, region: str) -> Any:
        """``recover()`` in-process, for scenarios where recovery must be deterministic
        (the sidecar's own catch-up is a separate drill)."""
        from ..recovery import recover

        self.mark("recover started", region)
        report = recover(self.config, region, actor="drill")
        gate = report.gate.to_dict() if report.gate else None
        self.mark(f"recover finished: {report.state}", region, replayed=report.replayed,
                  own_events_returned=report.own_events_returned, gate=gate, seconds=round(report.seconds, 2))
        self.extra.setdefault("recoveries", []).append(report.to_dict())
        return report

    def run_runbook(
        self, name: str, failed: str, *, execute: Sequence[str] = ("status", "gaps", "recover"),
        on_run: Callable[[tuple[str, ...]], None] | None = None,
        accept: Callable[[runbook.RunbookCommand, int], bool] | None = None,
        retry_seconds: float = 0.0,
    ) -> list[runbook.StepResult]:
        """Execute a runbook's commands for this drill, in document order.

        Commands whose subcommand is in ``execute`` run for real; ``run`` (start the
        sidecar) is handed to ``on_run`` when given; everything else is recorded as
        not executed. ``accept`` says whether an exit code is what the runbook expects
        at that point; a command that is not accepted is retried for up to
        ``retry_seconds``, as an operator would re-run it, and recorded either way.
        """
        path = runbook.find_runbook(name)
        mapping = runbook.region_mapping(failed, self.regions)
        steps: list[runbook.StepResult] = []
        for command in runbook.runbook_commands(path.read_text(), source=path.name):
            argv = runbook.adapt(command, str(self.config.path), mapping)
            text = " ".join(argv)
            sub = command.subcommand
            if sub == "run" and on_run is not None:
                on_run(argv)
                steps.append(runbook.StepResult(command.where, text, True, note="started as the region's sidecar"))
            elif sub in execute:
                deadline = time.monotonic() + retry_seconds
                attempts = 0
                while True:
                    attempts += 1
                    code, output, seconds = runbook.execute(argv)
                    ok = accept(command, code) if accept else code == 0
                    self.mark(f"runbook {command.where}: {sub} -> exit {code}", seconds=round(seconds, 2))
                    if ok or time.monotonic() >= deadline:
                        break
                    time.sleep(1.0)
                notes = [] if attempts == 1 else [f"{attempts} attempts"]
                if not ok:
                    notes.append("exit code not accepted")
                steps.append(runbook.StepResult(command.where, text, True, code, seconds, output, ", ".join(notes)))
            else:
                steps.append(runbook.StepResult(command.where, text, False,
                                                note=f"`{sub}` is not executed by this drill"))
        self.runbook_steps.extend(steps)
        return steps

    # ---------------------------------------------------------------- the end

    def restore(self) -> None:
        """Undo whatever fault a scenario left in place (it may have died mid-way)."""
        for proxy in self.env.proxies.values():
            if proxy.cut_active:
                proxy.heal()
        if self._kafka_stopped:
            with contextlib.suppress(Exception):
                self.start_kafka()
        for region in sorted(self._stopped_pg):
            with contextlib.suppress(Exception):
                self.start_postgres(region)
        for region in self.regions:
            self.workload.route(region, region)

    def finish(self, error: BaseException | None) -> dict[str, Any]:
        if error is not None:
            self.check("scenario_completed", False, f"{type(error).__name__}: {error}",
                       traceback="".join(traceback.format_exception(error))[-2000:])
        self.restore()
        self.workload.stop()
        self.mark("workload stopped")
        if self.scenario.pipeline == "sidecars":
            for region in self.regions:
                sidecar = self.sidecars.get(region)
                if sidecar is None or not sidecar.alive:
                    self.start_sidecar(region)
        elif self.loops is not None:
            self.loops.start_all()
        drained = self.wait_delivered(self.scenario.quiesce_seconds * max(1.0, self.scale),
                                      "the pipeline to deliver everything after the writers stopped")
        self.mark("pipeline drained" if drained else "pipeline did NOT drain")
        if self.scenario.pipeline == "sidecars":
            self._settle_sidecars()
        self._stop_pipeline()
        self.sampler.stop()
        self._history.close()
        return self._report(self._verdict())

    def _settle_sidecars(self) -> None:
        """Sidecars may still be catching up (their own recover): let them end ACTIVE."""
        self.wait_until(lambda: all(self.state(r) == "ACTIVE" for r in self.regions), 60,
                        "every region ACTIVE")

    def _stop_pipeline(self) -> None:
        codes = {}
        for region, sidecar in self.sidecars.items():
            if sidecar.alive:
                codes[region] = sidecar.stop()
        if codes:
            self.extra["sidecar_exit_codes"] = codes
            self.check("sidecars_stop_cleanly", all(c == 0 for c in codes.values()),
                       f"SIGTERM exit codes {codes} (0: drained, clean stop recorded)")
        if self.loops is not None:
            self.loops.stop_all()
            self.check("pipeline_loops_survived", not self.loops.errors,
                       "no relay or inbox loop died" if not self.loops.errors else "; ".join(self.loops.errors[:3]))

    def _verdict(self) -> Verdict:
        config = self.env.direct
        snapshots = {r: observe.read_snapshot(config, r) for r in self.regions}
        tables = {n: TableSpec(n, t.key, t.policy, dict(t.fields)) for n, t in config.tables.items()}
        history = load_history(self.history_path)
        attempts = load_attempts(self.history_path)
        # the roots leave out the keys the checker's manual model says are undecided
        # (not the keys the implementation happens to have parked)
        parked = expected_parked(history, snapshots, tables, attempts)
        for region, snap in list(snapshots.items()):
            if snap.state is not None:
                roots = observe.merkle_roots(config, region, parked)
                snapshots[region] = dataclasses.replace(snap, roots=roots)
        diffs = observe.pair_diffs(config)
        self.extra["transitions"] = self._transitions()
        if self.forgotten:
            self.extra["forgotten"] = {r: len(ids) for r, ids in sorted(self.forgotten.items())}
        return judge(history, snapshots, diffs, tables, self.scenario.expectations, self.sampler.rto(),
                     attempts=attempts, forgotten={r: frozenset(ids) for r, ids in self.forgotten.items()})

    def _transitions(self) -> list[dict[str, Any]]:
        out = []
        for region in self.regions:
            for entry in observe.lifecycle_log(self.env.direct, region):
                out.append({**entry, "t": round(entry["at"] - self.sampler.wall0, 3)})
        return sorted(out, key=lambda e: e["t"])

    def _report(self, verdict: Verdict) -> dict[str, Any]:
        checks = [*verdict.checks, *self.checks]
        timeline = observe.rates(self.sampler.samples)
        duration = self.now()
        # over the time the writers ran, not the whole drill (setup, drain and the
        # checker's reads wrote nothing and would dilute the rate)
        workload_rate = self.workload.rates()
        rto = self.sampler.rto()
        return {
            "scenario": self.scenario.name,
            "passed": all(c.passed for c in checks),
            "events_written": verdict.events_written,
            "events_lost": verdict.events_lost,
            "duplicates_applied": verdict.duplicates_applied,
            "regions_converged": verdict.regions_converged,
            "rto_seconds": None if rto is None else round(rto, 3),
            "checks": [c.to_dict() for c in checks],
            **self.report_fields,
            "description": self.scenario.summary,
            "scale": self.scale,
            "started_at": datetime.fromtimestamp(self.sampler.wall0, UTC).isoformat(timespec="seconds"),
            "seconds": round(duration, 2),
            "regions": self.regions,
            "rto_by_region": self.sampler.rto_by_region(),
            "in_doubt_writes": verdict.in_doubt,
            "parked": {t: list(k) for t, k in verdict.parked.items()},
            "conflicts": {t: dict(v) for t, v in verdict.conflicts.items()},
            "quarantine": {r: dict(v) for r, v in verdict.quarantine.items()},
            "writes_per_second": workload_rate["per_second"],
            "workload_rate": workload_rate,
            "workload": {"spec": _plain(self.workload.spec.__dict__),
                         "writers": [s.to_dict() for s in self.workload.stats]},
            "outages": [o.to_dict() for o in self.outages],
            "marks": self.marks,
            "transitions": self.extra.pop("transitions", []),
            "runbook": [s.to_dict() for s in self.runbook_steps],
            "timeline": timeline,
            "extra": self.extra,
            "history_file": str(self.history_path),
            "environment": self.env.tag,
        }


def _plain(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in doc.items()}
