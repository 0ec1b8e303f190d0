"""Audit captured bus traffic: which key sealed each frame, and was any (key, IV) reused?

Works from what a test captured on the broker plus the factory keys (the
tests own the network, so they may read them): CC_LAN opens boot events,
AARQs and AAREs; every AARQ yields the session key it carried; session keys
open the DC frames.  A key is identified by a hash, never kept in output.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from ami.protocol import Suite0Cipher
from ami.protocol.association import decode_initiate_request, parse_aare, parse_aarq
from ami.protocol.errors import ProtocolError
from ami.protocol.frames import GENERAL_DED_CIPHERING, GENERAL_GLO_CIPHERING, open_apdu, parse_apdu
from ami.protocol.messages import GapFillReply, Reading, decode_message


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"audit" + key).hexdigest()[:16]


@dataclass
class Audit:
    ivs: dict[tuple[str, bytes, int], set[bytes]] = field(default_factory=lambda: defaultdict(set))
    readings: set[tuple[str, int]] = field(default_factory=set)
    unexplained: list[bytes] = field(default_factory=list)
    opened: int = 0

    def reused(self) -> dict:
        """(key, title, IC) used by two different frames."""
        return {k: v for k, v in self.ivs.items() if len(v) > 1}


def audit(frames: list[bytes], factory: dict[str, dict], headend_title: bytes) -> Audit:
    """``frames``: every distinct APDU seen on PLC up/down topics, in capture order."""
    by_title = {bytes.fromhex(r["system_title"]): r for r in factory.values()}
    lan = {r["meter"]: (bytes.fromhex(r["cc_lan"]), bytes.fromhex(r["ak"])) for r in factory.values()}
    sessions: dict[str, list[bytes]] = defaultdict(list)  # meter -> session keys seen in AARQs
    out = Audit()

    def note(key: bytes, title: bytes, ic: int, frame: bytes) -> None:
        out.ivs[(key_id(key), title, ic)].add(frame)
        out.opened += 1

    # First pass: AARQs give the session keys (a DC frame may precede its
    # AARQ in capture order across topics).
    meter_of_frame: dict[bytes, str] = {}
    for frame in frames:
        if frame[:1] == b"\x60":
            try:
                aarq = parse_aarq(frame)
                apdu = parse_apdu(aarq.initiate_apdu)
            except ProtocolError:
                continue
            for meter, (cc_lan, ak) in lan.items():
                try:
                    req = decode_initiate_request(open_apdu(Suite0Cipher(cc_lan, ak), apdu, aarq.calling_title))
                except ProtocolError:
                    continue
                sessions[meter].append(req.dedicated_key)
                note(cc_lan, aarq.calling_title, apdu.invocation_counter, frame)
                meter_of_frame[frame] = meter
                break
            else:
                out.unexplained.append(frame)
    for frame in frames:
        if frame in meter_of_frame:
            continue
        try:
            if frame[:1] == b"\x61":
                aare = parse_aare(frame)
                if not aare.accepted:
                    continue  # unciphered refusal: no IV used
                meter = by_title[aare.responding_title]["meter"]
                cc_lan, ak = lan[meter]
                apdu = parse_apdu(aare.initiate_apdu)
                open_apdu(Suite0Cipher(cc_lan, ak), apdu, aare.responding_title)
                note(cc_lan, aare.responding_title, apdu.invocation_counter, frame)
                continue
            apdu = parse_apdu(frame)
        except (ProtocolError, KeyError):
            out.unexplained.append(frame)
            continue
        title = apdu.system_title
        record = by_title.get(title)
        if apdu.tag == GENERAL_GLO_CIPHERING and record:
            cc_lan, ak = lan[record["meter"]]
            open_apdu(Suite0Cipher(cc_lan, ak), apdu)
            note(cc_lan, title, apdu.invocation_counter, frame)
            continue
        if apdu.tag != GENERAL_DED_CIPHERING:
            out.unexplained.append(frame)
            continue
        # DC: uplink from a meter (its title) or downlink from the head-end.
        meters = [record["meter"]] if record else list(sessions)
        for meter in meters:
            ak = lan[meter][1]
            for key in reversed(sessions[meter]):
                try:
                    plaintext = open_apdu(Suite0Cipher(key, ak), apdu)
                except ProtocolError:
                    continue
                note(key, title, apdu.invocation_counter, frame)
                if record:
                    msg = decode_message(plaintext)
                    if isinstance(msg, Reading):
                        out.readings.add((meter, msg.seq))
                    elif isinstance(msg, GapFillReply):
                        out.readings.update((meter, r.seq) for r in msg.readings)
                break
            else:
                continue
            break
        else:
            out.unexplained.append(frame)
    return out
