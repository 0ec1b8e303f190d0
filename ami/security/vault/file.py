"""``FileKeyVault``: the KEK is 16 random bytes in a 0600 file (development, tests, small sites)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ami.security.files import fsync_dir
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
    # Symlinks are followed on purpose (Kubernetes mounts secrets through
    # them); the checks below are made on the file actually opened.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise VaultError(f"cannot open KEK file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # fstat on the open fd: no check/use race
        if not stat.S_ISREG(st.st_mode):
            raise VaultError(f"KEK file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # Same rule as ssh: group/other access means someone else may have
            # read (or replaced) the KEK, so refuse rather than carry on.
            raise VaultError(
                f"KEK file {path} has mode {mode:04o}: it must not be accessible "
                f"by group or others (chmod 600 {path})"
            )
        if st.st_size != KEK_LEN:
            # Exactly 16 bytes: a hex text file or a truncated write is refused
            # instead of being silently used as a different key.
            raise VaultError(
                f"KEK file {path} is {st.st_size} bytes, expected {KEK_LEN} raw bytes"
            )
        kek = os.read(fd, KEK_LEN + 1)
    finally:
        os.close(fd)
    if len(kek) != KEK_LEN:
        raise VaultError(f"KEK file {path} changed size while being read")
    return kek


def _create_kek(path: Path) -> None:
    """Write a fresh KEK so that no reader can ever see a partial file.

    The bytes go to a private temp file (O_CREAT|O_EXCL, 0600), are fsynced,
    then published with link(), which fails if the KEK already exists: two
    head-ends starting at once agree on one KEK instead of overwriting.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case the umask stripped owner bits
        os.write(fd, secrets.token_bytes(KEK_LEN))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its KEK
        fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


