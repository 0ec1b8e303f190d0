"""The fleet's hot path (issue 10): its shortcuts give exactly what the slow path gave.

* a pushed reading is ``encode_message(loadcurve.reading(...))`` byte for
  byte, sealed exactly as ``seal_apdu`` lays a DC frame out, whether the
  session keeps its cipher or takes it from the LRU, across AK changes;
* the load curve's memos (the previous index, per-interval terms) change no value;
* the calendar queue hands out what a heap of (due, index) would, in its order;
* in a running fleet (no broker: a sink stands for each segment's client) no
  frame leaves before the NVM commit covering its invocation counter: the
  sink reads the NVM file itself, from another connection, at publish time.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ami.machines import loadcurve
from ami.machines.meter import LAN_SEND, CipherCache, Meter, MeterConfig, MeterKeys, Session
from ami.protocol.messages import encode_reading
from ami.protocol import SecretBytes, Suite0Cipher, encode_message, parse_apdu, seal_apdu
from ami.protocol import suite1
from ami.protocol.frames import GENERAL_DED_CIPHERING, GENERAL_GLO_CIPHERING
from ami.protocol.messages import Reading
from ami.runtime.network import HEADEND_TITLE, TSP_TITLE, meter_title
from meters.timers import TimerWheel

INTERVAL = 1800
T0 = 1_780_000_000.0

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(seq=ints, ts=ints, e=ints, p=ints, u=ints, t0=st.none() | ints, pad=st.integers(0, 300))
def test_encode_reading_is_encode_message(seq, ts, e, p, u, t0, pad) -> None:
    assert encode_reading(seq, ts, e, p, u, t0, pad) == encode_message(Reading(seq, ts, e, p, u, t0), pad=pad)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), interval=st.sampled_from([1, 60, 900, 1800, 3600, 7777]),
       k=st.integers(0, 2**33))
def test_load_curve_shortcuts_change_no_value(seed: int, interval: int, k: int) -> None:
    p = loadcurve.profile(seed, interval)
    plain = loadcurve.reading(p, k, 7)
    assert loadcurve.reading(p, k, 7, prev_energy=loadcurve.energy_wh(p, k - 1)) == plain
    assert loadcurve.point(p, k) == (plain.seq, plain.ts, plain.energy_wh, plain.power_w, plain.voltage_dv)
    assert loadcurve.readings(p, k, k + 5) == [loadcurve.reading(p, j) for j in range(k, k + 6)]
    assert loadcurve.readings(p, k, k - 1) == []


def _meter(*, keep: bool = True, pad: int = 0, suite: int = 0) -> Meter:
    keys = MeterKeys(*(SecretBytes(os.urandom(16)) for _ in range(4)))
    signer = None
    public = None
    if suite:
        signer = suite1.SoftwareSigner.from_scalar((12345).to_bytes(32, "big"))
        public = suite1.SoftwareSigner.from_scalar((54321).to_bytes(32, "big")).public_key_bytes()
    config = MeterConfig(headend_title=HEADEND_TITLE, tsp_title=TSP_TITLE, interval_s=INTERVAL,
                         ciphers=CipherCache(4), keep_session_ciphers=keep, pad=pad, headend_sign_public=public)
    meter = Meter("m000007", meter_title(7), keys, config, concentrator="c0001", push_offset=100.0, boot_at=T0,
                  suite=suite, signer=signer)
    meter.tick(T0)  # boots, announces
    # As the AARQ handling does (tests/test_meters.py runs the real one).
    meter.session = Session(SecretBytes(os.urandom(16)), HEADEND_TITLE, suite=suite)
    return meter


def _expected_frame(meter: Meter, frame: bytes, plaintext: bytes, ak: bytes) -> bytes:
    """What the slow path (seal_apdu under a fresh cipher) lays out for this IC."""
    session = meter.session
    assert session is not None
    cipher = (suite1.Suite1Cipher if session.suite else Suite0Cipher)(session.key, ak)
    ic = parse_apdu(frame, suite=session.suite).invocation_counter
    return seal_apdu(cipher, GENERAL_DED_CIPHERING, meter.title, ic, plaintext,
                     security_control=suite1.security_control(session.suite))


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("pad", [0, 200])  # 200: past the one-byte length form
@pytest.mark.parametrize("suite", [0, 1])
def test_pushed_readings_are_what_the_slow_path_sealed(keep: bool, pad: int, suite: int) -> None:
    meter = _meter(keep=keep, pad=pad, suite=suite)
    profile = meter.profile
    pushed = []
    now = T0
    # Consecutive intervals (the previous index is reused), then a gap of
    # three (it is recomputed), with and without a wall-clock stamp.
    for step, stamp in ((1, 11), (1, None), (1, 12), (4, 13), (1, None)):
        now += step * INTERVAL
        out = meter.tick(now, stamp)
        assert out.counters == ["readings_pushed"] and len(out.uplink) == 1
        k = meter.last_pushed
        plaintext = encode_message(loadcurve.reading(profile, k, stamp), pad=pad)
        assert out.uplink[0] == _expected_frame(meter, out.uplink[0], plaintext, meter.keys.ak)
        pushed.append(k)
    assert pushed == sorted(set(pushed)) and pushed[3] - pushed[2] == 4
    # An AK change (key transfer): the next frames are under the new AK.
    meter.keys.ak = SecretBytes(os.urandom(16))
    now += INTERVAL
    (frame,) = meter.tick(now, 5).uplink
    plaintext = encode_message(loadcurve.reading(profile, meter.last_pushed, 5), pad=pad)
    assert frame == _expected_frame(meter, frame, plaintext, meter.keys.ak)


def test_a_fresh_session_gets_a_fresh_cipher() -> None:
    meter = _meter()
    meter.tick(T0 + INTERVAL * 2)
    first = meter.session
    assert first is not None and first.cipher is not None
    meter.session = Session(SecretBytes(os.urandom(16)), HEADEND_TITLE)  # renewed
    (frame,) = meter.tick(T0 + INTERVAL * 3).uplink
    plaintext = encode_message(loadcurve.reading(meter.profile, meter.last_pushed))
    assert frame == _expected_frame(meter, frame, plaintext, meter.keys.ak)
    assert meter.session.cipher is not first.cipher


def test_meter_title_must_be_eight_bytes() -> None:
    keys = MeterKeys(*(SecretBytes(os.urandom(16)) for _ in range(4)))
    config = MeterConfig(headend_title=HEADEND_TITLE, tsp_title=TSP_TITLE)
    with pytest.raises(ValueError, match="8 bytes"):
        Meter("m1", b"short", keys, config)


# --- the calendar queue ------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.floats(0, 500, allow_nan=False), st.integers(0, 50)),
        st.tuples(st.just("pop"), st.floats(0, 500, allow_nan=False), st.just(0)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(width=st.sampled_from([0.001, 0.5, 1.0, 7.3, 1000.0]), script=ops)
def test_timer_wheel_pops_what_a_heap_pops(width: float, script) -> None:
    wheel, heap = TimerWheel(width), []
    for op, t, idx in script:
        if op == "push":
            wheel.push(t, idx)
            heapq.heappush(heap, (t, idx))
        else:
            expected = []
            while heap and heap[0][0] <= t:
                expected.append(heapq.heappop(heap))
            assert wheel.pop_due(t) == expected
        assert len(wheel) == len(heap) and bool(wheel) == bool(heap)
        assert wheel.earliest() == (heap[0][0] if heap else None)


def test_timer_wheel_refuses_a_useless_width() -> None:
    for width in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            TimerWheel(width)


# --- reservation before send, in a running fleet ------------------------------------------


class DurabilityCheckingSink:
    """A segment's client that, at each publish, reads the NVM file from its
    own connection and records whether the frame's IC was already covered by a
    durable mark (send marks: every value below the mark is reserved)."""

    def __init__(self, db: Path, violations: list, published: list) -> None:
        self.db = sqlite3.connect(db, isolation_level=None)
        self.violations = violations
        self.published = published

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, done=None, retain: bool = False) -> None:
        meter = topic.rsplit("/", 1)[1]
        if payload[0] == GENERAL_GLO_CIPHERING:  # boot events under CC_LAN
            ic = parse_apdu(payload).invocation_counter
            row = self.db.execute("SELECT value FROM counters WHERE meter = ? AND slot = ?",
                                  (meter, LAN_SEND)).fetchone()
            if row is None or row[0] <= ic:
                self.violations.append((meter, ic, row))
            self.published.append((meter, ic))
        if done is not None:
            asyncio.get_running_loop().call_soon(done, None)


def test_no_frame_leaves_before_its_counter_block_is_committed(tmp_path: Path) -> None:
    """Boot events every ~50 ms with blocks of 4 values: a reservation every
    other frame, and a slow disk.  Every frame must find its mark in the file."""
    from ami.tools.provision import provision
    from meters.fleet import Fleet, FleetSettings

    data = tmp_path / "data"
    provision(data, meters=6, concentrators=2, bus_security=False)
    violations: list = []
    published: list = []

    async def main() -> Fleet:
        fleet = Fleet(FleetSettings(broker="mqtt://127.0.0.1:9", data_dir=data, time_compression=600,
                                    boot_retry_s=0.05, boot_retry_max_s=0.05, boot_spread_s=0.01,
                                    counter_block=4, boot_budget_per_s=0, gc_freeze=False))
        await fleet.setup()
        assert fleet.nvm is not None
        real_commit = fleet.nvm.commit

        async def slow_commit(records):  # a slow disk: frames pile up behind it
            records = list(records)
            await asyncio.sleep(0.03)
            await real_commit(records)

        fleet.nvm.commit = slow_commit  # type: ignore[method-assign]
        for link in fleet.links.values():
            link.client = DurabilityCheckingSink(fleet.nvm.path, violations, published)  # type: ignore[assignment]
            link.up = True
        tasks = [asyncio.create_task(fleet._committer()), asyncio.create_task(fleet._scheduler())]
        await asyncio.sleep(1.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fleet.nvm.close()
        return fleet

    fleet = asyncio.run(main())
    assert fleet.metrics is not None and fleet.metrics.counters["nvm_commits"] >= 3
    assert len(published) >= 30, published  # 6 meters re-announcing every ~50 ms
    assert violations == []
    per_meter: dict[str, list[int]] = {}
    for meter, ic in published:
        per_meter.setdefault(meter, []).append(ic)
    assert len(per_meter) == 6
    for ics in per_meter.values():
        assert ics == sorted(set(ics))  # never reused, never back
