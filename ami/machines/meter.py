"""One virtual meter: the meter side of docs/flows.md as a sans-I/O state machine.

No asyncio, no files, no clock, no randomness: every method takes the meter's
clock (``now``, seconds on the simulated meter clock) and returns an
``Output`` that the shell (meters/fleet.py) carries out *in this order*:

1. ``persist``: counter marks and new keys, written durably first;
2. ``uplink`` / ``local``: frames to publish, only once (1) is durable.

Send counters under long-lived keys (CC_LAN, CC_LOCALE) follow SendCounter's
reservation protocol, with a twist that keeps the state machine synchronous:
when a counter needs more values the meter confirms the new mark in memory
*and* lists it in ``persist``.  A frame sealed with a value under that mark is
in the same (or a later) Output, so it leaves only after the mark is durable;
if the process dies before that, the frame never left, and the restarted
meter starts from the old durable mark: no IV ever reaches the wire twice.
Session counters live in RAM with the session key (a rebooted meter has
forgotten both), so their SendCounter is confirmed up to IC_LIMIT at once.

Ciphers under the global keys are built on demand through a bounded
``CipherCache``: an ``AESGCM`` object holds ~2.5 KB of OpenSSL state, too
much to keep for every key of 100,000 meters.  The session's cipher seals
every reading, though, and a fleet with more meters than the cache has
entries would rebuild it (3-5 us) at every one: so a session keeps its own
(``MeterConfig.keep_session_ciphers``, one per associated meter), unless the
fleet is too large for that memory.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from ami.machines import loadcurve
from ami.protocol import (
    KeyType,
    ProtocolError,
    ReceiveCounter,
    SecretBytes,
    SendCounter,
    Suite0Cipher,
    decode_message,
    encode_message,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from ami.protocol import suite1
from ami.protocol.association import (
    MECHANISM_HLS_ECDSA,
    InitiateResponse,
    build_aare,
    decode_initiate_request,
    encode_initiate_response,
    hls_gmac,
    parse_aarq,
)
from ami.protocol.counters import DEFAULT_RENEW_AT, IC_LIMIT
from ami.protocol.errors import (
    AuthenticationFailed,
    CounterExhausted,
    MalformedFrame,
    MalformedMessage,
    ReplayedFrame,
    UnknownKey,
)
from ami.protocol.frames import (
    SYSTEM_TITLE_LEN,
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    GLO_INITIATE_RESPONSE,
    MAX_APDU_SIZE,
    CipheredApdu,
)
from ami.protocol.keys import SecuritySetup, decode_key_transfer, key_check_value, key_type_for
from ami.protocol.messages import (
    Event,
    GapFillReply,
    GapFillRequest,
    KeyTransfer,
    KeyTransferAck,
    Message,
    ReadReply,
    ReadRequest,
    Release,
    encode_reading,
)

# Durable counter slots (NVM rows), per meter.
LAN_SEND = "lan_send"  # meter -> head-end under CC_LAN (boot events, AARE)
LAN_RECV = "lan_recv"  # head-end -> meter under CC_LAN (AARQ)
LOCALE_SEND = "locale_send"  # meter -> handheld under CC_LOCALE (AARE)
LOCALE_RECV = "locale_recv"  # handheld -> meter under CC_LOCALE (AARQ)
#: Suite 1: the head-end's AARQ counter (signed, not ciphered: bound to no
#: key, so it must not restart when CC_LAN changes: an AARQ counted under the
#: old CC_LAN's numbering could otherwise lift the floor above the new one's).
ASSOC_RECV = "assoc_recv"
COUNTER_SLOTS = (LAN_SEND, LAN_RECV, LOCALE_SEND, LOCALE_RECV, ASSOC_RECV)
#: The counters that restart at 0 when a key is replaced.  The AK has none:
#: it only enters the GCM AAD, so the IV space of the encryption key goes on.
KEY_COUNTERS: dict[KeyType, tuple[str, str]] = {
    KeyType.CC_LAN: (LAN_SEND, LAN_RECV),
    KeyType.CC_LOCALE: (LOCALE_SEND, LOCALE_RECV),
}
PERSISTED_KEYS = (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)

# general-ded-ciphering overhead: tag, title length, title, length (<=3), SC, IC, tag.
_DC_OVERHEAD = 1 + 1 + 8 + 3 + 1 + 4 + 12
SUITE_SC = {0: suite1.security_control(0), 1: suite1.security_control(1)}  # 0x30, 0x31
_MAX_PENDING_EVENTS = 16


class WrongPeer(ProtocolError):
    """An AARQ or frame from a system title that is not our head-end / handheld."""

    reason = "wrong_peer"


class UnexpectedMessage(ProtocolError):
    """A well-formed, authentic message this side of the link never accepts."""

    reason = "unexpected_message"


# --- what the shell must do --------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterMark:
    """Persist counter ``slot`` = ``value`` (a send high-water mark or a
    receive lowest-acceptable value)."""

    slot: str
    value: int


@dataclass(frozen=True, slots=True)
class KeyWrite:
    """Persist a new key of this meter (overrides the factory key)."""

    key_type: KeyType
    key: SecretBytes = field(repr=False)


PersistItem = CounterMark | KeyWrite


@dataclass(slots=True)
class Output:
    """Effects of one call, to be carried out in field order (persist first)."""

    persist: list[PersistItem] = field(default_factory=list)
    uplink: list[bytes] = field(default_factory=list)  # on ami/v1/plc/{c}/up/{meter}
    local: list[bytes] = field(default_factory=list)  # on ami/v1/local/{c}/{meter}/out
    counters: list[str] = field(default_factory=list)  # metric names, +1 each
    rejected: list[str] = field(default_factory=list)  # rejection reasons, +1 each

    def __bool__(self) -> bool:
        return bool(self.persist or self.uplink or self.local or self.counters or self.rejected)


# --- configuration shared by every meter of a fleet ---------------------------


class CipherCache:
    """Bounded LRU of Suite0Cipher objects keyed by (encryption key, AK).

    A pure memo (no I/O): keeps the hot ciphers of a small fleet, or of the
    meters currently busy in a large one, without holding 2.5 KB per key.
    """

    __slots__ = ("_items", "size", "hits", "misses")

    def __init__(self, size: int = 4096) -> None:
        self._items: OrderedDict[tuple[bytes, bytes, int], Suite0Cipher] = OrderedDict()
        self.size = size
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"<CipherCache {len(self._items)}/{self.size}>"

    def get(self, key: bytes, ak: bytes, suite: int = 0) -> Suite0Cipher:
        ident = (bytes(key), bytes(ak), suite)
        cipher = self._items.get(ident)
        if cipher is not None:
            self.hits += 1
            self._items.move_to_end(ident)
            return cipher
        self.misses += 1
        cipher = suite1.Suite1Cipher(key, ak) if suite else Suite0Cipher(key, ak)
        if self.size > 0:
            self._items[ident] = cipher
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return cipher


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """Fleet-wide constants.  Durations are on the meter clock (the shell
    multiplies wall-clock settings by the time compression)."""

    headend_title: bytes
    tsp_title: bytes
    interval_s: int = 1800
    history: int = 2880
    boot_retry_s: float = 5.0
    #: Unanswered boot announcements back off: boot_retry_s x 2^attempt, at
    #: most this long, each jittered to 0.5-1.5x (deterministic per meter and
    #: attempt: no randomness), so that a region's meters booting together
    #: while the head-end is down or saturated do not announce in lockstep.
    boot_retry_max_s: float = 120.0
    ak_grace_s: float = 60.0
    counter_block: int = 1024
    #: Report a global key's counters past this value (counter_threshold event).
    renew_at: int = DEFAULT_RENEW_AT
    ciphers: CipherCache = field(default_factory=CipherCache)
    #: Zero bytes in a ``pad`` field of each pushed reading (``ami meters --pad``:
    #: load tests with bigger frames); the head-end ignores the field.
    pad: int = 0
    #: Suite 1: the head-end's public signing key (64 bytes X || Y), and the
    #: random source for the meters' ephemeral keys (``rng(n) -> n bytes``,
    #: handed in: the machine draws no randomness of its own).
    headend_sign_public: bytes | None = None
    rng: Callable[[int], bytes] | None = None
    #: Each session keeps its own cipher (one AESGCM, ~2.5 KB, per associated
    #: meter) instead of asking ``ciphers`` for it at every frame: the LRU
    #: misses on every reading once a fleet has more meters than it has
    #: entries, and a miss (building the cipher) costs ~3-5 us per frame.
    #: Fleets too large to afford the memory turn it off (meters/fleet.py).
    keep_session_ciphers: bool = True


@dataclass(slots=True)
class MeterKeys:
    ccc: SecretBytes
    ak: SecretBytes
    cc_lan: SecretBytes
    cc_locale: SecretBytes

    def __repr__(self) -> str:
        return "<MeterKeys>"

    def get(self, key_type: KeyType) -> SecretBytes:
        return getattr(self, key_type.value)

    def set(self, key_type: KeyType, key: SecretBytes) -> None:
        setattr(self, key_type.value, key)


class Session:
    """An association (LAN with the head-end, or local with the handheld):
    a dedicated key in RAM and its two counters, both starting at 0."""

    __slots__ = ("key", "peer_title", "send", "recv", "suite", "cipher", "cipher_ak")

    def __init__(self, key: SecretBytes, peer_title: bytes, suite: int = 0) -> None:
        self.key = key
        self.peer_title = peer_title
        self.suite = suite
        #: The cipher of (key, cipher_ak), when the meter keeps it here
        #: (MeterConfig.keep_session_ciphers; Meter._session_cipher).
        self.cipher: Suite0Cipher | None = None
        self.cipher_ak: SecretBytes | None = None
        self.send = SendCounter(0)
        # The key dies with the process, so no value can be reused after a
        # crash: nothing to persist, the whole range is ours.
        self.send.confirm_reservation(IC_LIMIT)
        self.recv = ReceiveCounter(0)

    def __repr__(self) -> str:
        return f"<Session peer={self.peer_title.hex()} send={self.send.next_value} recv={self.recv.lowest_acceptable}>"


# --- the meter ------------------------------------------------------------------


class Meter:
    """The state of one meter.  Not thread-safe; one shell drives it."""

    __slots__ = (
        "ident",
        "concentrator",
        "title",
        "config",
        "keys",
        "profile",
        "push_offset",
        "lan_send",
        "lan_recv",
        "assoc_recv",
        "locale_send",
        "locale_recv",
        "session",
        "local_session",
        "last_association",
        "prev_ak",
        "prev_ak_until",
        "powered",
        "boot_at",
        "boot_detail",
        "next_announce",
        "last_pushed",
        "last_energy",
        "pending_events",
        "next_due",
        "thresholds_reported",
        "announce_attempts",
        "suite",
        "signer",
        "sc",
    )

    def __init__(
        self,
        ident: str,
        title: bytes,
        keys: MeterKeys,
        config: MeterConfig,
        *,
        concentrator: str = "",
        marks: dict[str, int] | None = None,
        push_offset: float = 0.0,
        boot_at: float = 0.0,
        suite: int = 0,
        signer: suite1.Signer | None = None,
    ) -> None:
        """Power-on state from NVM: ``keys`` (factory, overridden by key
        transfers) and durable counter ``marks``.  The meter is off until its
        first ``tick`` at or after ``boot_at``; ``push_offset`` (meter-clock
        seconds) is how long after an interval ends it pushes that reading."""
        marks = marks or {}
        if len(title) != SYSTEM_TITLE_LEN:
            raise ValueError("a system title is 8 bytes")  # the IV relies on it
        self.ident = ident
        self.concentrator = concentrator
        self.title = title
        self.config = config
        self.keys = keys
        self.profile = loadcurve.profile(loadcurve.seed_for(title), config.interval_s)
        self.push_offset = push_offset
        block = config.counter_block
        self.lan_send = SendCounter(marks.get(LAN_SEND, 0), block=block)
        self.lan_recv = ReceiveCounter(marks.get(LAN_RECV, 0))
        self.assoc_recv = ReceiveCounter(marks.get(ASSOC_RECV, 0))
        self.locale_send = SendCounter(marks.get(LOCALE_SEND, 0), block=block)
        self.locale_recv = ReceiveCounter(marks.get(LOCALE_RECV, 0))
        self.session: Session | None = None
        self.local_session: Session | None = None
        # (AARQ, AARE) of the current LAN session, RAM only: the head-end
        # retransmits an unanswered AARQ byte for byte.
        self.last_association: tuple[bytes, bytes] | None = None
        self.prev_ak: SecretBytes | None = None
        self.prev_ak_until = 0.0
        self.powered = False
        self.boot_at: float | None = boot_at
        self.boot_detail = "power_on"
        self.next_announce = 0.0
        self.last_pushed = -1
        #: (k, energy_wh(k)) of the last reading built: the next one, k + 1,
        #: needs that index for its power (RAM only, recomputed when missing).
        self.last_energy: tuple[int, int] | None = None
        self.pending_events: list[Event] | None = None
        self.next_due = boot_at
        self.thresholds_reported: set[KeyType] = set()
        self.announce_attempts = 0
        #: Security suite of the LAN side: 0 (AES-GCM, keys transported) or 1
        #: (ECDSA-signed ephemeral ECDH sessions, SC 0x31).  The local port
        #: (handheld) stays suite 0.
        if suite not in (0, 1) or (suite == 1 and (signer is None or config.headend_sign_public is None)):
            raise ValueError("a suite-1 meter needs its signing key and the head-end's public key")
        self.suite = suite
        self.signer = signer
        self.sc = suite1.security_control(suite)

    def __repr__(self) -> str:
        state = "off" if not self.powered else ("associated" if self.session else "announcing")
        return f"<Meter {self.ident} {state}>"

    @property
    def associated(self) -> bool:
        return self.session is not None

    # --- life cycle -------------------------------------------------------------

    def boot(self, now: float, detail: str = "power_on") -> Output:
        """Power on: sessions are RAM, so nothing survives; announce at once."""
        out = Output()
        self.powered = True
        self.boot_at = None
        self.session = None
        self.local_session = None
        self.last_association = None
        self.prev_ak = None
        self.last_pushed = -1
        self.boot_detail = detail
        self.announce_attempts = 0
        out.counters.append("boots")
        self._announce(now, out)
        return out

    def power_fail(self, now: float, duration: float) -> Output:
        """Outage: a last-gasp Event(outage) if associated, then off (RAM lost)
        until ``now + duration``, when the meter boots and re-associates and
        then reports Event(restore)."""
        out = Output()
        if not self.powered:
            return out
        if self.session is not None:
            self._send_lan(Event("outage", int(now), "last_gasp"), out)
        out.counters.append("events_outage")
        self.powered = False
        self.session = None
        self.local_session = None
        self.boot_at = now + duration
        self.boot_detail = "restore"
        self.next_due = self.boot_at
        self._queue_event(Event("restore", int(now + duration), f"outage_s={int(duration)}"), out)
        return out

    def raise_event(self, kind: str, now: float, detail: str = "") -> Output:
        """An alarm (tamper...): sent under the session, or queued until one exists."""
        out = Output()
        if not self.powered:
            return out
        event = Event(kind, int(now), detail)
        out.counters.append(f"events_{kind}")
        if self.session is not None:
            self._send_lan(event, out)
        else:
            self._queue_event(event, out)
        return out

    def tick(self, now: float, wall_ns: int | None = None) -> Output:
        """Do what is due at ``now`` and set ``next_due``.

        Unassociated: re-send the boot event every ``boot_retry_s``.
        Associated: push the reading of the latest interval whose push time
        (its end + ``push_offset``) has passed, once.  Older unpushed ones are
        left to the head-end's gap-fill.  ``wall_ns`` stamps readings for
        latency measurement.
        """
        out = Output()
        if not self.powered:
            if self.boot_at is not None and now >= self.boot_at:
                out = self.boot(now, self.boot_detail)
            else:
                self.next_due = self.boot_at if self.boot_at is not None else math.inf
                return out
        if self.prev_ak is not None and now >= self.prev_ak_until:
            self.prev_ak = None
        interval = self.config.interval_s
        if self.session is None:
            if now >= self.next_announce:
                self._announce(now, out)
            self.next_due = self.next_announce
            return out
        if self.pending_events:
            events, self.pending_events = self.pending_events, None
            for event in events:
                self._send_lan(event, out)
        k = math.floor((now - self.push_offset) / interval) - 1
        if k > self.last_pushed and k >= 0:
            self._send_lan_plaintext(self._reading_plaintext(k, wall_ns), out)
            self.last_pushed = k
            out.counters.append("readings_pushed")
            self._check_thresholds(now, out)
            if self.session is None:  # its counter ran out just now
                return out
        self.next_due = (max(k, self.last_pushed) + 2) * interval + self.push_offset
        return out

    def _reading_plaintext(self, k: int, wall_ns: int | None) -> bytes:
        """The encoded Reading of interval k (``encode_message(reading, pad)``,
        byte for byte), reusing the index of k - 1 when the previous push
        computed it (every push after the first)."""
        last = self.last_energy
        prev = last[1] if last is not None and last[0] == k - 1 else None
        seq, ts, energy, power, voltage = loadcurve.point(self.profile, k, prev)
        self.last_energy = (k, energy)
        return encode_reading(seq, ts, energy, power, voltage, wall_ns, self.config.pad)

    # --- timer API (aioquic's get_timer / handle_timer) ------------------------------

    def next_timer(self) -> float:
        """When ``handle_timer`` has something to do (meter clock; inf: nothing)."""
        return self.next_due

    def handle_timer(self, now: float, wall_ns: int | None = None) -> Output:
        """Do what is due at ``now``; the same as ``tick``."""
        return self.tick(now, wall_ns)

    # --- LAN downlink -------------------------------------------------------------

    def on_downlink(self, data: bytes, now: float) -> Output:
        """A frame from the head-end (via the relay): AARQ or DC under the session."""
        out = Output()
        if not self.powered:
            out.counters.append("downlink_while_off")
            return out
        if data[:1] == b"\x60":
            self._on_aarq(data, now, out, local=False)
            return out
        try:
            apdu = self._parse_dc(data, self.config.headend_title, self.suite)
            session = self.session
            if session is None:
                raise UnknownKey("no LAN session")
            msg = self._open_session(session, apdu, now)
            self._dispatch_lan(msg, now, out)
        except ProtocolError as exc:
            out.rejected.append(exc.reason)
        return out

    def _dispatch_lan(self, msg: Message, now: float, out: Output) -> None:
        if isinstance(msg, ReadRequest):
            self._send_lan(ReadReply(msg.request_id, loadcurve.instant(self.profile, now)), out)
            out.counters.append("read_replies")
        elif isinstance(msg, GapFillRequest):
            self._gap_fill(msg, now, out)
        elif isinstance(msg, KeyTransfer):
            self._key_transfer(msg, now, out)
        elif isinstance(msg, Release):
            self.session = None
            self.boot_detail = "released"
            # Give the head-end a retry period to re-associate on its own.
            self.next_announce = now + self.config.boot_retry_s
            self.next_due = self.next_announce
            out.counters.append("releases")
        else:
            raise UnexpectedMessage(f"{type(msg).__name__} is not a downlink message")

    # --- local (handheld) port -----------------------------------------------------

    def on_local(self, data: bytes, now: float) -> Output:
        """A frame from the handheld on the optical port."""
        out = Output()
        if not self.powered:
            out.counters.append("local_while_off")
            return out
        if data[:1] == b"\x60":
            self._on_aarq(data, now, out, local=True)
            return out
        try:
            apdu = self._parse_dc(data, self.config.tsp_title)
            session = self.local_session
            if session is None:
                raise UnknownKey("no local session")
            msg = self._open_session(session, apdu, now)
            if isinstance(msg, ReadRequest):
                reply = ReadReply(msg.request_id, loadcurve.instant(self.profile, now))
                out.local.append(self._seal_session(session, reply))
                out.counters.append("local_read_replies")
            elif isinstance(msg, Release):
                self.local_session = None
                out.counters.append("local_releases")
            else:
                raise UnexpectedMessage(f"{type(msg).__name__} is not accepted on the local port")
        except ProtocolError as exc:
            out.rejected.append(exc.reason)
        return out

    # --- association ------------------------------------------------------------------

    def _on_aarq(self, data: bytes, now: float, out: Output, *, local: bool) -> None:
        """AARQ -> install a session and answer a ciphered AARE, or answer an
        unciphered rejected AARE, count the reason and keep the current session."""
        peer = self.config.tsp_title if local else self.config.headend_title
        global_key = self.keys.cc_locale if local else self.keys.cc_lan
        recv, recv_slot = (self.locale_recv, LOCALE_RECV) if local else (self.lan_recv, LAN_RECV)
        frames = out.local if local else out.uplink
        if not local and self.session is not None and self.last_association is not None:
            if data == self.last_association[0]:
                # The head-end did not get our answer and sent the very same
                # AARQ again: answer it again, byte for byte.  Installing the
                # session again would restart its counters under the same key.
                frames.append(self.last_association[1])
                out.counters.append("aarq_repeated")
                return
        try:
            aarq = parse_aarq(data)
            if aarq.calling_title != peer:
                raise WrongPeer("calling AP-title is not the expected peer")
            if not local and (self.suite == 1) != (aarq.mechanism == MECHANISM_HLS_ECDSA):
                # Never downgraded (nor upgraded) by whoever builds the AARQ.
                raise WrongPeer(f"this meter associates in suite {self.suite} only")
            if not local and self.suite == 1:
                return self._on_suite1_aarq(data, aarq, now, out)
            apdu = parse_apdu(aarq.initiate_apdu)
            if apdu.tag != GLO_INITIATE_REQUEST:
                raise MalformedFrame("AARQ user information is not a glo-initiateRequest")
            try:
                recv.check(apdu.invocation_counter)
            except ReplayedFrame:
                # A replay only if it verifies under our key: an AARQ under a
                # key we never took (the head-end probing a NEW CC_LAN) starts
                # its counter at 0 and must be reported as auth_failed.
                self._open_with_grace(global_key, apdu, peer, now)
                raise
            plaintext = self._open_with_grace(global_key, apdu, peer, now)
            # Authentic: move the counter (and persist it before the AARE
            # leaves) even if the content turns out unusable, so the frame
            # can never be replayed after a restart.
            recv.accept(apdu.invocation_counter)
            out.persist.append(CounterMark(recv_slot, recv.lowest_acceptable))
            request = decode_initiate_request(plaintext)
            if request.dedicated_key is None:
                raise MalformedMessage("InitiateRequest without a dedicated key")
        except ProtocolError as exc:
            out.rejected.append(exc.reason)
            out.counters.append("local_associations_rejected" if local else "associations_rejected")
            frames.append(build_aare(self.title, False, None))
            return
        session = Session(SecretBytes(request.dedicated_key), peer)
        key_type, counter, slot = (
            (KeyType.CC_LOCALE, self.locale_send, LOCALE_SEND) if local else (KeyType.CC_LAN, self.lan_send, LAN_SEND)
        )
        try:
            # f(CtoS) first, with its own IC: it proves that this AARE answers
            # this AARQ (association.py); then the initiate response.
            auth_value = None
            if aarq.challenge is not None:
                auth_value = self._gmac_global(key_type, counter, slot, aarq.challenge, out)
            initiate = self._seal_global(key_type, counter, slot, out)
        except CounterExhausted as exc:
            # Our send counter under this global key has run out: we can no
            # longer answer under it (the head-end renews keys long before).
            out.rejected.append(exc.reason)
            out.counters.append("local_associations_rejected" if local else "associations_rejected")
            frames.append(build_aare(self.title, False, None))
            return
        aare = build_aare(self.title, True, initiate, auth_value)
        if local:
            self.local_session = session
            out.counters.append("local_associations")
        else:
            self.session = session
            self.announce_attempts = 0
            out.counters.append("associations")
            self.last_association = (bytes(data), aare)
            # Push the latest finished interval right away (if not pushed yet).
            self.next_due = now
        self._check_thresholds(now, out)
        frames.append(aare)

    def _on_suite1_aarq(self, data: bytes, aarq, now: float, out: Output) -> None:
        """Suite 1: check the head-end's signed offer and its counter, answer
        with our own fresh ephemeral key, signed, and derive the session key
        (suite1.py: the ephemeral private keys never outlive this call)."""
        assert self.signer is not None and self.config.headend_sign_public is not None
        if aarq.challenge is None:
            raise MalformedFrame("suite-1 AARQ without its ephemeral key")
        hub = self.config.headend_title
        ic = suite1.read_offer(self.config.headend_sign_public, hub, self.title, aarq.challenge, aarq.initiate_apdu)
        self.assoc_recv.check(ic)
        # Authentic and fresh: move the counter (durable before the AARE leaves).
        self.assoc_recv.accept(ic)
        out.persist.append(CounterMark(ASSOC_RECV, self.assoc_recv.lowest_acceptable))
        rng = self.config.rng
        if rng is None:
            raise ValueError("a suite-1 meter needs a random source (MeterConfig.rng)")
        ephemeral = suite1.SoftwareEcdh.from_rng(rng)
        stoc, signature, key = suite1.answer_association(hub, self.title, aarq.challenge, ephemeral, self.signer)
        aare = build_aare(self.title, True, signature, stoc)
        self.session = Session(key, hub, suite=1)
        self.announce_attempts = 0
        out.counters.append("associations")
        out.counters.append("associations_suite1")
        self.last_association = (bytes(data), aare)
        self.next_due = now
        self._check_thresholds(now, out)
        out.uplink.append(aare)

    def _seal_global(self, key_type: KeyType, counter: SendCounter, slot: str, out: Output) -> bytes:
        ic = self._take(counter, slot, out)
        cipher = self.config.ciphers.get(self.keys.get(key_type), self.keys.ak)
        return seal_apdu(cipher, GLO_INITIATE_RESPONSE, self.title, ic, encode_initiate_response(InitiateResponse()))

    def _gmac_global(self, key_type: KeyType, counter: SendCounter, slot: str, challenge: bytes, out: Output) -> bytes:
        ic = self._take(counter, slot, out)
        cipher = self.config.ciphers.get(self.keys.get(key_type), self.keys.ak)
        return hls_gmac(cipher, self.title, ic, challenge)

    def _check_thresholds(self, now: float, out: Output) -> None:
        """Counter-based renewal of the global keys: the head-end sees our
        counters under CC_LAN, but not those under CC_LOCALE (the handheld
        uses them), so we tell it, once per key, when one nears its end."""
        if self.session is None:
            return
        renew_at = self.config.renew_at
        if (  # the common case, checked without building anything
            self.lan_send.next_value < renew_at and self.lan_recv.lowest_acceptable < renew_at
            and self.locale_send.next_value < renew_at and self.locale_recv.lowest_acceptable < renew_at
        ):
            return
        for key_type, counters in (
            (KeyType.CC_LAN, (self.lan_send, self.lan_recv)),
            (KeyType.CC_LOCALE, (self.locale_send, self.locale_recv)),
        ):
            send, recv = counters
            if key_type in self.thresholds_reported:
                continue
            if send.next_value >= self.config.renew_at or recv.lowest_acceptable >= self.config.renew_at:
                self.thresholds_reported.add(key_type)
                self._send_lan(Event("counter_threshold", int(now), key_type.value), out)
                out.counters.append("counter_thresholds")

    def _announce(self, now: float, out: Output) -> None:
        """Event(boot) under CC_LAN (general-glo-ciphering), repeated until associated."""
        event = Event("boot", int(now), self.boot_detail)
        self._schedule_announce(now)
        try:
            ic = self._take(self.lan_send, LAN_SEND, out)
        except CounterExhausted:
            # No value left under this CC_LAN: stay silent rather than reuse
            # an IV; only a key change (handheld, new CC_LAN) can help now.
            out.counters.append("counter_exhausted")
            return
        cipher = self.config.ciphers.get(self.keys.cc_lan, self.keys.ak, self.suite)
        out.uplink.append(
            seal_apdu(cipher, GENERAL_GLO_CIPHERING, self.title, ic, encode_message(event), security_control=self.sc)
        )
        out.counters.append("boot_events")

    def _schedule_announce(self, now: float) -> None:
        """The next announcement: exponential backoff with a jitter that is a
        pure function of (meter, attempt), so the machine stays deterministic."""
        c = self.config
        delay = min(c.boot_retry_s * 2 ** min(self.announce_attempts, 16), max(c.boot_retry_max_s, c.boot_retry_s))
        jitter = 0.5 + loadcurve.unit(loadcurve.mix64(loadcurve.seed_for(self.title) ^ (self.announce_attempts + 1)))
        self.announce_attempts += 1
        self.next_announce = self.next_due = now + delay * jitter

    # --- key transfer -------------------------------------------------------------------

    def _key_transfer(self, msg: KeyTransfer, now: float, out: Output) -> None:
        """Unwrap under CCC, persist the new keys (and reset their counters)
        before the ack, ack under the *old* AK, then switch the AK."""
        try:
            try:
                setup = SecuritySetup(msg.setup)
            except ValueError:
                raise MalformedMessage("unknown security setup") from None
            items = decode_key_transfer(self.keys.ccc, msg.param)
            targets = [(key_type_for(setup, key_id), key) for key_id, key in items]
            if len(targets) != 1:
                # The ack names one (key type, version, check value): one key
                # per transfer, so that it confirms exactly what was installed.
                raise MalformedMessage("one key per transfer")
        except ProtocolError as exc:
            out.rejected.append(exc.reason)
            out.counters.append("key_transfers_refused")
            self._send_lan(KeyTransferAck(msg.request_id, False, exc.reason, version=msg.version), out)
            return
        new_ak: SecretBytes | None = None
        for key_type, key in targets:
            if hmac.compare_digest(key, self.keys.get(key_type)):
                # A re-sent transfer (its ack was lost): already applied.
                # Resetting the counters again would reuse IVs under this key.
                continue
            out.persist.append(KeyWrite(key_type, key))
            if key_type == KeyType.AK:
                new_ak = key
                continue
            self.keys.set(key_type, key)
            send_slot, recv_slot = KEY_COUNTERS[key_type]
            fresh_send = SendCounter(0, block=self.config.counter_block)
            fresh_recv = ReceiveCounter(0)
            if key_type == KeyType.CC_LAN:
                self.lan_send, self.lan_recv = fresh_send, fresh_recv
                # The AARE kept for a repeated AARQ is under the old key: a
                # repeat of that AARQ now gets a fresh (refused) answer.
                self.last_association = None
            else:
                self.locale_send, self.locale_recv = fresh_send, fresh_recv
            out.persist.append(CounterMark(send_slot, 0))
            out.persist.append(CounterMark(recv_slot, 0))
            self.thresholds_reported.discard(key_type)
        key_type, key = targets[0]
        ack = KeyTransferAck(
            msg.request_id, True, key_type=key_type.value, version=msg.version,
            check=key_check_value(key_type, msg.version, key),
        )
        self._send_lan(ack, out)  # still under the old AK
        if new_ak is not None:
            self.prev_ak, self.prev_ak_until = self.keys.ak, now + self.config.ak_grace_s
            self.keys.ak = new_ak
        out.counters.append("key_transfers_applied")

    # --- gap-fill -------------------------------------------------------------------------

    def _gap_fill(self, req: GapFillRequest, now: float, out: Output) -> None:
        """Answer from the regenerable history, chunked under MAX_APDU_SIZE."""
        latest = math.floor(now / self.config.interval_s) - 1  # last finished interval
        oldest = max(0, latest - self.config.history + 1)
        lo, hi = max(req.first_seq, oldest), min(req.last_seq, latest)
        readings = loadcurve.readings(self.profile, lo, hi)
        unavailable = [k for k in range(req.first_seq, req.last_seq + 1) if k < oldest or k > latest]
        for chunk_readings, chunk_missing in _chunks(req.request_id, readings, unavailable):
            self._send_lan(GapFillReply(req.request_id, chunk_readings, chunk_missing), out)
        out.counters.append("gap_fill_replies")

    # --- sealing and opening ------------------------------------------------------------------

    def _take(self, counter: SendCounter, slot: str, out: Output) -> int:
        if counter.wants_reservation:
            mark = counter.next_reservation()
            counter.confirm_reservation(mark)  # durable before any frame of `out` leaves
            out.persist.append(CounterMark(slot, mark))
        return counter.take()

    def _send_lan(self, msg: Message, out: Output, pad: int = 0) -> None:
        self._send_lan_plaintext(encode_message(msg, pad=pad), out)

    def _send_lan_plaintext(self, plaintext: bytes, out: Output) -> None:
        """Seal an encoded message under the LAN session and queue it up."""
        assert self.session is not None
        try:
            out.uplink.append(self._seal_dc(self.session, plaintext))
        except CounterExhausted:
            # 2^32 frames under one session key: the head-end renews long
            # before; if it did not, forget the session and ask for a new one.
            out.counters.append("counter_exhausted")
            self.session = None
            self.last_association = None
            self.next_announce = self.next_due = 0.0

    def _session_cipher(self, session: Session) -> Suite0Cipher:
        """The cipher of (session key, current AK) for sealing: kept on the
        session (rebuilt if the AK changed since), or from the shared LRU."""
        ak = self.keys.ak
        if session.cipher_ak is ak:
            return session.cipher  # type: ignore[return-value]
        cipher = self.config.ciphers.get(session.key, ak, session.suite)
        if self.config.keep_session_ciphers:
            session.cipher, session.cipher_ak = cipher, ak
        return cipher

    def _seal_session(self, session: Session, msg: Message, pad: int = 0) -> bytes:
        return self._seal_dc(session, encode_message(msg, pad=pad))

    def _seal_dc(self, session: Session, plaintext: bytes) -> bytes:
        """general-ded-ciphering of ``plaintext`` under the session."""
        return seal_apdu(self._session_cipher(session), GENERAL_DED_CIPHERING, self.title, session.send.take(),
                         plaintext, security_control=SUITE_SC[session.suite])

    def _queue_event(self, event: Event, out: Output) -> None:
        if self.pending_events is None:
            self.pending_events = []
        if len(self.pending_events) >= _MAX_PENDING_EVENTS:
            self.pending_events.pop(0)
            out.counters.append("events_dropped")
        self.pending_events.append(event)

    @staticmethod
    def _parse_dc(data: bytes, peer: bytes, suite: int = 0) -> CipheredApdu:
        apdu = parse_apdu(data, suite=suite)
        if apdu.tag != GENERAL_DED_CIPHERING:
            raise MalformedFrame("expected general-ded-ciphering under the session")
        if apdu.system_title != peer:
            raise WrongPeer("frame from an unexpected system title")
        return apdu

    def _open_session(self, session: Session, apdu: CipheredApdu, now: float) -> Message:
        session.recv.check(apdu.invocation_counter)
        plaintext = self._open_with_grace(session.key, apdu, session.peer_title, now, session.suite)
        session.recv.accept(apdu.invocation_counter)  # only after the tag verified
        return decode_message(plaintext)

    def _open_with_grace(self, key: bytes, apdu: CipheredApdu, peer: bytes, now: float, suite: int = 0) -> bytes:
        """Open under the current AK, or under the previous one during its grace."""
        try:
            return open_apdu(self.config.ciphers.get(key, self.keys.ak, suite), apdu, peer)
        except AuthenticationFailed:
            if self.prev_ak is None or now >= self.prev_ak_until:
                raise
            return open_apdu(self.config.ciphers.get(key, self.prev_ak, suite), apdu, peer)


def _chunks(
    request_id: int, readings: list, unavailable: list[int]
) -> list[tuple[tuple, tuple[int, ...]]]:
    """Split a gap-fill answer into replies whose DC frame fits MAX_APDU_SIZE.

    Sizes are exact: the msgpack size of the empty reply, plus 2 bytes for
    each list header growing to array16, plus each item's own packed size.
    """
    budget = MAX_APDU_SIZE - _DC_OVERHEAD - len(encode_message(GapFillReply(request_id, (), ()))) - 4
    chunks: list[tuple[tuple, tuple[int, ...]]] = []
    cur_r: list = []
    cur_x: list[int] = []
    used = 0
    items = [(False, k, len(msgpack.packb(k))) for k in unavailable]
    items += [(True, r, len(msgpack.packb(r.to_map(), use_bin_type=True))) for r in readings]
    for is_reading, item, size in items:
        if used + size > budget and (cur_r or cur_x):
            chunks.append((tuple(cur_r), tuple(cur_x)))
            cur_r, cur_x, used = [], [], 0
        (cur_r if is_reading else cur_x).append(item)
        used += size
    if cur_r or cur_x or not chunks:
        chunks.append((tuple(cur_r), tuple(cur_x)))
    return chunks
