"""Bus authentication and ACL, proven against real brokers (no mocks).

Both the embedded amqtt broker (`python -m ami.broker`, as a subprocess) and
Mosquitto (with the generated mosquitto.conf) get the same bus material and
the same attacks.  Every "nothing arrived" assertion is paired with a control
message that *is* allowed and *does* arrive, published after the forbidden
one, so a dead subscriber or a dead publisher cannot make a test pass.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from ami.broker.server import amqtt_config, broker_settings
from ami.security.bus_acl import acl_allows, bus_users, filter_covers
from ami.security.bus_files import (BusSecurity, mosquitto_pbkdf2_hash, read_all_identities, read_identity,
                                     write_bus_security)
from harness import free_port

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = Path("/usr/sbin/mosquitto")
R = "ami/v1"
WAIT = 3.0  # how long a control message may take to arrive
GRACE = 0.3  # extra time a forbidden message would have had after its control

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# acl_allows: the table itself


@pytest.mark.parametrize(
    ("user", "action", "topic", "expected"),
    [
        # plc-{c}: its own segment's uplink and local port only
        ("plc-c0001", "publish", f"{R}/plc/c0001/up/m000001", True),
        ("plc-c0001", "publish", f"{R}/plc/c0002/up/m000001", False),
        ("plc-c0001", "publish", f"{R}/plc/c0001/down/m000001", False),
        ("plc-c0001", "publish", f"{R}/wan/c0001/up", False),
        ("plc-c0001", "publish", f"{R}/plc/c0001/up", False),  # '+' needs exactly one level
        ("plc-c0001", "publish", f"{R}/plc/c0001/up/m1/x", False),
        ("plc-c0001", "publish", f"{R}/plc/c0001/up/+", False),  # wildcards never publishable
        ("plc-c0001", "publish", f"{R}/local/c0001/m1/out", True),
        ("plc-c0001", "publish", f"{R}/local/c0001/m1/in", False),
        ("plc-c0001", "subscribe", f"{R}/plc/c0001/down/+", True),
        ("plc-c0001", "subscribe", f"{R}/plc/c0001/down/m000001", True),
        ("plc-c0001", "subscribe", f"{R}/plc/c0001/down/#", False),  # '+' does not grant '#'
        ("plc-c0001", "subscribe", f"{R}/plc/+/down/+", False),
        ("plc-c0001", "subscribe", f"{R}/plc/c0002/down/+", False),
        ("plc-c0001", "subscribe", f"{R}/#", False),
        ("plc-c0001", "subscribe", "#", False),
        ("plc-c0001", "subscribe", f"{R}/local/c0001/+/in", True),
        ("plc-c0001", "subscribe", f"{R}/local/c0001/m1/in", True),
        ("plc-c0001", "subscribe", f"{R}/local/+/+/in", False),
        # relay-{c}
        ("relay-c0001", "publish", f"{R}/plc/c0001/down/m1", True),
        ("relay-c0001", "publish", f"{R}/wan/c0001/up", True),
        ("relay-c0001", "publish", f"{R}/wan/c0002/up", False),
        ("relay-c0001", "publish", f"{R}/wan/c0001/down", False),
        ("relay-c0001", "subscribe", f"{R}/plc/c0001/up/+", True),
        ("relay-c0001", "subscribe", f"{R}/plc/c0002/up/+", False),
        ("relay-c0001", "subscribe", f"{R}/plc/+/up/+", False),
        ("relay-c0001", "subscribe", f"{R}/wan/c0001/down", True),
        ("relay-c0001", "subscribe", f"{R}/wan/c0002/down", False),
        ("relay-c0001", "subscribe", f"{R}/wan/+/down", False),
        # process-level monitor connections
        ("meters", "publish", f"{R}/monitor/meters/p1/status", True),
        ("meters", "publish", f"{R}/monitor/concentrator/p1/status", False),
        ("meters", "subscribe", f"{R}/monitor/meters/#", False),
        ("concentrator", "publish", f"{R}/monitor/concentrator/c0001/metrics", True),
        ("concentrator", "publish", f"{R}/monitor/headend/x", False),
        # headend
        ("headend", "publish", f"{R}/wan/c0001/down", True),
        ("headend", "publish", f"{R}/wan/c0001/up", False),
        ("headend", "publish", f"{R}/monitor/headend/events", True),
        ("headend", "publish", f"{R}/monitor/headend", True),  # '#' also matches the parent level
        ("headend", "publish", f"{R}/control/replies/req-1", True),
        ("headend", "publish", f"{R}/control/headend/commands", False),
        ("headend", "subscribe", f"{R}/wan/+/up", True),
        ("headend", "subscribe", f"{R}/wan/c0001/up", True),
        ("headend", "subscribe", f"{R}/wan/#", False),
        ("headend", "subscribe", f"{R}/wan/+/+", False),
        ("headend", "subscribe", f"{R}/control/headend/commands", True),
        ("headend", "subscribe", f"{R}/monitor/#", False),
        # operator
        ("operator", "publish", f"{R}/control/headend/commands", True),
        ("operator", "publish", f"{R}/wan/c0001/down", False),
        ("operator", "publish", f"{R}/control/replies/x", False),
        ("operator", "subscribe", f"{R}/control/replies/#", True),
        ("operator", "subscribe", f"{R}/control/replies/req-1", True),
        ("operator", "subscribe", f"{R}/monitor/#", True),
        ("operator", "subscribe", f"{R}/monitor/+/+/status", True),
        ("operator", "subscribe", f"{R}/#", False),
        ("operator", "subscribe", f"{R}/control/#", False),
        # tsp
        ("tsp", "publish", f"{R}/local/c0001/m1/in", True),
        ("tsp", "publish", f"{R}/local/c0001/m1/out", False),
        ("tsp", "subscribe", f"{R}/local/+/+/out", True),
        ("tsp", "subscribe", f"{R}/local/c0001/+/out", True),
        ("tsp", "subscribe", f"{R}/local/#", False),
        ("tsp", "subscribe", f"{R}/local/+/#", False),
        # monitor: read-only
        ("monitor", "publish", f"{R}/monitor/headend/events", False),
        ("monitor", "subscribe", f"{R}/monitor/#", True),
        ("monitor", "subscribe", f"{R}/monitor/meters/p1/status", True),
        ("monitor", "subscribe", f"{R}/control/replies/#", False),
        # malformed filters and unknown or forged identities
        ("monitor", "subscribe", f"{R}/monitor/#/x", False),
        ("monitor", "subscribe", f"{R}/monitor/a+", False),
        ("monitor", "subscribe", "", False),
        ("admin", "subscribe", "#", False),
        ("", "subscribe", f"{R}/monitor/#", False),
        ("plc-", "publish", f"{R}/plc//up/m1", False),
        ("plc-+", "publish", f"{R}/plc/+/up/m1", False),
        ("relay-#", "subscribe", f"{R}/plc/#", False),
        ("plc-c0001/up/x", "publish", f"{R}/plc/c0001/up/x/up/m1", False),
        ("PLC-c0001", "publish", f"{R}/plc/c0001/up/m1", False),
    ],
)
def test_acl_allows(user: str, action: str, topic: str, expected: bool) -> None:
    assert acl_allows(user, action, topic) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "a/#", True),
        ("a/#", "a/+/c", True),
        ("#", "x/y", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/#", False),
        ("a/+", "a", False),
        ("a/+", "a/b/c", False),
        ("a/b", "a/+", False),
        ("a/+/c", "a//c", True),  # '+' matches an empty level
        ("a/b", "a/b", True),
    ],
)
def test_filter_covers(allowed: str, requested: str, expected: bool) -> None:
    assert filter_covers(allowed, requested) is expected


def test_acl_allows_rejects_unknown_action() -> None:
    with pytest.raises(ValueError):
        acl_allows("monitor", "delete", f"{R}/monitor/x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Generated files


class _FixedTokens:
    def __init__(self) -> None:
        self.n = 0

    def token_urlsafe(self, nbytes: int | None = None) -> str:
        self.n += 1
        return f"pw-{self.n}-"  # "-" is outside the hashes' base64: no chance match in a password file


def test_write_bus_security_files(tmp_path: Path) -> None:
    sec = write_bus_security(tmp_path, ["c0001", "c0002"], rng=_FixedTokens())
    assert sec.bus_dir == tmp_path / "bus"
    assert sec.users == bus_users(["c0001", "c0002"])
    assert sec.password("plc-c0001") == "pw-1-"  # rng is the only source of passwords
    # One file per identity, holding that identity's password and nothing else.
    assert read_all_identities(sec.bus_dir) == {u: sec.password(u) for u in sec.users}
    assert read_identity(sec.bus_dir, "monitor") == sec.password("monitor")
    assert sorted(p.name for p in sec.identities.iterdir()) == sorted(f"{u}.secret" for u in sec.users)
    assert not (sec.bus_dir / "credentials.json").exists()  # no file holds every password
    assert BusSecurity.at(sec.bus_dir).passwords == {}  # opening the paths reads no secret

    # Everything under bus/ is owner-only (tests/test_broker_auth.py checks a provisioned folder too).
    for path in [sec.bus_dir, *sec.bus_dir.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    leftovers = [p.name for p in sec.bus_dir.rglob("*") if p.name.endswith((".plain", ".tmp"))]
    assert leftovers == []  # no plaintext password file left behind

    # No password appears in clear anywhere but its own identity file.
    for f in sec.bus_dir.iterdir():
        if f.is_file():
            text = f.read_bytes()
            assert not any(sec.password(u).encode() in text for u in sec.users), f


def test_amqtt_password_file_verifies_with_amqtts_hasher(tmp_path: Path) -> None:
    from amqtt.plugins.authentication import DeprecatedSHA512CryptHasher
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    sec = write_bus_security(tmp_path, ["c0001"])
    # The same hasher set amqtt 0.12.1's FileAuthPlugin builds.
    hasher = PasswordHash((Argon2Hasher(), DeprecatedSHA512CryptHasher()))
    hashes = dict(line.split(":", 1) for line in sec.amqtt_passwd.read_text().split())
    assert set(hashes) == set(sec.users)
    assert all(h.startswith("$argon2id$") for h in hashes.values())
    assert hasher.verify(sec.password("headend"), hashes["headend"])
    assert not hasher.verify(sec.password("operator"), hashes["headend"])


def test_mosquitto_hash_format_matches_mosquitto_passwd(tmp_path: Path) -> None:
    """The pure-Python fallback must produce what the real tool produces."""
    import base64

    sec = write_bus_security(tmp_path, ["c0001"])
    line = next(x for x in sec.mosquitto_passwd.read_text().split() if x.startswith("monitor:"))
    _, _, iterations, salt, _ = line.split(":", 1)[1].split("$")
    ours = mosquitto_pbkdf2_hash(sec.password("monitor"), salt=base64.b64decode(salt), iterations=int(iterations))
    assert line == f"monitor:{ours}"


def test_amqtt_acl_export_loads_into_stock_plugin_config(tmp_path: Path) -> None:
    from amqtt.plugins.topic_checking import TopicAccessControlListPlugin
    from dacite import Config, from_dict

    sec = write_bus_security(tmp_path, ["c0001"])
    data = json.loads(sec.amqtt_acl.read_text())
    cfg = from_dict(TopicAccessControlListPlugin.Config, data, config=Config(strict=True))
    assert cfg.publish_acl["relay-c0001"] == [f"{R}/plc/c0001/down/+", f"{R}/wan/c0001/up"]
    assert cfg.acl["monitor"] == [f"{R}/monitor/#"]
    assert cfg.publish_acl["monitor"] == []


def test_tls_material(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    sec = write_bus_security(tmp_path, ["c0001"])
    ca = x509.load_pem_x509_certificate(sec.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(sec.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "PRIVATE KEY" in sec.server_key.read_text()


def test_invalid_concentrator_ids_rejected(tmp_path: Path) -> None:
    for bad in ("c0001/x", "+", "#", ""):
        with pytest.raises(ValueError):
            write_bus_security(tmp_path, [bad])


def test_broker_config_is_lean_and_toml_able(tmp_path: Path) -> None:
    open_cfg = amqtt_config(broker_settings("127.0.0.1", 1884))
    assert list(open_cfg["plugins"]) == ["amqtt.plugins.authentication.AnonymousAuthPlugin"]

    sec = write_bus_security(tmp_path, ["c0001"])
    settings = broker_settings("127.0.0.1", 1884, bus_dir=sec.bus_dir, tls_port=8884)
    cfg = amqtt_config(settings)
    assert "amqtt.plugins.authentication.AnonymousAuthPlugin" not in cfg["plugins"]
    assert not any("sys" in p or "logging" in p for p in cfg["plugins"])  # no $SYS, no loggers
    assert cfg["listeners"]["tls"]["ssl"] is True
    with pytest.raises(ValueError):
        amqtt_config(broker_settings("127.0.0.1", 1884, tls_port=8884))  # TLS needs the certs

    toml = tomllib.loads((REPO / "config" / "broker.toml").read_text())
    assert toml["broker"]["port"] == 1884
    assert set(toml["broker"]) <= {"host", "port", "tls_port", "bus_dir"}


# --------------------------------------------------------------------------
# Real brokers


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not accepting connections:\n{log.read_text()}")


@dataclass
class RunningBroker:
    kind: str
    port: int
    tls_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_amqtt_broker(bus_dir: Path, log: Path) -> RunningBroker:
    port, tls_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ami.broker.server", "--port", str(port), "--bus-dir", str(bus_dir),
           "--tls-port", str(tls_port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    wait_for_port(port, proc, log)
    wait_for_port(tls_port, proc, log)
    return RunningBroker("amqtt", port, tls_port, proc, log)


def start_mosquitto(sec: BusSecurity, port: int, tls_port: int, log: Path) -> RunningBroker:
    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is not installed")
    proc = subprocess.Popen([str(MOSQUITTO), "-c", str(sec.mosquitto_conf)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    wait_for_port(port, proc, log)
    wait_for_port(tls_port, proc, log)
    return RunningBroker("mosquitto", port, tls_port, proc, log)


@pytest.fixture(scope="module")
def mosquitto_ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, mosquitto_ports: tuple[int, int]) -> BusSecurity:
    port, tls_port = mosquitto_ports
    return write_bus_security(tmp_path_factory.mktemp("net"), ["c0001", "c0002"],
                              mqtt_port=port, tls_port=tls_port)


@pytest.fixture(scope="module", params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker(request: pytest.FixtureRequest, bus: BusSecurity, mosquitto_ports: tuple[int, int],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    log = tmp_path_factory.mktemp("log") / f"{request.param}.log"
    if request.param == "amqtt":
        b = start_amqtt_broker(bus.bus_dir, log)
    else:
        b = start_mosquitto(bus, *mosquitto_ports, log)
    yield b
    rc = b.stop()
    if b.kind == "amqtt":
        assert rc == 0, f"amqtt broker did not exit cleanly on SIGTERM:\n{log.read_text()}"


class Client:
    """A paho client driven synchronously: connect() returns the CONNACK verdict."""

    def __init__(self, broker: RunningBroker, user: str | None, password: str | None, *,
                 tls: bool = False, ca: Path | None = None, client_id: str | None = None,
                 clean: bool = True, will: str | None = None) -> None:
        self.broker = broker
        self.port = broker.tls_port if tls else broker.port
        self.client_id = client_id or f"{user or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=clean, reconnect_on_failure=False)
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls:
            self.c.tls_set(ca_certs=str(ca) if ca else None)
        if will:
            self.c.will_set(will, b"will", qos=1)
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.connack: mqtt.ReasonCode | None = None
        self.suback: list[int] | None = None
        self.hung_up = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe

    def _on_connect(self, _c, _u, _flags, rc, _props) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_disconnect(self, _c, _u, _flags, _rc, _props) -> None:
        with self.cond:
            self.hung_up = True
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def _on_subscribe(self, _c, _u, _mid, rcs, _props) -> None:
        with self.cond:
            self.suback = [rc.value for rc in rcs]
            self.cond.notify_all()

    def connect(self, timeout: float = 5.0) -> bool:
        """True if the broker accepted us; False if it refused or hung up."""
        self.c.connect_timeout = timeout  # bounds the TCP connect and the TLS handshake
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.hung_up, timeout)
        if self.connack is None or self.connack.is_failure:
            self.close()
            return False
        return True

    def subscribe(self, *filters: str) -> list[int]:
        with self.cond:
            self.suback = None
        self.c.subscribe([(f, 1) for f in filters])
        with self.cond:
            assert self.cond.wait_for(lambda: self.suback is not None, WAIT), "no SUBACK"
            return list(self.suback or [])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        # QoS 1 and wait for PUBACK: the broker has processed the message
        # (delivered or dropped it) before we go on.
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait_for(self, payload: bytes, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(p == payload for _, p in self.messages), timeout)

    def got(self, payload: bytes) -> bool:
        with self.cond:
            return any(p == payload for _, p in self.messages)

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed client would: the Will fires."""
        sock = self.c.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        time.sleep(0.2)
        self.c.loop_stop()

    def close(self) -> None:
        self.c.disconnect()  # a no-op error code if not connected
        self.c.loop_stop()


