"""The process-level monitor connection: retained status and metrics.

Survives broker restarts (reconnects, re-announces ``online``); on the way
out publishes a last metrics snapshot and ``offline``.  The Last Will says
``offline`` if the process dies without doing so.

(concentrator/monitoring.py is the same file: the relay may not import
meters.  Both would move to ami.monitor as one helper.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from ami.bus import make_client
from ami.logs import get_logger
from ami.monitor import Metrics, publish_status
from ami.protocol import topics

log = get_logger("monitor")


async def run_monitor(
    broker: str,
    user: str,
    data_dir: Path | None,
    metrics: Metrics,
    interval: float,
    refresh: Callable[[], None],
    done: asyncio.Event,
) -> None:
    """Publish status and metrics until ``done`` is set, then a final
    snapshot and ``offline``.  Never raises on a lost broker: retries."""
    status = topics.monitor_status(metrics.component, metrics.ident)
    metrics_topic = topics.monitor_metrics(metrics.component, metrics.ident)
    backoff = 0.5
    while True:
        client = make_client(broker, user=user, data_dir=data_dir, status_topic=status)
        try:
            async with client:
                await publish_status(client, metrics, "online")
                backoff = 0.5
                while not done.is_set():
                    refresh()
                    await client.publish(metrics_topic, json.dumps(metrics.snapshot()).encode(), qos=0, retain=True)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done.wait(), interval)
                refresh()
                await client.publish(metrics_topic, json.dumps(metrics.snapshot()).encode(), qos=1, retain=True)
                await publish_status(client, metrics, "offline")
                return
        except aiomqtt.MqttError as exc:
            if done.is_set():
                log.warning("could not publish the final status", error=str(exc))
                return
            log.warning("monitor connection lost", error=str(exc))
            metrics.incr("monitor_reconnects")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), backoff)
            backoff = min(backoff * 2, 10.0)
