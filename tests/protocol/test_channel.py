"""Sealer / Opener: the counter moves only after the tag verified."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import Opener, ReceiveCounter, Sealer, SendCounter, Suite0Cipher, parse_apdu, seal_apdu
from ami.protocol.errors import AuthenticationFailed, CounterNotReserved, MalformedFrame, ReplayedFrame
from ami.protocol.frames import GENERAL_DED_CIPHERING, GENERAL_GLO_CIPHERING, encode_apdu

from ._util import FAST, secret

METER = bytes.fromhex("4C4E4B0000000011")
HEADEND = bytes.fromhex("48454E0000000001")
SESSION = bytes(range(0x60, 0x70))
AK = bytes(range(0x70, 0x80))


def _pair(start: int = 0, tag: int = GENERAL_DED_CIPHERING) -> tuple[Sealer, Opener]:
    secret(SESSION, AK)
    counter = SendCounter(start)
    counter.confirm_reservation(counter.next_reservation())
    sealer = Sealer(Suite0Cipher(SESSION, AK), METER, counter, tag)
    opener = Opener(Suite0Cipher(SESSION, AK), METER, ReceiveCounter(start))
    return sealer, opener


def test_sealer_to_opener():
    sealer, opener = _pair()
    for i in range(5):
        frame = sealer.seal(b"reading %d" % i)
        apdu = parse_apdu(frame)
        assert apdu.invocation_counter == i and apdu.system_title == METER
        assert opener.open(apdu) == b"reading %d" % i
        assert opener.counter.lowest_acceptable == i + 1
    # tag override, e.g. an initiate response on the same channel
    apdu = parse_apdu(sealer.seal(b"x", tag=0x28))
    assert apdu.tag == 0x28 and apdu.system_title is None
    assert opener.open(apdu) == b"x"


def test_replay_is_refused_and_changes_nothing():
    sealer, opener = _pair()
    frame = sealer.seal(b"once")
    assert opener.open(parse_apdu(frame)) == b"once"
    with pytest.raises(ReplayedFrame):
        opener.open(parse_apdu(frame))
    assert opener.counter.lowest_acceptable == 1
    assert not opener.would_accept(parse_apdu(frame))
    assert opener.would_accept(parse_apdu(sealer.seal(b"next")))


def test_forged_huge_counter_does_not_block_genuine_traffic():
    """One public stack moves the counter before the tag check: a single
    forged frame with IC 0xFFFFFFFF then blocks every genuine frame."""
    sealer, opener = _pair()
    assert opener.open(parse_apdu(sealer.seal(b"first"))) == b"first"
    forged = encode_apdu(GENERAL_DED_CIPHERING, 0x30, 0xFFFFFFFF, bytes(40), METER)
    with pytest.raises(AuthenticationFailed):
        opener.open(parse_apdu(forged))
    assert opener.counter.lowest_acceptable == 1
    # A genuine frame sealed under another key, with the huge counter: same.
    secret(bytes(range(1, 17)))
    wrong = Suite0Cipher(bytes(range(1, 17)), AK)
    with pytest.raises(AuthenticationFailed):
        opener.open(parse_apdu(seal_apdu(wrong, GENERAL_DED_CIPHERING, METER, 0xFFFFFFFF, b"evil")))
    assert opener.counter.lowest_acceptable == 1
    assert opener.open(parse_apdu(sealer.seal(b"second"))) == b"second"
    assert opener.counter.lowest_acceptable == 2


def test_frame_from_another_sender_is_refused():
    sealer, opener = _pair()
    other = Sealer(sealer.cipher, HEADEND, sealer.counter, GENERAL_GLO_CIPHERING)
    with pytest.raises(MalformedFrame):
        opener.open(parse_apdu(other.seal(b"x")))
    assert opener.counter.lowest_acceptable == 0


def test_unreserved_sealer_produces_nothing():
    secret(SESSION, AK)
    sealer = Sealer(Suite0Cipher(SESSION, AK), METER, SendCounter(), GENERAL_DED_CIPHERING)
    with pytest.raises(CounterNotReserved):
        sealer.seal(b"x")


def test_reprs_hide_keys():
    sealer, opener = _pair()
    for text in (repr(sealer), repr(opener), str(sealer), repr(sealer.cipher)):
        assert SESSION.hex() not in text.lower() and AK.hex() not in text.lower()
        assert repr(SESSION)[2:-1] not in text


@FAST
@given(
    start=st.integers(0, 2**32 - 50),
    script=st.lists(st.sampled_from(["genuine", "replay", "forged", "skip"]), max_size=30),
)
def test_opener_counter_only_moves_on_verified_frames(start, script):
    sealer, opener = _pair(start)
    sent: list[bytes] = []
    lowest = start
    for step in script:
        if step == "genuine":
            frame = sealer.seal(b"ok")
            sent.append(frame)
            assert opener.open(parse_apdu(frame)) == b"ok"
            lowest = parse_apdu(frame).invocation_counter + 1
        elif step == "skip":  # lost frame: a gap
            sealer.seal(b"lost")
        elif step == "replay" and sent:
            with pytest.raises(ReplayedFrame):
                opener.open(parse_apdu(sent[-1]))
        elif step == "forged":
            ic = sealer.counter.next_value + 1000
            with pytest.raises(AuthenticationFailed):
                opener.open(parse_apdu(encode_apdu(GENERAL_DED_CIPHERING, 0x30, min(ic, 2**32 - 1), bytes(30), METER)))
        assert opener.counter.lowest_acceptable == lowest
