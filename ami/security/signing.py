"""The head-end's suite-1 signing key: a file beside the KEK, or a key pair
generated inside the PKCS#11 token (never extractable; signatures made there).

Only suite-1 networks have one: ``ami provision --suite 1|mixed`` writes the
file key (0600) and puts its public half in network.json, which meters take
as the head-end's identity.  With a PKCS#11 vault the key pair lives in the
token under ``<label>-sign`` (``ami keys signing-key --vault pkcs11:...``
creates it there and writes its public half to network.json for the meters).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ami.protocol.suite1 import Signer, SoftwareSigner

__all__ = ["HEADEND_SIGN_FILE", "SigningKeyError", "load_headend_signer", "write_headend_signing_key"]

HEADEND_SIGN_FILE = "headend-sign.key"


class SigningKeyError(Exception):
    """A signing-key problem; messages name files, never key bytes."""


def write_headend_signing_key(data_dir: Path, scalar: bytes) -> None:
    from ami.security.files import write_private

    write_private(Path(data_dir) / HEADEND_SIGN_FILE, scalar.hex().encode() + b"\n")


def load_headend_signer(vault: Any, data_dir: Path | None, *, create: bool = False) -> Signer | None:
    """The head-end's signer: from ``vault`` when it keeps keys in a token
    (``vault.signer``), else the file beside the KEK; None on a network
    without suite-1 meters (no key anywhere)."""
    token_signer = getattr(vault, "signer", None)
    if token_signer is not None:
        from ami.security.vault import VaultError

        try:
            return token_signer(create=create)
        except VaultError:
            if create:
                raise
            return None
    path = Path(data_dir or ".") / HEADEND_SIGN_FILE
    if not path.exists():
        return None
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise SigningKeyError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        return SoftwareSigner.from_scalar(bytes.fromhex(path.read_text().strip()))
    except ValueError:
        raise SigningKeyError(f"{path} does not hold a P-256 private scalar") from None
