"""Blind concentrator relays, many per process.

A relay forwards bytes it cannot read: PLC uplink frames are appended to a
batch as (meter-from-topic, payload UNCHANGED) and sent on the WAN topic;
WAN downlink batches are split and each frame published unchanged on the
meter's PLC topic.  It holds no key, and this module imports nothing that
can decrypt (no cipher, no channel, no ``cryptography``, no vault, no
head-end or meter code): tests/test_concentrator.py checks ``sys.modules``.

Hostile input is bounded and counted, never fatal: a WAN message that is not
a batch, is too big, or names another concentrator is dropped whole; a frame
in it for a meter not on this segment, or larger than MAX_APDU_SIZE, is
dropped alone.  A PLC uplink frame larger than MAX_APDU_SIZE is dropped
(documented limit: no meter may emit one, docs/topics.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ami.protocol import topics
from ami.protocol.errors import MalformedMessage
from ami.protocol.frames import MAX_APDU_SIZE  # the frame codec needs no crypto
from ami.protocol.messages import MAX_BATCH_BYTES, MAX_BATCH_FRAMES, VERSION, decode_batch
from ami.runtime import mqtt
from ami.runtime.budget import TokenBucket
from ami.runtime.bus import make_fast_client
from ami.runtime.link import run_link
from ami.runtime.logs import get_logger
from ami.runtime.metrics import Metrics, run_monitor
from ami.runtime.network import load_network
from ami.runtime.sharding import select

log = get_logger("concentrator")

#: msgpack bytes a frame adds to a batch besides its payload and meter id
#: (array header, str header, bin32 header, generously).
_ITEM_OVERHEAD = 1 + 2 + 5
#: Room for the batch's own header (version, concentrator id, seq, array32 header).
_BATCH_HEADROOM = 256
#: APDU tags of the association, AARQ 0x60 and AARE 0x61 (ami.protocol.association,
#: not imported: it ciphers).  Not secret: the relay may tell associations from data.
_AARQ, _AARE = b"\x60", b"\x61"
_METER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(slots=True)
class RelaySettings:
    broker: str
    data_dir: Path
    concentrators: list[str] | None = None
    shard: tuple[int, int] | None = None
    ident: str | None = None
    qos: int = 1
    batch_max_frames: int = 200
    batch_max_delay_ms: float = 50.0
    metrics_interval_s: float = 2.0
    window: int = 256  # publishes in flight per relay connection
    max_queue: int = 2_000  # messages queued per relay (past the window); beyond, shed and counted
    connect_concurrency: int = 50
    drain_timeout_s: float = 5.0
    control_budget_per_s: float = 100.0  # AARQ/AARE frames per second per relay (0: unlimited)

    @classmethod
    def from_config(cls, config: dict, **overrides: Any) -> RelaySettings:
        conc = dict(config.get("concentrator", {}))
        bus = dict(config.get("bus", {}))
        base: dict[str, Any] = {
            "broker": bus.get("broker", "mqtt://127.0.0.1:1884"),
            "data_dir": Path(config.get("data", {}).get("dir", "data")),
            "qos": int(bus.get("qos", 1)),
            "metrics_interval_s": float(config.get("monitor", {}).get("metrics_interval_s", 2.0)),
        }
        for name in ("batch_max_frames", "batch_max_delay_ms", "window", "max_queue", "connect_concurrency",
                     "drain_timeout_s", "control_budget_per_s"):
            if name in conc:
                base[name] = conc[name]
        base.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**base)
        if not 1 <= settings.batch_max_frames <= MAX_BATCH_FRAMES:
            raise ValueError(f"batch_max_frames must be 1..{MAX_BATCH_FRAMES}")
        return settings


class FlushScheduler:
    """The time flushes of every relay of a process, on one timer.

    A relay that opens a batch registers it with its due time (now +
    ``batch_max_delay_ms``); the delay is the same for every relay of the
    process, so the registrations arrive in due order and a deque holds them.
    One loop timer is armed for the earliest; when it fires it flushes every
    batch due within ``slack`` from then, and re-arms for the next.  A batch
    therefore leaves at most ``batch_max_delay_ms`` after it opened (never
    later, at most ``slack`` earlier), and the process arms a few hundred
    timers a second instead of one ``call_later`` per batch.  A registration
    whose batch left earlier (count, size or AARE flush) is skipped: the
    relay's ``_due`` no longer matches.
    """

    __slots__ = ("delay", "slack", "due", "timer", "loop")

    def __init__(self, delay_s: float, slack_s: float | None = None) -> None:
        self.delay = max(0.0, delay_s)
        # Up to a tenth of the delay early, at most 5 ms, at least 1 ms (the
        # loop's timer resolution, uvloop's is 1 ms).
        self.slack = slack_s if slack_s is not None else max(0.001, min(self.delay / 10, 0.005))
        self.due: deque[tuple[float, Relay]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, relay: Relay) -> float:
        """Register ``relay``'s newly opened batch; return its due time."""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # first use, or a new loop: the old one's timer is gone
            self.loop, self.timer = loop, None
            self.due.clear()
        due = loop.time() + self.delay
        self.due.append((due, relay))
        if self.timer is None:
            self.timer = loop.call_at(due, self._fire)
        return due

    def _fire(self) -> None:
        self.timer = None
        queue = self.due
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.slack
        while queue:
            due, relay = queue[0]
            if due > limit:
                self.timer = loop.call_at(due, self._fire)
                return
            queue.popleft()
            if relay._due == due:
                relay.flush()


