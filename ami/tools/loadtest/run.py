"""Orchestration of one ``ami loadtest`` run.

1. provision a fresh network (``--no-bus-security``) in a temporary folder;
2. start a broker: the embedded amqtt on a free port (default), a private
   Mosquitto on a free port (``--broker mosquitto``), or use ``mqtt://host:port``;
3. ``--baseline``: the bare phase (ami/tools/loadtest/bare.py): relay-like
   subscribers, then fleet-like publishers, for ``--duration`` seconds;
4. the pipeline: head-end, relays, then the fleet with ``--rate`` and
   ``--stamp``, every service a subprocess configured through
   ``AMI__SECTION__KEY`` environment overrides (as tests/harness.py does);
   boots spread over ``--ramp-up``; the measurement window opens when the
   ramp-up is over and every meter is associated, and lasts ``--duration``;
   ``--rotate-all-at`` sends a fleet-wide session-key renewal mid-window;
5. stop the fleet (SIGTERM: it publishes what it queued and logs its
   counters), drain until the head-end stored every pushed reading or stopped
   making progress, stop the relays and the head-end, count the stored rows.

A monitor collector (paho, its own thread) records every metrics snapshot;
psutil samples CPU and RSS of every child.  ``report.build_report`` turns
it all into the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil

from ami.protocol import topics
from ami.runtime.bus import free_port, parse_broker_url, port_open
from ami.runtime.config import CONFIG_ENV
from ami.tools.loadtest import report as reportlib
from headend.store import count_stored_readings

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class LoadTestError(RuntimeError):
    """The run could not be carried out (a process died, a start-up timed out)."""


class LoadTestSkipped(LoadTestError):
    """What the run needs is not installed here (RabbitMQ, PostgreSQL)."""


# --- helpers ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def reading_frame_size(pad: int = 0) -> int:
    """Bytes of one stamped reading on its PLC topic (the sealed DC APDU),
    with ``pad`` bytes of padding; representative field values."""
    from ami.protocol import Suite0Cipher, seal_apdu
    from ami.protocol.frames import GENERAL_DED_CIPHERING
    from ami.protocol.messages import Reading, encode_message

    r = Reading(seq=985_000, ts=1_773_000_000, energy_wh=12_345_678, power_w=1234, voltage_dv=2301,
                sealed_ns=time.time_ns())
    body = encode_message(r, pad=pad)  # what `ami meters --pad` seals
    return len(seal_apdu(Suite0Cipher(bytes(16), bytes(16)), GENERAL_DED_CIPHERING, b"SAG" + bytes(5), 1, body))


def pad_for(payload_size: int) -> int:
    """Padding that brings a reading frame to ``payload_size`` bytes (closest from below)."""
    natural = reading_frame_size(0)
    if payload_size <= natural:
        return 0
    best = 0
    for pad in range(max(1, payload_size - natural - 24), payload_size - natural + 1):
        if reading_frame_size(pad) <= payload_size:
            best = pad
    return best


# --- settings ---------------------------------------------------------------------------


@dataclass(slots=True)
class Options:
    meters: int = 1000
    concentrators: int = 10
    rate: float = 1000.0
    duration: float = 30.0
    ramp_up: float = 5.0
    qos: int = 1
    payload_size: int | None = None
    broker: str | None = None  # None: embedded amqtt; "mosquitto": private Mosquitto; else a URL
    broker_pid: int | None = None
    baseline: bool = False
    rotate_all_at: float | None = None
    fleet_processes: int = 1
    relay_processes: int = 1
    batch_max_frames: int | None = None
    batch_max_delay_ms: float | None = None
    sample_interval: float = 1.0
    drain: float = 30.0
    settle_max: float = 120.0
    storm_timeout: float = 300.0
    start_timeout: float = 300.0
    workdir: Path | None = None
    keep: bool = False
    env: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None  # the caller's configuration file, handed to every service as $AMI_CONFIG
    live: bool = True
    profile: str | None = None  # "headend", "fleet", "relays", "all": py-spy record each (needs py-spy)
    mass_boot: bool = False  # every meter boots at the same instant; the window opens at once (no settling)
    # The fleet stands for meters on hardware of their own: at a positive
    # niceness it takes only the CPU the pipeline leaves, so offering several
    # times the capacity measures the pipeline, not a generator starving it.
    fleet_nice: int = 0
    recover: bool = True  # drain: slow the fleet to a tenth (SIGUSR1) until gap-fill caught up, then stop it
    cluster_workers: int = 0  # > 0: the clustered head-end (3-node RabbitMQ cluster + PostgreSQL + N workers)
    partitions: int = 8  # partition queues of the clustered head-end
    cluster_pg: str = "postgresql://postgres@127.0.0.1:5432"  # server of the run's own database
    cluster_dir: Path | None = None  # a running `ami cluster up --dir` cluster to use (not stopped) instead of a new one


@dataclass(slots=True)
class Child:
    name: str
    role: str
    phase: str
    proc: subprocess.Popen | None
    log: Path | None
    ps: psutil.Process | None
    owned: bool = True
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (time, cpu %, rss)
    cpu_s: float = 0.0
    # A group of processes sampled as one (the PostgreSQL backends of the run's database).
    members: Any = None  # () -> list[psutil.Process]
    member_cpu_s: dict[int, float] = field(default_factory=dict)


# --- the monitor collector ---------------------------------------------------------------


class Collector:
    """Every monitor snapshot, status and control reply, from its own paho thread."""

    def __init__(self, host: str, port: int, run_start: float) -> None:
        self.lock = threading.Lock()
        self.snaps: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.status: dict[tuple[str, str], str] = {}
        self.replies: dict[str, list[tuple[float, dict]]] = defaultdict(list)
        self.run_start = run_start
        self.connected = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"ami-loadtest-{uuid.uuid4().hex[:10]}")
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(30):
            raise LoadTestError("the monitor collector could not connect to the broker")

    def _on_connect(self, client, _userdata, _flags, _reason, _props=None) -> None:
        client.subscribe([(topics.MONITOR_FILTER, 1), (topics.CONTROL_REPLIES_FILTER, 1)])
        self.connected.set()

    def _on_message(self, _client, _userdata, msg) -> None:
        topic = msg.topic
        parts = topic.split("/")
        try:
            if topic.startswith("ami/v1/control/replies/"):
                body = json.loads(msg.payload)
                with self.lock:
                    self.replies[parts[-1]].append((time.time(), body))
            elif len(parts) == 6 and parts[2] == "monitor" and parts[5] == "metrics" and msg.payload:
                snap = json.loads(msg.payload)
                if float(snap.get("time", 0)) < self.run_start:
                    return  # retained by an earlier run on a shared broker
                snap["_received"] = time.time()
                with self.lock:
                    self.snaps[(parts[3], parts[4])].append(snap)
            elif len(parts) == 6 and parts[2] == "monitor" and parts[5] == "status":
                with self.lock:
                    self.status[(parts[3], parts[4])] = msg.payload.decode(errors="replace")
        except (ValueError, UnicodeDecodeError):
            pass

    def history(self, component: str, ident: str) -> list[dict]:
        with self.lock:
            return list(self.snaps.get((component, ident), []))

    def latest(self, component: str, ident: str) -> dict:
        with self.lock:
            found = self.snaps.get((component, ident))
            return found[-1] if found else {}

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


# --- the run ----------------------------------------------------------------------------------


class LoadTest:
    def __init__(self, opts: Options, console=None) -> None:
        self.o = opts
        self.console = console
        self.tag = f"lt{os.getpid()}"
        self.children: list[Child] = []
        self.notes: list[str] = []
        self.workdir: Path | None = None
        self.data: Path | None = None
        self.broker_url = ""
        self.broker_kind = ""
        self.collector: Collector | None = None
        self.phase = "setup"
        self._last_sample = 0.0
        self._last_line = 0.0
        self._live = None
        self._status_line = ""
        self.pad = 0
        self.payload_bytes = 0
        self.fleet_ids: list[str] = []
        self.relay_ids: list[str] = []
        self.headend_id = f"{self.tag}-headend"
        self.headend_ids: list[str] = [self.headend_id]  # the workers' ids with --cluster-workers
        self.cluster_run = None  # clustered.ClusterRun with --cluster-workers
        self.thresholds: dict[str, float | None] = {}
        self.recovery_s: float | None = None
        self._stopping: set[str] = set()
        self._bare_pub_ids: list[str] = []
        self._bare_sub_ids: list[str] = []
        self._self_ps = psutil.Process()
        self._self_ps.cpu_percent(None)
        psutil.cpu_percent(None)
        self._host_samples: list[tuple[float, float, float]] = []  # (time, host CPU %, this process CPU %)

    # --- processes ----------------------------------------------------------------------------

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        o = self.o
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if o.config_file:
            env[CONFIG_ENV] = o.config_file
        env.update({
            "AMI__MONITOR__METRICS_INTERVAL_S": str(o.sample_interval),
            "AMI__BUS__QOS": str(o.qos),
        })
        env.update(o.env)
        env.update(extra or {})
        return env

    def _spawn(self, name: str, role: str, phase: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        fh = open(log, "ab")
        try:
            # Children inherit our folder and (see _env) our configuration file.
            proc = subprocess.Popen(argv, env=env or self._env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            fh.close()
        try:
            ps = psutil.Process(proc.pid)
            ps.cpu_percent(None)
        except psutil.Error:
            ps = None
        if ps is not None and self.o.fleet_nice and role in ("fleet", "bare-fleet"):
            with contextlib.suppress(psutil.Error):
                ps.nice(self.o.fleet_nice)
        child = Child(name, role, phase, proc, log, ps)
        self.children.append(child)
        if self.o.profile and role in self._profiled_roles():
            self._spawn_profiler(child)
        return child

    def _profiled_roles(self) -> set[str]:
        p = self.o.profile or ""
        roles = {"headend": {"headend"}, "fleet": {"fleet"}, "relays": {"relays"}, "broker": {"broker"},
                 "all": {"headend", "fleet", "relays", "broker"}}
        out: set[str] = set()
        for item in p.split(","):
            out |= roles.get(item.strip(), set())
        return out

    def _spawn_profiler(self, child: Child) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.notes.append("--profile: py-spy not found (pip install py-spy)")
            return
        assert self.workdir is not None and child.proc is not None
        out = self.workdir / f"profile-{child.name}.svg"
        proc = subprocess.Popen([pyspy, "record", "--pid", str(child.proc.pid), "--rate", "50", "--nonblocking",
                                 "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.children.append(Child(f"py-spy:{child.name}", "profiler", child.phase, proc, None, None))
        self.notes.append(f"profile of {child.name}: {out}")

    def _ami(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ami.cli", args[0], "--broker", self.broker_url, "--data", str(self.data),
                *args[1:]]

    def _check_alive(self) -> None:
        for c in self.children:
            if c.owned and c.proc is not None and c.role != "profiler" and c.proc.poll() is not None \
                    and c.name not in self._stopping:
                tail = c.log.read_text(errors="replace")[-2000:] if c.log else ""
                raise LoadTestError(f"{c.name} exited with {c.proc.returncode} during {self.phase}:\n{tail}")

    def _stop(self, child: Child, timeout: float = 60.0) -> int | None:
        if child.proc is None:
            return None
        signalled = child.name in self._stopping  # _stop_all signalled it already (a second signal cancels)
        self._stopping.add(child.name)
        if child.proc.poll() is None and not signalled:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while child.proc.poll() is None and time.monotonic() < deadline:
            self._tick()
            time.sleep(0.1)
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
            self.notes.append(f"{child.name} did not stop within {timeout:.0f} s of SIGTERM: killed")
        self._sample_one(child, final=True)
        return child.proc.returncode

    # --- sampling and progress --------------------------------------------------------------------

    def _sample_one(self, c: Child, final: bool = False) -> None:
        if c.members is not None:
            self._sample_group(c, final)
            return
        if c.ps is None:
            return
        try:
            with c.ps.oneshot():
                cpu = c.ps.cpu_percent(None)
                rss = c.ps.memory_info().rss
                times = c.ps.cpu_times()
            c.cpu_s = times.user + times.system
            if not final:
                c.samples.append((time.time(), cpu, rss))
        except psutil.Error:
            pass

    def _sample_group(self, c: Child, final: bool = False) -> None:
        cpu, rss = 0.0, 0
        try:
            members = c.members()
        except psutil.Error:
            members = []
        for ps in members:
            try:
                with ps.oneshot():
                    cpu += ps.cpu_percent(None)
                    rss += ps.memory_info().rss
                    t = ps.cpu_times()
                c.member_cpu_s[ps.pid] = t.user + t.system
            except psutil.Error:
                continue
        c.cpu_s = sum(c.member_cpu_s.values())  # every member's last CPU time, also of those gone
        if not final:
            c.samples.append((time.time(), cpu, rss))

    def _tick(self) -> None:
        now = time.time()
        if now - self._last_sample >= self.o.sample_interval:
            self._last_sample = now
            host = psutil.cpu_percent(None) * (os.cpu_count() or 1)
            try:
                mine = self._self_ps.cpu_percent(None)
            except psutil.Error:
                mine = 0.0
            self._host_samples.append((now, host, mine))
            for c in self.children:
                if c.role != "profiler" and (c.proc is None or c.proc.poll() is None):
                    self._sample_one(c)
            self._progress()

    # --- the head-end: one process or N workers ---------------------------------------------------

    def _headend_latest(self) -> dict[str, Any]:
        """The head-end's latest snapshot; with workers, their latest ones
        summed (counters, rejections, gauges; the interval p99: the highest)."""
        col = self.collector
        assert col is not None
        if len(self.headend_ids) == 1:
            return col.latest("headend", self.headend_ids[0])
        snaps = [col.latest("headend", i) for i in self.headend_ids]
        out: dict[str, Any] = {"counters": {}, "gauges": {}, "rejected": {}, "latency_ms": {}}
        for snap in snaps:
            for section in ("counters", "gauges", "rejected"):
                for k, v in snap.get(section, {}).items():
                    if isinstance(v, (int, float)):
                        out[section][k] = out[section].get(k, 0) + v
            p99 = snap.get("latency_ms", {}).get("interval_p99", 0)
            out["latency_ms"]["interval_p99"] = max(out["latency_ms"].get("interval_p99", 0), p99)
        if not all(snaps):
            out["gauges"].pop("meters_with_gaps", None)  # unknown while a worker has not reported
        return out

    def _progress(self) -> None:
        line = self._status()
        self._status_line = line
        if self._live is not None:
            self._live.update(self._renderable())
        elif self.o.live and time.time() - self._last_line >= 5:
            self._last_line = time.time()
            print(line, file=sys.stderr, flush=True)

    def _status(self) -> str:
        col = self.collector
        if col is None:
            return f"[{self.phase}]"
        if self.phase.startswith("bare"):
            sent = sum(col.latest("loadtest-fleet", i).get("counters", {}).get("frames_sent", 0)
                       for i in self._bare_pub_ids)
            recv = sum(col.latest("loadtest-relay", i).get("counters", {}).get("frames_received", 0)
                       for i in self._bare_sub_ids)
            return f"[{self.phase}] bare sent {sent:,} received {recv:,}"
        h = self._headend_latest()
        hc = h.get("counters", {})
        pushed = sum(col.latest("meters", i).get("counters", {}).get("readings_pushed", 0) for i in self.fleet_ids)
        lat = h.get("latency_ms", {})
        return (f"[{self.phase}] pushed {pushed:,} stored {hc.get('readings_stored', 0):,} "
                f"sessions {h.get('gauges', {}).get('sessions', 0):,}/{self.o.meters:,} "
                f"rejected {hc.get('frames_rejected', 0):,} p99(interval) {lat.get('interval_p99', 0):,.1f} ms")

    def _renderable(self):
        from rich.table import Table

        t = Table(show_header=True, title=self._status_line, title_justify="left")
        for col in ("process", "CPU %", "RSS"):
            t.add_column(col, justify="left" if col == "process" else "right")
        for c in self.children:
            if c.samples and c.role != "profiler" and (c.proc is None or c.proc.poll() is None):
                _t, cpu, rss = c.samples[-1]
                t.add_row(c.name, f"{cpu:.0f}", f"{rss / 1e6:,.0f} MB")
        return t

    def _wait(self, predicate, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self._check_alive()
            if time.monotonic() > deadline:
                raise LoadTestError(f"timed out after {timeout:.0f} s waiting for {what} ({self._status()})")
            self._tick()
            time.sleep(0.1)

    def _sleep_until(self, t: float, during=None) -> None:
        while time.time() < t:
            self._check_alive()
            self._tick()
            if during is not None:
                during()
            time.sleep(min(0.1, max(0.0, t - time.time())))

    # --- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        from ami.tools.provision import provision

        o = self.o
        base = o.workdir
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="ami-loadtest-", dir=base))
        self.data = self.workdir / "data"
        t0 = time.perf_counter()
        provision(self.data, o.meters, o.concentrators, bus_security=False)
        if o.cluster_workers:
            from ami.runtime.network import load_network

            network = load_network(self.data)
            dotted = [i for i in [*network.concentrators, *(m for c in network.concentrators
                                                             for m in network.segments[c])] if "." in str(i)]
            if dotted:  # RabbitMQ's MQTT plugin maps '/' to '.': an id with a dot breaks the routing keys
                raise LoadTestError(f"ids with a '.' cannot cross the cluster's MQTT plugin: {dotted[:5]}")
        self.notes.append(f"provisioned {o.meters} meters / {o.concentrators} concentrators "
                          f"in {time.perf_counter() - t0:.1f} s ({self.workdir})")
        natural = reading_frame_size(0)
        if o.payload_size is not None and o.payload_size > natural:
            self.pad = pad_for(o.payload_size)
            self.payload_bytes = reading_frame_size(self.pad)
        else:
            if o.payload_size is not None and o.payload_size < natural:
                self.notes.append(f"--payload-size {o.payload_size} is below a reading frame ({natural} B): "
                                  f"readings keep their natural size")
            self.payload_bytes = natural

    def _start_cluster(self) -> None:
        """--cluster-workers: a 3-node RabbitMQ cluster and a database of the run's own."""
        from ami.tools.cluster import ClusterError
        from ami.tools.loadtest import clustered

        o = self.o
        why = clustered.missing(o.cluster_pg)
        if why:
            raise LoadTestSkipped(why)
        assert self.workdir is not None
        self.phase = "cluster:start"
        self._progress()
        run = clustered.ClusterRun(self.workdir / "cluster", self.tag, o.cluster_pg)
        self.cluster_run = run
        try:
            cluster = run.start(o.cluster_dir)
        except ClusterError as exc:
            raise LoadTestError(f"the RabbitMQ cluster did not start: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the database could not be created (the cluster is stopped)
            raise LoadTestError(f"the run's PostgreSQL database: {type(exc).__name__}: {exc}") from exc
        self.broker_url = cluster.broker
        self.broker_kind = (f"rabbitmq cluster ({len(cluster.nodes)} nodes, {o.cluster_workers} workers, "
                            f"{o.partitions} partitions, PostgreSQL)")
        self.notes.append(f"RabbitMQ cluster of {len(cluster.nodes)} nodes "
                          f"{'up in ' + str(run.started_s) + ' s' if run.owned else 'in ' + str(o.cluster_dir)}; "
                          f"database {run.db}")
        for name, ps in run.node_processes():
            if ps is None:
                raise LoadTestError(f"{name} is not running")
            self.children.append(Child(name, "broker", "all", None, None, ps, owned=False))
        self.children.append(Child("postgres (run's backends)", "postgres", "all", None, None, None, owned=False,
                                   members=run.pg_backends))
        first = cluster.nodes[0]
        self.collector = Collector("127.0.0.1", first.mqtt, run_start=time.time() - 1)

    def _start_broker(self) -> None:
        o = self.o
        if o.cluster_workers:
            self._start_cluster()
            return
        if o.broker in (None, "", "embedded", "amqtt"):
            port = free_port()
            self.broker_url = f"mqtt://127.0.0.1:{port}"
            self.broker_kind = "amqtt (embedded)"
            self._spawn("broker", "broker", "all", self._ami("broker", "--no-auth"))
            self._wait(lambda: port_open("127.0.0.1", port), 30, "the embedded broker")
        elif o.broker == "mosquitto":
            port = free_port()
            self.broker_url = f"mqtt://127.0.0.1:{port}"
            self.broker_kind = "mosquitto (private)"
            assert self.workdir is not None
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(mosquitto_config(port))
            self._spawn("broker", "broker", "all", [MOSQUITTO, "-c", str(conf)])
            self._wait(lambda: port_open("127.0.0.1", port), 30, "the private Mosquitto")
        else:
            url = parse_broker_url(o.broker)
            self.broker_url = str(url)
            self.broker_kind = f"external {url}"
            if not port_open(url.host, url.port):
                raise LoadTestError(f"nothing listens on {url}")
            if o.broker_pid:
                try:
                    ps = psutil.Process(o.broker_pid)
                    ps.cpu_percent(None)
                    self.children.append(Child("broker", "broker", "all", None, None, ps, owned=False))
                except psutil.Error:
                    self.notes.append(f"--broker-pid {o.broker_pid}: no such process")
        url = parse_broker_url(self.broker_url)
        self.collector = Collector(url.host, url.port, run_start=time.time() - 1)

    # --- the bare phase -----------------------------------------------------------------------

    def _bare_phase(self) -> dict[str, Any]:
        o = self.o
        col = self.collector
        assert col is not None
        self.phase = "bare:start"
        self._bare_sub_ids = [f"{self.tag}-bare-relays-{i}" for i in range(1, o.relay_processes + 1)]
        self._bare_pub_ids = [f"{self.tag}-bare-fleet-{i}" for i in range(1, o.fleet_processes + 1)]
        bare = [sys.executable, "-m", "ami.tools.loadtest.bare"]
        subs, pubs = [], []
        for i, ident in enumerate(self._bare_sub_ids, 1):
            shard = ["--shard", f"{i}/{o.relay_processes}"] if o.relay_processes > 1 else []
            subs.append(self._spawn(f"bare-relays-{i}", "bare-relays", "bare", bare + [
                "sub", "--broker", self.broker_url, "--data", str(self.data), "--id", ident, "--qos", str(o.qos),
                "--metrics-interval", str(o.sample_interval), *shard]))
        self._wait(lambda: sum(col.latest("loadtest-relay", i).get("gauges", {}).get("relays_up", 0)
                               for i in self._bare_sub_ids) >= o.concentrators, o.start_timeout,
                   "the bare subscribers to connect")
        shares = self._fleet_shares()
        for i, ident in enumerate(self._bare_pub_ids, 1):
            shard = ["--shard", f"{i}/{o.fleet_processes}"] if o.fleet_processes > 1 else []
            pubs.append(self._spawn(f"bare-fleet-{i}", "bare-fleet", "bare", bare + [
                "pub", "--broker", self.broker_url, "--data", str(self.data), "--id", ident, "--qos", str(o.qos),
                "--rate", str(o.rate * shares[i - 1]), "--size", str(self.payload_bytes),
                "--metrics-interval", str(o.sample_interval), *shard]))

        def pubs_up() -> bool:
            ups = [col.latest("loadtest-fleet", i).get("gauges", {}) for i in self._bare_pub_ids]
            return all(g and g.get("segments_up") == g.get("segments") for g in ups)

        self._wait(pubs_up, o.start_timeout, "the bare publishers to connect")
        self.phase = "bare:warm-up"
        start = time.time() + min(max(o.ramp_up, 1.0), 3.0)
        self._sleep_until(start)
        self.phase = "bare:measure"
        end = start + o.duration
        self._sleep_until(end)
        self.phase = "bare:stop"
        for c in pubs:
            self._stop(c, 30)
        time.sleep(1.0)
        for c in subs:
            self._stop(c, 30)
        connections = {
            "fleet_like": o.concentrators + o.fleet_processes,
            "relay_like": o.concentrators + o.relay_processes,
        }
        return {
            "window": (start, end),
            "rate": o.rate,
            "payload_bytes": self.payload_bytes,
            "connections": connections,
            "processes": {"fleet_like": o.fleet_processes, "relay_like": o.relay_processes},
            "pubs": {i: col.history("loadtest-fleet", i) for i in self._bare_pub_ids},
            "subs": {i: col.history("loadtest-relay", i) for i in self._bare_sub_ids},
        }

    def _fleet_shares(self) -> list[float]:
        """Each fleet process's share of the meters (its share of the rate)."""
        from ami.runtime.network import load_network
        from ami.runtime.sharding import select

        network = load_network(self.data)
        n = self.o.fleet_processes
        # The same split `ami meters --shard i/n` makes.
        counts = [sum(len(network.segments[c]) for c in select(network.concentrators, None, (i, n)))
                  for i in range(1, n + 1)]
        total = sum(counts) or 1
        return [c / total for c in counts]

    # --- the pipeline ----------------------------------------------------------------------------

    def _pipeline_phase(self) -> dict[str, Any]:
        o = self.o
        col = self.collector
        assert col is not None
        self.phase = "pipeline:start"
        self.relay_ids = [f"{self.tag}-relays-{i}" for i in range(1, o.relay_processes + 1)]
        self.fleet_ids = [f"{self.tag}-fleet-{i}" for i in range(1, o.fleet_processes + 1)]
        heads = self._start_headend()
        started = time.time()
        self._wait(lambda: all(col.latest("headend", i) for i in self.headend_ids), o.start_timeout,
                   "the head-end to start" if not o.cluster_workers else "every worker's first metrics")
        colds = [col.latest("headend", i).get("gauges", {}).get("cold_start_s") for i in self.headend_ids]
        cold = max((c for c in colds if c is not None), default=None)
        relays = []
        batch = []
        if o.batch_max_frames:
            batch += ["--batch-max-frames", str(o.batch_max_frames)]
        if o.batch_max_delay_ms is not None:
            batch += ["--batch-max-delay-ms", str(o.batch_max_delay_ms)]
        for i, ident in enumerate(self.relay_ids, 1):
            shard = ["--shard", f"{i}/{o.relay_processes}"] if o.relay_processes > 1 else []
            relays.append(self._spawn(f"relays-{i}", "relays", "pipeline",
                                      self._ami("concentrator", "--id", ident, *shard, *batch)))
        self._wait(lambda: sum(col.latest("concentrator", i).get("gauges", {}).get("relays_up", 0)
                               for i in self.relay_ids) >= o.concentrators, o.start_timeout, "the relays to connect")
        shares = self._fleet_shares()
        # Boots spread over the ramp-up; a meter re-announces only after 30 s
        # (not 5): under a boot storm a re-announcement while the head-end is
        # still associating only adds work.  --set overrides both.
        spread = 0.0 if o.mass_boot else max(o.ramp_up, 0.0)
        env = self._env({"AMI__METERS__BOOT_SPREAD_S": str(spread), "AMI__METERS__BOOT_RETRY_S": "30", **o.env})
        fleets = []
        for i, ident in enumerate(self.fleet_ids, 1):
            shard = ["--shard", f"{i}/{o.fleet_processes}"] if o.fleet_processes > 1 else []
            pad = ["--pad", str(self.pad)] if self.pad else []
            args = self._ami("meters", "--id", ident, "--rate", str(o.rate * shares[i - 1]), "--stamp", *pad, *shard)
            fleets.append(self._spawn(f"fleet-{i}", "fleet", "pipeline", args, env))

        def fleets_up() -> bool:
            ups = [col.latest("meters", i).get("gauges", {}) for i in self.fleet_ids]
            return all(g and g.get("segments_up") == g.get("segments") for g in ups)

        self._wait(fleets_up, o.start_timeout, "the fleet to connect")
        fleet_ready = time.time()
        self.phase = "pipeline:ramp-up"
        if not o.mass_boot:  # a mass boot: the window opens while every meter is still associating
            self._sleep_until(fleet_ready + o.ramp_up)

        def associated() -> bool:
            return self._headend_latest().get("gauges", {}).get("sessions", 0) >= o.meters

        deadline = time.time() + (0.0 if o.mass_boot else o.settle_max)
        while not associated() and time.time() < deadline:
            self._check_alive()
            self._tick()
            time.sleep(0.1)
        if not associated() and not o.mass_boot:
            sessions = self._headend_latest().get("gauges", {}).get("sessions", 0)
            self.notes.append(f"only {sessions} of {o.meters} meters associated {o.settle_max:.0f} s after the "
                              f"ramp-up: the window opened anyway")
        if o.cluster_workers and not o.mass_boot:
            self._settle_backlog()
        start = time.time()
        end = start + o.duration
        self.phase = "pipeline:measure"
        storm = Storm(self, start + o.rotate_all_at) if o.rotate_all_at is not None else None
        self._sleep_until(end, during=storm.poll if storm else None)
        if storm is not None and not storm.finished:
            self.phase = "pipeline:storm"
            deadline = time.time() + o.storm_timeout
            while not storm.finished and time.time() < deadline:
                self._check_alive()
                self._tick()
                storm.poll()
                time.sleep(0.1)
        # --- the load drops, gap-fill recovers, stop the fleet, drain, stop the rest ---
        self.phase = "pipeline:drain"
        if o.recover:
            self._recover(fleets, o.drain)
        pushed = 0
        fleet_rejected: dict[str, int] = defaultdict(int)
        for c, ident in zip(fleets, self.fleet_ids):
            self._stop(c, 90)
            counters = fleet_stopped_counters(c.log)
            if counters is None:
                self.notes.append(f"{c.name}: no 'fleet stopped' line; using its last metrics")
                counters = col.latest("meters", ident).get("counters", {})
            pushed += int(counters.get("readings_pushed", 0))
            for k, v in col.latest("meters", ident).get("rejected", {}).items():
                fleet_rejected[k] += int(v)
        stalled_since = time.time()
        last = -1
        drain_end = time.time() + o.drain
        while time.time() < drain_end:
            self._check_alive()
            stored = self._headend_latest().get("counters", {}).get("readings_stored", 0)
            if stored >= pushed:
                break
            if stored != last:
                last, stalled_since = stored, time.time()
            elif time.time() - stalled_since > max(5.0, 4 * o.sample_interval):
                break
            self._tick()
            time.sleep(0.1)
        time.sleep(o.sample_interval + 0.2)  # one more snapshot after the last reading
        relay_rejected: dict[str, int] = defaultdict(int)
        for c, ident in zip(relays, self.relay_ids):
            self._stop(c, 60)
            for k, v in col.latest("concentrator", ident).get("rejected", {}).items():
                relay_rejected[k] += int(v)
        for head in heads:  # every worker at once: each finishes its groups (commit, publish, ack)
            self._stopping.add(head.name)
            if head.proc is not None and head.proc.poll() is None:
                head.proc.send_signal(signal.SIGTERM)
        for head in heads:
            self._stop(head, 60)
        time.sleep(0.3)
        if o.cluster_workers:
            time.sleep(o.sample_interval)  # the workers' final snapshots, through the cluster
        final_headend = self._headend_latest()
        cluster_final = None
        if self.cluster_run is not None:
            cluster_final = self.cluster_run.final_counts()
            stored_rows = cluster_final["readings"]
        else:
            stored_rows = count_stored_readings(self.data / "headend.db")
        final = {
            "pushed": pushed,
            "stored": stored_rows if stored_rows is not None else final_headend.get("counters", {}).get(
                "readings_stored", 0),
            "headend_counters": final_headend.get("counters", {}),
            "headend_rejected": final_headend.get("rejected", {}),
            "relay_rejected": dict(relay_rejected),
            "fleet_rejected": dict(fleet_rejected),
            "cold_start_s": cold,
            "started": started,
        }
        if storm is not None:
            final["storm"] = storm.result(start)
        if cluster_final is not None:
            final["cluster"] = {**cluster_final, "workers": self._worker_summaries()}
            if cluster_final["rejections"]:  # durable, every worker's (also one that died): authoritative
                final["headend_rejected"] = cluster_final["rejections"]
                counters = dict(final["headend_counters"])
                counters["frames_rejected"] = max(int(counters.get("frames_rejected", 0) or 0),
                                                  sum(cluster_final["rejections"].values()))
                final["headend_counters"] = counters
        return {
            "window": (start, end),
            "headend": (col.history("headend", self.headend_id) if not o.cluster_workers
                        else {i: col.history("headend", i) for i in self.headend_ids}),
            "fleets": {i: col.history("meters", i) for i in self.fleet_ids},
            "final": final,
        }

    def _settle_backlog(self) -> None:
        """Clustered head-end: the boot storm (every association a commit and a
        downlink through the cluster) can leave readings queued in the
        partition queues when the last meter associates; open the window once
        the workers have stored what was pushed (less two seconds of load), at
        most ``settle_max`` later, so that it measures the steady state."""
        col = self.collector
        assert col is not None
        o = self.o
        t0 = time.time()
        deadline = t0 + o.settle_max
        while time.time() < deadline:
            self._check_alive()
            pushed = sum(col.latest("meters", i).get("counters", {}).get("readings_pushed", 0) for i in self.fleet_ids)
            stored = self._headend_latest().get("counters", {}).get("readings_stored", 0)
            if pushed - stored <= max(2 * o.rate, 200.0):  # snapshots are up to an interval apart
                break
            self._tick()
            time.sleep(0.2)
        else:
            self.notes.append(f"the backlog of the ramp-up had not drained {o.settle_max:.0f} s after the last "
                              "association: the window opened anyway")
        waited = time.time() - t0
        if waited > 2 * o.sample_interval:
            self.notes.append(f"the window opened {waited:.1f} s after the last association: the workers were "
                              "still storing the readings queued during the ramp-up")

    def _start_headend(self) -> list[Child]:
        """The single head-end, or N ``ami headend-worker`` processes on the cluster."""
        o = self.o
        if not o.cluster_workers:
            return [self._spawn("headend", "headend", "pipeline", self._ami("headend", "--id", self.headend_id))]
        run = self.cluster_run
        assert run is not None and run.cluster is not None
        self.headend_ids = [f"{self.tag}-w{i}" for i in range(o.cluster_workers)]
        heads = []
        for i, ident in enumerate(self.headend_ids):
            argv = [sys.executable, "-m", "ami.cli", "headend-worker", "--data", str(self.data), "--store", run.dsn,
                    "--amqp", run.cluster.amqp, "--partitions", str(o.partitions), "--index", str(i),
                    "--workers", str(o.cluster_workers), "--id", ident, "--log-format", "json"]
            heads.append(self._spawn(f"worker-{i}", "headend", "pipeline", argv))
        return heads

    def _worker_summaries(self) -> list[dict[str, Any]]:
        col = self.collector
        assert col is not None
        out = []
        for ident in self.headend_ids:
            snap = col.latest("headend", ident)
            c = snap.get("counters", {})
            commits = int(c.get("commits", 0) or 0)
            groups = int(c.get("groups", 0) or 0)
            out.append({
                "id": ident,
                "readings_stored": int(c.get("readings_stored", 0) or 0),
                "messages": int(c.get("messages", 0) or 0),
                "commits": commits,
                "commit_ms_mean": round(float(c.get("commit_ms_total", 0) or 0) / commits, 3) if commits else None,
                "seen_ms_mean": round(float(c.get("seen_ms_total", 0) or 0) / groups, 3) if groups else None,
                "frames_rejected": int(c.get("frames_rejected", 0) or 0),
                "takeovers": int(c.get("takeovers", 0) or 0),
                "redelivered_duplicates": int(c.get("redelivered_duplicates", 0) or 0),
                "metrics_publish_failed": int(c.get("metrics_publish_failed", 0) or 0),
                "partitions_owned": snap.get("worker", {}).get("owned"),
                "cold_start_s": snap.get("gauges", {}).get("cold_start_s"),
            })
        return out

    #: Control traffic and every budget/deferral, summed per component (report["control"]).
    CONTROL_COUNTERS = {
        "meters": ("boot_events", "boots_deferred", "gap_fill_replies", "gap_fill_replies_shed",
                   "gap_fill_frames_shed", "aarq_repeated", "frames_dropped", "publish_failed"),
        "concentrator": ("control_up", "control_down", "control_shed", "queue_shed_frames", "publish_failed"),
        "headend": ("aarq_sent", "aarq_retransmitted", "association_timeouts", "associations_queued",
                    "associations_rate_limited", "gap_fill_requests", "gap_fill_deferred", "gap_fill_timeouts",
                    "readings_gap_filled", "inbox_dropped"),
    }

    def _control_counters(self) -> dict[str, int]:
        col = self.collector
        out: dict[str, int] = {}
        if col is None:
            return out
        idents = {"meters": self.fleet_ids, "concentrator": self.relay_ids, "headend": self.headend_ids}
        for component, names in self.CONTROL_COUNTERS.items():
            prefix = {"meters": "fleet", "concentrator": "relays", "headend": "headend"}[component]
            for ident in idents[component]:
                counters = col.latest(component, ident).get("counters", {})
                for name in names:
                    key = f"{prefix}.{name}"
                    out[key] = out.get(key, 0) + int(counters.get(name, 0) or 0)
        return out

    def _recover(self, fleets: list[Child], timeout: float) -> None:
        """The load drops: every fleet runs ten times slower (SIGUSR1), so its meters
        keep reporting and what could not flow live (shed, deferred, dropped in a
        full inbox) comes back by gap-fill.  Wait until the head-end stored every
        reading pushed so far and has no gap left, at most ``timeout``."""
        col = self.collector
        assert col is not None
        # Down to at most max(500, meters / 10) readings/s: low enough for any
        # broker here, high enough that every meter reports again within ~10 s.
        signals, rate = 0, self.o.rate
        while signals == 0 or rate > max(500.0, self.o.meters / 10):
            rate /= 10
            signals += 1
        for _ in range(signals):
            for c in fleets:
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.05)
        t0 = time.time()
        deadline = t0 + timeout
        while time.time() < deadline:
            self._check_alive()
            self._tick()
            head = self._headend_latest()
            pushed = sum(col.latest("meters", i).get("counters", {}).get("readings_pushed", 0) for i in self.fleet_ids)
            stored = head.get("counters", {}).get("readings_stored", 0)
            gaps = head.get("gauges", {}).get("meters_with_gaps", 1)
            if stored >= pushed and gaps == 0 and time.time() - t0 > 2 * self.o.sample_interval:
                self.recovery_s = round(time.time() - t0, 1)
                return
            time.sleep(0.2)
        self.recovery_s = None
        self.notes.append(f"recovery: gap-fill had not caught up {timeout:.0f} s after the load dropped")

    # --- the whole run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        o = self.o
        live_cm = None
        try:
            if o.live and self.console is not None and self.console.is_terminal:
                from rich.live import Live

                live_cm = Live(console=self.console, refresh_per_second=2, transient=True)
                self._live = live_cm.__enter__()
            self._setup()
            self._start_broker()
            bare = self._bare_phase() if o.baseline else None
            pipe = self._pipeline_phase()
            self.phase = "report"
            return self._report(pipe, bare)
        finally:
            if live_cm is not None:
                live_cm.__exit__(None, None, None)
                self._live = None
            self._cleanup()

    def _report(self, pipe: dict[str, Any], bare: dict[str, Any] | None) -> dict[str, Any]:
        o = self.o
        window = pipe["window"]
        config = {
            "meters": o.meters, "concentrators": o.concentrators, "rate": o.rate, "duration_s": o.duration,
            "ramp_up_s": o.ramp_up, "qos": o.qos, "payload_bytes": self.payload_bytes,
            "payload_size_requested": o.payload_size, "pad_bytes": self.pad,
            "broker": self.broker_url, "broker_kind": self.broker_kind, "baseline": o.baseline,
            "rotate_all_at_s": o.rotate_all_at, "fleet_processes": o.fleet_processes,
            "relay_processes": o.relay_processes, "batch_max_frames": o.batch_max_frames,
            "batch_max_delay_ms": o.batch_max_delay_ms, "sample_interval_s": o.sample_interval,
            "env": {k: v for k, v in {**o.env}.items()},
            "command": " ".join(sys.argv),
        }
        config["mass_boot"] = o.mass_boot
        config["fleet_nice"] = o.fleet_nice
        if o.cluster_workers:
            config["cluster_workers"] = o.cluster_workers
            config["partitions"] = o.partitions
        report = reportlib.build_report(
            config=config,
            window=window,
            headend=pipe["headend"],
            fleets=pipe["fleets"],
            final=pipe["final"],
            processes=self._process_stats(window, bare["window"] if bare else None),
            bare=bare,
            storm=pipe["final"].get("storm"),
            machine={**machine_info(), **self._host_load(window)},
            thresholds=self.thresholds,
            notes=self.notes,
        )
        # Seconds from the load dropping (fleet slowed to a tenth) to every pushed
        # reading stored with no gap left; None: not within --drain.
        report["recovery_s"] = self.recovery_s
        report["control"] = self._control_counters()
        if "cluster" in pipe["final"]:
            report["cluster"] = pipe["final"]["cluster"]
        accepted = report["throughput"].get("accepted_fps") or 0.0
        for proc in report["processes"]:
            # CPU per accepted reading (us): what each component costs per frame.
            proc["cpu_us_per_frame"] = (round(proc["cpu_avg_pct"] * 1e4 / accepted, 1)
                                        if accepted and proc.get("phase") != "bare" else None)
        return report

    def _host_load(self, window) -> dict[str, Any]:
        """CPU of the whole host during the window, ours and everyone else's
        (percent of one core: 200 = both cores of a 2-CPU machine busy)."""
        inside = [s for s in self._host_samples if window[0] <= s[0] <= window[1]]
        if not inside:
            return {}
        host = sum(s[1] for s in inside) / len(inside)
        ours = sum(s[2] for s in inside) / len(inside)
        for c in self.children:
            if c.role == "profiler":
                continue
            cpus = [s[1] for s in c.samples if window[0] <= s[0] <= window[1]]
            if cpus and c.phase != "bare":
                ours += sum(cpus) / len(cpus)
        return {"host_cpu_pct": round(host, 1), "others_cpu_pct": round(max(0.0, host - ours), 1),
                "loadavg_1m": round(os.getloadavg()[0], 2)}

    def _process_stats(self, window, bare_window) -> list[dict[str, Any]]:
        out = []
        for c in self.children:
            if c.role == "profiler":
                continue
            w = bare_window if c.phase == "bare" and bare_window else window
            inside = [s for s in c.samples if w[0] <= s[0] <= w[1]]
            cpus = [s[1] for s in inside]
            out.append({
                "name": c.name, "role": c.role, "phase": c.phase,
                "pid": c.proc.pid if c.proc is not None else (c.ps.pid if c.ps else None),
                "cpu_s": round(c.cpu_s, 2),
                "cpu_avg_pct": round(sum(cpus) / len(cpus), 1) if cpus else 0.0,
                "cpu_max_pct": round(max(cpus), 1) if cpus else 0.0,
                "rss_max_bytes": max((s[2] for s in c.samples), default=None),
                "rss_window_max_bytes": max((s[2] for s in inside), default=None),
            })
        return out

    def _cleanup(self) -> None:
        # Stop what is still running, in reverse start order, only our own children.
        for c in reversed(self.children):
            if not c.owned or c.proc is None or c.proc.poll() is not None:
                continue
            c.proc.send_signal(signal.SIGINT if c.role == "profiler" else signal.SIGTERM)
        deadline = time.monotonic() + 20
        for c in reversed(self.children):
            if not c.owned or c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        if self.collector is not None:
            self.collector.close()
        if self.cluster_run is not None:
            # The nodes by PID (after the workers, which were stopped above), the database unless --keep.
            self.notes.extend(self.cluster_run.stop(keep=self.o.keep))
        if self.workdir is not None and not self.o.keep and not self.o.profile:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Storm:
    """``--rotate-all-at``: renew every session key mid-run, time it."""

    def __init__(self, test: LoadTest, at: float) -> None:
        self.t = test
        self.at = at
        self.cid = uuid.uuid4().hex[:16]
        self.sent_at: float | None = None
        self.before: dict = {}
        self.accepted: dict | None = None
        self.done: dict | None = None
        self.done_at: float | None = None
        self.after: dict = {}

    @property
    def finished(self) -> bool:
        return self.done is not None or any("error" in b for _t, b in self._replies())

    def _replies(self):
        col = self.t.collector
        assert col is not None
        with col.lock:
            return list(col.replies.get(self.cid, []))

    def poll(self) -> None:
        col = self.t.collector
        assert col is not None
        now = time.time()
        if self.sent_at is None:
            if now < self.at:
                return
            self.before = col.latest("headend", self.t.headend_id)
            command = {"op": "rotate", "key": "session", "meters": "all", "id": self.cid,
                       "reply": topics.control_reply(self.cid)}
            self.sent_at = time.time()
            col.publish(topics.HEADEND_COMMANDS, json.dumps(command).encode(), qos=1)
            self.t.phase = "pipeline:storm"
            return
        if self.done is None:
            for t, body in self._replies():
                if "accepted" in body and self.accepted is None:
                    self.accepted = {**body, "_t": t}
                if body.get("done"):
                    self.done, self.done_at = body, t
                    # the counters a snapshot later
            if self.done is not None:
                self.t.phase = "pipeline:measure"
        elif not self.after and time.time() > (self.done_at or 0) + 1.5 * self.t.o.sample_interval:
            self.after = col.latest("headend", self.t.headend_id)

    def result(self, window_start: float) -> dict[str, Any]:
        col = self.t.collector
        assert col is not None
        after = self.after or col.latest("headend", self.t.headend_id)
        b_rej = self.before.get("counters", {}).get("frames_rejected", 0)
        a_rej = after.get("counters", {}).get("frames_rejected", 0)
        error = next((b["error"] for _t, b in self._replies() if "error" in b), None)
        done = self.done or {}
        return {
            "at_s": round(self.at - window_start, 3),
            "sent": self.sent_at is not None,
            "accepted": (self.accepted or {}).get("accepted"),
            "done": self.done is not None,
            "total": done.get("total"),
            "failed": done.get("failed"),
            "renewed": (done.get("total", 0) - done.get("failed", 0)) if self.done else None,
            "elapsed_s": done.get("elapsed_s"),
            "wall_s": round(self.done_at - self.sent_at, 3) if self.done_at and self.sent_at else None,
            "rejected_during": a_rej - b_rej,
            "session_renewals": after.get("counters", {}).get("session_renewals", 0)
            - self.before.get("counters", {}).get("session_renewals", 0),
            "error": error,
        }


def fleet_stopped_counters(log: Path | None) -> dict | None:
    """The counters of the fleet's last "fleet stopped" JSON log line."""
    if log is None or not log.exists():
        return None
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if '"fleet stopped"' not in line:
            continue
        try:
            found = json.loads(line[line.index("{"):])
        except ValueError:
            continue
    return found


def mosquitto_config(port: int) -> str:
    """A private Mosquitto 2.0 for load tests: loopback only, anonymous, no
    persistence, queues and in-flight windows large enough that the broker
    never drops a QoS 1 message of the run (defaults: 1000 queued, 20 in flight)."""
    return "\n".join([
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
        "max_keepalive 65535",
        "set_tcp_nodelay true",
        "log_type error",
        "log_type warning",
        "",
    ])
