"""DLMS/COSEM security suite 1 (ECDH-ECDSA-AES-GCM-128-SHA-256), sans-I/O.

Why this module exists: with suite 0 the central system holds every meter's
symmetric keys, so a stolen key store opens all recorded traffic and forges
anything.  Suite 1 adds asymmetric keys (NIST P-256): the head-end keeps only
the meters' *public* keys, and session keys come from an ephemeral ECDH
exchange authenticated by ECDSA signatures.  Traffic recorded today then stays
closed after any later theft of the store, of the KEK or of a meter, because
the ephemeral private keys that produced it no longer exist.

What is here (all on ``cryptography``; no primitive is written by hand):

* the suite-1 security control byte (suite id 1 in bits 0-3) and
  ``Suite1Cipher``: AES-GCM-128 with 12-byte tags exactly as ``Suite0Cipher``
  (AAD = SC || AK), the only difference being the suite nibble, which is in
  the AAD and therefore changes every tag;
* ECDSA P-256 / SHA-256 with the DLMS wire encodings: signatures are raw
  ``r || s`` (64 bytes, never DER), public keys ``X || Y`` (64 bytes, no
  ``04`` prefix).  Signing and key agreement go through two small protocols,
  ``Signer`` and ``EcdhAgreement``, so that a PKCS#11 token can supply its
  own implementation later; ``SoftwareSigner`` and ``SoftwareEcdh`` are the
  in-memory ones;
* the NIST SP 800-56A single-step (concatenation) KDF with SHA-256 and the
  DLMS other-info (AlgorithmID || PartyUInfo || PartyVInfo [|| SuppPubInfo]),
  through ``ConcatKDFHash``;
* the three DLMS key agreement schemes:

  =====================  ===========  ==============================  ===============
  scheme                 DLMS name    Z                               forward secrecy
  =====================  ===========  ==============================  ===============
  C(2e, 0s)              Ephemeral    ECDH(eph_C, eph_S)              yes
                         Unified      (both sides sign their key)
  C(1e, 1s)              One-Pass DH  ECDH(eph_originator,            only against a
                                      static KA key of recipient)     later theft of
                                                                      the originator
  C(0e, 2s)              Static       ECDH(static_C, static_S),       none
                         Unified      freshness from the txid only
  =====================  ===========  ==============================  ===============

* the encodings an association needs: the key_agreement parameter of the
  Security setup object (``01 n (02 02 16 <key_id> 09 81 80 <Q||sig>)*``), the
  One-Pass key-ciphered-data (``Q || sig``), and the bytes HLS mechanism 7
  signs.

The core does no I/O and draws no randomness of its own: ephemeral keys come
from a scalar or from an ``rng(n) -> bytes`` the caller hands in, and
``SoftwareSigner`` uses deterministic ECDSA (RFC 6979), whose nonce is derived
from the key and the message, so signing needs no random source either.

Signed bytes follow the Green Book vectors (tests/protocol/test_suite1.py):
Ephemeral Unified Model signs ``key_id || Q`` (65 bytes), One-Pass DH signs
the bare ``Q`` (64 bytes).  Neither signature covers the peer's challenge or
system title: DLMS binds the titles in the KDF instead, and the key only
serves the association whose titles went into it.  A recorded key_agreement
request can therefore be replayed to a meter (it installs a key nobody but the
original client could compute: a nuisance, not a break); callers should run
key_agreement inside an authenticated association (HLS mechanism 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

from .errors import AuthenticationFailed, MalformedMessage
from .cipher import Suite0Cipher
from .frames import SYSTEM_TITLE_LEN, CipheredApdu, parse_apdu
from .keys import KeyId, SecretBytes
from .security_control import KEY_LEN, SC_AUTH, SC_AUTH_ENC, SC_ENC, check_security_control

__all__ = [
    "aarq_signed_data",
    "AES_GCM_128",
    "AES_GCM_256",
    "AES_WRAP_128",
    "AES_WRAP_256",
    "agree_ephemeral_unified",
    "agree_one_pass_originator",
    "agree_one_pass_recipient",
    "agree_static_unified",
    "answer_association",
    "answer_key_agreement",
    "check_suite1_security_control",
    "CURVE",
    "decode_key_agreement",
    "decode_one_pass_key_data",
    "decode_public_key",
    "decode_signature",
    "EcdhAgreement",
    "encode_key_agreement",
    "encode_one_pass_key_data",
    "encode_public_key",
    "encode_signature",
    "ephemeral_unified_other_info",
    "finish_association",
    "finish_key_agreement",
    "hls7_client_signed_data",
    "hls7_server_signed_data",
    "InvalidPublicKey",
    "kdf",
    "KEY_AGREEMENT_DATA_LEN",
    "KeyAgreementEntry",
    "offer_association",
    "offer_ephemeral_key",
    "OFFER_LEN",
    "one_pass_other_info",
    "other_info",
    "parse_suite1_apdu",
    "PendingKeyAgreement",
    "private_key_from_scalar",
    "PRIVATE_KEY_LEN",
    "PUBLIC_KEY_LEN",
    "read_offer",
    "SC1_AUTH",
    "SC1_AUTH_ENC",
    "SC1_ENC",
    "scalar_from_rng",
    "security_control",
    "SHARED_SECRET_LEN",
    "sign",
    "SIGNATURE_LEN",
    "SignatureInvalid",
    "Signer",
    "SoftwareEcdh",
    "SoftwareSigner",
    "start_key_agreement",
    "static_unified_other_info",
    "Suite1Cipher",
    "SUITE_1",
    "suite_of",
    "verify_signature",
]


class InvalidPublicKey(MalformedMessage):
    """A received public key is not 64 bytes X||Y of a point on P-256.

    Keeps the ``malformed_message`` reason code (errors.ALL_REASONS is the one
    list of reasons the metrics report).
    """


class SignatureInvalid(AuthenticationFailed):
    """An ECDSA signature did not verify (reason code ``auth_failed``)."""


# --- security control byte ----------------------------------------------------

SUITE_1 = 1
_SUITE_MASK = 0x0F
SC1_AUTH = SC_AUTH | SUITE_1  # 0x11: GMAC only
SC1_ENC = SC_ENC | SUITE_1  # 0x21: encryption without tag (refused by default)
SC1_AUTH_ENC = SC_AUTH_ENC | SUITE_1  # 0x31: what our traffic uses


def suite_of(sc: int) -> int:
    """The security suite id of an SC byte (bits 0-3; Gurux wrongly masks 0x03)."""
    return sc & _SUITE_MASK


def security_control(suite: int = SUITE_1, *, authenticated: bool = True, encrypted: bool = True) -> int:
    """Build an SC byte (unicast key set, no compression)."""
    if not 0 <= suite <= _SUITE_MASK:
        raise ValueError("the suite id is 4 bits")
    return suite | (SC_AUTH if authenticated else 0) | (SC_ENC if encrypted else 0)


def check_suite1_security_control(sc: int, *, allow_unauthenticated: bool = False) -> int:
    """Validate a suite-1 SC byte and return its security bits (0x10, 0x20 or 0x30).

    The suite nibble must be 1 (a frame of another suite is refused, as GX-NET
    does); every other bit obeys the suite-0 rules of
    ``security_control.check_security_control``.
    """
    return check_security_control(sc, allow_unauthenticated=allow_unauthenticated, suite=SUITE_1)


class Suite1Cipher(Suite0Cipher):
    """AES-GCM-128 with 12-byte tags under a suite-1 SC (0x31, 0x11).

    ``cipher.Suite0Cipher`` with the suite nibble 1: IV = sender title || IC,
    AAD = SC || AK (|| plaintext for authentication only), the same two-call
    open path.  Works with ``frames.seal_apdu`` (pass
    ``security_control=SC1_AUTH_ENC``) and ``frames.open_apdu``; parse
    received frames with ``parse_suite1_apdu``.
    """

    SUITE = SUITE_1
    __slots__ = ()


def parse_suite1_apdu(data: bytes, *, allow_unauthenticated: bool = False) -> CipheredApdu:
    """``frames.parse_apdu`` for suite-1 frames (same layouts, same strictness)."""
    return parse_apdu(bytes(data), allow_unauthenticated=allow_unauthenticated, suite=SUITE_1)


# --- keys and signatures -----------------------------------------------------------

CURVE = ec.SECP256R1()
PUBLIC_KEY_LEN = 64  # X || Y
SIGNATURE_LEN = 64  # r || s
PRIVATE_KEY_LEN = 32
SHARED_SECRET_LEN = 32  # Z = x-coordinate of the ECDH point
_COORD = 32
#: Order of the P-256 group (FIPS 186-4 D.1.2.3): private scalars are 1..N-1.
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# ECDSA algorithm objects are built when first used, not at import: building
# the deterministic one (and the first sign) loads cryptography's OpenSSL
# backend, which imports ``threading`` for its lock, and importing the core
# must load no such module (tests/protocol/test_no_io.py).
_algorithms: dict[bool, ec.ECDSA] = {}


def _ecdsa(deterministic: bool) -> ec.ECDSA:
    algorithm = _algorithms.get(deterministic)
    if algorithm is None:
        algorithm = _algorithms[deterministic] = ec.ECDSA(hashes.SHA256(), deterministic_signing=deterministic)
    return algorithm

_X962 = serialization.Encoding.X962
_UNCOMPRESSED = serialization.PublicFormat.UncompressedPoint


def encode_public_key(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """DLMS encoding of a P-256 public key: X || Y, 64 bytes, no ``04``."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError("suite 1 keys are P-256")
    return public_key.public_bytes(_X962, _UNCOMPRESSED)[1:]


