"""Authenticate before anything, one identity per process, fail closed (issue 9, findings 4, 5, 7-bus).

The attacks run against real brokers, the embedded amqtt one (`python -m
ami.broker.server`) and a private Mosquitto started with the generated
config (skipped, with the reason printed, when /usr/sbin/mosquitto is
absent).  amqtt 0.12.1 looked up, deleted or took over the session a CONNECT's
client id names *before* checking its password; ami.broker.server.AclBroker
checks the password first.  Each attack is followed by a control message
that is allowed and does arrive, so a dead client cannot make a test pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ami.broker.cli import BrokerConfigError, broker_bus_dir
from ami.runtime.bus import BusIdentityMissing, load_credentials, make_client
from ami.security.bus_files import ANONYMOUS_MARKER, BusSecurity, bus_mode, read_identity, write_bus_security
from harness import free_port
from test_bus_acl import GRACE, Client, RunningBroker, start_amqtt_broker, start_mosquitto, token

REPO = Path(__file__).resolve().parents[1]
R = "ami/v1"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, ports: tuple[int, int]) -> BusSecurity:
    return write_bus_security(tmp_path_factory.mktemp("net"), ["c0001", "c0002"], mqtt_port=ports[0],
                              tls_port=ports[1])


@pytest.fixture(scope="module", params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker(request: pytest.FixtureRequest, bus: BusSecurity, ports: tuple[int, int],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    log = tmp_path_factory.mktemp("log") / f"{request.param}.log"
    b = start_amqtt_broker(bus.bus_dir, log) if request.param == "amqtt" else start_mosquitto(bus, *ports, log)
    yield b
    b.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def online(broker: RunningBroker, bus: BusSecurity, made: list[Client], user: str, *subscriptions: str,
           **kw) -> Client:
    c = Client(broker, user, bus.password(user), **kw)
    assert c.connect(), f"{user} could not connect to {broker.kind}"
    if subscriptions:
        c.subscribe(*subscriptions)
    made.append(c)
    return c


def cid(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:16]}"


# -- a refused CONNECT changes nothing


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_refused_connect_leaves_victims_subscriptions(broker: RunningBroker, bus: BusSecurity,
                                                      clients: list[Client], clean: bool) -> None:
    """Old amqtt: a clean CONNECT with the head-end's client id and a wrong
    password deleted the head-end's subscriptions (it stayed connected and
    deaf); a persistent one took its connection over."""
    victim_id = cid("ami-headend")
    headend = online(broker, bus, clients, "headend", f"{R}/wan/+/up", f"{R}/control/headend/commands",
                     client_id=victim_id, clean=False)
    relay = online(broker, bus, clients, "relay-c0001")

    for password in ("wrong", bus.password("relay-c0001"), None):  # a guess, another identity's, none
        attacker = Client(broker, "headend", password, client_id=victim_id, clean=clean)
        assert not attacker.connect(), "a wrong password was accepted"

    reading = token()
    relay.publish(f"{R}/wan/c0001/up", reading)
    assert headend.wait_for(reading), f"the head-end went deaf after a refused CONNECT on {broker.kind}"
    assert not headend.hung_up, "a refused CONNECT took the head-end's connection over"


@pytest.mark.parametrize("target", [f"{R}/control/headend/commands", f"{R}/wan/c0001/down"],
                         ids=["operator-command", "headend-only-downlink"])
def test_refused_connect_fires_no_will_and_retains_nothing(broker: RunningBroker, bus: BusSecurity,
                                                           clients: list[Client], target: str) -> None:
    """Old amqtt copied a refused CONNECT's Will into the live persistent
    session it named, took the connection over and so fired that Will (no ACL
    check): an operator command reached the head-end, a frame reached a
    head-end-only downlink, retained there with the victim's retain flag."""
    headend = online(broker, bus, clients, "headend", f"{R}/control/headend/commands")
    relay = online(broker, bus, clients, "relay-c0001", f"{R}/wan/c0001/down")
    operator = online(broker, bus, clients, "operator")
    monitor = online(broker, bus, clients, "monitor", f"{R}/monitor/#")
    # The victim is a service as make_client builds it: a persistent
    # connection whose Last Will is its retained offline status.
    victim_id = cid("ami-concentrator")
    status = f"{R}/monitor/concentrator/{victim_id}/status"
    victim = Client(broker, "concentrator", bus.password("concentrator"), client_id=victim_id, clean=False)
    victim.c.will_set(status, b"will", qos=1, retain=True)
    assert victim.connect()
    clients.append(victim)

    attacker = Client(broker, "concentrator", "wrong", client_id=victim_id, clean=False, will=target)
    assert not attacker.connect()

    command, frame = token(), token()
    operator.publish(f"{R}/control/headend/commands", command)
    headend.publish(f"{R}/wan/c0001/down", frame)
    assert headend.wait_for(command) and relay.wait_for(frame)
    time.sleep(GRACE)
    # (the head-end hears commands, the relay the head-end-only downlink)
    assert not (headend.got(b"will") or relay.got(b"will")), f"the refused CONNECT's Will was published on {target}"
    assert not monitor.got(b"will"), "the victim's own Will fired: its connection was taken over"
    assert not victim.hung_up

    # Nothing retained on the target: a fresh subscriber gets only our control.
    late = online(broker, bus, clients, "relay-c0001" if "wan" in target else "headend", target)
    control = token()
    (headend if "wan" in target else operator).publish(target, control)
    assert late.wait_for(control)
    time.sleep(GRACE)
    assert not late.got(b"will"), "the refused CONNECT left a retained message"


