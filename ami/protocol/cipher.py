"""DLMS/COSEM security suite 0: AES-128-GCM with 12-byte tags.

``cryptography``'s fast ``AESGCM`` only verifies full 16-byte tags, and its
``Cipher``/``GCM(min_tag_length=12)`` path is about three times slower per
call.  GCM's keystream does not depend on the direction, so we open a frame
with two calls of the same reusable ``AESGCM`` object:

1. ``encrypt(iv, C)`` XORs C with the keystream, which *is* the decryption
   (its tag is discarded: it covers the wrong text);
2. ``encrypt(iv, P)`` recomputes the genuine ciphertext and its full tag; the
   first 12 bytes are compared in constant time with the tag received.

The plaintext leaves this module only after step 2 verified.  Proven on the
published vectors and on every bit flip in ``tests/protocol/test_cipher.py``.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import AuthenticationFailed, MalformedFrame
from .security_control import (  # noqa: F401  (re-exported)
    IV_LEN,
    KEY_LEN,
    SC_AUTH,
    SC_AUTH_ENC,
    SC_ENC,
    TAG_LEN,
    check_security_control,
)

__all__ = [
    "IV_LEN",
    "KEY_LEN",
    "SC_AUTH",
    "SC_AUTH_ENC",
    "SC_ENC",
    "Suite0Cipher",
    "TAG_LEN",
    "check_security_control",
]


class Suite0Cipher:
    """Seal and open APDU bodies under one (encryption key, AK) pair.

    Build one per key and keep it: constructing ``AESGCM`` costs far more than
    using it.  The object never exposes its keys, and its repr says nothing.
    Suite 1 (``suite1.Suite1Cipher``) is this class with another suite
    nibble in the SC byte: same GCM, same AAD layout.
    """

    SUITE = 0
    __slots__ = ("_gcm", "_ak", "_head_auth_enc", "_head_auth", "_sc_auth_enc", "_sc_auth")

    def __init__(self, encryption_key: bytes, authentication_key: bytes) -> None:
        if len(encryption_key) != KEY_LEN or len(authentication_key) != KEY_LEN:
            raise ValueError(f"suite {self.SUITE} keys are 16 bytes")
        self._gcm = AESGCM(bytes(encryption_key))
        self._ak = bytes(authentication_key)
        # The SCs we accept and their AAD heads (SC || AK), built once per key.
        self._sc_auth_enc = SC_AUTH_ENC | self.SUITE
        self._sc_auth = SC_AUTH | self.SUITE
        self._head_auth_enc = bytes((self._sc_auth_enc,)) + self._ak
        self._head_auth = bytes((self._sc_auth,)) + self._ak

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def _head(self, sc: int) -> bytes:
        if sc == self._sc_auth_enc:
            return self._head_auth_enc
        if sc == self._sc_auth:
            return self._head_auth
        return bytes((sc,)) + self._ak

    def seal(self, sc: int, iv: bytes, plaintext: bytes) -> bytes:
        """Return what follows ``SC || IC`` in the APDU for this SC."""
        bits = check_security_control(sc, suite=self.SUITE)
        head = self._head(sc)
        if bits == SC_AUTH_ENC:
            out = self._gcm.encrypt(iv, plaintext, head)
            return out[: TAG_LEN - 16]  # C || first 12 bytes of the 16-byte tag
        # Authentication only: GMAC over SC || AK || plaintext, text sent clear.
        tag = self._gcm.encrypt(iv, b"", head + plaintext)
        return plaintext + tag[:TAG_LEN]

    def open(self, sc: int, iv: bytes, body: bytes, *, allow_unauthenticated: bool = False) -> bytes:
        """Verify and return the plaintext of an APDU body, or raise."""
        if sc == self._sc_auth_enc:
            # Fast path for the one SC our traffic uses; it passes every
            # check of check_security_control, anything else goes through it.
            bits = SC_AUTH_ENC
        else:
            bits = check_security_control(sc, allow_unauthenticated=allow_unauthenticated, suite=self.SUITE)
            if bits == SC_ENC:
                # Only reachable with allow_unauthenticated (vectors, diagnostics).
                return self._gcm.encrypt(iv, body, b"")[:-16]
        n = len(body) - TAG_LEN
        if n < 0:
            raise MalformedFrame("body shorter than the tag")
        gcm = self._gcm
        if bits == SC_AUTH_ENC:
            head = self._head_auth_enc
            # 1. keystream XOR: C -> P (the tag of this call covers the wrong
            #    text and is dropped, so no AAD is needed for it);
            plaintext = gcm.encrypt(iv, body[:n], None)[:n]
            # 2. recompute C and its genuine tag from P.
            expected = gcm.encrypt(iv, plaintext, head)[n : n + TAG_LEN]
        else:
            plaintext = body[:n]
            expected = gcm.encrypt(iv, b"", self._head(sc) + plaintext)[:TAG_LEN]
        if not hmac.compare_digest(expected, body[n:]):
            raise AuthenticationFailed("GCM tag mismatch")
        return plaintext
