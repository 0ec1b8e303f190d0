"""The bare baseline: the fleet's and the relays' MQTT layout with nothing else.

``python -m ami.tools.loadtest.bare pub ...`` mimics one fleet process: one MQTT
connection per PLC segment it serves (subscribed, like the fleet's, to the
segment's downlink and local-port filters) plus one monitor connection, and
publishes random payloads of ``--size`` bytes on ``ami/v1/plc/{c}/up/{m}``
for every meter in turn at a constant aggregate ``--rate`` (the fleet's
schedule), with the fleet's per-connection window of QoS 1 publishes in
flight.  No sealing, no NVM, no meter state.

``python -m ami.tools.loadtest.bare sub ...`` mimics one relay process: one
connection per concentrator subscribed to ``ami/v1/plc/{c}/up/+`` (and its
WAN downlink topic, like a relay) plus one monitor connection; it only counts
what it receives: no batching, no forwarding, no head-end.

Both publish their counters on ``ami/v1/monitor/loadtest-fleet|loadtest-relay/{id}/metrics``
(``frames_sent`` / ``frames_received``) like the services do, and stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

from ami.protocol import topics
from ami.runtime import mqtt
from ami.runtime.bus import make_fast_client, wait_for_broker
from ami.runtime.metrics import Metrics, run_monitor
from ami.runtime.network import load_network
from ami.runtime.service import run_service
from ami.runtime.sharding import parse_shard, select

PUB_COMPONENT = "loadtest-fleet"
SUB_COMPONENT = "loadtest-relay"


def shard(items: list[str], spec: str | None) -> list[str]:
    """``i/n``: the split ``--shard`` makes in the services (ami.runtime.sharding)."""
    return select(sorted(items), None, parse_shard(spec) if spec else None)


class _Link:
    __slots__ = ("segment", "client", "queue", "wake", "window", "up", "inflight")

    def __init__(self, segment: str, client: mqtt.Client, window: int) -> None:
        self.segment = segment
        self.client = client
        self.queue: deque[tuple[str, bytes]] = deque()
        self.wake = asyncio.Event()
        self.window = window
        self.up = False
        self.inflight = 0


async def run_pub(args: argparse.Namespace, stop: asyncio.Event) -> int:
    network = load_network(args.data)
    segments = shard(network.concentrators, args.shard)
    ident = args.id or "bare"
    metrics = Metrics(PUB_COMPONENT, ident)
    schedule: list[tuple[str, str]] = []
    for c in segments:
        for m in network.segments[c]:
            schedule.append((c, topics.plc_up(c, m)))
    schedule.sort(key=lambda item: item[1].rsplit("/", 1)[1])  # the fleet orders meters by id
    n = len(schedule)
    # Random payloads of the requested size (a pool: drawing 20,000 x 90 bytes
    # a second from the OS would itself be measured).
    pool = [os.urandom(args.size) for _ in range(min(4096, max(1, n)))]
    # The fleet's window: at most 128 per connection within a 16,384 budget.
    window = max(8, min(args.window, args.inflight_budget // max(1, len(segments))))
    links: dict[str, _Link] = {}
    for c in segments:
        # The pipeline's hot-path client, so the ratio measures security and relaying, not clients.
        client = make_fast_client(args.broker, user=None, data_dir=args.data)
        links[c] = _Link(c, client, window)
    state = {"queued": 0, "inflight": 0}
    counters = metrics.counters

    def refresh() -> None:
        metrics.gauges.update(
            segments=len(links), segments_up=sum(1 for link in links.values() if link.up),
            queue_depth=state["queued"], publish_inflight=state["inflight"], meters=n,
        )

    async def publisher(link: _Link) -> None:
        def done(error: BaseException | None) -> None:
            counters["publish_failed" if error is not None else "frames_sent"] += 1
            state["inflight"] -= 1
            link.inflight -= 1
            link.wake.set()

        while True:
            if not link.queue or link.inflight >= link.window:
                link.wake.clear()
                await link.wake.wait()
                continue
            while link.queue and link.inflight < link.window:
                topic, payload = link.queue.popleft()
                state["queued"] -= 1
                state["inflight"] += 1
                link.inflight += 1
                try:
                    link.client.publish_nowait(topic, payload, args.qos, done)
                except mqtt.MqttError as exc:
                    done(exc)
            await asyncio.sleep(0)

    async def connect(link: _Link, gate: asyncio.Semaphore) -> None:
        async with gate:
            await link.client.__aenter__()
        await link.client.subscribe(topics.plc_down_filter(link.segment), qos=args.qos)
        await link.client.subscribe(topics.local_in_filter(link.segment), qos=args.qos)
        link.up = True

    done = asyncio.Event()
    monitor = asyncio.create_task(run_monitor(args.broker, None, args.data, metrics, args.metrics_interval, refresh, done))
    gate = asyncio.Semaphore(64)
    await asyncio.gather(*(connect(link, gate) for link in links.values()))
    publishers = [asyncio.create_task(publisher(link)) for link in links.values()]
    refresh()
    t0 = time.monotonic()
    k = 0
    try:
        while not stop.is_set():
            due = int((time.monotonic() - t0) * args.rate)
            while k < due and not stop.is_set():
                c, topic = schedule[k % n]
                link = links[c]
                link.queue.append((topic, pool[k % len(pool)]))
                link.wake.set()
                state["queued"] += 1
                metrics.incr("frames_up")
                k += 1
                if k % 256 == 0:
                    await asyncio.sleep(0)
                    while state["queued"] > args.max_queue and not stop.is_set():
                        await asyncio.sleep(0.01)  # back-pressure, as the fleet does
            delay = (k + 1) / args.rate - (time.monotonic() - t0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), min(0.05, max(0.002, delay)))
        deadline = time.monotonic() + 10.0
        while (state["queued"] or state["inflight"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        for task in publishers:
            task.cancel()
        await asyncio.gather(*publishers, return_exceptions=True)
        done.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(monitor, 10.0)
        for link in links.values():
            with contextlib.suppress(Exception):
                await link.client.__aexit__(None, None, None)
    print(json.dumps({"event": "bare stopped", "role": "pub", "ident": ident, **metrics.counters}), flush=True)
    return 0


async def run_sub(args: argparse.Namespace, stop: asyncio.Event) -> int:
    network = load_network(args.data)
    concentrators = shard(network.concentrators, args.shard)
    ident = args.id or "bare"
    metrics = Metrics(SUB_COMPONENT, ident)
    up: set[str] = set()

    def refresh() -> None:
        metrics.gauges.update(relays=len(concentrators), relays_up=len(up))

    async def relay(c: str, gate: asyncio.Semaphore) -> None:
        client = make_fast_client(args.broker, user=None, data_dir=args.data)
        counters = metrics.counters

        def on_message(_topic: str, _payload: bytes) -> None:
            counters["frames_received"] += 1

        client.on_message = on_message
        async with gate:
            await client.__aenter__()
        try:
            await client.subscribe(topics.plc_up_filter(c), qos=args.qos)
            await client.subscribe(topics.wan_down(c), qos=args.qos)
            up.add(c)
            await client.wait_disconnected()
        finally:
            up.discard(c)
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    done = asyncio.Event()
    monitor = asyncio.create_task(run_monitor(args.broker, None, args.data, metrics, args.metrics_interval, refresh, done))
    gate = asyncio.Semaphore(50)
    tasks = [asyncio.create_task(relay(c, gate)) for c in concentrators]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        done.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(monitor, 10.0)
    print(json.dumps({"event": "bare stopped", "role": "sub", "ident": ident, **metrics.counters}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ami.tools.loadtest.bare", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["pub", "sub"])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--shard", help="i/n of the sorted segments")
    parser.add_argument("--id")
    parser.add_argument("--rate", type=float, default=1000.0, help="pub: messages/s, all segments together")
    parser.add_argument("--size", type=int, default=90, help="pub: payload bytes")
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--inflight-budget", type=int, default=16384)
    parser.add_argument("--max-queue", type=int, default=200_000)
    parser.add_argument("--metrics-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.role == "pub" and args.rate <= 0:
        parser.error("--rate must be positive")

    async def service(stop: asyncio.Event) -> int:
        await wait_for_broker(args.broker)
        return await (run_pub(args, stop) if args.role == "pub" else run_sub(args, stop))

    return run_service(service)


if __name__ == "__main__":
    sys.exit(main())
