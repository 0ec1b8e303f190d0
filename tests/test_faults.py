"""kill -9 each process in turn under load, restart it, and check the rules.

After the meters, the relays, the head-end (in the middle of a CC_LAN
reprogramming) and the broker have each been killed and restarted:

* no (key, system title, invocation counter) was used by two different
  frames: audited from every frame captured on the broker (tests/traffic.py);
* every reading seen on the wire is stored, each (meter, seq) once, and no
  meter has a hole (gap-fill recovered what was in flight or never sent);
* the head-end rejected no genuine frame (no `rejected` event at all);
* the interrupted key change completed or rolled back: no key is left NEW,
  and each meter's CC_LAN is the one the head-end holds as ACTIVE.
"""

from __future__ import annotations

import json
import sys
import signal
import sqlite3
import subprocess
import time
from contextlib import closing

import pytest

from ami.security.vault import FileKeyVault, key_identity
from harness import AMI, REPO, Collector, Network, wait_port, wait_until
from traffic import audit

pytestmark = pytest.mark.slow

ENV = {
    "AMI__METERS__TIME_COMPRESSION": "3600",  # one interval every 0.5 s
    "AMI__METERS__JITTER": "0.5",
    "AMI__HEADEND__SESSION_MAX_FRAMES": "15",
    "AMI__HEADEND__GAP_FILL_DELAY_S": "1.0",
    "AMI__HEADEND__GAP_FILL_RETRY_S": "3.0",
    "AMI__HEADEND__ASSOCIATION_TIMEOUT_S": "3.0",
    "AMI__HEADEND__TRANSFER_TIMEOUT_S": "3.0",
    "AMI__MONITOR__METRICS_INTERVAL_S": "0.5",
}
SERVICES = {"headend": ("headend",), "concentrator": ("concentrator",), "meters": ("meters",)}


NET: Network | None = None


def _headend(monitor: Collector) -> dict:
    return monitor.json(NET.topic("headend", "metrics")) or {}


def _stored(monitor: Collector) -> int:
    return _headend(monitor).get("counters", {}).get("readings_stored", 0)


def _restart(net: Network, name: str) -> None:
    if name == "broker":
        net.start("broker", "broker")
        wait_port(net.port)
    else:
        net.start(name, *SERVICES[name])


def test_kill_each_process_under_load(tmp_path):
    global NET
    net = NET = Network(tmp_path, meters=60, concentrators=3, env=ENV, bus_security=False)
    net.provision()
    net.start_broker()
    capture = Collector("127.0.0.1", net.port, topics=("ami/v1/plc/+/up/+", "ami/v1/plc/+/down/+"))
    monitor = net.collector()
    try:
        for name in SERVICES:
            net.start(name, *SERVICES[name])
            if name == "concentrator":
                wait_until(lambda: monitor.latest.get(net.topic("concentrator", "status")) == b"online",
                           30, what="relays online")
        wait_until(lambda: _headend(monitor).get("counters", {}).get("associations", 0) >= 60, 60,
                   what="60 associations")
        for victim in ("meters", "concentrator", "headend", "broker"):
            time.sleep(2.0)
            if victim == "headend":
                # Interrupt a key change: the command lands, then the head-end dies.
                subprocess.run(
                    AMI + ["keys", "rotate", "--broker", net.broker, "--data", str(net.data), "--all",
                           "--key", "cc_lan", "--no-wait"],
                    cwd=REPO, env=net.env, capture_output=True, timeout=30, check=True,
                )
            net.stop(victim, signal.SIGKILL)
            time.sleep(0.5)
            _restart(net, victim)
            before = _stored(monitor) if victim != "headend" else 0
            wait_until(lambda: _stored(monitor) > before + 60, 60, what=f"readings flowing after {victim} restart")

        # Quiet period: gaps close, the pending CC_LAN resolves at the next associations.
        def settled() -> bool:
            head = _headend(monitor)
            return head.get("gauges", {}).get("meters_with_gaps", 1) == 0 and head["counters"].get(
                "session_renewals", 0) > 60
        wait_until(settled, 90, what="gap-fill to finish and sessions to renew")
        time.sleep(1.0)
        codes = {n: net.stop(n) for n in ("meters", "concentrator", "headend")}
        assert codes == {"meters": 0, "concentrator": 0, "headend": 0}
        time.sleep(0.5)

        # 1. No (key, IV) reuse, audited from the wire.
        with capture.lock:
            frames = list(dict.fromkeys(p for _t, p, _r in capture.messages))
        factory = {r["meter"]: r for r in map(json.loads, (net.data / "factory-keys.jsonl").read_text().splitlines())}
        network = json.loads((net.data / "network.json").read_text())
        result = audit(frames, factory, bytes.fromhex(network["headend_system_title"]))
        assert result.opened > 1000
        assert result.reused() == {}

        # 2. Every reading seen on the wire stored, once; no holes.
        stored = net.readings()
        flat = {(m, s) for m, seqs in stored.items() for s in seqs}
        assert sum(len(s) for s in stored.values()) == len(flat)
        assert result.readings and result.readings <= flat
        for meter, seqs in stored.items():
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"{meter} has holes"
        assert len(stored) == 60

        # 3. No genuine frame rejected, across every restart.
        rejected = [e for e in monitor.events() if e.get("kind") == "rejected"]
        assert rejected == []

        # 4. The interrupted CC_LAN change resolved: nothing left NEW, and
        #    both sides agree on each meter's CC_LAN.
        vault = FileKeyVault(net.data / "headend.kek")
        with closing(net.db()) as db:
            still_new = db.execute("SELECT meter, version FROM keys WHERE state = 'new'").fetchall()
            if still_new:
                print("HEADEND", json.dumps(_headend(monitor)), file=sys.stderr)
            assert still_new == [], still_new[:5]
            active = {m: vault.unwrap(bytes(w), key_identity(m, "cc_lan", v)) for m, w, v in db.execute(
                "SELECT meter, wrapped, version FROM keys WHERE key_type = 'cc_lan' AND state = 'active'")}
        meter_keys = {}
        for path in (net.data / "meters").glob("*.db"):
            with closing(sqlite3.connect(path)) as db:
                meter_keys.update({m: bytes(k) for m, k in db.execute(
                    "SELECT meter, key FROM keys WHERE key_type = 'cc_lan'")})
        for meter, record in factory.items():
            assert active[meter] == meter_keys.get(meter, bytes.fromhex(record["cc_lan"])), meter
    finally:
        capture.close()
        monitor.close()
        net.kill_all()
