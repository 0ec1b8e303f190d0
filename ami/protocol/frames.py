"""Ciphered APDU codec: general-glo/ded-ciphering and service-specific glo- APDUs.

Layouts (docs/protocol.md walks through one by hand)::

    general-glo-ciphering  DB | 08 | system title (8) | len | SC | IC (4) | C | T
    general-ded-ciphering  DC | 08 | system title (8) | len | SC | IC (4) | C | T
    service-specific       tag | len | SC | IC (4) | C | T     (0x21, 0x28, C8...)

IV = the *sender's* system title || IC (big-endian).  The service-specific
forms carry no system title: the receiver knows it from the association.
Parsing is strict: the declared length must cover exactly the rest of the
frame, so trailing bytes, truncations and oversized frames are all refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._ber import decode_length, encode_length
from .errors import CounterExhausted, FrameTooLarge, MalformedFrame
from .security_control import SC_AUTH_ENC, TAG_LEN, check_security_control

__all__ = [
    "CipheredApdu",
    "DED_SERVICE_TAGS",
    "GENERAL_DED_CIPHERING",
    "GENERAL_GLO_CIPHERING",
    "GLO_INITIATE_REQUEST",
    "GLO_INITIATE_RESPONSE",
    "GLO_SERVICE_TAGS",
    "IC_MAX",
    "MAX_APDU_SIZE",
    "SYSTEM_TITLE_LEN",
    "encode_apdu",
    "iv_for",
    "open_apdu",
    "parse_apdu",
    "seal_apdu",
]

if TYPE_CHECKING:  # parsing needs no cipher: the relay imports this module
    from .cipher import Suite0Cipher

GENERAL_GLO_CIPHERING = 0xDB
GENERAL_DED_CIPHERING = 0xDC
GLO_INITIATE_REQUEST = 0x21
GLO_INITIATE_RESPONSE = 0x28
#: glo- service-specific tags (get/set/action requests and responses).
GLO_SERVICE_TAGS = frozenset({0xC8, 0xC9, 0xCB, 0xCC, 0xCD, 0xCF})
#: ded- service-specific tags.
DED_SERVICE_TAGS = frozenset(range(0xD0, 0xD8))

_GENERAL_TAGS = frozenset({GENERAL_GLO_CIPHERING, GENERAL_DED_CIPHERING})
_SPECIFIC_TAGS = frozenset({GLO_INITIATE_REQUEST, GLO_INITIATE_RESPONSE}) | GLO_SERVICE_TAGS | DED_SERVICE_TAGS

SYSTEM_TITLE_LEN = 8
IC_MAX = 0xFFFFFFFF
#: Largest ciphered APDU we accept or emit, all headers included.  A meter's
#: negotiated max PDU is 1200 bytes; 4 KiB leaves room for gap-fill replies
#: and bounds what a hostile peer can make us process.
MAX_APDU_SIZE = 4096


@dataclass(frozen=True, slots=True)
class CipheredApdu:
    """A parsed ciphered APDU whose body is not yet verified."""

    tag: int
    system_title: bytes | None  # None for the service-specific forms
    security_control: int
    invocation_counter: int
    body: bytes  # ciphertext (or plaintext for SC 0x10) || 12-byte tag

    @property
    def is_dedicated(self) -> bool:
        return self.tag == GENERAL_DED_CIPHERING or self.tag in DED_SERVICE_TAGS


# Hot-path constructor for CipheredApdu: the generated __init__ of a frozen
# dataclass sets each field through object.__setattr__ (~420 ns for five
# fields); setting the slots through their descriptors gives an equal, still
# frozen object in ~240 ns.  Only parse_apdu uses it, with validated fields.
_new = object.__new__
_set_tag = CipheredApdu.__dict__["tag"].__set__
_set_title = CipheredApdu.__dict__["system_title"].__set__
_set_sc = CipheredApdu.__dict__["security_control"].__set__
_set_ic = CipheredApdu.__dict__["invocation_counter"].__set__
_set_body = CipheredApdu.__dict__["body"].__set__
_read_u32 = struct.Struct(">I").unpack_from


def _make_apdu(tag: int, system_title: bytes | None, sc: int, ic: int, body: bytes) -> CipheredApdu:
    apdu = _new(CipheredApdu)
    _set_tag(apdu, tag)
    _set_title(apdu, system_title)
    _set_sc(apdu, sc)
    _set_ic(apdu, ic)
    _set_body(apdu, body)
    return apdu


def iv_for(system_title: bytes, invocation_counter: int) -> bytes:
    if len(system_title) != SYSTEM_TITLE_LEN:
        raise ValueError("a system title is 8 bytes")
    if not 0 <= invocation_counter <= IC_MAX:
        # Never truncate a counter to 32 bits: that is how IVs get reused.
        raise CounterExhausted("invocation counter outside 0..2^32-1")
    return system_title + invocation_counter.to_bytes(4, "big")


def encode_apdu(
    tag: int,
    security_control: int,
    invocation_counter: int,
    body: bytes,
    system_title: bytes | None = None,
) -> bytes:
    """Lay out an APDU around an already sealed body."""
    if not 0 <= invocation_counter <= IC_MAX:
        raise CounterExhausted("invocation counter outside 0..2^32-1")
    if len(body) > MAX_APDU_SIZE:
        # Checked before encode_length, which would raise a bare ValueError
        # above 65535 bytes instead of the typed error.
        raise FrameTooLarge(f"APDU body of {len(body)} bytes exceeds {MAX_APDU_SIZE}")
    inner = bytes((security_control,)) + invocation_counter.to_bytes(4, "big") + body
    if tag in _GENERAL_TAGS:
        if system_title is None or len(system_title) != SYSTEM_TITLE_LEN:
            raise ValueError("general ciphering needs an 8-byte system title")
        out = bytes((tag, SYSTEM_TITLE_LEN)) + system_title + encode_length(len(inner)) + inner
    elif tag in _SPECIFIC_TAGS:
        out = bytes((tag,)) + encode_length(len(inner)) + inner
    else:
        raise ValueError(f"not a ciphered APDU tag: {tag:#04x}")
    if len(out) > MAX_APDU_SIZE:
        raise FrameTooLarge(f"APDU of {len(out)} bytes exceeds {MAX_APDU_SIZE}")
    return out


def parse_apdu(data: bytes, *, allow_unauthenticated: bool = False, suite: int = 0) -> CipheredApdu:
    """Split a ciphered APDU of security suite ``suite`` into its fields,
    refusing anything malformed (a frame of another suite included)."""
    n = len(data)
    if n > MAX_APDU_SIZE:
        raise FrameTooLarge(f"APDU of {n} bytes exceeds {MAX_APDU_SIZE}")
    if n < 2:
        raise MalformedFrame("truncated APDU")
    if type(data) is not bytes:  # bytearray, memoryview: one copy, then slices are bytes
        data = bytes(data)
    tag = data[0]
    system_title: bytes | None = None
    if tag in _GENERAL_TAGS:
        if data[1] != SYSTEM_TITLE_LEN:
            raise MalformedFrame("system title must be 8 bytes")
        if n < 2 + SYSTEM_TITLE_LEN + 1:
            raise MalformedFrame("truncated system title")
        system_title = data[2 : 2 + SYSTEM_TITLE_LEN]
        pos = 2 + SYSTEM_TITLE_LEN
    elif tag in _SPECIFIC_TAGS:
        pos = 1
    else:
        raise MalformedFrame(f"unknown APDU tag {tag:#04x}")
    # pos < n here; the one-byte length form (every frame below 128 bytes of
    # body) is decoded inline, the others by decode_length.
    length = data[pos]
    if length < 0x80:
        pos += 1
    else:
        length, pos = decode_length(data, pos)
    if length != n - pos:
        raise MalformedFrame("declared length does not match the frame")
    if length < 5:
        raise MalformedFrame("no room for SC and invocation counter")
    sc = data[pos]
    if sc == SC_AUTH_ENC and not suite:  # passes every check of check_security_control
        bits = SC_AUTH_ENC
    else:
        bits = check_security_control(sc, allow_unauthenticated=allow_unauthenticated, suite=suite)
    if bits & 0x10 and length < 5 + TAG_LEN:
        raise MalformedFrame("no room for the authentication tag")
    return _make_apdu(tag, system_title, sc, _read_u32(data, pos + 1)[0], data[pos + 5 :])


def seal_apdu(
    cipher: Suite0Cipher,
    tag: int,
    sender_title: bytes,
    invocation_counter: int,
    plaintext: bytes,
    *,
    security_control: int = SC_AUTH_ENC,
) -> bytes:
    """Cipher ``plaintext`` and lay out the APDU.

    ``sender_title`` builds the IV; the general forms also carry it on the wire.
    The caller owns the counter: take it from a reserved ``SendCounter``.
    """
    iv = iv_for(sender_title, invocation_counter)
    body = cipher.seal(security_control, iv, plaintext)
    title = sender_title if tag in _GENERAL_TAGS else None
    return encode_apdu(tag, security_control, invocation_counter, body, title)


def open_apdu(
    cipher: Suite0Cipher,
    apdu: CipheredApdu,
    sender_title: bytes | None = None,
    *,
    allow_unauthenticated: bool = False,
) -> bytes:
    """Verify the tag and return the plaintext, or raise.

    For the service-specific forms pass the sender's system title known from
    the association; for the general forms the one in the frame is used
    (a given one must match it).
    """
    title = apdu.system_title
    if title is None:
        if sender_title is None:
            raise MalformedFrame("sender system title unknown for this APDU")
        title = sender_title
    elif sender_title is not None and sender_title != title:
        raise MalformedFrame("system title does not match the sender")
    iv = iv_for(title, apdu.invocation_counter)
    return cipher.open(apdu.security_control, iv, apdu.body, allow_unauthenticated=allow_unauthenticated)
