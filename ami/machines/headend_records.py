"""The rows the head-end engine hands to its store, and the snapshot it starts from.

Plain data, shared by the engine (which must not import a database driver)
and every store backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ami.protocol.keys import KeyState, KeyType, SecretBytes


@dataclass(slots=True)
class KeyRow:
    meter: str
    key_type: KeyType
    version: int
    state: KeyState
    created: float
    tx_mark: int = 0
    rx_lowest: int = 0
    key: SecretBytes | None = None  # set when the row is new (to be wrapped)


@dataclass(slots=True)
class SessionRow:
    meter: str
    serial: int
    created: float
    tx_mark: int
    rx_lowest: int
    frames: int
    key: SecretBytes | None = None  # set when the session is new
    deleted: bool = False
    # A pending session was offered in an AARQ that may have reached the meter:
    # kept across a restart so the meter's answer (or traffic) still verifies.
    pending: bool = False
    lan_version: int = 0


@dataclass(slots=True)
class MeterRow:
    meter: str
    system_title: bytes
    concentrator: str
    high_seq: int | None = None
    #: The missing readings as [first, last] runs (inclusive), sorted; stores
    #: pack the list as it is.  A store written before the runs holds a flat
    #: list of seqs: the engine loads both (GapRuns.from_persisted).
    gaps: list[list[int] | int] = field(default_factory=list)
    #: Security suite of the meter's LAN association (0, or 1: ECDSA-signed
    #: ephemeral ECDH) and, in suite 1, its public signing key (X || Y).
    suite: int = 0
    sign_public: bytes | None = None


@dataclass(slots=True)
class Snapshot:
    """Everything the engine needs at start, keys already unwrapped."""

    meters: list[MeterRow]
    keys: list[KeyRow]
    sessions: list[SessionRow]
    #: (meter, key type) -> highest version in the store, EXPIRED rows
    #: included (they are not loaded): a version number is never reused.
    max_versions: dict[tuple[str, KeyType], int] = field(default_factory=dict)


@dataclass(slots=True)
class Commit:
    """One batched transaction's worth of changes."""

    readings: list[tuple] = field(default_factory=list)  # (meter, seq, ts, e, p, u, received)
    keys: list[KeyRow] = field(default_factory=list)
    sessions: list[SessionRow] = field(default_factory=list)
    meters: list[MeterRow] = field(default_factory=list)  # high_seq / gaps updates

    def __bool__(self) -> bool:
        return bool(self.readings or self.keys or self.sessions or self.meters)
