"""A clustered head-end worker: partitions from a RabbitMQ cluster, state in PostgreSQL.

The topology (:func:`declare_topology`, idempotent, every worker declares it):

* concentrators publish their WAN batches over MQTT to any node of the
  cluster (``ami/v1/wan/<c>/up``: RabbitMQ's MQTT plugin publishes it to
  ``amq.topic`` with routing key ``ami.v1.wan.<c>.up``; ids hold no dot);
* ``amq.topic`` -> ``ami.wan`` (exchange-to-exchange binding on
  ``ami.v1.wan.*.up``), a consistent-hash exchange: one routing key, so one
  concentrator, always reaches the same one of P partition queues;
* ``ami.wan.p<i>``: quorum queues (a QoS 1 PUBACK means a majority
  wrote it) with single-active-consumer (one worker consumes a partition at
  a time, in order; the broker hands it to a standby when that worker's
  connection dies), a delivery limit and a dead-letter queue
  (``ami.wan.dead``) for a poison batch;
* ``ami.commands``: operator commands (``ami/v1/control/headend/commands``).

A worker subscribes to every partition queue (its "home" ones first, the
others a little later, so the partitions spread), and for each partition
it is active on: takes it over in PostgreSQL (epoch + 1), runs one
:class:`HeadEndEngine` per concentrator, loaded on its first batch, and per
group of messages: skips the ones whose digest is already committed (a
redelivery after commit-then-crash), hands the rest to the engines, runs
their timers, commits everything in **one** fenced transaction
(:meth:`PartitionStore.commit_partition`), **then** publishes the outbox
(downlink, replies, events) with publisher confirms, **then** acks the
group.  Never a requeue: on any error the partition's channel is closed and
its unacked messages go back, in order, to the next active consumer.

Metrics: every ``[monitor] metrics_interval_s`` the worker publishes the
snapshot a single head-end publishes (``ami/v1/monitor/headend/<id>/metrics``:
counters summed over its engines, ``readings_stored`` as committed, rejections,
gauges, the HDR latency histogram of the interval) to ``amq.topic`` with the
topic's routing key, on a channel of its own without confirms and under a
timeout: MQTT subscribers (``ami monitor``, ``ami loadtest``) get it through
the cluster's MQTT plugin, and a metrics publish never waits in, or fails,
the commit/ack path.

Pruning: every ``[cluster] prune_interval_s`` the worker deletes, for the
partitions it owns, the ``cluster_batches`` digests and ``cluster_redeliveries``
rows older than ``[cluster] digest_retention_s`` (default 24 h: longer than a
message can wait in a partition queue short of every worker being down that
long; see docs/scale-out.md), counted as ``digests_pruned`` /
``redeliveries_pruned``.

Crash hooks for the chaos test (environment): ``AMI_WORKER_CRASH_AFTER_COMMIT=N``
SIGKILLs the worker after its N-th commit of consumed messages, before the
ack; ``AMI_WORKER_CRASH_BEFORE_COMMIT=N`` before that commit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from hdrh.histogram import HdrHistogram

from ami.machines.headend import HeadEndEngine, Policy
from ami.machines.headend_records import Commit
from ami.protocol import topics
from ami.protocol.keys import KeyType
from ami.protocol.messages import Batch, encode_batch
from ami.runtime.logs import get_logger
from ami.runtime.metrics import Metrics, event_payload
from ami.runtime.network import iter_factory_keys, load_network
from ami.security.vault import open_vault
from headend.store_sql import Fenced, lease_owner
from headend.worker_store import PartitionStore

log = get_logger("headend-worker")

WAN_EXCHANGE = "ami.wan"
DLX = "ami.wan.dlx"
DEAD_QUEUE = "ami.wan.dead"
COMMANDS_QUEUE = "ami.commands"
DOWNLINK_BATCH = 500
MAX_COMMAND_BYTES = 64 * 1024
GROUP_MAX = 200  # messages per transaction
CAMPAIGN_TTL_S = 24 * 3600  # rotations re-applied by a new owner for this long
LATENCY_MAX_US = 600_000_000  # 10 minutes, as headend/service.py
#: Digests of committed messages kept this long (``[cluster] digest_retention_s``):
#: longer than a committed-but-unacked message (or a QoS 1 copy of one) can wait
#: in a partition queue before a worker consumes it, i.e. than every worker of a
#: partition being down.  Past it, such a message is refused as a DLMS replay
#: by the committed counter marks (counted, never stored twice, never lost).
DIGEST_RETENTION_S = 24 * 3600.0
PRUNE_INTERVAL_S = 300.0
PRUNE_CHUNK = 10_000  # rows per DELETE transaction: never a long lock beside the commits
METRICS_PUBLISH_TIMEOUT_S = 2.0


def routing_key(topic: str) -> str:
    """MQTT topic -> AMQP routing key, as RabbitMQ's MQTT plugin maps it."""
    return topic.replace("/", ".")


