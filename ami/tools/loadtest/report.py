"""The load-test report: a pure function of what the run collected.

``build_report`` takes the monitor snapshots (head-end, fleet, bare
processes), the final counts after the drain, the per-process samples and the
storm result, and returns the JSON-able report whose schema is documented in
docs/benchmarks.md ("Load tests").  Nothing here talks to a broker or starts
a process, so it is unit-tested on synthetic snapshots.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ami.tools.loadtest import hdr

SCHEMA = "ami-loadtest/1"
CSV_COLUMNS = (
    "phase", "t_s", "offered_fps", "sent_fps", "accepted_fps", "rejected_total",
    "latency_count", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms",
)


# --- counters over time --------------------------------------------------------------


def counter(snapshot: Mapping[str, Any], name: str, section: str = "counters") -> float:
    return float(snapshot.get(section, {}).get(name, 0) or 0)


def cumulative_at(snaps: Sequence[Mapping[str, Any]], name: str, t: float, section: str = "counters") -> float:
    """A cumulative counter at time ``t``, linearly interpolated between the
    snapshots around it (clamped to the first / last one)."""
    if not snaps:
        return 0.0
    if t <= snaps[0]["time"]:
        return counter(snaps[0], name, section)
    for a, b in zip(snaps, snaps[1:]):
        if a["time"] <= t <= b["time"]:
            va, vb = counter(a, name, section), counter(b, name, section)
            span = b["time"] - a["time"]
            return va if span <= 0 else va + (vb - va) * (t - a["time"]) / span
    return counter(snaps[-1], name, section)


def sum_at(groups: Mapping[str, Sequence[Mapping[str, Any]]], name: str, t: float) -> float:
    """``cumulative_at`` summed over several processes' snapshot lists."""
    return sum(cumulative_at(snaps, name, t) for snaps in groups.values())


def rate_between(groups: Mapping[str, Sequence[Mapping[str, Any]]], name: str, t0: float, t1: float) -> float:
    if t1 <= t0:
        return 0.0
    return (sum_at(groups, name, t1) - sum_at(groups, name, t0)) / (t1 - t0)


def _sorted(snaps: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((s for s in snaps if "time" in s), key=lambda s: s["time"])


# --- the pipeline ------------------------------------------------------------------------


def pipeline_series(
    headend: Sequence[Mapping[str, Any]],
    fleets: Mapping[str, Sequence[Mapping[str, Any]]],
    window: tuple[float, float],
    offered_fps: float,
) -> list[dict[str, Any]]:
    """One point per head-end snapshot in the window: rates over the interval
    since the previous snapshot, that interval's latency percentiles."""
    t0, t1 = window
    out: list[dict[str, Any]] = []
    for a, b in zip(headend, headend[1:]):
        if not t0 < b["time"] <= t1 + 1e-6:
            continue
        dt = b["time"] - a["time"]
        if dt <= 0:
            continue
        lat = hdr.summary_ms(hdr.decode(b.get("latency_ms", {}).get("interval_hdr")))
        out.append({
            "t_s": round(b["time"] - t0, 3),
            "offered_fps": round(offered_fps, 1),
            "sent_fps": round(rate_between(fleets, "readings_pushed", a["time"], b["time"]), 1),
            "accepted_fps": round((counter(b, "readings_stored") - counter(a, "readings_stored")) / dt, 1),
            "rejected_total": int(counter(b, "frames_rejected")),
            "latency_count": lat["count"],
            "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"], "p99_9_ms": lat["p99.9"],
            "max_ms": lat["max"],
        })
    return out


def snap_window(headend: Sequence[Mapping[str, Any]], window: tuple[float, float]) -> tuple[float, float]:
    """The window narrowed to the head-end snapshots inside it (first at or
    after its start, last at or before its end), so that counts and
    histograms are exact differences of real snapshots, not interpolations."""
    t0, t1 = window
    inside = [s["time"] for s in headend if t0 - 1e-6 <= s["time"] <= t1 + 1e-6]
    if len(inside) >= 2 and inside[-1] > inside[0]:
        return inside[0], inside[-1]
    return window


