"""The clustered head-end: a 3-node RabbitMQ cluster of our own, PostgreSQL, N workers.

* ``cluster`` fixture: ``ami.tools.cluster.up`` starts three RabbitMQ nodes
  (own names, ports, folders, plugins file, cookie), joined; stopped by PID
  at the end.  Skipped, with the reason printed, without rabbitmq-server.
* a database of our own per run on 127.0.0.1:5432 (skipped without it).
* fencing without a broker: a zombie's commit fails, nothing written.
* pruning: digests and redelivery notes past the retention go, for the
  partitions the worker owns only, counted.
* ``ami loadtest --cluster-workers 2`` on the fixture's cluster (no second
  start): 100 meters, a few seconds; nothing lost or rejected, every pushed
  reading stored, both workers' metrics aggregated.
* the chaos test (slow): 3 workers, 8 partitions, 300 meters behind 30
  concentrators at QoS 1; a worker SIGKILLed between commit and ack,
  another SIGKILLed before its commit, both restarted, one RabbitMQ node
  stopped and started again.  Then: every reading seen on the wire stored
  exactly once with no holes; no rejection at all (no genuine frame
  refused, no replay); at least one redelivery recognised by its digest;
  every partition that carried traffic owned by at least two workers over
  the run; no (key, IV) used by two different frames, up or down.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid

import pytest

from ami.machines.headend_records import Commit
from ami.runtime.bus import port_open
from ami.security.vault import FileKeyVault
from ami.tools import cluster as rmq
from harness import AMI, REPO, Collector, Network, wait_until
from traffic import audit

PG = "postgresql://postgres@127.0.0.1:5432"


def _pg_missing() -> str | None:
    if not port_open("127.0.0.1", 5432):
        return "PostgreSQL not listening on 127.0.0.1:5432"
    return None


def _psql(sql: str, db: str = "postgres") -> str:
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-Atc", sql], check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def database():
    why = _pg_missing()
    if why:
        pytest.skip(why)
    name = f"ami_cluster_{uuid.uuid4().hex[:10]}"
    _psql(f"CREATE DATABASE {name}")
    try:
        yield f"{PG}/{name}"
    finally:
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = rmq.rabbitmq_missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("rmq")
    amqp = rmq.free_run(3, 25700, 26000, also=20000)
    mqtt = rmq.free_run(3, 21900, 22200, also=20000)
    c = rmq.up(root, nodes=3, amqp_base=amqp, mqtt_base=mqtt, prefix=f"amit{uuid.uuid4().hex[:6]}-")
    try:
        yield c
    finally:
        rmq.down(root)
        assert not any(c.running(n) for n in c.nodes)


def test_cluster_has_three_nodes_with_plugins(cluster):
    status = json.loads(cluster.ctl(cluster.nodes[0], "cluster_status", "--formatter", "json"))
    assert sorted(status["running_nodes"]) == sorted(n.name for n in cluster.nodes)
    plugins = json.loads(cluster.ctl(cluster.nodes[1], "status", "--formatter", "json"))["active_plugins"]
    assert "rabbitmq_mqtt" in plugins and "rabbitmq_consistent_hash_exchange" in plugins
    assert all(port_open("127.0.0.1", n.mqtt) for n in cluster.nodes)
    assert len(cluster.broker.split(",")) == 3


def test_topology_quorum_partitions(cluster):
    import aio_pika

    from headend.worker import declare_topology, partition_queue

    async def go():
        conn = await aio_pika.connect(cluster.amqp_urls[0])
        ch = await conn.channel()
        await declare_topology(ch, 4)
        await declare_topology(ch, 4)  # idempotent
        await conn.close()

    asyncio.run(go())
    out = cluster.ctl(cluster.nodes[2], "list_queues", "name", "type", "arguments", "--formatter", "json")
    queues = {q["name"]: q for q in json.loads(out)}
    for i in range(4):
        q = queues[partition_queue(i)]
        assert q["type"] == "quorum"
        assert "x-single-active-consumer" in json.dumps(q["arguments"])
    members = cluster.ctl(cluster.nodes[0], "list_queues", "name", "members", "--formatter", "json")
    assert all(len(q["members"]) == 3 for q in json.loads(members) if q["name"].startswith("ami.wan.p"))


def test_zombie_commit_is_fenced(database, tmp_path):
    """Two owners of one partition: after the take-over the old one commits nothing."""
    from headend.store_sql import Fenced
    from headend.worker_store import PartitionStore

    vault = FileKeyVault(tmp_path / "kek")

    async def go():
        a, b = PartitionStore(database, vault), PartitionStore(database, vault)
        await a.open(partitions=2)
        await b.open(partitions=2)
        try:
            ea, _ = await a.take_over(0, "A", "wa")
            await a.commit_partition(0, ea, "A", Commit(), [b"d1"], [("k", b"x")], {})
            eb, left = await b.take_over(0, "B", "wb")
            assert eb == ea + 1 and [k for _i, k, _b in left] == ["k"]  # A's outbox, for B to publish
            with pytest.raises(Fenced):
                await a.commit_partition(0, ea, "A", Commit(), [b"d2"], [("k2", b"y")], {})
            assert await b.seen([b"d1", b"d2"]) == {b"d1"}
            await b.commit_partition(0, eb, "B", Commit(), [b"d2"], [], {})
            rows = await b.query("SELECT count(*) FROM cluster_outbox WHERE routing_key = 'k2'")
            assert rows == [(0,)]
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_prune_digests_past_retention_of_owned_partitions(database, tmp_path):
    """Old digests and redelivery notes go, young ones stay, partitions the
    worker does not own are left to their owners; counted in the metrics."""
    from headend.worker import Partition, Worker
    from headend.worker_store import PartitionStore

    vault = FileKeyVault(tmp_path / "kek")
    day = 86400.0

    async def go():
        store = PartitionStore(database, vault)
        await store.open(partitions=2)
        try:
            e0, _ = await store.take_over(0, "A", "wa")
            e1, _ = await store.take_over(1, "B", "wb")
            await store.commit_partition(0, e0, "A", Commit(), [b"old0", b"new0"], [], {})
            await store.commit_partition(1, e1, "B", Commit(), [b"old1"], [], {})
            for d, p in ((b"old0", 0), (b"new0", 0), (b"old1", 1)):
                await store.note_redelivery(d, p, "w")
            now = time.time()
            await store.query("UPDATE cluster_batches SET at = $1 WHERE digest = ANY($2)",
                              (now - 2 * day, [b"old0", b"old1"]))
            await store.query("UPDATE cluster_redeliveries SET at = $1 WHERE digest <> $2", (now - 2 * day, b"new0"))
            worker = Worker({"cluster": {"digest_retention_s": day}}, tmp_path, [], database, 2, "wa")
            worker.store = store
            worker.parts = {0: Partition(0, epoch=e0)}  # owns partition 0 only
            assert worker.retention_s == day
            assert await worker.prune(now) == (1, 1)
            assert await store.seen([b"old0", b"new0", b"old1"]) == {b"new0", b"old1"}
            rows = await store.query("SELECT partition, digest FROM cluster_redeliveries ORDER BY partition")
            assert [(p, bytes(d)) for p, d in rows] == [(0, b"new0"), (1, b"old1")]
            assert worker.counters["digests_pruned"] == 1 and worker.counters["redeliveries_pruned"] == 1
            assert await worker.prune(now) == (0, 0)  # nothing left past the retention
            # In chunks: many old rows, fewer per transaction than the total.
            await store.commit_partition(0, e0, "A", Commit(), [b"x%d" % i for i in range(25)], [], {})
            await store.query("UPDATE cluster_batches SET at = 0 WHERE digest <> $1 AND partition = 0", (b"new0",))
            assert await store.prune([0], now - day, chunk=10) == (25, 0)
            assert await store.seen([b"new0"]) == {b"new0"}
        finally:
            await store.close()

    asyncio.run(go())


@pytest.mark.slow
def test_loadtest_drives_the_clustered_headend(cluster, tmp_path):
    """``ami loadtest --cluster-workers 2`` (programmatically, on the fixture's
    cluster: no second start): nothing lost, nothing rejected, every pushed
    reading stored in PostgreSQL, both workers committed and their metrics
    (through amq.topic and the MQTT plugin) were aggregated."""
    from pathlib import Path

    from ami.tools.loadtest import clustered
    from ami.tools.loadtest.run import LoadTest, Options

    why = clustered.missing()
    if why:
        pytest.skip(why)
    options = Options(meters=100, concentrators=10, rate=200.0, duration=4.0, ramp_up=1.0, drain=20.0,
                      settle_max=60.0, start_timeout=120.0, workdir=tmp_path / "runs", live=False,
                      cluster_workers=2, partitions=PARTITIONS, cluster_dir=Path(cluster.root))
    test = LoadTest(options)
    test.thresholds = {"min_fps": None, "max_p99_ms": None, "max_loss": 0.0}
    t0 = time.monotonic()
    report = test.run()
    f = report["frames"]
    c = report["cluster"]
    print(f"cluster loadtest: {f['run']} {c['workers']} {time.monotonic() - t0:.0f} s")
    assert f["lost"] == 0 and f["rejected"] == 0 and f["rejected_by_reason"] == {}, f
    assert f["run"]["pushed"] > 0 and c["readings"] == f["run"]["stored"] == f["run"]["pushed"], (f, c)
    assert c["readings_distinct"] == c["readings"] and c["meters_with_readings"] == 100
    assert c["rejections"] == {} and c["outbox_left"] == 0
    stored = [w["readings_stored"] for w in c["workers"]]
    assert len(stored) == 2 and all(n > 0 for n in stored), c["workers"]
    assert sum(stored) == c["readings"]  # the metrics (committed counts) add up to the rows
    assert f["accepted"] > 0 and report["latency_ms"]["count"] > 0 and report["latency_ms"]["samples_missed"] == 0
    roles = {}
    for p in report["processes"]:
        roles.setdefault(p["role"], []).append(p)
    assert len(roles["headend"]) == 2 and len(roles["broker"]) == 3
    assert all(p["cpu_s"] > 0 and p["rss_max_bytes"] > 20e6 for p in roles["broker"])  # the beam.smp VMs
    assert report["thresholds"]["passed"] is True
    assert all(cluster.running(n) for n in cluster.nodes)  # the fixture's cluster: left running
    assert test.cluster_run is not None and not test.cluster_run.db_created  # the run's database dropped


# -- chaos -------------------------------------------------------------------------------------

ENV = {
    "AMI__METERS__TIME_COMPRESSION": "1800",  # one interval per second per meter
    "AMI__METERS__JITTER": "0.5",
    "AMI__HEADEND__GAP_FILL_DELAY_S": "1.0",
    "AMI__HEADEND__GAP_FILL_RETRY_S": "3.0",
    "AMI__HEADEND__ASSOCIATION_TIMEOUT_S": "3.0",
    "AMI__HEADEND__TRANSFER_TIMEOUT_S": "3.0",
    "AMI__MONITOR__METRICS_INTERVAL_S": "1.0",
}
PARTITIONS = 8


class Workers:
    def __init__(self, net: Network, cluster: rmq.Cluster, store: str) -> None:
        self.net, self.cluster, self.store = net, cluster, store
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, i: int, **env: str) -> subprocess.Popen:
        log = open(self.net.tmp / f"worker{i}.log", "ab")
        proc = subprocess.Popen(
            AMI + ["headend-worker", "--data", str(self.net.data), "--store", self.store, "--amqp",
                   self.cluster.amqp, "--partitions", str(PARTITIONS), "--index", str(i), "--workers", "3",
                   "--log-format", "json"],
            cwd=REPO, env={**self.net.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.procs[i] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _holes(db: str) -> int:
    return int(_psql("SELECT count(*) FROM (SELECT meter, max(seq) - min(seq) + 1 - count(*) AS h FROM readings "
                     "GROUP BY meter) x WHERE h > 0", db) or 0)


@pytest.mark.slow
def test_chaos_workers_and_a_node_die(cluster, database, tmp_path):
    t0 = time.monotonic()
    db = database.rsplit("/", 1)[1]
    net = Network(tmp_path, meters=300, concentrators=30, broker=cluster.broker, env=ENV, bus_security=False)
    net.provision()
    workers = Workers(net, cluster, database)
    # worker i connects first to node i+1: worker1 sits on node 2, the node stopped below.
    workers.start(0, AMI_WORKER_CRASH_AFTER_COMMIT="60")  # dies between commit and ack
    workers.start(1)
    workers.start(2, AMI_WORKER_CRASH_BEFORE_COMMIT="100")  # dies in the middle of a batch
    first = cluster.nodes[0].mqtt
    capture = Collector("127.0.0.1", first, topics=("ami/v1/plc/+/up/+", "ami/v1/plc/+/down/+"))
    try:
        wait_until(lambda: "worker_connected" in (net.tmp / "worker1.log").read_text(), 60, what="workers up")
        net.start("concentrator", "concentrator")
        time.sleep(1.0)
        net.start("meters", "meters")
        wait_until(lambda: workers.procs[0].poll() is not None, 240, what="worker 0 crash after commit")
        assert workers.procs[0].returncode == -signal.SIGKILL
        wait_until(lambda: workers.procs[2].poll() is not None, 240, what="worker 2 crash before commit")
        assert workers.procs[2].returncode == -signal.SIGKILL
        workers.start(0)
        workers.start(2)
        time.sleep(4.0)
        cluster.stop_app(2)  # worker1's node: every partition it holds fails over
        time.sleep(8.0)
        cluster.start_app(2)
        time.sleep(6.0)
        # Every relay back and every meter's stream flowing again (a relay that
        # was on the stopped node reconnects with backoff; until it does, its
        # meters' newest readings are missing at the end, which no hole shows).
        wait_until(lambda: _psql("SELECT max(high_seq) - min(high_seq) <= 3 FROM meters", db).strip() == "t",
                   120, what="every meter's readings arriving again")
        # Settle: gap-fill closes what was in flight at each failure.
        wait_until(lambda: _holes(db) == 0 and int(_psql(
            "SELECT count(*) FROM meters WHERE gaps IS NOT NULL", db) or 0) == 0, 60, what="no holes")
        assert net.stop("meters") == 0
        # The meters' last frames are still on their way through the relays
        # and the cluster (a reading lost there now could not be gap-filled:
        # the meters are gone): let them arrive before the relays stop.
        time.sleep(3.0)
        assert net.stop("concentrator") == 0
        with capture.lock:
            frames = list(dict.fromkeys(p for _t, p, _r in capture.messages))
            uplink = [p for t, p, _r in capture.messages if "/up/" in t]
        # MQTT QoS 1 is at-least-once: a publish whose PUBACK died with the
        # stopped node is sent again, and the copy reaches the head-end.
        delivered_twice = len(uplink) - len(set(uplink))
        factory = {r["meter"]: r for r in map(json.loads, (net.data / "factory-keys.jsonl").read_text().splitlines())}
        network = json.loads((net.data / "network.json").read_text())
        result = audit(frames, factory, bytes.fromhex(network["headend_system_title"]))

        def stored() -> set[tuple[str, int]]:
            rows = _psql("SELECT meter, seq FROM readings", db).split()
            return {(m, int(s)) for m, s in (r.split("|") for r in rows)}

        try:
            wait_until(lambda: result.readings <= stored(), 60, what="every reading seen on the wire stored")
        except AssertionError:
            missing = sorted(result.readings - stored())
            raise AssertionError(f"{len(missing)} readings seen on the wire not stored, e.g. {missing[:10]}; "
                                 f"rejections: {_psql('SELECT reason, sum(n) FROM cluster_rejections GROUP BY reason', db)}") from None
    finally:
        capture.close()
        net.kill_all()
        workers.stop_all()
    elapsed = time.monotonic() - t0

    # 1. Every reading pushed (seen on the wire) stored, each (meter, seq) once, no holes.
    total = int(_psql("SELECT count(*) FROM readings", db))
    distinct = int(_psql("SELECT count(*) FROM (SELECT DISTINCT meter, seq FROM readings) x", db))
    assert total == distinct and total >= 3000
    assert _holes(db) == 0
    assert int(_psql("SELECT count(DISTINCT meter) FROM readings", db)) == 300
    # 2. No genuine frame refused, no counter out of order.
    # The only refusals allowed are DLMS replays of frames the transport
    # delivered twice (the copy of an accepted frame, counted, state unchanged);
    # nothing else, and no more of them than copies seen on the wire.
    rejections = dict(r.split("|") for r in _psql(
        "SELECT reason, sum(n) FROM cluster_rejections GROUP BY reason", db).split())
    assert set(rejections) <= {"replay"}, rejections
    assert int(rejections.get("replay", 0)) <= delivered_twice, (rejections, delivered_twice)
    # 3. The commit-then-crash path ran: a redelivered batch recognised by its digest.
    redelivered = int(_psql("SELECT count(*) FROM cluster_redeliveries", db))
    assert redelivered >= 1
    # 4. Failover: every partition with traffic had at least two owners.
    owners = dict(r.split("|") for r in _psql(
        "SELECT partition, count(DISTINCT owner) FROM cluster_owners GROUP BY partition", db).split())
    used = set(_psql("SELECT DISTINCT partition FROM cluster_batches", db).split())
    print(f"chaos: {total} readings, {redelivered} redelivered, owners per partition {owners}, "
          f"partitions used {sorted(used)}, {elapsed:.0f} s")
    assert len(used) >= PARTITIONS - 2
    assert all(int(owners[p]) >= 2 for p in used), owners
    # 5. No (key, IV) used by two different frames, uplink or downlink.
    assert result.opened > 3000
    assert result.reused() == {}
