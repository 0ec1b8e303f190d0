"""``ami meters``: run a fleet of virtual meters (meters/fleet.py)."""

from __future__ import annotations

import argparse
import asyncio

from ami.runtime.bus import wait_for_broker
from ami.runtime.logs import configure_logging, get_logger
from ami.runtime.service import add_common_arguments, run_service
from ami.runtime.sharding import parse_list, parse_shard
from meters.fleet import FleetSettings, run_fleet
from meters.nvm import SegmentBusy


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a rate is a probability in [0, 1]")
    return value


def _bytes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a byte count is >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    m = config.get("meters", {})
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--segments", type=parse_list, help="serve these PLC segments (c0001,c0002); default all")
    where.add_argument("--shard", type=parse_shard, help="serve every n-th segment from the i-th (i/n, 1-based)")
    parser.add_argument("--id", "--ident", dest="ident", help="monitor id of this process (default from the segments served)")
    parser.add_argument("--time-compression", type=float, default=m.get("time_compression", 900.0),
                        help="meter seconds per wall second")
    parser.add_argument("--interval", type=int, default=m.get("interval_s", 1800), help="load-curve period (s)")
    parser.add_argument("--jitter", type=float, default=m.get("jitter", 0.8),
                        help="spread of pushes after each interval end, fraction of the interval")
    parser.add_argument("--rate", type=float, metavar="FPS",
                        help="load test: total readings/s, evenly spread (overrides compression and jitter)")
    parser.add_argument("--stamp", action="store_true", help="put sealed_ns (wall clock) in readings for latency")
    parser.add_argument("--pad", type=_bytes, default=0, metavar="BYTES",
                        help="load test: a 'pad' field of BYTES zero bytes in each pushed reading (sealed with it)")
    parser.add_argument("--tamper-rate", type=_rate, default=0.0,
                        help="probability per pushed reading of a tamper alarm")
    parser.add_argument("--outage-rate", type=_rate, default=0.0,
                        help="probability per pushed reading of a power outage (1-4 intervals)")
    parser.add_argument("--seed", type=int, help="seed of the fault injection")


def settings_from_args(args: argparse.Namespace, config: dict) -> FleetSettings:
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("--rate must be positive")
    return FleetSettings.from_config(
        config,
        broker=args.broker,
        data_dir=args.data,
        segments=args.segments,
        shard=args.shard,
        ident=args.ident,
        time_compression=args.time_compression,
        interval_s=args.interval,
        jitter=args.jitter,
        rate=args.rate,
        stamp=args.stamp,
        pad=args.pad,
        tamper_rate=args.tamper_rate,
        outage_rate=args.outage_rate,
        seed=args.seed,
    )


def main(args: argparse.Namespace, config: dict) -> int:
    configure_logging(args.log_level, log_format=args.log_format)
    log = get_logger("meters")
    settings = settings_from_args(args, config)

    async def service(stop: asyncio.Event) -> int:
        await wait_for_broker(settings.broker)
        return await run_fleet(settings, stop)

    try:
        return run_service(service)
    except (FileNotFoundError, ValueError, SegmentBusy) as exc:
        # SegmentBusy: another fleet serves one of our segments; we sent nothing.
        log.error("cannot start the fleet", error=str(exc))
        return 2
