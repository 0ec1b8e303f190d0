"""Run a whole network in subprocesses for end-to-end tests: real brokers, no mocks.

``Network`` provisions a data folder, starts a broker (embedded amqtt on a
free port, or an existing one), then the head-end, relays and meters as
``ami`` subprocesses with configuration passed as ``AMI__SECTION__KEY``
environment overrides, and collects every monitor message with a
subscriber of its own.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import paho.mqtt.client as paho

from ami.runtime.bus import free_port, port_open

AMI = [sys.executable, "-m", "ami.cli"]
REPO = Path(__file__).resolve().parent.parent


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on ``port`` (failing early if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port, timeout=0.2):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port}")
        time.sleep(0.05)


class Collector:
    """Subscribes to ami/v1/monitor/# (and optionally more) and keeps everything."""

    def __init__(self, host: str, port: int, *, user: str | None = None, password: str | None = None,
                 topics: tuple[str, ...] = ("ami/v1/monitor/#",)) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.latest: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"collector-{uuid.uuid4().hex[:12]}")
        if user:
            self.client.username_pw_set(user, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_a: [c.subscribe(t, qos=1) for t in topics]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.latest[msg.topic] = bytes(msg.payload)

    def json(self, topic: str) -> dict | None:
        with self.lock:
            raw = self.latest.get(topic)
        return json.loads(raw) if raw else None

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t == "ami/v1/monitor/headend/events"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Network:
    def __init__(self, tmp: Path, *, meters: int, concentrators: int, broker: str | None = None,
                 env: dict[str, str] | None = None, bus_security: bool = True, suite: str = "0") -> None:
        self.tmp = Path(tmp)
        self.data = self.tmp / "data"
        self.meters = meters
        self.concentrators = concentrators
        self.external_broker = broker
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.bus_security = bus_security
        self.suite = suite
        self.procs: dict[str, subprocess.Popen] = {}
        # Monitor ids unique to this run: a shared broker may hold retained
        # status/metrics of other networks under the default ids.
        run = uuid.uuid4().hex[:8]
        self.ids = {"headend": f"headend-{run}", "meters": f"fleet-{run}", "concentrator": f"relays-{run}"}
        self.logs: dict[str, Path] = {}
        self.port = 0

    # -- processes ---------------------------------------------------------------

    def provision(self) -> None:
        args = ["provision", "--meters", str(self.meters), "--concentrators", str(self.concentrators),
                "--out", str(self.data), "--suite", self.suite]
        if not self.bus_security:
            args.append("--no-bus-security")
        subprocess.run(AMI + args, check=True, cwd=REPO, env=self.env, capture_output=True)

    @property
    def broker(self) -> str:
        return self.external_broker or f"mqtt://127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        fh = open(log, "ab")
        ident = ["--id", self.ids[args[0]]] if args[0] in self.ids else []
        proc = subprocess.Popen(
            AMI + [args[0], "--broker", self.broker, "--data", str(self.data), *ident, *args[1:]],
            cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def start_broker(self) -> None:
        if self.external_broker:
            return
        self.port = free_port()
        self.start("broker", "broker")
        wait_port(self.port)

    def start_all(self) -> None:
        self.start_broker()
        self.start("headend", "headend")
        self.start("concentrator", "concentrator")
        self.start("meters", "meters")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{name} did not stop within {timeout} s after {signal.Signals(sig).name}")

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name in ("meters", "concentrator", "headend", "broker"):
            if name in self.procs:
                codes[name] = self.stop(name)
        return codes

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def topic(self, component: str, kind: str) -> str:
        """This run's monitor topic of a component: kind is 'status' or 'metrics'."""
        return f"ami/v1/monitor/{component}/{self.ids[component]}/{kind}"

    def credentials(self) -> dict[str, str]:
        """Every identity's password (the provisioning host's view; each service reads only its own)."""
        from ami.security.bus_files import read_all_identities

        return read_all_identities(self.data / "bus")

    def collector(self, **kw) -> Collector:
        creds = self.credentials()
        host_port = self.broker.rsplit(":", 1)
        return Collector("127.0.0.1", int(host_port[1]), user="monitor" if creds else None,
                         password=creds.get("monitor"), **kw)

    # -- store -----------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data / "headend.db")

    def readings(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        with closing(self.db()) as db:
            for meter, seq in db.execute("SELECT meter, seq FROM readings ORDER BY meter, seq"):
                out[meter].append(seq)
        return out


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RecordingClient:
    """A bus client that records what a head-end round publishes (no broker)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))