@pytest.fixture
def connect(broker: RunningBroker, bus: BusSecurity) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def _connect(user: str, *subscriptions: str, **kw) -> Client:
        client = Client(broker, user, bus.password(user), **kw)
        assert client.connect(), f"{user} could not connect to {broker.kind}"
        if subscriptions:
            client.subscribe(*subscriptions)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()


def token() -> bytes:
    return uuid.uuid4().hex.encode()


def assert_not_delivered(forbidden: bytes, *observers: Client) -> None:
    time.sleep(GRACE)
    for o in observers:
        assert not o.got(forbidden), f"forbidden message reached {o.client_id}"


# -- authentication


def test_wrong_password_refused(broker: RunningBroker, bus: BusSecurity) -> None:
    assert not Client(broker, "headend", "not-the-password").connect()
    assert not Client(broker, "headend", bus.password("operator")).connect()  # someone else's
    assert not Client(broker, "admin", bus.password("headend")).connect()  # unknown user


def test_anonymous_refused(broker: RunningBroker) -> None:
    assert not Client(broker, None, None).connect()


def test_right_password_accepted(broker: RunningBroker, bus: BusSecurity) -> None:
    c = Client(broker, "monitor", bus.password("monitor"))
    assert c.connect()
    c.close()


# -- every allowed path works (the positive controls)


