"""``ami loadtest --find-capacity``: the highest constant rate the pipeline holds.

A step is a whole load-test run (fresh network, same options) at one offered
rate; it *holds* when p99 <= ``--max-p99-ms`` (default 250), nothing is lost
(every pushed reading stored after the drain), nothing is rejected, and the
accepted rate is at least 95 % of the offered one.  The search starts at
``--rate``, multiplies it by 1.5 while steps hold (divides while they do not),
then bisects the bracket until it is narrower than ``--capacity-precision``
(10 %).  The capacity is the highest rate that held.

Output: a table of the steps, ``--report`` (JSON, schema
``ami-loadtest-capacity/1``, every step's full report inside) and ``--plot``
(PNG: offered vs accepted and p99 per step).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

MAX_STEPS = 14
HOLD_FRACTION = 0.95


def step_summary(rate: float, report: dict[str, Any], max_p99_ms: float) -> dict[str, Any]:
    frames = report["frames"]
    accepted = report["throughput"]["accepted_fps"]
    p99 = report["latency_ms"].get("p99")
    failures = []
    if p99 is None or p99 > max_p99_ms:
        failures.append(f"p99 {p99} ms > {max_p99_ms}")
    if frames["lost"]:
        failures.append(f"{frames['lost']} lost")
    if frames["rejected"]:
        failures.append(f"{frames['rejected']} rejected")
    if accepted < HOLD_FRACTION * rate:
        failures.append(f"accepted {accepted:.0f}/s < {HOLD_FRACTION:.0%} of offered")
    return {
        "rate": rate, "accepted_fps": accepted, "sent_fps": report["throughput"]["sent_fps"], "p99_ms": p99,
        "p50_ms": report["latency_ms"].get("p50"), "lost": frames["lost"], "rejected": frames["rejected"],
        "held": not failures, "failures": failures,
        "cpu_us_per_frame": {p["name"]: p.get("cpu_us_per_frame") for p in report["processes"]},
        "others_cpu_pct": report["machine"].get("others_cpu_pct"),
    }


def search(run_step, start: float, precision: float, max_steps: int = MAX_STEPS) -> tuple[float | None, list]:
    """Bracket, then bisect.  ``run_step(rate) -> summary`` (with ``held``)."""
    steps: list[dict[str, Any]] = []
    lo: float | None = None  # highest rate that held
    hi: float | None = None  # lowest rate that did not
    rate = start
    while len(steps) < max_steps:
        step = run_step(rate)
        steps.append(step)
        if step["held"]:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is None:
            rate = rate / 1.5
        elif hi is None:
            rate = rate * 1.5
        elif (hi - lo) / lo <= precision:
            break
        else:
            rate = round((lo + hi) / 2, 0)
    return lo, steps


def plot_steps(steps: list[dict[str, Any]], capacity: float | None, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    order = sorted(steps, key=lambda s: s["rate"])
    rates = [s["rate"] for s in order]
    ax1.plot(rates, rates, "k--", lw=1, label="offered")
    ax1.plot(rates, [s["accepted_fps"] for s in order], "o-", label="accepted")
    for s in order:
        ax1.annotate("held" if s["held"] else "missed", (s["rate"], s["accepted_fps"]), fontsize=7,
                     color="green" if s["held"] else "red", xytext=(3, -10), textcoords="offset points")
    if capacity:
        for ax in (ax1, ax2):
            ax.axvline(capacity, color="green", lw=1, ls=":")
    ax1.set_ylabel("readings/s")
    ax1.set_title(f"capacity search: {capacity:,.0f} readings/s" if capacity else "capacity search: none held")
    ax1.legend()
    ax2.semilogy(rates, [max(s["p99_ms"] or 0.1, 0.1) for s in order], "o-", color="tab:red", label="p99")
    ax2.semilogy(rates, [max(s["p50_ms"] or 0.1, 0.1) for s in order], "o-", color="tab:blue", label="p50")
    ax2.axhline(250, color="k", lw=1, ls="--")
    ax2.set_xlabel("offered readings/s (one run per step)")
    ax2.set_ylabel("latency ms")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def find_capacity_main(args: argparse.Namespace, console, options_from_args) -> int:
    """``options_from_args`` is the CLI's (passed in: this module does not import the CLI)."""
    from rich.console import Console
    from rich.table import Table

    from ami.tools.loadtest.run import LoadTest, LoadTestError

    max_p99 = args.max_p99_ms if args.max_p99_ms is not None else 250.0
    reports: list[dict[str, Any]] = []

    def run_step(rate: float) -> dict[str, Any]:
        step_args = copy.copy(args)
        step_args.rate = rate
        test = LoadTest(options_from_args(step_args), console=console)
        test.thresholds = {"min_fps": None, "max_p99_ms": max_p99, "max_loss": 0.0}
        try:
            report = test.run()
        except LoadTestError as exc:
            console.print(f"[red]step at {rate:,.0f}/s failed:[/red] {exc}")
            return {"rate": rate, "accepted_fps": 0.0, "sent_fps": 0.0, "p99_ms": None, "p50_ms": None,
                    "lost": None, "rejected": None, "held": False, "failures": [str(exc)[:200]],
                    "cpu_us_per_frame": {}, "others_cpu_pct": None}
        reports.append(report)
        step = step_summary(rate, report, max_p99)
        console.print(f"step {len(reports)}: {rate:,.0f}/s offered -> {step['accepted_fps']:,.0f}/s accepted, "
                      f"p99 {step['p99_ms']} ms, lost {step['lost']}, rejected {step['rejected']}: "
                      f"{'held' if step['held'] else 'missed (' + '; '.join(step['failures']) + ')'}")
        return step

    try:
        capacity, steps = search(run_step, args.rate, args.capacity_precision)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    table = Table(title=f"capacity: {capacity:,.0f} readings/s" if capacity else "capacity: no step held")
    for col in ("step", "offered/s", "accepted/s", "p99 ms", "lost", "rejected", "verdict"):
        table.add_column(col, justify="right")
    for i, s in enumerate(steps, 1):
        table.add_row(str(i), f"{s['rate']:,.0f}", f"{s['accepted_fps']:,.0f}", str(s["p99_ms"]), str(s["lost"]),
                      str(s["rejected"]), "held" if s["held"] else "; ".join(s["failures"]))
    Console(file=sys.stdout).print(table)
    result = {"schema": "ami-loadtest-capacity/1", "capacity_fps": capacity, "criteria": {
        "max_p99_ms": max_p99, "lost": 0, "rejected": 0, "accepted_at_least": HOLD_FRACTION},
        "steps": steps, "reports": reports}
    if args.report:
        args.report.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot_steps(steps, capacity, args.plot)
    return 0 if capacity else 1


__all__ = ["find_capacity_main", "plot_steps", "search", "step_summary"]
