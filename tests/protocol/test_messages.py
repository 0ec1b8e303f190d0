"""Application messages and WAN batches: round trips, tolerance, strictness, limits."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import Batch, decode_batch, decode_message, encode_batch, encode_message
from ami.protocol.errors import MalformedMessage, MessageTooLarge
from ami.protocol.frames import MAX_APDU_SIZE
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
from ami.protocol.messages import EVENT_KINDS, MAX_BATCH_BYTES, MAX_BATCH_FRAMES, _make_reading

from ._util import FAST

u64 = st.integers(min_value=0, max_value=2**63 - 1)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
short = st.text(max_size=40)
readings = st.builds(Reading, u64, u64, u64, i64, u64, st.none() | u64)
messages = st.one_of(
    readings,
    st.builds(Event, st.sampled_from(sorted(EVENT_KINDS)), u64, st.text(max_size=256)),
    st.builds(ReadRequest, u64),
    st.builds(ReadReply, u64, readings),
    st.builds(
        GapFillRequest,
        u64,
        st.integers(0, 10**9),
        st.integers(0, 511),
    ).map(lambda g: GapFillRequest(g.request_id, g.first_seq, g.first_seq + g.last_seq)),
    st.builds(
        GapFillReply,
        u64,
        st.lists(readings, max_size=8).map(tuple),
        st.lists(u64, max_size=8).map(tuple),
    ),
    st.builds(KeyTransfer, u64, st.sampled_from(["lan", "local"]), st.binary(max_size=122)),
    st.builds(KeyTransferAck, u64, st.booleans(), short),
    st.builds(Release, short),
)

R = Reading(7, 1_760_000_000, 12_345, 1_500, 2_301, 1_760_000_000_000_000_000)
EXAMPLES = [
    R,
    Reading(1, 2, 3, -4, 5),
    Event("boot", 1, ""),
    Event("counter_threshold", 2, "renew"),
    ReadRequest(9),
    ReadReply(9, R),
    GapFillRequest(1, 100, 100),
    GapFillRequest(1, 100, 611),
    GapFillReply(2, (R,), (5, 6)),
    GapFillReply(2, (), ()),
    KeyTransfer(3, "local", b"\x01\x01" + bytes(30)),
    KeyTransferAck(3, True),
    Release(),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_examples(msg):
    raw = encode_message(msg)
    assert decode_message(raw) == msg
    m = msgpack.unpackb(raw)
    assert m["v"] == 1 and isinstance(m["t"], str)


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == {
        Reading, Event, ReadRequest, ReadReply, GapFillRequest, GapFillReply, KeyTransfer, KeyTransferAck, Release
    }


@FAST
@given(msg=messages)
def test_round_trip(msg):
    assert decode_message(encode_message(msg)) == msg


def test_reading_wire_form_and_size():
    m = msgpack.unpackb(encode_message(R))
    assert m == {"t": "rd", "q": 7, "ts": 1_760_000_000, "e": 12_345, "p": 1_500, "u": 2_301,
                 "t0": 1_760_000_000_000_000_000, "v": 1}
    assert "t0" not in msgpack.unpackb(encode_message(dataclasses.replace(R, sealed_ns=None)))


def test_fast_reading_constructor_matches_dataclass():
    # _make_reading sets exactly these slots: a new field must be added there too.
    assert [f.name for f in dataclasses.fields(Reading)] == [
        "seq", "ts", "energy_wh", "power_w", "voltage_dv", "sealed_ns"
    ]
    assert _make_reading(1, 2, 3, 4, 5, None) == Reading(1, 2, 3, 4, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decode_message(encode_message(R)).seq = 1  # type: ignore[misc]


def _tweak(msg, **changes) -> bytes:
    m = msgpack.unpackb(encode_message(msg))
    for k, v in changes.items():
        if v is ...:
            m.pop(k, None)
        else:
            m[k] = v
    return msgpack.packb(m, use_bin_type=True)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_fields_are_tolerated(msg):
    raw = _tweak(msg, zz=[1, 2, {"deep": b"x"}], future="field", n2=None)
    assert decode_message(raw) == msg


@pytest.mark.parametrize("version", [0, 2, -1, "1", True, 1.0, None, [1], ...])
def test_other_versions_are_refused(version):
    with pytest.raises(MalformedMessage):
        decode_message(_tweak(R, v=version))
    raw = msgpack.packb({"v": version, "c": "c", "n": 1, "f": []} if version is not ... else {"c": "c", "n": 1, "f": []})
    with pytest.raises(MalformedMessage):
        decode_batch(raw)


WRONG = ["1", 1.5, None, True, [1], {"a": 1}, b"\x01"]
INT_FIELDS = {
    Reading: ["q", "ts", "e", "p", "u"],
    Event: ["ts"],
    ReadRequest: ["id"],
    ReadReply: ["id"],
    GapFillRequest: ["id", "a", "b"],
    GapFillReply: ["id"],
    KeyTransfer: ["id"],
    KeyTransferAck: ["id"],
}
STR_FIELDS = {Event: ["k", "d"], KeyTransfer: ["s"], KeyTransferAck: ["why"], Release: ["why"]}


def _example(cls):
    return next(m for m in EXAMPLES if type(m) is cls)


@pytest.mark.parametrize(
    "cls, field", [(c, f) for c, fs in INT_FIELDS.items() for f in fs], ids=lambda x: getattr(x, "__name__", x)
)
def test_integer_fields_reject_other_types(cls, field):
    for value in WRONG + [...]:
        with pytest.raises(MalformedMessage):
            decode_message(_tweak(_example(cls), **{field: value}))


@pytest.mark.parametrize(
    "cls, field", [(c, f) for c, fs in STR_FIELDS.items() for f in fs], ids=lambda x: getattr(x, "__name__", x)
)
def test_string_fields_reject_other_types(cls, field):
    for value in [1, None, True, [1], b"lan", "x" * 257]:
        with pytest.raises(MalformedMessage):
            decode_message(_tweak(_example(cls), **{field: value}))


@pytest.mark.parametrize(
    "msg, changes",
    [
        (R, {"t0": "soon"}),
        (R, {"t0": 1.0}),
        (R, {"t0": True}),
        (Event("boot", 1), {"k": "explode"}),
        (Event("boot", 1), {"k": ...}),
        (ReadReply(1, R), {"r": [1, 2]}),
        (ReadReply(1, R), {"r": {"q": 1}}),
        (ReadReply(1, R), {"r": ...}),
        (GapFillRequest(1, 5, 5), {"b": 4}),  # empty range
        (GapFillRequest(1, 0, 0), {"b": 512}),  # too wide
        (GapFillReply(1, (R,)), {"r": "x"}),
        (GapFillReply(1, (R,)), {"r": ...}),
        (GapFillReply(1, (R,)), {"x": "x"}),
        (GapFillReply(1, (R,)), {"x": ["a"]}),
        (GapFillReply(1, (R,)), {"x": [True]}),
        (GapFillReply(1, (R,)), {"r": [1]}),
        (GapFillReply(1, (R,)), {"r": [R.to_map()] * 300, "x": list(range(213))}),  # > 512 items
        (KeyTransfer(1, "lan", b"x"), {"s": "wan"}),
        (KeyTransfer(1, "lan", b"x"), {"k": "x"}),
        (KeyTransfer(1, "lan", b"x"), {"k": ...}),
        (KeyTransferAck(1, True), {"ok": 1}),
        (KeyTransferAck(1, True), {"ok": ...}),
        (R, {"t": "zz"}),
        (R, {"t": ...}),
        (R, {"t": 1}),
    ],
)
def test_bad_field_values(msg, changes):
    with pytest.raises(MalformedMessage):
        decode_message(_tweak(msg, **changes))


def test_gap_fill_reply_item_limit_is_inclusive():
    raw = encode_message(GapFillReply(1, (), tuple(range(1000, 1512))))
    assert len(decode_message(raw).unavailable) == 512
    with pytest.raises(MalformedMessage):
        decode_message(encode_message(GapFillReply(1, (), tuple(range(1000, 1513)))))
    # In practice the frame size binds first: ~60 full readings per reply.
    per_reading = len(msgpack.packb(R.to_map()))
    assert 512 * per_reading > MAX_APDU_SIZE


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, "rd"]),
        msgpack.packb("rd"),
        msgpack.packb(None),
        encode_message(R) + b"\x00",  # trailing data
        encode_message(R)[:-1],  # truncated
        msgpack.packb({1: 1, "v": 1, "t": "rq", "id": 1}),  # non-string key
        msgpack.packb({f"k{i}": i for i in range(65)} | {"v": 1, "t": "rq", "id": 1}),  # > 64 entries
        msgpack.packb({"v": 1, "t": "rq", "id": msgpack.ExtType(5, b"1")}),
        msgpack.packb({"v": 1, "t": "rq", "id": msgpack.Timestamp(1)}),
        b"\x83\xa1v\x01\xa1t\xa2rq\xa2id\xd9\x02\xff\xfe",  # invalid UTF-8 string
    ],
)
def test_not_a_message(raw):
    with pytest.raises(MalformedMessage):
        decode_message(raw)


def test_oversized_messages():
    big = encode_message(KeyTransfer(1, "lan", bytes(MAX_APDU_SIZE)))
    assert len(big) > MAX_APDU_SIZE
    with pytest.raises(MessageTooLarge):
        decode_message(big)
    with pytest.raises(MessageTooLarge):
        decode_message(bytes(MAX_APDU_SIZE + 1))
    fits = encode_message(KeyTransfer(1, "lan", bytes(MAX_APDU_SIZE - 40)))
    assert len(fits) <= MAX_APDU_SIZE and decode_message(fits).param == bytes(MAX_APDU_SIZE - 40)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode_message({"t": "rd"})  # type: ignore[arg-type]


def test_key_transfer_repr_hides_the_parameter():
    kt = KeyTransfer(1, "lan", bytes.fromhex("0101020216000918") + bytes(range(24)))
    assert "param" not in repr(kt) and bytes(range(24)).hex() not in repr(kt)


# --- batches ----------------------------------------------------------------


frames = st.lists(st.tuples(st.text(min_size=1, max_size=64), st.binary(max_size=300)), max_size=20)


@FAST
@given(conc=st.text(min_size=1, max_size=64), seq=i64, fs=frames)
def test_batch_round_trip(conc, seq, fs):
    batch = Batch(conc, seq, tuple(fs))
    assert decode_batch(encode_batch(batch)) == batch


def test_batch_frames_are_relayed_byte_for_byte():
    apdu = bytes(range(256)) * 4
    assert decode_batch(encode_batch(Batch("c", 1, (("m", apdu),)))).frames[0][1] == apdu


def test_batch_limits():
    full = Batch("c", 1, tuple(("m", b"") for _ in range(MAX_BATCH_FRAMES)))
    assert len(decode_batch(encode_batch(full)).frames) == MAX_BATCH_FRAMES
    with pytest.raises(MalformedMessage):
        decode_batch(encode_batch(Batch("c", 1, full.frames + (("m", b""),))))
    heavy = Batch("c", 1, tuple(("m", bytes(4000)) for _ in range(MAX_BATCH_BYTES // 4000 + 1)))
    with pytest.raises(MessageTooLarge):
        decode_batch(encode_batch(heavy))
    with pytest.raises(MessageTooLarge):
        decode_batch(bytes(MAX_BATCH_BYTES + 1))
    under = Batch("c", 1, tuple(("m", bytes(4000)) for _ in range(MAX_BATCH_BYTES // 4000 - 1)))
    assert decode_batch(encode_batch(under)) == under


@pytest.mark.parametrize(
    "m",
    [
        {"v": 1, "n": 1, "f": []},  # no concentrator
        {"v": 1, "c": "", "n": 1, "f": []},
        {"v": 1, "c": "x" * 65, "n": 1, "f": []},
        {"v": 1, "c": 5, "n": 1, "f": []},
        {"v": 1, "c": "c", "f": []},  # no sequence number
        {"v": 1, "c": "c", "n": "1", "f": []},
        {"v": 1, "c": "c", "n": True, "f": []},
        {"v": 1, "c": "c", "n": 1},  # no frames
        {"v": 1, "c": "c", "n": 1, "f": {"m": b""}},
        {"v": 1, "c": "c", "n": 1, "f": [["m"]]},
        {"v": 1, "c": "c", "n": 1, "f": [["m", b"", b""]]},
        {"v": 1, "c": "c", "n": 1, "f": [["m", "text"]]},
        {"v": 1, "c": "c", "n": 1, "f": [[b"m", b""]]},
        {"v": 1, "c": "c", "n": 1, "f": [["x" * 65, b""]]},
        {"v": 1, "c": "c", "n": 1, "f": ["m"]},
    ],
)
def test_bad_batches(m):
    with pytest.raises(MalformedMessage):
        decode_batch(msgpack.packb(m, use_bin_type=True))


def test_batch_tolerates_unknown_fields():
    raw = msgpack.packb({"v": 1, "c": "c", "n": 2, "f": [["m", b"x"]], "zz": {"later": 1}}, use_bin_type=True)
    assert decode_batch(raw) == Batch("c", 2, (("m", b"x"),))
