"""The head-end's state machine, sans-I/O: frames in, effects out.

``HeadEndEngine`` never touches the network, the disk, the clock or the
random generator: the async shell (``headend/service.py``) hands it WAN
batches, commands and the time, and a ``new_key()`` callable; it returns
effects through ``drain()``: rows to commit and downlink frames, replies and
events to publish.

The one rule the shell must keep: **commit a drained ``Commit`` before
publishing the frames drained with it.**  Counter reservations are confirmed
in memory when a frame is sealed and become durable with that commit; a
frame that never left the process cannot reuse an IV, so sealing before the
commit is safe, publishing before it is not.
"""

from __future__ import annotations

import hmac
import heapq
import math
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ami.machines.headend_records import Commit, KeyRow, MeterRow, SessionRow, Snapshot
from ami.machines.handshakes import (
    ASSOCIATION,
    TRANSFER,
    AssociationEvent,
    AssociationState,
    TransferEvent,
    TransferState,
    advance,
)
from ami.machines.headend_state import (
    Attempt,
    GapRuns,
    GlobalKey,
    MeterState,
    PendingAssociation,
    PendingTransfer,
    Session,
)
from ami.protocol import Opener, ProtocolError, ReceiveCounter, SendCounter, Suite0Cipher, suite1, topics
from ami.protocol.association import (
    AARE_TAG,
    CHALLENGE_LEN,
    MECHANISM_HLS_ECDSA,
    InitiateRequest,
    build_aarq,
    decode_initiate_response,
    encode_initiate_request,
    parse_aare,
    verify_hls_gmac,
)
from ami.protocol.counters import IC_LIMIT
from ami.protocol.errors import (
    AuthenticationFailed,
    ExpiredKey,
    KeyLifecycleError,
    MalformedFrame,
    MalformedMessage,
    ReplayedFrame,
    UnknownKey,
    UnknownMeter,
    UnsupportedSecurity,
    WrongSegment,
)
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    GLO_INITIATE_RESPONSE,
    CipheredApdu,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from ami.protocol.keys import (
    TRANSFER_TARGET,
    KeySlot,
    KeyState,
    KeyType,
    SecretBytes,
    encode_key_transfer,
    key_check_value,
)
from ami.protocol.messages import (
    Event,
    GapFillReply,
    GapFillRequest,
    KeyTransfer,
    KeyTransferAck,
    Reading,
    ReadReply,
    ReadRequest,
    Release,
    decode_batch,
    decode_message,
    encode_message,
)

GLOBAL_TYPES = (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)
ROTATABLE = {"session", "cc_lan", "cc_locale", "ak"}
_MAX_READS_PER_METER = 8
_GAP_CHUNK = 256  # seqs per GapFillRequest: a reply of 256 readings fits MAX_APDU_SIZE in chunks


@dataclass(slots=True)
class Policy:
    """Knobs from ``[headend]`` in the configuration.  A default here equals the
    packaged ami/runtime/default.toml (tests/test_config.py checks it)."""

    session_max_frames: int = 20000
    session_max_age_s: float = 120.0
    session_renew_at_ic: int = 0xF000_0000
    global_key_max_age_s: float = 0.0
    association_timeout_s: float = 10.0
    #: Associations in flight at once; more wait in a queue (boot storms,
    #: fleet-wide renewals) so that round trips stay below the timeout.
    max_pending_associations: int = 2000
    #: Associations in flight are admitted through a window that adapts to
    #: what the path can finish (TCP's AIMD): it starts here, grows by one
    #: per association answered, and halves (not below the minimum, at most
    #: once per association timeout) when one times out.  A broker that
    #: carries a few thousand messages/s (amqtt) then gets the boot storm at
    #: the pace it can take, instead of 2,000 AARQs, timeouts and resends.
    association_window_start: int = 64
    association_window_min: int = 8
    #: Gap-fill requests sent per tick, all meters together.
    max_gap_requests_per_tick: int = 2000
    #: Gap-fill requests unanswered at once, all meters together: a request
    #: holds its slot until a reply naming it arrives or gap_fill_retry_s
    #: passes, so gap-fill asks no faster than the fleet answers (its replies
    #: beyond the fleet's budget are shed and would only be asked again).
    #: 0: no bound in flight (only max_gap_requests_per_tick).
    gap_fill_max_in_flight: int = 512
    #: Two due ranges of a meter separated by at most this many readings the
    #: head-end already holds are asked in one request (0: exact ranges).
    gap_fill_coalesce: int = 16
    association_max_attempts: int = 8
    transfer_timeout_s: float = 10.0
    transfer_max_attempts: int = 5
    gap_fill_delay_s: float = 3.0
    gap_fill_retry_s: float = 10.0
    gap_fill_window: int = 2880
    #: Runs of missing readings kept per meter (24 bytes a run: a meter at
    #: the bound holds ~1.9 KB, 20,000 of them ~38 MB).  Beyond it the two
    #: closest runs become one: the readings between them are asked again
    #: and the store ignores the duplicates (GapRuns.bound).  0: no bound.
    gap_fill_max_runs: int = 64
    previous_session_grace_s: float = 60.0
    counter_block: int = 4096
    max_events_per_s: int = 200
    #: The CC_LAN "IC clock": an AARQ sent at time t carries an IC of at most
    #: rate * (t - key created) + burst.  On start every CC_LAN send mark
    #: jumps to that ceiling, so a store restored from a backup (whose marks
    #: are behind what was really used) still never reuses an IV.
    cc_lan_ic_per_s: float = 16.0
    cc_lan_ic_burst: int = 64
    #: Renew CC_LAN (our counters) on counter grounds past this value.
    global_renew_at_ic: int = 0xF000_0000
    #: Per meter, at most one association per this many seconds may be asked
    #: for by input no key verifies (forged frames must not cause work).
    unverified_trigger_interval_s: float = 60.0
    #: After ``association_max_attempts`` failed rounds: wait, then start over.
    association_cooldown_s: float = 300.0
    #: An on-demand read with no reply after this long is answered "timeout".
    read_timeout_s: float = 30.0

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "Policy":
        known = {k: section[k] for k in cls.__slots__ if k in section}  # type: ignore[attr-defined]
        return cls(**known)


@dataclass(slots=True)
class Campaign:
    """A rotation asked for by a command: done when every meter has it."""

    command_id: str
    key: str
    reply: str | None
    started: float
    remaining: set[str]
    total: int
    failed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Effects:
    commit: Commit
    downlink: dict[str, list[tuple[str, bytes]]]
    replies: list[tuple[str, dict]]
    events: list[dict]
    latencies_ns: list[int]


def _suite_of_general_frame(data: bytes) -> int:
    """The suite nibble of a DB/DC frame's SC (tag | 08 | title | length | SC),
    0 for anything else (parse_apdu then judges it)."""
    if len(data) < 13 or data[0] not in _GENERAL or data[1] != 8:
        return 0
    n = data[10]
    pos = 11 if n < 0x80 else 11 + (n & 0x7F)
    return data[pos] & 0x0F if pos < len(data) else 0


_GENERAL = frozenset({GENERAL_GLO_CIPHERING, GENERAL_DED_CIPHERING})
_DC = bytes((GENERAL_DED_CIPHERING,))


def _gap_ranges(gaps: GapRuns, now: float, coalesce: int) -> list[list[int]]:
    """The [first, last] ranges to ask for: every run of due gaps, at most
    _GAP_CHUNK seqs each.

    With ``coalesce`` > 0, ranges whose hole holds at most that many readings
    already stored become one, and gaps not yet due that fall within such a
    span (or touch it) ride along: after an overload a meter has many
    one-reading gaps, detected at different moments, and one request and one
    reply frame for the span cost far less, on both sides and on the relays,
    than one each.  The readings held already come back as duplicates
    (ignored, never stored twice); a gap asked before its delay at worst
    crosses its own late frame.  Only ranges holding a due gap are asked.

    Works on the runs, not on each seq: O(runs + chunks) per meter.
    """
    reach = 1 + max(coalesce, 0)
    ranges: list[list] = []  # [first, last, holds a due gap]
    for first, last, when in gaps.runs():
        due = when <= now
        if coalesce <= 0 and not due:
            continue
        while first <= last:  # the run, chunk by chunk (a seq joins the range before it if close enough)
            cur = ranges[-1] if ranges else None
            if cur is not None and first - cur[1] <= reach and first - cur[0] < _GAP_CHUNK:
                end = min(last, cur[0] + _GAP_CHUNK - 1)
                cur[1] = end
                cur[2] = cur[2] or due
            else:
                end = min(last, first + _GAP_CHUNK - 1)
                ranges.append([first, end, due])
            first = end + 1
    return [[first, last] for first, last, due in ranges if due]


