"""``ami``: one command, a subcommand per job.

Each subcommand's module is imported only when it runs, so ``ami monitor``
does not pay for the head-end and a relay process imports nothing that could
decrypt (tests/test_concentrator.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from ami.runtime.config import config_file, load_config

#: subcommand -> (module, help).  The module has ``add_arguments(parser, config)`` and
#: ``main(args, config) -> int``; ``"module:name"`` names ``add_name_arguments`` and ``name_main``
#: instead, for a module that serves several subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "provision": ("ami.tools.provision", "generate factory keys, topology and bus credentials"),
    "broker": ("ami.broker.cli", "run the embedded amqtt broker"),
    "meters": ("meters.cli", "run a fleet of virtual meters"),
    "concentrator": ("concentrator.cli", "run blind concentrator relays"),
    "headend": ("headend.cli", "run the head-end (central system)"),
    "monitor": ("ami.tools.monitor", "live terminal dashboard of the monitor topics"),
    "keys": ("ami.tools.operator:keys", "key operations (keys rotate ...)"),
    "read": ("ami.tools.operator:read", "on-demand read of a meter through the head-end"),
    "tsp": ("ami.tools.tsp", "local handheld session with one meter over CC_LOCALE"),
    "loadtest": ("ami.tools.loadtest.cli", "measure the whole pipeline under load"),
    "attack": ("ami.tools.attack.cli", "attacker's view: capture traffic, break a stolen store, HSM case"),
    "cluster": ("ami.tools.cluster", "a local RabbitMQ cluster for the clustered head-end (up/down/status)"),
    "headend-worker": ("headend.worker_cli", "run one clustered head-end worker (RabbitMQ cluster + PostgreSQL)"),
    "config": ("ami.tools.config", "print the effective configuration and where each value comes from"),
}


def build_parser(config: dict, command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only ``command``'s module is imported."""
    parser = argparse.ArgumentParser(prog="ami", description="Linky-style smart-meter security stack")
    parser.add_argument("--config", type=Path, help="extra TOML configuration file")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            add_arguments, _main = _entry_points(module_name)
            add_arguments(p, config)
    return parser


def _entry_points(spec: str) -> tuple[Callable[..., None], Callable[..., int | None]]:
    module_name, _, name = spec.partition(":")
    module = importlib.import_module(module_name)
    if not name:
        return module.add_arguments, module.main
    return getattr(module, f"add_{name}_arguments"), getattr(module, f"{name}_main")


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
    config_path = config_file(known.config)
    config = load_config(config_path)
    args = build_parser(config, _command_in(argv)).parse_args(argv)
    # The file this command runs on, for the processes it starts (the load
    # test's services get it as $AMI_CONFIG): absolute, None without a file.
    args.config_file = str(config_path.resolve()) if config_path is not None else None
    _add_arguments, command_main = _entry_points(args._module)
    return int(command_main(args, config) or 0)


if __name__ == "__main__":
    sys.exit(main())