def _latency(headend: Sequence[Mapping[str, Any]], window: tuple[float, float]) -> dict[str, Any]:
    t0, t1 = window
    chosen = [s for s in headend if t0 < s["time"] <= t1 + 1e-6]
    merged = hdr.merge(s.get("latency_ms", {}).get("interval_hdr") for s in chosen)
    out: dict[str, Any] = hdr.summary_ms(merged)
    # Integrity: every interval histogram of the run should have reached us
    # (metrics are QoS 0): the head-end's total count against our sum.
    seen = sum(int(s.get("latency_ms", {}).get("interval_count", 0) or 0) for s in headend)
    total = int(headend[-1].get("latency_ms", {}).get("count", 0) or 0) if headend else 0
    out["run_count"] = total
    out["samples_missed"] = max(0, total - seen)
    out["source"] = "head-end interval HDR histograms (us), merged over the window; sealed_ns -> accepted"
    return out


# --- N head-end workers (the clustered head-end) --------------------------------------------


def _grid(groups: Mapping[str, Sequence[Mapping[str, Any]]], window: tuple[float, float]) -> list[float]:
    """Time points for a series over several workers: the snapshot times of
    the worker that reported most often in the window (and the window's start)."""
    t0, t1 = window
    best: list[float] = []
    for snaps in groups.values():
        times = [s["time"] for s in snaps if t0 < s["time"] <= t1 + 1e-6]
        if len(times) > len(best):
            best = times
    return [t0, *best]


def _hdr_between(groups: Mapping[str, Sequence[Mapping[str, Any]]], a: float, b: float):
    return hdr.merge(s.get("latency_ms", {}).get("interval_hdr")
                     for snaps in groups.values() for s in snaps if a < s["time"] <= b + 1e-6)


def pipeline_series_groups(
    groups: Mapping[str, Sequence[Mapping[str, Any]]],
    fleets: Mapping[str, Sequence[Mapping[str, Any]]],
    window: tuple[float, float],
    offered_fps: float,
) -> list[dict[str, Any]]:
    """``pipeline_series`` over several workers: counters summed (each
    worker's interpolated at the grid's times), latency histograms merged."""
    out: list[dict[str, Any]] = []
    grid = _grid(groups, window)
    for a, b in zip(grid, grid[1:]):
        if b - a <= 0:
            continue
        lat = hdr.summary_ms(_hdr_between(groups, a, b))
        out.append({
            "t_s": round(b - window[0], 3),
            "offered_fps": round(offered_fps, 1),
            "sent_fps": round(rate_between(fleets, "readings_pushed", a, b), 1),
            "accepted_fps": round(rate_between(groups, "readings_stored", a, b), 1),
            "rejected_total": int(sum_at(groups, "frames_rejected", b)),
            "latency_count": lat["count"],
            "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"], "p99_9_ms": lat["p99.9"],
            "max_ms": lat["max"],
        })
    return out


def _latency_groups(groups: Mapping[str, Sequence[Mapping[str, Any]]], window: tuple[float, float]) -> dict[str, Any]:
    out: dict[str, Any] = hdr.summary_ms(_hdr_between(groups, window[0], window[1]))
    seen = sum(int(s.get("latency_ms", {}).get("interval_count", 0) or 0) for snaps in groups.values() for s in snaps)
    total = sum(int(snaps[-1].get("latency_ms", {}).get("count", 0) or 0) for snaps in groups.values() if snaps)
    out["run_count"] = total
    out["samples_missed"] = max(0, total - seen)
    out["source"] = (f"{len(groups)} head-end workers' interval HDR histograms (us), merged over the window; "
                     "sealed_ns -> committed")
    return out


def _nonzero(counts: Mapping[str, Any] | None) -> dict[str, int]:
    return {k: int(v) for k, v in (counts or {}).items() if v}


