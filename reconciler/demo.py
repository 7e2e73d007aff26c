"""``make demo``: the regional-failover drill under live traffic, told for people.

Runs the ``regional-failover`` drill against the running local stack (the same
entry point as ``reconciler drill``), then prints what happened: a timeline of
acknowledged writes per second, replication lag and lifecycle state per region,
with the outage, the operator's runbook commands and the state transitions in
between; the RTO; and every verdict of the checker. Writes ``demo-report.json``
(the drill report), ``demo-report.history.jsonl`` (every acknowledged write) and
``demo-report.png`` (the timeline as a chart) to the current directory. Exits 1
when the drill failed, 2 when it could not run.

The rendering functions take the report document only, so they can be re-run on
a saved report: ``python -m reconciler.demo --render demo-report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCENARIO = "regional-failover"
#: the second act of `make demo`: an oversell across a partition, compensated
SECOND_ACT = "flash-sale"
#: the failover is shown under the load of a busy service, not a trickle
DEMO_WRITES_PER_SECOND = 300.0


# ---------------------------------------------------------------- text


def _bucket_rows(report: dict[str, Any], width: float) -> list[dict[str, Any]]:
    """Timeline samples folded into ``width``-second rows: mean writes/s, max lag,
    the last state seen (DOWN wins: an outage shorter than a row must still show)."""
    rows: list[dict[str, Any]] = []
    regions = report.get("regions") or []
    current: dict[str, Any] | None = None
    for sample in report.get("timeline", []):
        start = int(sample["t"] // width) * width
        if current is None or current["t"] != start:
            current = {"t": start, "n": 0, "regions": {r: {"w": 0.0, "lag": None, "state": None} for r in regions}}
            rows.append(current)
        current["n"] += 1
        for region in regions:
            s = sample["regions"].get(region, {})
            cell = current["regions"][region]
            cell["w"] += float(s.get("writes_per_s") or 0.0)
            lag = s.get("lag_events")
            if lag is not None:
                cell["lag"] = lag if cell["lag"] is None else max(cell["lag"], lag)
            state = s.get("state")
            if cell["state"] != "DOWN":
                cell["state"] = state
    for row in rows:
        for cell in row["regions"].values():
            cell["w"] /= max(1, row["n"])
    return rows


_SHORT = {"ACTIVE": "ACTIVE", "CATCHING_UP": "CATCHUP", "VERIFYING": "VERIFY", "FENCED": "FENCED",
          "SUSPECT": "SUSPECT", "DOWN": "DOWN"}


def render(report: dict[str, Any]) -> str:
    """The whole human report."""
    regions: list[str] = report.get("regions") or []
    out: list[str] = []
    passed = report.get("passed")
    out.append(f"reconciler demo: {report.get('scenario')} - {report.get('description', '')}")
    out.append("=" * min(100, len(out[0])))
    outages = report.get("outages", [])
    for o in outages:
        end = o.get("end")
        span = f"{o['start']:.1f}s -> " + (f"{end:.1f}s ({end - o['start']:.1f}s)" if end is not None else "")
        out.append(f"outage: {o['region']} {o['kind']}, {span}")
    writers = report.get("workload", {}).get("writers", [])
    failed_writes = sum(w.get("failed", 0) for w in writers)
    out.append(f"load: {len(writers)} writers, {report.get('events_written', 0)} acknowledged writes, "
               f"{failed_writes} attempts failed and were not acknowledged; average writes/s per region: "
               + ", ".join(f"{r} {v:.1f}" for r, v in (report.get("writes_per_second") or {}).items()))
    out.append("")
    out.append("Timeline  (w/s: acknowledged writes per second written to the region; lag: events committed")
    out.append("           elsewhere that the region has not applied yet; state: its lifecycle state)")
    width = 2.0 if report.get("seconds", 0) <= 120 else round(report["seconds"] / 60)
    head = "     t  " + "".join(f"{r:<24}" for r in regions)
    out.append(head)
    out.append("        " + "".join(f"{'w/s':>5} {'lag':>6} {'state':<11}" for _ in regions))
    events = _events(report)
    rows = _bucket_rows(report, width)
    index = 0
    for row in rows:
        while index < len(events) and events[index][0] < row["t"] + width:
            out.append(f"  {events[index][0]:6.1f}s  -- {events[index][1]}")
            index += 1
        cells = []
        for r in regions:
            c = row["regions"][r]
            lag = "-" if c["lag"] is None else str(c["lag"])
            cells.append(f"{c['w']:5.1f} {lag:>6} {_SHORT.get(c['state'] or '', c['state'] or '-'):<11}")
        out.append(f"{row['t']:6.0f}  " + "".join(cells))
    for t, text in events[index:]:
        out.append(f"  {t:6.1f}s  -- {text}")
    out.append("")
    steps = [s for s in report.get("runbook", []) if s.get("executed")]
    if steps:
        out.append("Runbook commands the drill executed (config and region names substituted):")
        for s in steps:
            code = "started" if s.get("exit_code") is None else f"exit {s['exit_code']}"
            note = f"  [{s['note']}]" if s.get("note") else ""
            out.append(f"  {s['where']:<32} {code:<8} {_short_command(s['command'])}{note}")
        skipped = [s for s in report.get("runbook", []) if not s.get("executed")]
        if skipped:
            out.append(f"  not executed: {', '.join(sorted({_subcommand(s['command']) for s in skipped}))} "
                       f"({len(skipped)} lines: changes an operator decides, or ones that need the failed database)")
        out.append("")
    rto = report.get("rto_seconds")
    out.append(f"RTO: {'-' if rto is None else f'{rto:.1f}s'} from the database's restart until the region was ACTIVE "
               "and had applied everything committed elsewhere before it")
    conflicts = report.get("conflicts") or {}
    if conflicts:
        out.append("conflicts (distinct, by table and status): " + "; ".join(
            f"{t}: " + ", ".join(f"{n} {s}" for s, n in sorted(v.items())) for t, v in conflicts.items()))
    if report.get("parked"):
        out.append(f"parked for an operator (excepted from convergence): {report['parked']}")
    if report.get("in_doubt_writes"):
        out.append(f"in-doubt writes (committed, acknowledgement lost in the crash): {report['in_doubt_writes']}")
    extra = report.get("extra") or {}
    if "heal_to_invariant_restored_seconds" in extra:
        restored = extra["heal_to_invariant_restored_seconds"]
        out.append(f"oversell compensated: invariant restored {'-' if restored is None else f'{restored:.1f}s'} "
                   f"after the heal; compensation ids {', '.join(extra.get('compensation_ids', [])) or '-'}")
        for step in extra.get("saga", []):
            cancelled = ", ".join(step.get("cancelled") or []) or "nothing"
            out.append(f"  saga {step['id']}: {step['outcome']} (cancelled {cancelled})")
    out.append("")
    out.append(f"Verdict: {'PASSED' if passed else 'FAILED'}  (lost {report.get('events_lost')}, applied twice "
               f"{report.get('duplicates_applied')}, regions converged {report.get('regions_converged')})")
    for check in report.get("checks", []):
        out.append(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    return "\n".join(out) + "\n"


def _events(report: dict[str, Any]) -> list[tuple[float, str]]:
    """Marks and lifecycle transitions, in time order, worded for the timeline."""
    found: list[tuple[float, str]] = []
    for mark in report.get("marks", []):
        label = str(mark["label"])
        if label.startswith("runbook "):
            continue  # listed with their exit codes below the timeline
        region = f" ({mark['region']})" if mark.get("region") else ""
        found.append((float(mark["t"]), label + region))
    for tr in report.get("transitions", []):
        found.append((float(tr["t"]), f"{tr['region']}: {tr['from']} -> {tr['to']} by {tr['actor']} ({tr['reason']})"))
    return sorted(found, key=lambda e: e[0])


def _subcommand(command: str) -> str:
    words = [w for w in command.split() if not w.startswith("-")]
    return words[1] if len(words) > 1 else command


def _short_command(command: str) -> str:
    parts = command.split()
    if "--config" in parts:
        i = parts.index("--config")
        parts[i + 1] = "<drill.yaml>"
    return " ".join(parts)


# ---------------------------------------------------------------- chart


def plot(report: dict[str, Any], path: Path) -> None:
    """Writes/s and lag per region over time, outages shaded, transitions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions: list[str] = report.get("regions") or []
    timeline = report.get("timeline", [])
    colours = dict(zip(regions, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"), strict=False))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    times = [s["t"] for s in timeline]
    for region in regions:
        rates = [s["regions"][region].get("writes_per_s") or 0.0 for s in timeline]
        top.plot(times, _smooth(rates, 4), label=region, color=colours.get(region), linewidth=1.6)
        lags = [s["regions"][region].get("lag_events") for s in timeline]
        bottom.plot(times, [float("nan") if v is None else v for v in lags], label=region,
                    color=colours.get(region), linewidth=1.4)
    rto = report.get("rto_seconds")
    for outage in report.get("outages", []):
        end = outage.get("end") if outage.get("end") is not None else (times[-1] if times else outage["start"])
        for ax in (top, bottom):
            ax.axvspan(outage["start"], end, color=colours.get(outage["region"], "grey"), alpha=0.12)
        top.text(outage["start"], 0.03, f" {outage['region']} {outage['kind']}", transform=top.get_xaxis_transform(),
                 fontsize=8, va="bottom")
        bottom.text(outage["start"], 0.5, f" {outage['region']} unreachable:\n its lag cannot be read",
                    transform=bottom.get_xaxis_transform(), fontsize=7, va="center", color="dimgrey")
        if rto is not None and outage.get("end") is not None and outage["region"] in colours:
            bottom.axvspan(end, end + rto, color=colours[outage["region"]], alpha=0.06, hatch="//")
            bottom.text(end, 0.88, f" RTO {rto:.1f}s", transform=bottom.get_xaxis_transform(), fontsize=8)
    for tr in report.get("transitions", []):
        for ax in (top, bottom):
            ax.axvline(tr["t"], color=colours.get(tr["region"], "grey"), linestyle=":", linewidth=1)
        bottom.text(tr["t"], 0.98, f" {tr['to']}", rotation=90, va="top", fontsize=7,
                    transform=bottom.get_xaxis_transform(), color=colours.get(tr["region"], "grey"))
    for mark in report.get("marks", []):
        if mark["label"] in ("traffic moved", "traffic back"):
            top.axvline(mark["t"], color="black", linestyle="--", linewidth=0.8)
            top.text(mark["t"], 0.95, f" {mark['label']}", transform=top.get_xaxis_transform(), fontsize=7,
                     va="top")
    verdict = "PASSED" if report.get("passed") else "FAILED"
    top.set_title(f"{report.get('scenario')}: {verdict}, RTO {'-' if rto is None else f'{rto:.1f}s'}, "
                  f"{report.get('events_written')} writes, lost {report.get('events_lost')}, applied twice "
                  f"{report.get('duplicates_applied')}", fontsize=10)
    top.set_ylabel("acknowledged writes/s")
    bottom.set_ylabel("lag (events not applied)")
    bottom.set_xlabel("seconds since the drill started")
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=Path(os.environ.get("RECONCILER_DEV_DIR", ".dev")),
                        help="the stack `reconciler dev up` started (env RECONCILER_DEV_DIR, default .dev)")
    parser.add_argument("--out", type=Path, default=Path("demo-report.json"), help="report path (JSON)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--writes-per-second", type=float, default=DEMO_WRITES_PER_SECOND,
                        help="acknowledged writes per second to aim at in each region during the failover "
                             f"(default {DEMO_WRITES_PER_SECOND:.0f}); the report says what the machine sustained")
    parser.add_argument("--render", type=Path, default=None, help="only render a saved report (no drill)")
    parser.add_argument("--second-act", action=argparse.BooleanOptionalAction, default=True,
                        help=f"after the failover, run the {SECOND_ACT} drill (default: on)")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
    else:
        from .drills.runner import run_drill
        from .errors import ReconcilerError

        print(f"reconciler demo: running the {SCENARIO} drill on the stack in {args.dev_dir} "
              "(about a minute and a half)...", flush=True)
        try:
            report = run_drill(SCENARIO, scale=args.scale, dev_dir=args.dev_dir, json_out=args.out,
                               log=lambda line: print(f"  {line}", flush=True),
                               writes_per_second=args.writes_per_second)
        except ReconcilerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print()
    chart = args.out.with_suffix(".png")
    print(render(report), end="")
    try:
        plot(report, chart)
        if args.render:
            print(f"\nwrote {chart} (chart)")
        else:
            history = args.out.with_name(args.out.stem + ".history.jsonl")
            print(f"\nwrote {args.out} (drill report), {chart} (chart), {history} (acknowledged writes)")
    except ImportError as exc:
        print(f"\nwrote {args.out}; no chart: {exc} (pip install matplotlib)")
    if args.render is None and args.second_act:
        return _second_act(args) if report.get("passed") else 1
    return 0 if report.get("passed") else 1


def _second_act(args: argparse.Namespace) -> int:
    """The flash-sale drill: a partitioned oversell recorded, compensated once by the demo saga."""
    from .drills.runner import run_drill
    from .errors import ReconcilerError

    out = args.out.with_name(args.out.stem + "-flash-sale.json")
    print(f"\nreconciler demo, second act: the {SECOND_ACT} drill...", flush=True)
    try:
        report = run_drill(SECOND_ACT, scale=args.scale, dev_dir=args.dev_dir, json_out=out,
                           log=lambda line: print(f"  {line}", flush=True))
    except ReconcilerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render(report), end="")
    print(f"\nwrote {out} (second act: drill report)")
    return 0 if report.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
