"""InitiateRequest/Response and the minimal AARQ/AARE subset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol.association import (
    Aare,
    Aarq,
    InitiateRequest,
    InitiateResponse,
    build_aare,
    build_aarq,
    decode_initiate_request,
    decode_initiate_response,
    encode_initiate_request,
    encode_initiate_response,
    parse_aare,
    parse_aarq,
)
from ami.protocol.errors import MalformedFrame, MalformedMessage
from ami.protocol.association import APP_CONTEXT_LN_CIPHERED

from ._util import FAST, keys16, secret, titles

TITLE = bytes.fromhex("48454E0000000001")


@FAST
@given(
    key=st.none() | keys16,
    conformance=st.integers(0, 0xFFFFFF),
    max_pdu=st.integers(0, 0xFFFF),
    version=st.integers(0, 255),
)
def test_initiate_request_round_trip(key, conformance, max_pdu, version):
    if key is not None:
        secret(key)
    req = InitiateRequest(key, conformance, max_pdu, version)
    raw = encode_initiate_request(req)
    assert decode_initiate_request(raw) == req
    assert raw[1] == (0x00 if key is None else 0x01)


def test_initiate_request_without_key_layout():
    raw = encode_initiate_request(InitiateRequest(None))
    assert raw == bytes.fromhex("01000000065F1F0400007E1F04B0")


def test_initiate_request_optional_fields_in_long_form():
    # response-allowed present (01 00 = FALSE) and a QoS (01 05): accepted, then
    # re-encoded in our default form.
    raw = bytes.fromhex("0100" + "0100" + "0105" + "06" + "5F1F0400007E1F" + "04B0")
    req = decode_initiate_request(raw)
    assert req == InitiateRequest(None)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "02",
        "01",
        "0102",  # bad presence flag
        "01010f" + "00" * 15,  # 15-byte key
        "010110" + "00" * 10,  # truncated key
        "0100",
        "010002",  # bad optional flag
        "0100000006",
        "010000000600000000007E1F04B0",  # bad conformance tag
        "01000000065F1F0400007E1F04",  # truncated max PDU
        "01000000065F1F0400007E1F04B000",  # trailing byte
    ],
)
def test_initiate_request_refusals(raw):
    with pytest.raises(MalformedMessage):
        decode_initiate_request(bytes.fromhex(raw))


def test_initiate_request_key_length_checked_on_encode():
    with pytest.raises(ValueError):
        encode_initiate_request(InitiateRequest(bytes(15)))


@FAST
@given(conformance=st.integers(0, 0xFFFFFF), max_pdu=st.integers(0, 0xFFFF), version=st.integers(0, 255), vaa=st.integers(0, 0xFFFF))
def test_initiate_response_round_trip(conformance, max_pdu, version, vaa):
    resp = InitiateResponse(conformance, max_pdu, version, vaa)
    raw = encode_initiate_response(resp)
    assert len(raw) == 14 and decode_initiate_response(raw) == resp


@pytest.mark.parametrize(
    "raw", ["", "0800065F1F0400007C1F04000007" + "00", "0800065F1F0400007C1F040000", "0900065F1F0400007C1F04000007",
            "0801065F1F0400007C1F04000007", "080006001F0400007C1F04000007"]
)
def test_initiate_response_refusals(raw):
    with pytest.raises(MalformedMessage):
        decode_initiate_response(bytes.fromhex(raw))


@FAST
@given(title=titles, apdu=st.binary(max_size=1500))
def test_aarq_round_trip(title, apdu):
    raw = build_aarq(title, apdu)
    assert raw[0] == 0x60
    assert parse_aarq(raw) == Aarq(title, apdu)


@FAST
@given(title=titles, accepted=st.booleans(), apdu=st.none() | st.binary(max_size=1500))
def test_aare_round_trip(title, accepted, apdu):
    raw = build_aare(title, accepted, apdu)
    assert raw[0] == 0x61
    assert parse_aare(raw) == Aare(title, accepted, apdu)


def test_aarq_layout():
    raw = build_aarq(TITLE, b"\x21\x00")
    assert raw == (
        bytes.fromhex("601D")
        + bytes.fromhex("A109 0607") + APP_CONTEXT_LN_CIPHERED
        + bytes.fromhex("A60A 0408") + TITLE
        + bytes.fromhex("BE04 0402 2100")
    )


def test_unknown_acse_elements_are_skipped():
    raw = build_aarq(TITLE, b"\x21\x00")
    extra = bytes.fromhex("8A020780")  # sender-acse-requirements
    body = raw[2:] + extra
    assert parse_aarq(bytes((0x60, len(body))) + body) == Aarq(TITLE, b"\x21\x00")


def _rebuild(tag: int, elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return bytes((tag, len(body))) + body


CTX = bytes.fromhex("A1090607") + APP_CONTEXT_LN_CIPHERED
CALLING = bytes.fromhex("A60A0408") + TITLE
USER = bytes.fromhex("BE0404022100")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x60",
        b"\x61\x00",  # AARE tag in an AARQ
        _rebuild(0x60, [CALLING, USER]),  # no context
        _rebuild(0x60, [CTX, USER]),  # no calling title
        _rebuild(0x60, [CTX, CALLING]),  # no user information
        _rebuild(0x60, [CTX, CALLING, USER, USER]),  # duplicate element
        _rebuild(0x60, [bytes.fromhex("A1090607") + bytes(7), CALLING, USER]),  # other context
        _rebuild(0x60, [CTX, bytes.fromhex("A6090407") + TITLE[:7], USER]),  # 7-byte title
        _rebuild(0x60, [CTX, CALLING, bytes.fromhex("BE0405022100")]),  # inner overrun
        _rebuild(0x60, [CTX, CALLING, bytes.fromhex("BE0403022100")]),  # element overrun
        _rebuild(0x60, [CTX, CALLING, bytes.fromhex("BE04 0502 2100")]),  # not an octet string
        _rebuild(0x60, [CTX, CALLING, USER])[:-1],  # truncated
        _rebuild(0x60, [CTX, CALLING, USER]) + b"\x00",  # trailing
        b"\x60\x82" + (5000).to_bytes(2, "big") + bytes(5000),  # too large
    ],
)
def test_aarq_refusals(raw):
    with pytest.raises(MalformedFrame):
        parse_aarq(raw)


RESULT_OK = bytes.fromhex("A203020100")
RESPONDING = bytes.fromhex("A40A0408") + TITLE


@pytest.mark.parametrize(
    "raw",
    [
        _rebuild(0x61, [CTX, RESPONDING]),  # no result
        _rebuild(0x61, [CTX, RESULT_OK]),  # no responding title
        _rebuild(0x61, [CTX, bytes.fromhex("A20402020000"), RESPONDING]),  # 2-byte result
        _rebuild(0x61, [CTX, bytes.fromhex("A203040100"), RESPONDING]),  # result not an integer
        _rebuild(0x61, [RESULT_OK, RESPONDING]),  # no context
    ],
)
def test_aare_refusals(raw):
    with pytest.raises(MalformedFrame):
        parse_aare(raw)


def test_aare_result_values():
    assert parse_aare(_rebuild(0x61, [CTX, RESULT_OK, RESPONDING])) == Aare(TITLE, True, None)
    for result in (1, 2, 0xFF):  # permanent, transient, anything else: rejected
        el = bytes.fromhex("A2030201") + bytes((result,))
        assert parse_aare(_rebuild(0x61, [CTX, el, RESPONDING])).accepted is False


def test_build_refuses_bad_titles():
    with pytest.raises(ValueError):
        build_aarq(TITLE[:7], b"")
    with pytest.raises(ValueError):
        build_aare(TITLE + b"\x00", True, None)