def partition_queue(i: int) -> str:
    return f"{WAN_EXCHANGE}.p{i}"


def concentrator_of(key: str) -> str | None:
    parts = key.split(".")
    if len(parts) == 5 and parts[:3] == ["ami", "v1", "wan"] and parts[4] == "up":
        return parts[3]
    return None


async def declare_topology(channel: AbstractChannel, partitions: int, *, delivery_limit: int = 10) -> None:
    """Exchanges, partition queues and bindings; idempotent (same arguments)."""
    wan = await channel.declare_exchange(WAN_EXCHANGE, "x-consistent-hash", durable=True)
    dlx = await channel.declare_exchange(DLX, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await dead.bind(dlx)
    topic = await channel.get_exchange("amq.topic")
    for i in range(partitions):
        q = await channel.declare_queue(partition_queue(i), durable=True, arguments={
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DLX,
        })
        await q.bind(wan, routing_key="1")  # weight 1 each: the ring is bound in queue order, once
    await wan.bind(topic, routing_key=routing_key(topics.WAN_UP_FILTER).replace("+", "*"))
    commands = await channel.declare_queue(COMMANDS_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await commands.bind(topic, routing_key=routing_key(topics.HEADEND_COMMANDS))


@dataclass
class Partition:
    index: int
    channel: AbstractChannel | None = None
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    epoch: int = 0  # 0: not the owner (yet)
    engines: dict[str, HeadEndEngine] = field(default_factory=dict)
    task: asyncio.Task | None = None
    last_tick: float = 0.0
    reported: dict[str, Counter] = field(default_factory=dict)  # rejections already committed, per engine


class Worker:
    def __init__(self, config: dict[str, Any], data_dir: Path, amqp_urls: list[str], store: str,
                 partitions: int, ident: str, index: int = 0, workers: int = 1, prefetch: int = 64) -> None:
        self.config = config
        self.hcfg = dict(config.get("headend", {}))
        self.data_dir = Path(data_dir)
        self.amqp_urls = amqp_urls
        self.store_spec = store
        self.n = partitions
        self.ident = ident
        self.index = index
        self.workers = max(1, workers)
        self.prefetch = prefetch
        self.owner = lease_owner()
        self.tick_s = float(self.hcfg.get("commit_interval_ms", 200)) / 1000
        self.counters: Counter[str] = Counter()
        self.commands: dict[int, tuple[dict, float]] = {}  # id -> (command, at)
        self._last_command = 0
        self.parts: dict[int, Partition] = {}
        self._commits = 0
        self._crash_after = int(os.environ.get("AMI_WORKER_CRASH_AFTER_COMMIT", "0") or 0)
        self._crash_before = int(os.environ.get("AMI_WORKER_CRASH_BEFORE_COMMIT", "0") or 0)
        self._downlink_seq = time.time_ns() // 1_000_000
        self._publish_lock = asyncio.Lock()
        self.conn: AbstractRobustConnection | None = None
        ccfg = dict(config.get("cluster", {}))
        self.retention_s = float(ccfg.get("digest_retention_s", DIGEST_RETENTION_S))
        self.prune_interval_s = float(ccfg.get("prune_interval_s", PRUNE_INTERVAL_S))
        self.metrics_interval_s = float(config.get("monitor", {}).get("metrics_interval_s", 2.0))
        # Monitor snapshots (component "headend", as the single head-end): counters of
        # engines dropped (partition given back) are kept here so totals never go down.
        self.metrics = Metrics("headend", ident)
        self.latency_total = HdrHistogram(1, LATENCY_MAX_US, 3)
        self.latency_interval = HdrHistogram(1, LATENCY_MAX_US, 3)
        self._retired: Counter[str] = Counter()
        self._retired_rejected: Counter[str] = Counter()
        self._mon_channel: AbstractChannel | None = None
        self._mon_exchange: AbstractExchange | None = None
        self._t0 = time.perf_counter()

    # -- start and stop ------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        network = load_network(self.data_dir)
        self.title = network.headend_title
        self.policy = Policy.from_config(self.hcfg)
        self.vault = open_vault(self.hcfg.get("vault", "file:headend.kek"), data_dir=self.data_dir)
        self.store = PartitionStore(self.store_spec, self.vault)
        await self.store.open(partitions=self.n)
        imported = await self.store.import_factory(iter_factory_keys(self.data_dir), time.time())
        listener = await self.store.listen(self._on_notify)
        await self._fetch_commands()
        self.metrics.gauges["cold_start_s"] = round(time.perf_counter() - self._t0, 3)
        log.info("worker_started", worker=self.ident, partitions=self.n, imported=imported, store=repr(self.store))
        attempt = self.index
        pruner = asyncio.create_task(self._prune_loop())
        try:
            while not stop.is_set():
                url = self.amqp_urls[attempt % len(self.amqp_urls)]
                attempt += 1
                try:
                    await self._session(url, stop)
                except (aio_pika.exceptions.AMQPError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
                    log.warning("worker_bus_lost", worker=self.ident, error=str(exc) or type(exc).__name__)
                self._drop_all()
                if not stop.is_set():
                    await asyncio.sleep(0.5)
        finally:
            pruner.cancel()
            await asyncio.gather(pruner, return_exceptions=True)
            await listener.close()
            await self.store.close()
            self.vault.close()
        log.info("worker_stopped", worker=self.ident, **dict(self.counters))
        return 0

    def _drop_all(self) -> None:
        for part in self.parts.values():
            if part.task is not None:
                part.task.cancel()
            self._retire(part)
        self.parts.clear()
        self._mon_channel = self._mon_exchange = None

    def _retire(self, part: Partition) -> None:
        """Drop a partition's engines, keeping their counters for the metrics."""
        for engine in part.engines.values():
            self._retired.update(engine.counters)
            self._retired_rejected.update(engine.rejected)
        part.engines.clear()

    async def _session(self, url: str, stop: asyncio.Event) -> None:
        conn: AbstractRobustConnection = await aio_pika.connect(url, timeout=10)
        self.conn = conn
        metrics_task: asyncio.Task | None = None
        lost = asyncio.Event()
        conn.close_callbacks.add(lambda *_a: lost.set())
        try:
            setup = await conn.channel()
            await declare_topology(setup, self.n)
            await setup.close()
            self.pub = await conn.channel(publisher_confirms=True)
            self.topic_exchange = await self.pub.get_exchange("amq.topic")
            cmd_channel = await conn.channel()
            await cmd_channel.set_qos(prefetch_count=16)
            cq = await cmd_channel.get_queue(COMMANDS_QUEUE)
            await cq.consume(self._on_command_message)
            home = [p for p in range(self.n) if p % self.workers == self.index % self.workers]
            for p in home:
                await self._subscribe(conn, p)
            log.info("worker_connected", worker=self.ident, url=url.rpartition("@")[2], home=home)
            metrics_task = asyncio.create_task(self._metrics_loop(conn))
            waiter = asyncio.create_task(lost.wait())
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # then the others: standby for partitions homed elsewhere
                for p in range(self.n):
                    if p not in home:
                        await self._subscribe(conn, p)
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if lost.is_set() and not stop.is_set():
                raise ConnectionError("connection to the cluster lost")
            # Stopping: finish the groups in hand (each task commits, publishes, acks).
            for part in list(self.parts.values()):
                part.inbox.put_nowait(None)
            tasks = [p.task for p in self.parts.values() if p.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            metrics_task.cancel()
            await self._publish_metrics(conn)  # the final counters
        finally:
            if metrics_task is not None:
                metrics_task.cancel()
            self._drop_all()
            if not conn.is_closed:
                await conn.close()

    async def _subscribe(self, conn: AbstractRobustConnection, p: int) -> None:
        part = Partition(p)
        part.channel = await conn.channel()
        await part.channel.set_qos(prefetch_count=self.prefetch)
        queue = await part.channel.get_queue(partition_queue(p))
        await queue.consume(lambda message, part=part: part.inbox.put(message))
        part.task = asyncio.create_task(self._partition_loop(part))
        self.parts[p] = part

    # -- one partition ------------------------------------------------------------------

    async def _partition_loop(self, part: Partition) -> None:
        try:
            while True:
                try:
                    first = await asyncio.wait_for(part.inbox.get(), self.tick_s)
                except TimeoutError:
                    first = False
                if first is None:
                    return
                group: list[AbstractIncomingMessage] = [first] if first else []
                while len(group) < GROUP_MAX and not part.inbox.empty():
                    nxt = part.inbox.get_nowait()
                    if nxt is None:
                        part.inbox.put_nowait(None)
                        break
                    group.append(nxt)
                if group or part.epoch:
                    await self._round(part, group)
        except asyncio.CancelledError:
            raise
        except Fenced as exc:
            log.error("worker_fenced", worker=self.ident, partition=part.index, error=str(exc))
            self.counters["fenced"] += 1
            await self._release(part)
        except Exception as exc:  # noqa: BLE001 - never requeue: give the partition back
            log.error("worker_partition_failed", worker=self.ident, partition=part.index,
                      error=f"{type(exc).__name__}: {exc}")
            await self._release(part)

    async def _release(self, part: Partition) -> None:
        """Close the partition's channel: its unacked messages go back, in
        order, to the next active consumer; subscribe again as a standby."""
        part.epoch = 0
        self._retire(part)
        channel = part.channel
        self.parts.pop(part.index, None)
        if channel is not None and not channel.is_closed:
            await channel.close()
        await asyncio.sleep(1.0)
        conn = self.conn
        if conn is not None and not conn.is_closed:
            await self._subscribe(conn, part.index)

    async def _take_over(self, part: Partition) -> None:
        epoch, left = await self.store.take_over(part.index, self.owner, self.ident)
        part.epoch = epoch
        self._retire(part)
        part.reported.clear()
        self.counters["takeovers"] += 1
        log.info("partition_taken_over", worker=self.ident, partition=part.index, epoch=epoch, outbox=len(left))
        if left:  # frames the previous owner committed but may not have published
            await self._publish([(k, b) for _i, k, b in left])
            await self.store.outbox_sent([i for i, _k, _b in left])

    async def _engine(self, part: Partition, concentrator: str, now: float) -> HeadEndEngine:
        engine = part.engines.get(concentrator)
        if engine is None:
            snapshot = await self.store.load_concentrator(concentrator)
            engine = HeadEndEngine(self.title, self.policy, lambda: secrets.token_bytes(16))
            engine.load(snapshot, now)
            part.engines[concentrator] = engine
            for _cid, (cmd, at) in sorted(self.commands.items()):
                if cmd.get("op") == "rotate":
                    self._apply_rotation(engine, cmd, now, not_done_since=at)
        return engine

    async def _round(self, part: Partition, group: list[AbstractIncomingMessage]) -> None:
        now = time.time()
        if group and not part.epoch:
            await self._take_over(part)
        if not part.epoch:
            return
        digests = [hashlib.sha256(m.routing_key.encode() + b"\0" + m.body).digest() for m in group]
        t_seen = time.perf_counter()
        seen = await self.store.seen(digests) if group else set()
        if group:
            self.counters["groups"] += 1
            self.counters["seen_ms_total"] += round((time.perf_counter() - t_seen) * 1000, 3)
        fresh: list[bytes] = []
        touched: dict[str, HeadEndEngine] = {}
        for message, digest in zip(group, digests):
            if digest in seen or digest in fresh:
                # Committed before (the owner died between commit and ack, or
                # a QoS 1 duplicate): ack, never process twice.
                self.counters["redelivered_duplicates"] += 1
                await self.store.note_redelivery(digest, part.index, self.ident)
                continue
            fresh.append(digest)
            conc = concentrator_of(message.routing_key or "")
            if conc is None:
                self.counters["foreign_routing_key"] += 1
                continue
            engine = await self._engine(part, conc, now)
            engine.handle_batch(message.body, now, conc)
            touched[conc] = engine
        if now - part.last_tick >= self.tick_s:
            part.last_tick = now
            for conc, engine in part.engines.items():
                if engine.next_timer() <= now:
                    engine.tick(now)
                    touched[conc] = engine
        commit = Commit()
        outbox: list[tuple[str, bytes]] = []
        rejected: Counter[str] = Counter()
        latencies: list[int] = []
        for conc, engine in touched.items():
            effects = engine.drain()
            latencies += effects.latencies_ns
            c = effects.commit
            commit.readings += c.readings
            commit.keys += c.keys
            commit.sessions += c.sessions
            commit.meters += c.meters
            for name, frames in effects.downlink.items():
                for i in range(0, len(frames), DOWNLINK_BATCH):
                    self._downlink_seq += 1
                    batch = Batch(name, self._downlink_seq, tuple(frames[i : i + DOWNLINK_BATCH]))
                    outbox.append((routing_key(topics.wan_down(name)), encode_batch(batch)))
            for topic, body in effects.replies:
                outbox.append((routing_key(topic), json.dumps(body).encode()))
            for event in effects.events:
                outbox.append((routing_key(topics.HEADEND_EVENTS), event_payload(event.pop("kind"), **event)))
            rejected.update(engine.rejected)
            rejected.subtract(part.reported.get(conc, Counter()))
            part.reported[conc] = Counter(engine.rejected)
        rejected = Counter({k: v for k, v in rejected.items() if v > 0})
        if not (group or commit or outbox or rejected):
            return
        n = 0
        if group:
            # This group's number, kept locally: other partitions' groups run
            # concurrently and move self._commits while this one awaits.
            self._commits += 1
            n = self._commits
            if self._crash_before and n == self._crash_before:
                log.warning("crash_hook_before_commit", worker=self.ident, partition=part.index)
                os.kill(os.getpid(), signal.SIGKILL)
        t_commit = time.perf_counter()
        ids = await self.store.commit_partition(part.index, part.epoch, self.owner, commit, fresh, outbox,
                                                dict(rejected))
        commit_ms = round((time.perf_counter() - t_commit) * 1000, 3)
        self.metrics.gauges["last_commit_ms"] = commit_ms
        self.counters["commit_ms_total"] += commit_ms
        self.counters["commits"] += 1
        for latency_ns in latencies:
            us = max(1, min(latency_ns // 1000, LATENCY_MAX_US))
            self.latency_total.record_value(us)
            self.latency_interval.record_value(us)
        self.counters["readings_stored"] += len(commit.readings)
        self.counters["messages"] += len(group)
        if group and self._crash_after and n == self._crash_after:
            log.warning("crash_hook_after_commit", worker=self.ident, partition=part.index)
            os.kill(os.getpid(), signal.SIGKILL)
        if outbox:
            await self._publish(outbox)  # only the owner: a fenced commit raised above
            await self.store.outbox_sent(ids)
        if group:
            await group[-1].ack(multiple=True)  # one channel per partition: acks exactly this group

    async def _publish(self, items: list[tuple[str, bytes]]) -> None:
        async with self._publish_lock:
            await asyncio.gather(*(
                self.topic_exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                            routing_key=key)
                for key, body in items))

    # -- metrics and housekeeping ---------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """The single head-end's snapshot, for this worker's engines: counters
        summed over them (and over the engines it dropped), ``readings_stored``
        as committed, rejections, gauges, the interval's latency histogram."""
        engines = [e for p in self.parts.values() if p.epoch for e in p.engines.values()]
        totals = Counter(self._retired)
        rejected = Counter(self._retired_rejected)
        for engine in engines:
            totals.update(engine.counters)
            rejected.update(engine.rejected)
        totals.pop("meters", None)  # a gauge the engine keeps as a counter
        m = self.metrics
        m.counters.clear()
        m.counters.update(totals)
        m.counters["readings_processed"] = totals.get("readings_stored", 0)  # by the engines, committed or not
        for name, value in self.counters.items():  # the worker's own: readings_stored = committed
            m.counters[name] = round(value, 3) if isinstance(value, float) else value
        for reason in m.rejected:
            m.rejected[reason] = 0
        for reason, n in rejected.items():
            m.rejected[reason] = n
        m.gauges.update(
            meters=sum(len(e.meters) for e in engines),
            sessions=sum(1 for e in engines for x in e.meters.values() if x.session is not None),
            pending=sum(e.meters_pending for e in engines),
            meters_with_gaps=sum(e.meters_with_gaps for e in engines),
            concentrators=len(engines),
            partitions_owned=sum(1 for p in self.parts.values() if p.epoch),
            partitions_subscribed=len(self.parts),
            inbox=sum(p.inbox.qsize() for p in self.parts.values()),
        )
        snap = m.snapshot()
        snap["worker"] = {"index": self.index, "workers": self.workers, "partitions": self.n,
                          "owned": sorted(p.index for p in self.parts.values() if p.epoch)}
        total, interval = self.latency_total, self.latency_interval
        percentiles = total.get_percentile_to_value_dict([50, 90, 99, 99.9])  # one pass, not four
        snap["latency_ms"] = {
            "count": total.get_total_count(),
            **{f"p{p}": percentiles.get(p, 0) / 1000 for p in (50, 90, 99, 99.9)},  # {} when empty
            "max": total.get_max_value() / 1000,
            "interval_count": interval.get_total_count(),
            "interval_p99": interval.get_value_at_percentile(99) / 1000,
            "interval_hdr": base64.b64encode(interval.encode()).decode() if interval.get_total_count() else "",
        }
        interval.reset()
        return snap

    async def _metrics_loop(self, conn: AbstractRobustConnection) -> None:
        while True:
            await asyncio.sleep(self.metrics_interval_s)
            await self._publish_metrics(conn)

    async def _publish_metrics(self, conn: AbstractRobustConnection) -> None:
        """One snapshot to amq.topic (the MQTT monitor topic's routing key).

        A channel of its own, no publisher confirms, bounded by a timeout, every
        error swallowed and counted: a metrics publish never blocks or breaks a
        partition's commit, publish and ack."""
        key = routing_key(topics.monitor_metrics("headend", self.ident))
        try:
            body = json.dumps(self._snapshot()).encode()
            async with asyncio.timeout(METRICS_PUBLISH_TIMEOUT_S):
                if self._mon_channel is None or self._mon_channel.is_closed or self._mon_exchange is None:
                    self._mon_channel = await conn.channel(publisher_confirms=False)
                    self._mon_exchange = await self._mon_channel.get_exchange("amq.topic", ensure=False)
                await self._mon_exchange.publish(
                    aio_pika.Message(body, content_type="application/json",
                                     delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT), routing_key=key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - metrics are best effort
            self._mon_channel = self._mon_exchange = None
            self.counters["metrics_publish_failed"] += 1
            log.debug("metrics_publish_failed", worker=self.ident, error=str(exc) or type(exc).__name__)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval_s)
            await self.prune()

    async def prune(self, now: float | None = None) -> tuple[int, int]:
        """Delete the digests and redelivery notes older than the retention, for
        the partitions this worker owns (their owners share the work)."""
        owned = sorted(p.index for p in self.parts.values() if p.epoch)
        if not owned:
            return 0, 0
        try:
            batches, redeliveries = await self.store.prune(owned, (now or time.time()) - self.retention_s,
                                                           chunk=PRUNE_CHUNK)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - housekeeping: try again next time
            self.counters["prune_failed"] += 1
            log.warning("prune_failed", worker=self.ident, error=f"{type(exc).__name__}: {exc}")
            return 0, 0
        self.counters["digests_pruned"] += batches
        self.counters["redeliveries_pruned"] += redeliveries
        self.counters["prunes"] += 1
        if batches or redeliveries:
            log.info("digests_pruned", worker=self.ident, partitions=owned, batches=batches,
                     redeliveries=redeliveries, retention_s=self.retention_s)
        return batches, redeliveries

    # -- operator commands ------------------------------------------------------------------

    async def _on_command_message(self, message: AbstractIncomingMessage) -> None:
        """Any one worker takes a command off the queue, stores it (NOTIFY),
        answers the accept, and acks; every worker then applies it."""
        try:
            if len(message.body) > MAX_COMMAND_BYTES:
                raise ValueError("command too large")
            cmd = json.loads(message.body)
            if not isinstance(cmd, dict):
                raise ValueError("command is not an object")
        except (ValueError, UnicodeDecodeError):
            self.counters["malformed_command"] += 1
            await message.ack()
            return
        await self.store.add_command(cmd)
        reply = cmd.get("reply") if isinstance(cmd.get("reply"), str) else None
        if reply and topics.is_control_reply(reply) and cmd.get("op") in ("rotate", "status"):
            body = {"id": str(cmd.get("id", ""))[:64], "accepted": cmd.get("meters") if cmd.get("op") == "rotate"
                    else None, "key": cmd.get("key"), "cluster": True}
            await self._publish([(routing_key(reply), json.dumps(body).encode())])
        await message.ack()

    def _on_notify(self, command_id: int) -> None:
        asyncio.get_running_loop().create_task(self._fetch_commands())

    async def _fetch_commands(self) -> None:
        now = time.time()
        for cid, cmd, at in await self.store.commands_since(self._last_command, now - CAMPAIGN_TTL_S):
            self._last_command = max(self._last_command, cid)
            self.commands[cid] = (cmd, at)
            for part in list(self.parts.values()):
                if not part.epoch:
                    continue
                for engine in part.engines.values():
                    self._apply(engine, cmd, now)

    def _apply(self, engine: HeadEndEngine, cmd: dict, now: float) -> None:
        op = cmd.get("op")
        if op == "rotate":
            self._apply_rotation(engine, cmd, now, not_done_since=None)
        elif op == "read" and cmd.get("meter") in engine.meters:
            engine.command(cmd, now)  # the meter's owner answers

    def _apply_rotation(self, engine: HeadEndEngine, cmd: dict, now: float, not_done_since: float | None) -> None:
        """This engine's share of a rotation; ``not_done_since``: only the
        meters whose key is older than that (a take-over resuming it)."""
        key, targets = cmd.get("key"), cmd.get("meters")
        if targets == "all":
            mine = list(engine.meters)
        elif isinstance(targets, list):
            mine = [m for m in targets if isinstance(m, str) and m in engine.meters]
        else:
            return
        if not_done_since is not None:
            mine = [m for m in mine if not self._rotated(engine, m, key, not_done_since)]
        if mine:
            engine.command({"op": "rotate", "key": key, "meters": mine, "id": str(cmd.get("id", ""))[:64]}, now)

    @staticmethod
    def _rotated(engine: HeadEndEngine, meter: str, key: Any, since: float) -> bool:
        m = engine.meters[meter]
        try:
            if key == "session":
                return m.session is not None and m.session.created >= since
            return m.key(KeyType(key)).created >= since
        except (KeyError, ValueError):
            return True