def build_report(
    *,
    config: Mapping[str, Any],
    window: tuple[float, float],
    headend: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]],
    fleets: Mapping[str, Sequence[Mapping[str, Any]]],
    final: Mapping[str, Any],
    processes: Sequence[Mapping[str, Any]] = (),
    bare: Mapping[str, Any] | None = None,
    storm: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float | None] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The report (schema ``ami-loadtest/1``).

    ``final`` holds the counts after the drain: ``pushed`` (readings the
    fleet pushed, from its "fleet stopped" lines), ``stored`` (rows in the
    head-end's store), ``headend_counters`` / ``headend_rejected`` (its last
    snapshot) and optionally ``relay_rejected`` / ``fleet_rejected``.

    ``headend``: the head-end's snapshots, or a mapping of worker id -> its
    snapshots (the clustered head-end): counters are then summed over the
    workers, each interpolated at the window's edges (their snapshots are not
    simultaneous, so the window is not narrowed), and latency histograms
    merged over every worker's snapshots inside the window.
    """
    groups: dict[str, list[Mapping[str, Any]]] | None = None
    if isinstance(headend, Mapping):
        groups = {k: _sorted(v) for k, v in headend.items()}
        headend = []
    else:
        headend = _sorted(headend)
    fleets = {k: _sorted(v) for k, v in fleets.items()}
    requested = window
    window = snap_window(headend, window) if groups is None else window
    t0, t1 = window
    span = max(t1 - t0, 1e-9)
    rate = float(config.get("rate", 0) or 0)
    hc = dict(final.get("headend_counters", {}))
    pushed = int(final.get("pushed", 0))
    stored = int(final.get("stored", hc.get("readings_stored", 0)))
    gap_filled = int(hc.get("readings_gap_filled", 0))
    lost = max(0, pushed - stored)
    rejected_by_reason = _nonzero(final.get("headend_rejected"))
    rejected = int(hc.get("frames_rejected", sum(rejected_by_reason.values())))
    if groups is None:
        stored_window = cumulative_at(headend, "readings_stored", t1) - cumulative_at(headend, "readings_stored", t0)
        series = pipeline_series(headend, fleets, window, rate)
        latency = _latency(headend, window)
    else:
        stored_window = sum_at(groups, "readings_stored", t1) - sum_at(groups, "readings_stored", t0)
        series = pipeline_series_groups(groups, fleets, window, rate)
        latency = _latency_groups(groups, window)
    sent_window = sum_at(fleets, "readings_pushed", t1) - sum_at(fleets, "readings_pushed", t0)
    accepted_fps = stored_window / span
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": dict(machine or {}),
        "config": dict(config),
        "window": {"start": t0, "end": t1, "seconds": round(span, 3),
                   "requested": {"start": requested[0], "end": requested[1]}},
        "frames": {
            "offered": int(round(rate * span)),
            "sent": int(sent_window),
            "accepted": int(stored_window),
            "rejected": rejected,
            "rejected_by_reason": rejected_by_reason,
            "lost": lost,
            "run": {
                "pushed": pushed,
                "stored": stored,
                "gap_filled": gap_filled,
                "lost_live": max(0, pushed - (stored - gap_filled)),
                "duplicates": int(hc.get("readings_duplicate", 0)),
                "frames_accepted": int(hc.get("frames_accepted", 0)),
                "relay_rejected": _nonzero(final.get("relay_rejected")),
                "fleet_rejected": _nonzero(final.get("fleet_rejected")),
            },
            "loss_ratio": round(lost / pushed, 9) if pushed else 0.0,
        },
        "throughput": {
            "offered_fps": round(rate, 1),
            "sent_fps": round(sent_window / span, 1),
            "accepted_fps": round(accepted_fps, 1),
            "peak_accepted_fps": max((p["accepted_fps"] for p in series), default=0.0),
            "series": series,
        },
        "latency_ms": latency,
        "processes": [dict(p) for p in processes],
        "headend": {"cold_start_s": final.get("cold_start_s")},
        "baseline": None,
        "ratio": {"pipeline_over_bare": None},
        "storm": dict(storm) if storm is not None else None,
        "notes": list(notes),
    }
    if bare is not None:
        b = bare_summary(bare)
        report["baseline"] = b
        if b["received_fps"] > 0:
            report["ratio"]["pipeline_over_bare"] = round(accepted_fps / b["received_fps"], 4)
    report["thresholds"] = evaluate_thresholds(report, thresholds or {})
    return report


# --- the bare baseline -----------------------------------------------------------------------


def bare_summary(bare: Mapping[str, Any]) -> dict[str, Any]:
    """``bare``: ``window``, ``rate``, ``payload_bytes``, ``connections``,
    ``pubs`` / ``subs`` (ident -> snapshots with counters ``frames_sent`` /
    ``frames_received``)."""
    t0, t1 = bare["window"]
    span = max(t1 - t0, 1e-9)
    pubs = {k: _sorted(v) for k, v in bare.get("pubs", {}).items()}
    subs = {k: _sorted(v) for k, v in bare.get("subs", {}).items()}
    sent = sum_at(pubs, "frames_sent", t1) - sum_at(pubs, "frames_sent", t0)
    received = sum_at(subs, "frames_received", t1) - sum_at(subs, "frames_received", t0)
    rate = float(bare.get("rate", 0) or 0)
    series = []
    times = sorted({s["time"] for snaps in subs.values() for s in snaps if t0 < s["time"] <= t1 + 1e-6})
    prev = t0
    for t in times:
        if t - prev < 0.2:
            continue
        series.append({
            "t_s": round(t - t0, 3),
            "offered_fps": round(rate, 1),
            "sent_fps": round(rate_between(pubs, "frames_sent", prev, t), 1),
            "received_fps": round(rate_between(subs, "frames_received", prev, t), 1),
        })
        prev = t
    return {
        "window": {"start": t0, "end": t1, "seconds": round(span, 3)},
        "offered_fps": round(rate, 1),
        "sent": int(sent),
        "received": int(received),
        "sent_fps": round(sent / span, 1),
        "received_fps": round(received / span, 1),
        "payload_bytes": bare.get("payload_bytes"),
        "connections": bare.get("connections"),
        "processes": bare.get("processes"),
        "series": series,
    }


# --- thresholds ------------------------------------------------------------------------------


def evaluate_thresholds(report: Mapping[str, Any], thresholds: Mapping[str, float | None]) -> dict[str, Any]:
    """``min_fps`` (accepted frames/s in the window), ``max_p99_ms``,
    ``max_loss`` (fraction of pushed readings lost, 0 = none): each set one
    that is missed adds a failure; ``passed`` is False if any failed."""
    failures: list[str] = []
    min_fps = thresholds.get("min_fps")
    max_p99 = thresholds.get("max_p99_ms")
    max_loss = thresholds.get("max_loss")
    fps = report["throughput"]["accepted_fps"]
    if min_fps is not None and fps < min_fps:
        failures.append(f"throughput {fps:,.1f} frames/s < --min-fps {min_fps:,.1f}")
    p99 = report["latency_ms"]["p99"]
    if max_p99 is not None:
        if report["latency_ms"]["count"] == 0:
            failures.append("no latency sample: p99 unknown (--max-p99-ms set)")
        elif p99 > max_p99:
            failures.append(f"latency p99 {p99:,.1f} ms > --max-p99-ms {max_p99:,.1f}")
    if max_loss is not None:
        ratio = report["frames"]["loss_ratio"]
        if ratio > max_loss:
            failures.append(f"loss {report['frames']['lost']} frames ({ratio:.6f}) > --max-loss {max_loss}")
    return {
        "min_fps": min_fps, "max_p99_ms": max_p99, "max_loss": max_loss,
        "failures": failures, "passed": not failures,
    }


# --- outputs -------------------------------------------------------------------------------------


def write_csv(report: Mapping[str, Any], path: Path) -> None:
    """The time series: pipeline rows, then baseline rows (phase "bare")."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for point in report["throughput"]["series"]:
            writer.writerow({"phase": "pipeline", **point})
        baseline = report.get("baseline")
        if baseline:
            for point in baseline["series"]:
                writer.writerow({"phase": "bare", **point, "accepted_fps": point["received_fps"]})


