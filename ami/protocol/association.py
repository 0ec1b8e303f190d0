"""Application association: xDLMS InitiateRequest/Response inside a minimal AARQ/AARE.

The client (head-end over the LAN, handheld locally) generates a fresh
dedicated (session) key and sends it in an InitiateRequest, ciphered as
glo-initiateRequest (0x21) under the association's global key (CC_LAN or
CC_LOCALE).  The meter answers with a glo-initiateResponse (0x28) under the
same global key.  Data traffic then runs under the dedicated key.

The service-specific 0x21/0x28 APDUs carry no system title, so, as in DLMS,
they travel inside an ACSE AARQ/AARE that names the calling/responding
AP-title.  We encode the minimal BER subset we need::

    AARQ  60 L | A1 09 06 07 <LN with ciphering> | A6 0A 04 08 <calling title>
               | [8A 02 07 80 | 8B 07 <HLS-GMAC> | AC L 80 L <CtoS challenge>]
               | BE L 04 L <glo-initiateRequest>
    AARE  61 L | A1 09 06 07 <LN with ciphering> | A2 03 02 01 <result>
               | A4 0A 04 08 <responding title> | [AA L 80 L <f(CtoS)>]
               | [BE L 04 L <glo-initiateResponse>]

Unknown elements are skipped; every length is bounds-checked.

**Binding the answer to the question.**  A glo-initiateResponse says nothing
about which AARQ it answers, so an AARE held back by a relay from an earlier
attempt used to verify as an answer to today's (issue 9: the head-end then
"learnt" that the meter kept its old CC_LAN and withdrew the new one the
meter had installed).  As DLMS HLS with GMAC (mechanism 5) does, the AARQ
carries a fresh challenge CtoS and the AARE carries

    f(CtoS) = SC (0x10) || IC (4) || GMAC_{CC_LAN, AK}(SC || AK || CtoS)

under the responder's title and its own IC (``hls_gmac``).  Only the party
that holds the global key *and* saw this very challenge can compute it: an
AARE whose f(CtoS) does not verify answers some other AARQ, whatever else
in it verifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import hmac
from typing import TYPE_CHECKING

from ._ber import decode_length, encode_length
from .errors import AuthenticationFailed, MalformedFrame, MalformedMessage
from .frames import MAX_APDU_SIZE, SYSTEM_TITLE_LEN, iv_for
from .security_control import SC_AUTH, TAG_LEN

if TYPE_CHECKING:  # the relay parses AARQ/AARE without any cipher
    from .cipher import Suite0Cipher

__all__ = [
    "AARE_TAG",
    "AARQ_TAG",
    "APP_CONTEXT_LN_CIPHERED",
    "CHALLENGE_LEN",
    "HLS_GMAC_LEN",
    "MECHANISM_HLS_ECDSA",
    "MECHANISM_HLS_GMAC",
    "Aare",
    "Aarq",
    "DEFAULT_CONFORMANCE",
    "DEFAULT_MAX_PDU",
    "DLMS_VERSION",
    "InitiateRequest",
    "InitiateResponse",
    "VAA_NAME_LN",
    "build_aare",
    "build_aarq",
    "decode_initiate_request",
    "decode_initiate_response",
    "encode_initiate_request",
    "encode_initiate_response",
    "hls_gmac",
    "parse_aare",
    "parse_aarq",
    "verify_hls_gmac",
]

#: Logical-name referencing with ciphering (application context id 3).
APP_CONTEXT_LN_CIPHERED = bytes.fromhex("60857405080103")
AARQ_TAG = 0x60
AARE_TAG = 0x61
DLMS_VERSION = 6
DEFAULT_CONFORMANCE = 0x007E1F
DEFAULT_MAX_PDU = 0x04B0
VAA_NAME_LN = 0x0007
_CONFORMANCE_TAG = bytes.fromhex("5F1F0400")
#: Mechanism name high-level security 5 (GMAC), {2 16 756 5 8 2 5}.
MECHANISM_HLS_GMAC = bytes.fromhex("60857405080205")
#: Mechanism name high-level security 7 (ECDSA), {2 16 756 5 8 2 7}: suite 1.
MECHANISM_HLS_ECDSA = bytes.fromhex("60857405080207")
_MECHANISMS = (MECHANISM_HLS_GMAC, MECHANISM_HLS_ECDSA)
#: Our challenges: 16 random bytes (DLMS allows 8 to 64).
CHALLENGE_LEN = 16
_MIN_CHALLENGE, _MAX_CHALLENGE = 8, 64
#: f(CtoS) = SC || IC || 12-byte GMAC tag.
HLS_GMAC_LEN = 1 + 4 + TAG_LEN


@dataclass(frozen=True, slots=True)
class InitiateRequest:
    dedicated_key: bytes | None
    conformance: int = DEFAULT_CONFORMANCE
    max_pdu_size: int = DEFAULT_MAX_PDU
    dlms_version: int = DLMS_VERSION

    def __repr__(self) -> str:  # never show the dedicated key
        has_key = self.dedicated_key is not None
        return f"InitiateRequest(dedicated_key={'<secret>' if has_key else None}, conformance={self.conformance:#08x})"


@dataclass(frozen=True, slots=True)
class InitiateResponse:
    conformance: int = 0x007C1F
    max_pdu_size: int = DEFAULT_MAX_PDU
    dlms_version: int = DLMS_VERSION
    vaa_name: int = VAA_NAME_LN


def encode_initiate_request(req: InitiateRequest) -> bytes:
    out = bytearray((0x01,))
    if req.dedicated_key is None:
        out.append(0x00)
    else:
        if len(req.dedicated_key) != 16:
            raise ValueError("dedicated key must be 16 bytes")
        out += bytes((0x01, 0x10)) + req.dedicated_key
    # response-allowed: default (TRUE), proposed-quality-of-service: absent.
    out += bytes((0x00, 0x00, req.dlms_version))
    out += _CONFORMANCE_TAG + req.conformance.to_bytes(3, "big")
    out += req.max_pdu_size.to_bytes(2, "big")
    return bytes(out)


def decode_initiate_request(data: bytes) -> InitiateRequest:
    try:
        if data[0] != 0x01:
            raise MalformedMessage("not an InitiateRequest")
        pos = 1
        key = None
        if data[pos] == 0x01:
            if data[pos + 1] != 0x10:
                raise MalformedMessage("dedicated key must be 16 bytes")
            key = bytes(data[pos + 2 : pos + 18])
            if len(key) != 16:
                raise MalformedMessage("truncated dedicated key")
            pos += 18
        elif data[pos] == 0x00:
            pos += 1
        else:
            raise MalformedMessage("bad dedicated-key presence flag")
        # response-allowed (00 = default TRUE, or 01 <bool>), QoS (00 or 01 <int8>).
        for _ in range(2):
            if data[pos] == 0x00:
                pos += 1
            elif data[pos] == 0x01:
                pos += 2
            else:
                raise MalformedMessage("bad optional field flag")
        version = data[pos]
        if bytes(data[pos + 1 : pos + 5]) != _CONFORMANCE_TAG:
            raise MalformedMessage("bad conformance block")
        conformance = int.from_bytes(data[pos + 5 : pos + 8], "big")
        max_pdu = int.from_bytes(data[pos + 8 : pos + 10], "big")
        if pos + 10 != len(data):
            raise MalformedMessage("trailing bytes after InitiateRequest")
    except IndexError:
        raise MalformedMessage("truncated InitiateRequest") from None
    return InitiateRequest(key, conformance, max_pdu, version)


def encode_initiate_response(resp: InitiateResponse) -> bytes:
    return (
        bytes((0x08, 0x00, resp.dlms_version))
        + _CONFORMANCE_TAG
        + resp.conformance.to_bytes(3, "big")
        + resp.max_pdu_size.to_bytes(2, "big")
        + resp.vaa_name.to_bytes(2, "big")
    )


def decode_initiate_response(data: bytes) -> InitiateResponse:
    if len(data) != 14 or data[0] != 0x08 or data[1] != 0x00:
        raise MalformedMessage("not an InitiateResponse")
    if bytes(data[3:7]) != _CONFORMANCE_TAG:
        raise MalformedMessage("bad conformance block")
    return InitiateResponse(
        conformance=int.from_bytes(data[7:10], "big"),
        max_pdu_size=int.from_bytes(data[10:12], "big"),
        dlms_version=data[2],
        vaa_name=int.from_bytes(data[12:14], "big"),
    )


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + encode_length(len(value)) + value


def _context() -> bytes:
    return _tlv(0xA1, _tlv(0x06, APP_CONTEXT_LN_CIPHERED))


def _title(tag: int, title: bytes) -> bytes:
    if len(title) != SYSTEM_TITLE_LEN:
        raise ValueError("a system title is 8 bytes")
    return _tlv(tag, _tlv(0x04, title))


def build_aarq(
    calling_title: bytes, initiate_apdu: bytes, challenge: bytes | None = None, mechanism: bytes = MECHANISM_HLS_GMAC
) -> bytes:
    """An AARQ; with ``challenge`` it asks for HLS ``mechanism`` (the AARE
    must carry f(challenge)).  ``initiate_apdu`` is the user-information:
    a glo-initiateRequest in suite 0, the signed key offer in suite 1."""
    body = _context() + _title(0xA6, calling_title)
    if challenge is not None:
        if not _MIN_CHALLENGE <= len(challenge) <= _MAX_CHALLENGE:
            raise ValueError("a challenge is 8 to 64 bytes")
        if mechanism not in _MECHANISMS:
            raise ValueError("unknown authentication mechanism")
        body += _tlv(0x8A, b"\x07\x80") + _tlv(0x8B, mechanism) + _tlv(0xAC, _tlv(0x80, challenge))
    body += _tlv(0xBE, _tlv(0x04, initiate_apdu))
    return _tlv(AARQ_TAG, body)


def build_aare(
    responding_title: bytes, accepted: bool, initiate_apdu: bytes | None, auth_value: bytes | None = None
) -> bytes:
    body = _context() + _tlv(0xA2, _tlv(0x02, bytes((0 if accepted else 1,))))
    body += _title(0xA4, responding_title)
    if auth_value is not None:
        body += _tlv(0xAA, _tlv(0x80, auth_value))
    if initiate_apdu is not None:
        body += _tlv(0xBE, _tlv(0x04, initiate_apdu))
    return _tlv(AARE_TAG, body)


def hls_gmac(cipher: Suite0Cipher, title: bytes, invocation_counter: int, challenge: bytes) -> bytes:
    """f(challenge) = SC || IC || GMAC(SC || AK || challenge), IV = title || IC.

    ``invocation_counter`` must be a fresh value of the sender's counter under
    this key, like any other frame's: GMAC and GCM share the IV space.
    """
    iv = iv_for(title, invocation_counter)
    tag = cipher.seal(SC_AUTH, iv, challenge)[-TAG_LEN:]
    return bytes((SC_AUTH,)) + invocation_counter.to_bytes(4, "big") + tag


def verify_hls_gmac(cipher: Suite0Cipher, title: bytes, value: bytes, challenge: bytes) -> int:
    """Check f(challenge) from ``title``; return its IC, or raise AuthenticationFailed."""
    if len(value) != HLS_GMAC_LEN or value[0] != SC_AUTH:
        raise MalformedFrame("responding authentication value is not SC || IC || GMAC")
    ic = int.from_bytes(value[1:5], "big")
    expected = hls_gmac(cipher, title, ic, challenge)
    if not hmac.compare_digest(expected, value):
        raise AuthenticationFailed("f(CtoS) does not answer this challenge")
    return ic


@dataclass(frozen=True, slots=True)
class Aarq:
    calling_title: bytes
    initiate_apdu: bytes
    challenge: bytes | None = None
    mechanism: bytes | None = None  # MECHANISM_HLS_GMAC (suite 0) or MECHANISM_HLS_ECDSA (suite 1)


@dataclass(frozen=True, slots=True)
class Aare:
    responding_title: bytes
    accepted: bool
    initiate_apdu: bytes | None
    auth_value: bytes | None = None


def _elements(data: bytes, outer_tag: int) -> dict[int, bytes]:
    if len(data) > MAX_APDU_SIZE:
        raise MalformedFrame("association APDU too large")
    if len(data) < 2 or data[0] != outer_tag:
        raise MalformedFrame("not the expected ACSE APDU")
    length, pos = decode_length(data, 1)
    if length != len(data) - pos:
        raise MalformedFrame("ACSE length does not match the frame")
    elements: dict[int, bytes] = {}
    while pos < len(data):
        tag = data[pos]
        length, start = decode_length(data, pos + 1)
        end = start + length
        if end > len(data):
            raise MalformedFrame("ACSE element overruns the frame")
        if tag in elements:
            raise MalformedFrame("duplicate ACSE element")
        elements[tag] = bytes(data[start:end])
        pos = end
    return elements


def _inner(value: bytes, tag: int) -> bytes:
    if len(value) < 2 or value[0] != tag:
        raise MalformedFrame("unexpected ACSE inner element")
    length, pos = decode_length(value, 1)
    if length != len(value) - pos:
        raise MalformedFrame("ACSE inner length mismatch")
    return value[pos:]


def _check_context(elements: dict[int, bytes]) -> None:
    if 0xA1 not in elements or _inner(elements[0xA1], 0x06) != APP_CONTEXT_LN_CIPHERED:
        raise MalformedFrame("application context is not LN with ciphering")


def _parse_title(value: bytes) -> bytes:
    title = _inner(value, 0x04)
    if len(title) != SYSTEM_TITLE_LEN:
        raise MalformedFrame("AP-title is not an 8-byte system title")
    return title


def parse_aarq(data: bytes) -> Aarq:
    el = _elements(data, AARQ_TAG)
    _check_context(el)
    if 0xA6 not in el or 0xBE not in el:
        raise MalformedFrame("AARQ lacks calling AP-title or user information")
    challenge = mechanism = None
    if 0xAC in el:
        mechanism = el.get(0x8B)
        if mechanism not in _MECHANISMS:
            raise MalformedFrame("a challenge needs an HLS-GMAC or HLS-ECDSA mechanism name")
        challenge = _inner(el[0xAC], 0x80)
        if not _MIN_CHALLENGE <= len(challenge) <= _MAX_CHALLENGE:
            raise MalformedFrame("challenge length outside 8..64")
    return Aarq(_parse_title(el[0xA6]), _inner(el[0xBE], 0x04), challenge, mechanism)


def parse_aare(data: bytes) -> Aare:
    el = _elements(data, AARE_TAG)
    _check_context(el)
    if 0xA2 not in el or 0xA4 not in el:
        raise MalformedFrame("AARE lacks result or responding AP-title")
    result = _inner(el[0xA2], 0x02)
    if len(result) != 1:
        raise MalformedFrame("bad AARE result")
    apdu = _inner(el[0xBE], 0x04) if 0xBE in el else None
    auth_value = _inner(el[0xAA], 0x80) if 0xAA in el else None
    if auth_value is not None and not _MIN_CHALLENGE <= len(auth_value) <= _MAX_CHALLENGE:
        raise MalformedFrame("responding authentication value outside 8..64 bytes")
    return Aare(_parse_title(el[0xA4]), result[0] == 0, apdu, auth_value)
