"""Per-meter state the head-end keeps in memory (the store holds the durable part)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ami.machines.handshakes import AssociationState, TransferState
from ami.protocol import Opener, ReceiveCounter, Sealer, SendCounter, Suite0Cipher
from ami.protocol.suite1 import Suite1Cipher, security_control
from ami.protocol.frames import GENERAL_DED_CIPHERING
from ami.protocol.keys import KeySlot, KeyState, KeyType, SecretBytes


@dataclass(slots=True)
class GlobalKey:
    """One version of a long-lived key (CCC, AK, CC_LAN, CC_LOCALE)."""

    version: int
    key: SecretBytes
    state: KeyState
    created: float
    tx: SendCounter  # head-end -> meter under this key (CC_LAN only in practice)
    rx: ReceiveCounter  # meter -> head-end under this key


@dataclass(slots=True)
class Session:
    """A LAN association: the dedicated key and its two counters."""

    serial: int
    key: SecretBytes
    created: float
    sealer: Sealer  # head-end -> meter (DC, head-end title)
    opener: Opener  # meter -> head-end
    frames: int = 0
    expires: float | None = None  # set when it became the previous session
    #: Loaded from the store at start: we may still *open* frames under it,
    #: never seal (a store restored from a backup holds an old send mark: a
    #: frame sealed from it could reuse an IV).  The first downlink need
    #: re-associates instead, which costs one AARQ under the CC_LAN IC clock.
    receive_only: bool = False

    @classmethod
    def build(
        cls,
        serial: int,
        key: SecretBytes,
        ak: bytes,
        created: float,
        headend_title: bytes,
        meter_title: bytes,
        tx: SendCounter,
        rx: ReceiveCounter,
        frames: int = 0,
        suite: int = 0,
    ) -> "Session":
        cipher = cipher_for(suite, key, ak)
        return cls(
            serial,
            key,
            created,
            Sealer(cipher, headend_title, tx, GENERAL_DED_CIPHERING, security_control(suite)),
            Opener(cipher, meter_title, rx),
            frames,
        )

    def rekey_ak(self, ak: bytes) -> None:
        """The AK changed: same session key, new authentication key."""
        cipher = cipher_for(self.sealer.cipher.SUITE, self.key, ak)
        self.sealer.cipher = cipher
        self.opener.cipher = cipher


def cipher_for(suite: int, key: bytes, ak: bytes) -> Suite0Cipher:
    return Suite1Cipher(key, ak) if suite else Suite0Cipher(key, ak)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One AARQ as sent: what a bound AARE (its f(challenge)) proves the meter took."""

    seq: int  # increases with every attempt to this meter (in memory)
    challenge: bytes  # suite 1: our ephemeral public key (CtoS)
    session_key: SecretBytes | None  # suite 1: None (agreed, not sent)
    version: int  # the CC_LAN version the AARQ went under (suite 1: whose counter it used)
    #: Suite 1: our ephemeral key for this AARQ (RAM only, never stored:
    #: forward secrecy); dropped with the attempt.
    ephemeral: object = None

    def __repr__(self) -> str:
        return f"<Attempt {self.seq} cc_lan v{self.version}>"


@dataclass(slots=True)
class PendingAssociation:
    session_key: SecretBytes
    serial: int
    order: list[int]  # CC_LAN versions to try, NEW first (recovery)
    index: int
    sent_at: float
    attempts: int
    reason: str
    offered: list[SecretBytes] = field(default_factory=list)  # earlier offers of this association
    frame: bytes = b""  # the AARQ as sent, retransmitted as is on a timeout
    challenge: bytes = b""  # CtoS of ``frame``
    #: ``frame`` empty: the attempt waits for the CC_LAN IC clock until then.
    held_until: float = 0.0

    @property
    def version(self) -> int:
        return self.order[self.index]


@dataclass(slots=True)
class PendingTransfer:
    request_id: int
    key_type: KeyType
    version: int
    sent_at: float
    attempts: int = 1
    setup: str = ""


@dataclass(slots=True)
class MeterState:
    meter: str
    title: bytes
    concentrator: str
    keys: dict[KeyType, dict[int, GlobalKey]] = field(default_factory=dict)
    slots: dict[KeyType, KeySlot] = field(default_factory=dict)
    suite: int = 0
    sign_public: bytes | None = None
    session: Session | None = None
    previous: Session | None = None
    next_serial: int = 1
    association: PendingAssociation | None = None
    transfer: PendingTransfer | None = None
    wanted_transfers: list[KeyType] = field(default_factory=list)
    high_seq: int | None = None
    gaps: dict[int, float] = field(default_factory=dict)  # seq -> when to ask (again)
    auth_failures: int = 0
    last_aare: bytes = b""  # the AARE that completed the current session
    #: request id -> (command id, reply topic, deadline)
    reads: dict[int, tuple[str, str | None, float]] = field(default_factory=dict)
    assoc_state: AssociationState = AssociationState.IDLE
    transfer_state: TransferState = TransferState.IDLE
    #: The last few AARQs sent (RAM only), newest last, and the one whose key
    #: is the current session: a bound AARE for a newer one moves us there.
    attempts: list[Attempt] = field(default_factory=list)
    installed_attempt: int = 0
    attempt_seq: int = 0
    #: Earliest time an association that unauthenticated input asks for
    #: (a frame no key verifies, a frame under no session) may start.
    next_unverified_trigger: float = 0.0
    cooldown_until: float = 0.0
    #: Highest version ever given to each key type, expired ones included:
    #: a version number is never reused (a late ack names a version).
    version_high: dict[KeyType, int] = field(default_factory=dict)
    # The last retired session key and expired global key of each type, kept
    # (in memory only, bytes not ciphers) to tell a late or stolen-key frame
    # (``expired_key``) from a forgery (``auth_failed``).  Never used to accept.
    expired_session_key: SecretBytes | None = None
    expired_keys: dict[KeyType, GlobalKey] = field(default_factory=dict)
    #: In the engine's queue of meters whose gaps are due and wait for a
    #: free gap-fill slot (Policy.gap_fill_max_in_flight).
    gap_waiting: bool = False

    def key(self, key_type: KeyType, version: int | None = None) -> GlobalKey:
        slot = self.slots[key_type]
        return self.keys[key_type][slot.active if version is None else version]

    @property
    def ak(self) -> SecretBytes:
        return self.key(KeyType.AK).key

    def cipher(self, key: bytes, ak: bytes) -> Suite0Cipher:
        """A cipher of this meter's suite (LAN side)."""
        return cipher_for(self.suite, key, ak)