def test_allowed_paths(connect: Callable[..., Client]) -> None:
    plc = connect("plc-c0001", f"{R}/plc/c0001/down/+", f"{R}/local/c0001/+/in")
    relay = connect("relay-c0001", f"{R}/plc/c0001/up/+", f"{R}/wan/c0001/down")
    headend = connect("headend", f"{R}/wan/+/up", f"{R}/control/headend/commands")
    operator = connect("operator", f"{R}/control/replies/#", f"{R}/monitor/#")
    tsp = connect("tsp", f"{R}/local/+/+/out")
    monitor = connect("monitor", f"{R}/monitor/#")
    meters = connect("meters")
    concentrator = connect("concentrator")

    flows = [
        (plc, f"{R}/plc/c0001/up/m000001", [relay]),
        (relay, f"{R}/plc/c0001/down/m000001", [plc]),
        (relay, f"{R}/wan/c0001/up", [headend]),
        (headend, f"{R}/wan/c0001/down", [relay]),
        (plc, f"{R}/local/c0001/m000001/out", [tsp]),
        (tsp, f"{R}/local/c0001/m000001/in", [plc]),
        (operator, f"{R}/control/headend/commands", [headend]),
        (headend, f"{R}/control/replies/req-1", [operator]),
        (headend, f"{R}/monitor/headend/events", [operator, monitor]),
        (meters, f"{R}/monitor/meters/fleet1/status", [operator, monitor]),
        (concentrator, f"{R}/monitor/concentrator/c0001/metrics", [operator, monitor]),
    ]
    for sender, topic, receivers in flows:
        payload = token()
        sender.publish(topic, payload)
        for r in receivers:
            assert r.wait_for(payload), f"{topic} did not reach {r.client_id}"


