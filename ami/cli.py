"""``ami``: one command, a subcommand per job.

Each subcommand's module is imported only when it runs, so ``ami monitor``
does not pay for the head-end and a relay process imports nothing that could
decrypt (tests/test_concentrator.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .config import load_config

#: subcommand -> (module, help).  Each module has add_arguments(parser) and main(args, config) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "provision": ("ami.provision_cli", "generate factory keys, topology and bus credentials"),
    "broker": ("ami.broker_cli", "run the embedded amqtt broker"),
    "meters": ("meters.cli", "run a fleet of virtual meters"),
    "concentrator": ("concentrator.cli", "run blind concentrator relays"),
    "headend": ("headend.cli", "run the head-end (central system)"),
    "monitor": ("ami.dashboard", "live terminal dashboard of the monitor topics"),
    "keys": ("ami.operator", "key operations (keys rotate ...)"),
    "read": ("ami.operator_read", "on-demand read of a meter through the head-end"),
    "tsp": ("ami.tsp", "local handheld session with one meter over CC_LOCALE"),
    "loadtest": ("ami.loadtest.cli", "measure the whole pipeline under load"),
    "attack": ("ami.attack", "attacker's view: capture traffic, break a stolen store, HSM case"),
}


def add_common_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    parser.add_argument(
        "--broker", default=config.get("bus", {}).get("broker", "mqtt://127.0.0.1:1884"), help="mqtt://host:port"
    )
    parser.add_argument(
        "--data", type=Path, default=Path(config.get("data", {}).get("dir", "data")), help="provisioned network folder"
    )
    parser.add_argument("--log-level", default="info")


def build_parser(config: dict, command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only ``command``'s module is imported."""
    parser = argparse.ArgumentParser(prog="ami", description="Linky-style smart-meter security stack")
    parser.add_argument("--config", type=Path, help="extra TOML configuration file")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(p, config)
    return parser


def _command_in(argv: list[str]) -> str | None:
    for token in argv:
        if token in COMMANDS:
            return token
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --config must be known before the subparsers read their defaults.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    config = load_config(known.config)
    args = build_parser(config, _command_in(argv)).parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.main(args, config) or 0)


if __name__ == "__main__":
    sys.exit(main())
