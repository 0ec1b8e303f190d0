"""``ami concentrator``: run blind relays, many per process (concentrator/relay.py).

Imports only the relay and the shared runtime: nothing that could decrypt.
"""

from __future__ import annotations

import argparse
import asyncio

from ami.bus import wait_for_broker
from ami.cli import add_common_arguments
from ami.logs import configure_logging, get_logger
from ami.runner import run_service

from .relay import RelayProcess, RelaySettings


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/", 1))
    except ValueError:
        raise argparse.ArgumentTypeError("--shard takes i/n, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError("--shard i/n needs 1 <= i <= n")
    return i, n


def _list(text: str) -> list[str]:
    return [x for x in (p.strip() for p in text.split(",")) if x]


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    c = config.get("concentrator", {})
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--concentrators", type=_list, help="relay these concentrators (c0001,c0002); default all")
    which.add_argument("--shard", type=_shard, help="relay every n-th concentrator from the i-th (i/n, 1-based)")
    parser.add_argument("--id", "--ident", dest="ident", help="monitor id of this process (default: relays)")
    parser.add_argument("--batch-max-frames", type=int, default=c.get("batch_max_frames", 200))
    parser.add_argument("--batch-max-delay-ms", type=float, default=c.get("batch_max_delay_ms", 50))


def main(args: argparse.Namespace, config: dict) -> int:
    configure_logging(args.log_level)
    log = get_logger("concentrator")
    try:
        settings = RelaySettings.from_config(
            config,
            broker=args.broker,
            data_dir=args.data,
            concentrators=args.concentrators,
            shard=args.shard,
            ident=args.ident,
            batch_max_frames=args.batch_max_frames,
            batch_max_delay_ms=args.batch_max_delay_ms,
        )
        process = RelayProcess(settings)
    except (FileNotFoundError, ValueError) as exc:
        log.error("cannot start the relays", error=str(exc))
        return 2

    async def service(stop: asyncio.Event) -> int:
        await wait_for_broker(settings.broker)
        return await process.run(stop)

    return run_service(service)