# -- denials, each with its controls


def test_plc_cannot_publish_to_other_segment(connect: Callable[..., Client]) -> None:
    relay1 = connect("relay-c0001", f"{R}/plc/c0001/up/+")
    relay2 = connect("relay-c0002", f"{R}/plc/c0002/up/+")
    plc1 = connect("plc-c0001")
    plc2 = connect("plc-c0002")

    forbidden, control1, control2 = token(), token(), token()
    plc1.publish(f"{R}/plc/c0002/up/m1", forbidden)
    plc1.publish(f"{R}/plc/c0001/up/m1", control1)  # plc1 is alive and heard
    plc2.publish(f"{R}/plc/c0002/up/m2", control2)  # relay2 listens where the attack aimed
    assert relay1.wait_for(control1) and relay2.wait_for(control2)
    assert_not_delivered(forbidden, relay1, relay2)


def test_plc_cannot_publish_to_wan(connect: Callable[..., Client]) -> None:
    headend = connect("headend", f"{R}/wan/+/up")
    relay = connect("relay-c0001", f"{R}/plc/c0001/up/+")
    plc = connect("plc-c0001")

    forbidden, control1, control2 = token(), token(), token()
    plc.publish(f"{R}/wan/c0001/up", forbidden)
    plc.publish(f"{R}/plc/c0001/up/m1", control1)
    relay.publish(f"{R}/wan/c0001/up", control2)
    assert relay.wait_for(control1) and headend.wait_for(control2)
    assert_not_delivered(forbidden, headend)


