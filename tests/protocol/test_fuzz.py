"""Decoders fed arbitrary and mutated bytes only ever raise ProtocolError.

Never IndexError, ValueError, KeyError, TypeError, UnicodeDecodeError,
RecursionError...: a hostile peer controls every byte these functions see.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import (
    Batch,
    ProtocolError,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
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
from ami.protocol.keys import KeyId, decode_key_transfer, encode_key_transfer
from ami.protocol.messages import (
    Event,
    GapFillReply,
    GapFillRequest,
    KeyTransfer,
    KeyTransferAck,
    ReadReply,
    ReadRequest,
    Reading,
    Release,
)
from ami.protocol._ber import decode_length

from ._util import AK, ALL_TAGS, EK, FUZZ, VECTORS, cipher, mutate, mutation, secret

KEK = bytes(range(0x40, 0x50))
METER = bytes.fromhex("4C4E4B0000000042")
R = Reading(7, 1_760_000_000, 12_345, 1_500, 2_301, 1_760_000_000_000_000_000)

MESSAGES = [
    R,
    Reading(0, 0, 0, 0, 0),
    Event("tamper", 5, "cover opened"),
    ReadRequest(1),
    ReadReply(2, R),
    GapFillRequest(3, 10, 20),
    GapFillReply(4, (R, R), (8, 9)),
    KeyTransfer(5, "lan", encode_key_transfer(KEK, [(KeyId.GLOBAL_UNICAST, EK)])),
    KeyTransferAck(6, False, "unwrap failed"),
    Release("bye"),
]


def _apdu_seeds() -> list[bytes]:
    seeds = [bytes.fromhex(v["apdu"]) for v in VECTORS["vectors"]]
    c = cipher()
    for tag in ALL_TAGS:
        seeds.append(seal_apdu(c, tag, METER, 99, encode_message(R)))
    seeds.append(seal_apdu(c, 0xDB, METER, 5, bytes(200)))  # 81 xx length
    seeds.append(seal_apdu(c, 0xC8, METER, 5, bytes(300), security_control=0x10))  # 82 xx xx
    return seeds


APDU_SEEDS = _apdu_seeds()
INITIATE = encode_initiate_request(InitiateRequest(bytes(range(16))))
SEEDS = {
    "parse_apdu": APDU_SEEDS,
    "parse_aarq": [build_aarq(METER, s) for s in APDU_SEEDS[:4]],
    "parse_aare": [build_aare(METER, True, APDU_SEEDS[4]), build_aare(METER, False, None)],
    "decode_message": [encode_message(m) for m in MESSAGES],
    "decode_batch": [
        encode_batch(Batch("c1", 1, (("m1", APDU_SEEDS[0]), ("m2", APDU_SEEDS[1])))),
        encode_batch(Batch("c2", 0, ())),
    ],
    "decode_initiate_request": [
        INITIATE,
        encode_initiate_request(InitiateRequest(None)),
        bytes.fromhex(VECTORS["vectors"][3]["plaintext"]),
    ],
    "decode_initiate_response": [encode_initiate_response(InitiateResponse())],
    "decode_key_transfer": [
        encode_key_transfer(KEK, [(KeyId.GLOBAL_UNICAST, EK)]),
        encode_key_transfer(KEK, [(KeyId.AUTHENTICATION, AK), (KeyId.MASTER, EK)]),
    ],
    "decode_length": [b"\x05", b"\x81\x80", b"\x82\x01\x00"],
}

DECODERS = {
    "parse_apdu": parse_apdu,
    "parse_apdu(allow_unauthenticated)": lambda b: parse_apdu(b, allow_unauthenticated=True),
    "parse_aarq": parse_aarq,
    "parse_aare": parse_aare,
    "decode_message": decode_message,
    "decode_batch": decode_batch,
    "decode_initiate_request": decode_initiate_request,
    "decode_initiate_response": decode_initiate_response,
    "decode_key_transfer": lambda b: decode_key_transfer(KEK, b),
    "decode_length": lambda b: decode_length(b, 0),
}


def _only_protocol_errors(decoder, data: bytes) -> None:
    secret(KEK)
    try:
        decoder(data)
    except ProtocolError:
        pass


def test_every_decoder_is_covered():
    assert set(SEEDS) | {"parse_apdu(allow_unauthenticated)"} == set(DECODERS)


@pytest.mark.parametrize("name", list(DECODERS))
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(name, data):
    _only_protocol_errors(DECODERS[name], data)


@pytest.mark.parametrize("name", list(DECODERS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_encodings(name, data):
    seeds = SEEDS[name.split("(")[0]]
    seed = data.draw(st.sampled_from(seeds), label="seed")
    ops = data.draw(st.lists(mutation, min_size=1, max_size=4), label="ops")
    _only_protocol_errors(DECODERS[name], mutate(seed, ops))


@pytest.mark.parametrize("name", list(DECODERS))
def test_valid_seeds_decode(name):
    for seed in SEEDS[name.split("(")[0]]:
        if name == "parse_apdu" and seed == bytes.fromhex(VECTORS["vectors"][2]["apdu"]):
            continue  # the SC 0x20 vector parses only when opted in
        DECODERS[name](seed)


@FUZZ
@given(seed=st.sampled_from(APDU_SEEDS[7:]), ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_frames_never_open_to_another_plaintext(seed, ops):
    """Whatever a mutation does to a sealed frame, opening it either fails with
    a ProtocolError or (the mutation undid itself, or only re-encoded the
    unauthenticated length octets) yields the original plaintext."""
    c = cipher()
    original = open_apdu(c, parse_apdu(seed), METER)
    try:
        got = open_apdu(c, parse_apdu(mutate(seed, ops)), METER)
    except ProtocolError:
        return
    assert got == original


# --- structured fuzz: valid msgpack with hostile shapes ---------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=4), st.binary(max_size=4)), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = ["v", "t", "q", "ts", "e", "p", "u", "t0", "k", "d", "id", "r", "a", "b", "x", "s", "ok", "why", "c", "n", "f"]
TYPES = ["rd", "ev", "rq", "rr", "gq", "gr", "kt", "ka", "rl", "zz"]


@st.composite
def message_like(draw):
    m = draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8))
    if draw(st.booleans()):
        m["v"] = draw(st.sampled_from([1, 1, 1, 2, True, 1.0, "1", None]))
    if draw(st.booleans()):
        m["t"] = draw(st.sampled_from(TYPES))
    return m


@FUZZ
@given(obj=st.one_of(values, message_like()))
def test_hostile_msgpack_shapes(obj):
    raw = msgpack.packb(obj, use_bin_type=True)
    _only_protocol_errors(decode_message, raw)
    _only_protocol_errors(decode_batch, raw)


@FUZZ
@given(m=message_like(), frames=st.lists(values, max_size=4))
def test_hostile_batches(m, frames):
    m["f"] = frames
    m.setdefault("c", "conc")
    m.setdefault("n", 1)
    _only_protocol_errors(decode_batch, msgpack.packb(m, use_bin_type=True))


def test_deep_nesting_and_ext_types():
    deep = b"\x91" * 100_000 + b"\xc0"
    for raw in (
        deep,
        b"\x81\xa1v" + deep[:4000],
        msgpack.packb({"v": 1, "t": "rd", "q": msgpack.ExtType(1, b"x")}),
        msgpack.packb({"v": 1, "t": "rd", "q": msgpack.Timestamp(1, 0)}),
        b"\x81\xa1v\x01\xc1",  # never-used byte 0xc1
    ):
        _only_protocol_errors(decode_message, raw)
        _only_protocol_errors(decode_batch, raw)
