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

Crash hooks for the chaos test (environment): ``AMI_WORKER_CRASH_AFTER_COMMIT=N``
SIGKILLs the worker after its N-th commit of consumed messages, before the
ack; ``AMI_WORKER_CRASH_BEFORE_COMMIT=N`` before that commit.
"""

from __future__ import annotations

import asyncio
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
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from ami.machines.headend import HeadEndEngine, Policy
from ami.machines.headend_records import Commit
from ami.protocol import topics
from ami.protocol.keys import KeyType
from ami.protocol.messages import Batch, encode_batch
from ami.runtime.logs import get_logger
from ami.runtime.metrics import event_payload
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
        log.info("worker_started", worker=self.ident, partitions=self.n, imported=imported, store=repr(self.store))
        attempt = self.index
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
            await listener.close()
            await self.store.close()
            self.vault.close()
        log.info("worker_stopped", worker=self.ident, **dict(self.counters))
        return 0

    def _drop_all(self) -> None:
        for part in self.parts.values():
            if part.task is not None:
                part.task.cancel()
        self.parts.clear()

    async def _session(self, url: str, stop: asyncio.Event) -> None:
        conn: AbstractRobustConnection = await aio_pika.connect(url, timeout=10)
        self.conn = conn
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
        finally:
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
        part.engines.clear()
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
        part.engines.clear()
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
        seen = await self.store.seen(digests) if group else set()
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
        for conc, engine in touched.items():
            effects = engine.drain()
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
        ids = await self.store.commit_partition(part.index, part.epoch, self.owner, commit, fresh, outbox,
                                                dict(rejected))
        self.counters["commits"] += 1
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
