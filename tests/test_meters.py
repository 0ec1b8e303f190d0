"""The virtual meters: load curve, the Meter state machine against a tiny
head-end built from ami.protocol, the NVM, and the fleet against a real
Mosquitto (our own, on a free port, with the provisioned ACLs)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ami.protocol import (
    KeyType,
    ReceiveCounter,
    SecretBytes,
    Suite0Cipher,
    decode_message,
    encode_message,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from ami.protocol.association import (
    InitiateRequest,
    build_aarq,
    decode_initiate_response,
    encode_initiate_request,
    parse_aare,
)
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    MAX_APDU_SIZE,
)
from ami.protocol.keys import KeyId, encode_key_transfer, key_check_value
from ami.protocol.messages import (
    Event,
    GapFillReply,
    GapFillRequest,
    KeyTransfer,
    KeyTransferAck,
    Message,
    ReadReply,
    ReadRequest,
    Reading,
    Release,
)
from ami.runtime.network import HEADEND_TITLE, TSP_TITLE, meter_title
from ami.machines import loadcurve
from ami.machines.meter import (
    LAN_RECV,
    LAN_SEND,
    CipherCache,
    CounterMark,
    KeyWrite,
    Meter,
    MeterConfig,
    MeterKeys,
    Output,
)
from meters.nvm import Nvm
from harness import free_port, wait_port

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = Path("/usr/sbin/mosquitto")
INTERVAL = 1800
T0 = 1_780_000_000.0  # a meter-clock instant, aligned nowhere in particular

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# load curve


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    interval_s=st.sampled_from([1, 7, 60, 900, 1800, 3600, 86400]),
    k=st.integers(0, 2**40),
)
def test_energy_index_strictly_increasing(seed: int, interval_s: int, k: int) -> None:
    p = loadcurve.profile(seed, interval_s)
    assert loadcurve.energy_wh(p, k) - loadcurve.energy_wh(p, k - 1) >= 1
    r = loadcurve.reading(p, k)
    assert r.power_w == (r.energy_wh - loadcurve.energy_wh(p, k - 1)) * 3600 // interval_s


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), k0=st.integers(0, 2**32))
def test_energy_monotone_over_a_run_of_days(seed: int, k0: int) -> None:
    p = loadcurve.profile(seed, INTERVAL)
    values = [loadcurve.energy_wh(p, k) for k in range(k0, k0 + 3 * 48)]
    assert all(b > a for a, b in zip(values, values[1:]))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), t=st.integers(0, 2**40))
def test_voltage_around_230v(seed: int, t: int) -> None:
    assert 2260 <= loadcurve.voltage_dv(loadcurve.profile(seed, INTERVAL), t) <= 2340


def test_load_curve_is_deterministic_and_realistic() -> None:
    seeds = [loadcurve.seed_for(meter_title(n)) for n in range(1, 41)]
    k_day = int(T0) // 86400 * 48  # midnight UTC
    night, evening = [], []
    for seed in seeds:
        p1 = loadcurve.profile(seed, INTERVAL)
        p2 = loadcurve.profile(seed, INTERVAL)  # rebuilt: same curve (regenerable after a crash)
        for day in range(7):
            base = k_day + 48 * day
            for j in range(48):
                assert loadcurve.reading(p1, base + j) == loadcurve.reading(p2, base + j)
            night += [loadcurve.reading(p1, base + j).power_w for j in range(4, 10)]  # 02:00-05:00
            evening += [loadcurve.reading(p1, base + j).power_w for j in range(38, 42)]  # 19:00-21:00
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert 100 < mean(night) < mean(evening) < 3000
    assert mean(evening) > 1.5 * mean(night)
    r = loadcurve.reading(loadcurve.profile(seeds[0], INTERVAL), 1000)
    assert (r.seq, r.ts) == (1000, 1001 * INTERVAL)


def test_instant_lies_within_the_current_interval() -> None:
    p = loadcurve.profile(123, INTERVAL)
    now = T0 + 600.5
    k = int(now) // INTERVAL
    r = loadcurve.instant(p, now)
    assert r.seq == k and r.ts == int(now)
    assert loadcurve.energy_wh(p, k - 1) <= r.energy_wh <= loadcurve.energy_wh(p, k)


# --------------------------------------------------------------------------
# a tiny head-end, from ami.protocol only


def rand16() -> SecretBytes:
    return SecretBytes(os.urandom(16))


@dataclass
class Peer:
    """The head-end (or handheld) end of one meter's links, by the book."""

    title: bytes
    meter_title: bytes
    global_key: bytes  # CC_LAN (head-end) or CC_LOCALE (handheld)
    ak: bytes
    global_ic: int = 0
    session: bytes | None = None
    session_ic: int = 0
    recv_global: ReceiveCounter = field(default_factory=ReceiveCounter)
    recv_session: ReceiveCounter = field(default_factory=ReceiveCounter)
    sent: list[bytes] = field(default_factory=list)

    def aarq(self, *, key: bytes | None = None, calling: bytes | None = None, ic: int | None = None) -> bytes:
        self.session = rand16()
        self.session_ic = 0
        self.recv_session = ReceiveCounter()
        if ic is None:
            ic, self.global_ic = self.global_ic, self.global_ic + 1
        cipher = Suite0Cipher(key or self.global_key, self.ak)
        initiate = seal_apdu(cipher, GLO_INITIATE_REQUEST, self.title, ic,
                             encode_initiate_request(InitiateRequest(self.session)))
        frame = build_aarq(calling or self.title, initiate)
        self.sent.append(frame)
        return frame

    def accept_aare(self, frame: bytes) -> bool:
        aare = parse_aare(frame)
        assert aare.responding_title == self.meter_title
        if not aare.accepted:
            assert aare.initiate_apdu is None  # unciphered, nothing inside
            return False
        apdu = parse_apdu(aare.initiate_apdu)
        self.recv_global.check(apdu.invocation_counter)
        decode_initiate_response(open_apdu(Suite0Cipher(self.global_key, self.ak), apdu, self.meter_title))
        self.recv_global.accept(apdu.invocation_counter)
        return True

    def dc(self, msg: Message, *, ak: bytes | None = None) -> bytes:
        assert self.session is not None
        cipher = Suite0Cipher(self.session, ak or self.ak)
        frame = seal_apdu(cipher, GENERAL_DED_CIPHERING, self.title, self.session_ic, encode_message(msg))
        self.session_ic += 1
        self.sent.append(frame)
        return frame

    def open(self, frame: bytes, *, ak: bytes | None = None) -> Message:
        """A meter frame: DB under the global key, DC under the session."""
        assert len(frame) <= MAX_APDU_SIZE
        apdu = parse_apdu(frame)
        assert apdu.system_title == self.meter_title
        if apdu.tag == GENERAL_GLO_CIPHERING:
            key, counter = self.global_key, self.recv_global
        else:
            assert apdu.tag == GENERAL_DED_CIPHERING and self.session is not None
            key, counter = self.session, self.recv_session
        counter.check(apdu.invocation_counter)
        msg = decode_message(open_apdu(Suite0Cipher(key, ak or self.ak), apdu))
        counter.accept(apdu.invocation_counter)
        return msg


