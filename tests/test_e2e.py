"""End to end on real brokers: provision 200 meters / 4 relays, run every
service as its own process, and check what the issue asks of the product.

* every reading pushed is stored exactly once (per meter, no hole, no extra);
* associations, at least one session-key renewal and one CC_LAN
  reprogramming happen with no frame rejected anywhere;
* what a relay publishes on the WAN is byte-identical to what it received;
* the monitor topics carry status and metrics;
* SIGTERM stops every process cleanly (exit 0) with counters persisted.

Both networks are mixed: half the meters in DLMS security suite 0, half in
suite 1 (ECDSA-signed ephemeral ECDH sessions, SC 0x31), side by side
behind the same unchanged relays.

The same scenario runs on the embedded amqtt broker (started by the test on a
free port, with the provisioned passwords and ACLs) and on Mosquitto at
127.0.0.1:1883 (skipped, with the reason, when nothing listens there).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from contextlib import closing

import msgpack
import pytest

from harness import AMI, REPO, Collector, Network, port_open, wait_until

pytestmark = pytest.mark.slow

ENV = {
    # One 30-minute interval every 0.5 s of wall time.
    "AMI__METERS__TIME_COMPRESSION": "3600",
    "AMI__METERS__JITTER": "0.5",
    # Force session renewals within the run.
    "AMI__HEADEND__SESSION_MAX_FRAMES": "12",
    "AMI__MONITOR__METRICS_INTERVAL_S": "1.0",
}


def _latest(net: Network, collector: Collector, component: str) -> dict:
    return collector.json(net.topic(component, "metrics")) or {}


def _online(net: Network, collector: Collector, component: str) -> bool:
    return collector.latest.get(net.topic(component, "status")) == b"online"


def run_scenario(tmp_path, broker: str | None, bus_security: bool) -> None:
    net = Network(tmp_path, meters=200, concentrators=4, broker=broker, env=ENV, bus_security=bus_security,
                  suite="mixed")


    net.provision()
    net.start_broker()
    creds = net.credentials()
    port = int(net.broker.rsplit(":", 1)[1])
    monitor = net.collector()
    # Byte-identity of the relay: watch one segment's PLC uplink (as that
    # segment's relay user would) and every WAN uplink (as the head-end would).
    plc = Collector("127.0.0.1", port, user="relay-c0001" if creds else None, password=creds.get("relay-c0001"),
                    topics=("ami/v1/plc/c0001/up/+",))
    wan = Collector("127.0.0.1", port, user="headend" if creds else None, password=creds.get("headend"),
                    topics=("ami/v1/wan/+/up",))
    try:
        net.start("headend", "headend")
        net.start("concentrator", "concentrator")
        # Meters last, once the relays listen: a frame published before its
        # relay subscribed is gone (MQTT keeps nothing for absent subscribers).
        wait_until(lambda: _online(net, monitor, "concentrator"), 30, what="relays online")
        net.start("meters", "meters")
        wait_until(lambda: _latest(net, monitor, "headend").get("counters", {}).get("associations", 0) >= 200,
                   60, what="200 associations")
        wait_until(lambda: _latest(net, monitor, "headend").get("counters", {}).get("session_renewals", 0) >= 1,
                   60, what="a session renewal")
        rotate = subprocess.run(
            AMI + ["keys", "rotate", "--broker", net.broker, "--data", str(net.data), "--all", "--key", "cc_lan",
                   "--timeout", "60"],
            cwd=REPO, env=net.env, capture_output=True, text=True, timeout=90,
        )
        assert rotate.returncode == 0, rotate.stdout + rotate.stderr
        done = json.loads(rotate.stdout.strip().splitlines()[-1])
        assert done["done"] and done["total"] == 200 and done["failed"] == 0
        # Let renewals happen under the new CC_LAN too, then stop.
        renewals = _latest(net, monitor, "headend")["counters"]["session_renewals"]
        wait_until(lambda: _latest(net, monitor, "headend")["counters"].get("session_renewals", 0) > renewals + 20,
                   60, what="renewals under the new CC_LAN")

        codes = {name: net.stop(name) for name in ("meters", "concentrator", "headend")}
        assert codes == {"meters": 0, "concentrator": 0, "headend": 0}, codes
        meters_log = [json.loads(line) for line in net.log_text("meters").splitlines() if line.startswith("{")]
        stopped = [e for e in meters_log if e.get("event") == "fleet stopped"]
        assert stopped, net.log_text("meters")[-2000:]
        pushed = stopped[-1]["readings_pushed"]

        # Every reading pushed, stored exactly once, no hole per meter.
        readings = net.readings()
        assert len(readings) == 200
        stored = sum(len(seqs) for seqs in readings.values())
        assert stored == pushed > 200 * 2
        for meter, seqs in readings.items():
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"{meter} has holes"

        # Zero rejections anywhere, and the key work really happened.
        head = _latest(net, monitor, "headend")
        assert sum(head["rejected"].values()) == 0, head["rejected"]
        assert head["counters"]["associations"] >= 200
        assert head["counters"]["session_renewals"] >= 1
        assert head["counters"]["reprogrammed_cc_lan"] == 200
        assert head["counters"]["associations_suite1"] >= 100  # every odd meter, renewals included
        for component in ("meters", "concentrator"):
            snap = _latest(net, monitor, component)
            assert snap, f"no metrics from {component}"
            assert sum(snap.get("rejected", {}).values()) == 0, (component, snap["rejected"])
        events = [e for e in monitor.events() if e.get("kind") == "rejected"]
        assert events == []

        # Monitor topics: retained status (online, then offline at exit) and metrics.
        for component in ("headend", "meters", "concentrator"):
            seen = [p for t, p, _ in monitor.messages if t == net.topic(component, "status")]
            assert b"online" in seen and seen[-1] == b"offline", (component, seen)

        # Relay byte-identity: every PLC uplink frame of c0001 appears unchanged on the WAN.
        with plc.lock:
            seen_plc = Counter(p for _t, p, _r in plc.messages)
        with wan.lock:
            forwarded = Counter(
                bytes(frame)
                for t, p, _r in wan.messages
                if t == "ami/v1/wan/c0001/up"
                for _meter, frame in msgpack.unpackb(p)["f"]
            )
        assert seen_plc and seen_plc == forwarded
        # Both suites behind one relay: suite-1 frames carry SC 0x31.
        scs = {frame[11] for frame in seen_plc if frame[:1] in (b"\xdb", b"\xdc") and frame[10] < 0x80}
        assert {0x30, 0x31} <= scs, scs

        # Counters persisted: head-end sessions and CC_LAN marks; meters' NVM marks.
        with closing(net.db()) as db:
            # Sessions' receive counters are persisted (a session renewed just
            # before the stop may not have received a frame yet: rx 0 is right).
            # Suite-1 session keys are never stored (forward secrecy): only
            # the 100 suite-0 meters have a session row.
            sessions = db.execute("SELECT count(*), sum(rx_lowest > 0) FROM sessions WHERE pending = 0").fetchone()
            assert sessions[0] == 100 and sessions[1] >= 50
            suite1_rows = db.execute(
                "SELECT count(*) FROM sessions JOIN meters USING (meter) WHERE meters.suite = 1").fetchone()[0]
            assert suite1_rows == 0
            # The factory CC_LANs (now EXPIRED) carried the first associations:
            # their marks were persisted; the new ones carried the renewals since.
            lan = dict(db.execute(
                "SELECT state, sum(tx_mark > 0 AND rx_lowest > 0) FROM keys WHERE key_type = 'cc_lan' GROUP BY state"
            ).fetchall())
            assert lan["expired"] == 200 and lan["active"] >= 5, lan  # (suite-1 AAREs are not under CC_LAN)
        nvm_files = list((net.data / "meters").glob("*.db"))
        assert nvm_files
        rows = used = 0
        for path in nvm_files:
            with closing(sqlite3.connect(path)) as db:
                n, u = db.execute("SELECT count(*), sum(value > 0) FROM counters WHERE slot = 'lan_send'").fetchone()
                rows, used = rows + n, used + (u or 0)
        # Each meter's CC_LAN send mark is persisted; it restarted at 0 with the
        # new CC_LAN and moved again for every meter that renewed since.
        assert rows == 200 and used >= 5, (rows, used)  # suite-0 meters renewed since (suite-1 AAREs: no CC_LAN IV)
    finally:
        for c in (monitor, plc, wan):
            c.close()
        net.kill_all()


def test_network_on_embedded_amqtt(tmp_path):
    run_scenario(tmp_path, broker=None, bus_security=True)


@pytest.mark.mosquitto
@pytest.mark.skipif(not port_open("127.0.0.1", 1883), reason="no MQTT broker listening on 127.0.0.1:1883")
def test_network_on_mosquitto(tmp_path):
    run_scenario(tmp_path, broker="mqtt://127.0.0.1:1883", bus_security=False)
