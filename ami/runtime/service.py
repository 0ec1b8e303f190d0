"""Run a service coroutine under uvloop until SIGTERM/SIGINT, then stop cleanly.

Services take a ``stop`` event: set on the first signal so they can flush,
persist their counters and publish ``offline``; a second signal cancels.

Once stopping, a broker that vanishes (``honcho`` signals every process at
once) is expected: connection errors that aiomqtt/paho report late (an
unretrieved disconnection future, a watch on a closed socket, paho's
"failed to receive on socket") become one debug line each instead of a
traceback.  Before ``stop`` they stay visible.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt

from ami.runtime.logs import LOG_FORMATS, get_logger

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
    uvloop = None


log = get_logger("service")


def _connection_noise(exc: BaseException | None) -> bool:
    """A lost connection (MQTT error, refused/reset socket, closed descriptor)."""
    return isinstance(exc, (aiomqtt.MqttError, OSError))


#: paho's words for a connection the broker dropped: ``ami.runtime.link``
#: already reports the loss (once per outage), so these are debug lines.
_LOSS_MESSAGES = ("failed to receive on socket",)


class _QuietAfterStop(logging.Filter):
    """On paho's/aiomqtt's logger: a lost connection is the link's to report,
    and once stopping it is no news at all."""

    def __init__(self) -> None:
        super().__init__()
        self.stop: asyncio.Event | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        stopping = self.stop is not None and self.stop.is_set()
        if not stopping and not record.getMessage().startswith(_LOSS_MESSAGES):
            return True
        log.debug("late connection message after stop", logger=record.name, message=record.getMessage())
        return False


def run_service(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    quiet = _QuietAfterStop()

    async def _wrapper() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()
        hits = 0

        def _on_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if stop.is_set() and _connection_noise(exc):
                log.debug("late connection error after stop", error=repr(exc), context=context.get("message"))
                return
            loop.default_exception_handler(context)

        loop.set_exception_handler(_on_loop_exception)
        quiet.stop = stop

        def _on_signal() -> None:
            nonlocal hits
            hits += 1
            if hits == 1:
                stop.set()
            elif task is not None:
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal)
        try:
            return int(await main(stop) or 0)
        except asyncio.CancelledError:
            return 130

    mqtt_logger = logging.getLogger("mqtt")  # aiomqtt's, which paho logs to as well
    mqtt_logger.addFilter(quiet)
    try:
        if uvloop is not None:
            return uvloop.run(_wrapper())
        return asyncio.run(_wrapper())
    finally:
        mqtt_logger.removeFilter(quiet)


def add_common_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    parser.add_argument(
        "--broker", default=config.get("bus", {}).get("broker", "mqtt://127.0.0.1:1884"), help="mqtt://host:port"
    )
    parser.add_argument(
        "--data", type=Path, default=Path(config.get("data", {}).get("dir", "data")), help="provisioned network folder"
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=None,
        help="console (readable) or json lines; default $AMI_LOG_FORMAT, else console on a terminal, json otherwise",
    )
