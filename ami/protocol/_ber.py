"""A-XDR / BER definite lengths: 1 byte below 0x80, else 81 xx or 82 xx xx.

Strict on decode: indefinite (0x80) and long forms above two bytes are refused,
so a hostile length can never make us allocate or wait for more than a frame.
"""

from __future__ import annotations

from .errors import MalformedFrame


def encode_length(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative length")
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= 0xFFFF:
        return bytes((0x82, n >> 8, n & 0xFF))
    raise ValueError("length above 65535 is not supported")


def decode_length(data: bytes, offset: int) -> tuple[int, int]:
    """Return (length, offset just past the length octets)."""
    if offset >= len(data):
        raise MalformedFrame("truncated before length")
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    if first == 0x81:
        if offset + 2 > len(data):
            raise MalformedFrame("truncated length")
        return data[offset + 1], offset + 2
    if first == 0x82:
        if offset + 3 > len(data):
            raise MalformedFrame("truncated length")
        return (data[offset + 1] << 8) | data[offset + 2], offset + 3
    raise MalformedFrame("unsupported length form")