@pytest.mark.parametrize("attack", [f"{R}/plc/c0002/up/+", f"{R}/plc/+/up/+", f"{R}/#", "#"])
def test_relay_cannot_read_other_segment_uplink(
    connect: Callable[..., Client], broker: RunningBroker, attack: str
) -> None:
    spy = connect("relay-c0001", f"{R}/plc/c0001/up/+")
    codes = spy.subscribe(attack)
    if broker.kind == "amqtt":
        assert codes == [0x80]  # refused outright by ami.broker.plugins
    relay2 = connect("relay-c0002", f"{R}/plc/c0002/up/+")
    plc1, plc2 = connect("plc-c0001"), connect("plc-c0002")

    secret, control1 = token(), token()
    plc2.publish(f"{R}/plc/c0002/up/m2", secret)
    plc1.publish(f"{R}/plc/c0001/up/m1", control1)
    assert relay2.wait_for(secret), "the secret was not even published"
    assert spy.wait_for(control1), "the spy's own segment stopped working"
    assert_not_delivered(secret, spy)


def test_relay_cannot_read_other_segment_downlink(connect: Callable[..., Client], broker: RunningBroker) -> None:
    spy = connect("relay-c0001", f"{R}/wan/c0001/down")
    codes = spy.subscribe(f"{R}/wan/c0002/down", f"{R}/wan/+/down")
    if broker.kind == "amqtt":
        assert codes == [0x80, 0x80]
    relay2 = connect("relay-c0002", f"{R}/wan/c0002/down")
    headend = connect("headend")

    secret, control = token(), token()
    headend.publish(f"{R}/wan/c0002/down", secret)
    headend.publish(f"{R}/wan/c0001/down", control)
    assert relay2.wait_for(secret) and spy.wait_for(control)
    assert_not_delivered(secret, spy)


