"""Files that hold secrets or counter marks: private folders, atomic private
writes, durable renames.

One place for the three things every writer of security material needs
(the vault's KEK file, the handheld's keys and counters, provisioning, the
meters' NVM): a folder only its owner can enter (0700), a file only its owner
can read (0600, set at creation, never widened by the umask), and a rename
that survives power loss (fsync the file, rename, fsync the folder).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["SecretFileError", "create_secret_file", "fsync_dir", "private_dir", "read_secret_file", "write_private"]


class SecretFileError(ValueError):
    """A key file that must not be used; the message names the file, never its bytes."""


def private_dir(folder: Path) -> Path:
    """Create ``folder`` (and parents) and make it 0700; return it."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a new file, a rename) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: a 0600 temporary file,
    fsync, rename over ``path``, fsync the folder.  A crash leaves either the
    old file or the new one, never a mix, and never a readable copy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def read_secret_file(path: Path, size: int, what: str) -> bytes:
    """The ``size`` raw bytes of a key file, or SecretFileError.

    Symlinks are followed on purpose (Kubernetes mounts secrets through them);
    the checks are made on the file actually opened (fstat: no check/use
    race).  FileNotFoundError passes through, for the caller to decide.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretFileError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # Same rule as ssh: group/other access means someone else may have
            # read (or replaced) the key, so refuse rather than carry on.
            raise SecretFileError(
                f"{what} {path} has mode {mode:04o}: it must not be accessible by group or others (chmod 600 {path})"
            )
        if st.st_size != size:
            # Exactly ``size`` bytes: a hex text file or a truncated write is
            # refused instead of being silently used as a different key.
            raise SecretFileError(f"{what} {path} is {st.st_size} bytes, expected {size} raw bytes")
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise SecretFileError(f"{what} {path} changed size while being read")
    return data


def create_secret_file(path: Path, size: int) -> None:
    """Write ``size`` fresh random bytes to ``path`` unless it exists, so that
    no reader ever sees a partial file and nothing is ever overwritten.

    The bytes go to a private temp file (O_CREAT|O_EXCL, 0600), are fsynced,
    then published with link(), which fails if the file already exists: two
    processes creating at once agree on one key (what was wrapped under the
    first stays readable).
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing folder is left as it is
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case the umask stripped owner bits
        os.write(fd, secrets.token_bytes(size))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its key
        fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
