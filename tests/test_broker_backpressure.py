"""The embedded broker under more than it can deliver (issue 10): bounded queues, back-pressure, nothing lost.

A real embedded broker (ami.broker.server.AclBroker on a free port, as `ami
broker --no-auth` runs it) and real MQTT clients over TCP (ami.runtime.mqtt,
the services' client).  A publisher floods QoS 1 messages at a subscriber
that does not read (its socket paused).  amqtt 0.12.1 alone acknowledged every
publish at once and queued the deliveries without bound (one task each); the
broker must instead hold the publisher (PUBACKs withheld) while the
subscriber's queue is full, then deliver everything, in order, once it reads.
A subscriber that never reads again must not hold the broker: after
``stall_s`` its messages beyond ``max_queued`` are dropped and counted.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from ami.broker.flow import FlowSettings
from ami.broker.server import AclBroker, amqtt_config, broker_settings
from ami.runtime.mqtt import Client
from harness import free_port

pytestmark = pytest.mark.timeout(60)


async def _broker(flow: FlowSettings) -> tuple[AclBroker, int]:
    port = free_port()
    broker = AclBroker(amqtt_config(broker_settings("127.0.0.1", port)), acl=False, flow=flow)
    await broker.start()
    return broker, port


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Counter:
    def __init__(self) -> None:
        self.acked = 0
        self.errors: list[BaseException] = []

    def __call__(self, error: BaseException | None) -> None:
        if error is None:
            self.acked += 1
        else:
            self.errors.append(error)


def test_a_subscriber_that_does_not_read_holds_the_publisher_and_loses_nothing():
    flow = FlowSettings(max_inflight=20, queue_high=200, max_queued=100_000, stall_s=60.0, max_held=500)
    n = 3000

    async def run() -> None:
        broker, port = await _broker(flow)
        try:
            received: list[bytes] = []
            async with Client("127.0.0.1", port, identifier="slow-sub") as sub, \
                    Client("127.0.0.1", port, identifier="fast-pub") as pub:
                sub.on_message = lambda _topic, payload: received.append(payload)
                await sub.subscribe("bp/#", qos=1)
                sub.pause_reading()  # a subscriber slower than the publisher: here, not reading at all
                acks = Counter()
                for i in range(n):
                    pub.publish_nowait("bp/m1", i.to_bytes(4, "big"), qos=1, done=acks)

                # While it does not read, the broker acknowledges no more than it can queue for it.
                bound = flow.queue_high + flow.max_inflight + 1
                t_end = time.monotonic() + 3.0
                while time.monotonic() < t_end:
                    assert acks.acked <= bound, (acks.acked, broker.flow_stats())
                    assert broker.flow_stats()["queued"] <= flow.queue_high, broker.flow_stats()
                    await asyncio.sleep(0.01)
                stats = broker.flow_stats()
                assert stats["held"] > 0 and stats["ingress_pauses"] >= 1, stats
                assert stats["queue_max"] <= flow.queue_high, stats
                # It holds max_held publishes, then its socket is paused too (this client has no window).
                assert stats["socket_pauses"] >= 1, stats

                sub.resume_reading()
                await _until(lambda: len(received) == n and acks.acked == n, 30, "every message delivered")
                assert [int.from_bytes(p, "big") for p in received] == list(range(n))  # in order, each once
                assert not acks.errors
                stats = broker.flow_stats()
                assert stats["dropped"] == 0 and stats["held"] == 0 and stats["queued"] == 0, stats
        finally:
            await broker.shutdown()

    asyncio.run(run())


def test_a_dead_subscriber_does_not_hold_the_broker_its_overflow_is_dropped_and_counted():
    flow = FlowSettings(max_inflight=10, queue_high=100, max_queued=300, stall_s=1.0, max_held=100_000)
    n = 2000

    async def run() -> None:
        broker, port = await _broker(flow)
        try:
            live: list[bytes] = []
            async with Client("127.0.0.1", port, identifier="dead-sub") as dead, \
                    Client("127.0.0.1", port, identifier="live-sub") as alive, \
                    Client("127.0.0.1", port, identifier="pub") as pub:
                await dead.subscribe("bp/#", qos=1)
                alive.on_message = lambda _topic, payload: live.append(payload)
                await alive.subscribe("bp/#", qos=1)
                dead.pause_reading()  # it never reads again
                acks = Counter()
                for i in range(n):
                    pub.publish_nowait("bp/m2", i.to_bytes(4, "big"), qos=1, done=acks)
                await _until(lambda: acks.acked == n and len(live) == n, 30, "the live subscriber served")
                assert [int.from_bytes(p, "big") for p in live] == list(range(n))
                stats = broker.flow_stats()
                assert stats["stalls"] >= 1, stats
                # The dead one got its window and a full queue; the rest was dropped, and counted.
                assert stats["dropped"] == n - flow.max_queued - flow.max_inflight, stats
                assert stats["queue_max"] == flow.max_queued, stats
        finally:
            await broker.shutdown()

    asyncio.run(run())


def test_the_bounds_are_broker_settings_whose_code_defaults_equal_the_packaged_toml():
    from ami.runtime.config import packaged_defaults

    broker = packaged_defaults()["broker"]
    assert FlowSettings.from_config(broker) == FlowSettings()  # no default drifts from ami/runtime/default.toml
    assert {"max_inflight", "queue_high", "max_queued", "stall_s", "max_held"} <= set(broker)
    assert FlowSettings.from_config({"queue_high": "40", "stall_s": 2}).queue_low == 10  # cast, whatever the source
