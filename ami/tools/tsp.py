"""``ami tsp METER``: a local handheld terminal (TSP) session over CC_LOCALE.

The handheld plugs into the meter's local port (``ami/v1/local/...``, not the
PLC medium), opens an association ciphered under CC_LOCALE carrying a fresh
session key, then reads the meter under that session.

Its keys are its own (ami/tools/handheld.py): the CC_LOCALE and AK of the
meters on its round, loaded beforehand on the central system with
``ami keys handheld`` into the handheld folder (default ``DATA/tsp/``) and
sealed under the handheld's own KEK.  ``ami tsp`` reads only that folder (and
``network.json`` and its bus identity): it never imports nor opens the
head-end's store or KEK.  A meter that is not loaded is refused cleanly.

The handheld's send counter under each CC_LOCALE version is reserved in
``counters.json`` of that folder under an exclusive file lock (re-read,
moved, written and fsynced before use), inside the IC range the load gave
this handheld, so neither two overlapping runs nor two handhelds nor a crash
ever reuse an IV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from pathlib import Path

from ami.protocol import Opener, ProtocolError, ReceiveCounter, Sealer, SendCounter, Suite0Cipher, topics
from ami.protocol.association import (
    CHALLENGE_LEN,
    InitiateRequest,
    build_aarq,
    decode_initiate_response,
    encode_initiate_request,
    parse_aare,
    verify_hls_gmac,
)
from ami.protocol.counters import IC_LIMIT
from ami.protocol.errors import AssociationRejected, AuthenticationFailed
from ami.protocol.frames import GENERAL_DED_CIPHERING, GLO_INITIATE_REQUEST, parse_apdu, seal_apdu
from ami.protocol.keys import SecretBytes
from ami.protocol.messages import ReadReply, ReadRequest, decode_message, encode_message
from ami.runtime.bus import make_client
from ami.runtime.network import load_network
from ami.runtime.service import add_common_arguments
from ami.tools.handheld import HandheldError, counter_name, handheld_dir, read_local_keys, reserve

#: Counter values reserved per run: a run sends one APDU under CC_LOCALE (its AARQ).
COUNTER_BLOCK = 1


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
    ic_range: tuple[int, int] = (0, IC_LIMIT),
    handheld: Path | None = None,
) -> list[ReadReply]:
    """Associate with ``meter`` over its local port and read it ``reads`` times.

    The AARQ's invocation counter is reserved (durably, under the handheld
    folder's lock) inside ``ic_range`` before anything is sealed."""
    network = load_network(data_dir)
    concentrator = network.concentrator_of()[meter]
    meter_title = network.titles[meter]
    global_tx = reserve(handheld_dir(data_dir, handheld), counter_name(meter, key_version), COUNTER_BLOCK,
                        floor=ic_range[0], ceiling=ic_range[1])
    session_key = SecretBytes(secrets.token_bytes(16))
    initiate = encode_initiate_request(InitiateRequest(dedicated_key=session_key))
    apdu = seal_apdu(Suite0Cipher(cc_locale, ak), GLO_INITIATE_REQUEST, network.tsp_title, global_tx.take(), initiate)
    replies: list[ReadReply] = []
    async with make_client(broker, user="tsp", data_dir=data_dir, identifier=f"ami-tsp-{secrets.token_hex(4)}") as client:
        await client.subscribe(topics.local_out(concentrator, meter), qos=1)
        # A fresh challenge: the meter's AARE must prove it answers this AARQ
        # (an AARE replayed from an earlier visit cannot).
        challenge = secrets.token_bytes(CHALLENGE_LEN)
        await client.publish(
            topics.local_in(concentrator, meter), build_aarq(network.tsp_title, apdu, challenge), qos=1
        )
        async with asyncio.timeout(timeout):
            messages = client.messages.__aiter__()
            aare = parse_aare(bytes((await messages.__anext__()).payload))
            if not aare.accepted or aare.initiate_apdu is None:
                raise AssociationRejected("the meter refused the local association")
            if aare.responding_title != meter_title:
                raise AuthenticationFailed("answer from another meter")
            if aare.auth_value is None:
                raise AuthenticationFailed("the AARE does not answer our challenge")
            verify_hls_gmac(Suite0Cipher(cc_locale, ak), meter_title, aare.auth_value, challenge)
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
    parser.add_argument("--handheld", type=Path, help="the handheld's folder (default DATA/tsp)")


def main(args: argparse.Namespace, config: dict) -> int:
    async def _run() -> int:
        try:
            keys = read_local_keys(handheld_dir(args.data, args.handheld), args.meter)
            replies = await tsp_session(
                args.broker, args.data, args.meter, cc_locale=keys.cc_locale, ak=keys.ak,
                key_version=keys.cc_locale_version, reads=args.reads, timeout=args.timeout,
                ic_range=(keys.ic_start, keys.ic_end), handheld=args.handheld,
            )
        except HandheldError as exc:
            print(json.dumps({"meter": args.meter, "error": exc.reason, "detail": str(exc)}))
            return 1
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
