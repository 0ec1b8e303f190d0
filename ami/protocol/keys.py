"""The Linky key hierarchy in DLMS terms, key_transfer and the key lifecycle.

==========  ===========================  =====================================
Linky       DLMS                         use
==========  ===========================  =====================================
CCC         master key (KEK), key_id 3   wraps new keys in key_transfer only
CC_LAN      global unicast key, id 0     ciphers the LAN association (head-end)
CC_LOCALE   global unicast key, id 0     ciphers the local association (handheld)
            (of the local association's
            security setup object)
AK          authentication key, id 2     in the AAD of every frame
session     dedicated key                ciphers traffic after an association
==========  ===========================  =====================================

Each association has its own security setup object (class 64), so CC_LAN and
CC_LOCALE are both "global unicast key 0", of the ``lan`` and ``local``
setups respectively.  The AK is shared by both associations; we reprogram it
through the ``lan`` setup.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import hashlib

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from .errors import AuthenticationFailed, KeyLifecycleError, MalformedMessage

__all__ = [
    "KEY_LEN",
    "KeyId",
    "KeySlot",
    "KeyState",
    "KeyType",
    "REPROGRAMMABLE",
    "SecretBytes",
    "SecuritySetup",
    "TRANSFER_TARGET",
    "WRAPPED_LEN",
    "decode_key_transfer",
    "encode_key_transfer",
    "key_check_value",
    "key_type_for",
    "unwrap_key",
    "wrap_key",
]

KEY_LEN = 16
WRAPPED_LEN = 24


class SecretBytes(bytes):
    """Key bytes whose repr and str never show the key (logs, tracebacks)."""

    def __repr__(self) -> str:
        return f"<secret {len(self)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


class KeyType(enum.StrEnum):
    CCC = "ccc"
    AK = "ak"
    CC_LAN = "cc_lan"
    CC_LOCALE = "cc_locale"
    SESSION = "session"


class KeyState(enum.StrEnum):
    NEW = "new"
    ACTIVE = "active"
    EXPIRED = "expired"


class SecuritySetup(enum.StrEnum):
    LAN = "lan"
    LOCAL = "local"


class KeyId(enum.IntEnum):
    """DLMS key_transfer key_id (Security setup class 64, method 2)."""

    GLOBAL_UNICAST = 0
    BROADCAST = 1
    AUTHENTICATION = 2
    MASTER = 3


#: Where key_transfer sends each reprogrammable key.
TRANSFER_TARGET: dict[KeyType, tuple[SecuritySetup, KeyId]] = {
    KeyType.CC_LAN: (SecuritySetup.LAN, KeyId.GLOBAL_UNICAST),
    KeyType.CC_LOCALE: (SecuritySetup.LOCAL, KeyId.GLOBAL_UNICAST),
    KeyType.AK: (SecuritySetup.LAN, KeyId.AUTHENTICATION),
}
REPROGRAMMABLE = frozenset(TRANSFER_TARGET)


def key_type_for(setup: SecuritySetup, key_id: KeyId) -> KeyType:
    for key_type, target in TRANSFER_TARGET.items():
        if target == (setup, key_id):
            return key_type
    raise MalformedMessage(f"key_id {int(key_id)} of setup {setup} is not reprogrammable here")


def key_check_value(key_type: "KeyType", version: int, key: bytes) -> bytes:
    """8 bytes that name one installed key: SHA-256 over a domain label, the
    key type, its version and the key.  The meter returns it in its ack, the
    head-end compares it with its own copy; a one-way hash of a random
    128-bit key tells nothing about the key (and travels ciphered anyway)."""
    label = f"ami-kcv|{key_type.value}|{version}|".encode()
    return hashlib.sha256(label + bytes(key)).digest()[:8]


def wrap_key(kek: bytes, key: bytes) -> bytes:
    """RFC 3394 AES key wrap (default IV A6A6A6A6A6A6A6A6)."""
    if len(key) != KEY_LEN:
        raise ValueError("keys are 16 bytes")
    return aes_key_wrap(bytes(kek), bytes(key))


def unwrap_key(kek: bytes, wrapped: bytes) -> SecretBytes:
    if len(wrapped) != WRAPPED_LEN:
        raise MalformedMessage("wrapped key must be 24 bytes")
    try:
        return SecretBytes(aes_key_unwrap(bytes(kek), bytes(wrapped)))
    except InvalidUnwrap:
        raise AuthenticationFailed("key wrap integrity check failed") from None


def encode_key_transfer(kek: bytes, items: list[tuple[KeyId, bytes]]) -> bytes:
    """The key_transfer parameter: ``array{structure{enum key_id, octet-string wrapped}}``.

    Encoded ``01 n (02 02 16 <id> 09 18 <24 bytes>)*``, each key wrapped under
    the master key (our CCC).
    """
    if not 1 <= len(items) <= 4:
        raise ValueError("one to four keys per transfer")
    out = bytearray((0x01, len(items)))
    for key_id, key in items:
        out += bytes((0x02, 0x02, 0x16, int(key_id), 0x09, WRAPPED_LEN))
        out += wrap_key(kek, key)
    return bytes(out)


def decode_key_transfer(kek: bytes, param: bytes) -> list[tuple[KeyId, SecretBytes]]:
    """Parse and unwrap a key_transfer parameter (strict; raises typed errors)."""
    if len(param) < 2 or param[0] != 0x01:
        raise MalformedMessage("key_transfer parameter is not an array")
    count = param[1]
    item_len = 6 + WRAPPED_LEN
    if not 1 <= count <= 4 or len(param) != 2 + count * item_len:
        raise MalformedMessage("key_transfer array length mismatch")
    items: list[tuple[KeyId, SecretBytes]] = []
    for i in range(count):
        off = 2 + i * item_len
        head = param[off : off + 6]
        if head[:3] != b"\x02\x02\x16" or head[4:6] != bytes((0x09, WRAPPED_LEN)):
            raise MalformedMessage("key_transfer item is not structure{enum, octet-string(24)}")
        try:
            key_id = KeyId(head[3])
        except ValueError:
            raise MalformedMessage(f"unknown key_id {head[3]}") from None
        items.append((key_id, unwrap_key(kek, param[off + 6 : off + item_len])))
    return items


@dataclass(slots=True)
class KeySlot:
    """Lifecycle of one (meter, key type): at most one NEW and one ACTIVE version.

    NEW -> ACTIVE -> EXPIRED, as mature head-ends (OSGP) do.  Versions are
    integers the store assigns; the store keeps the bytes and the history.
    The recovery path: if the meter took a NEW key but its confirmation never
    arrived, the head-end tries NEW first next time and activates it when the
    meter answers under it (``try_order``), else falls back to ACTIVE.
    """

    active: int | None = None
    new: int | None = None

    def propose(self, version: int) -> None:
        if version is None:
            raise KeyLifecycleError("a key version is required")
        if self.new is not None:
            raise KeyLifecycleError("a NEW key is already pending for this slot")
        if version == self.active:
            raise KeyLifecycleError("version already active")
        self.new = version

    def activate(self, version: int) -> int | None:
        """NEW -> ACTIVE; return the version that became EXPIRED (if any)."""
        # ``self.new is None`` first: activate(None) with nothing pending used
        # to pass the comparison and silently drop the ACTIVE key.
        if self.new is None or self.new != version:
            raise KeyLifecycleError("only the pending NEW key can be activated")
        expired, self.active, self.new = self.active, version, None
        return expired

    def withdraw(self) -> int:
        """Drop the pending NEW key (the meter never took it); return it."""
        if self.new is None:
            raise KeyLifecycleError("no NEW key to withdraw")
        version, self.new = self.new, None
        return version

    def try_order(self) -> list[int]:
        """Versions to try, recovery first: NEW (if pending), then ACTIVE."""
        return [v for v in (self.new, self.active) if v is not None]

    def state_of(self, version: int) -> KeyState:
        if version == self.active:
            return KeyState.ACTIVE
        if version == self.new:
            return KeyState.NEW
        return KeyState.EXPIRED