def test_authenticated_takeover_disconnects_the_old_connection(broker: RunningBroker, bus: BusSecurity,
                                                               clients: list[Client]) -> None:
    """MQTT-3.1.4-2: a second, authenticated CONNECT with the same client id
    disconnects the first.  Old amqtt (clean session) only dropped the first
    one's session and left it connected and deaf."""
    ident = cid("ami-headend")
    first = online(broker, bus, clients, "headend", f"{R}/wan/+/up", client_id=ident)
    second = online(broker, bus, clients, "headend", f"{R}/wan/+/up", client_id=ident)
    deadline = time.monotonic() + 3
    while not first.hung_up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.hung_up, f"{broker.kind} left the taken-over connection open"
    reading = token()
    online(broker, bus, clients, "relay-c0001").publish(f"{R}/wan/c0001/up", reading)
    assert second.wait_for(reading)


# -- random client ids


def test_client_ids_are_random(tmp_path: Path) -> None:
    sec = write_bus_security(tmp_path, ["c0001"])

    async def build() -> tuple[list[str], str]:  # aiomqtt clients need a running loop
        ids = [make_client("mqtt://127.0.0.1:1", user="relay-c0001", data_dir=tmp_path).identifier for _ in range(3)]
        ids.append(make_client("mqtt://127.0.0.1:1", user=None).identifier)
        named = make_client("mqtt://127.0.0.1:1", user="headend", data_dir=tmp_path, identifier="ami-headend-h1")
        return ids, named

    ids, named = asyncio.run(build())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"relay-c0001-[0-9a-f]{16}", i) for i in ids[:3]), ids
    assert re.fullmatch(r"anon-[0-9a-f]{16}", ids[3])
    assert re.fullmatch(r"ami-headend-h1-[0-9a-f]{16}", named.identifier)  # an explicit name is kept, as a prefix
    assert not any(str(os.getpid()) in i.rsplit("-", 1)[0] for i in [*ids, named.identifier])
    assert sec.password("headend") not in named.identifier


# -- one identity per process, fail closed


