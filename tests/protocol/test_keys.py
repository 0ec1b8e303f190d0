"""Key hierarchy: key_transfer, KeySlot lifecycle, and keys never shown."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ami.protocol import KeyType, ProtocolError, SecretBytes
from ami.protocol.association import InitiateRequest, decode_initiate_request
from ami.protocol.errors import AuthenticationFailed, KeyLifecycleError, MalformedMessage
from ami.protocol.keys import (
    REPROGRAMMABLE,
    TRANSFER_TARGET,
    KeyId,
    KeySlot,
    KeyState,
    SecuritySetup,
    decode_key_transfer,
    encode_key_transfer,
    key_type_for,
    unwrap_key,
    wrap_key,
)

from ._util import FAST, forms_of, keys16, secret

KEK = bytes.fromhex("0F0E0D0C0B0A09080706050403020100")
KEY = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")

# --- KeySlot lifecycle ------------------------------------------------------------


def test_lifecycle_new_active_expired():
    slot = KeySlot()
    assert slot.try_order() == []
    slot.propose(1)
    assert slot.state_of(1) is KeyState.NEW and slot.try_order() == [1]
    assert slot.activate(1) is None  # nothing was active before
    assert slot.state_of(1) is KeyState.ACTIVE and slot.try_order() == [1]
    slot.propose(2)
    assert slot.try_order() == [2, 1]  # recovery: NEW first, then ACTIVE
    assert slot.activate(2) == 1
    assert slot.state_of(1) is KeyState.EXPIRED
    assert slot.state_of(2) is KeyState.ACTIVE
    assert (slot.active, slot.new) == (2, None)


def test_withdraw_keeps_the_active_key():
    slot = KeySlot(active=4)
    slot.propose(5)
    assert slot.withdraw() == 5
    assert slot.try_order() == [4] and slot.state_of(5) is KeyState.EXPIRED
    slot.propose(6)  # a fresh proposal after the withdrawal
    assert slot.try_order() == [6, 4]


@pytest.mark.parametrize(
    "slot, action",
    [
        (KeySlot(new=2), lambda s: s.propose(3)),  # a NEW key is already pending
        (KeySlot(active=2), lambda s: s.propose(2)),  # already active
        (KeySlot(active=2), lambda s: s.propose(None)),  # no version
        (KeySlot(), lambda s: s.propose(None)),
        (KeySlot(active=1, new=2), lambda s: s.activate(3)),  # not the pending key
        (KeySlot(active=1, new=2), lambda s: s.activate(1)),  # re-activate the active one
        (KeySlot(active=1), lambda s: s.activate(1)),  # nothing pending
        (KeySlot(active=1), lambda s: s.activate(None)),  # used to wipe the ACTIVE key
        (KeySlot(), lambda s: s.activate(None)),
        (KeySlot(active=1), lambda s: s.withdraw()),  # nothing to withdraw
        (KeySlot(), lambda s: s.withdraw()),
    ],
)
def test_illegal_transitions(slot, action):
    before = (slot.active, slot.new)
    with pytest.raises(KeyLifecycleError):
        action(slot)
    assert (slot.active, slot.new) == before  # a refused transition changes nothing


class KeySlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.slot = KeySlot()
        self.next_version = 1
        self.expired: set[int] = set()

    @rule()
    def propose(self):
        legal = self.slot.new is None
        version = self.next_version
        if legal:
            self.slot.propose(version)
            self.next_version += 1
        else:
            with pytest.raises(KeyLifecycleError):
                self.slot.propose(version)

    @rule(pick=st.sampled_from(["new", "active", "other"]))
    def activate(self, pick):
        version = {"new": self.slot.new, "active": self.slot.active, "other": 10_000}[pick]
        if pick == "new" and self.slot.new is not None:
            old = self.slot.active
            assert self.slot.activate(version) == old
            if old is not None:
                self.expired.add(old)
        else:
            with pytest.raises(KeyLifecycleError):
                self.slot.activate(version)

    @rule()
    def withdraw(self):
        if self.slot.new is None:
            with pytest.raises(KeyLifecycleError):
                self.slot.withdraw()
        else:
            self.expired.add(self.slot.withdraw())

    @invariant()
    def consistent(self):
        s = self.slot
        assert s.try_order() == [v for v in (s.new, s.active) if v is not None]
        assert s.new is None or s.new != s.active
        if s.new is not None:
            assert s.state_of(s.new) is KeyState.NEW
        if s.active is not None:
            assert s.state_of(s.active) is KeyState.ACTIVE
        for v in self.expired:
            assert s.state_of(v) is KeyState.EXPIRED


TestKeySlotMachine = KeySlotMachine.TestCase
TestKeySlotMachine.settings = settings(deadline=None, max_examples=100, stateful_step_count=30)


# --- the hierarchy as data -----------------------------------------------------


def test_transfer_targets():
    assert TRANSFER_TARGET == {
        KeyType.CC_LAN: (SecuritySetup.LAN, KeyId.GLOBAL_UNICAST),
        KeyType.CC_LOCALE: (SecuritySetup.LOCAL, KeyId.GLOBAL_UNICAST),
        KeyType.AK: (SecuritySetup.LAN, KeyId.AUTHENTICATION),
    }
    assert REPROGRAMMABLE == {KeyType.CC_LAN, KeyType.CC_LOCALE, KeyType.AK}
    assert KeyType.CCC not in REPROGRAMMABLE and KeyType.SESSION not in REPROGRAMMABLE
    for key_type, (setup, key_id) in TRANSFER_TARGET.items():
        assert key_type_for(setup, key_id) is key_type
    for setup, key_id in [
        (SecuritySetup.LAN, KeyId.MASTER),
        (SecuritySetup.LOCAL, KeyId.AUTHENTICATION),
        (SecuritySetup.LAN, KeyId.BROADCAST),
    ]:
        with pytest.raises(MalformedMessage):
            key_type_for(setup, key_id)
    assert [int(k) for k in KeyId] == [0, 1, 2, 3]


# --- key wrap and key_transfer ------------------------------------------------------


@FAST
@given(kek=keys16, keys=st.lists(st.tuples(st.sampled_from(list(KeyId)), keys16), min_size=1, max_size=4))
def test_key_transfer_round_trip(kek, keys):
    secret(kek, *(k for _, k in keys))
    param = encode_key_transfer(kek, keys)
    assert len(param) == 2 + 30 * len(keys) and param[:2] == bytes((1, len(keys)))
    for _, key in keys:
        assert key not in param  # only wrapped keys travel
    assert decode_key_transfer(kek, param) == keys


@FAST
@given(kek=keys16, other=keys16, key=keys16)
def test_unwrap_under_another_kek_fails(kek, other, key):
    secret(kek, other, key)
    wrapped = wrap_key(kek, key)
    if other != kek:
        with pytest.raises(AuthenticationFailed):
            unwrap_key(other, wrapped)
        with pytest.raises(AuthenticationFailed):
            decode_key_transfer(other, encode_key_transfer(kek, [(KeyId.GLOBAL_UNICAST, key)]))


def test_key_transfer_refusals():
    secret(KEK, KEY)
    good = encode_key_transfer(KEK, [(KeyId.AUTHENTICATION, KEY)])
    bad = [
        b"",
        b"\x01",
        b"\x02" + good[1:],  # not an array
        b"\x01\x00",  # empty array
        b"\x01\x05" + good[2:] * 5,  # too many
        b"\x01\x02" + good[2:],  # count says 2, one item
        good[:-1],
        good + b"\x00",
        good[:2] + b"\x03" + good[3:],  # not a structure
        good[:2] + b"\x02\x03" + good[4:],  # structure of 3
        good[:4] + b"\x11" + good[5:],  # key_id not an enum
        good[:5] + b"\x07" + good[6:],  # unknown key_id
        good[:6] + b"\x0a" + good[7:],  # not an octet-string
        good[:7] + b"\x10" + good[8:],  # octet-string of 16
    ]
    for param in bad:
        with pytest.raises(MalformedMessage):
            decode_key_transfer(KEK, param)
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with pytest.raises(AuthenticationFailed):
        decode_key_transfer(KEK, bytes(tampered))
    with pytest.raises(MalformedMessage):
        unwrap_key(KEK, bytes(23))
    for n in (0, 5):
        with pytest.raises(ValueError):
            encode_key_transfer(KEK, [(KeyId.GLOBAL_UNICAST, KEY)] * n)
    with pytest.raises(ValueError):
        wrap_key(KEK, KEY[:15])


# --- keys are never shown ------------------------------------------------------------


def _leaks(text: str, key: bytes) -> bool:
    return any(form in text for form in forms_of(key))


@FAST
@given(key=st.binary(min_size=1, max_size=32))
def test_secret_bytes_never_show_the_key(key):
    s = SecretBytes(key)
    assert s == key and isinstance(s, bytes) and len(s) == len(key)
    texts = [
        repr(s),
        str(s),
        format(s),
        format(s, ""),
        f"{s}",
        f"{s!r}",
        f"{s!s}",
        f"{s:>40}",
        "{}".format(s),
        "{0!r}".format(s),
        "%s" % (s,),
        "%r" % (s,),
        repr([s]),
        repr({"k": s}),
        repr((s,)),
    ]
    placeholder = f"<secret {len(key)} bytes>"
    for text in texts:
        assert placeholder in text
        if len(key) >= 8:  # a shorter "key" could spell part of the text by chance
            assert not _leaks(text.replace(placeholder, ""), key), text


def test_unwrapped_keys_are_secret_bytes():
    secret(KEK, KEY)
    got = unwrap_key(KEK, wrap_key(KEK, KEY))
    assert type(got) is SecretBytes and not _leaks(repr(got) + str(got) + f"{got}", KEY)
    [(_, again)] = decode_key_transfer(KEK, encode_key_transfer(KEK, [(KeyId.MASTER, KEY)]))
    assert type(again) is SecretBytes


def test_initiate_request_repr_hides_the_dedicated_key():
    secret(KEY)
    req = decode_initiate_request(
        bytes.fromhex("010110") + KEY + bytes.fromhex("0000065F1F0400007E1F04B0")
    )
    assert req.dedicated_key == KEY
    for text in (repr(req), str(req), f"{req}", repr([req])):
        assert "<secret>" in text and not _leaks(text, KEY)
    assert "dedicated_key=None" in repr(InitiateRequest(None))


def test_error_messages_never_carry_key_material(no_key_in_error_messages):
    """Provoke every error path that handles keys; the autouse fixture (and
    this test, explicitly) checks the collected messages."""
    secret(KEK, KEY)
    wrapped = wrap_key(KEK, KEY)
    attempts = [
        lambda: unwrap_key(KEY, wrapped),
        lambda: unwrap_key(KEK, wrapped[:-1]),
        lambda: decode_key_transfer(KEY, encode_key_transfer(KEK, [(KeyId.GLOBAL_UNICAST, KEY)])),
        lambda: decode_key_transfer(KEK, b"\x01\x01" + bytes(30)),
        lambda: decode_initiate_request(b"\x01\x01\x0f" + KEY),
        lambda: decode_initiate_request(b"\x01\x01\x10" + KEY),
        lambda: decode_initiate_request(b"\x01\x01\x10" + KEY + b"\x07"),
        lambda: KeySlot(active=1).activate(2),
    ]
    for attempt in attempts:
        with pytest.raises(ProtocolError):
            attempt()
    messages = no_key_in_error_messages
    assert len(messages) >= len(attempts)
    assert not [m for m in messages if _leaks(m, KEY) or _leaks(m, KEK)]
