"""Shared helpers of the protocol tests: vectors, strategies, secret tracking."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ami.protocol import Suite0Cipher
from ami.protocol.frames import DED_SERVICE_TAGS, GLO_SERVICE_TAGS

VECTORS_PATH = Path(__file__).with_name("vectors.json")
VECTORS = json.loads(VECTORS_PATH.read_text())

EK = bytes.fromhex(VECTORS["keys"]["ek"])
AK = bytes.fromhex(VECTORS["keys"]["ak"])
SYSTEM_TITLE = bytes.fromhex(VECTORS["keys"]["system_title"])
IC = int(VECTORS["keys"]["invocation_counter"], 16)

GENERAL_TAGS = (0xDB, 0xDC)
SPECIFIC_TAGS = tuple(sorted({0x21, 0x28} | GLO_SERVICE_TAGS | DED_SERVICE_TAGS))
ALL_TAGS = GENERAL_TAGS + SPECIFIC_TAGS

# Hypothesis presets (no global profile: other test folders keep their own).
FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

keys16 = st.binary(min_size=16, max_size=16)
titles = st.binary(min_size=8, max_size=8)
ics = st.integers(min_value=0, max_value=2**32 - 1)

# --- secret tracking -------------------------------------------------------
#
# Every key a test builds goes through ``secret()``; conftest.py records the
# text of every ProtocolError raised during the test and fails it if one of
# them contains any registered key (hex either case, repr escapes, raw text).

_secrets: set[bytes] = set()


def secret(*keys: bytes) -> None:
    for key in keys:
        _secrets.add(bytes(key))


def registered_secrets() -> set[bytes]:
    return _secrets


def forms_of(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), repr(bytes(key))[2:-1], key.decode("latin-1")]


def cipher(ek: bytes = EK, ak: bytes = AK) -> Suite0Cipher:
    secret(ek, ak)
    return Suite0Cipher(ek, ak)


def flips(data: bytes):
    """Every single-bit flip of ``data``: (byte index, bit, mutated bytes)."""
    for i in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            yield i, bit, bytes(mutated)


# Byte mutations driven by hypothesis, for the "mutate a valid encoding" fuzz.
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("duplicate"), st.integers(0, 10_000), st.integers(1, 16)),
)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, where, arg in ops:
        pos = where % (len(buf) + 1)
        if op == "flip" and buf:
            buf[pos % len(buf)] ^= 1 << arg
        elif op == "set" and buf:
            buf[pos % len(buf)] = arg
        elif op == "insert":
            buf.insert(pos, arg)
        elif op == "delete":
            del buf[pos : pos + arg]
        elif op == "truncate":
            del buf[pos:]
        elif op == "duplicate":
            buf[pos:pos] = buf[pos : pos + arg]
    return bytes(buf)
