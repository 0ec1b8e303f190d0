"""The head-end service: the async shell around ``HeadEndEngine``.

One loop, repeated: take every message that arrived (WAN batches, operator
commands), feed the engine, run its timers, **commit** what it produced,
then publish the downlink, replies and events.  Work that arrives while a
commit is running waits for the next round, so commits group themselves
under load (one transaction for many batches) and stay small when idle.
A round that produced only rows (nothing to publish) may leave them to the
next rounds' commit, for at most ``commit_max_delay_ms`` (50): one
transaction then covers several rounds, which costs far less per reading
(a meter's rows share pages); anything to publish commits at once, and the
latency recorded runs from the meter's seal to the end of that commit.

The store is opened as the single writer (``StoreLocked``: another head-end
runs on it; exit 3 before anything is sent).  A commit that raises
``Fenced`` (another head-end took the store over) is fatal: the frames,
replies and events drained with it are never published.

The inbox is bounded: operator commands wait in a small queue of their own,
served first; WAN messages beyond ``inbox_max`` are dropped and counted
(``inbox_dropped``).  A dropped WAN batch loses no reading: the meters keep
their load curves, and the engine asks for the missing sequence numbers
(gap-fill) when the next reading of those meters arrives; a dropped
acknowledgement or association answer is recovered by the engine's timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiomqtt
from hdrh.histogram import HdrHistogram

from ami.machines.headend import HeadEndEngine, Policy
from ami.protocol import topics
from ami.protocol.messages import Batch, encode_batch
from ami.runtime import mqtt
from ami.runtime.bus import make_fast_client, publish_all
from ami.runtime.link import run_link
from ami.runtime.logs import get_logger
from ami.runtime.metrics import Metrics, event_payload, publish_status
from ami.runtime.network import iter_factory_keys, load_network
from ami.security.signing import load_headend_signer
from ami.security.vault import open_vault
from headend.store_api import Fenced, StoreError, open_store

log = get_logger("headend")
MAX_COMMAND_BYTES = 64 * 1024
DOWNLINK_BATCH = 500  # frames per WAN downlink message
LATENCY_MAX_US = 600_000_000  # 10 minutes
COMMANDS_MAX = 1000  # operator commands waiting (their own queue: a WAN flood never drops one)
WAN_TOPICS_CACHED = 100_000  # WAN topic -> concentrator, remembered (cleared beyond)
_UNSEEN = object()
EXIT_STORE_REFUSED = 3  # another head-end holds (or took over) the store
COMMIT_MAX_DELAY_MS = 50.0  # [headend] commit_max_delay_ms: rows wait at most this long for their commit
PERCENTILES = (50, 90, 99, 99.9)  # latency_ms of the metrics
COMMIT_MAX_READINGS = 20_000  # [headend] commit_max_readings: ...or until this many readings wait


def record_many(histogram: HdrHistogram, values: list[int]) -> None:
    """``histogram.record_value(v)`` for each of ``values`` (ints within the
    histogram's range), at a fraction of its cost (~4 us a call: three method
    calls and two int() per value).  Same bucket arithmetic as hdrh's
    ``_counts_index_for`` (``64 - clz(v | mask)`` is ``(v | mask).bit_length()``);
    tests/test_headend_hotpath.py checks it against record_value."""
    counts = histogram.counts
    unit = histogram.unit_magnitude
    shift = unit + histogram.sub_bucket_half_count_magnitude + 1
    half_mag = histogram.sub_bucket_half_count_magnitude
    half = histogram.sub_bucket_half_count
    mask = histogram.sub_bucket_mask
    for v in values:
        bucket = (v | mask).bit_length() - shift
        counts[((bucket + 1) << half_mag) + (v >> (bucket + unit)) - half] += 1
    histogram.total_count += len(values)
    lo, hi = min(values), max(values)
    if lo < histogram.min_value:
        histogram.min_value = lo
    if hi > histogram.max_value:
        histogram.max_value = hi


class Inbox:
    """The bounded inbox: operator commands in a queue of their own (at most
    ``commands_max``), served first, so a WAN flood never drops one; WAN
    messages beyond ``wan_max`` messages or ``wan_max_bytes`` payload bytes
    are dropped at the tail and counted.  The bound in bytes is the one that
    matters under load: a relay batch holds 1 to 200 frames, and what waits
    here is latency (10,000 batches of 50 readings were 40 s of work).  The
    readings of a dropped WAN batch stay in the meters' load curves and come
    back by gap-fill."""

    def __init__(self, wan_max: int, commands_max: int = COMMANDS_MAX, wan_max_bytes: int = 0) -> None:
        self.wan: deque[Any] = deque()
        self.commands: deque[Any] = deque()
        self.wan_max = max(1, int(wan_max))
        self.wan_max_bytes = int(wan_max_bytes)  # 0: no bound in bytes
        self.wan_bytes = 0
        self.commands_max = commands_max
        self.dropped = 0  # WAN messages
        self.commands_dropped = 0

    def put(self, item: Any, *, command: bool) -> bool:
        if command:
            if len(self.commands) >= self.commands_max:
                self.commands_dropped += 1
                return False
            self.commands.append(item)
            return True
        size = _payload_size(item)
        if len(self.wan) >= self.wan_max or (
            self.wan_max_bytes and self.wan and self.wan_bytes + size > self.wan_max_bytes
        ):
            self.dropped += 1
            return False
        self.wan.append(item)
        self.wan_bytes += size
        return True

    def pop(self) -> Any:
        if self.commands:
            return self.commands.popleft()
        item = self.wan.popleft()
        self.wan_bytes -= _payload_size(item)
        return item

    def __len__(self) -> int:
        return len(self.commands) + len(self.wan)


def _payload_size(item: Any) -> int:
    payload = getattr(item, "payload", None)
    return len(payload) if isinstance(payload, (bytes, bytearray)) else 0


class HeadEndService:
    def __init__(self, config: dict[str, Any], broker: str, data_dir: Path, ident: str = "headend") -> None:
        self.config = config
        self.hcfg = dict(config.get("headend", {}))
        self.broker = broker
        self.data_dir = Path(data_dir)
        self.ident = ident
        self.qos = int(config.get("bus", {}).get("qos", 1))
        self.metrics = Metrics("headend", ident)
        self.latency_total = HdrHistogram(1, LATENCY_MAX_US, 3)
        self.latency_interval = HdrHistogram(1, LATENCY_MAX_US, 3)
        self._inbox = Inbox(int(self.hcfg.get("inbox_max", 10000)),
                            wan_max_bytes=int(self.hcfg.get("inbox_max_bytes", 2_000_000)))
        self._wakeup = asyncio.Event()
        self._downlink_seq = 0
        self._tick_interval = float(self.hcfg.get("commit_interval_ms", 200)) / 1000
        self._round_max = int(self.hcfg.get("round_max_messages", 2000))  # WAN messages per round
        # ...and frames per round: a relay batch carries 1 to 200 frames, so a
        # bound in messages alone let one round run for seconds (2,000 batches
        # of 50 readings), with no PUBACK, no metrics and one huge commit.
        self._round_max_frames = int(self.hcfg.get("round_max_frames", 5000))
        self._last_tick = 0.0
        # Rows only (nothing to publish) may gather over rounds for at most
        # this long, or this many readings, before their commit.
        self._commit_max_delay = float(self.hcfg.get("commit_max_delay_ms", COMMIT_MAX_DELAY_MS)) / 1000
        self._commit_max_readings = int(self.hcfg.get("commit_max_readings", COMMIT_MAX_READINGS))
        self._last_commit = 0.0
        self._held_rounds: list[tuple[int, float]] = []  # (latency samples so far, round time) of rounds not committed
        self._wan_of: dict[str, str | None] = {}
        self.ready = asyncio.Event()

    async def start_engine(self) -> None:
        t0 = time.perf_counter()
        network = load_network(self.data_dir)
        self.vault = open_vault(self.hcfg.get("vault", "file:headend.kek"), data_dir=self.data_dir)
        self.store = open_store(self.hcfg.get("store", "sqlite:headend.db"), self.vault, self.data_dir)
        await self.store.open(writer=True)  # StoreLocked if another head-end runs on it
        imported = await self.store.import_factory(iter_factory_keys(self.data_dir), time.time())
        snapshot = await self.store.load()
        signer = load_headend_signer(self.vault, self.data_dir)  # suite 1 only
        self.engine = HeadEndEngine(
            network.headend_title, Policy.from_config(self.hcfg), lambda: secrets.token_bytes(16), signer
        )
        self.engine.load(snapshot, time.time())
        sessions = len(snapshot.sessions)
        del snapshot  # its unwrapped keys: referenced by the engine only from here on
        # Every meter's state is long-lived: keep the cyclic GC from scanning
        # it again at each full collection (as the fleet does).
        gc.collect()
        gc.freeze()
        self.metrics.gauges["cold_start_s"] = round(time.perf_counter() - t0, 3)
        log.info(
            "headend_loaded",
            meters=len(self.engine.meters),
            imported=imported,
            sessions=sessions,
            cold_start_s=self.metrics.gauges["cold_start_s"],
            store=repr(self.store),
            vault=self.vault.name,
        )

    async def run(self, stop: asyncio.Event) -> int:
        try:
            await self.start_engine()
        except StoreError as exc:  # StoreLocked: another head-end runs on it; a store refused
            log.error("headend_store_refused", kind=type(exc).__name__, error=str(exc))
            await self.store.close()
            self.vault.close()
            return EXIT_STORE_REFUSED
        try:
            return await self._run(stop)
        except Fenced as exc:
            # Another head-end took the store over: stop at once, publish nothing more.
            log.error("headend_fenced", error=str(exc))
            return EXIT_STORE_REFUSED

    async def _run(self, stop: asyncio.Event) -> int:
        status = topics.monitor_status("headend", self.ident)

        def connect() -> mqtt.Client:
            # The hot path's client (ami.runtime.mqtt): a fraction of aiomqtt's CPU per message.
            return make_fast_client(
                self.broker, user="headend", data_dir=self.data_dir, identifier=f"ami-headend-{self.ident}",
                status_topic=status,
            )

        try:
            # Reconnects when the bus drops (never once stopping): the engine
            # keeps its state; what was in flight is recovered by timeouts,
            # retries and gap-fill.
            await run_link(connect, lambda client: self._session(client, stop), stop=stop, metrics=self.metrics,
                           name="headend")
        finally:
            await self.store.close()
            self.vault.close()
        log.info("headend_stopped", **{k: v for k, v in self.engine.counters.items() if k.startswith("readings")})
        return 0

    async def _session(self, client: mqtt.Client, stop: asyncio.Event) -> None:
        """One connection's life: subscribe, serve until stopped or disconnected."""
        client.on_message = self._on_message
        await client.subscribe(topics.WAN_UP_FILTER, qos=self.qos)
        await client.subscribe(topics.HEADEND_COMMANDS, qos=self.qos)
        await publish_status(client, self.metrics, "online")
        tasks = [
            asyncio.create_task(self._read(client)),
            asyncio.create_task(self._metrics_loop(client)),
            asyncio.create_task(self._loop(client, stop)),
        ]
        self.ready.set()
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                if stop.is_set() and isinstance(task.exception(), aiomqtt.MqttError):
                    continue  # the bus went first while stopping: still commit what arrived
                raise task.exception()
        try:
            # Bounded: honcho kills 5 s after SIGTERM, and the broker may
            # already be gone.  The commit inside _round comes first anyway.
            async with asyncio.timeout(2.0):
                await self._round(client, time.time(), flush=True)  # flush what is left
                await client.publish(
                    topics.monitor_metrics("headend", self.ident), json.dumps(self._snapshot()).encode(),
                    qos=1, retain=True,
                )
                await publish_status(client, self.metrics, "offline")
        except (TimeoutError, aiomqtt.MqttError) as exc:
            # Only when stopping: expected if the broker stopped first.
            log.info("final publish incomplete", error=str(exc) or type(exc).__name__)

    async def _read(self, client: mqtt.Client) -> None:
        await client.wait_disconnected()  # messages arrive through _on_message

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._inbox.put(mqtt.Message(topic, payload, 1, False), command=topic == topics.HEADEND_COMMANDS):
            self._wakeup.set()

    def _enqueue(self, message: Any) -> None:
        if self._inbox.put(message, command=message.topic.matches(topics.HEADEND_COMMANDS)):
            self._wakeup.set()

    async def _loop(self, client: mqtt.Client, stop: asyncio.Event) -> None:
        tick = float(self.hcfg.get("commit_interval_ms", 200)) / 1000
        # Rounds at most this often: what arrives meanwhile joins the next round,
        # so one engine pass and one commit serve many WAN batches (CPU per
        # frame falls as load rises, instead of one commit per small batch).
        gap = float(self.hcfg.get("round_min_interval_ms", 20)) / 1000
        loop = asyncio.get_running_loop()
        last = 0.0
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if not self._inbox:
                    # Idle: wake for the timers, or sooner when rows held back
                    # by commit_max_delay_ms are due for their commit.
                    timeout = tick
                    if self._held_rounds:
                        timeout = min(tick, max(0.0, self._last_commit + self._commit_max_delay - time.time()))
                    waiter = asyncio.create_task(self._wakeup.wait())
                    await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                if (wait := last + gap - loop.time()) > 0 and not stop.is_set():
                    await asyncio.sleep(wait)
                last = loop.time()
                self._wakeup.clear()
                await self._round(client, time.time())
        finally:
            stopper.cancel()
        await self._linger(client)

    async def _linger(self, client: mqtt.Client) -> None:
        """Stopping: keep taking what the relays flush, until the bus has been
        quiet for ``stop_quiet_s``, at most ``stop_linger_s``.

        Under honcho every process gets SIGTERM at once, and the relays then
        forward their open batches: without this the head-end would stop
        reading first and those readings would wait in the meters' load
        curves for a gap-fill after the next start.  So the head-end stops
        after the relays, as an ordered stop would have it.  (If the broker
        went first, ``_read`` fails and the session ends this at once.)
        """
        quiet = float(self.hcfg.get("stop_quiet_s", 0.3))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.hcfg.get("stop_linger_s", 1.5))
        while (left := deadline - loop.time()) > 0:
            if not self._inbox:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), min(quiet, left))
                except TimeoutError:
                    return  # quiet: nothing more is coming
            await self._round(client, time.time())

    async def _round(self, client: mqtt.Client, now: float, *, flush: bool = False) -> None:
        engine = self.engine
        handled = 0
        inbox = self._inbox
        wan_of = self._wan_of
        counters = engine.counters
        frames_end = counters.get("frames_up", 0) + self._round_max_frames
        while inbox and handled < self._round_max and counters.get("frames_up", 0) < frames_end:
            message = inbox.pop()
            handled += 1
            payload = message.payload
            if type(payload) is not bytes:
                if isinstance(payload, (bytes, bytearray)):
                    payload = bytes(payload)
                else:
                    payload = b"" if payload is None else str(payload).encode()
            topic = message.topic.value
            if topic == topics.HEADEND_COMMANDS:
                self._command(payload, now)
                continue
            concentrator = wan_of.get(topic, _UNSEEN)
            if concentrator is _UNSEEN:
                wan = topics.parse_wan(topic)
                concentrator = wan[0] if wan else None
                if len(wan_of) >= WAN_TOPICS_CACHED:
                    wan_of.clear()
                wan_of[topic] = concentrator
            engine.handle_batch(payload, now, concentrator)
        # Timers at most every commit interval: under load rounds come back
        # to back, and the timers need no finer grain.
        if now - self._last_tick >= self._tick_interval:
            engine.tick(now)
            self._last_tick = now
        if (
            not flush
            and not engine.publish_pending
            and now - self._last_commit < self._commit_max_delay
            and engine.readings_pending < self._commit_max_readings
        ):
            # Only rows to commit, and the last commit is recent: let them
            # gather (one transaction for several rounds costs far less per
            # reading: every meter's rows share pages).  Nothing waits to be
            # published, so nothing is held back by this; the latency of
            # these readings runs until their commit (recorded below).
            self._held_rounds.append((engine.latencies_pending, now))
            return
        effects = engine.drain()
        t0 = time.perf_counter()
        await self.store.commit(effects.commit)  # durable BEFORE anything leaves
        done = time.time()
        self._last_commit = now
        self.metrics.gauges["last_commit_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        if effects.latencies_ns:
            self._record_latencies(effects.latencies_ns, now, done)
        self._held_rounds.clear()
        out: list[tuple[str, bytes]] = []
        for concentrator, frames in effects.downlink.items():
            for i in range(0, len(frames), DOWNLINK_BATCH):
                self._downlink_seq += 1
                batch = Batch(concentrator, self._downlink_seq, tuple(frames[i : i + DOWNLINK_BATCH]))
                out.append((topics.wan_down(concentrator), encode_batch(batch)))
        for topic, body in effects.replies:
            out.append((topic, json.dumps(body).encode()))
        for event in effects.events:
            out.append((topics.HEADEND_EVENTS, event_payload(event.pop("kind"), **event)))
        if out:
            await publish_all(client, out, qos=self.qos)

    def _record_latencies(self, latencies_ns: list[int], now: float, done: float) -> None:
        """Meter seal -> durable commit: the engine measured up to the round
        that handled each reading; add the wait from that round to the end of
        the commit (rounds held back by ``commit_max_delay_ms`` included)."""
        start = 0
        for end, handled_at in (*self._held_rounds, (len(latencies_ns), now)):
            wait_ns = max(0, int((done - handled_at) * 1e9))
            segment = latencies_ns[start:end]
            start = end
            if segment:
                values = [max(1, min((ns + wait_ns) // 1000, LATENCY_MAX_US)) for ns in segment]
                record_many(self.latency_total, values)
                record_many(self.latency_interval, values)

    def _command(self, payload: bytes, now: float) -> None:
        try:
            if len(payload) > MAX_COMMAND_BYTES:
                raise ValueError("command too large")
            cmd = json.loads(payload)
            if not isinstance(cmd, dict):
                raise ValueError("command is not an object")
        except (ValueError, UnicodeDecodeError):
            self.engine.rejected["malformed_command"] += 1
            return
        self.engine.command(cmd, now)

    def _snapshot(self) -> dict[str, Any]:
        engine = self.engine
        m = self.metrics
        m.counters.clear()
        m.counters.update(engine.counters)
        m.counters.update(inbox_dropped=self._inbox.dropped, commands_dropped=self._inbox.commands_dropped)
        m.rejected.update({k: 0 for k in m.rejected})
        for reason, n in engine.rejected.items():
            m.rejected[reason] = n
        m.gauges.update(
            meters=len(engine.meters),
            sessions=sum(1 for x in engine.meters.values() if x.session is not None),
            pending=engine.meters_pending,
            meters_with_gaps=engine.meters_with_gaps,
            gap_fill_in_flight=engine.gap_fill_in_flight,
            association_window=engine.association_window,
            inbox=len(self._inbox.wan),
            commands_waiting=len(self._inbox.commands),
        )
        snap = m.snapshot()
        total, interval = self.latency_total, self.latency_interval
        # One pass over the counts for the four percentiles (each
        # get_value_at_percentile walks the 21,504 buckets in Python).
        at = total.get_percentile_to_value_dict(PERCENTILES) if total.get_total_count() else {}
        snap["latency_ms"] = {
            "count": total.get_total_count(),
            **{f"p{p}": at.get(p, 0) / 1000 for p in PERCENTILES},
            "max": total.get_max_value() / 1000,
            "interval_count": interval.get_total_count(),
            "interval_p99": (interval.get_value_at_percentile(99) if interval.get_total_count() else 0) / 1000,
            # HDR-encoded interval histogram, for load tests to merge exactly.
            "interval_hdr": base64.b64encode(interval.encode()).decode() if interval.get_total_count() else "",
        }
        interval.reset()
        return snap

    async def _metrics_loop(self, client: mqtt.Client) -> None:
        interval = float(self.config.get("monitor", {}).get("metrics_interval_s", 2.0))
        topic = topics.monitor_metrics("headend", self.ident)
        while True:
            await asyncio.sleep(interval)
            await client.publish(topic, json.dumps(self._snapshot()).encode(), qos=0, retain=True)
