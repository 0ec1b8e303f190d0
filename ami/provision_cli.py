"""``ami provision``: write a new network's factory keys, topology and bus credentials."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .provision import provision


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    pcfg = config.get("provision", {})
    parser.add_argument("--meters", type=int, default=int(pcfg.get("meters", 1000)))
    parser.add_argument("--concentrators", type=int, default=int(pcfg.get("concentrators", 20)))
    parser.add_argument("--out", type=Path, default=Path(config.get("data", {}).get("dir", "data")))
    parser.add_argument("--no-bus-security", action="store_true", help="skip bus credentials, ACLs and TLS files")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the folder is already provisioned")


def main(args: argparse.Namespace, config: dict) -> int:
    if args.if_missing and (args.out / "factory-keys.jsonl").exists():
        print(f"{args.out}: already provisioned", file=sys.stderr)
        return 0
    network = provision(args.out, args.meters, args.concentrators, bus_security=not args.no_bus_security)
    meters = sum(len(m) for m in network.segments.values())
    print(f"provisioned {meters} meters on {len(network.segments)} concentrators in {args.out}", file=sys.stderr)
    return 0
