"""What every service reports on ``ami/v1/monitor/...``.

* ``.../{component}/{id}/status``: retained ``online``; the Last Will (set on
  the connection by ``ami.runtime.bus.make_client``) turns it ``offline``.
* ``.../{component}/{id}/metrics``: a retained JSON snapshot every few
  seconds: counters, gauges, rejections by reason.
* ``ami/v1/monitor/headend/events``: JSON events (rejections, key changes,
  alarms), never retained.

Nothing here ever receives key material: callers pass counts and ids only,
and ``publish_event`` drops any bytes value defensively.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import psutil

from ami.protocol import topics
from ami.protocol.errors import ALL_REASONS
from ami.runtime.bus import make_client
from ami.runtime.link import run_link


class Metrics:
    """Counters and gauges of one service process, cheap to update."""

    def __init__(self, component: str, ident: str) -> None:
        self.component = component
        self.ident = ident
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter({reason: 0 for reason in ALL_REASONS})
        self.gauges: dict[str, float | int] = {}
        self.started = time.time()
        self._process = psutil.Process(os.getpid())

    def incr(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] += n
        self.counters["rejected"] += n

    def snapshot(self) -> dict[str, Any]:
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            rss = self._process.memory_info().rss
        return {
            "component": self.component,
            "id": self.ident,
            "time": time.time(),
            "uptime_s": round(time.time() - self.started, 3),
            "counters": dict(self.counters),
            "rejected": dict(self.rejected),
            "gauges": dict(self.gauges),
            "process": {"pid": os.getpid(), "cpu_s": round(cpu.user + cpu.system, 3), "rss_bytes": rss},
        }


def _clean(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


async def publish_status(client: aiomqtt.Client, metrics: Metrics, status: str) -> None:
    await client.publish(topics.monitor_status(metrics.component, metrics.ident), status.encode(), qos=1, retain=True)


async def run_monitor(
    broker: str,
    user: str | None,
    data_dir: Path | None,
    metrics: Metrics,
    interval: float,
    refresh: Callable[[], None],
    done: asyncio.Event,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """A process-level monitor connection: retained status and metrics.

    Publishes ``online`` and a metrics snapshot every ``interval`` until
    ``done`` is set, then a final snapshot and ``offline`` (the Last Will says
    ``offline`` if the process dies first).  Survives broker restarts:
    reconnects (counted as ``monitor_reconnects``) and announces itself
    again; never raises on a lost broker.  Once ``done`` or ``stop`` (the
    process's SIGTERM) is set it no longer reconnects: the connection it has
    still publishes until ``done``.
    """
    status = topics.monitor_status(metrics.component, metrics.ident)
    metrics_topic = topics.monitor_metrics(metrics.component, metrics.ident)

    def connect() -> aiomqtt.Client:
        return make_client(broker, user=user, data_dir=data_dir, status_topic=status)

    async def session(client: aiomqtt.Client) -> None:
        await publish_status(client, metrics, "online")
        while not done.is_set():
            refresh()
            await client.publish(metrics_topic, json.dumps(metrics.snapshot()).encode(), qos=0, retain=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), interval)
        refresh()
        await client.publish(metrics_topic, json.dumps(metrics.snapshot()).encode(), qos=1, retain=True)
        await publish_status(client, metrics, "offline")

    stops = (done,) if stop is None else (done, stop)
    await run_link(connect, session, stop=stops, metrics=metrics, counter="monitor_reconnects", name="monitor")


def event_payload(kind: str, **fields: Any) -> bytes:
    return json.dumps({"time": time.time(), "kind": kind, **_clean(fields)}).encode()
