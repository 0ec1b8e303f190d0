"""What a capture holds and what a key ring opens in it.

Frames unpacked from captured PLC messages and WAN batches (once each),
their kind, their ciphertext; the attacker's key ring (where each key came
from); decryption of every frame the ring allows, learning session keys
from AARQs and new global keys from key_transfers as it goes; the keystream
probe (confidentiality without the tag).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ami.protocol import topics
from ami.protocol.association import (
    decode_initiate_request,
    decode_initiate_response,
    parse_aare,
    parse_aarq,
)
from ami.protocol.cipher import Suite0Cipher
from ami.protocol.errors import ProtocolError, UnsupportedSecurity
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    open_apdu,
    parse_apdu,
)
from ami.protocol.keys import (
    KeyType,
    SecuritySetup,
    decode_key_transfer,
    key_type_for,
)
from ami.protocol.messages import (
    GapFillReply,
    KeyTransfer,
    Reading,
    decode_batch,
    decode_message,
)
from ami.protocol.suite1 import Suite1Cipher
from ami.runtime.network import HEADEND_TITLE

AARQ_TAG, AARE_TAG = 0x60, 0x61


_TAG_LEN = 12


@dataclass(slots=True)
class Frame:
    """One APDU seen on the wire, with what the topic or batch says about it."""

    t: float
    direction: str  # "up" (meter -> head-end) or "down"
    concentrator: str
    meter: str
    data: bytes
    hop: str  # "plc" or "wan"


def frames_from_records(records: Iterable[dict[str, Any]]) -> tuple[list[Frame], Counter]:
    """Unpack PLC messages and WAN batches into frames, once each (a frame is
    seen twice by a broker operator: on the PLC and the WAN hop)."""
    stats: Counter = Counter()
    seen: set[tuple[str, str, bytes]] = set()
    frames: list[Frame] = []

    def add(t: float, direction: str, c: str, m: str, data: bytes, hop: str) -> None:
        key = (direction, m, data)
        if key in seen:
            stats["duplicate_frames"] += 1
            return
        seen.add(key)
        frames.append(Frame(t, direction, c, m, data, hop))

    for rec in sorted(records, key=lambda r: r["t"]):
        stats["messages"] += 1
        topic, payload, t = rec["topic"], bytes(rec["p"]), float(rec["t"])
        if (segment := topics.parse_plc_up(topic)) is not None:
            concentrator, meter = segment
            add(t, "up", concentrator, meter, payload, "plc")
        elif (segment := topics.parse_plc_down(topic)) is not None:
            concentrator, meter = segment
            add(t, "down", concentrator, meter, payload, "plc")
        elif (wan := topics.parse_wan(topic)) is not None:
            _concentrator, direction = wan
            try:
                batch = decode_batch(payload)
            except ProtocolError:
                stats["undecodable_batches"] += 1
                continue
            stats["batches"] += 1
            for label, apdu in batch.frames:
                add(t, direction, batch.concentrator, label, bytes(apdu), "wan")
        else:
            stats["other_topics"] += 1
    return frames, stats


def kind_of(data: bytes) -> str:
    if data[:1] == bytes((AARQ_TAG,)):
        return "aarq"
    if data[:1] == bytes((AARE_TAG,)):
        try:
            return "aare" if parse_aare(data).accepted else "aare_rejected"
        except ProtocolError:
            return "malformed"
    try:
        tag = parse_any_suite(data).tag
    except ProtocolError:
        return "malformed"
    return {GENERAL_DED_CIPHERING: "dc", GENERAL_GLO_CIPHERING: "db"}.get(tag, "apdu_other")


def parse_any_suite(data: bytes):
    """parse_apdu for a frame of suite 0 or suite 1 (its SC says which)."""
    try:
        return parse_apdu(data)
    except UnsupportedSecurity:
        return parse_apdu(data, suite=1)


def body_of(data: bytes) -> bytes | None:
    """The ciphertext of a frame (AARQ/AARE: of the InitiateRequest/Response inside)."""
    try:
        if data[:1] == bytes((AARQ_TAG,)):
            data = parse_aarq(data).initiate_apdu
        elif data[:1] == bytes((AARE_TAG,)):
            inner = parse_aare(data).initiate_apdu
            if inner is None:
                return None
            data = inner
        return parse_any_suite(data).body[:-_TAG_LEN]
    except ProtocolError:
        return None


def decodes_as_plaintext(body: bytes) -> bool:
    """Would this ciphertext, read as it is, decode as one of our messages?"""
    for decode in (decode_message, decode_initiate_request, decode_initiate_response):
        try:
            decode(body)
            return True
        except ProtocolError:
            continue
        except Exception:  # noqa: BLE001 - any decoder failure means "not plaintext"
            continue
    return False


@dataclass(eq=False, slots=True)
class Known:
    """A key the attacker holds, and where it came from."""

    key: bytes = field(repr=False)
    origin: str  # "store:v1:expired", "factory", "key_transfer", "aarq", "store:session", "blob"
    superseded: bool = False
    carrier: "Known | None" = None  # for a session key: the CC_LAN that transported it


class KeyRing:
    def __init__(self) -> None:
        self.glob: dict[str, dict[KeyType, list[Known]]] = defaultdict(lambda: defaultdict(list))
        self.sessions: dict[str, list[Known]] = defaultdict(list)
        self._seen: set[tuple[str, str, bytes]] = set()

    def add_global(self, meter: str, kt: KeyType, key: bytes, origin: str, superseded: bool = False) -> Known | None:
        ident = (meter, kt.value, bytes(key))
        if ident in self._seen:
            return None
        self._seen.add(ident)
        k = Known(bytes(key), origin, superseded)
        # Newest first: the current key is the one that opens most frames.
        self.glob[meter][kt].insert(0, k)
        return k

    def add_session(self, meter: str, key: bytes, origin: str, carrier: Known | None = None) -> Known:
        """Add a session key (or, if known already, fill in which CC_LAN carried it)."""
        for k in self.sessions[meter]:
            if k.key == bytes(key):
                if k.carrier is None:
                    k.carrier = carrier
                return k
        k = Known(bytes(key), origin, carrier=carrier)
        self.sessions[meter].insert(0, k)
        return k


class _Ciphers:
    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes, int], Suite0Cipher] = {}

    def get(self, enc: bytes, ak: bytes, suite: int = 0) -> Suite0Cipher:
        c = self._cache.get((enc, ak, suite))
        if c is None:
            c = self._cache[(enc, ak, suite)] = Suite1Cipher(enc, ak) if suite else Suite0Cipher(enc, ak)
        return c


@dataclass(slots=True)
class Opened:
    kind: str
    key: Known
    message: Any = None
    session_key: bytes | None = field(default=None, repr=False)


@dataclass(slots=True)
class TrafficResult:
    frames: int
    kinds: Counter
    opened: dict[int, Opened]
    frame_list: list[Frame]
    readings: dict[tuple[str, int], tuple[int, int, int, int]]  # (meter, seq) -> (ts, e, p, u)
    readings_old_cc_lan: set[tuple[str, int]]
    keys_learned: int
    sessions_recovered: int
    kind_list: list[str]

    def by_suite(self, suite_of: dict[str, int]) -> dict[str, dict[str, int]]:
        """The same counts, for the meters of each security suite (``suite_of``:
        meter -> suite, from the stolen store)."""
        out: dict[str, dict[str, int]] = {}
        for suite in sorted(set(suite_of.values())):
            idx = [i for i, f in enumerate(self.frame_list) if suite_of.get(f.meter, 0) == suite]
            dc = [i for i in idx if self.kind_list[i] == "dc"]
            mine = {m for m, s in suite_of.items() if s == suite}
            out[str(suite)] = {
                "meters": len(mine),
                "frames": len(idx),
                "frames_decrypted": sum(1 for i in idx if i in self.opened),
                "aarq_total": sum(1 for i in idx if self.kind_list[i] == "aarq"),
                "session_keys_recovered_from_aarqs": sum(
                    1 for i in idx if i in self.opened and self.opened[i].session_key is not None),
                "dc_total": len(dc),
                "dc_decrypted": sum(1 for i in dc if i in self.opened),
                "readings_decrypted": sum(1 for (m, _seq) in self.readings if m in mine),
            }
        return out

    def summary(self) -> dict[str, Any]:
        opened_kinds = Counter(o.kind for o in self.opened.values())
        messages = Counter(type(o.message).__name__ for o in self.opened.values() if o.message is not None)
        dc = [i for i, k in enumerate(self.kind_list) if k == "dc"]
        reading_frames = sum(
            1 for o in self.opened.values() if isinstance(o.message, (Reading, GapFillReply))
        )
        return {
            "frames": self.frames,
            "frames_by_kind": dict(sorted(self.kinds.items())),
            "frames_decrypted": len(self.opened),
            "decrypted_by_kind": dict(sorted(opened_kinds.items())),
            "aarq_total": self.kinds.get("aarq", 0),
            "session_keys_recovered_from_aarqs": self.sessions_recovered,
            "dc_total": len(dc),
            "dc_decrypted": sum(1 for i in dc if i in self.opened),
            "dc_up_total": sum(1 for i in dc if self.frame_list[i].direction == "up"),
            "dc_up_decrypted": sum(1 for i in dc if i in self.opened and self.frame_list[i].direction == "up"),
            "messages": dict(sorted(messages.items())),
            "reading_frames_decrypted": reading_frames,
            "readings_decrypted": len(self.readings),
            "readings_under_superseded_cc_lan": len(self.readings_old_cc_lan),
            "keys_learned_from_key_transfers": self.keys_learned,
        }


def decrypt_traffic(frames: list[Frame], ring: KeyRing) -> TrafficResult:
    """Open every frame the ring allows, learning as it goes: session keys
    from AARQs (under CC_LAN), new global keys from key_transfers (under CCC).
    Repeats until a pass opens nothing new."""
    ciphers = _Ciphers()
    kinds_list = [kind_of(f.data) for f in frames]
    opened: dict[int, Opened] = {}
    keys_learned = 0
    transported: set[tuple[str, bytes]] = set()
    progress = True
    while progress:
        progress = False
        for i, f in enumerate(frames):
            if i in opened:
                continue
            result = _try_open(f, kinds_list[i], ring, ciphers)
            if result is None:
                continue
            opened[i] = result
            progress = True
            if result.kind == "aarq" and result.session_key is not None:
                ring.add_session(f.meter, result.session_key, "aarq", carrier=result.key)
                transported.add((f.meter, result.session_key))
            elif isinstance(result.message, KeyTransfer):
                keys_learned += _learn_transfer(f.meter, result.message, ring)
    readings: dict[tuple[str, int], tuple[int, int, int, int]] = {}
    old: set[tuple[str, int]] = set()
    for i, o in opened.items():
        items: list[Reading] = []
        if isinstance(o.message, Reading):
            items = [o.message]
        elif isinstance(o.message, GapFillReply):
            items = list(o.message.readings)
        for r in items:
            ident = (frames[i].meter, r.seq)
            readings[ident] = (r.ts, r.energy_wh, r.power_w, r.voltage_dv)
            if o.key.carrier is not None and o.key.carrier.superseded:
                old.add(ident)
    return TrafficResult(len(frames), Counter(kinds_list), opened, frames, readings, old, keys_learned,
                         len(transported), kinds_list)


def _learn_transfer(meter: str, msg: KeyTransfer, ring: KeyRing) -> int:
    learned = 0
    for ccc in list(ring.glob[meter][KeyType.CCC]):
        try:
            items = decode_key_transfer(ccc.key, msg.param)
            setup = SecuritySetup(msg.setup)
        except (ProtocolError, ValueError):
            continue
        for key_id, key in items:
            try:
                kt = key_type_for(setup, key_id)
            except ProtocolError:
                continue
            for k in ring.glob[meter][kt]:
                if k.origin in ("factory", "key_transfer"):
                    k.superseded = True  # replaced by the key being transferred
            if ring.add_global(meter, kt, key, "key_transfer") is not None:
                learned += 1
        break
    return learned


def _open_global(g: dict, apdu, ciphers: _Ciphers, title: bytes | None = None):
    """(CC_LAN entry, plaintext) for the first CC_LAN x AK pair that verifies, else None."""
    suite = apdu.security_control & 0x0F
    for cc in g[KeyType.CC_LAN]:
        for ak in g[KeyType.AK]:
            try:
                return cc, open_apdu(ciphers.get(cc.key, ak.key, suite), apdu, title)
            except ProtocolError:
                continue
    return None


def _try_open(f: Frame, kind: str, ring: KeyRing, ciphers: _Ciphers) -> Opened | None:
    g = ring.glob.get(f.meter)
    try:
        if kind == "aarq":
            if not g:
                return None
            aarq = parse_aarq(f.data)
            found = _open_global(g, parse_apdu(aarq.initiate_apdu), ciphers, aarq.calling_title)
            if found is None:
                return None
            carrier, plain = found
            req = decode_initiate_request(plain)
            return Opened("aarq", carrier, req, bytes(req.dedicated_key) if req.dedicated_key else None)
        if kind == "aare":
            if not g:
                return None
            aare = parse_aare(f.data)
            found = _open_global(g, parse_apdu(aare.initiate_apdu), ciphers, aare.responding_title)
            if found is None:
                return None
            carrier, plain = found
            return Opened("aare", carrier, decode_initiate_response(plain))
        if kind == "db":
            if not g:
                return None
            found = _open_global(g, parse_any_suite(f.data), ciphers)
            if found is None:
                return None
            carrier, plain = found
            return Opened("db", carrier, decode_message(plain))
        if kind == "dc":
            sessions = ring.sessions.get(f.meter)
            if not sessions or not g:
                return None
            apdu = parse_any_suite(f.data)
            suite = apdu.security_control & 0x0F
            for s in sessions:
                for ak in g[KeyType.AK]:
                    try:
                        plain = open_apdu(ciphers.get(s.key, ak.key, suite), apdu)
                    except ProtocolError:
                        continue
                    return Opened("dc", s, decode_message(plain))
            return None
    except ProtocolError:
        return None
    return None


def keystream_probe(frames: list[Frame], candidates: dict[str, list[bytes]]) -> dict[str, int]:
    """Confidentiality without the tag: XOR each frame's ciphertext with the
    GCM keystream of every candidate key (AK not needed) and see whether the
    result decodes as one of our messages."""
    tried = hits = 0
    for f in frames:
        cands = candidates.get(f.meter)
        if not cands:
            continue
        try:
            if f.data[:1] == bytes((AARQ_TAG,)):
                aarq = parse_aarq(f.data)
                apdu, title = parse_apdu(aarq.initiate_apdu), aarq.calling_title
            elif f.data[:1] == bytes((AARE_TAG,)):
                aare = parse_aare(f.data)
                if aare.initiate_apdu is None:
                    continue
                apdu, title = parse_apdu(aare.initiate_apdu), aare.responding_title
            else:
                apdu = parse_apdu(f.data)
                title = apdu.system_title
        except ProtocolError:
            continue
        if title is None:
            continue
        iv = title + apdu.invocation_counter.to_bytes(4, "big")
        body = apdu.body[:-_TAG_LEN]
        for key in cands:
            tried += 1
            plain = AESGCM(key).encrypt(iv, body, None)[: len(body)]
            if decodes_as_plaintext(plain):
                hits += 1
    return {"attempts": tried, "decodable": hits}


def headend_title_from(frames: list[Frame]) -> bytes:
    """The head-end's system title, as every captured AARQ names it."""
    for f in frames:
        if f.data[:1] == bytes((AARQ_TAG,)):
            try:
                return parse_aarq(f.data).calling_title
            except ProtocolError:
                continue
    return HEADEND_TITLE


def max_ic_seen(frames: list[Frame]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in frames:
        if f.direction != "up":
            continue
        try:
            apdu = parse_apdu(f.data)
        except ProtocolError:
            continue
        if apdu.tag == GENERAL_DED_CIPHERING:
            out[f.meter] = max(out.get(f.meter, -1), apdu.invocation_counter)
    return out
