"""``Pkcs11KeyVault``: the KEK is a non-extractable object in an HSM token (SoftHSM2 in CI).

Every PKCS#11 call goes through one worker thread: the module is not
thread-safe in practice (two threads at once fail, even with a double free).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

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

T = TypeVar("T")


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
    the payload (meter key || binding to its row, see ``_common``) is
    imported as a short-lived GENERIC_SECRET session object, wrapped and
    destroyed; unwrapping creates a short-lived extractable session object,
    reads its value, destroys it, then checks the binding.  (C_Encrypt with CKM_AES_KEY_WRAP would
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

    def wrap(self, key: bytes, identity: bytes) -> bytes:
        return self._worker.call(self._wrap_on_worker, bind_to_row(key, identity))

    def unwrap(self, wrapped: bytes, identity: bytes) -> bytes:
        return self.unwrap_many([wrapped], [identity])[0]

    def unwrap_many(self, wrapped: list[bytes], identities: list[bytes]) -> list[bytes]:
        # One job for the whole batch: a cold start of 100k meters pays one
        # thread hop, not 100k.
        _check_identities(wrapped, identities)
        blobs = [_check_wrapped(w, i) for w, i in zip(wrapped, identities)]
        payloads = self._worker.call(self._unwrap_many_on_worker, blobs, True, identities)
        return [unbind_from_row(p, i) for p, i in zip(payloads, identities)]

    def unwrap_legacy_many(self, wrapped: list[bytes]) -> list[bytes]:
        """Old, unbound blobs (RFC 3394 of an AES key): only to migrate a store."""
        blobs = [_check_wrapped(w) for w in wrapped]
        return self._worker.call(self._unwrap_many_on_worker, blobs, False, None)

    def with_kek(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(kek_object)`` on the PKCS#11 thread (inspection, tests).

        The token enforces the KEK's attributes: reading its VALUE fails.
        """
        return self._worker.call(self._with_kek_on_worker, fn)

    def close(self) -> None:
        if not self._closed:
            self._worker.call(self._close_on_worker)

    def signer(self, *, create: bool = True) -> Pkcs11Signer:
        """The head-end's suite-1 signing key (ECDSA P-256), a key pair in the
        token labelled ``<key label>-sign``: generated there on first use,
        private half sensitive and never extractable; signatures are made
        inside the token (ami.protocol.suite1.Signer)."""
        public = self._worker.call(self._signing_key_on_worker, create)
        return Pkcs11Signer(self, public)

    # -- worker-thread side --

    def _signing_key_on_worker(self, create: bool) -> bytes:
        from pkcs11 import Attribute, KeyType, MechanismFlag, NoSuchKey, ObjectClass, PKCS11Error
        from pkcs11.util.ec import encode_named_curve_parameters

        self._check_open()
        session, label = self._login.session, f"{self.key_label}-sign"
        try:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=label)
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=label)
        except NoSuchKey:
            if not create:
                raise VaultError(f"{self.name}: no signing key {label!r} on the token") from None
            try:
                params = session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
                )
                public, private = params.generate_keypair(
                    store=True, label=label,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                      Attribute.PRIVATE: True},
                )
            except PKCS11Error as exc:
                raise VaultError(f"{self.name}: signing key generation failed: {type(exc).__name__}") from None
        if private[Attribute.EXTRACTABLE] or not private[Attribute.SENSITIVE]:
            raise VaultError(f"{self.name}: signing key is extractable or not sensitive; refusing it")
        self._sign_key = private
        # EC_POINT: DER OCTET STRING of 04 || X || Y.
        return bytes(public[Attribute.EC_POINT])[-64:]

    def _sign_on_worker(self, digest: bytes) -> bytes:
        from pkcs11 import Mechanism

        self._check_open()
        # CKM_ECDSA over a SHA-256 digest returns r || s, DLMS's encoding.
        return bytes(self._sign_key.sign(digest, mechanism=Mechanism.ECDSA))

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
                    # key || binding is 40-56 bytes: not an AES key length.
                    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
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

    def _unwrap_many_on_worker(
        self, blobs: Sequence[bytes], bound: bool, identities: Sequence[bytes] | None
    ) -> list[bytes]:
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
                    KeyType.GENERIC_SECRET if bound else KeyType.AES,
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
                row = f", {describe(identities[i])}" if identities else ""
                raise VaultError(f"{_INTEGRITY_FAILED}{where} ({type(exc).__name__}{row})") from None
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


def secret_keys_visible_without_login(lib_path: str, token_label: str) -> int:
    """Open a public (not logged-in) session on a token and count the secret
    keys it can see.  Our KEK is a PRIVATE object, so the answer is 0 without
    the PIN (``ami attack hsm`` shows it on a stolen copy of the token)."""
    import pkcs11
    from pkcs11 import ObjectClass

    worker = _get_worker()

    def run() -> int:
        lib = worker.libs.get(lib_path) or pkcs11.lib(lib_path)
        worker.libs[lib_path] = lib
        if not lib.initialized:
            lib.initialize()
        try:
            tok = lib.get_token(token_label=token_label)
            with tok.open() as session:
                return len(list(session.get_objects({pkcs11.Attribute.CLASS: ObjectClass.SECRET_KEY})))
        finally:
            if not any(k[0] == lib_path for k in worker.logins):
                lib.finalize()

    return worker.call(run)


class Pkcs11Signer:
    """ami.protocol.suite1.Signer backed by the token (see Pkcs11KeyVault.signer)."""

    def __init__(self, vault: Pkcs11KeyVault, public: bytes) -> None:
        self._vault = vault
        self._public = public

    def __repr__(self) -> str:
        return f"<Pkcs11Signer {self._vault.name}-sign>"

    def sign(self, data: bytes) -> bytes:
        import hashlib

        return self._vault._worker.call(self._vault._sign_on_worker, hashlib.sha256(bytes(data)).digest())

    def public_key_bytes(self) -> bytes:
        return self._public
