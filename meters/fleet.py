"""The fleet: thousands of ``Meter`` state machines in one asyncio process.

Shape of the shell (see docs/topics.md for the topics):

* one MQTT connection per PLC segment (user ``plc-{c}``), subscribed to the
  segment's downlink and local-port topics; one monitor connection
  (user ``meters``) for the retained status and metrics;
* ONE scheduler for every meter: a calendar queue of (meter-clock due time,
  index) (meters/timers.py), not a task per meter, so 100,000 meters cost a
  few hundred bytes each and a reading a dict lookup and an append;
* the meter clock is ``anchor_sim + (wall - anchor_wall) * compression``,
  anchored in NVM so it never goes back across restarts;
* every ``Output`` goes through the same two-step pipe: its counter marks and
  keys join the pending NVM batch, its frames join their segment's FIFO
  tagged with the number of the newest batch they may depend on.  A
  committer writes batches in order; a segment's frames are sent only once
  their batch is durable (``need <= durable``), with up to ``window`` QoS 1
  publishes in flight per connection so acks do not serialise.  Sending is
  one callback per loop iteration for every segment that has something new
  to send (``_kick``/``_flush``), not a task per segment woken per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import math
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ami.machines.loadcurve import mix64, seed_for, unit
from ami.machines.meter import CipherCache, Meter, MeterConfig, MeterKeys, Output
from ami.protocol import SecretBytes, topics
from ami.protocol.frames import MAX_APDU_SIZE
from ami.runtime import mqtt
from ami.runtime.budget import TokenBucket
from ami.runtime.bus import make_fast_client
from ami.runtime.link import run_link
from ami.runtime.logs import get_logger
from ami.runtime.metrics import Metrics, run_monitor
from ami.protocol.suite1 import SoftwareSigner
from ami.runtime.network import Network, iter_factory_keys, load_meter_sign_keys, load_network
from ami.runtime.sharding import select
from meters.nvm import Nvm, Record
from meters.timers import TimerWheel

log = get_logger("meters.fleet")

#: The scheduler's shortest sleep (wall seconds), and the width of its timer
#: buckets.  Sub-millisecond timers make the event loop spin (libuv rounds
#: them to 0) and burn a whole core; and each pass ends in one write per
#: segment it touched (and one read of PUBACKs back): 5 ms instead of 2 ms
#: put 2.5x more frames in each of those syscalls, for 2.5 ms more latency on
#: average (5,000 readings/s on 5,000 meters: 56 -> 47 us of CPU per reading).
_TICK_S = 0.005


# --- settings -------------------------------------------------------------------


@dataclass(slots=True)
class FleetSettings:
    broker: str
    data_dir: Path
    segments: list[str] | None = None  # explicit list, else shard, else all
    shard: tuple[int, int] | None = None  # (i, n), 1 <= i <= n
    ident: str | None = None
    qos: int = 1
    interval_s: int = 1800
    time_compression: float = 900.0
    history: int = 2880
    boot_retry_s: float = 5.0  # wall seconds
    boot_retry_max_s: float = 120.0  # wall seconds: unanswered announcements back off up to this
    boot_spread_s: float | None = None  # wall seconds over which the first boots spread
    ak_grace_s: float = 60.0  # wall seconds
    jitter: float = 0.8
    counter_block: int = 1024
    metrics_interval_s: float = 2.0
    rate: float | None = None  # total readings/s; overrides compression and jitter
    stamp: bool = False
    pad: int = 0  # zero bytes added to each pushed reading (MeterConfig.pad)
    tamper_rate: float = 0.0  # probability per meter per pushed reading
    outage_rate: float = 0.0
    seed: int | None = None  # fault-injection randomness
    window: int = 128  # QoS 1 publishes in flight per connection (aiomqtt scans them per publish)
    inflight_budget: int = 16384  # ...and in the whole process
    max_queue: int = 200_000  # frames queued before the scheduler waits
    cipher_cache: int = 4096
    #: Up to this many meters per process, each session keeps its own cipher
    #: (~2.5 KB per associated meter: 50 MB for 20,000) instead of rebuilding
    #: it from the shared LRU at every reading (3-5 us each once the fleet
    #: outgrows ``cipher_cache``); above, memory wins (100,000 meters stay
    #: within their RSS budget).
    session_ciphers_max_meters: int = 25_000
    connect_concurrency: int = 64
    drain_timeout_s: float = 2.5  # honcho kills 5 s after SIGTERM: all of shutdown fits in that
    nvm_synchronous: str = "FULL"  # marks durable on power loss (meters/nvm.py); NORMAL is refused
    start: float | None = None  # meter-clock start for a fresh NVM (default: now)
    gc_freeze: bool = True  # move the meters out of the cyclic GC's reach after set-up
    boot_budget_per_s: float = 1000.0  # boot announcements (first boots and retries) per second; 0: unlimited
    boot_defer_max_s: float = 2.0  # a deferred announcement waits a random 0.25..1 x this long (wall s)
    gap_fill_budget_per_s: float = 2000.0  # gap-fill reply frames per second; beyond: shed (0: unlimited)

    @classmethod
    def from_config(cls, config: dict, **overrides: Any) -> FleetSettings:
        meters = dict(config.get("meters", {}))
        bus = dict(config.get("bus", {}))
        monitor = dict(config.get("monitor", {}))
        base: dict[str, Any] = {
            "broker": bus.get("broker", "mqtt://127.0.0.1:1884"),
            "data_dir": Path(config.get("data", {}).get("dir", "data")),
            "qos": int(bus.get("qos", 1)),
            "metrics_interval_s": float(monitor.get("metrics_interval_s", 2.0)),
        }
        for name in (
            "interval_s", "time_compression", "history", "boot_retry_s", "boot_retry_max_s", "boot_spread_s",
            "ak_grace_s",
            "jitter", "counter_block", "window", "inflight_budget", "max_queue", "cipher_cache", "connect_concurrency",
            "drain_timeout_s", "nvm_synchronous", "boot_budget_per_s", "boot_defer_max_s", "gap_fill_budget_per_s",
        ):
            if name in meters:
                base[name] = meters[name]
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def select_segments(network: Network, segments: list[str] | None, shard: tuple[int, int] | None) -> list[str]:
    """The segments this process serves: explicit, every n-th (shard i/n), or all."""
    return select(network.concentrators, segments, shard)


def default_ident(settings: FleetSettings, segments: list[str], every: int) -> str:
    if settings.ident:
        return settings.ident
    if settings.segments:
        return "-".join(segments) if len(segments) <= 3 else f"{segments[0]}-{segments[-1]}-{len(segments)}"
    if settings.shard:
        return f"shard-{settings.shard[0]}-of-{settings.shard[1]}"
    return "fleet" if len(segments) == every else f"{len(segments)}-segments"


class SimClock:
    """Meter clock: seconds since the Unix epoch, running ``compression`` times wall speed."""

    __slots__ = ("anchor_wall", "anchor_sim", "compression")

    def __init__(self, anchor_wall: float, anchor_sim: float, compression: float) -> None:
        self.anchor_wall = anchor_wall
        self.anchor_sim = anchor_sim
        self.compression = compression

    def now(self) -> float:
        return self.anchor_sim + (time.time() - self.anchor_wall) * self.compression

    def slow_down(self, factor: float) -> None:
        """Run ``factor`` times slower from now on (the meter clock never goes back)."""
        wall = time.time()
        self.anchor_sim = self.anchor_sim + (wall - self.anchor_wall) * self.compression
        self.anchor_wall = wall
        self.compression /= factor

    def wall_delay(self, sim_time: float) -> float:
        """Wall seconds until the meter clock reads ``sim_time``."""
        return (sim_time - self.now()) / self.compression


# --- per-segment connection -------------------------------------------------------------


class Link:
    """One PLC segment's connection and its outgoing FIFO."""

    __slots__ = ("concentrator", "client", "queue", "up", "window_size", "inflight", "blocked", "done")

    def __init__(self, concentrator: str, client: mqtt.Client, window: int) -> None:
        self.concentrator = concentrator
        self.client = client
        self.queue: deque[tuple[int, str, bytes]] = deque()  # (needed batch, topic, payload)
        self.up = False
        self.window_size = window
        self.inflight = 0  # QoS 1 publishes awaiting their PUBACK
        self.blocked = False  # frames wait for room in the window (not for the NVM)
        #: Called with each publish's outcome (Fleet._on_done, bound to this link).
        self.done: Callable[[BaseException | None], None] = _ignore_outcome


