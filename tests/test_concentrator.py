"""The blind relays against a real Mosquitto enforcing the provisioned ACLs:
bytes unchanged both ways, count and time flushes, garbage counted and
survived; and the relay's imports hold nothing that can decrypt."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import paho.mqtt.client as mqtt
import pytest

from ami.protocol.messages import MAX_APDU_SIZE, MAX_BATCH_BYTES, Batch, decode_batch, encode_batch
from harness import free_port, wait_port

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = Path("/usr/sbin/mosquitto")
R = "ami/v1"
FORBIDDEN = ("cryptography", "ami.protocol.cipher", "ami.protocol.channel", "ami.protocol.keys", "ami.security.vault",
             "ami.machines",
             "headend", "meters")

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# imports: nothing that can decrypt


def _forbidden_loaded(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


_REPORT = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def test_relay_source_imports_nothing_that_decrypts() -> None:
    """What the relay's own code names: no cipher, channel, keys, vault,
    cryptography, head-end or meters, and no names from the ami.protocol
    package namespace (which would need its __init__)."""
    for path in (REPO / "concentrator").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
                if node.module == "ami.protocol":
                    assert [a.name for a in node.names] == ["topics"], f"{path.name}: {ast.unparse(node)}"
            else:
                continue
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), f"{path.name}: {name}"


def test_relay_imports_nothing_that_decrypts() -> None:
    """In a fresh interpreter: the relay and its CLI load no cipher, no
    channel, no keys, no `cryptography`, no vault, head-end or meter code."""
    assert _forbidden_loaded(f"import concentrator.relay, concentrator.cli\n{_REPORT}") == []


def test_ami_concentrator_command_loads_no_meter_or_headend_code() -> None:
    """`ami concentrator` builds only its own subparser (ami.cli imports the
    running command's module alone)."""
    code = textwrap.dedent(f"""
        from ami.cli import build_parser
        from ami.runtime.config import load_config
        build_parser(load_config(), "concentrator").parse_args(["concentrator"])
        {_REPORT}
    """)
    assert [m for m in _forbidden_loaded(code) if m.split(".")[0] in ("meters", "headend")] == []


# --------------------------------------------------------------------------
# against a real broker


class Bus:
    """paho clients on the secured broker, recording what they receive."""

    def __init__(self, port: int, sec) -> None:
        self.port, self.sec = port, sec
        self.seen: dict[str, list[tuple[float, bytes]]] = {}
        self.clients: list[mqtt.Client] = []

    def client(self, user: str, *filters: str) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.username_pw_set(user, self.sec.password(user))
        c.on_message = lambda _c, _u, msg: self.seen.setdefault(msg.topic, []).append(
            (time.monotonic(), msg.payload))
        subscribed = []
        c.on_subscribe = lambda *_a: subscribed.append(1)
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        for f in filters:
            c.subscribe(f, qos=1)
        wait_for(lambda: len(subscribed) == len(filters))
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def wait_for(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.fixture
def network(tmp_path: Path):
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto is not installed")
    from ami.security.bus_files import write_bus_security
    from ami.tools.provision import provision

    data = tmp_path / "data"
    net = provision(data, meters=8, concentrators=2, bus_security=False)
    port, tls_port = free_port(), free_port()
    sec = write_bus_security(data, net.concentrators, mqtt_port=port, tls_port=tls_port)
    broker = subprocess.Popen([str(MOSQUITTO), "-c", str(sec.mosquitto_conf)], stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "mosquitto.log").open("wb"))
    bus = Bus(port, sec)
    try:
        wait_port(port, 10.0, broker)
        yield data, port, net, bus
    finally:
        bus.close()
        broker.terminate()
        broker.wait(timeout=10)


def start_relays(data: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AMI__MONITOR__METRICS_INTERVAL_S": "0.2"}
    cmd = [sys.executable, "-m", "ami.cli", "concentrator", "--broker", f"mqtt://127.0.0.1:{port}",
           "--data", str(data), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=15) == 0, proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()


def relays_online(bus: Bus, ident: str = "relays") -> None:
    status = f"{R}/monitor/concentrator/{ident}/status"
    metrics = f"{R}/monitor/concentrator/{ident}/metrics"
    wait_for(lambda: bus.seen.get(status, [(0, b"")])[-1][1] == b"online")
    wait_for(lambda: json.loads(bus.seen.get(metrics, [(0, b"{}")])[-1][1]).get("gauges", {}).get("relays_up") == 2)


def last_metrics(bus: Bus, ident: str = "relays") -> dict:
    return json.loads(bus.seen[f"{R}/monitor/concentrator/{ident}/metrics"][-1][1])


def test_uplink_batches_by_count_then_time(network) -> None:
    data, port, net, bus = network
    bus.client("monitor", f"{R}/monitor/#")
    bus.client("headend", f"{R}/wan/+/up")
    relays = start_relays(data, port, "--batch-max-frames", "5", "--batch-max-delay-ms", "400")
    try:
        relays_online(bus)
        plc = bus.client("plc-c0001")
        meters = net.segments["c0001"]
        sent = [(meters[i % len(meters)], os.urandom(1 + (i * 577) % MAX_APDU_SIZE)) for i in range(12)]
        sent[3] = (sent[3][0], os.urandom(MAX_APDU_SIZE))  # the largest legal frame
        published = time.monotonic()
        for meter, frame in sent:
            plc.publish(f"{R}/plc/c0001/up/{meter}", frame, qos=1)
        wan = f"{R}/wan/c0001/up"
        wait_for(lambda: sum(len(decode_batch(p).frames) for _, p in bus.seen.get(wan, [])) == 12)
        batches = [(t, decode_batch(p)) for t, p in bus.seen[wan]]
        # Count flushes (5 frames) and a time flush for the rest.  On a loaded
        # machine the 400 ms delay may flush a batch before the publisher has
        # sent 5 more: then the cut falls elsewhere, but never above 5.
        sizes = [len(b.frames) for _, b in batches]
        assert sizes[0] == 5 and all(1 <= n <= 5 for n in sizes) and sizes[-1] < 5, sizes
        assert [f for _, b in batches for f in b.frames] == sent  # byte-identical, in order
        assert all(b.concentrator == "c0001" for _, b in batches)
        assert [b.seq for _, b in batches] == sorted({b.seq for _, b in batches})
        assert batches[0][0] - published < 0.35  # a count flush did not wait for the timer
        assert batches[-1][0] - published >= 0.35  # the remainder waited for it
        assert f"{R}/wan/c0002/up" not in bus.seen
        # A frame above MAX_APDU_SIZE is dropped and counted; the relay goes on.
        plc.publish(f"{R}/plc/c0001/up/{meters[0]}", os.urandom(MAX_APDU_SIZE + 1), qos=1)
        plc.publish(f"{R}/plc/c0001/up/{meters[1]}", b"\xdb after", qos=1)
        wait_for(lambda: decode_batch(bus.seen[wan][-1][1]).frames == ((meters[1], b"\xdb after"),))
        wait_for(lambda: last_metrics(bus)["counters"]["batches_up"] == len(batches) + 1)
        snap = last_metrics(bus)
        assert snap["counters"]["frames_up"] == 13 and snap["rejected"]["oversized_frame"] == 1
    finally:
        stop(relays)


def test_downlink_fans_out_unchanged_and_garbage_is_counted(network) -> None:
    data, port, net, bus = network
    bus.client("monitor", f"{R}/monitor/#")
    bus.client("plc-c0001", f"{R}/plc/c0001/down/+")
    relays = start_relays(data, port)
    try:
        relays_online(bus)
        headend = bus.client("headend")
        meters = net.segments["c0001"]
        down = f"{R}/wan/c0001/down"
        garbage = [
            b"\x00not msgpack",
            b"",
            msgpack.packb({"v": 1, "c": "c0001", "n": 1, "f": [["m1", "not bytes"]]}),
            msgpack.packb({"v": 2, "c": "c0001", "n": 1, "f": []}),
            encode_batch(Batch("c0002", 1, ((net.segments["c0002"][0], b"x"),))),  # another segment's batch
            b"\x91" + b"\xc6" + (MAX_BATCH_BYTES).to_bytes(4, "big") + bytes(MAX_BATCH_BYTES),  # oversized
            msgpack.packb([1] * 100_000),  # deep/large but not a map
        ]
        for g in garbage:
            headend.publish(down, g, qos=1)
        frames = [
            (meters[0], os.urandom(40)),
            (meters[1], os.urandom(MAX_APDU_SIZE)),
            ("m999999", b"not on this segment"),
            ("../../wan/c0001/up", b"topic injection"),
            (meters[2], os.urandom(MAX_APDU_SIZE + 1)),
            (meters[0], os.urandom(17)),
        ]
        headend.publish(down, encode_batch(Batch("c0001", 7, tuple(frames))), qos=1)
        good = [frames[0], frames[1], frames[5]]
        wait_for(lambda: len([1 for t in bus.seen if t.startswith(f"{R}/plc/c0001/down/")
                              for _ in bus.seen[t]]) == 3)
        got = [(t.rsplit("/", 1)[1], p) for t, ps in bus.seen.items() if t.startswith(f"{R}/plc/c0001/down/")
               for _, p in ps]
        assert sorted(got) == sorted(good)  # byte-identical, bad items dropped alone
        assert [p for _, p in bus.seen[f"{R}/plc/c0001/down/{meters[0]}"]] == [frames[0][1], frames[5][1]]
        wait_for(lambda: last_metrics(bus)["counters"].get("frames_down") == 3)
        snap = last_metrics(bus)
        rejected = snap["rejected"]
        assert rejected["malformed_message"] >= 5
        assert rejected["wrong_segment"] == 1 and rejected["oversized_message"] == 1
        assert rejected["unknown_meter"] == 2 and rejected["oversized_frame"] == 1
        assert snap["counters"]["batches_down"] == 1
        assert relays.poll() is None  # survived it all
    finally:
        stop(relays)
    wait_for(lambda: bus.seen[f"{R}/monitor/concentrator/relays/status"][-1][1] == b"offline")


def test_many_relays_in_one_process(network, tmp_path: Path) -> None:
    """Every relay of the network in one process, each under its own user."""
    data, port, net, bus = network
    bus.client("monitor", f"{R}/monitor/#")
    bus.client("headend", f"{R}/wan/+/up")
    relays = start_relays(data, port, "--batch-max-delay-ms", "20", "--ident", "all")
    try:
        relays_online(bus, "all")
        for c in net.concentrators:
            plc = bus.client(f"plc-{c}")
            for m in net.segments[c]:
                plc.publish(f"{R}/plc/{c}/up/{m}", m.encode(), qos=1)
        for c in net.concentrators:
            wait_for(lambda c=c: sorted(f for _, p in bus.seen.get(f"{R}/wan/{c}/up", [])
                                        for f in decode_batch(p).frames)
                     == sorted((m, m.encode()) for m in net.segments[c]))
    finally:
        stop(relays)