def test_monitor_cannot_publish_anything(connect: Callable[..., Client]) -> None:
    monitor = connect("monitor", f"{R}/monitor/#")
    operator = connect("operator", f"{R}/monitor/#")
    relay = connect("relay-c0001", f"{R}/wan/c0001/down")
    plc = connect("plc-c0001", f"{R}/plc/c0001/down/+")
    headend = connect("headend", f"{R}/control/headend/commands", f"{R}/wan/+/up")

    forbidden = token()
    targets = [f"{R}/monitor/headend/events", f"{R}/monitor/meters/x/status", f"{R}/wan/c0001/down",
               f"{R}/wan/c0001/up", f"{R}/plc/c0001/down/m1", f"{R}/control/headend/commands"]
    for topic in targets:
        monitor.publish(topic, forbidden)

    controls = [(headend, f"{R}/monitor/headend/events", [operator, monitor]),
                (headend, f"{R}/wan/c0001/down", [relay]),
                (relay, f"{R}/wan/c0001/up", [headend]),
                (relay, f"{R}/plc/c0001/down/m1", [plc]),
                (operator, f"{R}/control/headend/commands", [headend])]
    for sender, topic, receivers in controls:
        payload = token()
        sender.publish(topic, payload)
        assert all(r.wait_for(payload) for r in receivers), topic
    assert_not_delivered(forbidden, monitor, operator, relay, plc, headend)


