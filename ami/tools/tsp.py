"""``ami tsp METER``: a local handheld terminal (TSP) session over CC_LOCALE.

The handheld plugs into the meter's local port (``ami/v1/local/...``, not the
PLC medium), opens an association ciphered under CC_LOCALE carrying a fresh
session key, then reads the meter under that session.  Its keys come from
the central system's store (unwrapped through the vault), as a utility's
handheld is loaded with the keys of the meters on its round.

The handheld's own send counter under each CC_LOCALE version is reserved in
``DATA/tsp/counters.json`` (written and fsynced before use), so two sessions
never reuse an IV even after a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

from ami.protocol import Opener, ProtocolError, ReceiveCounter, Sealer, SendCounter, Suite0Cipher, topics
from ami.protocol.association import (
    InitiateRequest,
    build_aarq,
    decode_initiate_response,
    encode_initiate_request,
    parse_aare,
)
from ami.protocol.errors import AssociationRejected, AuthenticationFailed
from ami.protocol.frames import GENERAL_DED_CIPHERING, GLO_INITIATE_REQUEST, parse_apdu, seal_apdu
from ami.protocol.keys import KeyType, SecretBytes
from ami.protocol.messages import ReadReply, ReadRequest, decode_message, encode_message
from ami.runtime.bus import make_client
from ami.runtime.network import load_network
from ami.runtime.service import add_common_arguments

COUNTER_BLOCK = 64


class CounterFile:
    """Durable high-water marks of the handheld's counters, one per (meter, key version)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marks: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}

    def reserve(self, name: str, counter: SendCounter) -> None:
        mark = counter.next_reservation(COUNTER_BLOCK)
        self.marks[name] = mark
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(self.marks, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        counter.confirm_reservation(mark)


async def load_local_keys(data_dir: Path, config: dict, meter: str) -> tuple[int, SecretBytes, SecretBytes]:
    """(CC_LOCALE version, CC_LOCALE, AK) of a meter from the head-end's store."""
    from ami.security.vault import open_vault
    from headend.store_api import open_store  # the central system hands the keys over

    hcfg = config.get("headend", {})
    vault = open_vault(hcfg.get("vault", "file:headend.kek"), data_dir=data_dir)
    store = open_store(hcfg.get("store", "sqlite:headend.db"), vault, data_dir)
    await store.open()
    try:
        version = await store.active_version(meter, KeyType.CC_LOCALE)
        return version, await store.active_key(meter, KeyType.CC_LOCALE), await store.active_key(meter, KeyType.AK)
    finally:
        await store.close()
        vault.close()


async def tsp_session(
    broker: str,
    data_dir: Path,
    meter: str,
    *,
    cc_locale: bytes,
    ak: bytes,
    key_version: int,
    reads: int = 1,
    timeout: float = 10.0,
) -> list[ReadReply]:
    """Associate with ``meter`` over its local port and read it ``reads`` times."""
    network = load_network(data_dir)
    concentrator = network.concentrator_of()[meter]
    meter_title = network.titles[meter]
    counters = CounterFile(Path(data_dir) / "tsp" / "counters.json")
    name = f"{meter}/cc_locale/{key_version}"
    global_tx = SendCounter(counters.marks.get(name, 0))
    counters.reserve(name, global_tx)
    session_key = SecretBytes(secrets.token_bytes(16))
    initiate = encode_initiate_request(InitiateRequest(dedicated_key=session_key))
    apdu = seal_apdu(Suite0Cipher(cc_locale, ak), GLO_INITIATE_REQUEST, network.tsp_title, global_tx.take(), initiate)
    replies: list[ReadReply] = []
    async with make_client(broker, user="tsp", data_dir=data_dir, identifier=f"ami-tsp-{secrets.token_hex(4)}") as client:
        await client.subscribe(topics.local_out(concentrator, meter), qos=1)
        await client.publish(topics.local_in(concentrator, meter), build_aarq(network.tsp_title, apdu), qos=1)
        async with asyncio.timeout(timeout):
            messages = client.messages.__aiter__()
            aare = parse_aare(bytes((await messages.__anext__()).payload))
            if not aare.accepted or aare.initiate_apdu is None:
                raise AssociationRejected("the meter refused the local association")
            if aare.responding_title != meter_title:
                raise AuthenticationFailed("answer from another meter")
            response = parse_apdu(aare.initiate_apdu)
            opener = Opener(Suite0Cipher(cc_locale, ak), meter_title, ReceiveCounter(0))
            decode_initiate_response(opener.open(response))
            # The local session key is fresh and lives only here: counters from 0.
            cipher = Suite0Cipher(session_key, ak)
            tx = SendCounter(0)
            tx.confirm_reservation(1 << 32)
            sealer = Sealer(cipher, network.tsp_title, tx, GENERAL_DED_CIPHERING)
            session_rx = Opener(cipher, meter_title, ReceiveCounter(0))
            for request_id in range(1, reads + 1):
                await client.publish(
                    topics.local_in(concentrator, meter), sealer.seal(encode_message(ReadRequest(request_id))), qos=1
                )
                reply = decode_message(session_rx.open(parse_apdu(bytes((await messages.__anext__()).payload))))
                if not isinstance(reply, ReadReply) or reply.request_id != request_id:
                    raise ProtocolError("unexpected answer to a read request")
                replies.append(reply)
    return replies


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    add_common_arguments(parser, config)
    parser.add_argument("meter", help="meter id, e.g. m000001")
    parser.add_argument("--reads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)


def main(args: argparse.Namespace, config: dict) -> int:
    async def _run() -> int:
        version, cc_locale, ak = await load_local_keys(args.data, config, args.meter)
        try:
            replies = await tsp_session(
                args.broker, args.data, args.meter, cc_locale=cc_locale, ak=ak, key_version=version,
                reads=args.reads, timeout=args.timeout,
            )
        except (ProtocolError, TimeoutError) as exc:
            print(json.dumps({"meter": args.meter, "error": getattr(exc, "reason", "timeout")}))
            return 1
        for r in replies:
            x = r.reading
            print(json.dumps({"meter": args.meter, "ts": x.ts, "energy_wh": x.energy_wh, "power_w": x.power_w,
                              "voltage_v": x.voltage_dv / 10}))
        return 0

    return asyncio.run(_run())


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: ami tsp METER")
