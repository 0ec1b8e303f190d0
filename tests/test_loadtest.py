"""``ami loadtest``: a tiny real run on the embedded broker, thresholds, and the
pure parts (HDR merge, report builder, CSV) on synthetic data."""

from __future__ import annotations

import base64
import csv
import json
import subprocess

import pytest

from ami.tools.loadtest import hdr
from ami.tools.loadtest.report import SCHEMA, build_report, evaluate_thresholds, write_csv
from ami.tools.loadtest.run import LoadTest, Options, mosquitto_config, pad_for, reading_frame_size
from harness import AMI, REPO

TOP_KEYS = {"schema", "machine", "config", "window", "frames", "throughput", "latency_ms", "processes", "headend",
            "baseline", "ratio", "storm", "notes", "thresholds"}


# --- a real run ---------------------------------------------------------------------------


def _run(args, tmp_path, timeout=120):
    return subprocess.run(AMI + ["loadtest", *args, "--quiet", "--workdir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(150)
def test_tiny_run_produces_a_valid_report(tmp_path):
    out = _run(["--meters", "50", "--concentrators", "2", "--rate", "200", "--duration", "5", "--ramp-up", "1",
                "--baseline", "--report", str(tmp_path / "r.json"), "--csv", str(tmp_path / "c.csv"),
                "--plot", str(tmp_path / "p.png")], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert TOP_KEYS <= set(r)
    assert r["schema"] == SCHEMA
    f = r["frames"]
    assert {"offered", "sent", "accepted", "rejected", "rejected_by_reason", "lost", "run", "loss_ratio"} <= set(f)
    assert f["accepted"] > 0 and f["sent"] > 0
    assert f["lost"] == 0, f
    assert f["rejected"] == 0 and f["rejected_by_reason"] == {}, f
    assert f["run"]["stored"] >= f["run"]["pushed"] > 0
    lat = r["latency_ms"]
    assert lat["count"] > 0 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["samples_missed"] == 0
    assert r["throughput"]["series"] and r["throughput"]["accepted_fps"] > 100
    assert r["baseline"]["received"] > 0 and r["baseline"]["payload_bytes"] == r["config"]["payload_bytes"]
    assert r["ratio"]["pipeline_over_bare"] is not None and 0.5 < r["ratio"]["pipeline_over_bare"] < 1.5
    roles = {p["role"] for p in r["processes"]}
    assert {"broker", "headend", "relays", "fleet", "bare-fleet", "bare-relays"} <= roles
    assert all(p["rss_max_bytes"] for p in r["processes"])
    assert r["thresholds"]["passed"] is True
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert {row["phase"] for row in rows} == {"pipeline", "bare"}
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "runs").iterdir()), "the run folder is removed without --keep"


@pytest.mark.timeout(120)
def test_missed_threshold_exits_non_zero(tmp_path):
    out = _run(["--meters", "20", "--concentrators", "1", "--rate", "100", "--duration", "2", "--ramp-up", "0",
                "--min-fps", "10000000", "--max-p99-ms", "0.001", "--report", str(tmp_path / "r.json")], tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    failures = r["thresholds"]["failures"]
    assert r["thresholds"]["passed"] is False
    assert any("--min-fps" in x for x in failures) and any("--max-p99-ms" in x for x in failures)
    assert r["frames"]["lost"] == 0


@pytest.mark.timeout(60)
def test_cluster_run_without_its_services_is_skipped_with_exit_2(tmp_path):
    """--cluster-workers where PostgreSQL (or rabbitmq-server) is absent: a clear
    message and exit 2, nothing started."""
    from ami.runtime.bus import free_port

    out = _run(["--cluster-workers", "1", "--meters", "10", "--cluster-pg",
                f"postgresql://postgres@127.0.0.1:{free_port()}"], tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    err = " ".join(out.stderr.split())
    assert "skipped" in err and ("PostgreSQL not listening" in err or "rabbitmq" in err), err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


# --- HDR merge ----------------------------------------------------------------------------


def _headend_hdr(values_us):
    """As headend/service.py publishes it: base64 of HdrHistogram.encode()."""
    h = hdr.new_histogram()
    for v in values_us:
        h.record_value(v)
    return base64.b64encode(h.encode()).decode()


def test_hdr_merge_equals_one_histogram_of_all_values():
    a = list(range(1000, 101_000, 100))  # 1..101 ms
    b = [250_000] * 10 + [5_000] * 990
    merged = hdr.merge([_headend_hdr(a), "", None, _headend_hdr(b)])
    whole = hdr.new_histogram()
    for v in a + b:
        whole.record_value(v)
    assert merged.get_total_count() == len(a) + len(b)
    for p in (50, 90, 99, 99.9):
        assert merged.get_value_at_percentile(p) == whole.get_value_at_percentile(p)
    s = hdr.summary_ms(merged)
    assert s["count"] == 2000 and s["max"] == pytest.approx(250, rel=1e-3)
    assert s["p50"] == pytest.approx(5, rel=1e-2)
    assert hdr.summary_ms(hdr.merge([])) == {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0,
                                             "max": 0.0, "mean": 0.0}


def test_hdr_decode_accepts_plain_encode_output():
    h = hdr.new_histogram()
    h.record_value(1234)
    assert hdr.decode(h.encode()).get_total_count() == 1
    assert hdr.decode("") is None


# --- report builder on synthetic snapshots -------------------------------------------------


def _snapshots(t0=1000.0, n=11, rate=100.0, lat_us=20_000):
    """Head-end and fleet snapshots every second: `rate` readings stored per
    second, each interval with `rate` latency samples of `lat_us`."""
    headend, fleet = [], []
    for i in range(n):
        t = t0 + i
        headend.append({
            "time": t,
            "counters": {"readings_stored": int(rate * i), "frames_rejected": 0, "frames_accepted": int(rate * i)},
            "latency_ms": {"count": int(rate * i), "interval_count": int(rate) if i else 0,
                           "interval_hdr": _headend_hdr([lat_us] * int(rate)) if i else ""},
        })
    for i in range(n + 1):
        fleet.append({"time": t0 + i - 0.5, "counters": {"readings_pushed": int(rate * i + rate / 2)}})
    return headend, fleet


def test_report_builder_on_synthetic_data(tmp_path):
    headend, fleet = _snapshots()
    bare = {
        "window": (2000.0, 2010.0), "rate": 100.0, "payload_bytes": 81, "connections": {"fleet_like": 3},
        "pubs": {"p": [{"time": 2000.0 + i, "counters": {"frames_sent": 125 * i}} for i in range(11)]},
        "subs": {"s": [{"time": 2000.0 + i, "counters": {"frames_received": 125 * i}} for i in range(11)]},
    }
    final = {"pushed": 1000, "stored": 990, "headend_counters": {"readings_stored": 990, "frames_rejected": 3,
                                                                 "readings_gap_filled": 0},
             "headend_rejected": {"replay": 3, "auth_failed": 0}}
    r = build_report(config={"rate": 100.0, "meters": 10, "concentrators": 1, "qos": 1}, window=(1000.0, 1010.0),
                     headend=headend, fleets={"f": fleet}, final=final, bare=bare,
                     thresholds={"min_fps": 50, "max_p99_ms": 100, "max_loss": 0})
    assert r["schema"] == SCHEMA
    assert r["window"]["seconds"] == 10
    assert r["throughput"]["accepted_fps"] == pytest.approx(100.0)
    assert r["throughput"]["sent_fps"] == pytest.approx(100.0)
    assert r["frames"]["offered"] == 1000 and r["frames"]["accepted"] == 1000
    assert r["frames"]["lost"] == 10 and r["frames"]["loss_ratio"] == pytest.approx(0.01)
    assert r["frames"]["rejected"] == 3 and r["frames"]["rejected_by_reason"] == {"replay": 3}
    assert r["latency_ms"]["count"] == 1000 and r["latency_ms"]["p99"] == pytest.approx(20, rel=1e-3)
    assert r["latency_ms"]["samples_missed"] == 0
    assert len(r["throughput"]["series"]) == 10
    assert all(p["accepted_fps"] == pytest.approx(100) for p in r["throughput"]["series"])
    assert r["baseline"]["received_fps"] == pytest.approx(125.0)
    assert r["ratio"]["pipeline_over_bare"] == pytest.approx(0.8)
    # 10 of 1000 lost: --max-loss 0 fails, the others hold.
    assert r["thresholds"]["passed"] is False
    assert len(r["thresholds"]["failures"]) == 1 and "--max-loss" in r["thresholds"]["failures"][0]
    path = tmp_path / "series.csv"
    write_csv(r, path)
    rows = list(csv.DictReader(path.open()))
    assert [row["phase"] for row in rows].count("pipeline") == 10
    assert [row["phase"] for row in rows].count("bare") == len(r["baseline"]["series"]) > 0


def test_report_counts_missed_latency_snapshots_and_narrows_the_window():
    headend, fleet = _snapshots()
    dropped = headend[:5] + headend[6:]  # one QoS 0 metrics message lost
    r = build_report(config={"rate": 100.0}, window=(999.5, 1010.5), headend=dropped, fleets={"f": fleet},
                     final={"pushed": 1000, "stored": 1000, "headend_counters": {}})
    assert r["latency_ms"]["samples_missed"] == 100
    assert (r["window"]["start"], r["window"]["end"]) == (1000.0, 1010.0)
    assert r["frames"]["lost"] == 0 and r["ratio"]["pipeline_over_bare"] is None


def test_report_sums_workers_and_merges_their_histograms():
    """The clustered head-end: snapshots of two workers, not simultaneous,
    one at 60/s and one at 40/s: the report adds them (each interpolated),
    merges every histogram, and counts the samples of both."""
    w0, fleet = _snapshots(rate=60.0, lat_us=10_000)
    w1, _ = _snapshots(t0=1000.4, rate=40.0, lat_us=200_000)
    final = {"pushed": 1000, "stored": 1000, "headend_counters": {"frames_rejected": 0}}
    r = build_report(config={"rate": 100.0}, window=(1000.0, 1010.0), headend={"w0": w0, "w1": w1},
                     fleets={"f": fleet}, final=final, thresholds={"max_loss": 0})
    assert r["window"]["seconds"] == 10  # not narrowed: the workers' snapshots are not simultaneous
    assert r["throughput"]["accepted_fps"] == pytest.approx(98.4)  # worker 1 interpolated at the window's end
    assert r["latency_ms"]["samples_missed"] == 0 and r["latency_ms"]["run_count"] == 1000
    lat = r["latency_ms"]
    assert lat["p50"] == pytest.approx(10, rel=1e-2) and lat["p99"] == pytest.approx(200, rel=1e-2)
    assert lat["count"] == 10 * 60 + 9 * 40  # every interval histogram of both inside the window
    series = r["throughput"]["series"]
    assert len(series) == 10 and all(p["accepted_fps"] == pytest.approx(100, rel=0.05) for p in series[1:])
    assert r["frames"]["lost"] == 0 and r["thresholds"]["passed"]
    # One worker's snapshots alone (N = 1 still goes through the mapping).
    one = build_report(config={"rate": 60.0}, window=(1000.0, 1010.0), headend={"w0": w0}, fleets={"f": fleet},
                       final=final)
    assert one["throughput"]["accepted_fps"] == pytest.approx(60.0)
    assert one["latency_ms"]["count"] == 600


def test_thresholds():
    base = {"throughput": {"accepted_fps": 1000.0}, "latency_ms": {"p99": 50.0, "count": 10},
            "frames": {"loss_ratio": 0.0, "lost": 0}}
    assert evaluate_thresholds(base, {})["passed"]
    assert evaluate_thresholds(base, {"min_fps": 1000, "max_p99_ms": 50, "max_loss": 0})["passed"]
    out = evaluate_thresholds(base, {"min_fps": 1001, "max_p99_ms": 49.9})
    assert not out["passed"] and len(out["failures"]) == 2
    empty = {**base, "latency_ms": {"p99": 0.0, "count": 0}}
    assert not evaluate_thresholds(empty, {"max_p99_ms": 10})["passed"]


def test_payload_padding_and_mosquitto_config():
    natural = reading_frame_size(0)
    assert 70 <= natural <= 100
    for size in (natural + 10, 256, 1024):
        assert size - 3 <= reading_frame_size(pad_for(size)) <= size
    assert pad_for(natural - 1) == 0
    conf = mosquitto_config(12345)
    assert "listener 12345 127.0.0.1" in conf and "max_queued_messages" in conf


def test_services_of_a_load_test_run_on_the_callers_configuration_file(tmp_path, monkeypatch):
    """``ami --config F loadtest``: every service it starts gets F as $AMI_CONFIG."""
    from ami.cli import build_parser
    from ami.runtime.config import load_config

    monkeypatch.delenv("AMI_CONFIG", raising=False)
    f = tmp_path / "site.toml"
    f.write_text("[headend]\ncounter_block = 64\n")
    assert "AMI_CONFIG" not in LoadTest(Options())._env()
    assert LoadTest(Options(config_file=str(f)))._env()["AMI_CONFIG"] == str(f)
    args = build_parser(load_config(f), "loadtest").parse_args(["--config", str(f), "loadtest", "--meters", "10"])
    args.config_file = str(f)  # as ami.cli.main sets it
    from ami.tools.loadtest.cli import options_from_args

    assert options_from_args(args).config_file == str(f)


@pytest.mark.timeout(120)
def test_sigterm_stops_every_process_the_run_started(tmp_path):
    """Killed with SIGTERM, the load test cleans up as on Ctrl-C: no broker,
    head-end, relay or fleet left running."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen(AMI + ["loadtest", "--meters", "50", "--concentrators", "2", "--rate", "200",
                                   "--duration", "60", "--ramp-up", "1", "--quiet", "--workdir", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children: list = []
    while time.monotonic() < deadline:
        children = me.children(recursive=True)
        if any("meters" in " ".join(c.cmdline()) for c in children if c.is_running()):
            break
        time.sleep(0.2)
    assert children, "the load test started nothing"
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 130
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
    finally:
        for child in children:  # never leave them behind, even when the test fails
            if child.is_running():
                child.kill()


def test_fleet_nice_lowers_only_the_generators_priority(tmp_path):
    """--fleet-nice: the fleet (and the bare baseline's publishers) stand for
    meters on hardware of their own; the services under test keep theirs."""
    import sys

    import psutil

    test = LoadTest(Options(fleet_nice=7))
    test.workdir = tmp_path
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    children = [test._spawn(name, role, "pipeline", sleeper)
                for name, role in (("fleet-1", "fleet"), ("bare-fleet-1", "bare-fleet"), ("headend", "headend"))]
    try:
        nice = {c.role: psutil.Process(c.proc.pid).nice() for c in children}
        base = psutil.Process().nice()
        assert nice == {"fleet": 7, "bare-fleet": 7, "headend": base}  # setpriority: absolute niceness
    finally:
        for c in children:
            c.proc.kill()
            c.proc.wait()