def test_operator_cannot_publish_to_wan(connect: Callable[..., Client]) -> None:
    relay = connect("relay-c0001", f"{R}/wan/c0001/down")
    headend = connect("headend", f"{R}/wan/+/up", f"{R}/control/headend/commands")
    operator = connect("operator")

    forbidden, c_cmd, c_down, c_up = token(), token(), token(), token()
    operator.publish(f"{R}/wan/c0001/down", forbidden)
    operator.publish(f"{R}/wan/c0001/up", forbidden)
    operator.publish(f"{R}/control/headend/commands", c_cmd)  # operator alive and heard
    headend.publish(f"{R}/wan/c0001/down", c_down)
    relay.publish(f"{R}/wan/c0001/up", c_up)
    assert headend.wait_for(c_cmd) and relay.wait_for(c_down) and headend.wait_for(c_up)
    assert_not_delivered(forbidden, relay, headend)


def test_will_cannot_bypass_publish_acl(connect: Callable[..., Client], broker: RunningBroker,
                                        bus: BusSecurity) -> None:
    """amqtt's stock broker publishes a Will without any topic check."""
    headend = connect("headend", f"{R}/wan/+/up")
    attacker = Client(broker, "plc-c0001", bus.password("plc-c0001"), will=f"{R}/wan/c0001/up")
    if attacker.connect():
        assert broker.kind != "amqtt", "ami.broker.plugins must refuse a forbidden Will at CONNECT"
        attacker.drop()
    relay = connect("relay-c0001")
    control = token()
    relay.publish(f"{R}/wan/c0001/up", control)
    assert headend.wait_for(control)
    time.sleep(GRACE)
    assert not any(p == b"will" for _, p in headend.messages), "forbidden Will was delivered"


def test_allowed_will_is_delivered(connect: Callable[..., Client], broker: RunningBroker,
                                   bus: BusSecurity) -> None:
    """Services set their offline status as Last Will; that must keep working."""
    monitor = connect("monitor", f"{R}/monitor/#")
    fleet = Client(broker, "meters", bus.password("meters"), will=f"{R}/monitor/meters/fleet9/status")
    assert fleet.connect()
    fleet.drop()
    assert monitor.wait_for(b"will")


