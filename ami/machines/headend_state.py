"""Per-meter state the head-end keeps in memory (the store holds the durable part)."""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import sub

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


_SEQ_MIN, _SEQ_MAX = -(1 << 63), (1 << 63) - 1  # what the typed arrays (and SQLite's INTEGER) hold
_NO_RUNS = ()  # shared by every meter without gaps: its arrays are made on the first gap


class GapRuns:
    """A meter's missing readings as runs: [first, last] (inclusive), each
    with the time it is due (to be asked for, or asked again).

    Memory is O(runs), not O(missing seqs): a 2,880-reading gap is one run
    (24 bytes in three typed arrays) where a map of seq -> due held 2,880
    entries (~240 KB).  Runs are sorted and disjoint; two runs may touch
    (``last + 1 == next first``) when their due times differ (a request
    asked part of a run).  ``bound`` caps their number per meter (see there).
    A meter without gaps holds no arrays at all (they are made on its first
    gap and dropped with its last).
    """

    __slots__ = ("first", "last", "due")

    def __init__(self) -> None:
        self.first: array | tuple = _NO_RUNS
        self.last: array | tuple = _NO_RUNS
        self.due: array | tuple = _NO_RUNS

    @classmethod
    def from_persisted(cls, rows: Iterable, due: float) -> tuple["GapRuns", int]:
        """The runs of a stored gaps column, all due at ``due``, and how many
        seqs did not fit a 64-bit integer (skipped).  Accepts the format of
        before the runs (a flat list of seqs) and the runs' ([first, last]
        pairs), even mixed; the order does not matter."""
        runs, skipped = cls(), 0
        for item in rows:
            if type(item) is int:
                first = last = item
            elif isinstance(item, (list, tuple)) and len(item) == 2 and all(type(x) is int for x in item):
                first, last = item
            else:
                raise ValueError(f"a gaps entry is neither a seq nor a [first, last] pair: {item!r}")
            if first > last:
                raise ValueError(f"a gap run ends before it starts: {item!r}")
            if not runs.add(first, last, due):
                skipped += last - first + 1
        return runs, skipped

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        """Runs, not seqs (``count`` is the seqs)."""
        return len(self.first)

    def __iter__(self) -> Iterator[list[int]]:
        """The persisted form, [first, last] pairs (``persisted``): what
        ``MeterRow.gaps`` holds (``sorted(m.gaps)`` keeps working)."""
        return iter(self.persisted())

    def __contains__(self, seq: int) -> bool:
        return self.find(seq) >= 0

    def find(self, seq: int) -> int:
        """The index of the run holding ``seq``, -1 if none does."""
        k = bisect_right(self.first, seq) - 1
        return k if k >= 0 and self.last[k] >= seq else -1

    def runs(self) -> Iterator[tuple[int, int, float]]:
        """(first, last, due) of every run, in seq order."""
        return zip(self.first, self.last, self.due)

    def count(self) -> int:
        """Missing seqs (those folded in by ``bound`` included)."""
        return sum(self.last) - sum(self.first) + len(self.first)

    def next_due(self) -> float:
        return min(self.due)

    def persisted(self) -> list[list[int]]:
        """[first, last] pairs, touching runs joined (their due times are not
        stored: on load every gap is due after gap_fill_delay_s)."""
        out: list[list[int]] = []
        for first, last in zip(self.first, self.last):
            if out and first == out[-1][1] + 1:
                out[-1][1] = last
            else:
                out.append([first, last])
        return out

    # -- changing ----------------------------------------------------------------

    def add(self, first: int, last: int, due: float) -> bool:
        """Seqs first..last are missing, due at ``due``.  Runs they overlap or
        touch join them (due: the earliest of all).  False (nothing added):
        a seq beyond 64 bits, which no store could hold either."""
        if first < _SEQ_MIN or last > _SEQ_MAX:
            return False
        if not self.first:
            self.first, self.last, self.due = array("q", (first,)), array("q", (last,)), array("d", (due,))
            return True
        if first > self.last[-1] + 1:  # the usual case: a new gap above every other
            self.first.append(first)
            self.last.append(last)
            self.due.append(due)
            return True
        i = bisect_left(self.last, first - 1)  # the first run that ends at first - 1 or later
        j = bisect_right(self.first, last + 1)  # runs [i, j) overlap or touch first..last
        if i < j:
            first = min(first, self.first[i])
            last = max(last, self.last[j - 1])
            due = min(due, min(self.due[i:j]))
        self._replace(i, j, [(first, last, due)])
        return True

    def discard(self, seq: int) -> bool:
        """``seq`` is no longer missing: True if it was (its run shrinks or
        splits in two), False if no run holds it."""
        k = self.find(seq)
        if k < 0:
            return False
        first, last = self.first[k], self.last[k]
        if first == last:
            self._replace(k, k + 1, [])
        elif seq == first:
            self.first[k] = seq + 1  # the usual case: a reply fills a run from its start
        elif seq == last:
            self.last[k] = seq - 1
        else:
            self.last[k] = seq - 1
            self._replace(k + 1, k + 1, [(seq + 1, last, self.due[k])])
        return True

    def set_due(self, first: int, last: int, due: float) -> None:
        """Every missing seq in first..last is due at ``due`` (asked now, to be
        asked again then); the runs crossing a bound split there."""
        i = bisect_left(self.last, first)  # the first run ending at first or later
        j = bisect_right(self.first, last)  # runs [i, j) overlap first..last
        if i >= j:
            return
        pieces: list[tuple[int, int, float]] = []
        if self.first[i] < first:
            pieces.append((self.first[i], first - 1, self.due[i]))
        for k in range(i, j):
            pieces.append((max(self.first[k], first), min(self.last[k], last), due))
        if self.last[j - 1] > last:
            pieces.append((last + 1, self.last[j - 1], self.due[j - 1]))
        # Neighbours ride along so that touching runs of equal due join.
        if i > 0:
            i -= 1
            pieces.insert(0, (self.first[i], self.last[i], self.due[i]))
        if j < len(self.first):
            pieces.append((self.first[j], self.last[j], self.due[j]))
            j += 1
        self._replace(i, j, _join_equal_due(pieces))

    def bound(self, max_runs: int) -> tuple[int, int]:
        """At most ``max_runs`` runs (0: no bound): while there are more, the
        two runs with the fewest readings between them become one, due at
        the later of their times (the earlier would ask a run in flight
        again at once, tick after tick, before its retry time).

        The readings between them, which the head-end holds, are then asked
        again with the run: harmless, the store keeps a (meter, seq) once
        (ON CONFLICT DO NOTHING), but such a reading, coming back, counts
        once more in ``readings_stored`` / ``readings_gap_filled`` (the run
        cannot tell it from a missing one).  Merging the closest runs folds
        in the fewest such readings (none for touching runs), and
        ``gap_fill_coalesce`` asks runs that close in one request anyway.
        Returns (runs merged, held readings folded in)."""
        merged = held = 0
        while 0 < max_runs < len(self.first):
            k = self._closest_pair()
            held += self.first[k + 1] - self.last[k] - 1
            self.last[k] = self.last[k + 1]
            self.due[k] = max(self.due[k], self.due[k + 1])
            del self.first[k + 1], self.last[k + 1], self.due[k + 1]
            merged += 1
        return merged, held

    def _closest_pair(self) -> int:
        """k such that runs k and k + 1 have the fewest seqs between them (the first such)."""
        holes = list(map(sub, self.first[1:], self.last))  # map/min in C: this runs on every gap past the bound
        return holes.index(min(holes))

    def _replace(self, i: int, j: int, runs: list[tuple[int, int, float]]) -> None:
        """Runs [i, j) become ``runs`` (sorted, disjoint); no run left: no arrays."""
        self.first[i:j] = array("q", [r[0] for r in runs])
        self.last[i:j] = array("q", [r[1] for r in runs])
        self.due[i:j] = array("d", [r[2] for r in runs])
        if not self.first:
            self.first = self.last = self.due = _NO_RUNS


def _join_equal_due(runs: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Touching runs with the same due time become one."""
    out: list[tuple[int, int, float]] = []
    for run in runs:
        if out and run[0] == out[-1][1] + 1 and run[2] == out[-1][2]:
            out[-1] = (out[-1][0], run[1], run[2])
        else:
            out.append(run)
    return out


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
    #: The readings missing below ``high_seq``, as runs (gap-fill asks them).
    gaps: GapRuns = field(default_factory=GapRuns)
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
