"""The relay's hot path without a broker (issue 10): the prebuilt topic table,
the one-timer flush scheduler, the direct publish and the reused packer keep
the relay's behaviour: frames unchanged and in order, count / size / AARE /
time flushes (never later than ``batch_max_delay_ms``), the same counters and
rejections, the control budget and back-pressure."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from ami.protocol.messages import MAX_APDU_SIZE, MAX_BATCH_BYTES, Batch, decode_batch, encode_batch
from ami.runtime import mqtt
from ami.runtime.metrics import Metrics
from concentrator.relay import FlushScheduler, Relay, RelaySettings

pytestmark = pytest.mark.timeout(30)

C, C2 = "c0001", "c0002"
METERS = [f"m{i:06d}" for i in range(1, 11)]


class FakeClient:
    """publish_nowait records; acks only when told (``ack()``)."""

    def __init__(self) -> None:
        self.on_message = None
        self.sent: list[tuple[str, bytes, float]] = []
        self.pending: list = []
        self.paused = self.resumed = 0
        self.connected = True
        self.closed: asyncio.Future | None = None

    def publish_nowait(self, topic, payload, qos=0, done=None, retain=False) -> None:
        if not self.connected:
            raise mqtt.MqttError("not connected")
        assert type(payload) is bytes
        self.sent.append((topic, payload, asyncio.get_running_loop().time()))
        self.pending.append(done)

    def ack(self, n: int | None = None) -> None:
        n = len(self.pending) if n is None else n
        acks, self.pending = self.pending[:n], self.pending[n:]
        for done in acks:
            done(None)

    async def subscribe(self, topic, qos=0, **_):
        return [qos]

    async def wait_disconnected(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()
        await self.closed

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1

    def batches(self) -> list[Batch]:
        return [decode_batch(p) for t, p, _ in self.sent if t == f"ami/v1/wan/{C}/up"]

    def frames(self) -> list[tuple[str, bytes]]:
        return [f for b in self.batches() for f in b.frames]


def make(**settings) -> tuple[Relay, FakeClient, Metrics]:
    s = RelaySettings(broker="mqtt://x:1", data_dir=Path("."), **settings)
    metrics = Metrics("concentrator", "test")
    client = FakeClient()
    return Relay(C, METERS, client, s, metrics), client, metrics


async def up(relay: Relay, client: FakeClient) -> asyncio.Task:
    task = asyncio.create_task(relay._session(client))
    for _ in range(10):
        await asyncio.sleep(0)
    assert relay.up
    return task


def plc(meter: str, conc: str = C) -> str:
    return f"ami/v1/plc/{conc}/up/{meter}"


def test_packer_bytes_identical_to_encode_batch() -> None:
    rng = random.Random(7)
    relay, client, _ = make(batch_max_frames=4096)
    relay.up = False  # everything stays in outq: we compare what it would send
    for n, seq in ((1, None), (2, 0), (3, 126), (17, 2**32), (200, 2**63 - 2), (0, 5)):
        if seq is not None:
            relay.seq = seq
        frames = tuple((rng.choice(METERS), os.urandom(rng.randrange(0, 300))) for _ in range(n))
        relay.batch = list(frames)
        relay.flush()
        if not n:
            assert not relay.outq  # an empty batch is not sent
            continue
        topic, payload = relay.outq.pop()
        assert topic == f"ami/v1/wan/{C}/up"
        assert payload == encode_batch(Batch(C, relay.seq, frames))


def test_frames_unchanged_in_order_and_time_flush_never_late() -> None:
    async def main() -> None:
        relay, client, metrics = make(batch_max_frames=5, batch_max_delay_ms=100)
        task = await up(relay, client)
        loop = asyncio.get_running_loop()
        sent = [(METERS[i % 10], os.urandom(1 + (i * 577) % MAX_APDU_SIZE)) for i in range(12)]
        opened = loop.time()
        for m, f in sent:
            client.on_message(plc(m), f)
        # Two count flushes at once, the remaining two wait for the delay.
        assert [len(b.frames) for b in client.batches()] == [5, 5]
        assert metrics.counters["frames_up"] == 10 and metrics.counters["batches_up"] == 2
        await asyncio.sleep(0.2)
        batches = client.batches()
        assert [len(b.frames) for b in batches] == [5, 5, 2]
        assert client.frames() == sent
        assert [b.seq for b in batches] == list(range(batches[0].seq, batches[0].seq + 3))
        late = client.sent[-1][2] - opened
        assert 0.1 - relay.scheduler.slack - 0.002 <= late <= 0.1 + 0.05, late  # never (much) later
        assert metrics.counters["frames_up"] == 12 and metrics.counters["batches_up"] == 3
        client.ack()
        assert metrics.counters["messages_sent"] == 3 and relay.inflight == 0 and relay.idle
        task.cancel()

    asyncio.run(main())


def test_time_flush_counts_from_the_batch_opening_not_the_last_frame() -> None:
    async def main() -> None:
        relay, client, _ = make(batch_max_delay_ms=60)
        task = await up(relay, client)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(8):  # a frame every 10 ms: the batch leaves 60 ms after the first
            client.on_message(plc(METERS[i]), b"\xdb%d" % i)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.08)
        assert len(client.batches()) >= 2
        first = client.sent[0][2] - t0
        assert first <= 0.06 + 0.03, first
        assert client.frames() == [(METERS[i], b"\xdb%d" % i) for i in range(8)]
        task.cancel()

    asyncio.run(main())


def test_size_flush_and_aare_flushes_the_open_batch_in_order() -> None:
    async def main() -> None:
        relay, client, metrics = make(batch_max_frames=4096, batch_max_delay_ms=10_000)
        task = await up(relay, client)
        big = bytes(MAX_APDU_SIZE)
        n = (MAX_BATCH_BYTES - 256) // (MAX_APDU_SIZE + 7 + 8)
        for i in range(n + 1):
            client.on_message(plc(METERS[i % 10]), big)
        assert [len(b.frames) for b in client.batches()] == [n]  # size flush, one frame left open
        assert all(len(p) <= MAX_BATCH_BYTES for _, p, _ in client.sent)
        client.on_message(plc(METERS[1]), b"\xdb reading")
        client.on_message(plc(METERS[2]), b"\x61 an AARE")
        batches = client.batches()
        assert len(batches) == 2 and batches[1].frames[-2:] == (
            (METERS[1], b"\xdb reading"), (METERS[2], b"\x61 an AARE"))
        assert metrics.counters["control_up"] == 1
        assert metrics.counters["frames_up"] == n + 3
        task.cancel()

    asyncio.run(main())


def test_control_budget_sheds_aares_and_aarqs() -> None:
    async def main() -> None:
        relay, client, metrics = make(control_budget_per_s=2)
        task = await up(relay, client)
        for i in range(5):
            client.on_message(plc(METERS[0]), b"\x61 aare %d" % i)
        assert metrics.counters["control_up"] == 2 and metrics.counters["control_shed"] == 3
        assert len(client.batches()) == 2
        down = encode_batch(Batch(C, 1, ((METERS[0], b"\x60 aarq"), (METERS[1], b"\xdb data"))))
        client.on_message(f"ami/v1/wan/{C}/down", down)
        assert metrics.counters["control_shed"] == 4 and metrics.counters["control_down"] == 0
        assert [(t, p) for t, p, _ in client.sent[2:]] == [(f"ami/v1/plc/{C}/down/{METERS[1]}", b"\xdb data")]
        assert metrics.counters["frames_down"] == 1 and metrics.counters["batches_down"] == 1
        task.cancel()

    asyncio.run(main())


def test_hostile_uplink_is_counted_with_the_same_reasons() -> None:
    async def main() -> None:
        relay, client, metrics = make(batch_max_delay_ms=10)
        task = await up(relay, client)
        client.on_message(plc(METERS[0], C2), b"\xdb other segment")
        client.on_message("ami/v1/plc/c0001/down/m000001", b"\xdb wrong direction")
        client.on_message("ami/v1/plc/c0001/up", b"\xdb short")
        client.on_message(plc("m999999"), b"\xdb not ours")
        client.on_message(plc(METERS[0]), bytes(MAX_APDU_SIZE + 1))
        client.on_message(plc(METERS[0]), "not bytes")
        client.on_message(plc(METERS[0]), bytearray(b"\xdb a bytearray"))
        client.on_message(plc(METERS[1]), b"")
        await asyncio.sleep(0.05)
        r = {k: v for k, v in metrics.rejected.items() if v}
        assert r == {"unexpected_topic": 3, "unknown_meter": 1, "oversized_frame": 1, "malformed_frame": 1}
        assert client.frames() == [(METERS[0], b"\xdb a bytearray"), (METERS[1], b"")]
        assert metrics.counters["frames_up"] == 2
        task.cancel()

    asyncio.run(main())


def test_window_then_queue_then_shed_never_pause() -> None:
    """Past the window, a bounded queue; past the queue, readings are shed and
    counted, association frames use a small reserve, and the connection is
    never paused: its PUBACKs arrive on it, so pausing it would stall the
    relay until the keep-alive timeout (seen under a mass boot)."""
    async def main() -> None:
        relay, client, metrics = make(batch_max_frames=1, window=3, max_queue=4)
        task = await up(relay, client)
        for i in range(10):
            client.on_message(plc(METERS[i]), b"\xdb%d" % i)
        assert len(client.sent) == 3 and relay.inflight == 3  # the window
        assert len(relay.outq) == 4 and client.paused == 0  # the queue, never a pause
        assert metrics.counters["queue_shed"] == 3 and metrics.counters["queue_shed_frames"] == 3
        client.on_message(plc(METERS[0]), b"\x61 an AARE")  # control: the reserve
        assert len(relay.outq) == 5 and metrics.counters["queue_shed"] == 3
        for _ in range(10):
            client.ack()
            for _ in range(5):
                await asyncio.sleep(0)
        assert not relay.outq and client.resumed == 0
        assert client.frames() == [(METERS[i], b"\xdb%d" % i) for i in range(7)] + [(METERS[0], b"\x61 an AARE")]
        assert metrics.counters["messages_sent"] == 8 and relay.idle
        task.cancel()

    asyncio.run(main())


def test_queued_while_down_then_sent_in_order_on_reconnect() -> None:
    async def main() -> None:
        relay, client, metrics = make(batch_max_frames=1)
        client.on_message = relay.on_message
        client.on_message(plc(METERS[0]), b"\xdb before")
        assert not client.sent and len(relay.outq) == 1
        task = await up(relay, client)
        client.on_message(plc(METERS[1]), b"\xdb after")
        await asyncio.sleep(0)
        assert client.frames() == [(METERS[0], b"\xdb before"), (METERS[1], b"\xdb after")]
        client.connected = False  # lost: publishes fail and are counted
        client.on_message(plc(METERS[2]), b"\xdb lost")
        assert metrics.counters["publish_failed"] == 1 and relay.inflight == 2
        task.cancel()

    asyncio.run(main())


def test_one_timer_for_many_relays_and_stale_registrations_skipped() -> None:
    async def main() -> None:
        s = RelaySettings(broker="mqtt://x:1", data_dir=Path("."), batch_max_frames=2, batch_max_delay_ms=30)
        scheduler = FlushScheduler(0.03)
        metrics = Metrics("concentrator", "test")
        relays, clients = [], []
        for i in range(50):
            c = f"c{i + 1:04d}"
            client = FakeClient()
            relay = Relay(c, [f"m{i:04d}{j}" for j in range(3)], client, s, metrics, scheduler)
            relays.append(relay)
            clients.append(client)
        tasks = [asyncio.create_task(r._session(cl)) for r, cl in zip(relays, clients, strict=True)]
        await asyncio.sleep(0.01)
        armed = []
        loop = asyncio.get_running_loop()
        real_call_at = loop.call_at

        def spy(when, cb, *a, **k):
            armed.append(when)
            return real_call_at(when, cb, *a, **k)

        loop.call_at = spy  # type: ignore[method-assign]
        try:
            for r in relays:
                r.on_message(f"ami/v1/plc/{r.concentrator}/up/{next(iter(r.meters))}", b"\xdb one")
            relays[0].on_message(f"ami/v1/plc/{relays[0].concentrator}/up/{next(iter(relays[0].meters))}",
                                 b"\xdb two")  # count flush: its registration goes stale
            assert len(clients[0].sent) == 1
            await asyncio.sleep(0.08)
        finally:
            del loop.call_at
        assert len(armed) <= 2, armed  # one timer for the 50 batches
        assert [len(cl.sent) for cl in clients] == [1] + [1] * 49
        assert metrics.counters["batches_up"] == 50 and metrics.counters["frames_up"] == 51
        assert not scheduler.due and scheduler.timer is None
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def test_downlink_unchanged_and_hostile_items_dropped_alone() -> None:
    async def main() -> None:
        relay, client, metrics = make()
        task = await up(relay, client)
        frames = ((METERS[0], b"\xdb a"), ("m999999", b"x"), ("../../wan/c0001/up", b"y"),
                  (METERS[2], bytes(MAX_APDU_SIZE + 1)), (METERS[3], b"\x60 aarq"))
        client.on_message(f"ami/v1/wan/{C}/down", bytearray(encode_batch(Batch(C, 3, frames))))
        client.on_message(f"ami/v1/wan/{C}/down", encode_batch(Batch(C2, 3, frames)))
        client.on_message(f"ami/v1/wan/{C}/down", b"\x00 garbage")
        assert [(t, p) for t, p, _ in client.sent] == [(f"ami/v1/plc/{C}/down/{METERS[0]}", b"\xdb a"),
                                                      (f"ami/v1/plc/{C}/down/{METERS[3]}", b"\x60 aarq")]
        r = {k: v for k, v in metrics.rejected.items() if v}
        assert r == {"unknown_meter": 2, "oversized_frame": 1, "wrong_segment": 1, "malformed_message": 1}
        assert metrics.counters["frames_down"] == 2 and metrics.counters["control_down"] == 1
        task.cancel()

    asyncio.run(main())


def test_scheduler_survives_a_new_event_loop() -> None:
    """A batch left open when a loop ends must not stop time flushes in the next one."""
    relay, client, _ = make(batch_max_delay_ms=20)

    async def one(text: bytes) -> None:
        task = await up(relay, client)
        client.on_message(plc(METERS[0]), text)
        return task

    async def first() -> None:
        await one(b"\xdb first")  # the loop ends before the flush

    async def second() -> None:
        relay.batch, relay._due = [], 0.0  # what a restart would find: nothing open
        task = await one(b"\xdb second")
        await asyncio.sleep(0.1)
        assert client.frames() == [(METERS[0], b"\xdb second")]
        task.cancel()

    asyncio.run(first())
    asyncio.run(second())
