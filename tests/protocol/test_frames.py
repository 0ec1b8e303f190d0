"""APDU layout (encode_apdu / parse_apdu / open_apdu) and BER lengths."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import open_apdu, parse_apdu, seal_apdu
from ami.protocol.errors import CounterExhausted, FrameTooLarge, MalformedFrame
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    MAX_APDU_SIZE,
    CipheredApdu,
    encode_apdu,
)
from ami.protocol._ber import decode_length, encode_length
from ami.protocol.frames import DED_SERVICE_TAGS, IC_MAX, _make_apdu, iv_for

from ._util import ALL_TAGS, FAST, GENERAL_TAGS, SPECIFIC_TAGS, cipher, ics, titles

METER = bytes.fromhex("4C4E4B0000000001")

# --- BER / A-XDR lengths ---------------------------------------------------


def test_length_forms_at_the_boundaries():
    assert encode_length(0) == b"\x00"
    assert encode_length(0x7F) == b"\x7f"
    assert encode_length(0x80) == b"\x81\x80"
    assert encode_length(0xFF) == b"\x81\xff"
    assert encode_length(0x100) == b"\x82\x01\x00"
    assert encode_length(0xFFFF) == b"\x82\xff\xff"
    for bad in (-1, 0x10000, 1 << 40):
        with pytest.raises(ValueError):
            encode_length(bad)


def test_every_length_round_trips():
    for n in range(0x10000):
        raw = encode_length(n)
        assert len(raw) == (1 if n < 0x80 else 2 if n < 0x100 else 3)
        assert decode_length(raw, 0) == (n, len(raw))
        assert decode_length(b"\xaa" + raw + b"\xbb", 1) == (n, 1 + len(raw))


@given(n=st.integers(0, 0xFFFF), prefix=st.binary(max_size=8), suffix=st.binary(max_size=8))
def test_length_round_trip_at_any_offset(n, prefix, suffix):
    raw = encode_length(n)
    assert decode_length(prefix + raw + suffix, len(prefix)) == (n, len(prefix) + len(raw))


@pytest.mark.parametrize("first", [0x80] + list(range(0x83, 0x100)))
def test_refused_length_forms(first):
    # 0x80 (indefinite) and long forms above two length octets.
    with pytest.raises(MalformedFrame):
        decode_length(bytes((first, 1, 2, 3, 4, 5)), 0)


@pytest.mark.parametrize("raw", [b"", b"\x81", b"\x82", b"\x82\x01"])
def test_truncated_lengths(raw):
    with pytest.raises(MalformedFrame):
        decode_length(raw, 0)
    with pytest.raises(MalformedFrame):
        decode_length(b"\x00" + raw, 1)


def test_non_minimal_length_forms_are_tolerated():
    """Documented tolerance (docs/protocol.md): BER, not DER.  The length is
    not authenticated anyway, and our encoder always emits the minimal form."""
    assert decode_length(b"\x81\x05", 0) == (5, 2)
    assert decode_length(b"\x82\x00\x05", 0) == (5, 3)


# --- APDU codec ---------------------------------------------------------------


@FAST
@given(tag=st.sampled_from(ALL_TAGS), sc=st.sampled_from([0x10, 0x30]), ic=ics, body=st.binary(min_size=12, max_size=4000), title=titles)
def test_encode_parse_round_trip(tag, sc, ic, body, title):
    general = tag in GENERAL_TAGS
    try:
        raw = encode_apdu(tag, sc, ic, body, title if general else None)
    except FrameTooLarge:
        assert len(body) + 5 + (13 if general else 4) > MAX_APDU_SIZE
        return
    apdu = parse_apdu(raw)
    assert apdu == CipheredApdu(tag, title if general else None, sc, ic, body)
    assert type(apdu.body) is bytes
    assert encode_apdu(apdu.tag, apdu.security_control, apdu.invocation_counter, apdu.body, apdu.system_title) == raw


@pytest.mark.parametrize("body_len", [12, 0x7F - 5, 0x80 - 5, 0xFF - 5, 0x100 - 5, MAX_APDU_SIZE - 30])
@pytest.mark.parametrize("tag", [GENERAL_GLO_CIPHERING, 0xC8])
def test_length_octets_in_frames(body_len, tag):
    title = METER if tag in GENERAL_TAGS else None
    raw = encode_apdu(tag, 0x30, 1, bytes(body_len), title)
    at = 10 if title else 1
    inner = body_len + 5
    assert raw[at : at + len(encode_length(inner))] == encode_length(inner)
    assert parse_apdu(raw).body == bytes(body_len)


def test_largest_frame_accepted_and_one_more_refused():
    # 0xC8: 1 tag + 3 length octets + 5 (SC, IC) = 9 bytes of header.
    raw = encode_apdu(0xC8, 0x30, 1, bytes(MAX_APDU_SIZE - 9))
    assert len(raw) == MAX_APDU_SIZE
    assert len(parse_apdu(raw).body) == MAX_APDU_SIZE - 9
    with pytest.raises(FrameTooLarge):
        encode_apdu(0xC8, 0x30, 1, bytes(MAX_APDU_SIZE - 8))
    with pytest.raises(FrameTooLarge):
        parse_apdu(raw + b"\x00")
    with pytest.raises(FrameTooLarge):
        parse_apdu(bytes(1 << 20))


def test_encode_refuses_bad_arguments():
    with pytest.raises(ValueError):
        encode_apdu(0x00, 0x30, 1, bytes(12))
    with pytest.raises(ValueError):
        encode_apdu(0xDB, 0x30, 1, bytes(12))  # general form needs a title
    with pytest.raises(ValueError):
        encode_apdu(0xDB, 0x30, 1, bytes(12), b"short")
    for ic in (-1, IC_MAX + 1, 1 << 40):
        with pytest.raises(CounterExhausted):
            encode_apdu(0xC8, 0x30, ic, bytes(12))


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "truncated"),
        (b"\xdb", "truncated"),
        (b"\x00\x05\x30\x00\x00\x00\x01", "unknown tag"),
        (b"\xdb\x07" + bytes(7) + b"\x05\x30\x00\x00\x00\x01", "title length"),
        (b"\xdb\x08" + bytes(8), "truncated title"),
        (b"\xc8\x04\x30\x00\x00\x00", "no room for SC and IC"),
        (b"\xc8\x05\x30\x00\x00\x00\x01", "no room for tag"),
        (b"\xc8\x10\x30\x00\x00\x00\x01" + bytes(11), "no room for tag (16)"),
        (b"\xc8\x80" + bytes(20), "indefinite length"),
        (b"\xc8\x83\x00\x00\x11" + bytes(17), "3-octet length"),
        (b"\xc8\x11\x30\x00\x00\x00\x01" + bytes(11), "length too long"),
        (b"\xc8\x10\x30\x00\x00\x00\x01" + bytes(12), "length too short"),
    ],
)
def test_malformed_frames(raw, why):
    with pytest.raises(MalformedFrame):
        parse_apdu(raw)


def test_enc_only_frame_may_be_short_only_when_opted_in():
    raw = b"\xc8\x06\x20\x00\x00\x00\x01\x99"
    assert parse_apdu(raw, allow_unauthenticated=True).body == b"\x99"


def test_parse_accepts_buffers_and_returns_bytes():
    raw = seal_apdu(cipher(), GENERAL_DED_CIPHERING, METER, 9, b"hello")
    for view in (bytearray(raw), memoryview(raw), memoryview(b"xx" + raw)[2:]):
        apdu = parse_apdu(view)
        assert apdu == parse_apdu(raw)
        assert type(apdu.body) is bytes and type(apdu.system_title) is bytes


def test_fast_constructor_matches_dataclass():
    # _make_apdu sets exactly these slots: a new field must be added there too.
    assert [f.name for f in dataclasses.fields(CipheredApdu)] == [
        "tag", "system_title", "security_control", "invocation_counter", "body"
    ]
    made = _make_apdu(0xDB, METER, 0x30, 7, b"body")
    assert made == CipheredApdu(0xDB, METER, 0x30, 7, b"body")
    assert hash(made) == hash(CipheredApdu(0xDB, METER, 0x30, 7, b"body"))
    assert repr(made) == repr(CipheredApdu(0xDB, METER, 0x30, 7, b"body"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.invocation_counter = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_apdu(seal_apdu(cipher(), 0xC8, METER, 1, b"x")).body = b""  # type: ignore[misc]


@pytest.mark.parametrize("tag", ALL_TAGS, ids=hex)
def test_is_dedicated(tag):
    title = METER if tag in GENERAL_TAGS else None
    apdu = CipheredApdu(tag, title, 0x30, 0, bytes(12))
    assert apdu.is_dedicated == (tag == GENERAL_DED_CIPHERING or tag in DED_SERVICE_TAGS)


def test_open_apdu_needs_the_sender_title():
    c = cipher()
    specific = parse_apdu(seal_apdu(c, 0xC8, METER, 1, b"x"))
    with pytest.raises(MalformedFrame):
        open_apdu(c, specific)  # no title in the frame and none given
    assert open_apdu(c, specific, METER) == b"x"
    general = parse_apdu(seal_apdu(c, GENERAL_GLO_CIPHERING, METER, 1, b"x"))
    assert open_apdu(c, general) == open_apdu(c, general, METER) == b"x"
    with pytest.raises(MalformedFrame):
        open_apdu(c, general, bytes(8))  # frame says another sender


def test_iv_never_truncates_the_counter():
    assert iv_for(METER, 0) == METER + bytes(4)
    assert iv_for(METER, IC_MAX) == METER + b"\xff\xff\xff\xff"
    for ic in (IC_MAX + 1, 1 << 32 | 5, 1 << 33, -1):
        with pytest.raises(CounterExhausted):
            iv_for(METER, ic)
        with pytest.raises(CounterExhausted):
            seal_apdu(cipher(), 0xDB, METER, ic, b"x")
    with pytest.raises(ValueError):
        iv_for(METER[:7], 1)


@pytest.mark.parametrize("tag", SPECIFIC_TAGS, ids=hex)
def test_specific_forms_carry_no_title(tag):
    raw = seal_apdu(cipher(), tag, METER, 3, b"abc")
    assert raw[0] == tag and METER not in raw
    assert parse_apdu(raw).system_title is None
