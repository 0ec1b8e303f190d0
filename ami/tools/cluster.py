"""``ami cluster up|down|status``: a RabbitMQ cluster of N nodes on this machine.

For the clustered head-end (``ami headend-worker``, docs/scale-out.md) and
its tests.  Every node is a RabbitMQ 3.10 server of the distribution's
package, run as its own process with everything of its own, all under one
folder (default ``data/cluster``):

* node name ``<prefix><i>@localhost``, AMQP port ``amqp_base + i - 1``,
  MQTT port ``mqtt_base + i - 1``, Erlang distribution port AMQP + 20000,
  all on 127.0.0.1 only;
* ``node<i>/``: its configuration (``rabbitmq.conf``), database (mnesia,
  quorum logs) and logs; ``enabled_plugins``: ``rabbitmq_mqtt`` and
  ``rabbitmq_consistent_hash_exchange``; ``home/.erlang.cookie``: a random
  cookie (0400) shared by the nodes and by the ``rabbitmqctl`` calls made
  here (``HOME`` points there), so the system's own RabbitMQ is untouched;
* nodes 2..N join node 1 (``join_cluster``), so quorum queues replicate
  over all of them;
* ``cluster.json`` records nodes, ports and PIDs; ``down`` stops each node
  by its PID (SIGTERM: Erlang stops cleanly; SIGKILL after a grace period),
  after checking that PID still runs that node.

The MQTT listeners accept anonymous clients as ``guest``, which RabbitMQ
admits from the loopback interface only (``loopback_users``): this is a
local test and benchmark cluster, not a production deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_consistent_hash_exchange")
STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    pass


def rabbitmq_missing() -> str | None:
    """Why a local cluster cannot run here (None: it can)."""
    for path in (SERVER, CTL):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install the rabbitmq-server package (./scripts/setup does, as root)"
    plugins = list(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/plugins"))
    for name in PLUGINS:
        if plugins and not any(any(p.glob(f"{name}-*")) for p in plugins):
            return f"RabbitMQ plugin {name} not found"
    return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_run(count: int, start: int, stop: int, *, also: int | None = None, step: int = 10) -> int:
    """The first base in [start, stop) with ``count`` consecutive free ports
    (and, with ``also``, free ports at that offset too: the Erlang distribution
    ports at AMQP + 20000).  ClusterError when there is none."""
    for base in range(start, stop, step):
        ports = range(base, base + count)
        if all(port_free(p) and (also is None or port_free(p + also)) for p in ports):
            return base
    raise ClusterError(f"no {count} free ports between {start} and {stop}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


@dataclass
class Node:
    index: int
    name: str
    amqp: int
    mqtt: int
    dist: int
    dir: str
    pid: int = 0

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp}/"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt}"


@dataclass
class Cluster:
    root: str
    nodes: list[Node] = field(default_factory=list)

    # -- what clients use ------------------------------------------------------

    @property
    def amqp_urls(self) -> list[str]:
        return [n.amqp_url for n in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    @property
    def broker(self) -> str:
        """Every MQTT listener, comma separated: ``--broker`` with failover."""
        return ",".join(self.mqtt_urls)

    @property
    def amqp(self) -> str:
        return ",".join(self.amqp_urls)

    # -- state file ------------------------------------------------------------

    def save(self) -> None:
        path = Path(self.root) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, root: Path) -> Cluster:
        path = Path(root) / STATE_FILE
        if not path.exists():
            raise ClusterError(f"no cluster in {root} (no {STATE_FILE}): `ami cluster up` first")
        raw = json.loads(path.read_text())
        return cls(raw["root"], [Node(**n) for n in raw["nodes"]])

    def node(self, which: int | str) -> Node:
        for n in self.nodes:
            if which in (n.index, n.name, str(n.index)):
                return n
        raise ClusterError(f"no node {which!r}")

    # -- processes ---------------------------------------------------------------

    def env(self, node: Node) -> dict[str, str]:
        root = Path(self.root)
        d = Path(node.dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(root / "home"),
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp),
            RABBITMQ_DIST_PORT=str(node.dist),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(root / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_LOGS=str(d / "log" / "node.log"),
            RABBITMQ_PID_FILE=str(d / "node.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def ctl(self, node: Node, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        proc = subprocess.run([CTL, "-n", node.name, *args], env=self.env(node), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {proc.stderr.strip() or proc.stdout}")
        return proc.stdout

    def running(self, node: Node) -> bool:
        """The node's recorded PID still runs that node (never trust a reused PID)."""
        if node.pid <= 0:
            return False
        try:
            stat = Path(f"/proc/{node.pid}/stat").read_text()
            environ = Path(f"/proc/{node.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False  # exited, not yet reaped
        return f"RABBITMQ_NODENAME={node.name}".encode() in environ

    def start_node(self, node: Node) -> None:
        d = Path(node.dir)
        out = open(d / "log" / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen([SERVER], env=self.env(node), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=d)
        out.close()
        # The script's PID: it traps SIGTERM and stops the node cleanly; the
        # Erlang VM (beam.smp) is its descendant (vm_pid).
        node.pid = proc.pid
        self.save()

    def vm_pid(self, node: Node) -> int | None:
        """The PID of the node's Erlang VM (``beam.smp``, the process doing the
        work: CPU and memory), a descendant of ``node.pid``; None if not running."""
        if not self.running(node):
            return None
        try:
            for child in psutil.Process(node.pid).children(recursive=True):
                if child.name().startswith("beam"):
                    return child.pid
        except psutil.Error:
            return None
        return None

    def wait_node(self, node: Node, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(node.amqp):
            if not self.running(node):
                raise ClusterError(f"node {node.name} exited at start: see {node.dir}/log/")
            if time.monotonic() > deadline:
                raise ClusterError(f"node {node.name}: AMQP port {node.amqp} not open after {timeout:.0f} s")
            time.sleep(0.2)

    def wait_mqtt(self, node: Node, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(node.mqtt):
            if time.monotonic() > deadline:
                raise ClusterError(f"node {node.name}: MQTT port {node.mqtt} not open after {timeout:.0f} s")
            time.sleep(0.2)

    def stop_node(self, node: Node, grace: float = 30.0) -> None:
        if not self.running(node):
            node.pid = 0
            return
        os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running(node):
            os.kill(node.pid, signal.SIGKILL)
            while self.running(node):
                time.sleep(0.05)
        node.pid = 0
        self.save()

    def stop_app(self, which: int | str) -> None:
        """Stop RabbitMQ on one node, its Erlang VM left running (a node outage)."""
        self.ctl(self.node(which), "stop_app")

    def start_app(self, which: int | str) -> None:
        node = self.node(which)
        self.ctl(node, "start_app", timeout=120)
        self.wait_mqtt(node)

    def status(self) -> list[dict]:
        out = []
        for n in self.nodes:
            out.append({"node": n.name, "pid": n.pid if self.running(n) else None, "amqp": n.amqp,
                        "mqtt": n.mqtt, "amqp_open": port_open(n.amqp), "mqtt_open": port_open(n.mqtt)})
        return out


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def up(root: Path, *, nodes: int = 3, amqp_base: int = 5681, mqtt_base: int = 1891, prefix: str = "ami",
       timeout: float = 120.0) -> Cluster:
    """Start (or restart) an N-node cluster under ``root``; returns when every
    node is clustered and its MQTT listener open."""
    why = rabbitmq_missing()
    if why:
        raise ClusterError(why)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    if (root / STATE_FILE).exists():
        old = Cluster.load(root)
        if any(old.running(n) for n in old.nodes):
            raise ClusterError(f"a cluster already runs in {root}: `ami cluster down --dir {root}` first")
    fresh = not (root / "home" / ".erlang.cookie").exists()
    if fresh:
        _write(root / "home" / ".erlang.cookie", secrets.token_hex(20).upper(), 0o400)
    (root / "home").chmod(0o700)
    _write(root / "enabled_plugins", f"[{','.join(PLUGINS)}].\n", 0o644)
    cluster = Cluster(str(root))
    for i in range(1, nodes + 1):
        amqp, mqtt = amqp_base + i - 1, mqtt_base + i - 1
        node = Node(i, f"{prefix}{i}@localhost", amqp, mqtt, amqp + 20000, str(root / f"node{i}"))
        for port in (node.amqp, node.mqtt, node.dist):
            if not port_free(port):
                raise ClusterError(f"port {port} (node {node.name}) is in use")
        d = Path(node.dir)
        (d / "log").mkdir(parents=True, exist_ok=True)
        _write(d / "rabbitmq.conf", "\n".join([
            f"listeners.tcp.default = 127.0.0.1:{node.amqp}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt}",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "loopback_users.guest = true",
            "log.file.level = warning",
            "log.console = false",
            # A small machine: do not block publishers at 40 % of RAM / 50 MB disk defaults.
            "vm_memory_high_watermark.relative = 0.6",
            "disk_free_limit.absolute = 50MB",
            "",
        ]))
        _write(d / "advanced.config", "[].\n")
        _write(d / "rabbitmq-env.conf", "# own node: nothing from /etc/rabbitmq\n")
        cluster.nodes.append(node)
    cluster.save()
    for node in cluster.nodes:
        cluster.start_node(node)
    try:
        for node in cluster.nodes:
            cluster.wait_node(node, timeout)
        first = cluster.nodes[0]
        cluster.ctl(first, "await_startup", timeout=timeout)
        for node in cluster.nodes[1:]:
            cluster.ctl(node, "await_startup", timeout=timeout)
            members = cluster.ctl(node, "cluster_status", "--formatter", "json", check=False)
            if first.name not in members:  # fresh node (a restarted one is already a member)
                cluster.ctl(node, "stop_app")
                cluster.ctl(node, "join_cluster", first.name)
                cluster.ctl(node, "start_app", timeout=timeout)
        for node in cluster.nodes:
            cluster.wait_mqtt(node)
    except BaseException:
        down(root)
        raise
    return cluster


def down(root: Path, *, wipe: bool = False) -> None:
    root = Path(root).resolve()
    try:
        cluster = Cluster.load(root)
    except ClusterError:
        return
    for node in reversed(cluster.nodes):
        cluster.stop_node(node)
    if wipe:
        shutil.rmtree(root, ignore_errors=True)


# -- the command ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    c = config.get("cluster", {})
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=Path(c.get("dir", "data/cluster")),
                        help="folder of the nodes (default data/cluster)")
    parser.add_argument("--nodes", type=int, default=int(c.get("nodes", 3)))
    parser.add_argument("--amqp-base", type=int, default=int(c.get("amqp_base", 5681)))
    parser.add_argument("--mqtt-base", type=int, default=int(c.get("mqtt_base", 1891)))
    parser.add_argument("--wipe", action="store_true", help="down: also delete the nodes' data")


def main(args: argparse.Namespace, config: dict) -> int:
    try:
        if args.action == "up":
            cluster = up(args.dir, nodes=args.nodes, amqp_base=args.amqp_base, mqtt_base=args.mqtt_base)
            print(json.dumps({"broker": cluster.broker, "amqp": cluster.amqp, "nodes": cluster.status()}, indent=1))
        elif args.action == "down":
            down(args.dir, wipe=args.wipe)
            print(f"cluster in {args.dir} stopped")
        else:
            cluster = Cluster.load(args.dir)
            print(json.dumps({"broker": cluster.broker, "amqp": cluster.amqp, "nodes": cluster.status()}, indent=1))
            return 0 if all(s["pid"] for s in cluster.status()) else 1
    except ClusterError as exc:
        print(f"ami cluster: {exc}", file=sys.stderr)
        return 2
    return 0
