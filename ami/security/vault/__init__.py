"""The head-end's key vault: the KEK that wraps every meter key kept at rest.

Why: the head-end database holds one AES key per meter.  If those rows were
stored in clear, one leaked dump or backup would give away every meter.  So
the database only ever holds *wrapped* keys (envelope encryption): each meter
key is wrapped with RFC 3394 AES key wrap under one key-encryption key (KEK),
and the KEK never goes into the database.

Each wrapped key is bound to its row: what is wrapped is ``key || binding``,
``binding = SHA-256("ami-wrapped-key-binding\\0" || identity)[:24]`` with
``identity = "ami-key|<meter>|<key_type>|<version>"`` (key rows) or
``"ami-session|<meter>|<serial>"`` (session rows).  ``wrap``/``unwrap`` take
that identity: whoever can write the database but lacks the KEK cannot move a
blob to another row (an expired key back into the active row, one meter's
key into another's): it fails to unwrap with :class:`WrongRow`, naming the
row.  Bound blobs are 48/56/64 bytes; the old unbound ones (24/32/40) are
read only by ``unwrap_legacy_many``, to migrate a store once.

RFC 3394 rather than e.g. AES-GCM: it is the standard for wrapping keys,
needs no nonce (deterministic, so nothing to get wrong), carries a 64-bit
integrity check, and every HSM implements it.  Both backends produce the
same bytes for the same KEK, which the tests check against the RFC vector.

Two backends:

* ``FileKeyVault``: the KEK is 16 random bytes in a 0600 file.  For
  development, tests and small deployments; the file must live outside the
  database and its backups.
* ``Pkcs11KeyVault``: the KEK is generated inside an HSM (SoftHSM2 in CI) as
  a non-extractable, sensitive token object; it never leaves the token.

Neither the key bytes, the KEK nor the HSM PIN ever appear in an exception
message or a repr: a vault shows only its name.
"""

from __future__ import annotations

import os
from pathlib import Path

from ami.security.vault._common import (
    KEK_LEN,
    KeyVault,
    VaultError,
    WrongRow,
    bind_to_row,
    is_legacy_blob,
    key_identity,
    session_identity,
    unbind_from_row,
)
from ami.security.vault.file import FileKeyVault
from ami.security.vault.pkcs11 import Pkcs11KeyVault

__all__ = [
    "KEK_LEN",
    "FileKeyVault",
    "KeyVault",
    "Pkcs11KeyVault",
    "VaultError",
    "WrongRow",
    "bind_to_row",
    "is_legacy_blob",
    "key_identity",
    "open_vault",
    "session_identity",
    "unbind_from_row",
]


_PKCS11_KEYS = {"lib", "token", "pin_env", "label", "create"}


def open_vault(spec: str, *, data_dir: Path | None = None) -> KeyVault:
    """Open a vault from a config string.

    ``file:PATH`` - relative paths are resolved against ``data_dir``.
    ``pkcs11:lib=/usr/lib/softhsm/libsofthsm2.so;token=ami;pin_env=AMI_HSM_PIN;label=ami-kek``
    - the PIN is read from the named environment variable, never from the
    spec.  Optional ``create=no`` refuses to generate a missing KEK.

    Error messages never echo the spec: if someone pasted a PIN into it, it
    must not end up in a log.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise VaultError("vault spec must start with 'file:' or 'pkcs11:'")
    if scheme == "file":
        return _open_file(rest, data_dir)
    if scheme == "pkcs11":
        return _open_pkcs11(rest)
    raise VaultError(f"unknown vault scheme {scheme[:16]!r}: use 'file:' or 'pkcs11:'")


def _open_file(rest: str, data_dir: Path | None) -> FileKeyVault:
    if not rest:
        raise VaultError("file: vault spec needs a path")
    path = Path(rest).expanduser()
    if not path.is_absolute():
        if data_dir is None:
            # Refuse to guess (cwd): a KEK created in the wrong place silently
            # makes every stored key unreadable on the next start.
            raise VaultError("relative file: vault path needs a data_dir")
        path = Path(data_dir) / path
    return FileKeyVault(path)


def _open_pkcs11(rest: str) -> Pkcs11KeyVault:
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key == "pin":
            raise VaultError("pkcs11: vault spec must not contain the PIN; use pin_env=VARIABLE")
        if not sep or key not in _PKCS11_KEYS:
            raise VaultError(
                f"pkcs11: vault spec has an unknown item; allowed keys: {', '.join(sorted(_PKCS11_KEYS))}"
            )
        params[key] = value.strip()
    missing = [k for k in ("lib", "token") if not params.get(k)]
    if missing:
        raise VaultError(f"pkcs11: vault spec is missing {', '.join(missing)}")
    pin_env = params.get("pin_env") or "AMI_HSM_PIN"
    pin = os.environ.get(pin_env)
    if not pin:
        raise VaultError(f"environment variable {pin_env} (HSM user PIN) is not set")
    create = params.get("create", "yes").lower()
    if create not in ("yes", "no", "true", "false", "1", "0"):
        raise VaultError("pkcs11: vault spec create= must be yes or no")
    return Pkcs11KeyVault(
        params["lib"],
        params["token"],
        pin,
        params.get("label") or "ami-kek",
        create=create in ("yes", "true", "1"),
    )
