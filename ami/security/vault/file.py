"""``FileKeyVault``: the KEK is 16 random bytes in a 0600 file (development, tests, small sites)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ami.security.files import SecretFileError, create_secret_file, read_secret_file
from ami.security.vault._common import (
    _INTEGRITY_FAILED,
    KEK_LEN,
    VaultError,
    bind_to_row,
    _check_identities,
    _check_wrapped,
    unbind_from_row,
    _VaultBase,
    describe,
)


class FileKeyVault(_VaultBase):
    """KEK = 16 random bytes in a 0600 file, created on first use."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path}"
        # A bytearray so close() can overwrite it (best effort: Python may
        # have made copies, but at least the long-lived one is wiped).
        self._kek: bytearray | None = bytearray(_load_or_create_kek(self.path, create))

    def _key(self) -> bytes:
        if self._kek is None:
            raise VaultError(f"{self.name}: vault is closed")
        return bytes(self._kek)

    def wrap(self, key: bytes, identity: bytes) -> bytes:
        """RFC 3394 of ``key || binding(identity)``: bound to its row."""
        return aes_key_wrap(self._key(), bind_to_row(key, identity))

    def unwrap(self, wrapped: bytes, identity: bytes) -> bytes:
        return self.unwrap_many([wrapped], [identity])[0]

    def unwrap_many(self, wrapped: list[bytes], identities: list[bytes]) -> list[bytes]:
        _check_identities(wrapped, identities)
        kek = self._key()
        out = []
        for i, (blob, identity) in enumerate(zip(wrapped, identities)):
            try:
                payload = aes_key_unwrap(kek, _check_wrapped(blob, identity))
            except InvalidUnwrap:
                where = f" at index {i}" if len(wrapped) > 1 else ""
                raise VaultError(f"{_INTEGRITY_FAILED}{where} ({describe(identity)})") from None
            out.append(unbind_from_row(payload, identity))
        return out

    def unwrap_legacy_many(self, wrapped: list[bytes]) -> list[bytes]:
        """Old, unbound blobs (plain RFC 3394 of the key): only to migrate a store."""
        kek = self._key()
        out = []
        for i, blob in enumerate(wrapped):
            try:
                out.append(aes_key_unwrap(kek, _check_wrapped(blob)))
            except InvalidUnwrap:
                raise VaultError(f"{_INTEGRITY_FAILED} at index {i}") from None
        return out

    def close(self) -> None:
        if self._kek is not None:
            self._kek[:] = bytes(len(self._kek))
            self._kek = None


def _load_or_create_kek(path: Path, create: bool) -> bytes:
    try:
        return _read_kek(path)
    except FileNotFoundError:
        if not create:
            raise VaultError(f"KEK file {path} does not exist") from None
    _create_kek(path)
    try:
        return _read_kek(path)
    except FileNotFoundError:  # e.g. a dangling symlink in the way
        raise VaultError(f"KEK file {path} could not be created") from None


def _read_kek(path: Path) -> bytes:
    try:
        return read_secret_file(path, KEK_LEN, "KEK file")
    except SecretFileError as exc:
        raise VaultError(str(exc)) from None


def _create_kek(path: Path) -> None:
    """A fresh KEK, written so that no reader ever sees a partial file and
    two head-ends starting at once agree on one KEK (files.create_secret_file)."""
    create_secret_file(path, KEK_LEN)