@dataclass
class Rig:
    meter: Meter
    keys: dict[str, SecretBytes]
    headend: Peer
    tsp: Peer
    now: float = T0
    persisted: list = field(default_factory=list)

    def run(self, out: Output) -> Output:
        """What the shell does: persist first, then the frames may leave."""
        self.persisted += out.persist
        return out


def make_rig(n: int = 7, **config: object) -> Rig:
    keys = {k: rand16() for k in ("ccc", "ak", "cc_lan", "cc_locale")}
    cfg = MeterConfig(headend_title=HEADEND_TITLE, tsp_title=TSP_TITLE, interval_s=INTERVAL,
                      boot_retry_s=60.0, ak_grace_s=300.0, counter_block=16, ciphers=CipherCache(64), **config)
    title = meter_title(n)
    meter = Meter(f"m{n:06d}", title, MeterKeys(**{k: SecretBytes(v) for k, v in keys.items()}), cfg,
                  concentrator="c0001", boot_at=T0)
    rig = Rig(meter, keys, Peer(HEADEND_TITLE, title, keys["cc_lan"], keys["ak"]),
              Peer(TSP_TITLE, title, keys["cc_locale"], keys["ak"]))
    return rig


def associate(rig: Rig) -> Output:
    out = rig.run(rig.meter.on_downlink(rig.headend.aarq(), rig.now))
    assert len(out.uplink) == 1 and rig.headend.accept_aare(out.uplink[0])
    assert rig.meter.associated
    return out


def booted_and_associated(**kw: object) -> Rig:
    rig = make_rig(**kw)
    rig.run(rig.meter.tick(rig.now))
    associate(rig)
    return rig


# --------------------------------------------------------------------------
# the Meter state machine


def test_boot_event_under_cc_lan_after_its_mark() -> None:
    rig = make_rig()
    assert rig.run(rig.meter.tick(T0 - 1)).uplink == []  # still off
    out = rig.run(rig.meter.tick(T0))
    assert out.persist == [CounterMark(LAN_SEND, 16)]  # a block reserved before the frame
    assert len(out.uplink) == 1 and parse_apdu(out.uplink[0]).invocation_counter == 0
    event = rig.headend.open(out.uplink[0])
    assert event == Event("boot", int(T0), "power_on")
    # Repeated until associated, never with a reused IC, backing off: the
    # n-th wait is boot_retry_s x 2^n (at most boot_retry_max_s), jittered
    # to 0.5-1.5x by a pure function of (meter, n).
    waits = []
    t = T0
    for n in range(8):
        nxt = rig.meter.next_due
        assert rig.run(rig.meter.tick(nxt - 0.001)).uplink == []
        again = rig.run(rig.meter.tick(nxt)).uplink
        assert isinstance(rig.headend.open(again[0]), Event)
        waits.append(nxt - t)
        t = nxt
    retry, cap = rig.meter.config.boot_retry_s, rig.meter.config.boot_retry_max_s
    for n, wait in enumerate(waits):
        base = min(retry * 2**n, cap)
        assert 0.5 * base <= wait <= 1.5 * base, (n, wait, base)
    assert len({round(w / min(retry * 2**n, cap), 6) for n, w in enumerate(waits)}) > 1  # jittered


def test_association_then_readings_verified() -> None:
    rig = make_rig()
    rig.run(rig.meter.tick(T0))
    out = associate(rig)
    assert CounterMark(LAN_RECV, 1) in out.persist  # replay protection durable before the AARE
    assert "associations" in out.counters
    # Associated: the latest finished interval is pushed at once.
    assert rig.meter.next_due == T0
    push = rig.run(rig.meter.tick(T0))
    (frame,) = push.uplink
    reading = rig.headend.open(frame)
    k = int(T0) // INTERVAL - 1
    assert reading == loadcurve.reading(rig.meter.profile, k)
    # Nothing again until the next interval has ended.
    assert rig.run(rig.meter.tick(T0 + 1)).uplink == []
    nxt = rig.meter.next_due
    assert nxt == (k + 2) * INTERVAL
    (frame,) = rig.run(rig.meter.tick(nxt)).uplink
    assert rig.headend.open(frame) == loadcurve.reading(rig.meter.profile, k + 1)


def test_readings_stamped_with_wall_clock() -> None:
    rig = booted_and_associated()
    (frame,) = rig.meter.tick(T0, wall_ns=123456789).uplink
    assert rig.headend.open(frame).sealed_ns == 123456789


PAD = 300


