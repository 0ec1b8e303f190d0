"""Every published/derived DLMS vector, byte for byte (tests/protocol/vectors.json)."""

from __future__ import annotations

import pytest

from ami.protocol import (
    Opener,
    ReceiveCounter,
    Sealer,
    SecretBytes,
    SendCounter,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from ami.protocol.association import (
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
from ami.protocol.errors import UnsupportedSecurity
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    GLO_INITIATE_RESPONSE,
)
from ami.protocol.keys import KeyId, decode_key_transfer, encode_key_transfer, unwrap_key, wrap_key
from ami.protocol.frames import iv_for

from ._util import AK, EK, IC, SYSTEM_TITLE, VECTORS, cipher, secret

VECS = VECTORS["vectors"]
BY_NAME = {v["name"]: v for v in VECS}

# What each vector must parse to, written out independently of the hex.
EXPECTED = {
    "glo-get-request, auth+enc": (0xC8, None, 0x30, IC),
    "glo-get-request, auth only": (0xC8, None, 0x10, IC),
    "glo-get-request, enc only (no tag)": (0xC8, None, 0x20, IC),
    "glo-initiateRequest carrying dedicated key 00112233445566778899AABBCCDDEEFF": (
        GLO_INITIATE_REQUEST,
        None,
        0x30,
        IC,
    ),
    "glo-initiateResponse": (GLO_INITIATE_RESPONSE, None, 0x30, IC),
    "general-glo-ciphering (DB) of the get-request": (GENERAL_GLO_CIPHERING, SYSTEM_TITLE, 0x30, IC),
    "general-ded-ciphering (DC), dedicated key 00112233445566778899AABBCCDDEEFF, IC 01234568": (
        GENERAL_DED_CIPHERING,
        SYSTEM_TITLE,
        0x30,
        0x01234568,
    ),
}
DEDICATED_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")


def test_vector_file_keeps_provenance():
    assert set(EXPECTED) == set(BY_NAME)
    for v in VECS:
        assert v["kind"] and v["source"]
    assert VECTORS["key_wrap"]["about"] and VECTORS["hls_gmac"]["about"]
    assert IC == 0x01234567 and SYSTEM_TITLE[:3] == b"MMM"


def _key(v) -> bytes:
    return bytes.fromhex(v.get("ek_override", VECTORS["keys"]["ek"]))


def _allow(v) -> bool:
    return v["sc"] == "20"


@pytest.fixture(params=VECS, ids=[v["name"] for v in VECS])
def vector(request):
    return request.param


def test_parse_fields(vector):
    apdu = parse_apdu(bytes.fromhex(vector["apdu"]), allow_unauthenticated=_allow(vector))
    tag, title, sc, ic = EXPECTED[vector["name"]]
    assert apdu.tag == tag
    assert apdu.system_title == title
    assert apdu.security_control == sc == int(vector["sc"], 16)
    assert apdu.invocation_counter == ic
    plaintext = bytes.fromhex(vector["plaintext"])
    if sc == 0x10:
        assert apdu.body == plaintext + apdu.body[-12:]  # GMAC only: text in clear
    elif sc == 0x20:
        assert len(apdu.body) == len(plaintext)  # no tag at all
    else:
        assert len(apdu.body) == len(plaintext) + 12
    assert apdu.is_dedicated == (tag == GENERAL_DED_CIPHERING)


def test_open_gives_plaintext(vector):
    apdu = parse_apdu(bytes.fromhex(vector["apdu"]), allow_unauthenticated=_allow(vector))
    c = cipher(_key(vector), AK)
    got = open_apdu(c, apdu, SYSTEM_TITLE, allow_unauthenticated=_allow(vector))
    assert got == bytes.fromhex(vector["plaintext"])
    if apdu.system_title is not None:  # general forms carry the title themselves
        assert open_apdu(c, apdu) == got


def test_enc_only_vector_refused_without_opt_in():
    v = BY_NAME["glo-get-request, enc only (no tag)"]
    raw = bytes.fromhex(v["apdu"])
    with pytest.raises(UnsupportedSecurity):
        parse_apdu(raw)
    apdu = parse_apdu(raw, allow_unauthenticated=True)
    c = cipher()
    with pytest.raises(UnsupportedSecurity):
        open_apdu(c, apdu, SYSTEM_TITLE)
    with pytest.raises(UnsupportedSecurity):
        c.open(0x20, iv_for(SYSTEM_TITLE, IC), apdu.body)
    # An Opener (what services use) never opts in.
    with pytest.raises(UnsupportedSecurity):
        Opener(c, SYSTEM_TITLE, ReceiveCounter()).open(apdu)
    # ... and it is the same keystream as the 0x30 vector's ciphertext.
    auth_enc = bytes.fromhex(BY_NAME["glo-get-request, auth+enc"]["apdu"])
    assert auth_enc[7:-12] == raw[7:]


@pytest.mark.parametrize("v", [v for v in VECS if v["sc"] in ("30", "10")], ids=lambda v: v["name"])
def test_seal_reproduces_apdu(v):
    raw = bytes.fromhex(v["apdu"])
    tag, _title, sc, ic = EXPECTED[v["name"]]
    c = cipher(_key(v), AK)
    out = seal_apdu(c, tag, SYSTEM_TITLE, ic, bytes.fromhex(v["plaintext"]), security_control=sc)
    assert out == raw
    # The same through a Sealer whose counter is durably reserved at IC.
    counter = SendCounter(ic)
    counter.confirm_reservation(ic + 1)
    assert Sealer(c, SYSTEM_TITLE, counter, tag, security_control=sc).seal(bytes.fromhex(v["plaintext"])) == raw
    # And an Opener expecting this sender accepts it exactly once.
    opener = Opener(c, SYSTEM_TITLE, ReceiveCounter(ic))
    assert opener.open(parse_apdu(raw)) == bytes.fromhex(v["plaintext"])
    assert opener.counter.lowest_acceptable == ic + 1


def test_initiate_request_vector():
    v = BY_NAME["glo-initiateRequest carrying dedicated key 00112233445566778899AABBCCDDEEFF"]
    plaintext = bytes.fromhex(v["plaintext"])
    req = decode_initiate_request(plaintext)
    secret(DEDICATED_KEY)
    assert req.dedicated_key == DEDICATED_KEY
    assert req.conformance == 0x007E1F
    assert req.max_pdu_size == 0x04B0
    assert req.dlms_version == 6
    assert encode_initiate_request(req) == plaintext
    assert req == InitiateRequest(DEDICATED_KEY)  # our defaults are the vector's values
    # The vector's APDU travels in our AARQ and comes back unchanged.
    aarq = parse_aarq(build_aarq(SYSTEM_TITLE, bytes.fromhex(v["apdu"])))
    assert aarq.calling_title == SYSTEM_TITLE and aarq.initiate_apdu == bytes.fromhex(v["apdu"])


def test_initiate_response_vector():
    v = BY_NAME["glo-initiateResponse"]
    plaintext = bytes.fromhex(v["plaintext"])
    resp = decode_initiate_response(plaintext)
    assert resp == InitiateResponse(conformance=0x007C1F, max_pdu_size=0x0400, dlms_version=6, vaa_name=0x0007)
    assert encode_initiate_response(resp) == plaintext
    aare = parse_aare(build_aare(SYSTEM_TITLE, True, bytes.fromhex(v["apdu"])))
    assert aare.accepted and aare.responding_title == SYSTEM_TITLE
    assert aare.initiate_apdu == bytes.fromhex(v["apdu"])


KW = VECTORS["key_wrap"]
KEK = bytes.fromhex(KW["kek"])
WRAP_KEY = bytes.fromhex(KW["key"])
WRAPPED = bytes.fromhex(KW["wrapped"])


def test_rfc3394_wrap_unwrap():
    secret(KEK, WRAP_KEY)
    assert wrap_key(KEK, WRAP_KEY) == WRAPPED
    got = unwrap_key(KEK, WRAPPED)
    assert got == WRAP_KEY and isinstance(got, SecretBytes)


@pytest.mark.parametrize("key_id", list(KeyId))
def test_key_transfer_parameter_bytes(key_id):
    secret(KEK, WRAP_KEY)
    param = encode_key_transfer(KEK, [(key_id, WRAP_KEY)])
    assert param == bytes((0x01, 0x01, 0x02, 0x02, 0x16, int(key_id), 0x09, 0x18)) + WRAPPED
    [(got_id, got_key)] = decode_key_transfer(KEK, param)
    assert got_id is key_id and got_key == WRAP_KEY and isinstance(got_key, SecretBytes)


def test_key_transfer_several_items_keep_order():
    secret(KEK, WRAP_KEY)
    items = [(KeyId.GLOBAL_UNICAST, WRAP_KEY), (KeyId.AUTHENTICATION, AK), (KeyId.BROADCAST, EK)]
    param = encode_key_transfer(KEK, items)
    assert param[:2] == b"\x01\x03" and len(param) == 2 + 3 * 30
    assert param[2 : 2 + 30] == bytes.fromhex("0202160009 18".replace(" ", "")) + WRAPPED
    assert decode_key_transfer(KEK, param) == items


HLS = VECTORS["hls_gmac"]


def test_hls_gmac_vector():
    title = bytes.fromhex(HLS["system_title"])
    ic = int(HLS["invocation_counter"], 16)
    challenge = bytes.fromhex(HLS["challenge"])
    tag = bytes.fromhex(HLS["tag"])
    c = cipher(EK, AK)
    iv = iv_for(title, ic)
    assert iv == title + b"\x00\x00\x00\x01"
    out = c.seal(int(HLS["sc"], 16), iv, challenge)
    assert out.endswith(tag)
    assert out == challenge + tag  # auth only: the challenge travels in clear
    assert c.open(0x10, iv, out) == challenge