class HeadEndEngine:
    def __init__(
        self,
        headend_title: bytes,
        policy: Policy,
        new_key: Callable[[], bytes],
        signer: suite1.Signer | None = None,
    ) -> None:
        """``new_key()`` is the random source (16 fresh bytes a call);
        ``signer`` signs our suite-1 AARQs (a file key or a PKCS#11 token)."""
        self.title = headend_title
        self.policy = policy
        self._new_key = new_key
        self._signer = signer
        self.meters: dict[str, MeterState] = {}
        self.by_title: dict[bytes, MeterState] = {}
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.campaigns: dict[str, Campaign] = {}
        self._gap_meters: set[str] = set()
        self._gap_heap: list[tuple[float, str]] = []  # (when some gap of the meter is due, meter)
        #: Gap-fill requests unanswered: request id -> (meter, retry time); at
        #: most Policy.gap_fill_max_in_flight.  Their timeouts, in a heap.
        self._gap_inflight: dict[int, tuple[str, float]] = {}
        self._gap_timeouts: list[tuple[float, int]] = []
        self._gap_ready: deque[str] = deque()  # due meters waiting for a free slot (FIFO)
        self._associating = 0  # meters with an association in flight
        p0 = self.policy
        self._assoc_window = float(max(1, min(p0.association_window_start, p0.max_pending_associations)))
        self._assoc_window_cut_at = -math.inf
        self._waiting: dict[str, str] = {}  # meters queued for an association -> reason (FIFO)
        self._pending_meters: set[str] = set()  # association or transfer in flight
        self._age_heap: list[tuple[float, str, int]] = []
        self._reset_outputs()
        self._event_window = (0, 0)  # (second, events in it)
        self._campaign_done: list[Campaign] = []
        # (not before, meter, reason): QUEUED, held by a rate limit or the IC clock
        self._later: list[tuple[float, str, str]] = []
        self._cooling: list[tuple[float, str, str]] = []  # (until, meter, why): COOLING_DOWN
        self._reads_heap: list[tuple[float, str, int]] = []  # (deadline, meter, request id)

    # -- gauges ----------------------------------------------------------------

    @property
    def meters_pending(self) -> int:
        """Meters with an association or a key transfer in flight."""
        return len(self._pending_meters)

    @property
    def meters_with_gaps(self) -> int:
        """Meters with at least one missing reading still to fetch."""
        return len(self._gap_meters)

    @property
    def publish_pending(self) -> bool:
        """Something drained now would have to be published (downlink frames,
        replies, events).  False: what waits is only rows to commit, and a
        shell may let them gather over a few rounds before it drains."""
        return bool(self._downlink or self._replies or self._events or self._campaign_done)

    @property
    def readings_pending(self) -> int:
        """Readings handled since the last drain (not yet handed to a store)."""
        return len(self._readings)

    @property
    def latencies_pending(self) -> int:
        """Latency samples since the last drain (``Effects.latencies_ns`` so far)."""
        return len(self._latencies)

    @property
    def association_window(self) -> int:
        """Associations that may be in flight now (the adaptive window)."""
        return int(self._assoc_window)

    def _cut_association_window(self, now: float) -> None:
        """An association timed out: the path is overloaded, halve the window
        (once per timeout period: the timeouts of one overload come in a burst)."""
        p = self.policy
        if now - self._assoc_window_cut_at < p.association_timeout_s:
            return
        self._assoc_window_cut_at = now
        floor = float(max(1, min(p.association_window_min, p.max_pending_associations)))
        self._assoc_window = max(floor, self._assoc_window / 2)
        self.counters["association_window_cuts"] += 1

    @property
    def gap_fill_in_flight(self) -> int:
        """Gap-fill requests sent and not yet answered nor timed out."""
        return len(self._gap_inflight)

    # -- outputs --------------------------------------------------------------

    def _reset_outputs(self) -> None:
        self._readings: list[tuple] = []
        self._dirty_keys: set[tuple[str, KeyType, int]] = set()
        self._new_keys: set[tuple[str, KeyType, int]] = set()
        self._dirty_sessions: set[str] = set()
        self._new_sessions: set[str] = set()
        self._deleted_sessions: set[str] = set()
        self._dirty_pending: set[str] = set()
        self._dirty_meters: set[str] = set()
        self._downlink: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self._replies: list[tuple[str, dict]] = []
        self._events: list[dict] = []
        self._latencies: list[int] = []
        self._expired_rows: list[KeyRow] = []

    def drain(self) -> Effects:
        """Everything produced since the last drain.  Commit first, then publish."""
        commit = Commit(readings=self._readings, keys=self._expired_rows)
        for mid, kt, version in self._dirty_keys:
            m = self.meters[mid]
            gk = m.keys[kt].get(version)
            if gk is None:
                continue
            commit.keys.append(
                KeyRow(
                    mid,
                    kt,
                    version,
                    gk.state,
                    gk.created,
                    gk.tx.reserved_until,
                    gk.rx.lowest_acceptable,
                    gk.key if (mid, kt, version) in self._new_keys else None,
                )
            )
        for mid in self._deleted_sessions:
            if self.meters[mid].session is None:
                commit.sessions.append(SessionRow(mid, 0, 0.0, 0, 0, 0, deleted=True))
        meters = self.meters
        new_sessions = self._new_sessions
        add_session = commit.sessions.append
        for mid in self._dirty_sessions:
            m = meters[mid]
            s = m.session
            if s is None or m.suite:
                # Suite 1: the session key is never stored (forward secrecy):
                # after a restart the meter re-associates.
                continue
            add_session(
                SessionRow(
                    mid,
                    s.serial,
                    s.created,
                    s.sealer.counter.reserved_until,
                    s.opener.counter.lowest_acceptable,
                    s.frames,
                    s.key if mid in new_sessions else None,
                )
            )
        for mid in self._dirty_pending:
            pa = self.meters[mid].association
            if pa is not None and pa.session_key is None:
                continue  # suite 1: nothing to restore (the ephemeral key is RAM only)
            if pa is None:
                commit.sessions.append(SessionRow(mid, 0, 0.0, 0, 0, 0, deleted=True, pending=True))
            else:
                commit.sessions.append(
                    SessionRow(mid, pa.serial, pa.sent_at, 0, 0, 0, pa.session_key, pending=True,
                               lan_version=pa.version)
                )
        add_meter = commit.meters.append
        for mid in self._dirty_meters:
            m = meters[mid]
            gaps = m.gaps
            add_meter(MeterRow(mid, m.title, m.concentrator, m.high_seq, sorted(gaps) if gaps else []))
        effects = Effects(commit, dict(self._downlink), self._replies, self._events, self._latencies)
        self._reset_outputs()
        return effects

    def _event(self, kind: str, **fields: Any) -> None:
        self._events.append({"kind": kind, **fields})

    def _reject(self, reason: str, now: float, **fields: Any) -> None:
        self.rejected[reason] += 1
        self.counters["frames_rejected"] += 1
        second = int(now)
        window, count = self._event_window
        if window != second:
            window, count = second, 0
        if count < self.policy.max_events_per_s:
            self._event("rejected", reason=reason, **fields)
        else:
            self.counters["events_suppressed"] += 1
        self._event_window = (window, count + 1)

    def _send(self, m: MeterState, apdu: bytes) -> None:
        self._downlink[m.concentrator].append((m.meter, apdu))
        self.counters["frames_down"] += 1

    def _next_request_id(self) -> int:
        """A random 62-bit id: ids never repeat across restarts (a counter
        restarting at 1 let an ack held back over a restart name another
        request).  Acks are matched on what they name anyway (key type,
        version, check value); the id only pairs replies with commands."""
        return int.from_bytes(self._new_key()[:8], "big") >> 2

    def _random(self, n: int) -> bytes:
        return b"".join(self._new_key() for _ in range(-(-n // 16)))[:n]

    def _assoc(self, m: MeterState, event: AssociationEvent) -> None:
        m.assoc_state = advance(ASSOCIATION, m.assoc_state, event)  # type: ignore[assignment]

    def _xfer(self, m: MeterState, event: TransferEvent) -> None:
        m.transfer_state = advance(TRANSFER, m.transfer_state, event)  # type: ignore[assignment]

    # -- start-up ---------------------------------------------------------------

    def load(self, snapshot: Snapshot, now: float) -> None:
        block = self.policy.counter_block
        for row in snapshot.meters:
            m = MeterState(row.meter, row.system_title, row.concentrator, high_seq=row.high_seq, suite=row.suite,
                           sign_public=row.sign_public)
            if m.suite and m.sign_public is None:
                raise ValueError(f"{m.meter} is a suite-1 meter without a public signing key in the store")
            if row.gaps:
                self._load_gaps(m, row.gaps, now)
            for kt in GLOBAL_TYPES:
                m.keys[kt] = {}
                m.slots[kt] = KeySlot()
            self.meters[m.meter] = m
            self.by_title[m.title] = m
        for (mid, kt), version in snapshot.max_versions.items():
            if mid in self.meters:
                m = self.meters[mid]
                m.version_high[kt] = max(m.version_high.get(kt, 0), version)
        for k in snapshot.keys:
            m = self.meters[k.meter]
            tx_mark = k.tx_mark
            if k.key_type in (KeyType.CC_LAN, KeyType.CCC):
                # (CCC: its counter numbers suite-1 AARQs, see _aarq_counter_key.)
                # A store restored from a backup, or a copy, holds send marks
                # behind what was really used: jump past every value the IC
                # clock allowed before now (Policy.cc_lan_ic_per_s).
                tx_mark = max(tx_mark, min(IC_LIMIT, self._ic_ceiling(k.created, now) + 1))
            m.keys[k.key_type][k.version] = GlobalKey(
                k.version, k.key, k.state, k.created, SendCounter(tx_mark, block=block), ReceiveCounter(k.rx_lowest)
            )
            m.version_high[k.key_type] = max(m.version_high.get(k.key_type, 0), k.version)
            slot = m.slots[k.key_type]
            if k.state is KeyState.ACTIVE:
                slot.active = k.version
            elif k.state is KeyState.NEW:
                slot.new = k.version
        for s in snapshot.sessions:
            m = self.meters[s.meter]
            if s.pending:
                self._restore_pending(m, s, now)
                continue
            m.session = Session.build(
                s.serial,
                s.key,
                m.ak,
                s.created,
                self.title,
                m.title,
                SendCounter(s.tx_mark, block=block),
                ReceiveCounter(s.rx_lowest),
                s.frames,
            )
            m.session.receive_only = True
            m.next_serial = max(m.next_serial, s.serial + 1)
            self._schedule_age(m, m.session)
        self.counters["meters"] = len(self.meters)
        for m in self.meters.values():
            # A key change interrupted by our stop: finish it (or roll it back)
            # now, not at some later renewal.  An association tries a NEW
            # CC_LAN first; a NEW AK or CC_LOCALE is sent again (same version,
            # same bytes: a meter that took it just acks again).
            pending = [kt for kt in (KeyType.AK, KeyType.CC_LOCALE) if m.slots[kt].new is not None]
            for kt in pending:
                if kt not in m.wanted_transfers:
                    m.wanted_transfers.append(kt)
            if pending or m.slots[KeyType.CC_LAN].new is not None:
                self.counters["key_changes_resumed"] += 1
                self._associate(m, now, "resume_key_change")

    def _restore_pending(self, m: MeterState, row: SessionRow, now: float) -> None:
        """An AARQ was in flight when we stopped: the meter may have taken its
        key, so keep it as the association in progress (its answer, or traffic
        under it, completes the association; else it times out and retries)."""
        order = m.slots[KeyType.CC_LAN].try_order()
        if row.lan_version not in order:
            return  # its CC_LAN expired since: that AARQ can no longer matter
        order = [row.lan_version] + [v for v in order if v != row.lan_version]
        # No frame to resend (frame empty, held_until inf): its timeout
        # brings the next attempt, with a fresh key (never offer one twice).
        m.association = PendingAssociation(row.key, row.serial, order, 0, now, 1, "restored", held_until=math.inf)
        self._assoc(m, AssociationEvent.WANTED)
        self._assoc(m, AssociationEvent.ADMITTED)
        self._associating += 1
        m.next_serial = max(m.next_serial, row.serial + 1)
        self._pending_meters.add(m.meter)

    def _load_gaps(self, m: MeterState, stored: list, now: float) -> None:
        """A meter's stored gaps, all due after gap_fill_delay_s: [first, last]
        runs, or (a store written before the runs) a flat list of seqs."""
        due = now + self.policy.gap_fill_delay_s
        try:
            m.gaps, skipped = GapRuns.from_persisted(stored, due)
        except ValueError as exc:
            raise ValueError(f"{m.meter}: {exc}") from None
        self.counters["readings_unrecoverable"] += skipped  # beyond 64 bits: no store holds them either
        self._bound_gaps(m)
        if m.gaps:
            self._gap_meters.add(m.meter)
            heapq.heappush(self._gap_heap, (due, m.meter))

    # -- uplink ---------------------------------------------------------------

    def handle_batch(self, payload: bytes, now: float, wan_concentrator: str | None = None) -> None:
        try:
            batch = decode_batch(payload)
        except ProtocolError as exc:
            self._reject(exc.reason, now, where="wan_batch", concentrator=wan_concentrator)
            return
        if wan_concentrator is not None and batch.concentrator != wan_concentrator:
            self._reject(WrongSegment.reason, now, where="wan_batch", concentrator=wan_concentrator)
            return
        counters = self.counters
        counters["batches"] += 1
        conc = batch.concentrator
        # The hot path, inline: a suite-0 meter's frame under its one current
        # session, a reading that follows the last one.  Exactly what
        # handle_frame does for it, without its dispatch; anything else (or
        # a frame that fails to parse or open here, which changes nothing)
        # goes through handle_frame.
        by_title = self.by_title
        readings = self._readings
        latencies = self._latencies
        dirty_sessions = self._dirty_sessions
        dirty_meters = self._dirty_meters
        now_ns = int(now * 1e9)
        up = accepted = stored = 0
        try:
            for label, data in batch.frames:
                m = by_title.get(data[2:10]) if data[:1] == _DC else None
                if (
                    m is None
                    or m.suite
                    or m.previous is not None
                    or (s := m.session) is None
                    or m.concentrator != conc
                    or m.meter != label
                ):
                    self.handle_frame(conc, label, data, now)
                    continue
                try:
                    plaintext = s.opener.open(parse_apdu(data))
                except ProtocolError:
                    # Nothing moved (the counter moves only once the tag
                    # verified): the general path judges and names it.
                    self.handle_frame(conc, label, data, now)
                    continue
                up += 1
                s.frames += 1
                m.auth_failures = 0
                mid = m.meter
                dirty_sessions.add(mid)
                accepted += 1
                try:
                    msg = decode_message(plaintext)
                    if type(msg) is Reading and (high := m.high_seq) is not None and msg.seq == high + 1:
                        m.high_seq = msg.seq
                        dirty_meters.add(mid)
                        readings.append((mid, msg.seq, msg.ts, msg.energy_wh, msg.power_w, msg.voltage_dv, now))
                        stored += 1
                        if msg.sealed_ns is not None:
                            latencies.append(now_ns - msg.sealed_ns)
                        self._check_renewal(m, s, now)
                    else:
                        self._on_session_message(m, s, msg, now)
                except ProtocolError as exc:
                    self._reject(exc.reason, now, meter=mid, concentrator=conc, detail=exc.detail)
        finally:
            counters["frames_up"] += up
            counters["frames_accepted"] += accepted
            counters["readings_stored"] += stored

    def handle_frame(self, concentrator: str, label: str, data: bytes, now: float) -> None:
        self.counters["frames_up"] += 1
        m: MeterState | None = None
        try:
            if data[:1] == bytes((AARE_TAG,)):
                aare = parse_aare(data)
                m = self._meter_for(aare.responding_title, concentrator, label)
                self._on_aare(m, aare, now, data)
                return
            if _suite_of_general_frame(data):
                # A suite-1 frame, which only a suite-1 meter may send.
                m = self._meter_for(bytes(data[2:10]), concentrator, label)
                apdu = parse_apdu(data, suite=m.suite)
            else:
                apdu = parse_apdu(data)
            if apdu.system_title is None:
                raise MalformedFrame("uplink APDU without system title")
            if m is None:
                m = self._meter_for(apdu.system_title, concentrator, label)
                if m.suite:
                    raise UnsupportedSecurity("a suite-1 meter's frame under suite 0 (a downgrade)")
            if apdu.tag == GENERAL_DED_CIPHERING:
                self._on_session_frame(m, apdu, now)
            elif apdu.tag == GENERAL_GLO_CIPHERING:
                self._on_global_frame(m, apdu, now)
            else:
                raise MalformedFrame(f"unexpected uplink APDU {apdu.tag:#04x}")
        except ProtocolError as exc:
            self._reject(
                exc.reason,
                now,
                meter=m.meter if m else None,
                concentrator=concentrator,
                detail=exc.detail,
            )

    def _meter_for(self, title: bytes, concentrator: str, label: str) -> MeterState:
        m = self.by_title.get(title)
        if m is None:
            raise UnknownMeter("no meter with this system title")
        if m.concentrator != concentrator:
            # A relay forwarding for a meter that is not on its segment.
            raise WrongSegment(f"{m.meter} is not served by {concentrator}")
        if label != m.meter:
            raise MalformedFrame("PLC topic and system title name different meters")
        return m

    def _on_session_frame(self, m: MeterState, apdu: CipheredApdu, now: float) -> None:
        session, plaintext = self._open_session(m, apdu, now)
        session.frames += 1
        m.auth_failures = 0
        if session is m.session:
            self._dirty_sessions.add(m.meter)
        self.counters["frames_accepted"] += 1
        self._on_session_message(m, session, decode_message(plaintext), now)

    def _on_session_message(self, m: MeterState, session: Session, msg: Any, now: float) -> None:
        """A message that verified under ``session`` (counter already moved)."""
        if isinstance(msg, Reading):
            self._on_reading(m, msg, now)
        elif isinstance(msg, GapFillReply):
            self._on_gap_fill_reply(m, msg, now)
        elif isinstance(msg, ReadReply):
            self._on_read_reply(m, msg)
        elif isinstance(msg, KeyTransferAck):
            self._on_transfer_ack(m, msg, now)
        elif isinstance(msg, Event):
            self._on_event(m, msg, now)
        elif isinstance(msg, Release):
            self._drop_session(m)
            self._event("session_released", meter=m.meter, reason=msg.reason)
        else:
            raise MalformedMessage(f"{type(msg).__name__} is not an uplink message")
        if session is m.session:
            self._check_renewal(m, session, now)

    def _open_session(self, m: MeterState, apdu: CipheredApdu, now: float) -> tuple[Session, bytes]:
        if m.previous is not None and m.previous.expires is not None and now > m.previous.expires:
            m.expired_session_key = m.previous.key
            m.previous = None
        candidates = [s for s in (m.session, m.previous) if s is not None]
        replay = False
        for s in candidates:
            try:
                return s, s.opener.open(apdu)
            except ReplayedFrame:
                # Below this session's floor: a replay only if it verifies
                # under this session.  A frame under another key (a session
                # the meter took while we missed its AARE) restarts at IC 0:
                # it must reach the probes below, not be called a replay.
                try:
                    open_apdu(s.opener.cipher, apdu, s.opener.sender_title)
                except AuthenticationFailed:
                    continue
                replay = True
            except AuthenticationFailed:
                pass
        pa = m.association
        if pa is not None and not replay:
            # Traffic under the key we offered proves the meter took it, even
            # if its AARE is late or was lost (e.g. across our restart).
            for key in (pa.session_key, *reversed(pa.offered)) if pa.session_key is not None else ():
                probe = Opener(Suite0Cipher(key, m.ak), m.title, ReceiveCounter(0))
                try:
                    plaintext = probe.open(apdu)
                except (AuthenticationFailed, ReplayedFrame):
                    continue
                self.counters["associations_inferred"] += 1
                pa.session_key = key
                self._install_session(m, pa, now)
                m.session.opener.counter = probe.counter
                return m.session, plaintext
        if not candidates:
            if self._verifies_under_expired_session(m, apdu):
                raise ExpiredKey("frame under a session that has ended")
            # We hold no session (forgot it, or the meter never associated):
            # associate, and reject this frame; gap-fill recovers its reading.
            self._associate(m, now, "no_session", unverified=True)
            raise UnknownKey("no session with this meter")
        # Recovery: the meter may have taken a NEW AK whose ack we never got.
        slot = m.slots[KeyType.AK]
        if slot.new is not None and not replay:
            new_ak = m.keys[KeyType.AK][slot.new].key
            for s in candidates:
                probe = Opener(m.cipher(s.key, new_ak), m.title, s.opener.counter)
                try:
                    plaintext = probe.open(apdu)
                except (AuthenticationFailed, ReplayedFrame):
                    continue
                self._activate(m, KeyType.AK, slot.new, now, recovered=True)
                return s, plaintext
        if replay:
            raise ReplayedFrame("invocation counter not above the last accepted")
        m.auth_failures += 1
        if m.auth_failures >= 3:
            # Sessions out of step (an association answer lost at the wrong
            # moment): a fresh association puts both sides on one key again.
            m.auth_failures = 0
            self._associate(m, now, "auth_failures", unverified=True)
        if self._verifies_under_expired_session(m, apdu):
            raise ExpiredKey("frame under a session that has ended")
        raise AuthenticationFailed("no session key of this meter verifies the frame")

    def _verifies_under_expired_session(self, m: MeterState, apdu: CipheredApdu) -> bool:
        """Only to name a rejection: does the frame verify under the session
        that ended last?  (A frame delayed past the grace period, or a meter
        out of step.)  Never accepted, never moves a counter."""
        if m.expired_session_key is None:
            return False
        return self._verifies(m, m.expired_session_key, apdu)

    def _verifies(self, m: MeterState, key: bytes, apdu: CipheredApdu) -> bool:
        aks = [gk.key for gk in m.keys[KeyType.AK].values()]
        if KeyType.AK in m.expired_keys:
            aks.append(m.expired_keys[KeyType.AK].key)
        for ak in aks:
            try:
                open_apdu(m.cipher(key, ak), apdu, m.title)
            except AuthenticationFailed:
                continue
            return True
        return False

    def _on_global_frame(self, m: MeterState, apdu: CipheredApdu, now: float) -> None:
        """A DB frame under CC_LAN: the meter's boot (or push) events."""
        plaintext = self._open_global(m, KeyType.CC_LAN, apdu, now)
        self.counters["frames_accepted"] += 1
        msg = decode_message(plaintext)
        if not isinstance(msg, Event):
            raise MalformedMessage("only events travel under the global key")
        self._on_event(m, msg, now)

    def _open_global(self, m: MeterState, key_type: KeyType, apdu: CipheredApdu, now: float) -> bytes:
        slot = m.slots[key_type]
        ak_slot = m.slots[KeyType.AK]
        aks = [(v, m.keys[KeyType.AK][v].key) for v in (ak_slot.active, ak_slot.new) if v is not None]
        replay = False
        for version in [v for v in (slot.active, slot.new) if v is not None]:
            gk = m.keys[key_type][version]
            below = apdu.invocation_counter < gk.rx.lowest_acceptable
            for ak_version, ak in aks:
                cipher = m.cipher(gk.key, ak)
                if below:
                    # A replay only if it verifies under this key (a frame
                    # under the other version starts again at IC 0).
                    try:
                        open_apdu(cipher, apdu, m.title)
                    except AuthenticationFailed:
                        continue
                    replay = True
                    break
                try:
                    plaintext = Opener(cipher, m.title, gk.rx).open(apdu)
                except AuthenticationFailed:
                    continue
                self._dirty_keys.add((m.meter, key_type, version))
                if version != slot.active:
                    self._activate(m, key_type, version, now, recovered=True)
                if gk.rx.lowest_acceptable >= self.policy.global_renew_at_ic:
                    self._counter_renewal(m, key_type, now)
                if ak_version != ak_slot.active:
                    self._activate(m, KeyType.AK, ak_version, now, recovered=True)
                return plaintext
        if replay:
            raise ReplayedFrame("invocation counter not above the last accepted")
        expired = m.expired_keys.get(key_type)
        if expired is not None and self._verifies(m, expired.key, apdu):
            # The meter (or whoever holds the old key) still uses a key we
            # expired: worth telling apart from a forgery.
            raise ExpiredKey(f"frame under an expired {key_type.value} key")
        raise AuthenticationFailed("no global key of this meter verifies the frame")

    def _on_event(self, m: MeterState, ev: Event, now: float) -> None:
        self.counters[f"events_{ev.kind}"] += 1
        if ev.kind == "boot":
            # A rebooted meter has forgotten its session: so do we, and associate.
            self._drop_session(m)
            self._associate(m, now, "boot")
        elif ev.kind == "counter_threshold":
            # The meter's counters under a global key near their end (it sees
            # CC_LOCALE's, which we never do): reprogram that key.
            try:
                key_type = KeyType(ev.detail)
            except ValueError:
                key_type = None
            if key_type in (KeyType.CC_LAN, KeyType.CC_LOCALE):
                self._counter_renewal(m, key_type, now)
            self._event("meter_event", meter=m.meter, event=ev.kind, detail=ev.detail, ts=ev.ts)
        else:
            self._event("meter_event", meter=m.meter, event=ev.kind, detail=ev.detail, ts=ev.ts)

    # -- readings and gaps ------------------------------------------------------

    def _on_reading(self, m: MeterState, r: Reading, now: float, gap_fill: bool = False) -> None:
        high = m.high_seq
        if high is None or r.seq > high:
            if high is not None and r.seq > high + 1:
                self._gap_detected(m, high, r.seq, now)
            m.high_seq = r.seq
        elif m.gaps.discard(r.seq):
            self._bound_gaps(m)  # a reading inside a run splits it
        else:
            self.counters["readings_duplicate"] += 1
            return
        self._dirty_meters.add(m.meter)
        self._readings.append((m.meter, r.seq, r.ts, r.energy_wh, r.power_w, r.voltage_dv, now))
        self.counters["readings_stored"] += 1
        if gap_fill:
            self.counters["readings_gap_filled"] += 1
        if r.sealed_ns is not None:
            self._latencies.append(int(now * 1e9) - r.sealed_ns)

    def _gap_detected(self, m: MeterState, high: int, seq: int, now: float) -> None:
        """Readings high + 1 .. seq - 1 are missing: the last gap_fill_window
        of them become one run, asked for after gap_fill_delay_s."""
        first = max(high + 1, seq - self.policy.gap_fill_window)
        if first > high + 1:
            self.counters["readings_unrecoverable"] += first - high - 1
        if first >= seq:
            return
        due = now + self.policy.gap_fill_delay_s
        if not m.gaps.add(first, seq - 1, due):
            self.counters["readings_unrecoverable"] += seq - first  # beyond 64 bits: no store holds them either
            return
        self._bound_gaps(m)
        self._gap_meters.add(m.meter)
        heapq.heappush(self._gap_heap, (due, m.meter))
        self.counters["gaps_detected"] += seq - first

    def _bound_gaps(self, m: MeterState) -> None:
        """At most Policy.gap_fill_max_runs runs of gaps per meter (GapRuns.bound)."""
        bound = self.policy.gap_fill_max_runs
        if 0 < bound < len(m.gaps):
            merged, held = m.gaps.bound(bound)
            self.counters["gap_runs_merged"] += merged
            self.counters["gap_held_readings_merged"] += held

    def _gap_slots_free(self) -> int:
        bound = self.policy.gap_fill_max_in_flight
        return bound - len(self._gap_inflight) if bound > 0 else self.policy.max_gap_requests_per_tick

    def _on_gap_fill_reply(self, m: MeterState, msg: GapFillReply, now: float) -> None:
        """The meter's answer (or one chunk of it): its request's slot is free
        again, whatever the reply holds (what is still missing is asked again
        when its retry time comes)."""
        sent = self._gap_inflight.get(msg.request_id)
        if sent is not None and sent[0] == m.meter:
            del self._gap_inflight[msg.request_id]
        for r in msg.readings:
            self._on_reading(m, r, now, gap_fill=True)
        for seq in msg.unavailable:
            if m.gaps.discard(seq):
                self.counters["readings_unrecoverable"] += 1
                self._dirty_meters.add(m.meter)
        self._bound_gaps(m)  # an unavailable seq inside a run split it

    def _gap_fill(self, now: float) -> None:
        """Ask for the gaps that are due, meters in due order, bounded twice:
        ``max_gap_requests_per_tick`` per tick and ``gap_fill_max_in_flight``
        requests unanswered at once (a heap: no scan of every meter with gaps).

        A request holds its slot until a reply naming it arrives or its retry
        time (``gap_fill_retry_s``) passes; its missing readings are then due
        again.  Meters found due while every slot is taken wait, in order, in
        a queue of their own (``gap_fill_deferred`` counts them), served first
        once slots free up: gap-fill never asks faster than the fleet answers.
        """
        p = self.policy
        inflight = self._gap_inflight
        timeouts = self._gap_timeouts
        while timeouts and timeouts[0][0] <= now:
            _deadline, rid = heapq.heappop(timeouts)
            if inflight.pop(rid, None) is not None:
                self.counters["gap_fill_timeouts"] += 1
        budget = min(p.max_gap_requests_per_tick, self._gap_slots_free())
        heap = self._gap_heap
        ready = self._gap_ready
        deferred: list[tuple[float, str]] = []
        while budget > 0:
            if ready:
                mid = ready.popleft()
                self.meters[mid].gap_waiting = False
            elif heap and heap[0][0] <= now:
                _when, mid = heapq.heappop(heap)
            else:
                break
            m = self.meters[mid]
            if not m.gaps:
                self._gap_meters.discard(mid)
                continue
            if m.session is None or m.association is not None or m.session.receive_only:
                if m.session is not None and m.session.receive_only:
                    self._associate(m, now, "downlink_needed")
                deferred.append((now + p.gap_fill_delay_s, mid))  # ask once associated
                continue
            ranges = _gap_ranges(m.gaps, now, p.gap_fill_coalesce)
            retry = now + p.gap_fill_retry_s
            for first, last in ranges[: min(8, budget)]:  # bound the burst per meter per tick
                rid = self._next_request_id()
                self._send_session(m, GapFillRequest(rid, first, last))
                inflight[rid] = (mid, retry)
                heapq.heappush(timeouts, (retry, rid))
                self.counters["gap_fill_requests"] += 1
                budget -= 1
                m.gaps.set_due(first, last, retry)  # only the missing seqs: a coalesced hole holds readings we have
            self._bound_gaps(m)  # a range ending inside a run split it
            if m.gaps:
                deferred.append((m.gaps.next_due(), mid))
        if self._gap_slots_free() <= 0:
            # Every slot taken: what is due waits for one, in due order.
            while heap and heap[0][0] <= now:
                _when, mid = heapq.heappop(heap)
                m = self.meters[mid]
                if not m.gaps:
                    self._gap_meters.discard(mid)
                elif not m.gap_waiting:
                    m.gap_waiting = True
                    ready.append(mid)
                    self.counters["gap_fill_deferred"] += 1
        for item in deferred:
            heapq.heappush(heap, item)

    # -- downlink under the session ---------------------------------------------

    def _reserve(self, counter: SendCounter) -> bool:
        """Confirm a reservation in memory; it becomes durable with the next
        commit, which the shell performs before publishing this frame."""
        if counter.wants_reservation:
            counter.confirm_reservation(counter.next_reservation())
            return True
        return False

    def _send_session(self, m: MeterState, msg: Any) -> None:
        s = m.session
        assert s is not None
        self._reserve(s.sealer.counter)
        self._dirty_sessions.add(m.meter)
        self._send(m, s.sealer.seal(encode_message(msg)))

    # -- association -----------------------------------------------------------

    def _associate(self, m: MeterState, now: float, reason: str, *, unverified: bool = False) -> None:
        """Ask for an association.  ``unverified``: asked for by input that no
        key verified (a frame under no session we hold, failing tags): at most
        one such association per meter per ``unverified_trigger_interval_s``,
        so forged frames cannot make us work."""
        if m.assoc_state is not AssociationState.IDLE:
            self._assoc(m, AssociationEvent.WANTED)  # already on its way
            return
        not_before = now
        if unverified:
            if now < m.next_unverified_trigger:
                self.counters["associations_rate_limited"] += 1
                not_before = m.next_unverified_trigger
            m.next_unverified_trigger = max(now, not_before) + self.policy.unverified_trigger_interval_s
        self._assoc(m, AssociationEvent.WANTED)
        self._queue(m, not_before, reason, now)

    def _queue(self, m: MeterState, not_before: float, reason: str, now: float) -> None:
        """QUEUED: admit now if we may, else wait for admission or a timer."""
        if not_before > now:
            heapq.heappush(self._later, (not_before, m.meter, reason))
            return
        if self._associating >= self.association_window:
            # Admission control: under a storm, more in flight only means
            # longer round trips, timeouts and retries (a collapse).
            self._waiting[m.meter] = reason
            self.counters["associations_queued"] += 1
            return
        self._admit(m, now, reason)

    def _aarq_counter_key(self, m: MeterState, version: int) -> GlobalKey:
        """Whose send counter numbers an AARQ: in suite 0 the CC_LAN version it
        is ciphered under; in suite 1 (signed, ciphered under nothing) the
        CCC's, which no key change resets on either side (the meter checks
        it against a receive counter of its own, ``assoc_recv``)."""
        return m.key(KeyType.CCC) if m.suite else m.keys[KeyType.CC_LAN][version]

    def _admit(self, m: MeterState, now: float, reason: str) -> None:
        order = m.slots[KeyType.CC_LAN].try_order()
        wait = self._ic_clock_wait(self._aarq_counter_key(m, order[0]), now)
        if wait > 0:
            self.counters["aarq_held_by_ic_clock"] += 1
            heapq.heappush(self._later, (now + wait, m.meter, reason))
            return
        self._associating += 1
        if m.suite:
            # Suite 1 agrees the session key: nothing to offer; the AARQ's
            # counter is the ACTIVE CC_LAN's (the meter's receive rule).
            order = [m.slots[KeyType.CC_LAN].active]
        session_key = None if m.suite else SecretBytes(self._new_key())
        m.association = PendingAssociation(session_key, m.next_serial, order, 0, now, 1, reason)
        m.next_serial += 1
        self._assoc(m, AssociationEvent.ADMITTED)
        self._pending_meters.add(m.meter)
        self._send_aarq(m, now)

    # The CC_LAN IC clock (Policy.cc_lan_ic_per_s): see load().

    def _ic_ceiling(self, created: float, now: float) -> int:
        p = self.policy
        return int(max(0.0, now - created) * p.cc_lan_ic_per_s) + p.cc_lan_ic_burst

    def _ic_clock_wait(self, gk: GlobalKey, now: float) -> float:
        """Seconds until the IC clock lets ``gk`` send its next value (0: now)."""
        excess = gk.tx.next_value - self._ic_ceiling(gk.created, now)
        if excess <= 0:
            return 0.0
        return math.ceil(excess / self.policy.cc_lan_ic_per_s * 1000) / 1000

    def _send_aarq(self, m: MeterState, now: float) -> None:
        pa = m.association
        if pa.version not in m.keys[KeyType.CC_LAN]:
            # A CC_LAN change completed since this association began: the
            # version it was going to try has expired; start over with today's.
            pa.order, pa.index = m.slots[KeyType.CC_LAN].try_order(), 0
        if m.suite:
            pa.order, pa.index = [m.slots[KeyType.CC_LAN].active], 0
        elif pa.attempts > 1 or pa.index > 0:
            # Every AARQ carries a fresh dedicated key: a meter must never
            # install the same session key twice (its counters restart at 0).
            # The meter may have taken an earlier offer whose AARE is late:
            # keep the last few so its traffic still proves it.
            pa.offered = (pa.offered + [pa.session_key])[-3:]
            pa.session_key = SecretBytes(self._new_key())
        gk = self._aarq_counter_key(m, pa.version)
        pa.sent_at = now
        wait = self._ic_clock_wait(gk, now)
        if wait > 0 or gk.tx.next_value >= IC_LIMIT:
            # Nothing goes out yet: this attempt waits for the IC clock
            # (handle_timer sends it then), or, counter exhausted, times out.
            pa.frame = b""
            pa.held_until = now + wait if wait > 0 else math.inf
            self.counters["aarq_held_by_ic_clock"] += 1
            if gk.tx.next_value >= self.policy.global_renew_at_ic and not m.suite:
                self._counter_renewal(m, KeyType.CC_LAN, now)
            return
        pa.held_until = 0.0
        if gk.tx.wants_reservation or not gk.tx.available:
            # Never reserve past the IC clock, so that the jump on start
            # (ceiling + 1) lies above every value this store ever reserved.
            mark = min(gk.tx.next_reservation(), self._ic_ceiling(gk.created, now) + 1)
            gk.tx.confirm_reservation(mark)
        if m.suite:
            self._dirty_keys.add((m.meter, KeyType.CCC, gk.version))
            return self._send_suite1_aarq(m, pa, gk, now)
        self._dirty_keys.add((m.meter, KeyType.CC_LAN, pa.version))
        pa.challenge = self._new_key()[:CHALLENGE_LEN]
        m.attempt_seq += 1
        m.attempts = (m.attempts + [Attempt(m.attempt_seq, pa.challenge, pa.session_key, pa.version)])[-4:]
        initiate = encode_initiate_request(InitiateRequest(dedicated_key=pa.session_key))
        apdu = seal_apdu(Suite0Cipher(gk.key, m.ak), GLO_INITIATE_REQUEST, self.title, gk.tx.take(), initiate)
        pa.frame = build_aarq(self.title, apdu, pa.challenge)
        self._dirty_pending.add(m.meter)  # its key is durable before the AARQ leaves
        self._send(m, pa.frame)
        self.counters["aarq_sent"] += 1
        if gk.tx.next_value >= self.policy.global_renew_at_ic and not m.suite:
            self._counter_renewal(m, KeyType.CC_LAN, now)

    def _send_suite1_aarq(self, m: MeterState, pa: PendingAssociation, gk: GlobalKey, now: float) -> None:
        """Suite 1: a signed offer of a fresh ephemeral key (suite1.py)."""
        if self._signer is None:
            # Configured without our signing key: we can read suite-1 meters'
            # sessions, never open one.  Counted; the timeout retries.
            pa.frame, pa.held_until = b"", math.inf
            self.counters["aarq_unsignable"] += 1
            return
        ephemeral = suite1.SoftwareEcdh.from_rng(self._random)
        ctos, offer = suite1.offer_association(self.title, m.title, gk.tx.take(), ephemeral, self._signer)
        pa.challenge = ctos
        m.attempt_seq += 1
        m.attempts = (m.attempts + [Attempt(m.attempt_seq, ctos, None, pa.version, ephemeral)])[-4:]
        pa.frame = build_aarq(self.title, offer, ctos, MECHANISM_HLS_ECDSA)
        self._send(m, pa.frame)
        self.counters["aarq_sent"] += 1
        self.counters["aarq_sent_suite1"] += 1

    def _on_suite1_aare(self, m: MeterState, aare, now: float, data: bytes) -> None:
        """Suite 1: the meter's signed ephemeral key for one of our recent
        AARQs gives the session key; nothing else verifies an AARE here."""
        if aare.auth_value is None or aare.initiate_apdu is None:
            raise MalformedFrame("suite-1 AARE without the meter's ephemeral key and signature")
        for attempt in reversed(m.attempts):
            if attempt.ephemeral is None:
                continue
            try:
                key = suite1.finish_association(
                    m.sign_public, self.title, m.title, attempt.challenge, aare.auth_value, aare.initiate_apdu,
                    attempt.ephemeral,
                )
            except suite1.SignatureInvalid:
                continue
            if attempt.seq <= m.installed_attempt:
                self.counters["stale_aare"] += 1
                return
            m.last_aare = bytes(data)
            m.installed_attempt = attempt.seq
            pa = m.association
            if pa is not None:
                pa.session_key = key
                self._install_session(m, pa, now)
            else:
                self._new_session(m, m.next_serial, key, now)
                m.next_serial += 1
                self.counters["associations_superseded"] += 1
            return
        raise suite1.SignatureInvalid("the AARE answers no recent AARQ of ours")

    def _on_aare(self, m: MeterState, aare, now: float, data: bytes = b"") -> None:
        if data and data == m.last_aare:
            # The meter's answer to a retransmitted AARQ: the same frame again.
            self.counters["duplicate_aare"] += 1
            return
        if not aare.accepted or aare.initiate_apdu is None:
            # Unciphered: anyone on the path can forge one.  At most a hint to
            # try the next CC_LAN version now rather than after the timeout;
            # it never changes key state.
            pa = m.association
            if pa is None or not pa.frame:
                self.counters["stale_aare"] += 1
                return
            self.counters["associations_rejected"] += 1
            self._assoc(m, AssociationEvent.REFUSED)
            self._next_association_attempt(m, now, "rejected")
            return
        if m.suite:
            return self._on_suite1_aare(m, aare, now, data)
        apdu = parse_apdu(aare.initiate_apdu)
        if apdu.tag != GLO_INITIATE_RESPONSE:
            raise MalformedFrame("AARE does not carry a glo-initiateResponse")
        bound = self._bound_attempt(m, aare.auth_value) if aare.auth_value is not None else None
        if bound is None:
            # It answers no AARQ we remember: a late answer from before a
            # restart, a replay or a forgery.  Verified like any frame (a
            # forgery or a replay is rejected), it may prove that the meter
            # holds a NEW key (positive recovery), never what the meter lacks.
            decode_initiate_response(self._open_global(m, KeyType.CC_LAN, apdu, now))
            self.counters["stale_aare"] += 1
            return
        attempt, gk, ak_version, ak = bound
        if attempt.seq <= m.installed_attempt:
            # Answers an AARQ we have moved on from: verify it (a tampered
            # copy is rejected like any frame), then count it, nothing more.
            open_apdu(Suite0Cipher(gk.key, ak), apdu, m.title)
            if apdu.invocation_counter < gk.rx.lowest_acceptable:
                raise ReplayedFrame("AARE below the CC_LAN receive floor")
            self.counters["stale_aare"] += 1
            return
        decode_initiate_response(Opener(Suite0Cipher(gk.key, ak), m.title, gk.rx).open(apdu))
        self._dirty_keys.add((m.meter, KeyType.CC_LAN, attempt.version))
        if ak_version != m.slots[KeyType.AK].active:
            self._activate(m, KeyType.AK, ak_version, now, recovered=True)
        slot = m.slots[KeyType.CC_LAN]
        if attempt.version == slot.new:
            self._activate(m, KeyType.CC_LAN, attempt.version, now, recovered=True)
        elif slot.new is not None and attempt.version == slot.active:
            # Bound to an AARQ under ACTIVE: when it answered, the meter held
            # ACTIVE, so it never took the NEW key (a meter only ever moves
            # forward, and only under the session this answer just replaced).
            self._withdraw(m, KeyType.CC_LAN, now, "meter kept the active key")
        m.last_aare = bytes(data)
        self._install_attempt(m, attempt, now)

    def _bound_attempt(
        self, m: MeterState, auth_value: bytes
    ) -> tuple[Attempt, GlobalKey, int, bytes] | None:
        """The attempt whose challenge ``auth_value`` answers, with the
        CC_LAN version and the AK (version, bytes) it verified under."""
        ak_slot = m.slots[KeyType.AK]
        aks = [(v, m.keys[KeyType.AK][v].key) for v in (ak_slot.active, ak_slot.new) if v is not None]
        for attempt in reversed(m.attempts):
            gk = m.keys[KeyType.CC_LAN].get(attempt.version)
            if gk is None:
                continue
            for ak_version, ak in aks:
                try:
                    verify_hls_gmac(Suite0Cipher(gk.key, ak), m.title, auth_value, attempt.challenge)
                except AuthenticationFailed:
                    continue
                return attempt, gk, ak_version, ak
        return None

    def _install_attempt(self, m: MeterState, attempt: Attempt, now: float) -> None:
        pa = m.association
        if pa is not None and (attempt.session_key == pa.session_key or attempt.session_key in pa.offered):
            pa.session_key = attempt.session_key
            m.installed_attempt = attempt.seq
            self._install_session(m, pa, now)
            return
        # A newer attempt of an association that completed already (its AARE
        # overtook this one's): the meter's session is this one now.
        m.installed_attempt = attempt.seq
        self._new_session(m, m.next_serial, attempt.session_key, now)
        m.next_serial += 1
        self.counters["associations_superseded"] += 1
        if m.transfer is None and m.association is None:
            self._start_wanted_transfer(m, now)

    def _new_session(self, m: MeterState, serial: int, key: SecretBytes, now: float) -> None:
        old = m.session
        if old is not None:
            old.expires = now + self.policy.previous_session_grace_s
            if m.previous is not None:
                m.expired_session_key = m.previous.key
            m.previous = old
        m.session = Session.build(
            serial, key, m.ak, now, self.title, m.title, SendCounter(0, block=self.policy.counter_block),
            ReceiveCounter(0), suite=m.suite,
        )
        if m.suite:
            # Its key dies with this process (never stored): the whole range
            # is ours, as for the meter's sessions.
            m.session.sealer.counter.confirm_reservation(IC_LIMIT)
        self._dirty_sessions.add(m.meter)
        self._new_sessions.add(m.meter)
        self._deleted_sessions.discard(m.meter)
        self._schedule_age(m, m.session)
        if m.transfer is not None and old is not None and m.transfer_state is TransferState.AWAITING_ACK:
            # The transfer went under the session just replaced: the meter has
            # dropped that key, so the transfer can no longer arrive.  Send it
            # again under the new one (same key, same version: idempotent).
            t = m.transfer
            m.transfer = None
            self._xfer(m, TransferEvent.SESSION_LOST)
            if t.key_type not in m.wanted_transfers:
                m.wanted_transfers.insert(0, t.key_type)

    def _install_session(self, m: MeterState, pa: PendingAssociation, now: float) -> None:
        self._new_session(m, pa.serial, pa.session_key, now)
        for attempt in m.attempts:
            if attempt.session_key == pa.session_key:
                m.installed_attempt = max(m.installed_attempt, attempt.seq)
        m.association = None
        self._associating -= 1
        self._assoc_window = min(self._assoc_window + 1.0, float(self.policy.max_pending_associations))
        self._assoc(m, AssociationEvent.ANSWERED)
        self._dirty_pending.add(m.meter)
        self.counters["associations"] += 1
        self.counters[f"associations_suite{m.suite}"] += 1  # the monitor shows both suites side by side
        if pa.reason not in ("boot", "no_session"):
            self.counters["session_renewals"] += 1
        self._campaign_progress(m.meter, "session")
        if m.transfer is None:
            self._start_wanted_transfer(m, now)
        if m.transfer is None:
            self._pending_meters.discard(m.meter)

    def _next_association_attempt(self, m: MeterState, now: float, why: str) -> None:
        pa = m.association
        if why == "timeout" and pa.frame and pa.version in m.keys[KeyType.CC_LAN]:
            # No answer: send the very same AARQ again (same key, same IC: the
            # same frame, not a second use of the IV).  A meter that answered
            # it answers again with the same AARE; a fresh key here would let
            # the meter and us settle on different offers.
            pa.attempts += 1
            if pa.attempts > self.policy.association_max_attempts:
                return self._give_up_association(m, now, why)
            pa.sent_at = now
            self._send(m, pa.frame)
            self.counters["aarq_retransmitted"] += 1
            return
        if pa.index + 1 < len(pa.order):
            pa.index += 1
        else:
            pa.index = 0
            pa.attempts += 1
            if pa.attempts > self.policy.association_max_attempts:
                return self._give_up_association(m, now, why)
        self._send_aarq(m, now)

    def _give_up_association(self, m: MeterState, now: float, why: str) -> None:
        m.association = None
        self._associating -= 1
        self._assoc(m, AssociationEvent.GAVE_UP)
        self._dirty_pending.add(m.meter)
        self.counters["associations_failed"] += 1
        self._event("alarm", alarm="association_failed", meter=m.meter, why=why)
        self._campaign_failed(m.meter, "session")
        m.cooldown_until = now + self.policy.association_cooldown_s
        heapq.heappush(self._cooling, (m.cooldown_until, m.meter, why))

    def _drop_session(self, m: MeterState) -> None:
        if m.session is not None or m.previous is not None:
            m.expired_session_key = (m.session or m.previous).key
            m.session = None
            m.previous = None
            self._deleted_sessions.add(m.meter)
            self._dirty_sessions.discard(m.meter)
            self._new_sessions.discard(m.meter)

    def _check_renewal(self, m: MeterState, s: Session, now: float) -> None:
        p = self.policy
        if m.association is not None:
            return
        if (
            s.frames >= p.session_max_frames
            or s.opener.counter.lowest_acceptable >= p.session_renew_at_ic
            or s.sealer.counter.next_value >= p.session_renew_at_ic
        ):
            self._associate(m, now, "renewal")

    def _schedule_age(self, m: MeterState, s: Session) -> None:
        if self.policy.session_max_age_s > 0:
            heapq.heappush(self._age_heap, (s.created + self.policy.session_max_age_s, m.meter, s.serial))

    def _counter_renewal(self, m: MeterState, key_type: KeyType, now: float) -> None:
        """A global key's counters near their end: reprogram it (once)."""
        if key_type in m.wanted_transfers or (m.transfer is not None and m.transfer.key_type is key_type):
            return
        if m.slots[key_type].new is not None:
            return  # a new one is already on its way
        self.counters[f"counter_renewals_{key_type.value}"] += 1
        self.request_rotation(m, key_type, now)

    # -- key transfer ----------------------------------------------------------

    def request_rotation(self, m: MeterState, key_type: KeyType, now: float) -> None:
        if key_type not in m.wanted_transfers:
            m.wanted_transfers.append(key_type)
        if m.session is None or m.session.receive_only:
            self._associate(m, now, "key_transfer")
        elif m.transfer is None and m.association is None:
            self._start_wanted_transfer(m, now)

    def _start_wanted_transfer(self, m: MeterState, now: float) -> None:
        if m.session is None or m.session.receive_only:
            return  # after the next association
        while m.wanted_transfers and m.transfer is None:
            key_type = m.wanted_transfers.pop(0)
            slot = m.slots[key_type]
            if slot.new is None:
                # Never a version used before, not even by a withdrawn key: an
                # ack names its version, and the store row must not be reused.
                version = max(m.version_high.get(key_type, 0), max(m.keys[key_type], default=0)) + 1
                m.version_high[key_type] = version
                slot.propose(version)
                m.keys[key_type][version] = GlobalKey(
                    version,
                    SecretBytes(self._new_key()),
                    KeyState.NEW,
                    now,
                    SendCounter(0, block=self.policy.counter_block),
                    ReceiveCounter(0),
                )
                self._dirty_keys.add((m.meter, key_type, version))
                self._new_keys.add((m.meter, key_type, version))
            m.transfer = PendingTransfer(self._next_request_id(), key_type, slot.new, now)
            self._xfer(m, TransferEvent.SENT)
            self._pending_meters.add(m.meter)
            self._send_transfer(m, now)

    def _send_transfer(self, m: MeterState, now: float) -> None:
        t = m.transfer
        setup, key_id = TRANSFER_TARGET[t.key_type]
        new_key = m.keys[t.key_type][t.version].key
        param = encode_key_transfer(m.key(KeyType.CCC).key, [(key_id, new_key)])
        t.sent_at = now
        self._send_session(m, KeyTransfer(t.request_id, setup.value, param, t.version))
        self.counters["key_transfers_sent"] += 1

    def _end_transfer(self, m: MeterState, event: TransferEvent) -> None:
        m.transfer = None
        self._xfer(m, event)

    def _on_transfer_ack(self, m: MeterState, ack: KeyTransferAck, now: float) -> None:
        """An ack confirms what it names, whatever request it says it answers:
        (key type, version) and the check value of the key installed."""
        t = m.transfer
        if not ack.ok:
            # Authenticated (it came under the session), but it must refuse
            # the version in flight: an old refusal held back proves nothing.
            if t is None or ack.version != t.version:
                self.counters["stale_acks"] += 1
                return
            self._end_transfer(m, TransferEvent.REFUSED)
            if m.slots[t.key_type].new == t.version:
                self._withdraw(m, t.key_type, now, ack.reason or "refused")
            self._campaign_failed(m.meter, t.key_type.value)
        else:
            try:
                key_type = KeyType(ack.key_type)
            except ValueError:
                raise MalformedMessage("ack names no known key type") from None
            gk = m.keys.get(key_type, {}).get(ack.version)
            if gk is None or not hmac.compare_digest(key_check_value(key_type, ack.version, gk.key), ack.check):
                # Names a key we do not hold (withdrawn, from before a restore)
                # or another key under a reused number: confirms nothing.
                self.counters["stale_acks"] += 1
                return
            if t is not None and t.key_type is key_type and t.version == ack.version:
                self._end_transfer(m, TransferEvent.CONFIRMED)
            if m.slots[key_type].new == ack.version:
                self._activate(m, key_type, ack.version, now)
            else:
                self.counters["duplicate_acks"] += 1  # already active: a re-sent transfer's ack
        self._start_wanted_transfer(m, now)
        if m.transfer is None and m.association is None:
            self._pending_meters.discard(m.meter)

    def _activate(self, m: MeterState, key_type: KeyType, version: int, now: float, recovered: bool = False) -> None:
        slot = m.slots[key_type]
        try:
            expired = slot.activate(version)
        except KeyLifecycleError:
            return
        gk = m.keys[key_type][version]
        gk.state = KeyState.ACTIVE
        self._dirty_keys.add((m.meter, key_type, version))
        if expired is not None:
            # Forgotten in memory; the row stays in the store, as EXPIRED.
            self._expire(m, key_type, m.keys[key_type].pop(expired))
        if key_type is KeyType.AK:
            for s in (m.session, m.previous):
                if s is not None:
                    s.rekey_ak(gk.key)
        if m.transfer is not None and m.transfer.key_type is key_type and m.transfer.version == version:
            self._end_transfer(m, TransferEvent.RECOVERED)
        self.counters[f"reprogrammed_{key_type.value}"] += 1
        if recovered:
            self.counters["key_recoveries"] += 1
        self._event("key_change", meter=m.meter, key=key_type.value, version=version, recovered=recovered)
        self._campaign_progress(m.meter, key_type.value)

    def _expire(self, m: MeterState, key_type: KeyType, gk: GlobalKey) -> None:
        gk.state = KeyState.EXPIRED
        m.expired_keys[key_type] = gk
        self._dirty_keys.discard((m.meter, key_type, gk.version))
        self._expired_rows.append(
            KeyRow(m.meter, key_type, gk.version, KeyState.EXPIRED, gk.created, gk.tx.reserved_until,
                   gk.rx.lowest_acceptable)
        )

    def _withdraw(self, m: MeterState, key_type: KeyType, now: float, why: str) -> None:
        slot = m.slots[key_type]
        version = slot.withdraw()
        self._expire(m, key_type, m.keys[key_type].pop(version))
        t = m.transfer
        if t is not None and t.key_type is key_type and t.version == version:
            # A transfer of the withdrawn key was still in flight (a new
            # association overtook it: the meter kept ACTIVE and the old
            # session, which carried the transfer, is gone).  Forget it, or
            # its retry would look up a key we no longer hold, and ask for
            # the key again: a fresh NEW goes out under the new session.
            self._end_transfer(m, TransferEvent.SESSION_LOST)
            if key_type not in m.wanted_transfers:
                m.wanted_transfers.insert(0, key_type)
        self.counters["keys_withdrawn"] += 1
        self._event("key_withdrawn", meter=m.meter, key=key_type.value, version=version, why=why)

    # -- commands ----------------------------------------------------------------

    def command(self, cmd: dict, now: float) -> None:
        """Operator commands (``ami keys rotate``, ``ami read``), already decoded."""
        cid = str(cmd.get("id", ""))[:64]
        reply = cmd.get("reply") if isinstance(cmd.get("reply"), str) else None
        op = cmd.get("op")
        if op == "rotate":
            key = cmd.get("key")
            targets = cmd.get("meters")
            if key not in ROTATABLE:
                return self._reply(reply, {"id": cid, "error": f"unknown key {key!r}"})
            if targets == "all":
                chosen = list(self.meters)
            elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
                unknown = [t for t in targets if t not in self.meters]
                if unknown:
                    return self._reply(reply, {"id": cid, "error": f"unknown meters: {unknown[:5]}"})
                chosen = targets
            else:
                return self._reply(reply, {"id": cid, "error": "meters must be 'all' or a list"})
            self.campaigns[cid] = Campaign(cid, key, reply, now, set(chosen), len(chosen))
            self._reply(reply, {"id": cid, "accepted": len(chosen), "key": key})
            for mid in chosen:
                m = self.meters[mid]
                if key == "session":
                    self._associate(m, now, "command")
                else:
                    self.request_rotation(m, KeyType(key), now)
            self._campaign_check(cid, now)
        elif op == "read":
            m = self.meters.get(cmd.get("meter"))
            if m is None:
                return self._reply(reply, {"id": cid, "error": "unknown meter"})
            if m.session is None:
                return self._reply(reply, {"id": cid, "error": "meter not associated"})
            if m.session.receive_only:
                self._associate(m, now, "downlink_needed")
                return self._reply(reply, {"id": cid, "error": "session being renewed after a restart: retry"})
            if len(m.reads) >= _MAX_READS_PER_METER:
                return self._reply(reply, {"id": cid, "error": "too many reads in flight for this meter"})
            rid = self._next_request_id()
            deadline = now + self.policy.read_timeout_s
            m.reads[rid] = (cid, reply, deadline)
            heapq.heappush(self._reads_heap, (deadline, m.meter, rid))
            self._send_session(m, ReadRequest(rid))
        elif op == "status":
            self._reply(reply, {"id": cid, "meters": len(self.meters), "counters": dict(self.counters)})
        else:
            self._reply(reply, {"id": cid, "error": f"unknown op {op!r}"})

    def _reply(self, topic: str | None, body: dict) -> None:
        """Replies go only to the control-replies namespace: a command naming
        another topic (a concentrator's downlink, the head-end's own input)
        gets no reply at all, and the attempt is counted."""
        if not topic:
            return
        if not topics.is_control_reply(topic):
            self.counters["replies_refused_topic"] += 1
            return
        self._replies.append((topic, body))

    def _on_read_reply(self, m: MeterState, msg: ReadReply) -> None:
        waiting = m.reads.pop(msg.request_id, None)
        if waiting is None:
            self.counters["stale_replies"] += 1
            return
        cid, reply, _deadline = waiting
        r = msg.reading
        self._reply(
            reply,
            {"id": cid, "meter": m.meter, "ts": r.ts, "energy_wh": r.energy_wh, "power_w": r.power_w,
             "voltage_v": r.voltage_dv / 10},
        )

    def _campaign_progress(self, meter: str, key: str) -> None:
        for cid, c in list(self.campaigns.items()):
            if c.key == key and meter in c.remaining:
                c.remaining.discard(meter)
                self._campaign_check(cid, None)

    def _campaign_failed(self, meter: str, key: str) -> None:
        for cid, c in list(self.campaigns.items()):
            if c.key == key and meter in c.remaining:
                c.remaining.discard(meter)
                c.failed.add(meter)
                self._campaign_check(cid, None)

    def _campaign_check(self, cid: str, now: float | None) -> None:
        c = self.campaigns.get(cid)
        if c is None or c.remaining:
            return
        del self.campaigns[cid]
        self._campaign_done.append(c)

    # -- timers --------------------------------------------------------------------

    def next_timer(self) -> float:
        """When ``handle_timer`` next has work (engine clock; inf: nothing)."""
        p = self.policy
        when = math.inf
        for mid in self._pending_meters:
            m = self.meters[mid]
            pa, t = m.association, m.transfer
            if pa is not None:
                when = min(when, pa.sent_at + p.association_timeout_s * min(2 ** (pa.attempts - 1), 8))
                if not pa.frame:
                    when = min(when, pa.held_until)
            if t is not None:
                when = min(when, t.sent_at + p.transfer_timeout_s)
        for heap in (self._later, self._cooling, self._age_heap, self._gap_heap, self._reads_heap, self._gap_timeouts):
            if heap:
                when = min(when, heap[0][0])
        if (
            (self._waiting and self._associating < self.association_window)
            or self._campaign_done
            or (self._gap_ready and self._gap_slots_free() > 0)
        ):
            when = -math.inf  # now
        return when

    def handle_timer(self, now: float) -> None:
        """Everything due at ``now``: timeouts, queued associations, renewals,
        gap-fill, expired reads, finished campaigns."""
        p = self.policy
        for mid in list(self._pending_meters):
            m = self.meters[mid]
            pa = m.association
            if pa is not None and not pa.frame and pa.held_until <= now:
                self._send_aarq(m, now)  # held by the IC clock until now
            # Back off: 1x, 2x, 4x, 8x the timeout over successive rounds.
            elif pa is not None and now - pa.sent_at >= p.association_timeout_s * min(2 ** (pa.attempts - 1), 8):
                self.counters["association_timeouts"] += 1
                self._cut_association_window(now)
                self._assoc(m, AssociationEvent.TIMED_OUT)
                self._next_association_attempt(m, now, "timeout")
            t = m.transfer
            if t is not None and now - t.sent_at >= p.transfer_timeout_s:
                if m.session is None or m.session.receive_only:
                    self._end_transfer(m, TransferEvent.SESSION_LOST)
                    m.wanted_transfers.insert(0, t.key_type)
                    self._associate(m, now, "key_transfer")
                elif t.attempts >= p.transfer_max_attempts:
                    self._end_transfer(m, TransferEvent.FAILED)
                    self.counters["key_transfers_failed"] += 1
                    self._event("alarm", alarm="key_transfer_failed", meter=mid, key=t.key_type.value)
                    self._campaign_failed(mid, t.key_type.value)
                else:
                    # Same key, same version again: a meter that already took
                    # it just acks again (the ack names the version, not the id).
                    t.attempts += 1
                    self._xfer(m, TransferEvent.RESENT)
                    self._send_transfer(m, now)
            if m.association is None and m.transfer is None:
                self._pending_meters.discard(mid)
        for heap in (self._later, self._cooling):
            while heap and heap[0][0] <= now:
                _when, mid, reason = heapq.heappop(heap)
                m = self.meters[mid]
                if m.assoc_state is AssociationState.COOLING_DOWN:
                    self._assoc(m, AssociationEvent.COOLED_DOWN)
                if m.assoc_state is AssociationState.QUEUED and mid not in self._waiting:
                    self._queue(m, now, reason, now)
        while self._waiting and self._associating < self.association_window:
            mid = next(iter(self._waiting))
            reason = self._waiting.pop(mid)
            self._admit(self.meters[mid], now, reason)
        while self._age_heap and self._age_heap[0][0] <= now:
            _due, mid, serial = heapq.heappop(self._age_heap)
            m = self.meters[mid]
            if m.session is not None and m.session.serial == serial:
                self._associate(m, now, "renewal")
        while self._reads_heap and self._reads_heap[0][0] <= now:
            _due, mid, rid = heapq.heappop(self._reads_heap)
            waiting = self.meters[mid].reads.pop(rid, None)
            if waiting is not None:
                self.counters["reads_expired"] += 1
                self._reply(waiting[1], {"id": waiting[0], "meter": mid, "error": "timeout"})
        if p.global_key_max_age_s > 0:
            self._global_age_policy(now)
        self._gap_fill(now)
        self._finish_campaigns(now)

    def tick(self, now: float) -> None:
        """``handle_timer`` under its old name (the services call it each round)."""
        self.handle_timer(now)

    def _global_age_policy(self, now: float) -> None:
        limit = self.policy.global_key_max_age_s
        for m in self.meters.values():
            if m.session is None:
                continue
            for kt in (KeyType.CC_LAN, KeyType.AK):
                if now - m.key(kt).created >= limit and kt not in m.wanted_transfers and (
                    m.transfer is None or m.transfer.key_type is not kt
                ):
                    self.request_rotation(m, kt, now)

    def _finish_campaigns(self, now: float) -> None:
        for c in self._campaign_done:
            self._reply(
                c.reply,
                {
                    "id": c.command_id,
                    "done": True,
                    "key": c.key,
                    "total": c.total,
                    "failed": len(c.failed),
                    "elapsed_s": round(now - c.started, 3),
                },
            )
            self._event("rotation_done", key=c.key, total=c.total, failed=len(c.failed),
                        elapsed_s=round(now - c.started, 3))
        self._campaign_done.clear()