def _ignore_outcome(_error: BaseException | None) -> None:
    pass


# --- the fleet -----------------------------------------------------------------------


class Fleet:
    def __init__(self, settings: FleetSettings) -> None:
        self.s = settings
        self.meters: list[Meter] = []
        self.index: dict[str, int] = {}
        self._up_topics: dict[str, str] = {}  # meter -> its uplink topic
        self.links: dict[str, Link] = {}
        self.metrics: Metrics | None = None
        self.nvm: Nvm | None = None
        self.clock: SimClock | None = None
        self.segments: list[str] = []
        self.ident = ""
        self._timers = TimerWheel(1.0)  # sized to the meter clock in setup
        self._scheduled: list[float] = []
        self._pending: list[Record] = []
        self._batch_id = 0  # number of the batch now being filled
        self._need = -1  # newest batch any queued frame may depend on
        self._durable = -1  # newest batch committed
        self._marks_wake = asyncio.Event()
        self._dirty: set[Link] = set()  # segments with something new to send
        self._flush_scheduled = False
        self._queued = 0
        self._inflight = 0
        self._link_cap = 1000  # frames kept for a segment whose connection is down
        self._fatal: BaseException | None = None
        self._rng = random.Random(settings.seed)
        self._jitter = random.Random()  # deferral jitter (not the fault-injection stream)
        self._ciphers = CipherCache(settings.cipher_cache)
        # Control traffic never amplifies load: boots and gap-fill replies have budgets.
        self._boot_budget = TokenBucket(settings.boot_budget_per_s)
        self._gap_budget = TokenBucket(settings.gap_fill_budget_per_s)

    # --- set-up ---------------------------------------------------------------------

    async def setup(self) -> None:
        s = self.s
        network = load_network(s.data_dir)
        self.segments = select_segments(network, s.segments, s.shard)
        self.ident = default_ident(s, self.segments, len(network.concentrators))
        self.metrics = Metrics("meters", self.ident)
        wanted = {m: c for c in self.segments for m in network.segments[c]}
        n = len(wanted)
        if n == 0:
            raise ValueError("no meters to run")
        compression = s.time_compression
        if s.rate:
            # Constant rate: each meter pushes once per interval, so the
            # interval must last n / rate wall seconds.
            compression = s.rate * s.interval_s / n
        self.nvm = Nvm(s.data_dir / "meters" / f"{self.ident}.db", synchronous=s.nvm_synchronous)
        # Locks our segments for the life of the process (SegmentBusy if another
        # fleet serves one): nothing is read, claimed or sent before.
        await self.nvm.open(self.segments)
        try:
            await self._setup_meters(network, wanted, compression)
        except BaseException:
            await self.nvm.close()  # a failed set-up does not keep the segments locked
            raise

    async def _setup_meters(self, network: Network, wanted: dict[str, str], compression: float) -> None:
        s, n = self.s, len(wanted)
        assert self.nvm is not None
        states = await self.nvm.load()
        anchor_wall, anchor_sim = await self.nvm.clock_anchor(compression, s.start)
        self.clock = SimClock(anchor_wall, anchor_sim, compression)
        config = MeterConfig(
            headend_title=network.headend_title,
            tsp_title=network.tsp_title,
            interval_s=s.interval_s,
            history=s.history,
            boot_retry_s=s.boot_retry_s * compression,
            boot_retry_max_s=s.boot_retry_max_s * compression,
            ak_grace_s=s.ak_grace_s * compression,
            counter_block=s.counter_block,
            ciphers=self._ciphers,
            pad=s.pad,
            keep_session_ciphers=n <= s.session_ciphers_max_meters,
            headend_sign_public=network.headend_sign_public,
            rng=os.urandom,  # suite 1: the meters' ephemeral keys
        )
        sign_keys = load_meter_sign_keys(s.data_dir)
        now = self.clock.now()
        spread = (s.boot_retry_s if s.boot_spread_s is None else s.boot_spread_s) * compression
        interned = {c: c for c in self.segments}
        order = {m: i for i, m in enumerate(sorted(wanted))} if s.rate else {}
        for record in iter_factory_keys(s.data_dir):
            mid = record["meter"]
            if mid not in wanted:
                continue
            keys = MeterKeys(*(SecretBytes(bytes.fromhex(record[k])) for k in ("ccc", "ak", "cc_lan", "cc_locale")))
            state = states.get(mid)
            if state is not None:
                for key_type, key in state.keys.items():
                    keys.set(key_type, key)
            title = network.titles[mid]
            if s.rate:
                u = order[mid] / n  # evenly spaced: a constant aggregate rate
                offset = u * s.interval_s
            else:
                u = unit(mix64(seed_for(title) ^ 0x0FF5E7))
                offset = u * s.jitter * s.interval_s
            meter = Meter(
                mid, title, keys, config,
                concentrator=interned[wanted[mid]],
                marks=state.marks if state else None,
                push_offset=offset,
                boot_at=now + u * spread,
                suite=int(record.get("suite", 0)),
                signer=SoftwareSigner.from_scalar(sign_keys[mid]) if record.get("suite") else None,
            )
            self.index[mid] = len(self.meters)
            self.meters.append(meter)
        missing = n - len(self.meters)
        if missing:
            raise ValueError(f"{missing} meters of the served segments have no factory keys")
        self._scheduled = [m.next_due for m in self.meters]
        # One bucket per scheduler tick of meter time: a pass takes whole buckets.
        self._timers = TimerWheel(_TICK_S * compression)
        for i, m in enumerate(self.meters):
            if m.next_due != math.inf:
                self._timers.push(m.next_due, i)
        # Per-connection window, within a process-wide budget of in-flight publishes.
        window = max(8, min(s.window, s.inflight_budget // len(self.segments)))
        self._link_cap = max(1000, s.max_queue // (2 * len(self.segments)))
        for c in self.segments:
            # The hot path's client (ami.runtime.mqtt): a fraction of aiomqtt's CPU per message.
            client = make_fast_client(s.broker, user=f"plc-{c}", data_dir=s.data_dir)
            link = self.links[c] = Link(c, client, window)
            link.done = functools.partial(self._on_done, link)
        # 100,000 meters are millions of long-lived objects: keep the cyclic
        # GC from re-scanning them on every full collection (+50% frames/s).
        if s.gc_freeze:
            gc.collect()
            gc.freeze()
        log.info("fleet ready", ident=self.ident, meters=n, segments=len(self.segments),
                 compression=compression, nvm_rows=sum(len(v.marks) + len(v.keys) for v in states.values()))

    # --- output pipe ---------------------------------------------------------------------

    def _collect(self, meter: Meter, out: Output) -> None:
        metrics = self.metrics
        assert metrics is not None
        counters = metrics.counters
        if out.persist:
            m, c = meter.ident, meter.concentrator
            self._pending.extend((m, c, item) for item in out.persist)
            self._need = self._batch_id
            self._marks_wake.set()
        uplink, local = out.uplink, out.local
        if uplink or local:
            c, m = meter.concentrator, meter.ident
            link = self.links[c]
            need = self._need
            if uplink:
                topic = self._up_topics.get(m)
                if topic is None:  # validated and formatted once per meter
                    topic = self._up_topics[m] = topics.plc_up(c, m)
                for frame in uplink:
                    link.queue.append((need, topic, frame))
            for frame in local:
                link.queue.append((need, topics.local_out(c, m), frame))
            n = len(uplink) + len(local)
            self._queued += n
            counters["frames_up"] += n
            if not link.up:
                # A segment without a connection must not stall the others
                # (the scheduler waits on the total): keep its newest frames.
                # Dropping is safe: a frame never sent never reuses an IV, and
                # readings come back by gap-fill.
                while len(link.queue) > self._link_cap:
                    link.queue.popleft()
                    self._queued -= 1
                    metrics.incr("frames_dropped")
            self._kick(link)
        for name in out.counters:
            counters[name] += 1
        for reason in out.rejected:
            metrics.reject(reason)

    async def _committer(self) -> None:
        nvm = self.nvm
        assert nvm is not None and self.metrics is not None
        while True:
            await self._marks_wake.wait()
            self._marks_wake.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, []
            batch_id = self._batch_id
            self._batch_id += 1
            await nvm.commit(batch)  # raises: the fleet stops, the frames never leave
            self._durable = batch_id
            self.metrics.incr("nvm_commits")
            for link in self.links.values():
                if link.queue:
                    self._kick(link)

    # --- sending -------------------------------------------------------------------------

    def _kick(self, link: Link) -> None:
        """The segment may have something to send: look at it in this loop
        iteration's flush (one callback for every segment kicked meanwhile)."""
        self._dirty.add(link)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for link in dirty:
            if link.up:
                self._send_ready(link)

    def _send_ready(self, link: Link) -> None:
        """Publish the segment's FIFO in order, each frame once its marks are
        durable, with up to ``window`` QoS 1 acknowledgements outstanding.
        Everything sendable goes in one go: the client writes it with one syscall."""
        queue, client, qos, done = link.queue, link.client, self.s.qos, link.done
        durable, room = self._durable, link.window_size - link.inflight
        while queue and room > 0 and queue[0][0] <= durable:
            _need, topic, payload = queue.popleft()
            self._queued -= 1
            room -= 1
            self._inflight += 1
            link.inflight += 1
            try:
                client.publish_nowait(topic, payload, qos, done)
            except mqtt.MqttError:
                done(mqtt.MqttError("not connected"))
        # Frames left behind for want of room come out as acks free some (_on_done);
        # those waiting for the NVM, when the committer kicks every segment.
        link.blocked = room == 0 and bool(queue)

    def _on_done(self, link: Link, error: BaseException | None) -> None:
        """A publish's outcome (its PUBACK, or the loss of the connection first)."""
        # Lost on a broken connection: readings come back by gap-fill,
        # boot events are repeated, the head-end retries its requests.
        assert self.metrics is not None
        self.metrics.counters["publish_failed" if error is not None else "frames_sent"] += 1
        self._inflight -= 1
        link.inflight -= 1
        if link.blocked and link.inflight < link.window_size:
            link.blocked = False
            self._kick(link)

    # --- segment connections -----------------------------------------------------------

    async def _run_link(self, link: Link, connect_gate: asyncio.Semaphore, stop: asyncio.Event) -> None:
        """The segment's connection: reconnects with backoff, never once ``stop`` is set."""

        async def session(client: mqtt.Client) -> None:
            c = link.concentrator
            try:
                client.on_message = lambda topic, payload: self._on_message(link, topic, payload)
                await client.subscribe(topics.plc_down_filter(c), qos=self.s.qos)
                await client.subscribe(topics.local_in_filter(c), qos=self.s.qos)
                link.up = True
                self._kick(link)  # what queued up while the segment was down
                await client.wait_disconnected()
            finally:
                link.up = False

        await run_link(link.client, session, stop=stop, metrics=self.metrics,
                       name=f"segment {link.concentrator}", gate=connect_gate)

    def _on_message(self, link: Link, topic: str, payload: bytes) -> None:
        metrics, clock = self.metrics, self.clock
        assert metrics is not None and clock is not None
        local = False
        parsed = topics.parse_plc_down(topic)
        if parsed is None:
            loc = topics.parse_local(topic)
            if loc is None or loc[2] != "in":
                metrics.reject("unexpected_topic")
                return
            parsed, local = (loc[0], loc[1]), True
        c, mid = parsed
        idx = self.index.get(mid)
        if c != link.concentrator or idx is None or self.meters[idx].concentrator != c:
            metrics.reject("unknown_meter")
            return
        if not isinstance(payload, (bytes, bytearray)) or len(payload) > MAX_APDU_SIZE:
            metrics.reject("oversized_frame")
            return
        meter = self.meters[idx]
        now = clock.now()
        metrics.incr("frames_down")
        out = meter.on_local(bytes(payload), now) if local else meter.on_downlink(bytes(payload), now)
        if out.uplink and "gap_fill_replies" in out.counters and not self._gap_budget.take(len(out.uplink)):
            # Over budget: shed the reply (its counter marks are still persisted;
            # a frame never sent reuses no IV).  The head-end asks again after
            # its gap_fill_retry_s, and the readings wait in the load curve.
            metrics.incr("gap_fill_replies_shed")
            metrics.incr("gap_fill_frames_shed", len(out.uplink))
            out.uplink.clear()
        self._collect(meter, out)
        if meter.next_due <= now:
            self._collect(meter, meter.tick(now, time.time_ns() if self.s.stamp else None))
        self._reschedule(idx, meter)

    # --- scheduler --------------------------------------------------------------------

    def _reschedule(self, idx: int, meter: Meter) -> None:
        due = meter.next_due
        if due < self._scheduled[idx]:
            self._scheduled[idx] = due
            self._timers.push(due, idx)

    async def _scheduler(self) -> None:
        clock, timers, meters, scheduled = self.clock, self._timers, self.meters, self._scheduled
        assert clock is not None
        s = self.s
        stamp = s.stamp
        faults = s.tamper_rate > 0 or s.outage_rate > 0
        boot_budget = self._boot_budget
        collect, push = self._collect, timers.push
        assert self.metrics is not None
        counters = self.metrics.counters
        inf = math.inf
        while True:
            now = clock.now()
            wall_ns = time.time_ns() if stamp else None
            done = 0
            # Everything due by now, then what came due while we worked.
            while due_now := timers.pop_due(now):
                for due, idx in due_now:
                    if due != scheduled[idx]:
                        continue  # superseded by an earlier reschedule
                    meter = meters[idx]
                    if meter.session is None and not boot_budget.take():
                        # An announcement (first boot or retry) over budget: defer it by
                        # a random delay so deferred meters do not come back together.
                        later = now + self._jitter.uniform(0.25, 1.0) * s.boot_defer_max_s * clock.compression
                        scheduled[idx] = later
                        push(later, idx)
                        counters["boots_deferred"] += 1
                        continue
                    if stamp:
                        # Stamp the time the push was *due*, not when we got to it:
                        # a fleet that falls behind must show as latency (wrk2's
                        # lesson on coordinated omission), not hide it.
                        wall_ns = int((clock.anchor_wall + (due - clock.anchor_sim) / clock.compression) * 1e9)
                    out = meter.tick(now, wall_ns)
                    collect(meter, out)
                    if faults and "readings_pushed" in out.counters:
                        self._inject_faults(meter, now)
                    nxt = meter.next_due
                    scheduled[idx] = nxt
                    if nxt != inf:
                        push(nxt, idx)
                    done += 1
                    if done % 256 == 0:
                        await asyncio.sleep(0)  # let downlinks and publishers run
                        while self._queued > s.max_queue:
                            await asyncio.sleep(0.01)  # back-pressure: pushes get late, not lost
                        now = clock.now()
                        wall_ns = time.time_ns() if stamp else None
            earliest = timers.earliest()
            delay = 0.05 if earliest is None else min(0.05, max(_TICK_S, clock.wall_delay(earliest)))
            await asyncio.sleep(delay)

    def _inject_faults(self, meter: Meter, now: float) -> None:
        rng = self._rng
        if self.s.tamper_rate and rng.random() < self.s.tamper_rate:
            self._collect(meter, meter.raise_event("tamper", now, "cover_open"))
        if self.s.outage_rate and rng.random() < self.s.outage_rate:
            duration = rng.uniform(1.0, 4.0) * self.s.interval_s
            self._collect(meter, meter.power_fail(now, duration))
            # next_due moved to the power-up time; the scheduler reads it next.

    # --- monitor ---------------------------------------------------------------------

    def _refresh_gauges(self) -> None:
        metrics, clock = self.metrics, self.clock
        assert metrics is not None and clock is not None
        associated = powered = 0
        for meter in self.meters:
            if meter.powered:
                powered += 1
                if meter.session is not None:
                    associated += 1
        metrics.gauges.update(
            meters=len(self.meters),
            meters_powered=powered,
            meters_associated=associated,
            segments=len(self.links),
            segments_up=sum(1 for link in self.links.values() if link.up),
            queue_depth=self._queued,
            marks_pending=len(self._pending),
            publish_inflight=self._inflight,
            meter_clock=round(clock.now(), 3),
            time_compression=clock.compression,
            cipher_cache_hits=self._ciphers.hits,
            cipher_cache_misses=self._ciphers.misses,
            nvm_rows=self.nvm.rows if self.nvm else 0,
        )

    # --- main ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` (SIGTERM): then stop pushing, commit and publish
        what is pending, publish ``offline`` and return 0 (1 if the NVM failed)."""
        if not self.meters:
            await self.setup()
        s, metrics, nvm = self.s, self.metrics, self.nvm
        assert metrics is not None and nvm is not None
        monitor_done = asyncio.Event()
        monitor = asyncio.create_task(
            run_monitor(s.broker, "meters", s.data_dir, metrics, s.metrics_interval_s, self._refresh_gauges,
                        monitor_done, stop=stop)
        )
        gate = asyncio.Semaphore(s.connect_concurrency)
        # SIGUSR1 (load tests' drain): the load drops to a tenth, every meter keeps
        # reporting, so what could not flow live comes back by gap-fill.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR1, self.slow_down)
        committer = asyncio.create_task(self._committer())
        scheduler = asyncio.create_task(self._scheduler())
        links = [asyncio.create_task(self._run_link(link, gate, stop)) for link in self.links.values()]
        tasks = [committer, scheduler, *links]
        try:
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({stopper, committer, scheduler}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    self._fatal = task.exception()
                    # Frames waiting on the failed batch never leave: no IV reuse.
                    log.error("fleet failed", error=repr(self._fatal))
            scheduler.cancel()
            if self._fatal is None:
                await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
            monitor_done.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(monitor, 1.0)
            await nvm.close()
        log.info("fleet stopped", ident=self.ident, **dict(metrics.counters))
        return 1 if self._fatal is not None else 0

    def slow_down(self, factor: float = 10.0) -> None:
        assert self.clock is not None and self.metrics is not None
        self.clock.slow_down(factor)
        self.metrics.incr("slowed_down")
        log.info("fleet slowed down", factor=factor, time_compression=self.clock.compression)

    async def _drain(self) -> None:
        """Stop pushing; commit what is pending and publish what is queued."""
        deadline = time.monotonic() + self.s.drain_timeout_s
        self._marks_wake.set()
        while time.monotonic() < deadline:
            up = [link for link in self.links.values() if link.up]
            sendable = sum(len(link.queue) for link in up)
            inflight = sum(link.inflight for link in up)  # a lost connection never acks its own
            if not self._pending and sendable == 0 and inflight == 0:
                return  # frames of a segment that is down are left behind
            await asyncio.sleep(0.02)
        log.warning("drain timed out", queued=self._queued, pending_marks=len(self._pending))


async def run_fleet(settings: FleetSettings, stop: asyncio.Event) -> int:
    fleet = Fleet(settings)
    await fleet.setup()
    return await fleet.run(stop)


__all__ = ["Fleet", "FleetSettings", "SimClock", "run_fleet", "select_segments"]
