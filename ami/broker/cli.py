"""``ami broker``: the embedded amqtt broker, with the network's credentials and ACLs."""

from __future__ import annotations

import argparse
import logging
import sys
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
        "--no-auth", action="store_true",
        help="open broker, no password and no ACL, even for a network provisioned with bus security (load tests)",
    )
    parser.add_argument(
        "--stop-grace", type=float, default=float(config.get("broker", {}).get("stop_grace_s", 3.0)), metavar="S",
        help="after SIGTERM, keep serving until the clients have left, at most S seconds ([broker] stop_grace_s): "
        "the other services stop at the same time and still publish (honcho kills at 5 s)",
    )


class BrokerConfigError(Exception):
    """The broker cannot run as this network requires it to."""


def broker_bus_dir(data: Path, *, no_auth: bool, tls: bool = False) -> Path | None:
    """The bus dir whose hashes and ACL the broker enforces, or None for an open broker.

    Fail closed: open only with ``--no-auth`` or for a network provisioned with
    ``--no-bus-security`` (its marker); a secured network whose broker files are
    missing, or a folder that is not provisioned at all, is an error.
    """
    from ami.security.bus_files import BusSecurity, bus_mode

    if no_auth:
        return None
    mode = bus_mode(data)
    if mode == "anonymous":
        return None
    if mode == "unprovisioned":
        raise BrokerConfigError(
            f"{data} is not a provisioned network (no bus/ folder, no bus-anonymous marker): run `ami provision` "
            "first, or pass --no-auth to run an open broker on purpose"
        )
    sec = BusSecurity.at(data / "bus")
    needed = [sec.amqtt_passwd] + ([sec.ca, sec.server_cert, sec.server_key] if tls else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise BrokerConfigError(
            f"{data} was provisioned with bus security but the broker's files are missing ({', '.join(missing)}): "
            "re-run `ami provision` for this folder; refusing to run without authentication "
            "(--no-auth to do so on purpose)"
        )
    return sec.bus_dir


def main(args: argparse.Namespace, config: dict) -> int:
    from ami.broker.flow import FlowSettings
    from ami.broker.server import run_broker

    configure_logging(args.log_level, log_format=args.log_format)
    url = parse_broker_url(args.broker)
    log = get_logger("broker")
    try:
        bus_dir = broker_bus_dir(args.data, no_auth=args.no_auth, tls=args.tls_port is not None)
    except BrokerConfigError as exc:
        print(f"ami broker: {exc}", file=sys.stderr)
        return 2
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
            flow=FlowSettings.from_config(config.get("broker", {})),
            on_flow=lambda stats: log.info("broker_flow", **stats),  # held, dropped, queue_max, ...: ami/broker/flow.py
        )
        log.info("broker_stopped", broker=str(url))
        return 0

    return run_service(_main)
