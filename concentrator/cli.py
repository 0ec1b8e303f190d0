"""``ami concentrator``: run blind relays, many per process (concentrator/relay.py).

Imports only the relay and the shared runtime: nothing that could decrypt.
"""

from __future__ import annotations

import argparse
import asyncio

from ami.runtime.bus import wait_for_broker
from ami.runtime.logs import configure_logging, get_logger
from ami.runtime.service import add_common_arguments, run_service
from ami.runtime.sharding import parse_list, parse_shard
from concentrator.relay import RelayProcess, RelaySettings


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    c = config.get("concentrator", {})
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--concentrators", type=parse_list, help="relay these concentrators (c0001,c0002); default all")
    which.add_argument("--shard", type=parse_shard, help="relay every n-th concentrator from the i-th (i/n, 1-based)")
    parser.add_argument("--id", "--ident", dest="ident", help="monitor id of this process (default: relays)")
    parser.add_argument("--batch-max-frames", type=int, default=c.get("batch_max_frames", 200))
    parser.add_argument("--batch-max-delay-ms", type=float, default=c.get("batch_max_delay_ms", 50))


def main(args: argparse.Namespace, config: dict) -> int:
    configure_logging(args.log_level, log_format=args.log_format)
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