def test_padded_readings_carry_the_pad_inside_the_seal() -> None:
    """``MeterConfig.pad`` (``ami meters --pad``): each pushed reading gains a
    ``pad`` field of zero bytes inside the sealed message, in the wire format
    the load test's old encoder patch produced; peers decode it as the plain
    reading.  Other frames keep their size."""
    import msgpack

    from ami.protocol.messages import VERSION

    plain, padded = booted_and_associated(), booted_and_associated(pad=PAD)
    (short,) = plain.meter.tick(T0, wall_ns=123456789).uplink
    (long,) = padded.meter.tick(T0, wall_ns=123456789).uplink
    reading = loadcurve.reading(padded.meter.profile, int(T0) // INTERVAL - 1, 123456789)
    body = open_apdu(Suite0Cipher(padded.headend.session, padded.keys["ak"]), parse_apdu(long))
    assert body == msgpack.packb({"t": "rd", **reading.to_map(), "pad": bytes(PAD), "v": VERSION}, use_bin_type=True)
    unpadded = open_apdu(Suite0Cipher(plain.headend.session, plain.keys["ak"]), parse_apdu(short))
    assert unpadded == encode_message(reading)
    # Longer by the pad: its bytes, the "pad" key and a bin16 header (and the
    # APDU's BER length field, 1 byte below 128, 3 above).
    assert len(body) - len(encode_message(reading)) == PAD + 7
    assert len(long) - len(short) == PAD + 7 + 2
    assert padded.headend.open(long) == reading == plain.headend.open(short)
    # Gap-fill replies (readings inside) and events are not padded.
    k = int(T0) // INTERVAL - 4
    replies = [rig.meter.on_downlink(rig.headend.dc(GapFillRequest(7, k, k + 2)), T0 + 1).uplink
               for rig in (plain, padded)]
    assert len(replies[0]) == 1 and [len(f) for f in replies[0]] == [len(f) for f in replies[1]]
    gasps = [rig.meter.power_fail(T0 + 2, 60.0).uplink for rig in (plain, padded)]
    assert len(gasps[0]) == 1 and [len(f) for f in gasps[0]] == [len(f) for f in gasps[1]]


def test_padded_readings_are_stored_by_the_headend_engine() -> None:
    """The head-end's engine takes a padded reading like any other."""
    from ami.machines.headend import HeadEndEngine, Policy
    from ami.machines.headend_records import KeyRow, MeterRow, Snapshot
    from ami.protocol.keys import KeyState
    from ami.protocol.messages import Batch, encode_batch

    rig = make_rig(pad=PAD)
    meter = rig.meter
    engine = HeadEndEngine(HEADEND_TITLE, Policy(), lambda: os.urandom(16))
    keys = [KeyRow(meter.ident, KeyType(kt), 1, KeyState.ACTIVE, T0 - 1, key=key) for kt, key in rig.keys.items()]
    engine.load(Snapshot([MeterRow(meter.ident, meter.title, "c0001")], keys, []), T0)
    now, batch, stored, sizes = T0, 0, [], []
    uplink = list(meter.tick(now).uplink)
    while not stored and now < T0 + 600:
        if uplink:
            batch += 1
            sizes += [len(f) for f in uplink if f[0] == GENERAL_DED_CIPHERING]
            engine.handle_batch(encode_batch(Batch("c0001", batch, tuple((meter.ident, f) for f in uplink))), now,
                                "c0001")
            uplink = []
        engine.tick(now)
        effects = engine.drain()
        stored += effects.commit.readings
        for _mid, frame in effects.downlink.get("c0001", []):
            uplink += meter.on_downlink(frame, now).uplink
        now += 1
        if now >= meter.next_due:
            uplink += meter.tick(now).uplink
    assert engine.counters["frames_rejected"] == 0, engine.rejected
    (row,) = stored
    expected = loadcurve.reading(meter.profile, row[1])
    assert row[:6] == (meter.ident, expected.seq, expected.ts, expected.energy_wh, expected.power_w,
                       expected.voltage_dv)
    assert sizes and min(sizes) > PAD


def test_meters_cli_pad_reaches_every_meter(tmp_path: Path) -> None:
    """``ami meters --pad BYTES`` -> FleetSettings.pad -> every meter's MeterConfig.pad."""
    import argparse

    from ami.tools.provision import provision
    from meters.cli import add_arguments, settings_from_args
    from meters.fleet import Fleet

    data = tmp_path / "data"
    provision(data, meters=3, concentrators=1, bus_security=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser, {})
    assert parser.parse_args([]).pad == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--pad", "-1"])
    args = parser.parse_args(["--data", str(data), "--broker", f"mqtt://127.0.0.1:{free_port()}", "--pad", "512"])
    settings = settings_from_args(args, {})
    assert settings.pad == 512

    async def main() -> Fleet:
        fleet = Fleet(settings)
        await fleet.setup()
        await fleet.nvm.close()
        return fleet

    fleet = asyncio.run(main())
    assert len(fleet.meters) == 3 and {m.config.pad for m in fleet.meters} == {512}


def test_gap_fill_answered_from_history_in_chunks() -> None:
    rig = booted_and_associated(history=300)
    latest = int(T0) // INTERVAL - 1
    first, last = latest - 400, latest + 111  # 512 wide: too old, held, and future
    out = rig.run(rig.meter.on_downlink(rig.headend.dc(GapFillRequest(9, first, last)), T0))
    assert out.rejected == [] and len(out.uplink) > 1
    got: list[Reading] = []
    missing: list[int] = []
    for frame in out.uplink:
        assert len(frame) <= MAX_APDU_SIZE
        reply = rig.headend.open(frame)
        assert isinstance(reply, GapFillReply) and reply.request_id == 9
        got += reply.readings
        missing += reply.unavailable
    held = range(latest - 299, latest + 1)
    assert [r.seq for r in got] == list(held)
    assert got == [loadcurve.reading(rig.meter.profile, k) for k in held]
    assert sorted(missing) == [k for k in range(first, last + 1) if k not in held]


def test_gap_fill_of_huge_seqs_stays_under_the_frame_limit() -> None:
    rig = booted_and_associated()
    out = rig.meter.on_downlink(rig.headend.dc(GapFillRequest(1, 2**62, 2**62 + 511)), T0)
    total = 0
    for frame in out.uplink:
        assert len(frame) <= MAX_APDU_SIZE
        reply = rig.headend.open(frame)
        total += len(reply.unavailable)
    assert total == 512


def test_read_request() -> None:
    rig = booted_and_associated()
    out = rig.meter.on_downlink(rig.headend.dc(ReadRequest(42)), T0 + 100)
    reply = rig.headend.open(out.uplink[0])
    assert isinstance(reply, ReadReply) and reply.request_id == 42
    assert reply.reading == loadcurve.instant(rig.meter.profile, T0 + 100)


def transfer(rig: Rig, setup: str, key_id: KeyId, new: bytes, *, ccc: bytes | None = None) -> tuple[Output, bytes]:
    param = encode_key_transfer(ccc or rig.keys["ccc"], [(key_id, new)])
    out = rig.run(rig.meter.on_downlink(rig.headend.dc(KeyTransfer(5, setup, param, 7)), rig.now))
    return out, out.uplink[-1]


def acked(key_type: KeyType, key: bytes) -> KeyTransferAck:
    """The ack a transfer of ``key`` as version 7 must get: it names what it confirms."""
    return KeyTransferAck(5, True, "", key_type.value, 7, key_check_value(key_type, 7, key))


def test_key_transfer_cc_lan() -> None:
    rig = booted_and_associated()
    new = rand16()
    out, ack = transfer(rig, "lan", KeyId.GLOBAL_UNICAST, new)
    # New key and its counters at 0 are persisted before the ack leaves.
    assert out.persist[0] == KeyWrite(KeyType.CC_LAN, new)
    assert CounterMark(LAN_SEND, 0) in out.persist and CounterMark(LAN_RECV, 0) in out.persist
    assert rig.headend.open(ack) == acked(KeyType.CC_LAN, new)
    assert "key_transfers_applied" in out.counters
    # The session goes on; the next association must use the new key.
    old = rig.headend.global_key
    rejected = rig.meter.on_downlink(rig.headend.aarq(), rig.now)
    assert not rig.headend.accept_aare(rejected.uplink[0]) and rejected.rejected == ["auth_failed"]
    rig.headend.global_key, rig.headend.global_ic = new, 0
    rig.headend.recv_global = ReceiveCounter()
    out = rig.meter.on_downlink(rig.headend.aarq(), rig.now)
    assert rig.headend.accept_aare(out.uplink[0])
    assert parse_aare(out.uplink[0]).initiate_apdu is not None
    assert parse_apdu(parse_aare(out.uplink[0]).initiate_apdu).invocation_counter == 0  # fresh key, fresh counter
    assert old != new
    # A re-sent transfer of the same key (lost ack) is acked without resetting counters.
    out, ack = transfer(rig, "lan", KeyId.GLOBAL_UNICAST, new)
    assert rig.headend.open(ack) == acked(KeyType.CC_LAN, new)
    assert not any(isinstance(p, KeyWrite) for p in out.persist)
    assert rig.meter.lan_send.next_value == 1


def test_key_transfer_cc_locale_then_handheld_session() -> None:
    rig = booted_and_associated()
    new = rand16()
    out, ack = transfer(rig, "local", KeyId.GLOBAL_UNICAST, new)
    assert rig.headend.open(ack) == acked(KeyType.CC_LOCALE, new)
    assert out.persist[0] == KeyWrite(KeyType.CC_LOCALE, new)
    # The handheld with the old CC_LOCALE is refused, with the new one served.
    refused = rig.meter.on_local(rig.tsp.aarq(), rig.now)
    assert refused.uplink == [] and not rig.tsp.accept_aare(refused.local[0])
    rig.tsp.global_key = new
    out = rig.meter.on_local(rig.tsp.aarq(), rig.now)
    assert rig.tsp.accept_aare(out.local[0])
    out = rig.meter.on_local(rig.tsp.dc(ReadRequest(3)), rig.now)
    reply = rig.tsp.open(out.local[0])
    assert isinstance(reply, ReadReply) and reply.request_id == 3
    assert rig.meter.on_local(rig.tsp.dc(Release("done")), rig.now).counters == ["local_releases"]
    assert rig.meter.local_session is None and rig.meter.associated  # LAN untouched


def test_key_transfer_ak_with_grace() -> None:
    rig = booted_and_associated()
    old_ak, new_ak = rig.keys["ak"], rand16()
    out, ack = transfer(rig, "lan", KeyId.AUTHENTICATION, new_ak)
    assert out.persist == [KeyWrite(KeyType.AK, new_ak)]  # the AK has no counters of its own
    assert rig.headend.open(ack, ak=old_ak) == acked(KeyType.AK, new_ak)  # ack under the OLD AK
    rig.headend.ak = new_ak
    (frame,) = rig.meter.tick(rig.now).uplink  # everything after it under the new AK
    assert isinstance(rig.headend.open(frame), Reading)
    # A request sealed under the old AK (head-end did not see the ack yet) still opens...
    out = rig.meter.on_downlink(rig.headend.dc(ReadRequest(1), ak=old_ak), rig.now + 10)
    assert out.rejected == [] and isinstance(rig.headend.open(out.uplink[0]), ReadReply)
    # ...but not after the grace period.
    out = rig.meter.on_downlink(rig.headend.dc(ReadRequest(2), ak=old_ak), rig.now + 301)
    assert out.rejected == ["auth_failed"] and out.uplink == []
    out = rig.meter.on_downlink(rig.headend.dc(ReadRequest(3)), rig.now + 302)
    assert isinstance(rig.headend.open(out.uplink[0]), ReadReply)


@pytest.mark.parametrize(
    ("setup", "key_id", "wrong_ccc", "reason"),
    [
        ("lan", KeyId.GLOBAL_UNICAST, True, "auth_failed"),  # not wrapped under our CCC
        ("lan", KeyId.MASTER, False, "malformed_message"),  # CCC is not reprogrammable here
        ("local", KeyId.AUTHENTICATION, False, "malformed_message"),
        ("nope", KeyId.GLOBAL_UNICAST, False, "malformed_message"),
    ],
)
def test_key_transfer_refused(setup: str, key_id: KeyId, wrong_ccc: bool, reason: str) -> None:
    rig = booted_and_associated()
    before = (rig.meter.keys.cc_lan, rig.meter.keys.ak, rig.meter.keys.cc_locale)
    param = encode_key_transfer(rand16() if wrong_ccc else rig.keys["ccc"], [(key_id, rand16())])
    if setup == "nope":  # bypass the encoder's own validation: raw msgpack
        import msgpack

        body = msgpack.packb({"v": 1, "t": "kt", "id": 8, "s": "nope", "k": param}, use_bin_type=True)
        frame = seal_apdu(Suite0Cipher(rig.headend.session, rig.headend.ak), GENERAL_DED_CIPHERING,
                          HEADEND_TITLE, rig.headend.session_ic, body)
        rig.headend.session_ic += 1
        out = rig.meter.on_downlink(frame, rig.now)
        assert out.rejected == [reason]  # the message itself does not decode: no ack possible
        return
    out = rig.meter.on_downlink(rig.headend.dc(KeyTransfer(8, setup, param, 3)), rig.now)
    assert rig.headend.open(out.uplink[0]) == KeyTransferAck(8, False, reason, version=3)
    assert out.persist == [] and out.rejected == [reason]
    assert (rig.meter.keys.cc_lan, rig.meter.keys.ak, rig.meter.keys.cc_locale) == before


def test_repeated_aarq_gets_the_same_aare_and_changes_nothing() -> None:
    """The head-end retransmits an unanswered AARQ byte for byte: the meter
    answers with the very AARE it sent (no new counter value, no new
    session: installing it again would restart the session's counters)."""
    rig = make_rig()
    rig.run(rig.meter.tick(rig.now))
    first_answer = associate(rig).uplink[0]
    session, ic = rig.meter.session, rig.meter.lan_send.next_value
    out = rig.meter.on_downlink(rig.headend.sent[0], rig.now)
    assert out.rejected == [] and out.persist == []
    assert out.uplink == [first_answer]
    assert rig.meter.session is session and rig.meter.lan_send.next_value == ic


def test_replayed_older_aarq_rejected_and_session_kept() -> None:
    rig = booted_and_associated()
    old_aarq = rig.headend.sent[0]
    associate(rig)  # a newer association replaces the cached one
    session = rig.meter.session
    out = rig.meter.on_downlink(old_aarq, rig.now)
    assert out.rejected == ["replay"] and not rig.headend.accept_aare(out.uplink[0])
    assert rig.meter.session is session


def test_wrong_key_aarq_gets_rejected_aare() -> None:
    rig = make_rig()
    rig.meter.tick(T0)
    out = rig.meter.on_downlink(rig.headend.aarq(key=rand16()), T0)
    aare = parse_aare(out.uplink[0])
    assert not aare.accepted and aare.initiate_apdu is None and aare.responding_title == rig.meter.title
    assert out.rejected == ["auth_failed"] and out.persist == [] and not rig.meter.associated
    # The forged attempt did not move the counter: the genuine AARQ with the same IC works.
    out = rig.meter.on_downlink(rig.headend.aarq(ic=0), T0)
    assert rig.headend.accept_aare(out.uplink[0])


def test_wrong_calling_title_rejected() -> None:
    rig = make_rig()
    rig.meter.tick(T0)
    out = rig.meter.on_downlink(rig.headend.aarq(calling=TSP_TITLE), T0)
    assert out.rejected == ["wrong_peer"] and not parse_aare(out.uplink[0]).accepted


def test_forged_and_replayed_frames_rejected() -> None:
    rig = booted_and_associated()
    frame = bytearray(rig.headend.dc(ReadRequest(1)))
    frame[-1] ^= 1
    out = rig.meter.on_downlink(bytes(frame), rig.now)
    assert out.rejected == ["auth_failed"] and out.uplink == []
    good = rig.headend.dc(ReadRequest(2))
    assert len(rig.meter.on_downlink(good, rig.now).uplink) == 1
    out = rig.meter.on_downlink(good, rig.now)
    assert out.rejected == ["replay"] and out.uplink == []
    for junk in (b"", b"\x00", b"\xdc" * 40, os.urandom(MAX_APDU_SIZE + 1)):
        out = rig.meter.on_downlink(junk, rig.now)
        assert out.uplink == [] and len(out.rejected) == 1
    # A reading pushed "down" by an attacker holding no key is just garbage;
    # an authentic but uplink-only message is refused too.
    out = rig.meter.on_downlink(rig.headend.dc(Event("boot", 0)), rig.now)
    assert out.rejected == ["unexpected_message"]


def test_frames_without_session_rejected() -> None:
    rig = make_rig()
    rig.meter.tick(T0)
    rig.headend.session = rand16()
    out = rig.meter.on_downlink(rig.headend.dc(ReadRequest(1)), T0)
    assert out.rejected == ["unknown_key"]


def test_release_then_announce_again() -> None:
    rig = booted_and_associated()
    out = rig.meter.on_downlink(rig.headend.dc(Release("bye")), rig.now)
    assert out.counters == ["releases"] and not rig.meter.associated
    out = rig.meter.tick(rig.now + 60)
    assert rig.headend.open(out.uplink[0]) == Event("boot", int(rig.now + 60), "released")


def test_reboot_forgets_the_session() -> None:
    rig = booted_and_associated()
    out = rig.meter.power_fail(rig.now, 3600)
    assert rig.headend.open(out.uplink[0]).kind == "outage"
    assert not rig.meter.associated and rig.meter.next_due == rig.now + 3600
    assert rig.meter.on_downlink(rig.headend.dc(ReadRequest(1)), rig.now + 1).counters == ["downlink_while_off"]
    out = rig.meter.tick(rig.now + 3600)
    assert rig.headend.open(out.uplink[0]) == Event("boot", int(rig.now + 3600), "restore")
    rig.now += 3600
    associate(rig)
    out = rig.meter.tick(rig.now)
    msgs = [rig.headend.open(f) for f in out.uplink]
    assert msgs[0].kind == "restore" and isinstance(msgs[1], Reading)


def test_tamper_event_queued_until_associated() -> None:
    rig = make_rig()
    rig.meter.tick(T0)
    assert rig.meter.raise_event("tamper", T0, "cover_open").uplink == []
    associate(rig)
    msgs = [rig.headend.open(f) for f in rig.meter.tick(T0).uplink]
    assert msgs[0] == Event("tamper", int(T0), "cover_open")


def test_no_key_bytes_in_reprs() -> None:
    rig = booted_and_associated()
    text = repr(rig.meter) + repr(rig.meter.keys) + repr(rig.meter.session) + repr(KeyWrite(KeyType.AK, rand16()))
    for key in (*rig.keys.values(), rig.headend.session):
        assert key.hex() not in text and repr(bytes(key)) not in text


# --------------------------------------------------------------------------
# NVM: durable marks, crash, rebuild


class Shell:
    """The fleet's contract, synchronously: commit, then publish; crash anywhere."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wire_ics: list[int] = []

    def rebuild(self, keys: dict[str, SecretBytes], cfg: MeterConfig) -> Meter:
        async def load() -> object:
            nvm = Nvm(self.path)
            await nvm.open(["c0001"])
            states = await nvm.load()
            await nvm.close()
            return states.get("m000007")

        state = asyncio.run(load())
        mk = MeterKeys(**keys)
        marks = None
        if state is not None:
            for key_type, key in state.keys.items():
                mk.set(key_type, key)
            marks = state.marks
        return Meter("m000007", meter_title(7), mk, cfg, concentrator="c0001", marks=marks, boot_at=T0)

    def carry_out(self, out: Output, *, crash_before_publish: bool = False) -> None:
        async def commit() -> None:
            nvm = Nvm(self.path)
            await nvm.open(["c0001"])
            await nvm.commit([("m000007", "c0001", item) for item in out.persist])
            await nvm.close()

        if out.persist:
            asyncio.run(commit())
        if not crash_before_publish:
            self.wire_ics += [parse_apdu(f).invocation_counter for f in out.uplink if f[0] == GENERAL_GLO_CIPHERING]


def test_no_ic_reused_across_crashes(tmp_path: Path) -> None:
    keys = {k: rand16() for k in ("ccc", "ak", "cc_lan", "cc_locale")}
    cfg = MeterConfig(headend_title=HEADEND_TITLE, tsp_title=TSP_TITLE, boot_retry_s=1.0, counter_block=8)
    shell = Shell(tmp_path / "meters" / "fleet.db")
    now = T0
    for crash in range(12):
        meter = shell.rebuild(keys, cfg)
        for i in range(crash % 5 + 1):  # a few boot events, then the power goes
            now += 1
            out = meter.tick(now)
            shell.carry_out(out, crash_before_publish=(i == crash % 5 and crash % 2 == 0))
    assert len(shell.wire_ics) == len(set(shell.wire_ics)) > 12
    # Each restart skips at most one block of values.
    assert max(shell.wire_ics) < 12 * 8 + len(shell.wire_ics)


def test_key_transfer_survives_restart(tmp_path: Path) -> None:
    rig = booted_and_associated()
    shell = Shell(tmp_path / "meters" / "fleet.db")
    shell.carry_out(rig.meter.tick(rig.now))  # reserve + persist some LAN marks first
    new = rand16()
    out, _ack = transfer(rig, "lan", KeyId.GLOBAL_UNICAST, new)
    shell.carry_out(out)
    meter = shell.rebuild({k: rig.keys[k] for k in rig.keys}, rig.meter.config)
    assert meter.keys.cc_lan == new and meter.keys.ak == rig.keys["ak"]
    assert meter.lan_send.next_value == 0 and meter.lan_recv.lowest_acceptable == 0
    out = meter.tick(T0)  # boots and announces under the new key, counter from 0
    assert parse_apdu(out.uplink[0]).invocation_counter == 0
    peer = Peer(HEADEND_TITLE, meter.title, new, rig.keys["ak"])
    assert peer.open(out.uplink[0]).kind == "boot"


def test_receive_counter_survives_restart(tmp_path: Path) -> None:
    rig = make_rig()
    shell = Shell(tmp_path / "meters" / "fleet.db")
    shell.carry_out(rig.meter.tick(T0))
    aarq = rig.headend.aarq()
    shell.carry_out(rig.meter.on_downlink(aarq, T0))
    meter = shell.rebuild(rig.keys, rig.meter.config)
    meter.tick(T0)
    out = meter.on_downlink(aarq, T0)  # the AARQ replayed after the reboot
    assert out.rejected == ["replay"] and not meter.associated


def test_nvm_claims_move_with_the_segment(tmp_path: Path) -> None:
    folder = tmp_path / "meters"

    async def scenario() -> None:
        a = Nvm(folder / "a.db")
        await a.open(["c0001", "c0002"])
        await a.commit([("m1", "c0001", CounterMark(LAN_SEND, 4096)), ("m2", "c0002", CounterMark(LAN_SEND, 10))])
        await a.commit([("m1", "c0001", KeyWrite(KeyType.CC_LAN, SecretBytes(b"k" * 16)))])
        anchor = await a.clock_anchor(10.0)
        await a.close()
        b = Nvm(folder / "b.db")  # a re-sharded process takes c0001 over
        await b.open(["c0001"])
        state = (await b.load())["m1"]
        assert state.marks == {LAN_SEND: 4096} and state.keys == {KeyType.CC_LAN: b"k" * 16}
        assert "m2" not in await b.load()
        wall, sim = await b.clock_anchor(10.0)
        assert sim >= anchor[1] + (wall - anchor[0]) * 10.0 - 1  # the meter clock did not go back
        await b.close()
        a = Nvm(folder / "a.db")
        await a.open(["c0002"])
        assert set(await a.load()) == {"m2"}
        await a.close()

    asyncio.run(scenario())
    assert oct((folder / "a.db").stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(folder / "a.db") as db:
        assert db.execute("SELECT concentrator FROM segments").fetchall() == [("c0002",)]


def test_clock_anchor_persists(tmp_path: Path) -> None:
    async def scenario() -> tuple:
        n = Nvm(tmp_path / "x.db")
        await n.open(["c1"])
        first = await n.clock_anchor(900.0)
        again = await n.clock_anchor(900.0)
        changed = await n.clock_anchor(100.0)
        await n.close()
        return first, again, changed

    first, again, changed = asyncio.run(scenario())
    assert first == again
    assert changed[1] >= first[1]  # re-anchored at the current meter time, not back


# --------------------------------------------------------------------------
# the fleet against a real broker


@pytest.fixture
def secured_network(tmp_path: Path):
    """A provisioned network with bus credentials and ACLs, and a Mosquitto
    enforcing them on free ports (the fleet must live within its ACL)."""
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto is not installed")
    from ami.security.bus_files import write_bus_security
    from ami.tools.provision import provision

    data = tmp_path / "data"
    network = provision(data, meters=6, concentrators=2, bus_security=False)
    port, tls_port = free_port(), free_port()
    sec = write_bus_security(data, network.concentrators, mqtt_port=port, tls_port=tls_port)
    log = tmp_path / "mosquitto.log"
    proc = subprocess.Popen([str(MOSQUITTO), "-c", str(sec.mosquitto_conf)], stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))
    try:
        wait_port(port, 10.0, proc)
        yield data, port, network, sec
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fleet_against_mosquitto(secured_network) -> None:
    """Boot events on the PLC topics, an association and a reading through the
    broker, retained status and metrics; SIGTERM -> offline, exit 0."""
    import paho.mqtt.client as mqtt

    data, port, network, sec = secured_network
    factory = {json.loads(line)["meter"]: json.loads(line) for line in (data / "factory-keys.jsonl").read_text().splitlines()}
    seen: dict[str, list] = {}

    def client(user: str) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.username_pw_set(user, sec.password(user))
        c.on_message = lambda _c, _u, msg: seen.setdefault(msg.topic, []).append((time.monotonic(), msg.payload))
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c

    relay = client("relay-c0001")  # plays relay + head-end for segment c0001
    relay.subscribe("ami/v1/plc/c0001/up/+", qos=1)
    monitor = client("monitor")
    monitor.subscribe("ami/v1/monitor/#", qos=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "AMI__METERS__BOOT_SPREAD_S": "0.2",
           "AMI__METERS__BOOT_RETRY_S": "1.0", "AMI__MONITOR__METRICS_INTERVAL_S": "0.3"}
    cmd = [sys.executable, "-m", "ami.cli", "meters", "--broker", f"mqtt://127.0.0.1:{port}", "--data", str(data),
           "--time-compression", "600", "--log-level", "warning"]
    fleet = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        meter = network.segments["c0001"][0]
        keys = {k: SecretBytes(bytes.fromhex(factory[meter][k])) for k in ("ak", "cc_lan")}
        headend = Peer(HEADEND_TITLE, network.titles[meter], keys["cc_lan"], keys["ak"])
        up = f"ami/v1/plc/c0001/up/{meter}"

        def wait_for(pred, timeout: float = 10.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                got = pred()
                if got:
                    return got
                time.sleep(0.02)
            raise AssertionError(f"timed out; fleet stderr: {fleet.stderr.read1().decode() if fleet.poll() else ''}")

        wait_for(lambda: all(f"ami/v1/plc/c0001/up/{m}" in seen for m in network.segments["c0001"]))
        boot = headend.open(seen[up][0][1])
        assert boot.kind == "boot" and boot.detail == "power_on"
        # Associate through the broker, as the head-end would via the relay.
        relay.publish(f"ami/v1/plc/c0001/down/{meter}", headend.aarq(), qos=1)
        aare = wait_for(lambda: [p for _, p in seen[up] if p[0] == 0x61])
        assert headend.accept_aare(aare[0])
        reading = wait_for(lambda: [p for _, p in seen[up] if p[0] == GENERAL_DED_CIPHERING])
        msg = headend.open(reading[0])
        assert isinstance(msg, Reading) and msg == loadcurve.reading(loadcurve.profile(
            loadcurve.seed_for(network.titles[meter]), INTERVAL), msg.seq)
        status = "ami/v1/monitor/meters/fleet/status"
        metrics_topic = "ami/v1/monitor/meters/fleet/metrics"
        wait_for(lambda: seen.get(status, [(0, b"")])[-1][1] == b"online")

        def associated() -> bool:
            last = seen.get(metrics_topic, [(0, b"{}")])[-1][1]
            return json.loads(last).get("gauges", {}).get("meters_associated") == 1

        wait_for(associated)
        snap = json.loads(seen[metrics_topic][-1][1])
        assert snap["counters"]["associations"] == 1 and snap["gauges"]["meters"] == 6
        assert snap["counters"]["boot_events"] >= 6 and sum(snap["rejected"].values()) == 0
        # Meters of the other segment published on their own topics, under their own user.
        wait_for(lambda: snap["gauges"]["segments_up"] == 2)
        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(timeout=15) == 0, fleet.stderr.read().decode()
        wait_for(lambda: seen[status][-1][1] == b"offline")
        # The retained status is there for a late subscriber too.
        late = client("monitor")
        late.subscribe(status, qos=1)
        wait_for(lambda: len(seen[status]) >= 3)
        late.disconnect()
        assert (data / "meters" / "fleet.db").exists()
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
        relay.disconnect()
        monitor.disconnect()


@pytest.fixture
def open_network(tmp_path: Path):
    """A provisioned network without bus authentication and our own Mosquitto."""
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto is not installed")
    from ami.tools.provision import provision

    data = tmp_path / "data"
    network = provision(data, meters=5, concentrators=1, bus_security=False)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 10.0, proc)
        yield data, port, network
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _run_fleet(data: Path, port: int, seconds: float, commit_delay: float = 0.0, **kw: object) -> tuple:
    """Run a Fleet in-process for a while; return (fleet, [(done_time, mark)...])."""
    from meters.fleet import Fleet, FleetSettings

    committed: list[tuple[float, dict]] = []

    async def main() -> Fleet:
        settings = FleetSettings(broker=f"mqtt://127.0.0.1:{port}", data_dir=data, time_compression=600,
                                 boot_retry_s=0.3, boot_spread_s=0.05, metrics_interval_s=0.2,
                                 counter_block=4, gc_freeze=False, **kw)
        fleet = Fleet(settings)
        await fleet.setup()
        real_commit = fleet.nvm.commit

        async def slow_commit(records):  # a slow disk: frames must wait for it
            records = list(records)
            await asyncio.sleep(commit_delay)
            await real_commit(records)
            marks = {(m, item.slot): item.value for m, _c, item in records if isinstance(item, CounterMark)}
            committed.append((time.monotonic(), marks))

        fleet.nvm.commit = slow_commit
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        assert await fleet.run(stop) == 0
        return fleet

    return asyncio.run(main()), committed


def test_fleet_frames_wait_for_durable_marks_and_restart_reuses_no_ic(open_network) -> None:
    import paho.mqtt.client as mqtt

    data, port, network = open_network
    arrivals: list[tuple[float, str, bytes]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda _c, _u, msg: arrivals.append((time.monotonic(), msg.topic, msg.payload))
    sub.connect("127.0.0.1", port)
    sub.subscribe("ami/v1/plc/+/up/+", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.2)
        _fleet, committed = _run_fleet(data, port, 1.5, commit_delay=0.3)
        first_run = list(arrivals)
        assert len(first_run) >= 10  # 5 meters announcing every 0.3 s
        # Every boot frame arrived after a commit covering its IC had finished.
        for arrived, topic, frame in first_run:
            meter = topic.rsplit("/", 1)[1]
            ic = parse_apdu(frame).invocation_counter
            covered = [t for t, marks in committed if marks.get((meter, LAN_SEND), -1) > ic]
            assert covered and min(covered) < arrived, (meter, ic)
        fleet, _ = _run_fleet(data, port, 1.0)  # restart from the same NVM
        assert fleet.metrics.counters["boots"] == 5
        time.sleep(0.2)
    finally:
        sub.loop_stop()
        sub.disconnect()
    seen: dict[str, list[int]] = {}
    for _t, topic, frame in arrivals:
        assert frame[0] == GENERAL_GLO_CIPHERING
        seen.setdefault(topic, []).append(parse_apdu(frame).invocation_counter)
    assert len(seen) == 5
    for ics in seen.values():
        assert len(ics) == len(set(ics)) and ics == sorted(ics)  # never reused, never back


def test_rate_mode_sets_compression_and_spreads_meters(open_network) -> None:
    from meters.fleet import Fleet, FleetSettings

    data, port, network = open_network

    async def main() -> Fleet:
        fleet = Fleet(FleetSettings(broker=f"mqtt://127.0.0.1:{port}", data_dir=data, rate=50.0, gc_freeze=False))
        await fleet.setup()
        await fleet.nvm.close()
        return fleet

    fleet = asyncio.run(main())
    assert fleet.clock.compression == 50.0 * INTERVAL / 5  # each meter once per interval: 50/s in all
    offsets = sorted(m.push_offset for m in fleet.meters)
    assert offsets == [i * INTERVAL / 5 for i in range(5)]  # evenly spaced: a constant rate


def test_fleet_without_broker_stops_promptly(tmp_path: Path) -> None:
    """No broker at all: meters still run (and persist), frames pile up only
    to a bound, and SIGTERM-equivalent stop returns 0 without waiting long."""
    from ami.tools.provision import provision
    from meters.fleet import Fleet, FleetSettings

    data = tmp_path / "data"
    provision(data, meters=3, concentrators=1, bus_security=False)

    async def main() -> tuple[int, Fleet, float]:
        fleet = Fleet(FleetSettings(broker=f"mqtt://127.0.0.1:{free_port()}", data_dir=data, time_compression=600,
                                    boot_retry_s=0.05, boot_retry_max_s=0.05, boot_spread_s=0.01,
                                    gc_freeze=False))
        await fleet.setup()
        fleet._link_cap = 5
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        t0 = time.monotonic()
        code = await fleet.run(stop)
        return code, fleet, time.monotonic() - t0

    code, fleet, took = asyncio.run(main())
    assert code == 0 and took < 4.0
    assert fleet.metrics.counters["boot_events"] > 20 and fleet.metrics.counters["frames_dropped"] > 0
    assert sum(len(link.queue) for link in fleet.links.values()) <= 5
    assert fleet.metrics.counters["nvm_commits"] >= 1  # marks persisted even with the bus down
