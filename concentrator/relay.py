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

from ami.protocol import topics
from ami.protocol.errors import MalformedMessage
from ami.protocol.frames import MAX_APDU_SIZE  # the frame codec needs no crypto
from ami.protocol.messages import MAX_BATCH_BYTES, MAX_BATCH_FRAMES, Batch, decode_batch, encode_batch
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
    max_queue: int = 10_000  # messages queued per relay before its intake waits
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


class Relay:
    """One concentrator: its connection, its open uplink batch, its send queue."""

    def __init__(
        self,
        concentrator: str,
        meters: Iterable[str] | None,
        client: mqtt.Client,
        settings: RelaySettings,
        metrics: Metrics,
    ) -> None:
        self.concentrator = concentrator
        self.meters = frozenset(meters) if meters is not None else None
        self.client = client
        self.s = settings
        self.metrics = metrics
        self.up = False
        self.batch: list[tuple[str, bytes]] = []
        self.batch_bytes = 0
        # Monotonic across restarts of the relay process (a hint for the
        # head-end's logs; it never relies on it for security).
        self.seq = time.time_ns() // 1_000_000
        self._timer: asyncio.TimerHandle | None = None
        self.outq: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._paused = False
        self._control = TokenBucket(settings.control_budget_per_s)
        self.inflight = 0
        self._wan_up = topics.wan_up(concentrator)
        self._wan_down = topics.wan_down(concentrator)

    def __repr__(self) -> str:
        return f"<Relay {self.concentrator} batch={len(self.batch)} queued={len(self.outq)}>"

    # --- intake -------------------------------------------------------------------

    def on_message(self, topic: str, payload: Any) -> None:
        if topic == self._wan_down:
            self.on_wan_down(payload)
            return
        parsed = topics.parse_plc_up(topic)
        if parsed is None or parsed[0] != self.concentrator:
            self.metrics.reject("unexpected_topic")
            return
        self.on_plc_up(parsed[1], payload)

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
        if self.batch and self.batch_bytes + size > MAX_BATCH_BYTES - _BATCH_HEADROOM:
            self.flush()
        self.batch.append((meter, bytes(payload)))
        self.batch_bytes += size
        self.metrics.incr("frames_up")
        if control or len(self.batch) >= self.s.batch_max_frames:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.s.batch_max_delay_ms / 1000.0, self.flush)

    def flush(self) -> None:
        """Close the open batch and queue it for the WAN (count or time flush)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.batch:
            return
        frames, self.batch, self.batch_bytes = tuple(self.batch), [], 0
        self.seq += 1
        self._enqueue(self._wan_up, encode_batch(Batch(self.concentrator, self.seq, frames)))
        self.metrics.incr("batches_up")

    def on_wan_down(self, payload: Any) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            self.metrics.reject("malformed_message")
            return
        try:
            batch = decode_batch(bytes(payload))  # bounded: size, item count, lengths
        except MalformedMessage as exc:
            self.metrics.reject(exc.reason)
            return
        if batch.concentrator != self.concentrator:
            self.metrics.reject("wrong_segment")
            return
        self.metrics.incr("batches_down")
        for meter, frame in batch.frames:
            if not _METER_ID.fullmatch(meter) or (self.meters is not None and meter not in self.meters):
                self.metrics.reject("unknown_meter")
                continue
            if len(frame) > MAX_APDU_SIZE:
                self.metrics.reject("oversized_frame")
                continue
            if frame[:1] == _AARQ:
                if not self._control.take():
                    self.metrics.incr("control_shed")  # the head-end retransmits it after its timeout
                    continue
                self.metrics.incr("control_down")
            self._enqueue(topics.plc_down(self.concentrator, meter), frame)
            self.metrics.incr("frames_down")

    # --- output -----------------------------------------------------------------------

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.outq.append((topic, payload))
        self._wake.set()
        if len(self.outq) >= self.s.max_queue and not self._paused:
            # Back-pressure on a slow broker: stop reading (TCP does the rest).
            self._paused = True
            self.client.pause_reading()

    async def _sender(self) -> None:
        """Publish the queue in order, up to ``window`` QoS 1 acks outstanding."""
        outq, client, qos, window = self.outq, self.client, self.s.qos, self.s.window
        counters = self.metrics.counters

        def done(error: BaseException | None) -> None:
            counters["publish_failed" if error is not None else "messages_sent"] += 1
            self.inflight -= 1
            if self.inflight == window - 1:
                self._wake.set()

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
            if len(outq) < self.s.max_queue // 2 and self._paused:
                self._paused = False
                client.resume_reading()
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
            self._paused = False
            await client.subscribe(topics.plc_up_filter(self.concentrator), qos=self.s.qos)
            await client.subscribe(self._wan_down, qos=self.s.qos)
            self.up = True
            sender = asyncio.create_task(self._sender())
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
        for c in self.chosen:
            # The hot path's client (ami.runtime.mqtt): a fraction of aiomqtt's CPU per message.
            client = make_fast_client(s.broker, user=f"relay-{c}", data_dir=s.data_dir)
            self.relays.append(Relay(c, self.segments[c], client, s, self.metrics))

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
