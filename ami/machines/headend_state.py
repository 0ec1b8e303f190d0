"""Per-meter state the head-end keeps in memory (the store holds the durable part)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ami.protocol import Opener, ReceiveCounter, Sealer, SendCounter, Suite0Cipher
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
    ) -> "Session":
        cipher = Suite0Cipher(key, ak)
        return cls(
            serial,
            key,
            created,
            Sealer(cipher, headend_title, tx, GENERAL_DED_CIPHERING),
            Opener(cipher, meter_title, rx),
            frames,
        )

    def rekey_ak(self, ak: bytes) -> None:
        """The AK changed: same session key, new authentication key."""
        cipher = Suite0Cipher(self.key, ak)
        self.sealer.cipher = cipher
        self.opener.cipher = cipher


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


@dataclass(slots=True)
class MeterState:
    meter: str
    title: bytes
    concentrator: str
    keys: dict[KeyType, dict[int, GlobalKey]] = field(default_factory=dict)
    slots: dict[KeyType, KeySlot] = field(default_factory=dict)
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
    reads: dict[int, tuple[str, str]] = field(default_factory=dict)  # request id -> (command id, reply topic)
    # The last retired session key and expired global key of each type, kept
    # (in memory only, bytes not ciphers) to tell a late or stolen-key frame
    # (``expired_key``) from a forgery (``auth_failed``).  Never used to accept.
    expired_session_key: SecretBytes | None = None
    expired_keys: dict[KeyType, GlobalKey] = field(default_factory=dict)

    def key(self, key_type: KeyType, version: int | None = None) -> GlobalKey:
        slot = self.slots[key_type]
        return self.keys[key_type][slot.active if version is None else version]

    @property
    def ak(self) -> SecretBytes:
        return self.key(KeyType.AK).key
