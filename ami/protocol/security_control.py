"""The security control (SC) byte of suite 0, and the sizes of its fields.

Kept apart from ``cipher`` so that code which only parses frames (the blind
relay, the batch codec) never imports a cipher implementation.
"""

from __future__ import annotations

from .errors import UnsupportedSecurity

__all__ = [
    "IV_LEN",
    "KEY_LEN",
    "SC_AUTH",
    "SC_AUTH_ENC",
    "SC_ENC",
    "TAG_LEN",
    "check_security_control",
]

TAG_LEN = 12
KEY_LEN = 16
IV_LEN = 12

SC_AUTH = 0x10
SC_ENC = 0x20
SC_AUTH_ENC = 0x30
_SUITE_MASK = 0x0F
_SECURITY_MASK = 0x30
_KEY_SET = 0x40
_COMPRESSION = 0x80


def check_security_control(sc: int, *, allow_unauthenticated: bool = False, suite: int = 0) -> int:
    """Validate an SC byte of security suite ``suite`` (its low nibble) and
    return its security bits (0x10, 0x20 or 0x30)."""
    if not 0 <= sc <= 0xFF:
        raise UnsupportedSecurity("security control is one byte")
    if sc & _SUITE_MASK != suite:
        raise UnsupportedSecurity(f"security suite {sc & _SUITE_MASK} is not suite {suite}")
    if sc & _COMPRESSION:
        raise UnsupportedSecurity("compressed APDUs are not supported")
    if sc & _KEY_SET:
        raise UnsupportedSecurity("broadcast key set is not used in this network")
    bits = sc & _SECURITY_MASK
    if bits == SC_ENC and not allow_unauthenticated:
        # Encryption without a tag authenticates nothing: never accept it.
        raise UnsupportedSecurity("encryption without authentication refused")
    if bits == 0:
        raise UnsupportedSecurity("no security applied")
    return bits