def test_a_relay_host_needs_only_its_own_identity(tmp_path: Path, broker: RunningBroker, bus: BusSecurity) -> None:
    """Copy to a 'relay host' only relay-c0001's secret (and the CA): the relay
    logs in and works; every other identity is absent, and asking for one is
    an error naming the missing file, not an anonymous connection."""
    host = tmp_path / "relay-host"
    (host / "bus" / "identities").mkdir(parents=True, mode=0o700)
    shutil.copy2(bus.identity("relay-c0001"), host / "bus" / "identities" / "relay-c0001.secret")
    shutil.copy2(bus.ca, host / "bus" / "ca.pem")
    assert [p.name for p in (host / "bus" / "identities").iterdir()] == ["relay-c0001.secret"]

    assert load_credentials(host, "relay-c0001") == ("relay-c0001", bus.password("relay-c0001"))
    for other in ("operator", "headend", "relay-c0002", "concentrator"):
        with pytest.raises(BusIdentityMissing) as err:
            load_credentials(host, other)  # what make_client does first, before any connection
        assert f"{other}.secret" in str(err.value) and "anonymous" in str(err.value)
        assert not any(bus.password(u) in str(err.value) for u in bus.users)

    headend = Client(broker, "headend", bus.password("headend"))
    assert headend.connect()
    try:
        headend.subscribe(f"{R}/wan/+/up")
        frame = token()

        async def relay() -> None:
            async with make_client(f"mqtt://127.0.0.1:{broker.port}", user="relay-c0001", data_dir=host) as c:
                await c.publish(f"{R}/wan/c0001/up", frame, qos=1)

        asyncio.run(relay())
        assert headend.wait_for(frame)
    finally:
        headend.close()


def test_clients_never_fall_back_to_anonymous(tmp_path: Path) -> None:
    secured, open_net, bare = tmp_path / "secured", tmp_path / "open", tmp_path / "bare"
    write_bus_security(secured, ["c0001"])
    (secured / "bus" / "identities" / "headend.secret").unlink()
    open_net.mkdir()
    (open_net / ANONYMOUS_MARKER).write_text("x")
    bare.mkdir()

    with pytest.raises(BusIdentityMissing, match="headend"):
        load_credentials(secured, "headend")
    with pytest.raises(BusIdentityMissing, match="not a provisioned network"):
        load_credentials(bare, "headend")
    assert load_credentials(open_net, "headend") is None  # --no-bus-security, recorded
    assert load_credentials(secured, None) is None  # the caller asked for no auth
    assert read_identity(secured / "bus", "monitor")
    assert (bus_mode(secured), bus_mode(open_net), bus_mode(bare)) == ("secured", "anonymous", "unprovisioned")


def test_provision_records_the_bus_choice(tmp_path: Path) -> None:
    from ami.tools.provision import provision

    provision(tmp_path / "open", 2, 1, bus_security=False)
    assert bus_mode(tmp_path / "open") == "anonymous"
    # Adding bus security later (as some tests do) replaces the marker.
    write_bus_security(tmp_path / "open", ["c0001"])
    assert bus_mode(tmp_path / "open") == "secured" and not (tmp_path / "open" / ANONYMOUS_MARKER).exists()


def test_broker_fails_closed(tmp_path: Path) -> None:
    secured = tmp_path / "secured"
    sec = write_bus_security(secured, ["c0001"])
    assert broker_bus_dir(secured, no_auth=False, tls=True) == sec.bus_dir
    assert broker_bus_dir(secured, no_auth=True) is None  # explicit, for load tests
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / ANONYMOUS_MARKER).write_text("x")
    assert broker_bus_dir(tmp_path / "open", no_auth=False) is None
    with pytest.raises(BrokerConfigError, match="not a provisioned network"):
        broker_bus_dir(tmp_path / "nothing", no_auth=False)
    sec.server_key.unlink()
    with pytest.raises(BrokerConfigError, match="server.key"):
        broker_bus_dir(secured, no_auth=False, tls=True)

    # The real command: the hashes are gone, so it exits non-zero, says why, and never listens.
    sec.amqtt_passwd.unlink()
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "ami.cli", "broker", "--broker", f"mqtt://127.0.0.1:{port}", "--data", str(secured)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "amqtt_passwd" in proc.stderr and "--no-auth" in proc.stderr
    assert "broker_ready" not in proc.stderr + proc.stdout


# -- files at rest


def test_bus_files_are_owner_only(tmp_path: Path) -> None:
    from ami.tools.provision import provision

    old = os.umask(0o022)  # the usual umask: the modes must not depend on it
    try:
        provision(tmp_path / "data", 4, 2)
    finally:
        os.umask(old)
    bus_dir = tmp_path / "data" / "bus"
    paths = [bus_dir, *bus_dir.rglob("*")]
    assert {p.name for p in (bus_dir / "identities").iterdir()} >= {"relay-c0001.secret", "operator.secret"}
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p} is {oct(mode)}"
    assert not (bus_dir / "credentials.json").exists()
