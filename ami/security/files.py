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
from pathlib import Path

__all__ = ["fsync_dir", "private_dir", "write_private"]


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