def test_resumed_session_of_another_user_gets_nothing(connect: Callable[..., Client], broker: RunningBroker,
                                                      bus: BusSecurity) -> None:
    """Subscriptions belong to a client id; resuming someone's persistent
    session must not inherit their reading rights."""
    cid = f"relay-persist-{uuid.uuid4().hex[:6]}"
    owner = Client(broker, "relay-c0001", bus.password("relay-c0001"), client_id=cid, clean=False)
    assert owner.connect()
    owner.subscribe(f"{R}/plc/c0001/up/+")
    owner.close()

    thief = Client(broker, "monitor", bus.password("monitor"), client_id=cid, clean=False)
    assert thief.connect()
    try:
        thief.subscribe(f"{R}/monitor/#")
        plc, headend = connect("plc-c0001"), connect("headend")
        secret, control = token(), token()
        plc.publish(f"{R}/plc/c0001/up/m1", secret)
        headend.publish(f"{R}/monitor/headend/events", control)
        assert thief.wait_for(control)
        assert_not_delivered(secret, thief)
    finally:
        thief.close()
        # Do not leave a persistent session behind for the next tests.
        cleaner = Client(broker, "relay-c0001", bus.password("relay-c0001"), client_id=cid, clean=True)
        if cleaner.connect():
            cleaner.close()


def test_retained_messages_only_reach_their_subscribers(connect: Callable[..., Client]) -> None:
    """amqtt 0.12.1 replays retained messages to every new client for every
    filter anyone holds; ami.broker.server.AclBroker confines that."""
    topic = f"{R}/monitor/headend/retained-{uuid.uuid4().hex[:6]}"
    operator = connect("operator", f"{R}/monitor/#")
    headend = connect("headend")
    secret = token()
    headend.publish(topic, secret, retain=True)
    try:
        assert operator.wait_for(secret)
        plc = connect("plc-c0001", f"{R}/plc/c0001/down/+")
        late_monitor = connect("monitor", f"{R}/monitor/#")
        relay = connect("relay-c0001")
        control = token()
        relay.publish(f"{R}/plc/c0001/down/m1", control)
        assert plc.wait_for(control)
        assert late_monitor.wait_for(secret), "a real subscriber must still get the retained message"
        assert_not_delivered(secret, plc)
    finally:
        headend.publish(topic, b"", retain=True)  # clear it


# -- TLS


def test_tls_with_ca_works(broker: RunningBroker, bus: BusSecurity) -> None:
    sub = Client(broker, "monitor", bus.password("monitor"), tls=True, ca=bus.ca)
    pub = Client(broker, "headend", bus.password("headend"), tls=True, ca=bus.ca)
    assert sub.connect() and pub.connect()
    try:
        sub.subscribe(f"{R}/monitor/#")
        payload = token()
        pub.publish(f"{R}/monitor/headend/events", payload)
        assert sub.wait_for(payload)
    finally:
        sub.close()
        pub.close()


def test_tls_still_requires_password(broker: RunningBroker, bus: BusSecurity) -> None:
    assert not Client(broker, "headend", "wrong", tls=True, ca=bus.ca).connect()
    assert not Client(broker, None, None, tls=True, ca=bus.ca).connect()


def test_tls_without_our_ca_fails_verification(broker: RunningBroker, bus: BusSecurity, tmp_path: Path) -> None:
    other = write_bus_security(tmp_path, ["c0001"])  # a different private CA
    for ca in (None, other.ca):  # system trust store, then a foreign CA
        client = Client(broker, "monitor", bus.password("monitor"), tls=True, ca=ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            client.connect()


def test_plain_and_tls_ports_do_not_mix(broker: RunningBroker, bus: BusSecurity) -> None:
    plain_on_tls = Client(broker, "monitor", bus.password("monitor"))
    plain_on_tls.port = broker.tls_port
    try:
        assert not plain_on_tls.connect(timeout=1)
    except OSError:
        pass  # the TLS side hung up mid-connect: refused as well

    tls_on_plain = Client(broker, "monitor", bus.password("monitor"), tls=True, ca=bus.ca)
    tls_on_plain.port = broker.port
    with pytest.raises((ssl.SSLError, OSError)):
        tls_on_plain.connect(timeout=1)
