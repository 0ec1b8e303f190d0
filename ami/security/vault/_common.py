"""What the vault backends share: the protocol, the errors, input checks, repr."""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

KEK_LEN = 16
_KEY_LENS = (16, 24, 32)
# RFC 3394 adds one 8-byte integrity block to the wrapped key.
_WRAPPED_LENS = tuple(n + 8 for n in _KEY_LENS)

T = TypeVar("T")


class VaultError(Exception):
    """Any vault failure.  Messages name files, tokens and labels, never bytes."""

    reason = "vault_error"


@runtime_checkable
class KeyVault(Protocol):
    name: str

    def wrap(self, key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes) -> bytes: ...

    def unwrap_many(self, wrapped: list[bytes]) -> list[bytes]: ...

    def close(self) -> None: ...


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise VaultError(f"key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) not in _KEY_LENS:
        raise VaultError(f"key must be 16, 24 or 32 bytes, got {len(key)}")
    return key


def _check_wrapped(wrapped: bytes) -> bytes:
    if not isinstance(wrapped, (bytes, bytearray, memoryview)):
        raise VaultError(f"wrapped key must be bytes, not {type(wrapped).__name__}")
    wrapped = bytes(wrapped)
    if len(wrapped) not in _WRAPPED_LENS:
        raise VaultError(f"wrapped key must be 24, 32 or 40 bytes, got {len(wrapped)}")
    return wrapped


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


