"""``--plot out.png``: throughput and latency percentiles over time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["throughput"]["series"]
    t = [p["t_s"] for p in series]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax1.plot(t, [p["offered_fps"] for p in series], "k--", lw=1, label="offered")
    ax1.plot(t, [p["sent_fps"] for p in series], label="sent (fleet pushed)")
    ax1.plot(t, [p["accepted_fps"] for p in series], label="accepted (head-end stored)")
    baseline = report.get("baseline")
    if baseline and baseline.get("series"):
        bt = [p["t_s"] for p in baseline["series"]]
        ax1.plot(bt, [p["received_fps"] for p in baseline["series"]], ":", label="bare baseline (received)")
    storm = report.get("storm")
    if storm and storm.get("at_s") is not None:
        for ax in (ax1, ax2):
            ax.axvline(storm["at_s"], color="r", lw=0.8, alpha=0.6)
        ax1.text(storm["at_s"], 0, " renewal storm", color="r", fontsize=8, va="bottom")
    ax1.set_ylabel("frames/s")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max")):
        ax2.plot(t, [p[key] for p in series], label=label)
    ax2.set_ylim(bottom=0)
    ax2.set_ylabel("latency seal -> accept (ms)")
    ax2.set_xlabel("seconds into the measurement window")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)
    cfg = report["config"]
    ratio = report.get("ratio", {}).get("pipeline_over_bare")
    title = (f"{cfg.get('meters'):,} meters / {cfg.get('concentrators')} concentrators, {cfg.get('broker_kind')}, "
             f"QoS {cfg.get('qos')}: {report['throughput']['accepted_fps']:,.0f} frames/s, "
             f"p99 {report['latency_ms']['p99']:,.1f} ms")
    if ratio is not None:
        title += f", pipeline/bare {ratio:.2f}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