def _mb(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def summary_table(report: Mapping[str, Any]):
    """A rich renderable of the headline figures."""
    from rich.console import Group
    from rich.table import Table

    f, t, lat = report["frames"], report["throughput"], report["latency_ms"]
    cfg = report["config"]
    main = Table(title=f"ami loadtest: {cfg.get('meters'):,} meters / {cfg.get('concentrators'):,} concentrators, "
                       f"{cfg.get('broker_kind')}, QoS {cfg.get('qos')}", show_header=True, min_width=72)
    main.add_column("figure")
    main.add_column("value", justify="right")
    rows = [
        ("window", f"{report['window']['seconds']:.1f} s"),
        ("offered", f"{f['offered']:,} ({t['offered_fps']:,.0f}/s)"),
        ("sent (pushed)", f"{f['sent']:,} ({t['sent_fps']:,.0f}/s)"),
        ("accepted (stored)", f"{f['accepted']:,} ({t['accepted_fps']:,.0f}/s)"),
        ("rejected", f"{f['rejected']:,} {f['rejected_by_reason'] or ''}"),
        ("lost (run: pushed - stored)", f"{f['lost']:,} of {f['run']['pushed']:,}"),
        ("latency p50 / p90 / p99", f"{lat['p50']:,.1f} / {lat['p90']:,.1f} / {lat['p99']:,.1f} ms"),
        ("latency p99.9 / max", f"{lat['p99.9']:,.1f} / {lat['max']:,.1f} ms ({lat['count']:,} samples)"),
    ]
    b = report.get("baseline")
    if b:
        rows.append(("bare (baseline) received", f"{b['received']:,} ({b['received_fps']:,.0f}/s)"))
        rows.append(("pipeline / bare", f"{report['ratio']['pipeline_over_bare']}"))
    s = report.get("storm")
    if s:
        rows.append(("renewal storm", f"{s.get('renewed')} / {s.get('total')} renewed in {s.get('elapsed_s')} s, "
                                      f"failed {s.get('failed')}, rejected {s.get('rejected_during')}"))
    if "recovery_s" in report:
        rows.append(("recovery (load / 10 -> all stored, no gap)",
                     "not within --drain" if report["recovery_s"] is None else f"{report['recovery_s']} s"))
    shed = {k: v for k, v in (report.get("control") or {}).items() if v}
    if shed:
        rows.append(("budgets (deferred / shed)", ", ".join(f"{k} {v:,}" for k, v in sorted(shed.items()))))
    cluster = report.get("cluster") or None  # the report's section, not the [cluster] config
    if cluster:
        workers = cluster.get("workers", [])
        rows.append(("workers: readings stored", ", ".join(f"{w['id']} {w['readings_stored']:,}" for w in workers)))
        commits = [w["commit_ms_mean"] for w in workers if w.get("commit_ms_mean") is not None]
        rows.append(("PostgreSQL (after the run)",
                     f"{cluster['readings']:,} readings ({cluster['readings_distinct']:,} distinct), {cluster['batches_committed']:,} "
                     f"messages, {cluster['redeliveries_recognised']} redelivered, {cluster['takeovers']} take-overs"
                     + (f", commit mean {sum(commits) / len(commits):.1f} ms" if commits else "")))
    if report["headend"].get("cold_start_s") is not None:
        rows.append(("head-end cold start", f"{report['headend']['cold_start_s']} s"))
    m = report.get("machine", {})
    if "host_cpu_pct" in m:
        rows.append(("host CPU in window (% of a core)",
                     f"{m['host_cpu_pct']:.0f} of {100 * (m.get('cpus') or 1)}, others' {m['others_cpu_pct']:.0f}"))
    th = report["thresholds"]
    rows.append(("thresholds", "passed" if th["passed"] else "FAILED: " + "; ".join(th["failures"])))
    for k, v in rows:
        main.add_row(k, v)
    procs = Table(title="processes", show_header=True)
    for col in ("process", "phase", "pid", "CPU s", "CPU avg %", "CPU max %", "CPU us/frame", "RSS max"):
        procs.add_column(col, justify="right" if col not in ("process", "phase") else "left")
    for p in report["processes"]:
        per_frame = p.get("cpu_us_per_frame")
        procs.add_row(p["name"], p.get("phase", ""), str(p.get("pid")), f"{p.get('cpu_s', 0):.1f}",
                      f"{p.get('cpu_avg_pct', 0):.0f}", f"{p.get('cpu_max_pct', 0):.0f}",
                      "" if per_frame is None else f"{per_frame:.0f}", _mb(p.get("rss_max_bytes")))
    return Group(main, procs)
