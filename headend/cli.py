"""``ami headend``: run the central system."""

from __future__ import annotations

import argparse

from ami.runtime.bus import wait_for_broker
from ami.runtime.logs import configure_logging
from ami.runtime.service import add_common_arguments, run_service


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    hcfg = config.get("headend", {})
    parser.add_argument("--store", default=hcfg.get("store", "sqlite:headend.db"), help="sqlite:PATH or postgresql://...")
    parser.add_argument("--vault", default=hcfg.get("vault", "file:headend.kek"), help="file:PATH or pkcs11:...")
    parser.add_argument("--id", default="headend", help="identity on the monitor topics")


def main(args: argparse.Namespace, config: dict) -> int:
    from headend.service import HeadEndService

    configure_logging(args.log_level, log_format=args.log_format)
    config = dict(config)
    config["headend"] = {**config.get("headend", {}), "store": args.store, "vault": args.vault}

    async def _main(stop):
        await wait_for_broker(args.broker)
        return await HeadEndService(config, args.broker, args.data, args.id).run(stop)

    return run_service(_main)
