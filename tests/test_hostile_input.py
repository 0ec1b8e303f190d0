"""Hostile input at the head-end: every frame or batch an attacker (or a broken
relay) can put on the WAN is refused, counted under the right reason
(``engine.rejected[reason]``) with a ``rejected`` event, and genuine traffic
goes on afterwards: the meters keep pushing and their readings are stored.

The meters and the head-end run in the in-memory simulator (tests/sim.py);
hostile frames are injected straight into ``engine.handle_batch``.  No test
may make the engine raise, and no event or reply of any test may carry a key.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ami.protocol import KeyType, SecretBytes, Suite0Cipher, encode_message, parse_apdu, seal_apdu
from ami.protocol.association import InitiateResponse, build_aare, encode_initiate_response
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_RESPONSE,
    MAX_APDU_SIZE,
)
from ami.protocol.messages import Event, Reading
from ami.protocol._ber import encode_length
from ami.protocol.frames import _SPECIFIC_TAGS
from ami.protocol.messages import MAX_BATCH_BYTES, MAX_BATCH_FRAMES, Batch, decode_batch, encode_batch
from ami.runtime.network import meter_title
from sim import INTERVAL, Drop, Network, Sim, Wire, default_policy, find_key_material

pytestmark = pytest.mark.timeout(120)

M1, M2, M3 = "m000001", "m000002", "m000003"  # M1, M2 on c0001; M3, M4 on c0002
C1, C2 = "c0001", "c0002"

_sims: list[Sim] = []


@pytest.fixture(autouse=True)
def no_key_in_any_event_or_reply() -> Iterator[None]:
    """After each test: no key of the run (factory, session, new global keys),
    in any encoding, in any event or reply the engine produced."""
    _sims.clear()
    yield
    for sim in _sims:
        sim._drain()  # noqa: SLF001  (whatever is still buffered)
        leaks = find_key_material(sim.events + [body for _t, body in sim.replies], sim.secrets_known())
        assert not leaks, f"key material in events/replies at {leaks[:5]}"


def running(n_meters: int = 4, **kw: object) -> Sim:
    sim = Sim(n_meters, 2, policy=default_policy(**kw.pop("policy", {})), **kw)
    _sims.append(sim)
    sim.run(3 * INTERVAL)
    assert sim.all_associated()
    return sim


def hold_next(sim: Sim, pred, timeout: float = 2 * INTERVAL) -> Wire:
    """Let the network swallow the next frame ``pred`` selects; return it (undelivered)."""
    net = Drop(pred, limit=1, then=sim.network)
    saved, sim.network = sim.network, net
    assert sim.run_until(lambda: bool(net.dropped), timeout=timeout)
    sim.network = saved
    return net.dropped[0]


def next_reading(sim: Sim, mid: str = M1) -> Wire:
    return hold_next(sim, lambda w: w.direction == "up" and w.meter == mid and isinstance(w.msg, Reading))


def rejections(sim: Sim, before: Counter) -> Counter:
    return Counter({k: v - before.get(k, 0) for k, v in sim.engine.rejected.items() if v - before.get(k, 0)})


def rejected_events(sim: Sim) -> list[dict]:
    sim._drain()  # noqa: SLF001
    return sim.events_of("rejected")


def genuine_traffic_flows(sim: Sim, intervals: int = 3) -> None:
    """The meters go on pushing, and every reading is stored, once."""
    before = {mid: len(sim.store.stored_seqs(mid)) for mid in sim.titles}
    sim.settle(intervals=intervals)
    for mid in sim.titles:
        assert len(sim.store.stored_seqs(mid)) >= before[mid] + intervals - 1, mid
    sim.assert_readings()
    sim.assert_clean()


def counters_snapshot(sim: Sim) -> dict[str, int]:
    return {**{f"c:{k}": v for k, v in sim.engine.counters.items()},
            **{f"r:{k}": v for k, v in sim.engine.rejected.items()}}


def assert_only_grew(before: dict[str, int], after: dict[str, int]) -> None:
    shrunk = {k: (v, after.get(k, 0)) for k, v in before.items() if after.get(k, 0) < v and k != "c:meters"}
    assert not shrunk, shrunk


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(b)


# --------------------------------------------------------------------------
# replays


def test_replayed_frames_are_rejected_as_replays() -> None:
    sim = running()
    accepted = [w for w in sim.wire if w.direction == "up" and w.kind in ("db", "dc")]
    assert len(accepted) > 12
    before = Counter(sim.engine.rejected)
    by_conc: dict[str, list[tuple[str, bytes]]] = {}
    for w in accepted:
        by_conc.setdefault(w.concentrator, []).append((w.meter, w.data))
    for conc, frames in by_conc.items():
        sim.inject_frames(conc, frames)
    assert rejections(sim, before) == Counter(replay=len(accepted))
    events = rejected_events(sim)
    assert len(events) == len(accepted) and {e["reason"] for e in events} == {"replay"}
    assert {e["meter"] for e in events} == set(sim.titles)
    genuine_traffic_flows(sim)


def test_reflected_downlink_frames_are_refused() -> None:
    """The head-end's own frames sent back up: an AARQ is no uplink APDU, a
    DC frame names the head-end's title, which is no meter's."""
    sim = running()
    sim.command({"op": "read", "meter": M1, "id": "q", "reply": "ami/v1/control/replies/q"})
    sim.run(3)
    down = [w for w in sim.wire if w.direction == "down" and w.meter == M1]
    assert {w.kind for w in down} == {"aarq", "dc"}
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [(M1, w.data) for w in down])
    expected = Counter(malformed_frame=sum(w.kind == "aarq" for w in down), unknown_meter=sum(w.kind == "dc" for w in down))
    assert rejections(sim, before) == expected
    genuine_traffic_flows(sim)


# --------------------------------------------------------------------------
# tampered, truncated, oversized frames


def expected_flip_reason(sim: Sim, frame: bytes, bit: int, conc: str, label: str) -> str:
    """What the head-end must say about ``frame`` (a DC frame of ``label``)
    with one bit flipped, from its layout: DC 08 title(8) len SC IC(4) C T."""
    byte = bit // 8
    assert frame[10] < 0x80  # one-byte length form
    if byte in (0, 1, 10):
        return "malformed_frame"  # tag, title length, APDU length
    if 2 <= byte < 10:
        other = sim.by_title.get(flip(frame, bit)[2:10])
        if other is None:
            return "unknown_meter"
        return "wrong_segment" if sim.conc_of[other] != conc else "malformed_frame"  # label mismatch
    if byte == 11:  # SC 0x30: only 0x10 (authentication only) parses, then fails its tag
        return "auth_failed" if frame[11] ^ (0x80 >> (bit % 8)) == 0x10 else "unsupported_security"
    return "auth_failed"  # IC (an IV the tag does not cover) or ciphertext / tag


def test_every_single_bit_flip_of_a_genuine_frame() -> None:
    sim = running()
    w = next_reading(sim, M1)  # genuine, not yet delivered
    floor = sim.engine.meters[M1].session.opener.counter.lowest_acceptable
    assert w.ic == floor
    before = Counter(sim.engine.rejected)
    n_events = len(rejected_events(sim))
    flips = [flip(w.data, bit) for bit in range(len(w.data) * 8)]
    expected = [expected_flip_reason(sim, w.data, bit, C1, M1) for bit in range(len(w.data) * 8)]
    sim.inject_frames(C1, [(M1, f) for f in flips])
    assert rejections(sim, before) == Counter(expected)
    events = rejected_events(sim)[n_events:]
    assert [e["reason"] for e in events] == expected
    assert set(expected) == {"malformed_frame", "unknown_meter", "wrong_segment", "unsupported_security",
                             "auth_failed"}
    # Not one forgery moved the counter: the genuine frame still goes in.
    assert sim.engine.meters[M1].session.opener.counter.lowest_acceptable == floor
    sim.inject_frames(C1, [(M1, w.data)])
    sim._drain()  # noqa: SLF001
    assert w.msg.seq in sim.store.stored_seqs(M1)
    assert rejections(sim, before) == Counter(expected)
    genuine_traffic_flows(sim)


def expected_aare_flip_reason(sim: Sim, aare: bytes, bit: int, conc: str) -> str | None:
    """Same for an AARE: 61 L | A1 09 06 07 ctx(7) | A2 03 02 01 result |
    A4 0A 04 08 title(8) | AA 13 80 11 f(CtoS)=<SC IC(4) GMAC(12)> |
    BE L 04 L <28 L SC IC(4) C T>.  None: not a rejection (a flipped result or
    user-information tag leaves an unciphered refusal or an AARE without a
    response: stale, nothing to verify)."""
    byte = bit // 8
    assert aare[17] == 0 and aare[30] == 0xAA and aare[51] == 0xBE and aare[55] == GLO_INITIATE_RESPONSE
    flipped = aare[byte] ^ (0x80 >> (bit % 8))
    if byte in (17, 51):
        return None
    if byte == 0 and flipped in _SPECIFIC_TAGS:
        # 0x61 -> 0x21 (glo-initiateRequest): the ACSE length then reads as
        # the APDU length, and the next byte (A1) as a security control.
        return "unsupported_security"
    if 22 <= byte < 30:
        other = sim.by_title.get(flip(aare, bit)[22:30])
        if other is None:
            return "unknown_meter"
        return "wrong_segment" if sim.conc_of[other] != conc else "malformed_frame"
    if byte == 30:
        # The f(CtoS) element renamed: a duplicate element is malformed; an
        # unknown one is skipped, and the AARE, bound to nothing, is checked
        # as a frame under CC_LAN: genuine, but already seen.
        return "malformed_frame" if flipped in (0xA1, 0xA2, 0xA4, 0xBE) else "replay"
    if 35 <= byte < 51:
        return "replay"  # f(CtoS)'s IC or GMAC: bound to nothing, as above
    if byte < 57:
        return "malformed_frame"  # ACSE structure, f's SC, the 0x28 tag and length
    if byte == 57:
        return "auth_failed" if flipped == 0x10 else "unsupported_security"
    return "auth_failed"


def test_every_bit_flip_of_a_boot_event_and_of_an_aare() -> None:
    """The other two uplink APDUs: a boot event (DB under CC_LAN, held back)
    and an AARE (already accepted, so with no association pending)."""
    sim = running()
    sim.kill_meter(M1)
    boot = hold_next(sim, lambda w: w.direction == "up" and w.meter == M1 and w.kind == "db")
    sim.run(INTERVAL)  # M1 boots again (the next boot event) and associates
    aare = [w for w in sim.wire if w.meter == M1 and w.kind == "aare"][-1]
    assert sim.engine.meters[M1].association is None
    before = Counter(sim.engine.rejected)
    n_events = len(rejected_events(sim))
    stale = sim.engine.counters["stale_aare"]
    bits_db, bits_aare = range(len(boot.data) * 8), range(len(aare.data) * 8)
    sim.inject_frames(C1, [(M1, flip(boot.data, b)) for b in bits_db] + [(M1, flip(aare.data, b)) for b in bits_aare])
    expected = [expected_flip_reason(sim, boot.data, b, C1, M1) for b in bits_db]
    expected += [r for b in bits_aare if (r := expected_aare_flip_reason(sim, aare.data, b, C1)) is not None]
    assert [e["reason"] for e in rejected_events(sim)[n_events:]] == expected
    assert rejections(sim, before) == Counter(expected)
    assert sim.engine.counters["stale_aare"] == stale + 16
    m = sim.engine.meters[M1]
    assert m.association is None and m.session.key == sim.meters[M1].session.key
    genuine_traffic_flows(sim)


def test_every_truncation_of_a_genuine_frame() -> None:
    sim = running()
    w = next_reading(sim, M2)
    before = Counter(sim.engine.rejected)
    frames = [w.data[:i] for i in range(len(w.data))] + [w.data + b"\x00", w.data + w.data]
    sim.inject_frames(C1, [(M2, f) for f in frames])
    assert rejections(sim, before) == Counter(malformed_frame=len(frames))
    assert len([e for e in rejected_events(sim) if e["reason"] == "malformed_frame"]) == len(frames)
    sim.inject_frames(C1, [(M2, w.data)])  # the untouched frame is still good
    assert rejections(sim, before) == Counter(malformed_frame=len(frames))
    genuine_traffic_flows(sim)


def test_oversized_frames() -> None:
    sim = running()
    title = sim.titles[M1]
    body = secrets.token_bytes(MAX_APDU_SIZE)
    inner = b"\x30" + (10**6).to_bytes(4, "big") + body
    dc = bytes((GENERAL_DED_CIPHERING, 8)) + title + encode_length(len(inner)) + inner
    aare = b"\x61\x82" + (MAX_APDU_SIZE + 10).to_bytes(2, "big") + bytes(MAX_APDU_SIZE + 10)
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [(M1, dc), (M1, dc[: MAX_APDU_SIZE + 1]), (M1, aare)])
    assert rejections(sim, before) == Counter(oversized_frame=2, malformed_frame=1)
    assert {e["reason"] for e in rejected_events(sim)} == {"oversized_frame", "malformed_frame"}
    genuine_traffic_flows(sim)


def test_unknown_meter() -> None:
    sim = running()
    stranger = meter_title(99_999)
    cipher = Suite0Cipher(secrets.token_bytes(16), secrets.token_bytes(16))
    dc = seal_apdu(cipher, GENERAL_DED_CIPHERING, stranger, 0, encode_message(Reading(1, 2, 3, 4, 2300)))
    db = seal_apdu(cipher, GENERAL_GLO_CIPHERING, stranger, 0, encode_message(Event("boot", 1)))
    aare = build_aare(stranger, True, seal_apdu(cipher, GLO_INITIATE_RESPONSE, stranger, 0,
                                                encode_initiate_response(InitiateResponse())))
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [("m099999", dc), ("m099999", db), ("m099999", aare), (M1, dc)])
    assert rejections(sim, before) == Counter(unknown_meter=4)
    assert all(e["meter"] is None for e in rejected_events(sim))
    genuine_traffic_flows(sim)


# --------------------------------------------------------------------------
# expired keys


def test_frame_under_the_previous_session_after_its_grace_period() -> None:
    sim = running(policy=dict(previous_session_grace_s=30.0))
    late = next_reading(sim, M1)  # sealed under the current session
    sim.command({"op": "rotate", "key": "session", "meters": [M1], "id": "s", "reply": "ami/v1/control/replies/s"})
    sim.run(5)
    assert sim.engine.meters[M1].previous is not None
    sim.run(40)  # past the grace period
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [(M1, late.data)])
    assert rejections(sim, before) == Counter(expired_key=1)
    [event] = rejected_events(sim)
    assert event["reason"] == "expired_key" and event["meter"] == M1
    genuine_traffic_flows(sim)


def test_frame_under_the_previous_session_within_its_grace_period_is_accepted() -> None:
    sim = running()
    late = next_reading(sim, M1)
    sim.command({"op": "rotate", "key": "session", "meters": [M1], "id": "s", "reply": "ami/v1/control/replies/s"})
    sim.run(5)
    sim.inject_frames(C1, [(M1, late.data)])
    sim._drain()  # noqa: SLF001
    assert not sim.engine.rejected
    assert late.msg.seq in sim.store.stored_seqs(M1)
    genuine_traffic_flows(sim)


def test_frames_under_the_old_cc_lan_after_reprogramming() -> None:
    """A held genuine boot event, and a frame forged by someone who stole the
    old CC_LAN (and the AK): both refused as expired_key, neither is taken."""
    sim = running(2)
    sim.kill_meter(M1)
    held = hold_next(sim, lambda w: w.direction == "up" and w.meter == M1 and w.kind == "db")
    sim.run(INTERVAL)
    sim.command({"op": "rotate", "key": "cc_lan", "meters": "all", "id": "k", "reply": "ami/v1/control/replies/k"})
    sim.run(10)
    assert sim.engine.meters[M1].slots[KeyType.CC_LAN].active == 2
    old_cc_lan, ak = sim.factory[M1][KeyType.CC_LAN], sim.factory[M1][KeyType.AK]
    forged = seal_apdu(Suite0Cipher(old_cc_lan, ak), GENERAL_GLO_CIPHERING, sim.titles[M1], 0xFFFF_0000,
                       encode_message(Event("boot", int(sim.now))))
    associations = sim.engine.counters["associations"]
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [(M1, held.data), (M1, forged)])
    assert rejections(sim, before) == Counter(expired_key=2)
    assert sim.engine.meters[M1].session is not None and sim.engine.meters[M1].association is None
    sim.run(5)
    assert sim.engine.counters["associations"] == associations  # the "boot" did nothing
    genuine_traffic_flows(sim)


# --------------------------------------------------------------------------
# counters cannot be pushed by forgeries


def test_forged_frame_with_the_last_invocation_counter() -> None:
    sim = running()
    w = next_reading(sim, M1)
    apdu = parse_apdu(w.data)
    floor = sim.engine.meters[M1].session.opener.counter.lowest_acceptable
    forged_dc = w.data[:12] + (0xFFFF_FFFF).to_bytes(4, "big") + w.data[16:]
    assert parse_apdu(forged_dc).body == apdu.body
    boot = next(x for x in sim.wire if x.meter == M1 and x.kind == "db")
    forged_db = boot.data[:12] + (0xFFFF_FFFF).to_bytes(4, "big") + bytes(len(boot.data) - 16)
    lan_floor = sim.engine.meters[M1].key(KeyType.CC_LAN).rx.lowest_acceptable
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [(M1, forged_dc), (M1, forged_db)])
    assert rejections(sim, before) == Counter(auth_failed=2)
    assert sim.engine.meters[M1].session.opener.counter.lowest_acceptable == floor
    assert sim.engine.meters[M1].key(KeyType.CC_LAN).rx.lowest_acceptable == lan_floor
    sim.inject_frames(C1, [(M1, w.data)])  # the genuine frame behind it still goes in
    assert sim.engine.meters[M1].high_seq == w.msg.seq
    sim.kill_meter(M1)  # and the next boot event under CC_LAN too
    genuine_traffic_flows(sim)
    assert rejections(sim, before) == Counter(auth_failed=2)


# --------------------------------------------------------------------------
# the relay layer: batches, segments, labels


GARBAGE_BATCHES = [
    b"",
    b"\x00",
    b"\xc1",  # never used in msgpack
    random.Random(1).randbytes(64),
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 2, "c": C1, "n": 1, "f": []}),
    msgpack.packb({"v": True, "c": C1, "n": 1, "f": []}),
    msgpack.packb({"v": 1, "c": "", "n": 1, "f": []}),
    msgpack.packb({"v": 1, "c": C1, "n": "1", "f": []}),
    msgpack.packb({"v": 1, "c": C1, "n": 1, "f": {}}),
    msgpack.packb({"v": 1, "c": C1, "n": 1, "f": [[M1]]}),
    msgpack.packb({"v": 1, "c": C1, "n": 1, "f": [[M1, "text, not bytes"]]}),
    msgpack.packb({"v": 1, "c": C1, "n": 1, "f": [["m" * 65, b"x"]]}),
    msgpack.packb({"v": 1, "c": "c" * 65, "n": 1, "f": []}),
    msgpack.packb({"v": 1, "c": C1, "n": 1, "f": [[M1, b"x"]] * (MAX_BATCH_FRAMES + 1)}, use_bin_type=True),
    msgpack.packb({1: 2}),
    msgpack.packb({"v": 1, "c": C1, "n": 1, "f": []}) + b"trailing",
    b"\x91" * 100_000,  # deeply nested arrays
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
]


def test_garbage_and_oversized_batches_never_raise() -> None:
    sim = running()
    before = Counter(sim.engine.rejected)
    for payload in GARBAGE_BATCHES:
        sim.inject_payload(payload, C1)
    huge = encode_batch(Batch(C1, 1, ((M1, bytes(MAX_APDU_SIZE)),) * (MAX_BATCH_BYTES // MAX_APDU_SIZE + 1)))
    assert len(huge) > MAX_BATCH_BYTES
    sim.inject_payload(huge, C1)
    sim.inject_payload(b"\x00" * (MAX_BATCH_BYTES + 1), None)
    assert rejections(sim, before) == Counter(malformed_message=len(GARBAGE_BATCHES), oversized_message=2)
    events = rejected_events(sim)
    assert len(events) == len(GARBAGE_BATCHES) + 2 and all(e["where"] == "wan_batch" for e in events)
    assert sim.engine.counters["batches"] > 0
    genuine_traffic_flows(sim)


def test_rogue_relay_injecting_for_a_meter_it_does_not_serve() -> None:
    sim = running()
    w = next_reading(sim, M1)  # M1 is on c0001
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C2, [(M1, w.data)])  # c0002 forwards it, on its own topic
    assert rejections(sim, before) == Counter(wrong_segment=1)
    [event] = rejected_events(sim)
    assert event["reason"] == "wrong_segment" and event["concentrator"] == C2 and event["meter"] is None
    sim.inject_frames(C1, [(M1, w.data)])  # the right relay: accepted, the counter never moved
    assert sim.engine.meters[M1].high_seq == w.msg.seq
    genuine_traffic_flows(sim)


def test_batch_whose_concentrator_differs_from_its_wan_topic() -> None:
    sim = running()
    w = next_reading(sim, M1)
    before = Counter(sim.engine.rejected)
    frames_up = sim.engine.counters["frames_up"]
    sim.inject_frames(C1, [(M1, w.data)], wan=C2)  # says c0001, published on c0002's topic
    assert rejections(sim, before) == Counter(wrong_segment=1)
    assert sim.engine.counters["frames_up"] == frames_up  # none of its frames was looked at
    [event] = rejected_events(sim)
    assert event["where"] == "wan_batch" and event["concentrator"] == C2
    sim.inject_frames(C1, [(M1, w.data)])
    assert sim.engine.meters[M1].high_seq == w.msg.seq
    genuine_traffic_flows(sim)


def test_plc_label_and_system_title_name_different_meters() -> None:
    sim = running()
    w = next_reading(sim, M1)
    before = Counter(sim.engine.rejected)
    sim.inject_frames(C1, [(M2, w.data), ("nobody", w.data)])
    assert rejections(sim, before) == Counter(malformed_frame=2)
    sim.inject_frames(C1, [(M1, w.data)])
    assert sim.engine.meters[M1].high_seq == w.msg.seq
    genuine_traffic_flows(sim)


# --------------------------------------------------------------------------
# association answers out of place


def test_aare_with_no_pending_association() -> None:
    sim = running()
    assert sim.engine.meters[M1].association is None
    genuine = next(w for w in sim.wire if w.meter == M1 and w.kind == "aare")
    # A renewal: the AARE above is now an old one (a replay), while the
    # newest one, sent again, is a duplicate answer (the meter answers a
    # retransmitted AARQ with the same AARE): counted, not rejected.
    sim.command({"op": "rotate", "key": "session", "meters": [M1], "id": "s", "reply": "ami/v1/control/replies/s"})
    sim.run(3)
    latest = [w for w in sim.wire if w.meter == M1 and w.kind == "aare"][-1]
    assert latest.data != genuine.data
    duplicates = sim.engine.counters["duplicate_aare"]
    body = encode_initiate_response(InitiateResponse())
    title = sim.titles[M1]
    forged = build_aare(title, True, seal_apdu(Suite0Cipher(secrets.token_bytes(16), secrets.token_bytes(16)),
                                               GLO_INITIATE_RESPONSE, title, 10**6, body))
    refusal = build_aare(title, False, None)  # unciphered: nothing to verify, and it changes nothing
    before = Counter(sim.engine.rejected)
    stale = sim.engine.counters["stale_aare"]
    sim.inject_frames(C1, [(M1, genuine.data), (M1, forged), (M1, refusal), (M1, latest.data)])
    assert rejections(sim, before) == Counter(replay=1, auth_failed=1)
    assert sim.engine.counters["stale_aare"] == stale + 1
    assert sim.engine.counters["duplicate_aare"] == duplicates + 1
    assert [e["reason"] for e in rejected_events(sim)] == ["replay", "auth_failed"]
    m = sim.engine.meters[M1]
    assert m.association is None and m.session is not None and m.session.key == sim.meters[M1].session.key
    genuine_traffic_flows(sim)


def test_rejection_events_are_rate_limited_but_all_counted() -> None:
    sim = running(policy=dict(max_events_per_s=5))
    n_events = len(rejected_events(sim))
    before = Counter(sim.engine.rejected)
    for _ in range(20):
        sim.inject_payload(b"\xc1", C1)
    assert rejections(sim, before) == Counter(malformed_message=20)
    assert len(rejected_events(sim)) - n_events == 5
    assert sim.engine.counters["events_suppressed"] == 15
    genuine_traffic_flows(sim)


# --------------------------------------------------------------------------
# fuzz


FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_fuzz_handle_batch_with_arbitrary_bytes() -> None:
    sim = running()
    last = counters_snapshot(sim)

    @FUZZ
    @given(payload=st.binary(max_size=3000), wan=st.sampled_from([None, C1, C2, "c9999"]))
    def fuzz(payload: bytes, wan: str | None) -> None:
        nonlocal last
        sim.inject_payload(payload, wan)  # never raises
        now = counters_snapshot(sim)
        assert_only_grew(last, now)
        last = now

    fuzz()
    assert sum(sim.engine.rejected.values()) > 250
    genuine_traffic_flows(sim)


class Recorder(Network):
    def __init__(self) -> None:
        super().__init__()
        self.payloads: list[tuple[str, bytes]] = []

    def batches(self, sim: Sim, batches: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        self.payloads += batches
        return batches


def _mutate(data: st.DataObject, payload: bytes) -> bytes:
    how = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice", "frames"]))
    b = bytearray(payload)
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) * 8 - 1))
            b[i // 8] ^= 0x80 >> (i % 8)
    elif how == "set":
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    elif how == "insert":
        i = data.draw(st.integers(0, len(b)))
        b[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif how == "delete":
        i = data.draw(st.integers(0, len(b) - 1))
        del b[i : i + data.draw(st.integers(1, 16))]
    elif how == "truncate":
        del b[data.draw(st.integers(0, len(b) - 1)) :]
    elif how == "splice":
        i = data.draw(st.integers(0, len(b)))
        b[i:] = data.draw(st.binary(max_size=64))
    else:  # re-encoded batches with frames tampered, shuffled, relabelled
        batch = decode_batch(payload)
        frames = list(batch.frames)
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["dup", "relabel", "tamper", "drop", "swap"]))
            k = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
            if not frames:
                break
            label, apdu = frames[k]
            if op == "dup":
                frames.insert(k, (label, apdu))
            elif op == "relabel":
                frames[k] = (data.draw(st.sampled_from([M1, M2, M3, "x", ""])), apdu)
            elif op == "tamper" and apdu:
                i = data.draw(st.integers(0, len(apdu) * 8 - 1))
                frames[k] = (label, flip(apdu, i))
            elif op == "drop":
                del frames[k]
            elif op == "swap" and len(frames) > 1:
                frames[0], frames[-1] = frames[-1], frames[0]
        conc = data.draw(st.sampled_from([batch.concentrator, C1, C2]))
        return encode_batch(Batch(conc, data.draw(st.integers(-(2**63), 2**63 - 1)), tuple(frames)))
    return bytes(b)


def test_fuzz_handle_batch_with_mutated_genuine_batches() -> None:
    rec = Recorder()
    sim = Sim(4, 2, network=rec, policy=default_policy())
    _sims.append(sim)
    sim.run(6 * INTERVAL)
    sim.command({"op": "rotate", "key": "session", "meters": "all", "id": "s", "reply": "ami/v1/control/replies/s"})
    sim.run(2 * INTERVAL)
    genuine = list(rec.payloads)  # all delivered: every frame in them is now a replay
    assert len(genuine) > 20
    last = counters_snapshot(sim)

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        nonlocal last
        wan, payload = data.draw(st.sampled_from(genuine))
        sim.inject_payload(_mutate(data, payload), data.draw(st.sampled_from([wan, wan, C1, C2, None])))
        now = counters_snapshot(sim)
        assert_only_grew(last, now)
        last = now

    fuzz()
    # Nothing mutated was taken as new: not one reading more, no session moved.
    assert sim.engine.counters["frames_rejected"] > 250
    assert not sim.violations
    genuine_traffic_flows(sim)


def test_fuzz_authenticated_nonsense_from_a_compromised_meter() -> None:
    """A meter whose keys are stolen can send anything under its own session:
    the head-end must never raise, and the other meters are not affected."""
    sim = running()
    meter = sim.meters[M3]
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8),
                     st.binary(max_size=8), st.floats(allow_nan=False))
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                                             max_size=4), max_leaves=8)
    message = st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 1, 2]), "t": st.sampled_from(["rd", "ev", "rq", "rr", "gq", "gr", "kt", "ka", "rl", "zz"])},
        optional={k: value for k in ("q", "ts", "e", "p", "u", "t0", "k", "d", "id", "a", "b", "r", "x", "s", "ok", "why")},
    )
    last = counters_snapshot(sim)

    @FUZZ
    @given(msg=message)
    def fuzz(msg: dict) -> None:
        nonlocal last
        session = meter.session
        cipher = Suite0Cipher(session.key, meter.keys.ak)
        frame = seal_apdu(cipher, GENERAL_DED_CIPHERING, meter.title, session.send.take(),
                          msgpack.packb(msg, use_bin_type=True))
        sim.inject_frames(C2, [(M3, frame)])  # never raises
        now = counters_snapshot(sim)
        assert_only_grew(last, now)
        last = now

    fuzz()
    # The others are unaffected (M3 may have hurt only itself).
    before = {mid: len(sim.store.stored_seqs(mid)) for mid in sim.titles}
    sim.run(3 * INTERVAL)
    for mid in (M1, M2, "m000004"):
        assert len(sim.store.stored_seqs(mid)) >= before[mid] + 2
    sim.assert_clean()


def test_secret_bytes_never_print() -> None:
    """The helper itself: a planted key is found in every encoding."""
    sim = running(2)
    key = sim.factory[M1][KeyType.CC_LAN]
    for leak in (key.hex(), key.hex().upper(), bytes(key), repr(bytes(key))):
        assert find_key_material([{"detail": leak}], [key])
    assert not find_key_material([{"detail": repr(SecretBytes(key)), "x": f"{SecretBytes(key)}"}], [key])
