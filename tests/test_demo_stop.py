"""Ctrl-C on the demo stops every process quietly: the Procfile under honcho.

honcho sends SIGTERM to every process at once.  The broker keeps serving a
short grace while the others flush and disconnect (ami/broker/cli.py
``--stop-grace``); nobody reconnects once stopping (ami/runtime/link.py); late
connection errors from aiomqtt/paho are debug lines, not tracebacks
(ami/runtime/service.py).  The output is the console log format, as in
``scripts/demo``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ami.runtime.bus import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # where `ami` and `honcho` are installed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

PROCESSES = ("broker", "headend", "concentrator", "meters", "monitor")
STOPPED_LINES = {
    "broker": "broker_stopped",
    "headend": "headend_stopped",
    "concentrator": "relays stopped",
    "meters": "fleet stopped",
}
#: honcho's prefix: "12:34:56 meters.1       | "
LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<name>[\w-]+)(\.\d+)?\s*\| (?P<text>.*)$")
STORED = re.compile(r"pushed, (\d+) .*?stored")
#: ami.runtime.link's lines for a lost link and its reconnect attempts (and the
#: older "relay/segment/monitor connection lost").
RECONNECT = re.compile(r"connection lost|bus connection failed|bus reconnect failed|connection restored")


class Output:
    """honcho's merged output, line by line, each with the time it was read."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            with self._lock:
                self.lines.append((time.monotonic(), raw.rstrip("\n")))

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def source(line: str) -> str | None:
    m = LINE.match(line)
    return m["name"] if m else None


def stored_readings(lines: list[tuple[float, str]]) -> int:
    best = 0
    for _t, line in lines:
        m = LINE.match(line)
        if m and m["name"] == "monitor":
            s = STORED.search(m["text"])
            if s:
                best = max(best, int(s.group(1)))
    return best


def test_ctrl_c_stops_the_demo_quietly(tmp_path: Path) -> None:
    data = tmp_path / "net"
    subprocess.run(
        [sys.executable, "-m", "ami.cli", "provision", "--out", str(data), "--meters", "60", "--concentrators", "3"],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI")}
    env.update(
        AMI_DATA=str(data),
        AMI__BUS__BROKER=f"mqtt://127.0.0.1:{free_port()}",
        AMI_LOG_FORMAT="console",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [str(BIN / "honcho"), "start", "-f", "Procfile"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C would reach
    )
    out = Output(proc.stdout)
    try:
        started = time.monotonic()
        deadline = started + 90
        while stored_readings(out.snapshot()) == 0 or time.monotonic() - started < 10:
            assert proc.poll() is None, "\n".join(line for _t, line in out.snapshot())
            assert time.monotonic() < deadline, "no readings stored:\n" + "\n".join(l for _t, l in out.snapshot())
            time.sleep(0.2)

        stop_at = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: honcho then sends SIGTERM to every process
        rc = proc.wait(timeout=15)
        stop_s = time.monotonic() - stop_at
        out.join(5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for _t, line in out.snapshot()]
    after = [line for t, line in out.snapshot() if t >= stop_at]
    text = "\n".join(lines)

    assert rc == 130, text  # honcho's exit status after a SIGINT, whatever its processes return
    for name in PROCESSES:
        assert f"{name}.1 stopped (rc=0)" in text, f"{name} did not stop cleanly (SIGKILL after 5 s?)\n{text}"
    for name, event in STOPPED_LINES.items():
        assert any(event in line for line in lines if source(line) == name), f"{name} did not log {event!r}\n{text}"
    assert stop_s < 6, f"stopping took {stop_s:.1f} s\n{text}"

    for bad in ("Traceback", "Future exception was never retrieved", "KeyError", "Exception in callback",
                "Bad file descriptor"):
        assert bad not in text, f"{bad!r} in the output\n{text}"
    errors = [line for line in lines if re.search(r"\[(error|critical)\s*\]|\bERROR:|\bCRITICAL:", line)]
    assert not errors, "\n".join(errors)

    # No reconnect attempt once stopping.  Were the broker gone first, each
    # process would say so once, at info ("broker gone while stopping").
    reconnects = [line for line in after if RECONNECT.search(line)]
    assert not reconnects, "\n".join(reconnects)
    for name in PROCESSES:
        gone = [line for line in after if source(line) == name and "broker gone" in line]
        assert len(gone) <= 1, "\n".join(gone)

    # Console format, not JSON lines: what a person reads under honcho.
    service_lines = [m["text"] for m in map(LINE.match, lines) if m and m["name"] != "system"]
    assert service_lines
    raw_json = [line for line in service_lines if line.lstrip().startswith("{")]
    assert not raw_json, "\n".join(raw_json)
    assert any("[info" in line for line in service_lines), text


def test_the_head_end_takes_what_the_relays_flush_when_all_stop_at_once(tmp_path: Path) -> None:
    """honcho signals every process at once.  The relays forward their open
    batches when they stop; the head-end keeps reading until the bus is quiet
    ([headend] stop_quiet_s, at most stop_linger_s) so those readings are
    stored now instead of waiting for a gap-fill after the next start.

    The relays' batch delay is made long (5 s), so the last readings sit in
    open batches that only the relays' stop flush forwards."""
    from harness import Network, wait_until

    env = {
        "AMI__METERS__TIME_COMPRESSION": "3600",  # one interval every 0.5 s
        "AMI__CONCENTRATOR__BATCH_MAX_DELAY_MS": "5000",
        "AMI__MONITOR__METRICS_INTERVAL_S": "0.5",
    }
    net = Network(tmp_path, meters=30, concentrators=2, env=env, bus_security=False)
    net.provision()
    net.start_broker()
    monitor = net.collector()
    try:
        net.start("headend", "headend")
        net.start("concentrator", "concentrator")
        wait_until(lambda: monitor.latest.get(net.topic("concentrator", "status")) == b"online", 30,
                   what="relays online")
        net.start("meters", "meters")
        headend = lambda: monitor.json(net.topic("headend", "metrics")) or {}  # noqa: E731
        wait_until(lambda: headend().get("counters", {}).get("readings_stored", 0) >= 100, 60,
                   what="readings stored")
        assert net.stop("meters") == 0
        # Now the relays and the head-end together, as honcho does.
        for name in ("concentrator", "headend"):
            net.procs[name].send_signal(signal.SIGTERM)
        assert [net.procs[name].wait(15) for name in ("concentrator", "headend")] == [0, 0]
    finally:
        monitor.close()
        net.kill_all()
    events = [json.loads(line) for line in net.log_text("meters").splitlines() if line.startswith("{")]
    pushed = [e for e in events if e.get("event") == "fleet stopped"][-1]["readings_pushed"]
    stored = sum(len(seqs) for seqs in net.readings().values())
    assert stored == pushed > 100
