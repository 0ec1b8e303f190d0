"""What the vault backends share: the protocol, the errors, input checks, repr."""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol, TypeVar, runtime_checkable

KEK_LEN = 16
_KEY_LENS = (16, 24, 32)
# Every wrapped key is bound to its row (meter, key type, version; or meter
# and serial for a session key): what is wrapped is ``key || binding``, the
# binding being the first BINDING_LEN bytes of SHA-256 over the row's
# identity.  RFC 3394 is a keyed permutation of the whole payload with a
# 64-bit integrity check: without the KEK nobody can turn the blob of one row
# into a blob whose binding names another, so a blob copied into another row
# (an expired key into the active row, meter A's key into meter B's row)
# fails to unwrap.  Both backends produce the same bytes (the payload is
# wrapped like any secret), and 24 bytes of binding make the bound lengths
# (48/56/64) disjoint from the old, unbound ones (24/32/40).
BINDING_LEN = 24
# RFC 3394 adds one 8-byte integrity block to the wrapped payload.
_WRAPPED_LENS = tuple(n + BINDING_LEN + 8 for n in _KEY_LENS)
# Blobs written before keys were bound (read only to migrate a store).
_LEGACY_WRAPPED_LENS = tuple(n + 8 for n in _KEY_LENS)
_IDENTITY_MAX = 512

T = TypeVar("T")


class VaultError(Exception):
    """Any vault failure.  Messages name files, tokens and labels, never bytes."""

    reason = "vault_error"


class WrongRow(VaultError):
    """The blob unwraps under the KEK but is bound to another row (copied or moved)."""

    reason = "wrapped_key_wrong_row"


@runtime_checkable
class KeyVault(Protocol):
    name: str

    def wrap(self, key: bytes, identity: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, identity: bytes) -> bytes: ...

    def unwrap_many(self, wrapped: list[bytes], identities: list[bytes]) -> list[bytes]: ...

    def unwrap_legacy_many(self, wrapped: list[bytes]) -> list[bytes]: ...

    def close(self) -> None: ...


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise VaultError(f"key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) not in _KEY_LENS:
        raise VaultError(f"key must be 16, 24 or 32 bytes, got {len(key)}")
    return key


def _check_wrapped(wrapped: bytes, identity: bytes | None = None) -> bytes:
    """A bound blob (``identity`` given: named in errors), else an old unbound one."""
    if not isinstance(wrapped, (bytes, bytearray, memoryview)):
        raise VaultError(f"wrapped key must be bytes, not {type(wrapped).__name__}")
    wrapped = bytes(wrapped)
    if identity is None:
        if len(wrapped) not in _LEGACY_WRAPPED_LENS:
            raise VaultError(f"old-format wrapped key must be 24, 32 or 40 bytes, got {len(wrapped)}")
        return wrapped
    if len(wrapped) in _LEGACY_WRAPPED_LENS:
        raise VaultError(f"wrapped key of {describe(identity)} is in the old, unbound format "
                         f"({len(wrapped)} bytes): it cannot be told from a copied row")
    if len(wrapped) not in _WRAPPED_LENS:
        raise VaultError(f"wrapped key of {describe(identity)} must be 48, 56 or 64 bytes, got {len(wrapped)}")
    return wrapped


def is_legacy_blob(wrapped: bytes) -> bool:
    """True for a blob written before keys were bound to their rows."""
    return len(wrapped) in _LEGACY_WRAPPED_LENS


def _field(value: object) -> bytes:
    text = str(value)
    if not text or "|" in text or len(text) > 128 or not text.isprintable():
        raise VaultError("a key identity field must be 1-128 printable characters without '|'")
    return text.encode()


def key_identity(meter: str, key_type: str, version: int) -> bytes:
    """The identity a key row's blob is bound to: ``ami-key|meter|key_type|version``."""
    return b"ami-key|" + b"|".join((_field(meter), _field(key_type), _field(int(version))))


def session_identity(meter: str, serial: int) -> bytes:
    """The identity a session row's blob is bound to: ``ami-session|meter|serial``."""
    return b"ami-session|" + _field(meter) + b"|" + _field(int(serial))


def describe(identity: bytes) -> str:
    """An identity for an error message (it names a row; it is not secret)."""
    return identity[:_IDENTITY_MAX].decode("ascii", "replace")


def _check_identity(identity: bytes) -> bytes:
    if not isinstance(identity, (bytes, bytearray)) or not 0 < len(identity) <= _IDENTITY_MAX:
        raise VaultError("a key identity must be 1-512 bytes (see key_identity / session_identity)")
    return bytes(identity)


def _binding(identity: bytes) -> bytes:
    return hashlib.sha256(b"ami-wrapped-key-binding\0" + identity).digest()[:BINDING_LEN]


def bind_to_row(key: bytes, identity: bytes) -> bytes:
    """The payload that gets wrapped: the key, then its row's binding (the
    attack tools use it to show that the KEK makes the binding no obstacle)."""
    return _check_key(key) + _binding(_check_identity(identity))


def unbind_from_row(payload: bytes, identity: bytes) -> bytes:
    key, binding = payload[:-BINDING_LEN], payload[-BINDING_LEN:]
    if len(key) not in _KEY_LENS or not hmac.compare_digest(binding, _binding(_check_identity(identity))):
        raise WrongRow(f"unwrap failed for {describe(identity)}: the wrapped key is bound to another row "
                       "(copied or moved row)")
    return key


def _check_identities(wrapped: list[bytes], identities: list[bytes]) -> None:
    if len(wrapped) != len(identities):
        raise VaultError(f"unwrap_many: {len(wrapped)} blobs but {len(identities)} identities")


_INTEGRITY_FAILED = "unwrap failed: integrity check failed (wrong KEK or corrupted blob)"


class _VaultBase:
    """repr and context manager shared by the backends."""

    name: str

    def __repr__(self) -> str:
        # Only the name: no path contents, no handles, nothing secret.
        return f"<{type(self).__name__} {self.name}>"

    __str__ = __repr__

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


