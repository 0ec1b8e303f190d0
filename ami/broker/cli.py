"""``ami broker``: the embedded amqtt broker, with the network's credentials and ACLs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ami.runtime.bus import parse_broker_url
from ami.runtime.logs import configure_logging, get_logger
from ami.runtime.service import add_common_arguments, run_service


class _DropPortProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "No data to decode MQTT packet fixed header" not in message


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    parser.add_argument("--tls-port", type=int, help="also listen with TLS on this port")
    parser.add_argument(
        "--no-auth", action="store_true", help="open broker even when DATA/bus holds credentials (load tests)"
    )
    parser.add_argument(
        "--stop-grace", type=float, default=float(config.get("broker", {}).get("stop_grace_s", 3.0)), metavar="S",
        help="after SIGTERM, keep serving until the clients have left, at most S seconds ([broker] stop_grace_s): "
        "the other services stop at the same time and still publish (honcho kills at 5 s)",
    )


def main(args: argparse.Namespace, config: dict) -> int:
    from ami.broker.server import run_broker

    configure_logging(args.log_level, log_format=args.log_format)
    url = parse_broker_url(args.broker)
    bus_dir: Path | None = args.data / "bus"
    if args.no_auth or not (bus_dir / "credentials.json").exists():
        bus_dir = None
    log = get_logger("broker")
    # `ami` services probe the port before connecting (wait_for_broker): amqtt
    # reports each probe as an error; keep its log for real problems.
    logging.getLogger("amqtt.broker").addFilter(_DropPortProbes())

    async def _main(stop):
        await run_broker(
            url.host,
            url.port,
            bus_dir=bus_dir,
            tls_port=args.tls_port,
            stop=stop,
            on_ready=lambda: log.info("broker_ready", broker=str(url), auth=bus_dir is not None, tls_port=args.tls_port),
            grace=args.stop_grace,
        )
        log.info("broker_stopped", broker=str(url))
        return 0

    return run_service(_main)
