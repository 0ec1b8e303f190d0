"""Run a service coroutine under uvloop until SIGTERM/SIGINT, then stop cleanly.

Services take a ``stop`` event: set on the first signal so they can flush,
persist their counters and publish ``offline``; a second signal cancels.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
    uvloop = None


def run_service(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    async def _wrapper() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()
        hits = 0

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

    if uvloop is not None:
        return uvloop.run(_wrapper())
    return asyncio.run(_wrapper())


def add_common_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    parser.add_argument(
        "--broker", default=config.get("bus", {}).get("broker", "mqtt://127.0.0.1:1884"), help="mqtt://host:port"
    )
    parser.add_argument(
        "--data", type=Path, default=Path(config.get("data", {}).get("dir", "data")), help="provisioned network folder"
    )
    parser.add_argument("--log-level", default="info")