#: One packer for every batch (msgpack.packb builds a Packer per call); bytes
#: identical to ``ami.protocol.messages.encode_batch`` (tests/test_relay_hotpath.py).
_packer = msgpack.Packer(use_bin_type=True)
_BATCH_LIMIT = MAX_BATCH_BYTES - _BATCH_HEADROOM


class Relay:
    """One concentrator: its connection, its open uplink batch, its send queue."""

    def __init__(
        self,
        concentrator: str,
        meters: Iterable[str] | None,
        client: mqtt.Client,
        settings: RelaySettings,
        metrics: Metrics,
        scheduler: FlushScheduler | None = None,
    ) -> None:
        self.concentrator = concentrator
        self.meters = frozenset(meters) if meters is not None else None
        self.client = client
        self.s = settings
        self.metrics = metrics
        self.up = False
        self.batch: list[tuple[str, bytes]] = []  # (meter, frame), packed as they are
        self.batch_bytes = 0
        # Monotonic across restarts of the relay process (a hint for the
        # head-end's logs; it never relies on it for security).
        self.seq = time.time_ns() // 1_000_000
        self.scheduler = scheduler if scheduler is not None else FlushScheduler(settings.batch_max_delay_ms / 1000.0)
        self._due = 0.0  # due time of the open batch's time flush, 0.0: none registered
        self.outq: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._control = TokenBucket(settings.control_budget_per_s)
        self.inflight = 0
        self._wan_up = topics.wan_up(concentrator)
        self._wan_down = topics.wan_down(concentrator)
        # A batch's map up to the value of "n": fixmap of 4, "v": VERSION, "c": concentrator, "n".
        self._batch_head = b"\x84" + _packer.pack({"v": VERSION, "c": concentrator})[1:] + b"\xa1n"
        # The segment's PLC uplink topics, prebuilt: one dict lookup per frame
        # names the meter and checks it belongs here (no parse, no set).
        self._up_topics: dict[str, str] = {}
        self._down_topics: dict[str, str] = {}
        if self.meters is not None:
            for m in self.meters:
                if _METER_ID.fullmatch(m):
                    self._up_topics[topics.plc_up(concentrator, m)] = m
                    self._down_topics[m] = topics.plc_down(concentrator, m)
        self._max_frames = settings.batch_max_frames
        self._window = settings.window
        self._max_queue = settings.max_queue
        # Association frames may exceed max_queue by this much: shedding them
        # costs a head-end timeout, and their own budget already bounds them.
        self._control_reserve = max(16, settings.max_queue // 10)

    def __repr__(self) -> str:
        return f"<Relay {self.concentrator} batch={len(self.batch)} queued={len(self.outq)}>"

    # --- intake -------------------------------------------------------------------

    def on_message(self, topic: str, payload: Any) -> None:
        meter = self._up_topics.get(topic)
        if meter is None or type(payload) is not bytes or payload[:1] == _AARE:
            self._on_message_slow(topic, payload, meter)
            return
        # The hot path: a reading frame from a meter of this segment.
        size = len(payload)
        if size > MAX_APDU_SIZE:
            self.metrics.reject("oversized_frame")
            return
        batch = self.batch
        size += len(meter) + _ITEM_OVERHEAD
        if batch:
            if self.batch_bytes + size > _BATCH_LIMIT:
                self.flush()
                batch = self.batch
        batch.append((meter, payload))
        if len(batch) == 1:
            self.batch_bytes = size
            if self._max_frames > 1:
                self._due = self.scheduler.add(self)
                return
        else:
            self.batch_bytes += size
        if len(batch) >= self._max_frames:
            self.flush()

    def _on_message_slow(self, topic: str, payload: Any, meter: str | None) -> None:
        if meter is None:
            if topic == self._wan_down:
                self.on_wan_down(payload)
                return
            parsed = topics.parse_plc_up(topic)
            if parsed is None or parsed[0] != self.concentrator:
                self.metrics.reject("unexpected_topic")
                return
            meter = parsed[1]
        self.on_plc_up(meter, payload)

    def on_plc_up(self, meter: str, payload: Any) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            self.metrics.reject("malformed_frame")
            return
        if len(payload) > MAX_APDU_SIZE:
            self.metrics.reject("oversized_frame")
            return
        if self.meters is not None and meter not in self.meters:
            self.metrics.reject("unknown_meter")
            return
        control = payload[:1] == _AARE
        if control:
            # An association answer (the APDU tag is not secret): bounded, and
            # never left waiting for the batch delay (the head-end's association
            # timeout is running).  Order is kept: the open batch goes with it.
            if not self._control.take():
                self.metrics.incr("control_shed")  # the head-end retransmits its AARQ
                return
            self.metrics.incr("control_up")
        size = len(payload) + len(meter) + _ITEM_OVERHEAD
        if self.batch and self.batch_bytes + size > _BATCH_LIMIT:
            self.flush()
        self.batch.append((meter, payload if type(payload) is bytes else bytes(payload)))
        self.batch_bytes += size
        if control or len(self.batch) >= self._max_frames:
            self.flush(control)
        elif len(self.batch) == 1:
            self._due = self.scheduler.add(self)

    def flush(self, control: bool = False) -> None:
        """Close the open batch and queue it for the WAN (count, size, AARE or time flush)."""
        self._due = 0.0
        frames = self.batch
        if not frames:
            return
        self.batch, self.batch_bytes = [], 0
        self.seq += 1
        counters = self.metrics.counters
        counters["frames_up"] += len(frames)
        counters["batches_up"] += 1
        # encode_batch's bytes ({"v", "c", "n", "f"}), without its Batch, tuples,
        # per-call Packer, and with the constant head packed once.
        pack = _packer.pack
        self._enqueue(self._wan_up, b"".join((self._batch_head, pack(self.seq), b"\xa1f", pack(frames))), len(frames),
                      control)

    def on_wan_down(self, payload: Any) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            self.metrics.reject("malformed_message")
            return
        try:
            batch = decode_batch(payload if type(payload) is bytes else bytes(payload))  # bounded
        except MalformedMessage as exc:
            self.metrics.reject(exc.reason)
            return
        if batch.concentrator != self.concentrator:
            self.metrics.reject("wrong_segment")
            return
        self.metrics.incr("batches_down")
        for meter, frame in batch.frames:
            if self.meters is not None:
                topic = self._down_topics.get(meter)
                if topic is None:
                    self.metrics.reject("unknown_meter")
                    continue
            elif not _METER_ID.fullmatch(meter):
                self.metrics.reject("unknown_meter")
                continue
            else:
                topic = topics.plc_down(self.concentrator, meter)
            if len(frame) > MAX_APDU_SIZE:
                self.metrics.reject("oversized_frame")
                continue
            if frame[:1] == _AARQ:
                if not self._control.take():
                    self.metrics.incr("control_shed")  # the head-end retransmits it after its timeout
                    continue
                self.metrics.incr("control_down")
            self._enqueue(topic, frame, 1, frame[:1] == _AARQ)
            self.metrics.incr("frames_down")

    # --- output -----------------------------------------------------------------------

    def _enqueue(self, topic: str, payload: bytes, frames: int = 1, control: bool = False) -> None:
        outq = self.outq
        if not outq and self.up and self.inflight < self._window:
            # Nothing waiting and room in the window: publish now (what the
            # sender would do next), without waking it.
            self.inflight += 1
            try:
                self.client.publish_nowait(topic, payload, self.s.qos, self._done)
            except mqtt.MqttError:
                self._done(mqtt.MqttError("not connected"))
            return
        if len(outq) >= self._max_queue and (not control or len(outq) >= self._max_queue + self._control_reserve):
            # The broker acknowledges slower than the segment produces.  Shed
            # here, counted, instead of pausing the connection: its PUBACKs
            # arrive on that same connection, so a paused relay could never
            # see its window drain (it stalled until the keep-alive timeout).
            # Readings wait in the meters' load curves for gap-fill; the
            # head-end retransmits a shed AARQ and re-asks a shed gap-fill.
            counters = self.metrics.counters
            counters["queue_shed"] += 1
            counters["queue_shed_frames"] += frames
            return
        outq.append((topic, payload))
        self._wake.set()

    def _done(self, error: BaseException | None) -> None:
        """A publish's PUBACK (``None``) or its loss."""
        self.metrics.counters["publish_failed" if error is not None else "messages_sent"] += 1
        self.inflight -= 1
        if self.outq and self.inflight == self._window - 1:
            self._wake.set()

    async def _sender(self) -> None:
        """Publish the queue in order, up to ``window`` QoS 1 acks outstanding."""
        outq, client, qos, window = self.outq, self.client, self.s.qos, self._window
        done = self._done

        while True:
            if not outq or self.inflight >= window:
                self._wake.clear()
                await self._wake.wait()
                continue
            while outq and self.inflight < window:
                topic, payload = outq.popleft()
                self.inflight += 1
                try:
                    client.publish_nowait(topic, payload, qos, done)
                except mqtt.MqttError:
                    done(mqtt.MqttError("not connected"))
            await asyncio.sleep(0)

    # --- connection ----------------------------------------------------------------------

    async def run(self, gate: asyncio.Semaphore, stop: asyncio.Event) -> None:
        """Connect (at most ``gate`` connections opening at once), subscribe,
        relay until cancelled; reconnect with backoff when the broker drops
        us, but never once ``stop`` is set (ami.runtime.link)."""
        await run_link(self.client, self._session, stop=stop, metrics=self.metrics,
                       name=f"relay {self.concentrator}", gate=gate)

    async def _session(self, client: mqtt.Client) -> None:
        sender: asyncio.Task | None = None
        try:
            client.on_message = self.on_message
            await client.subscribe(topics.plc_up_filter(self.concentrator), qos=self.s.qos)
            await client.subscribe(self._wan_down, qos=self.s.qos)
            sender = asyncio.create_task(self._sender())
            self.up = True
            await client.wait_disconnected()
        finally:
            self.up = False
            if sender is not None:
                sender.cancel()

    @property
    def idle(self) -> bool:
        return not self.batch and not self.outq and self.inflight == 0


class RelayProcess:
    """Every relay of this process plus the process-level monitor connection."""

    def __init__(self, settings: RelaySettings) -> None:
        self.s = settings
        network = load_network(settings.data_dir)
        chosen = select(network.concentrators, settings.concentrators, settings.shard)
        if settings.ident:
            self.ident = settings.ident
        elif settings.concentrators:
            self.ident = "-".join(chosen) if len(chosen) <= 3 else f"{chosen[0]}-{chosen[-1]}-{len(chosen)}"
        elif settings.shard:
            self.ident = f"shard-{settings.shard[0]}-of-{settings.shard[1]}"
        else:
            self.ident = "relays"
        self.metrics = Metrics("concentrator", self.ident)
        self.chosen = chosen
        self.segments = {c: network.segments[c] for c in chosen}
        self.relays: list[Relay] = []

    def build(self) -> None:
        """Create the relays (aiomqtt clients need the running loop)."""
        s = self.s
        self.relays = []
        # One timer for every relay's time flushes (not one call_later per batch).
        scheduler = FlushScheduler(s.batch_max_delay_ms / 1000.0)
        for c in self.chosen:
            # The hot path's client (ami.runtime.mqtt): a fraction of aiomqtt's CPU per message.
            client = make_fast_client(s.broker, user=f"relay-{c}", data_dir=s.data_dir)
            self.relays.append(Relay(c, self.segments[c], client, s, self.metrics, scheduler))

    def refresh(self) -> None:
        self.metrics.gauges.update(
            relays=len(self.relays),
            relays_up=sum(1 for r in self.relays if r.up),
            queue_depth=sum(len(r.outq) for r in self.relays),
            open_batch_frames=sum(len(r.batch) for r in self.relays),
            publish_inflight=sum(r.inflight for r in self.relays),
        )

    async def run(self, stop: asyncio.Event) -> int:
        """Relay until ``stop`` (SIGTERM); then forward the open batches, let
        the queues drain, publish ``offline`` and return 0."""
        s = self.s
        if not self.relays:
            self.build()
        monitor_done = asyncio.Event()
        monitor = asyncio.create_task(
            run_monitor(s.broker, "concentrator", s.data_dir, self.metrics, s.metrics_interval_s, self.refresh,
                        monitor_done, stop=stop)
        )
        gate = asyncio.Semaphore(s.connect_concurrency)
        tasks = [asyncio.create_task(r.run(gate, stop)) for r in self.relays]
        log.info("relays started", ident=self.ident, relays=len(self.relays))
        try:
            await stop.wait()
            for relay in self.relays:
                relay.flush()
            deadline = time.monotonic() + s.drain_timeout_s
            while time.monotonic() < deadline and not all(r.idle or not r.up for r in self.relays):
                await asyncio.sleep(0.02)
        finally:
            for task in tasks:
                task.cancel()
            # Bounded: honcho kills a process 5 s after SIGTERM, and a broker
            # that stopped first must not hold us up.
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            monitor_done.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(monitor, 1.5)
        log.info("relays stopped", ident=self.ident, **dict(self.metrics.counters))
        return 0
