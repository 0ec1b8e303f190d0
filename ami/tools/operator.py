"""Operator commands to the head-end over the bus: ``ami keys rotate`` and ``ami read``.

(``ami keys handheld`` is the one local key operation: it loads a handheld,
see ami/tools/handheld.py.)

A command is a JSON object on ``ami/v1/control/headend/commands`` naming a
reply topic under ``ami/v1/control/replies/``; the head-end answers there
(first an acceptance, then, for rotations, the result when every meter is
done).  Only the ``operator`` bus user may publish commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ami.protocol import topics
from ami.runtime.bus import make_client
from ami.runtime.service import add_common_arguments
from ami.tools.handheld import add_load_arguments, load_main


async def request(
    broker: str, data_dir, command: dict[str, Any], *, timeout: float, until_done: bool
) -> AsyncIterator[dict[str, Any]]:
    """Send one command and yield the head-end's replies."""
    cid = uuid.uuid4().hex[:16]
    reply_topic = topics.control_reply(cid)
    command = {**command, "id": cid, "reply": reply_topic}
    async with make_client(broker, user="operator", data_dir=data_dir, identifier=f"ami-operator-{cid}") as client:
        await client.subscribe(reply_topic, qos=1)
        await client.publish(topics.HEADEND_COMMANDS, json.dumps(command).encode(), qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                body = json.loads(message.payload)
                yield body
                if "error" in body or not until_done or body.get("done"):
                    return


def add_keys_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    rotate = sub.add_parser("rotate", help="renew session keys or reprogram CC_LAN/CC_LOCALE/AK under CCC")
    add_common_arguments(rotate, config)
    target = rotate.add_mutually_exclusive_group(required=True)
    target.add_argument("--meter", action="append", help="meter id (repeatable)")
    target.add_argument("--all", action="store_true", help="every meter")
    rotate.add_argument("--key", choices=["session", "cc_lan", "cc_locale", "ak"], default="session")
    rotate.add_argument("--timeout", type=float, default=300.0)
    rotate.add_argument("--no-wait", action="store_true", help="return once the head-end accepted the command")
    handheld = sub.add_parser("handheld", help="load a handheld with its round's CC_LOCALE and AK (central system)")
    add_common_arguments(handheld, config)
    add_load_arguments(handheld)
    signing = sub.add_parser("signing-key", help="suite 1: the head-end's signing key in its vault (PKCS#11: made "
                                                 "in the token); its public half goes to network.json for the meters")
    add_common_arguments(signing, config)
    signing.add_argument("--vault", default=config.get("headend", {}).get("vault", "file:headend.kek"))


def keys_main(args: argparse.Namespace, config: dict) -> int:
    if args.keys_command == "handheld":
        return load_main(args, config)  # runs here, on the central system: not a bus command
    if args.keys_command == "signing-key":
        return signing_key_main(args)
    command = {"op": "rotate", "key": args.key, "meters": "all" if args.all else args.meter}
    return asyncio.run(_print_replies(args, command, until_done=not args.no_wait))


async def _print_replies(args: argparse.Namespace, command: dict, *, until_done: bool) -> int:
    try:
        async for body in request(args.broker, args.data, command, timeout=args.timeout, until_done=until_done):
            print(json.dumps(body))
            if "error" in body or body.get("failed"):
                return 1
    except TimeoutError:
        print(json.dumps({"error": f"no answer within {args.timeout} s"}))
        return 1
    return 0


def signing_key_main(args: argparse.Namespace) -> int:
    """Create (PKCS#11: inside the token) or find the head-end's suite-1
    signing key and write its public half to network.json; meters read it
    there (restart the fleet after a change)."""
    from ami.runtime.network import NETWORK_FILE
    from ami.security.files import write_private
    from ami.security.signing import load_headend_signer
    from ami.security.vault import open_vault

    vault = open_vault(args.vault, data_dir=args.data)
    try:
        signer = load_headend_signer(vault, args.data, create=True)
    finally:
        vault.close()
    if signer is None:
        print(json.dumps({"error": "no signing key: provision with --suite 1|mixed, or use a pkcs11: vault"}))
        return 1
    path = args.data / NETWORK_FILE
    network = json.loads(path.read_text())
    public = signer.public_key_bytes().hex()
    changed = network.get("headend_sign_public") != public
    network["headend_sign_public"] = public
    write_private(path, json.dumps(network, indent=1).encode())
    print(json.dumps({"headend_sign_public": public, "vault": args.vault, "changed": changed}))
    return 0


def add_read_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    parser.add_argument("meter", help="meter id, e.g. m000001")
    parser.add_argument("--timeout", type=float, default=30.0)


def read_main(args: argparse.Namespace, config: dict) -> int:
    return asyncio.run(_print_replies(args, {"op": "read", "meter": args.meter}, until_done=False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: ami keys rotate ... / ami read METER")