def decode_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse X || Y (64 bytes) and check the point is on P-256, or raise InvalidPublicKey."""
    if len(data) != PUBLIC_KEY_LEN:
        raise InvalidPublicKey(f"public key must be {PUBLIC_KEY_LEN} bytes, got {len(data)}")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, b"\x04" + bytes(data))
    except ValueError:
        raise InvalidPublicKey("public key is not a point on P-256") from None


def _public(key: ec.EllipticCurvePublicKey | bytes) -> ec.EllipticCurvePublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("suite 1 keys are P-256")
        return key
    return decode_public_key(key)


def encode_signature(der: bytes) -> bytes:
    """DER ECDSA signature -> raw r || s (64 bytes), as DLMS sends it."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")


def decode_signature(raw: bytes) -> bytes:
    """Raw r || s (64 bytes) -> DER, for ``cryptography``'s verify."""
    if len(raw) != SIGNATURE_LEN:
        raise MalformedMessage(f"signature must be {SIGNATURE_LEN} bytes, got {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[:_COORD], "big"), int.from_bytes(raw[_COORD:], "big"))


def private_key_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from its 32-byte big-endian scalar d (1 <= d < n)."""
    if len(scalar) != PRIVATE_KEY_LEN:
        raise ValueError("a P-256 private scalar is 32 bytes")
    d = int.from_bytes(scalar, "big")
    if not 1 <= d < _N:
        raise ValueError("private scalar outside 1..n-1")
    return ec.derive_private_key(d, CURVE)


def scalar_from_rng(rng: Callable[[int], bytes], *, attempts: int = 16) -> bytes:
    """Draw a valid private scalar from the caller's random source.

    Rejection sampling (FIPS 186-4 B.4.2 style): 32 bytes at a time until
    1 <= d < n.  A draw is rejected with probability about 2**-32, so
    ``attempts`` running out means the source is broken (e.g. all zeros).
    """
    for _ in range(attempts):
        raw = bytes(rng(PRIVATE_KEY_LEN))
        if len(raw) != PRIVATE_KEY_LEN:
            raise ValueError("rng returned the wrong number of bytes")
        if 1 <= int.from_bytes(raw, "big") < _N:
            return raw
    raise ValueError("rng gave no valid P-256 scalar: is it broken?")


@runtime_checkable
class Signer(Protocol):
    """Who holds a signing key: software here, a PKCS#11 token later."""

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 over ``data`` (not pre-hashed); raw r || s, 64 bytes."""
        ...

    def public_key_bytes(self) -> bytes:
        """The matching public key, X || Y (64 bytes)."""
        ...


@runtime_checkable
class EcdhAgreement(Protocol):
    """Who holds a key-agreement private key (static or ephemeral)."""

    def exchange(self, peer_public: bytes) -> bytes:
        """Z = x-coordinate of d * Q_peer (32 bytes); raises InvalidPublicKey."""
        ...

    def public_key_bytes(self) -> bytes:
        """Own public key, X || Y (64 bytes)."""
        ...


class _SoftwareKey:
    """A P-256 private key in memory, and its public half as 64 bytes."""

    __slots__ = ("_key", "_public")

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("suite 1 keys are P-256")
        self._key = private_key
        self._public = encode_public_key(private_key.public_key())

    @classmethod
    def from_scalar(cls, scalar: bytes):  # noqa: ANN206 (the subclass)
        return cls(private_key_from_scalar(scalar))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def public_key_bytes(self) -> bytes:
        return self._public


class SoftwareSigner(_SoftwareKey):
    """A ``Signer`` over an in-memory ``cryptography`` private key.

    Deterministic ECDSA (RFC 6979): the nonce comes from the key and the
    message, so the core needs no random source, a broken RNG cannot leak the
    key through a repeated nonce, and signatures are reproducible in tests.
    """

    __slots__ = ()

    def sign(self, data: bytes) -> bytes:
        return encode_signature(self._key.sign(bytes(data), _ecdsa(True)))


class SoftwareEcdh(_SoftwareKey):
    """An ``EcdhAgreement`` over an in-memory private key.

    For an ephemeral key build one per key agreement with ``from_rng`` and
    drop it right after ``exchange``: forward secrecy rests on that.
    """

    __slots__ = ()

    @classmethod
    def from_rng(cls, rng: Callable[[int], bytes]) -> SoftwareEcdh:
        """A fresh (ephemeral) key from the caller's random source."""
        return cls.from_scalar(scalar_from_rng(rng))

    def exchange(self, peer_public: bytes) -> bytes:
        return SecretBytes(self._key.exchange(ec.ECDH(), decode_public_key(peer_public)))


def sign(signer: Signer, data: bytes) -> bytes:
    """``signer.sign(data)``, checked to be 64 bytes (a token must not return DER)."""
    signature = signer.sign(data)
    if len(signature) != SIGNATURE_LEN:
        raise ValueError("a Signer must return raw r || s (64 bytes)")
    return bytes(signature)


def verify_signature(public_key: ec.EllipticCurvePublicKey | bytes, data: bytes, signature: bytes) -> None:
    """Verify ECDSA-SHA256 r || s over ``data``; raise SignatureInvalid (or a
    MalformedMessage subclass for a badly encoded key or signature)."""
    key = _public(public_key)
    der = decode_signature(signature)
    try:
        key.verify(der, bytes(data), _ecdsa(False))
    except InvalidSignature:
        raise SignatureInvalid("ECDSA signature does not verify") from None


# --- KDF (NIST SP 800-56A concatenation KDF, SHA-256) ------------------------------

#: AlgorithmID: DER contents (no 06/len header) of OID 2.16.756.5.8.3.n.
AES_GCM_128 = bytes.fromhex("60857405080300")
AES_GCM_256 = bytes.fromhex("60857405080301")
AES_WRAP_128 = bytes.fromhex("60857405080302")
AES_WRAP_256 = bytes.fromhex("60857405080303")
_MAX_KEY_LEN = 32  # one SHA-256 block: what suite 1 needs (16) and a full hash


def _title(title: bytes) -> bytes:
    if len(title) != SYSTEM_TITLE_LEN:
        raise ValueError("a system title is 8 bytes")
    return bytes(title)


def other_info(algorithm_id: bytes, party_u: bytes, party_v: bytes, supp_pub_info: bytes = b"") -> bytes:
    """OtherInfo = AlgorithmID || PartyUInfo || PartyVInfo || SuppPubInfo.

    DLMS concatenates the bare values, no length prefixes (the transaction-id
    of Static Unified Model carries its own, see ``static_unified_other_info``).
    """
    return bytes(algorithm_id) + bytes(party_u) + bytes(party_v) + bytes(supp_pub_info)


def ephemeral_unified_other_info(client_title: bytes, server_title: bytes, algorithm_id: bytes = AES_GCM_128) -> bytes:
    """C(2e,0s) key_agreement: U = client, V = server, on both sides."""
    return other_info(algorithm_id, _title(client_title), _title(server_title))


def one_pass_other_info(originator_title: bytes, recipient_title: bytes, algorithm_id: bytes = AES_GCM_128) -> bytes:
    """C(1e,1s): U = the originator (who made the ephemeral key), V = the recipient."""
    return other_info(algorithm_id, _title(originator_title), _title(recipient_title))


def static_unified_other_info(
    originator_title: bytes, recipient_title: bytes, transaction_id: bytes, algorithm_id: bytes = AES_GCM_128
) -> bytes:
    """C(0e,2s): AlgorithmID || originator || len || transaction-id || recipient.

    The layout that reproduces the Green Book static-unified key (the fact
    sheet found it by search; how the GB names the sub-fields is unverified).
    """
    if not 1 <= len(transaction_id) < 0x80:
        raise ValueError("transaction-id is 1..127 bytes")
    txid = bytes((len(transaction_id),)) + bytes(transaction_id)
    return other_info(algorithm_id, _title(originator_title), txid, _title(recipient_title))


def kdf(z: bytes, other_info: bytes, length: int = KEY_LEN) -> SecretBytes:
    """K = leftmost ``length`` bytes of SHA-256(00000001 || Z || OtherInfo)."""
    if len(z) != SHARED_SECRET_LEN:
        raise ValueError("Z is 32 bytes for P-256")
    if not 1 <= length <= _MAX_KEY_LEN:
        raise ValueError("one SHA-256 block: 1..32 bytes")
    return SecretBytes(ConcatKDFHash(hashes.SHA256(), length, bytes(other_info)).derive(bytes(z)))


# --- Ephemeral Unified Model: the key_agreement method of Security setup -----------

#: Ephemeral public key || signature: the octet-string of each key_agreement item.
KEY_AGREEMENT_DATA_LEN = PUBLIC_KEY_LEN + SIGNATURE_LEN
_ITEM_HEAD = b"\x02\x02\x16"
_ITEM_OCTETS = b"\x09\x81\x80"
_ITEM_LEN = len(_ITEM_HEAD) + 1 + len(_ITEM_OCTETS) + KEY_AGREEMENT_DATA_LEN
_MAX_ITEMS = 4


@dataclass(frozen=True, slots=True)
class KeyAgreementEntry:
    """One key of a key_agreement request or response.

    ``signature`` is ECDSA by the sender's *signing* key over
    ``key_id || public_key`` (Green Book Table C.1).
    """

    key_id: KeyId
    public_key: bytes  # ephemeral, X || Y
    signature: bytes  # r || s

    @property
    def signed_data(self) -> bytes:
        return bytes((int(self.key_id),)) + self.public_key


def offer_ephemeral_key(key_id: KeyId, ephemeral: EcdhAgreement, signer: Signer) -> KeyAgreementEntry:
    """Sign our ephemeral public key for the key named ``key_id``."""
    key_id = KeyId(key_id)
    public = bytes(ephemeral.public_key_bytes())
    return KeyAgreementEntry(key_id, public, sign(signer, bytes((int(key_id),)) + public))


def encode_key_agreement(entries: Sequence[KeyAgreementEntry]) -> bytes:
    """``array{structure{enum key_id, octet-string(128) Q||sig}}``: request
    parameter and response data of Security setup method key_agreement."""
    if not 1 <= len(entries) <= _MAX_ITEMS:
        raise ValueError("one to four keys per key_agreement")
    out = bytearray((0x01, len(entries)))
    for e in entries:
        if len(e.public_key) != PUBLIC_KEY_LEN or len(e.signature) != SIGNATURE_LEN:
            raise ValueError("public key and signature are 64 bytes each")
        out += _ITEM_HEAD + bytes((int(e.key_id),)) + _ITEM_OCTETS + e.public_key + e.signature
    return bytes(out)


def decode_key_agreement(data: bytes) -> tuple[KeyAgreementEntry, ...]:
    """Strict parse; every public key is checked to be on P-256.

    Signatures are *not* verified here (the decoder does not know the
    sender's key): ``agree_ephemeral_unified`` does that.
    """
    data = bytes(data)
    if len(data) < 2 or data[0] != 0x01:
        raise MalformedMessage("key_agreement data is not an array")
    count = data[1]
    if not 1 <= count <= _MAX_ITEMS or len(data) != 2 + count * _ITEM_LEN:
        raise MalformedMessage("key_agreement array length mismatch")
    entries: list[KeyAgreementEntry] = []
    for i in range(count):
        off = 2 + i * _ITEM_LEN
        if data[off : off + 3] != _ITEM_HEAD or data[off + 4 : off + 7] != _ITEM_OCTETS:
            raise MalformedMessage("key_agreement item is not structure{enum, octet-string(128)}")
        try:
            key_id = KeyId(data[off + 3])
        except ValueError:
            raise MalformedMessage(f"unknown key_id {data[off + 3]}") from None
        body = data[off + 7 : off + _ITEM_LEN]
        decode_public_key(body[:PUBLIC_KEY_LEN])
        entries.append(KeyAgreementEntry(key_id, body[:PUBLIC_KEY_LEN], body[PUBLIC_KEY_LEN:]))
    if len({e.key_id for e in entries}) != count:
        raise MalformedMessage("key_agreement names a key twice")
    return tuple(entries)


def agree_ephemeral_unified(
    ephemeral: EcdhAgreement,
    peer: KeyAgreementEntry,
    peer_signing_key: ec.EllipticCurvePublicKey | bytes,
    *,
    client_title: bytes,
    server_title: bytes,
    algorithm_id: bytes = AES_GCM_128,
) -> SecretBytes:
    """C(2e,0s): verify the peer's signed ephemeral key, then
    K = KDF(ECDH(own ephemeral, peer ephemeral), AlgID, ST_client, ST_server).

    Same call on both sides (the titles are always client then server).
    """
    verify_signature(peer_signing_key, peer.signed_data, peer.signature)
    z = ephemeral.exchange(peer.public_key)
    return kdf(z, ephemeral_unified_other_info(client_title, server_title, algorithm_id))


@dataclass(frozen=True, slots=True)
class PendingKeyAgreement:
    """Client state between request and response: the ephemeral keys.

    Holds private keys: keep it in memory only and drop it once finished.
    """

    ephemerals: dict[KeyId, EcdhAgreement]

    def __repr__(self) -> str:
        return f"<PendingKeyAgreement {sorted(int(k) for k in self.ephemerals)}>"


def start_key_agreement(
    key_ids: Sequence[KeyId], new_ephemeral: Callable[[], EcdhAgreement], signer: Signer
) -> tuple[bytes, PendingKeyAgreement]:
    """Client: the key_agreement request parameter and the state to finish it.

    ``new_ephemeral`` makes one fresh key per key id, e.g.
    ``lambda: SoftwareEcdh.from_rng(rng)`` or a token's ephemeral key pair.
    """
    ephemerals = {KeyId(k): new_ephemeral() for k in key_ids}
    if len(ephemerals) != len(key_ids):
        raise ValueError("a key id appears twice")
    entries = [offer_ephemeral_key(k, e, signer) for k, e in ephemerals.items()]
    return encode_key_agreement(entries), PendingKeyAgreement(ephemerals)


def answer_key_agreement(
    request: bytes,
    new_ephemeral: Callable[[], EcdhAgreement],
    signer: Signer,
    client_signing_key: ec.EllipticCurvePublicKey | bytes,
    *,
    client_title: bytes,
    server_title: bytes,
    algorithm_id: bytes = AES_GCM_128,
) -> tuple[bytes, dict[KeyId, SecretBytes]]:
    """Server (meter): verify the request, derive the keys, build the response.

    Nothing is derived unless every client signature verifies.
    """
    entries = decode_key_agreement(request)
    for e in entries:
        verify_signature(client_signing_key, e.signed_data, e.signature)
    keys: dict[KeyId, SecretBytes] = {}
    answers: list[KeyAgreementEntry] = []
    for e in entries:
        ephemeral = new_ephemeral()
        z = ephemeral.exchange(e.public_key)
        keys[e.key_id] = kdf(z, ephemeral_unified_other_info(client_title, server_title, algorithm_id))
        answers.append(offer_ephemeral_key(e.key_id, ephemeral, signer))
    return encode_key_agreement(answers), keys


def finish_key_agreement(
    response: bytes,
    pending: PendingKeyAgreement,
    server_signing_key: ec.EllipticCurvePublicKey | bytes,
    *,
    client_title: bytes,
    server_title: bytes,
    algorithm_id: bytes = AES_GCM_128,
) -> dict[KeyId, SecretBytes]:
    """Client: verify the server's signed ephemeral keys and derive the same keys."""
    entries = decode_key_agreement(response)
    if {e.key_id for e in entries} != set(pending.ephemerals):
        raise MalformedMessage("key_agreement response does not answer the keys requested")
    return {
        e.key_id: agree_ephemeral_unified(
            pending.ephemerals[e.key_id],
            e,
            server_signing_key,
            client_title=client_title,
            server_title=server_title,
            algorithm_id=algorithm_id,
        )
        for e in entries
    }


# --- One-Pass DH C(1e,1s) and Static Unified Model C(0e,2s) -------------------------


def encode_one_pass_key_data(public_key: bytes, signature: bytes) -> bytes:
    """general-ciphering agreed-key key-ciphered-data: Q || sig over the bare Q."""
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        raise ValueError("public key and signature are 64 bytes each")
    return bytes(public_key) + bytes(signature)


def decode_one_pass_key_data(data: bytes) -> tuple[bytes, bytes]:
    """(ephemeral public key, signature); the key is checked to be on P-256."""
    if len(data) != KEY_AGREEMENT_DATA_LEN:
        raise MalformedMessage(f"one-pass key data must be {KEY_AGREEMENT_DATA_LEN} bytes")
    data = bytes(data)
    decode_public_key(data[:PUBLIC_KEY_LEN])
    return data[:PUBLIC_KEY_LEN], data[PUBLIC_KEY_LEN:]


def agree_one_pass_originator(
    ephemeral: EcdhAgreement,
    signer: Signer,
    recipient_agreement_key: bytes,
    *,
    originator_title: bytes,
    recipient_title: bytes,
    algorithm_id: bytes = AES_GCM_128,
) -> tuple[bytes, SecretBytes]:
    """C(1e,1s), sender side: (key-ciphered-data, K).  Signs the bare Q (GB Table C.2)."""
    public = bytes(ephemeral.public_key_bytes())
    z = ephemeral.exchange(recipient_agreement_key)
    key = kdf(z, one_pass_other_info(originator_title, recipient_title, algorithm_id))
    return encode_one_pass_key_data(public, sign(signer, public)), key


def agree_one_pass_recipient(
    own_static: EcdhAgreement,
    key_data: bytes,
    originator_signing_key: ec.EllipticCurvePublicKey | bytes,
    *,
    originator_title: bytes,
    recipient_title: bytes,
    algorithm_id: bytes = AES_GCM_128,
) -> SecretBytes:
    """C(1e,1s), receiver side: verify the signed ephemeral key, derive K.

    A later theft of the recipient's static key opens these messages: only
    the ephemeral-ephemeral scheme gives full forward secrecy.
    """
    public, signature = decode_one_pass_key_data(key_data)
    verify_signature(originator_signing_key, public, signature)
    z = own_static.exchange(public)
    return kdf(z, one_pass_other_info(originator_title, recipient_title, algorithm_id))


def agree_static_unified(
    own_static: EcdhAgreement,
    peer_agreement_key: bytes,
    *,
    originator_title: bytes,
    recipient_title: bytes,
    transaction_id: bytes,
    algorithm_id: bytes = AES_GCM_128,
) -> SecretBytes:
    """C(0e,2s): K from the two static key-agreement keys and the transaction-id.

    No forward secrecy and no freshness but the transaction-id, which must
    never repeat for a pair of static keys.  Both sides call it with the same
    originator/recipient titles.
    """
    z = own_static.exchange(peer_agreement_key)
    return kdf(z, static_unified_other_info(originator_title, recipient_title, transaction_id, algorithm_id))


# --- HLS mechanism 7 (HLS-ECDSA) ----------------------------------------------------


def hls7_client_signed_data(client_title: bytes, server_title: bytes, stoc: bytes, ctos: bytes) -> bytes:
    """What the client signs for f(StoC): ST_C || ST_S || StoC || CtoS."""
    return _title(client_title) + _title(server_title) + bytes(stoc) + bytes(ctos)


def hls7_server_signed_data(client_title: bytes, server_title: bytes, stoc: bytes, ctos: bytes) -> bytes:
    """What the server signs for f(CtoS): ST_S || ST_C || CtoS || StoC."""
    return _title(server_title) + _title(client_title) + bytes(ctos) + bytes(stoc)


# --- the suite-1 association: HLS-ECDSA with an ephemeral key agreement --------------
#
# Our LAN association in suite 1 (docs/protocol.md, "Suite 1").  DLMS would
# authenticate with HLS-ECDSA (mechanism 7, four passes) and then agree a key
# with Security setup's key_agreement method; we fold both into the AARQ/AARE
# pair, which the head-end already retries and the meter already answers:
#
#   AARQ  mechanism HLS-ECDSA, CtoS = Q_h (the head-end's fresh ephemeral
#         public key, 64 bytes), user-information = IC (4) || sig_h
#         sig_h = ECDSA_h(ST_C || ST_S || IC || CtoS)
#   AARE  StoC = Q_m (the meter's fresh ephemeral public key),
#         user-information = sig_m = ECDSA_m(ST_S || ST_C || CtoS || StoC)
#         (HLS-7's f(CtoS), pass 4)
#   K     = KDF(ECDH(ephemeral, peer ephemeral), AES-GCM-128, U = ST_C, V = ST_S)
#
# Both ephemeral private keys live in RAM for one association and are then
# dropped: no key either side holds later, and nothing in any store, opens a
# recorded session (forward secrecy).  The IC (the head-end's counter under
# its CC_LAN, persisted and checked by the meter like any AARQ's) is our
# addition: the Green Book's signed data (key_id || Q) can be replayed, and a
# replayed offer would make the meter drop its session for one nobody can use.
# sig_m covers CtoS, so an AARE answers exactly one AARQ.

#: The AARQ's user-information in suite 1: IC (4) || signature (64).
OFFER_LEN = 4 + SIGNATURE_LEN


def aarq_signed_data(client_title: bytes, server_title: bytes, invocation_counter: int, ctos: bytes) -> bytes:
    """What the head-end signs in a suite-1 AARQ: ST_C || ST_S || IC || CtoS."""
    return _title(client_title) + _title(server_title) + invocation_counter.to_bytes(4, "big") + bytes(ctos)


def offer_association(
    client_title: bytes, server_title: bytes, invocation_counter: int, ephemeral: EcdhAgreement, signer: Signer
) -> tuple[bytes, bytes]:
    """(CtoS, user-information) of a suite-1 AARQ."""
    ctos = ephemeral.public_key_bytes()
    sig = sign(signer, aarq_signed_data(client_title, server_title, invocation_counter, ctos))
    return ctos, invocation_counter.to_bytes(4, "big") + sig


def read_offer(
    headend_public: ec.EllipticCurvePublicKey | bytes, client_title: bytes, server_title: bytes, ctos: bytes,
    user_information: bytes,
) -> int:
    """The meter's check of a suite-1 AARQ: return its IC once sig_h verifies
    (the caller then applies its receive-counter rule), or raise."""
    if len(user_information) != OFFER_LEN or len(ctos) != PUBLIC_KEY_LEN:
        raise MalformedMessage("suite-1 AARQ offer is IC (4) || signature (64) with a 64-byte CtoS")
    decode_public_key(ctos)  # on the curve, or InvalidPublicKey
    ic = int.from_bytes(user_information[:4], "big")
    verify_signature(headend_public, aarq_signed_data(client_title, server_title, ic, ctos), user_information[4:])
    return ic


def answer_association(
    client_title: bytes, server_title: bytes, ctos: bytes, ephemeral: EcdhAgreement, signer: Signer
) -> tuple[bytes, bytes, SecretBytes]:
    """The meter's (StoC, sig_m, K) for a verified offer."""
    stoc = ephemeral.public_key_bytes()
    sig = sign(signer, hls7_server_signed_data(client_title, server_title, stoc, ctos))
    key = kdf(ephemeral.exchange(ctos), ephemeral_unified_other_info(client_title, server_title))
    return stoc, sig, key


def finish_association(
    meter_public: ec.EllipticCurvePublicKey | bytes, client_title: bytes, server_title: bytes, ctos: bytes,
    stoc: bytes, signature: bytes, ephemeral: EcdhAgreement,
) -> SecretBytes:
    """The head-end's K from the meter's answer, once sig_m verifies over
    this AARQ's CtoS (an AARE for another AARQ fails here)."""
    if len(stoc) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        raise MalformedMessage("suite-1 AARE is StoC (64) with a 64-byte signature")
    verify_signature(meter_public, hls7_server_signed_data(client_title, server_title, stoc, ctos), signature)
    return kdf(ephemeral.exchange(stoc), ephemeral_unified_other_info(client_title, server_title))
