"""``ami provision``: play the manufacturer and the utility's provisioning system.

Writes into the output folder:

* ``factory-keys.jsonl``: one JSON object per meter with the fields
  ``meter``, ``system_title``, ``concentrator``, ``ccc``, ``ak``, ``cc_lan``,
  ``cc_locale`` (hex).  The meters load it as their factory memory; the
  head-end imports it into its store (wrapped under its KEK) at start.
  Created 0600: it is a file of secrets.
* ``network.json``: the topology (which meters sit on which concentrator's
  PLC segment) and the system titles of the head-end and the handheld (0600).
* ``bus/``: MQTT identities (one secret file per identity under
  ``bus/identities/``), password hashes, ACLs and TLS material for amqtt and
  Mosquitto (``ami.security.bus_files``); with ``--no-bus-security``, the
  ``bus-anonymous`` marker instead.

The folder itself is made 0700 (the store, the KEK, the meters' NVM and the
handheld's folder go there too): owner only.

Randomness comes from ``secrets``; nothing here is deterministic on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from ami.protocol import suite1
from ami.runtime.network import (
    FACTORY_FILE,
    HEADEND_TITLE,
    METER_SIGN_FILE,
    NETWORK_FILE,
    TSP_TITLE,
    Network,
    concentrator_id,
    load_network,
    meter_id,
    meter_title,
)
from ami.security.files import write_private
from ami.security.signing import write_headend_signing_key


def _write_private(path: Path, text: str) -> None:
    write_private(path, text.encode("ascii"))


SUITES = ("0", "1", "mixed")


def meter_suite(suite: str, index: int) -> int:
    """The security suite of meter number ``index`` (0-based): ``mixed``
    alternates (even: 0, odd: 1), so every segment holds both."""
    return {"0": 0, "1": 1}.get(suite, index % 2)


def provision(
    out_dir: Path, meters: int, concentrators: int, *, bus_security: bool = True, suite: str = "0"
) -> Network:
    if meters < 1 or concentrators < 1 or concentrators > meters:
        raise ValueError("need at least one meter per concentrator")
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (out_dir / FACTORY_FILE).exists():
        raise FileExistsError(f"{out_dir / FACTORY_FILE} exists: provision into a new folder")
    os.chmod(out_dir, 0o700)  # the data folder holds keys, the store, marks: owner only
    segments: dict[str, list[str]] = {concentrator_id(c + 1): [] for c in range(concentrators)}
    names = list(segments)
    lines = []
    sign_lines = []
    titles: dict[str, bytes] = {}
    for i in range(meters):
        n = i + 1
        conc = names[i * concentrators // meters]  # contiguous blocks, as on a feeder
        mid = meter_id(n)
        segments[conc].append(mid)
        titles[mid] = meter_title(n)
        record = {
            "meter": mid,
            "system_title": titles[mid].hex(),
            "concentrator": conc,
            "ccc": secrets.token_hex(16),
            "ak": secrets.token_hex(16),
            "cc_lan": secrets.token_hex(16),
            "cc_locale": secrets.token_hex(16),
        }
        if meter_suite(suite, i):
            # The meter's signing key pair: the private half goes to the
            # fleet's own file, only the public half to the head-end.
            scalar = suite1.scalar_from_rng(secrets.token_bytes)
            record["suite"] = 1
            record["sign_public"] = suite1.SoftwareSigner.from_scalar(scalar).public_key_bytes().hex()
            sign_lines.append(json.dumps({"meter": mid, "sign_private": scalar.hex()}))
        lines.append(json.dumps(record))
    _write_private(out_dir / FACTORY_FILE, "\n".join(lines) + "\n")
    headend_sign_public = None
    if sign_lines:
        _write_private(out_dir / METER_SIGN_FILE, "\n".join(sign_lines) + "\n")
        headend_scalar = suite1.scalar_from_rng(secrets.token_bytes)
        write_headend_signing_key(out_dir, headend_scalar)
        headend_sign_public = suite1.SoftwareSigner.from_scalar(headend_scalar).public_key_bytes()
    network = {
        "headend_system_title": HEADEND_TITLE.hex(),
        "tsp_system_title": TSP_TITLE.hex(),
        "segments": segments,
        "system_titles": {m: t.hex() for m, t in titles.items()},
    }
    if headend_sign_public is not None:
        network["headend_sign_public"] = headend_sign_public.hex()
    _write_private(out_dir / NETWORK_FILE, json.dumps(network, indent=1))  # 0600 like every data file
    if bus_security:
        from ami.security.bus_files import write_bus_security

        write_bus_security(out_dir, names)
    else:  # recorded, so that an open bus is a choice and never a fallback
        from ami.security.bus_files import write_anonymous_marker

        write_anonymous_marker(out_dir)
    return load_network(out_dir)


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    pcfg = config.get("provision", {})
    parser.add_argument("--meters", type=int, default=int(pcfg.get("meters", 1000)))
    parser.add_argument("--concentrators", type=int, default=int(pcfg.get("concentrators", 20)))
    parser.add_argument("--out", type=Path, default=Path(config.get("data", {}).get("dir", "data")))
    parser.add_argument("--no-bus-security", action="store_true", help="skip bus credentials, ACLs and TLS files")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the folder is already provisioned")
    parser.add_argument("--suite", choices=SUITES, default=str(pcfg.get("suite", "0")),
                        help="DLMS security suite of the meters: 0 (AES-GCM), 1 (ECDSA + ephemeral ECDH), mixed")


def main(args: argparse.Namespace, config: dict) -> int:
    if args.if_missing and (args.out / FACTORY_FILE).exists():
        print(f"{args.out}: already provisioned", file=sys.stderr)
        return 0
    network = provision(args.out, args.meters, args.concentrators, bus_security=not args.no_bus_security,
                        suite=args.suite)
    meters = sum(len(m) for m in network.segments.values())
    print(f"provisioned {meters} meters on {len(network.segments)} concentrators in {args.out}", file=sys.stderr)
    return 0
