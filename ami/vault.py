"""The head-end's key vault: the KEK that wraps every meter key kept at rest.

Why: the head-end database holds one AES key per meter.  If those rows were
stored in clear, one leaked dump or backup would give away every meter.  So
the database only ever holds *wrapped* keys (envelope encryption): each meter
key is wrapped with RFC 3394 AES key wrap under one key-encryption key (KEK),
and the KEK never goes into the database.

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

import hashlib
import hmac
import os
import secrets
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

__all__ = [
    "KEK_LEN",
    "FileKeyVault",
    "KeyVault",
    "Pkcs11KeyVault",
    "VaultError",
    "open_vault",
]

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


# --------------------------------------------------------------------------
# File backend
# --------------------------------------------------------------------------


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

    def wrap(self, key: bytes) -> bytes:
        return aes_key_wrap(self._key(), _check_key(key))

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._key(), _check_wrapped(wrapped))
        except InvalidUnwrap:
            raise VaultError(_INTEGRITY_FAILED) from None

    def unwrap_many(self, wrapped: list[bytes]) -> list[bytes]:
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
        _fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# PKCS#11 backend
# --------------------------------------------------------------------------


@dataclass
class _TokenLogin:
    """One logged-in session per (library, token), shared by its vaults.

    PKCS#11 login state belongs to the whole process (C_Login on a second
    session fails with USER_ALREADY_LOGGED_IN, and C_Logout on any session
    logs them all out), so vaults on the same token share one session and
    the last one to close logs out.
    """

    lib_path: str
    token_label: str
    session: Any = field(repr=False)
    pin_digest: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    refs: int = 1

    @staticmethod
    def digest(salt: bytes, pin: str) -> bytes:
        return hashlib.sha256(salt + pin.encode()).digest()

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(self.digest(self.salt, pin), self.pin_digest)


@dataclass
class _Pkcs11Worker:
    """The single thread that makes every PKCS#11 call in this process.

    python-pkcs11 is not thread-safe (and many modules are not either), so
    every call - load, login, find, generate, wrap, unwrap, logout - is
    submitted to one ThreadPoolExecutor(max_workers=1).  The dictionaries
    below are only ever touched from that thread, so they need no lock.
    """

    pid: int = field(default_factory=os.getpid)
    executor: ThreadPoolExecutor = field(init=False)
    thread_id: int | None = None
    libs: dict[str, Any] = field(default_factory=dict, repr=False)
    logins: dict[tuple[str, str], _TokenLogin] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ami-pkcs11", initializer=self._mark
        )

    def _mark(self) -> None:
        self.thread_id = threading.get_ident()

    def call(self, fn: Callable[..., T], /, *args: Any) -> T:
        if os.getpid() != self.pid:
            # The worker thread does not exist in a forked child, and PKCS#11
            # sessions do not survive fork: fail loudly instead of hanging.
            raise VaultError("PKCS#11 vault opened before fork(); open it in the child")
        if threading.get_ident() == self.thread_id:
            return fn(*args)  # already on the worker (e.g. inside with_kek)
        return self.executor.submit(fn, *args).result()

    # -- the methods below run on the worker thread only --

    def login(self, lib_path: str, token_label: str, pin: str) -> _TokenLogin:
        import pkcs11  # imported lazily: the file backend must not need it

        key = (lib_path, token_label)
        login = self.logins.get(key)
        if login is not None:
            # Already logged in (once per process): still insist on the right
            # PIN so a second vault cannot ride on the first one's login.
            if not login.pin_matches(pin):
                raise VaultError(f"PKCS#11 login to token {token_label!r} failed: wrong PIN")
            login.refs += 1
            return login
        lib = self.libs.get(lib_path)
        try:
            if lib is None:
                # One pkcs11.lib per path for the life of the process: a second
                # instance would C_Finalize the module under the first when
                # garbage collected.
                lib = pkcs11.lib(lib_path)
                self.libs[lib_path] = lib
            elif not lib.initialized:
                lib.initialize()
            token = lib.get_token(token_label=token_label)
            session = token.open(rw=True, user_pin=pin)
        except pkcs11.PKCS11Error as exc:
            self._release_lib(lib_path)
            # The exception names are PKCS#11 return codes, never the PIN.
            raise VaultError(
                f"PKCS#11 login to token {token_label!r} failed: {type(exc).__name__}"
            ) from None
        salt = secrets.token_bytes(16)
        login = _TokenLogin(lib_path, token_label, session, _TokenLogin.digest(salt, pin), salt)
        self.logins[key] = login
        return login

    def logout(self, login: _TokenLogin) -> None:
        login.refs -= 1
        if login.refs > 0:
            return
        del self.logins[(login.lib_path, login.token_label)]
        try:
            login.session.close()  # C_Logout + C_CloseSession
        finally:
            self._release_lib(login.lib_path)

    def _release_lib(self, lib_path: str) -> None:
        if any(k[0] == lib_path for k in self.logins):
            return
        # Nothing else uses this module: C_Finalize frees its sessions and
        # lets the next open re-read its config (SoftHSM2 reads SOFTHSM2_CONF
        # in C_Initialize).  The lib object itself stays cached.
        lib = self.libs.get(lib_path)
        if lib is not None and lib.initialized:
            lib.finalize()


_worker_lock = threading.Lock()
_worker: _Pkcs11Worker | None = None


def _get_worker() -> _Pkcs11Worker:
    global _worker
    with _worker_lock:
        if _worker is None or _worker.pid != os.getpid():
            _worker = _Pkcs11Worker()
        return _worker


class Pkcs11KeyVault(_VaultBase):
    """KEK generated and kept inside a PKCS#11 token (HSM, SoftHSM2).

    The KEK is found by label, or generated on first use as a token object
    that is sensitive, non-extractable and only allowed to wrap and unwrap.

    Wrapping uses C_WrapKey/C_UnwrapKey with CKM_AES_KEY_WRAP (RFC 3394):
    the meter key is imported as a short-lived session object, wrapped and
    destroyed; unwrapping creates a short-lived extractable session object,
    reads its value and destroys it.  (C_Encrypt with CKM_AES_KEY_WRAP would
    be simpler but SoftHSM2 - and several HSMs - only allow the mechanism for
    wrap/unwrap.)  Output is byte-identical to cryptography's aes_key_wrap.
    """

    def __init__(
        self,
        lib_path: str,
        token_label: str,
        pin: str,
        key_label: str,
        *,
        create: bool = True,
    ) -> None:
        self.name = f"pkcs11:{token_label}/{key_label}"
        self.key_label = key_label
        self._closed = False
        self._worker = _get_worker()
        # The PIN is handed to the worker and not kept on this object.
        self._login, self._kek = self._worker.call(
            self._open_on_worker, lib_path, token_label, pin, key_label, create
        )

    # -- public API: each call is one job on the worker thread --

    def wrap(self, key: bytes) -> bytes:
        return self._worker.call(self._wrap_on_worker, _check_key(key))

    def unwrap(self, wrapped: bytes) -> bytes:
        return self._worker.call(self._unwrap_many_on_worker, [_check_wrapped(wrapped)])[0]

    def unwrap_many(self, wrapped: list[bytes]) -> list[bytes]:
        # One job for the whole batch: a cold start of 100k meters pays one
        # thread hop, not 100k.
        blobs = [_check_wrapped(w) for w in wrapped]
        return self._worker.call(self._unwrap_many_on_worker, blobs)

    def with_kek(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(kek_object)`` on the PKCS#11 thread (inspection, tests).

        The token enforces the KEK's attributes: reading its VALUE fails.
        """
        return self._worker.call(self._with_kek_on_worker, fn)

    def close(self) -> None:
        if not self._closed:
            self._worker.call(self._close_on_worker)

    # -- worker-thread side --

    def _open_on_worker(
        self, lib_path: str, token_label: str, pin: str, key_label: str, create: bool
    ) -> tuple[_TokenLogin, Any]:
        login = self._worker.login(lib_path, token_label, pin)
        try:
            return login, self._find_or_generate(login.session, key_label, create)
        except BaseException:
            self._worker.logout(login)
            raise

    def _find_or_generate(self, session: Any, key_label: str, create: bool) -> Any:
        from pkcs11 import (
            Attribute,
            KeyType,
            MechanismFlag,
            MultipleObjectsReturned,
            NoSuchKey,
            ObjectClass,
            PKCS11Error,
        )

        try:
            kek = session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=key_label
            )
        except MultipleObjectsReturned:
            raise VaultError(f"{self.name}: several AES keys carry this label") from None
        except NoSuchKey:
            if not create:
                raise VaultError(f"{self.name}: no such KEK on the token") from None
            try:
                # Token object (store=True), never leaves the HSM, and may
                # only wrap/unwrap: no ENCRYPT/DECRYPT, so it cannot be used
                # as a raw AES oracle on the wrapped blobs.
                return session.generate_key(
                    KeyType.AES,
                    KEK_LEN * 8,
                    label=key_label,
                    store=True,
                    capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                    template={
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.PRIVATE: True,
                    },
                )
            except PKCS11Error as exc:
                raise VaultError(f"{self.name}: KEK generation failed: {type(exc).__name__}") from None
        # An existing key must be as locked-down as one we would generate.
        if kek[Attribute.EXTRACTABLE] or not kek[Attribute.SENSITIVE]:
            raise VaultError(f"{self.name}: KEK is extractable or not sensitive; refusing it")
        if not (kek[Attribute.WRAP] and kek[Attribute.UNWRAP]):
            raise VaultError(f"{self.name}: KEK lacks the WRAP/UNWRAP capability")
        return kek

    def _check_open(self) -> None:
        if self._closed:
            raise VaultError(f"{self.name}: vault is closed")

    def _wrap_on_worker(self, key: bytes) -> bytes:
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, PKCS11Error

        self._check_open()
        try:
            tmp = self._login.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: key,
                    Attribute.TOKEN: False,  # session object: gone on logout
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,  # required to be wrapped
                }
            )
            try:
                return bytes(self._kek.wrap_key(tmp, mechanism=Mechanism.AES_KEY_WRAP))
            finally:
                tmp.destroy()
        except PKCS11Error as exc:
            raise VaultError(f"{self.name}: wrap failed: {type(exc).__name__}") from None

    def _unwrap_many_on_worker(self, blobs: Sequence[bytes]) -> list[bytes]:
        from pkcs11 import (
            Attribute,
            KeyType,
            Mechanism,
            MechanismFlag,
            ObjectClass,
            PKCS11Error,
        )

        self._check_open()
        out = []
        for i, blob in enumerate(blobs):
            try:
                tmp = self._kek.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.AES,
                    blob,
                    mechanism=Mechanism.AES_KEY_WRAP,
                    store=False,
                    capabilities=MechanismFlag(0),  # only its value is read
                    template={
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: False,
                        Attribute.EXTRACTABLE: True,
                    },
                )
            except PKCS11Error as exc:
                # SoftHSM2 reports a failed integrity check as GENERAL_ERROR.
                where = f" at index {i}" if len(blobs) > 1 else ""
                raise VaultError(f"{_INTEGRITY_FAILED}{where} ({type(exc).__name__})") from None
            try:
                out.append(bytes(tmp[Attribute.VALUE]))
            finally:
                tmp.destroy()
        return out

    def _with_kek_on_worker(self, fn: Callable[[Any], T]) -> T:
        self._check_open()
        return fn(self._kek)

    def _close_on_worker(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kek = None
        self._worker.logout(self._login)


# --------------------------------------------------------------------------
# Spec strings
# --------------------------------------------------------------------------

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
