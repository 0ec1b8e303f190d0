"""A deterministic in-memory simulator: N ``Meter`` state machines and one
``HeadEndEngine`` on a fake clock, no broker, no disk.

What it does, each ``step(dt)``:

1. advance the clock;
2. hand every downlink frame that is due to its meter (``on_downlink``);
3. tick every meter that is due (``tick``), as the fleet's scheduler does;
4. group the uplink frames that are due by concentrator into relay batches
   (``encode_batch(Batch(conc, seq, frames))``) and feed them to
   ``engine.handle_batch(payload, now, conc)``;
5. ``engine.tick(now)``, ``engine.drain()``: apply the ``Commit`` to an
   in-memory model of the store, *then* put the downlink on the wire.

The two sides keep their durability rules, and the simulator checks them
instead of trusting them:

* a meter's ``Output.persist`` is applied to its NVM model before any of its
  frames leaves; every frame under CC_LAN must carry an IC below the send
  mark already in NVM, under the CC_LAN key already in NVM, and an accepted
  AARE may leave only once the receive mark covering its AARQ is in NVM;
* every downlink frame must carry an IC below a mark the store model already
  holds for its key (AARQ: the CC_LAN key row, DC: the session row).  One
  exception is only noted (``notes``), not flagged: a DC frame sealed under
  a session the engine dropped or replaced later in the same round (its row
  is gone, the engine never seals under that key again: no IV can repeat);
* no durable send mark or receive floor ever moves back for the same key;
* the ledger: every (key identity, sender title, IC) put on the wire, in
  both directions.  A second frame with the same triple is an IV reuse.
  The key identity is a hash of the key bytes, never the key.

The simulator knows every key (it is the test), so it identifies the key of
each frame by trial decryption and decodes the message inside.  That lets a
``Network`` hook drop, duplicate, reorder, delay or tamper with frames
chosen by content ("drop every KeyTransferAck of m000001"), and lets the
tests compare what the head-end stored with what each meter pushed.

Meters can be killed (``kill_meter``: rebuilt from what they asked to
persist, nothing else, like kill -9; ``crash_meter_on_next_output``: after
its marks are durable, before its frames leave; ``power_fail``: the meter's
own outage path) and so can the head-end (``restart_headend``: a new engine
loaded from a ``Snapshot`` of the store model, i.e. of the commits it
drained; ``lose_undrained`` or ``step(kill_headend_before_commit=True)``:
kill -9 before the round's commit).

Randomness: keys come from ``secrets`` (they never steer the control flow);
every fault comes from a seeded ``random.Random``, so a run is reproducible.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import heapq
import random
import secrets
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ami.protocol import suite1
from ami.protocol import (
    KeyType,
    ProtocolError,
    SecretBytes,
    Suite0Cipher,
    decode_message,
    open_apdu,
    parse_apdu,
)
from ami.protocol.association import MECHANISM_HLS_ECDSA, decode_initiate_request, parse_aare, parse_aarq
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    GLO_INITIATE_RESPONSE,
)
from ami.protocol.keys import KeyState
from ami.protocol.messages import GapFillReply, Reading
from ami.protocol.messages import Batch, encode_batch
from ami.runtime.network import HEADEND_TITLE, TSP_TITLE, concentrator_id, meter_id, meter_title
from ami.machines.headend import HeadEndEngine, Policy
from ami.machines.headend_records import Commit, KeyRow, MeterRow, SessionRow, Snapshot
from ami.machines import loadcurve
from ami.machines.meter import (
    ASSOC_RECV,
    LAN_RECV,
    LAN_SEND,
    CipherCache,
    CounterMark,
    KeyWrite,
    Meter,
    MeterConfig,
    MeterKeys,
    Output,
)

INTERVAL = 60
T0 = 1_780_000_000.0
FACTORY_TYPES = (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)


def key_id(key: bytes) -> str:
    """The ledger's name for a key: a hash, never the key."""
    return hashlib.sha256(b"sim-ledger|" + bytes(key)).hexdigest()[:16]


def suite_of(suites: str, i: int) -> int:
    """"0", "1", or "mixed" (every other meter in suite 1)."""
    return {"0": 0, "1": 1}.get(suites, i % 2)


def make_records(n_meters: int, n_concentrators: int, suites: str = "0") -> list[dict[str, str]]:
    """Factory records as ``ami provision`` writes them (hex), fresh random keys.
    Suite-1 meters also get a signing key pair (its private half is the
    meter's alone: ``sign_private``, which the head-end never sees)."""
    records = []
    for i in range(n_meters):
        conc = concentrator_id(i * n_concentrators // n_meters + 1)
        record = {
            "meter": meter_id(i + 1),
            "system_title": meter_title(i + 1).hex(),
            "concentrator": conc,
            **{kt.value: secrets.token_bytes(16).hex() for kt in FACTORY_TYPES},
            "suite": suite_of(suites, i),
        }
        if record["suite"]:
            scalar = suite1.scalar_from_rng(secrets.token_bytes)
            record["sign_private"] = scalar.hex()
            record["sign_public"] = suite1.SoftwareSigner.from_scalar(scalar).public_key_bytes().hex()
        records.append(record)
    return records


def default_policy(**overrides: Any) -> Policy:
    """Small counter blocks so that reservations happen all the time.  Sessions
    are not renewed by age (the packaged 120 s would renew them mid-scenario)
    unless a test asks for it."""
    base: dict[str, Any] = dict(counter_block=8, max_events_per_s=100_000, session_max_age_s=3600.0)
    base.update(overrides)
    return Policy(**base)


# --------------------------------------------------------------------------
# wire and network


@dataclass
class Wire:
    """One frame as its sender put it on the wire (what the ledger records)."""

    direction: str  # "up" (meter -> head-end) or "down"
    meter: str
    concentrator: str
    data: bytes
    at: float
    kind: str  # "db", "dc", "aarq", "aare", "aare_rejected"
    key: str | None = None  # key identity (hash) of the encryption key
    key_type: str | None = None  # "session", "cc_lan", ...
    sender: bytes | None = None
    ic: int | None = None
    msg: Any = None  # decoded message (DB / DC), InitiateRequest (AARQ)
    extra_ics: tuple[int, ...] = ()  # further IVs under the same key (an AARE's f(CtoS))

    @property
    def msg_type(self) -> str:
        return type(self.msg).__name__ if self.msg is not None else self.kind


class Network:
    """A perfect network.  Hooks may be given as callables or overridden.

    ``route(sim, wire) -> [(delay_s, bytes), ...]``: [] drops the frame, two
    entries duplicate it, a delay reorders it, other bytes tamper with it.
    ``batches(sim, [(wan_topic_concentrator, payload), ...])`` sees the uplink
    batches of one step and returns what reaches the head-end.
    """

    def __init__(
        self,
        up: Callable[[Sim, Wire], list[tuple[float, bytes]]] | None = None,
        down: Callable[[Sim, Wire], list[tuple[float, bytes]]] | None = None,
        batches: Callable[[Sim, list[tuple[str, bytes]]], list[tuple[str, bytes]]] | None = None,
    ) -> None:
        self._up, self._down, self._batches = up, down, batches

    def route(self, sim: Sim, wire: Wire) -> list[tuple[float, bytes]]:
        hook = self._up if wire.direction == "up" else self._down
        return hook(sim, wire) if hook is not None else [(0.0, wire.data)]

    def batches(self, sim: Sim, batches: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return self._batches(sim, batches) if self._batches is not None else batches


class Drop(Network):
    """Drop (and keep, for later replay) the frames ``pred`` selects, at most ``limit``."""

    def __init__(self, pred: Callable[[Wire], bool], limit: int | None = None,
                 then: Network | None = None) -> None:
        super().__init__()
        self.pred, self.limit, self.then = pred, limit, then or Network()
        self.dropped: list[Wire] = []

    def route(self, sim: Sim, wire: Wire) -> list[tuple[float, bytes]]:
        if self.pred(wire) and (self.limit is None or len(self.dropped) < self.limit):
            self.dropped.append(wire)
            return []
        return self.then.route(sim, wire)

    def batches(self, sim: Sim, batches: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return self.then.batches(sim, batches)


class Chaos(Network):
    """Random drop / duplicate / delay (reorder) / tamper (one bit) of frames, seeded.

    ``only(wire) -> bool`` restricts the faults to some frames.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        drop: float = 0.0,
        dup: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 5.0,
        tamper: float = 0.0,
        directions: tuple[str, ...] = ("up", "down"),
        only: Callable[[Wire], bool] | None = None,
    ) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.drop, self.dup, self.delay, self.max_delay, self.tamper = drop, dup, delay, max_delay, tamper
        self.directions = directions
        self.only = only
        self.stats: Counter[str] = Counter()

    def route(self, sim: Sim, wire: Wire) -> list[tuple[float, bytes]]:
        if wire.direction not in self.directions or (self.only is not None and not self.only(wire)):
            return [(0.0, wire.data)]
        rng = self.rng
        if rng.random() < self.drop:
            self.stats[f"dropped_{wire.direction}"] += 1
            return []
        data = wire.data
        if self.tamper and rng.random() < self.tamper:
            self.stats[f"tampered_{wire.direction}"] += 1
            bit = rng.randrange(len(data) * 8)
            data = bytearray(data)
            data[bit // 8] ^= 0x80 >> (bit % 8)
            data = bytes(data)
        out = [(self._delay(), data)]
        if rng.random() < self.dup:
            self.stats[f"duplicated_{wire.direction}"] += 1
            out.append((self._delay(), data))
        return out

    def _delay(self) -> float:
        if self.delay and self.rng.random() < self.delay:
            self.stats["delayed"] += 1
            return self.rng.uniform(0.0, self.max_delay)
        return 0.0


# --------------------------------------------------------------------------
# the two durable stores, as models


@dataclass
class NvmModel:
    """What one meter asked to persist: keys and counter marks (last wins)."""

    keys: dict[KeyType, SecretBytes] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    writes: int = 0


class StoreModel:
    """The head-end store applied commit by commit (SQLite semantics)."""

    def __init__(self) -> None:
        self.meters: dict[str, MeterRow] = {}
        self.keys: dict[tuple[str, KeyType, int], KeyRow] = {}
        self.sessions: dict[tuple[str, bool], SessionRow] = {}  # (meter, pending)
        self.readings: dict[tuple[str, int], tuple] = {}
        self.writes: Counter[tuple[str, int]] = Counter()
        self.durable_tx: dict[str, int] = {}  # key identity -> highest durable send mark
        self.durable_rx: dict[tuple[str, str], int] = {}  # (key identity, what) -> rx floor
        self.commits = 0
        self.problems: list[str] = []

    @classmethod
    def from_records(cls, records: list[dict[str, str]], now: float) -> StoreModel:
        store = cls()
        for r in records:
            store.meters[r["meter"]] = MeterRow(
                r["meter"], bytes.fromhex(r["system_title"]), r["concentrator"], suite=r["suite"],
                sign_public=bytes.fromhex(r["sign_public"]) if r["suite"] else None,
            )
            for kt in FACTORY_TYPES:
                store.keys[(r["meter"], kt, 1)] = KeyRow(
                    r["meter"], kt, 1, KeyState.ACTIVE, now, 0, 0, SecretBytes(bytes.fromhex(r[kt.value]))
                )
        return store

    def _marks(self, what: str, key: bytes, tx: int, rx: int) -> None:
        kid = key_id(key)
        if tx < self.durable_tx.get(kid, 0):
            self.problems.append(f"{what}: durable send mark went back {self.durable_tx[kid]} -> {tx}")
        self.durable_tx[kid] = max(tx, self.durable_tx.get(kid, 0))
        if rx < self.durable_rx.get((kid, what), 0):
            self.problems.append(f"{what}: durable receive floor went back {self.durable_rx[(kid, what)]} -> {rx}")
        self.durable_rx[(kid, what)] = max(rx, self.durable_rx.get((kid, what), 0))

    def apply(self, c: Commit) -> None:
        self.commits += 1
        for row in c.readings:
            ident = (row[0], row[1])
            self.writes[ident] += 1
            self.readings.setdefault(ident, tuple(row))  # ON CONFLICT DO NOTHING
        for k in c.keys:
            ident = (k.meter, k.key_type, k.version)
            if k.key is not None:  # INSERT OR REPLACE
                self.keys[ident] = replace(k)
            elif ident in self.keys:  # UPDATE (of nothing if missing)
                row = self.keys[ident]
                row.state, row.tx_mark, row.rx_lowest = k.state, k.tx_mark, k.rx_lowest
            row = self.keys.get(ident)
            if row is not None:
                self._marks(f"{k.meter}/{k.key_type.value}/v{k.version}", row.key, row.tx_mark, row.rx_lowest)
        for s in c.sessions:
            ident = (s.meter, bool(s.pending))
            if s.deleted:  # DELETE ... WHERE meter = ? AND pending = ?
                self.sessions.pop(ident, None)
            elif s.key is not None:  # INSERT OR REPLACE, primary key (meter, pending)
                self.sessions[ident] = replace(s)
            else:  # UPDATE ... WHERE meter = ? AND pending = 0 AND serial = ?
                cur = self.sessions.get((s.meter, False))
                if cur is not None and cur.serial == s.serial:
                    cur.tx_mark, cur.rx_lowest, cur.frames = s.tx_mark, s.rx_lowest, s.frames
            cur = self.sessions.get((s.meter, False))
            if cur is not None and not s.deleted and not s.pending:
                self._marks(f"{s.meter}/session", cur.key, cur.tx_mark, cur.rx_lowest)
        for m in c.meters:
            row = self.meters[m.meter]
            row.high_seq, row.gaps = m.high_seq, list(m.gaps)

    def snapshot(self) -> Snapshot:
        versions: dict[tuple[str, KeyType], int] = {}
        for (mid, kt, version) in self.keys:
            versions[(mid, kt)] = max(version, versions.get((mid, kt), 0))
        return Snapshot(
            [replace(m, gaps=list(m.gaps)) for m in self.meters.values()],
            [replace(k) for k in self.keys.values() if k.state is not KeyState.EXPIRED],
            [replace(s) for s in self.sessions.values()],
            versions,
        )

    def copy(self) -> StoreModel:
        """A backup of the store as it is now (``Sim.restore_headend``)."""
        return copy.deepcopy(self)

    def key_row(self, meter: str, key: bytes) -> KeyRow | None:
        for (mid, _kt, _v), row in self.keys.items():
            if mid == meter and row.key == key:
                return row
        return None

    def stored_seqs(self, meter: str) -> list[int]:
        return sorted(seq for (mid, seq) in self.readings if mid == meter)


# --------------------------------------------------------------------------
# the simulator


class Sim:
    def __init__(
        self,
        n_meters: int = 4,
        n_concentrators: int = 2,
        *,
        policy: Policy | None = None,
        network: Network | None = None,
        interval_s: int = INTERVAL,
        history: int = 2880,
        boot_retry_s: float = 5.0,
        ak_grace_s: float = 60.0,
        meter_counter_block: int = 8,
        boot_spread_s: float = 0.0,
        t0: float = T0,
        suites: str = "0",
    ) -> None:
        self.now = t0
        self.interval_s = interval_s
        self.records = make_records(n_meters, n_concentrators, suites)
        self.headend_signer = suite1.SoftwareSigner.from_scalar(suite1.scalar_from_rng(secrets.token_bytes))
        self.factory: dict[str, dict[KeyType, SecretBytes]] = {
            r["meter"]: {kt: SecretBytes(bytes.fromhex(r[kt.value])) for kt in FACTORY_TYPES} for r in self.records
        }
        self.titles = {r["meter"]: bytes.fromhex(r["system_title"]) for r in self.records}
        self.record_of = {r["meter"]: r for r in self.records}
        self.by_title = {t: m for m, t in self.titles.items()}
        self.conc_of = {r["meter"]: r["concentrator"] for r in self.records}
        self.concentrators = sorted(set(self.conc_of.values()))
        self.config = MeterConfig(
            headend_title=HEADEND_TITLE,
            tsp_title=TSP_TITLE,
            interval_s=interval_s,
            history=history,
            boot_retry_s=boot_retry_s,
            ak_grace_s=ak_grace_s,
            counter_block=meter_counter_block,
            ciphers=CipherCache(256),
            headend_sign_public=self.headend_signer.public_key_bytes(),
            rng=secrets.token_bytes,
        )
        self.profiles = {m: loadcurve.profile(loadcurve.seed_for(t), interval_s) for m, t in self.titles.items()}
        self.offsets = {m: 0.5 * interval_s * (i + 1) / (n_meters + 1) for i, m in enumerate(self.titles)}
        self.network = network or Network()
        self.policy = policy or default_policy()

        # secrets the simulator knows (it is the test): never printed
        self.all_keys: list[bytes] = [k for keys in self.factory.values() for k in keys.values()]
        self._known: dict[str, OrderedDict[bytes, str]] = {m: OrderedDict() for m in self.titles}
        self._aks: dict[str, OrderedDict[bytes, None]] = {m: OrderedDict() for m in self.titles}
        self._ciphers: OrderedDict[tuple[bytes, bytes], Suite0Cipher] = OrderedDict()

        # meters and their NVM
        self.nvm: dict[str, NvmModel] = {m: NvmModel() for m in self.titles}
        self.meters: dict[str, Meter] = {}
        for i, mid in enumerate(self.titles):
            self.meters[mid] = self._build_meter(mid, boot_at=t0 + i * boot_spread_s)

        # head-end and its store
        self.store = StoreModel.from_records(self.records, t0)
        self.engine = self._new_engine()
        self.engine.load(self.store.snapshot(), self.now)
        self.headend_restarts = 0

        # wire, ledger, observations
        self._queue: dict[str, list[tuple[float, int, str, str, bytes]]] = {"up": [], "down": []}
        self._seq = 0
        self._batch_seq: Counter[str] = Counter()
        self.wire: list[Wire] = []
        self.ledger: dict[tuple[str, bytes, int], Wire] = {}
        self.violations: list[str] = []
        self.notes: Counter[str] = Counter()  # benign oddities worth a look
        self.events: list[dict] = []
        self.replies: list[tuple[str, dict]] = []
        self.pushed: dict[str, Counter[int]] = {m: Counter() for m in self.titles}
        self.gap_replied: dict[str, Counter[int]] = {m: Counter() for m in self.titles}
        self.max_pushed: dict[str, int] = {}
        self.meter_counters: Counter[str] = Counter()
        self.meter_rejected: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.meter_kills = 0
        self._crash_on_output: dict[str, float] = {}
        for mid in self.titles:
            self._refresh(mid)

    # -- construction -------------------------------------------------------

    def _new_key(self) -> bytes:
        key = secrets.token_bytes(16)
        self.all_keys.append(key)
        return key

    def _new_engine(self) -> HeadEndEngine:
        return HeadEndEngine(HEADEND_TITLE, self.policy, self._new_key, self.headend_signer)

    def _build_meter(self, mid: str, boot_at: float) -> Meter:
        """Power-on state: factory keys overridden by NVM keys, NVM marks."""
        nvm = self.nvm[mid]
        keys = dict(self.factory[mid])
        keys.update(nvm.keys)
        mk = MeterKeys(keys[KeyType.CCC], keys[KeyType.AK], keys[KeyType.CC_LAN], keys[KeyType.CC_LOCALE])
        record = self.record_of[mid]
        signer = suite1.SoftwareSigner.from_scalar(bytes.fromhex(record["sign_private"])) if record["suite"] else None
        return Meter(
            mid,
            self.titles[mid],
            mk,
            self.config,
            concentrator=self.conc_of[mid],
            marks=dict(nvm.marks),
            push_offset=self.offsets[mid],
            boot_at=boot_at,
            suite=record["suite"],
            signer=signer,
        )

    # -- failures ------------------------------------------------------------

    def kill_meter(self, mid: str, downtime: float = 0.0) -> None:
        """kill -9: RAM is gone; the meter comes back from its NVM after ``downtime``."""
        self.meter_kills += 1
        self.meters[mid] = self._build_meter(mid, boot_at=self.now + downtime)
        self._refresh(mid)

    def power_fail(self, mid: str, duration: float) -> None:
        """An outage the meter sees coming: last-gasp event, then off (RAM lost)."""
        self._meter_output(mid, self.meters[mid].power_fail(self.now, duration))

    def crash_meter_on_next_output(self, mid: str, downtime: float = 0.0) -> None:
        """Crash after the next output's marks are durable but before its frames leave."""
        self._crash_on_output[mid] = downtime

    def restart_headend(self, *, lose_undrained: bool = False) -> None:
        """Rebuild the engine from the store model (what it committed).

        ``lose_undrained``: kill -9 before the pending effects were drained
        (their commit and frames never happen)."""
        if not lose_undrained:
            self._drain()
        self.headend_restarts += 1
        self.engine = self._new_engine()
        self.engine.load(self.store.snapshot(), self.now)
        for mid in self.titles:
            self._refresh(mid)

    def restore_headend(self, backup: StoreModel) -> None:
        """The head-end restarted on a restored backup (or a copy) of its
        store: every send mark in it is behind what was really used."""
        self.headend_restarts += 1
        self.store = backup.copy()
        self.engine = self._new_engine()
        self.engine.load(self.store.snapshot(), self.now)
        for mid in self.titles:
            self._refresh(mid)

    # -- known keys (for identification) --------------------------------------

    def _learn(self, mid: str, key: bytes | None, label: str) -> None:
        if key is None:
            return
        known = self._known[mid]
        key = bytes(key)
        known[key] = label
        known.move_to_end(key)
        while len(known) > 24:
            known.popitem(last=False)

    def _learn_ak(self, mid: str, ak: bytes | None) -> None:
        if ak is not None:
            self._aks[mid][bytes(ak)] = None
            self._aks[mid].move_to_end(bytes(ak))

    def _refresh(self, mid: str) -> None:
        meter = self.meters[mid]
        self._learn(mid, meter.keys.cc_lan, "cc_lan")
        self._learn(mid, meter.keys.cc_locale, "cc_locale")
        self._learn_ak(mid, meter.prev_ak)
        self._learn_ak(mid, meter.keys.ak)
        m = self.engine.meters.get(mid)
        if m is not None:
            for kt in (KeyType.CC_LAN, KeyType.CC_LOCALE):
                for gk in m.keys.get(kt, {}).values():
                    self._learn(mid, gk.key, kt.value)
            for gk in m.keys.get(KeyType.AK, {}).values():
                self._learn_ak(mid, gk.key)
            if m.association is not None:
                self._learn(mid, m.association.session_key, "session")
            for s in (m.previous, m.session):
                if s is not None:
                    self._learn(mid, s.key, "session")
        if meter.session is not None:
            self._learn(mid, meter.session.key, "session")

    def _cipher(self, key: bytes, ak: bytes, suite: int = 0) -> Suite0Cipher:
        c = self._ciphers.get((key, ak, suite))
        if c is None:
            c = self._ciphers[(key, ak, suite)] = suite1.Suite1Cipher(key, ak) if suite else Suite0Cipher(key, ak)
            if len(self._ciphers) > 512:
                self._ciphers.popitem(last=False)
        return c

    def _trial_open(self, mid: str, apdu, sender: bytes) -> tuple[bytes, str, bytes] | None:
        aks = list(reversed(self._aks[mid]))
        known = self._known[mid]
        suite = apdu.security_control & 0x0F
        for key in reversed(known):
            for ak in aks:
                try:
                    return key, known[key], open_apdu(self._cipher(key, ak, suite), apdu, sender)
                except ProtocolError:
                    continue
        # Fallback: every key ever generated (a key born and dropped within one call).
        for key in reversed(self.all_keys):
            for ak in aks:
                try:
                    plain = open_apdu(self._cipher(key, ak, suite), apdu, sender)
                except ProtocolError:
                    continue
                self._learn(mid, key, "session")
                return bytes(key), "session", plain
        return None

    def classify(self, direction: str, mid: str, conc: str, data: bytes) -> tuple[Wire, bytes | None]:
        """Identify the key, sender and IC of a genuine frame, and decode it.

        Returns the ``Wire`` (which names the key by its hash only) and the
        key itself, for the durability checks."""
        w = Wire(direction, mid, conc, data, self.now, "unknown")
        try:
            if data[:1] == b"\x61":
                aare = parse_aare(data)
                if not aare.accepted or aare.initiate_apdu is None:
                    w.kind = "aare_rejected"
                    return w, None
                if self.record_of[mid]["suite"]:
                    # Signed, not ciphered: no IV.  (The meter's signature
                    # over both ephemeral keys is checked by the head-end.)
                    w.kind, w.sender = "aare_s1", aare.responding_title
                    return w, None
                apdu, w.sender, w.kind = parse_apdu(aare.initiate_apdu), aare.responding_title, "aare"
                if aare.auth_value is not None:  # f(CtoS) = SC || IC || GMAC: one more IV
                    w.extra_ics = (int.from_bytes(aare.auth_value[1:5], "big"),)
            elif data[:1] == b"\x60":
                aarq = parse_aarq(data)
                if aarq.mechanism == MECHANISM_HLS_ECDSA:
                    # IC (4) || signature: a counter the meter checks, no IV.
                    w.kind, w.sender = "aarq_s1", aarq.calling_title
                    w.ic = int.from_bytes(aarq.initiate_apdu[:4], "big")
                    return w, None
                apdu, w.sender, w.kind = parse_apdu(aarq.initiate_apdu), aarq.calling_title, "aarq"
            else:
                apdu = parse_apdu(data, suite=self.record_of[mid]["suite"])
                w.sender = apdu.system_title
                w.kind = {GENERAL_GLO_CIPHERING: "db", GENERAL_DED_CIPHERING: "dc"}.get(apdu.tag, "unknown")
        except ProtocolError as exc:
            self.violations.append(f"{direction} frame of {mid} does not parse: {exc.reason}")
            return w, None
        w.ic = apdu.invocation_counter
        found = self._trial_open(mid, apdu, w.sender)
        if found is None:
            self.violations.append(f"{direction} {w.kind} frame of {mid} opens under no known key")
            return w, None
        key, w.key_type, plain = found
        w.key = key_id(key)
        try:
            if w.kind == "aarq":
                assert apdu.tag == GLO_INITIATE_REQUEST
                w.msg = decode_initiate_request(plain)
                if w.msg.dedicated_key is not None:
                    self._learn(mid, w.msg.dedicated_key, "session")
            elif w.kind == "aare":
                assert apdu.tag == GLO_INITIATE_RESPONSE
            elif w.kind in ("db", "dc"):
                w.msg = decode_message(plain)
        except ProtocolError:
            pass
        return w, key

    # -- the wire ---------------------------------------------------------------

    def _put_on_wire(self, w: Wire, key: bytes | None) -> None:
        self.wire.append(w)
        if w.key is not None and w.sender is not None and w.ic is not None:
            for ic in (w.ic, *w.extra_ics):
                ident = (w.key, w.sender, ic)
                first = self.ledger.get(ident)
                # The same frame sent again (an AARQ retransmitted on a timeout,
                # a cached AARE) is one use of its IV; a different frame is reuse.
                if first is not None and first.data != w.data:
                    self.violations.append(
                        f"(key, IV) reuse: {w.direction} {w.kind} of {w.meter} key {w.key} sender {w.sender.hex()} "
                        f"IC {ic} at {w.at - T0:.0f}s, first at {first.at - T0:.0f}s ({first.kind})"
                    )
                elif first is None:
                    self.ledger[ident] = w
        if w.direction == "up":
            self._check_meter_durability(w, key)
            if isinstance(w.msg, Reading):
                self.pushed[w.meter][w.msg.seq] += 1
                self.max_pushed[w.meter] = max(self.max_pushed.get(w.meter, -1), w.msg.seq)
            elif isinstance(w.msg, GapFillReply):
                for r in w.msg.readings:
                    self.gap_replied[w.meter][r.seq] += 1
        else:
            self._check_headend_durability(w, key)
        for delay, data in self.network.route(self, w):
            self._seq += 1
            heapq.heappush(self._queue[w.direction], (self.now + delay, self._seq, w.concentrator, w.meter, data))

    def _check_meter_durability(self, w: Wire, key: bytes | None) -> None:
        if w.kind not in ("db", "aare") or key is None:
            return  # session frames: the key lives in RAM, nothing to persist
        nvm = self.nvm[w.meter]
        durable = nvm.keys.get(KeyType.CC_LAN, self.factory[w.meter][KeyType.CC_LAN])
        if key != durable:
            self.violations.append(f"{w.meter} sealed a {w.kind} under a CC_LAN that is not in NVM")
        elif max((w.ic, *w.extra_ics)) >= nvm.marks.get(LAN_SEND, 0):
            self.violations.append(
                f"{w.meter} sent {w.kind} IC {w.ic} not below its durable mark {nvm.marks.get(LAN_SEND, 0)}"
            )

    def _check_headend_durability(self, w: Wire, key: bytes | None) -> None:
        if key is None:
            return
        if w.kind == "aarq":
            row = self.store.key_row(w.meter, key)
            if row is None:
                self.violations.append(f"AARQ to {w.meter} under a CC_LAN the store does not hold")
            elif w.ic >= self.store.durable_tx.get(key_id(key), 0):
                self.violations.append(f"AARQ to {w.meter} IC {w.ic} not below the durable mark")
        elif w.kind == "dc":
            if self.record_of[w.meter]["suite"]:
                # Suite 1: the session key lives in the head-end's RAM only
                # (never stored, never restored): no mark needs to be durable.
                return
            row = self.store.sessions.get((w.meter, False))
            if row is not None and row.key == key:
                mark = self.store.durable_tx.get(key_id(key), 0)
                if w.ic >= mark:
                    self.violations.append(f"DC to {w.meter} IC {w.ic} not below the durable mark {mark}")
                return
            m = self.engine.meters.get(w.meter)
            if m is not None and m.session is not None and m.session.key == key:
                self.violations.append(f"DC to {w.meter} under its current session, which the store does not hold")
            else:
                # Sealed under a session the engine dropped or replaced later
                # in the same round (a boot event, a renewal): its row is gone,
                # the head-end will never seal under that key again, so no IV
                # can be reused; the ledger still checks the frame.
                self.notes["dc_under_session_retired_same_round"] += 1

    def _pop_due(self, direction: str) -> list[tuple[str, str, bytes]]:
        q = self._queue[direction]
        out = []
        while q and q[0][0] <= self.now:
            _due, _seq, conc, mid, data = heapq.heappop(q)
            out.append((conc, mid, data))
        return out

    @property
    def in_flight(self) -> int:
        return len(self._queue["up"]) + len(self._queue["down"])

    # -- meters ------------------------------------------------------------------

    def _meter_output(self, mid: str, out: Output, *, after_aarq_ic: int | None = None) -> None:
        nvm = self.nvm[mid]
        rewritten = {item.key_type for item in out.persist if isinstance(item, KeyWrite)}
        for item in out.persist:  # 1. durable first
            nvm.writes += 1
            if isinstance(item, KeyWrite):
                nvm.keys[item.key_type] = item.key
            elif isinstance(item, CounterMark):
                old = nvm.marks.get(item.slot, 0)
                reset = item.value == 0 and (
                    (item.slot.startswith("lan") and KeyType.CC_LAN in rewritten)
                    or (item.slot.startswith("locale") and KeyType.CC_LOCALE in rewritten)
                )
                if item.value < old and not reset:
                    self.violations.append(f"{mid} NVM mark {item.slot} went back {old} -> {item.value}")
                nvm.marks[item.slot] = item.value
        self.meter_counters.update(out.counters)
        self.meter_rejected.update(out.rejected)
        if mid in self._crash_on_output and (out.uplink or out.local):
            downtime = self._crash_on_output.pop(mid)
            self.kill_meter(mid, downtime)  # the frames never leave
            return
        self._refresh(mid)
        conc = self.conc_of[mid]
        for data in out.uplink:  # 2. then the frames
            w, key = self.classify("up", mid, conc, data)
            slot = ASSOC_RECV if w.kind == "aare_s1" else LAN_RECV
            if w.kind in ("aare", "aare_s1") and after_aarq_ic is not None and nvm.marks.get(slot, 0) <= after_aarq_ic:
                self.violations.append(f"{mid} accepted AARQ IC {after_aarq_ic} before persisting its receive mark")
            self._put_on_wire(w, key)

    def _deliver_down(self, conc: str, mid: str, data: bytes) -> None:
        meter = self.meters.get(mid)
        if meter is None or self.conc_of[mid] != conc:
            self.violations.append(f"downlink for {mid} relayed by {conc}, which does not serve it")
            return
        self.delivered["down"] += 1
        aarq_ic = None
        if data[:1] == b"\x60":
            try:
                aarq = parse_aarq(data)
                if aarq.mechanism == MECHANISM_HLS_ECDSA:
                    aarq_ic = int.from_bytes(aarq.initiate_apdu[:4], "big")
                else:
                    aarq_ic = parse_apdu(aarq.initiate_apdu).invocation_counter
            except ProtocolError:
                pass
        self._meter_output(mid, meter.on_downlink(data, self.now), after_aarq_ic=aarq_ic)
        meter = self.meters[mid]
        if self.now >= meter.next_due:  # as the fleet does after a downlink
            self._meter_output(mid, meter.tick(self.now))

    # -- head-end --------------------------------------------------------------

    def _drain(self) -> None:
        effects = self.engine.drain()
        self.store.apply(effects.commit)  # 1. commit
        self.events += effects.events
        self.replies += effects.replies
        for mid in self.titles:
            self._refresh(mid)
        for conc, frames in effects.downlink.items():  # 2. then publish
            for mid, apdu in frames:
                self._put_on_wire(*self.classify("down", mid, conc, apdu))

    def _deliver_up(self, items: list[tuple[str, str, bytes]]) -> None:
        by_conc: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        for conc, mid, data in items:
            by_conc[conc].append((mid, data))
        batches = []
        for conc, frames in by_conc.items():
            self._batch_seq[conc] += 1
            batches.append((conc, encode_batch(Batch(conc, self._batch_seq[conc], tuple(frames)))))
        for wan, payload in self.network.batches(self, batches):
            self.delivered["batches"] += 1
            self.engine.handle_batch(payload, self.now, wan)

    def inject_frames(self, conc: str, frames: Iterable[tuple[str, bytes]], *, wan: str | None = None) -> None:
        """A batch straight into the head-end (a hostile or replaying relay)."""
        self._batch_seq[conc] += 1
        payload = encode_batch(Batch(conc, self._batch_seq[conc], tuple(frames)))
        self.engine.handle_batch(payload, self.now, wan or conc)

    def inject_payload(self, payload: bytes, wan: str | None) -> None:
        self.engine.handle_batch(payload, self.now, wan)

    def command(self, cmd: dict) -> None:
        self.engine.command(cmd, self.now)

    # -- time ---------------------------------------------------------------------

    def step(self, dt: float = 1.0, *, kill_headend_before_commit: bool = False) -> None:
        """One round.  ``kill_headend_before_commit``: the head-end dies after
        handling this round's batches and timers, before its commit (kill -9)."""
        self.now += dt
        for conc, mid, data in self._pop_due("down"):
            self._deliver_down(conc, mid, data)
        for mid in list(self.meters):
            meter = self.meters[mid]
            if self.now >= meter.next_due:
                self._meter_output(mid, meter.tick(self.now))
        ups = self._pop_due("up")
        if ups:
            self.delivered["up"] += len(ups)
            self._deliver_up(ups)
        self.engine.tick(self.now)
        if kill_headend_before_commit:
            self.restart_headend(lose_undrained=True)
        else:
            self._drain()

    def run(self, seconds: float, dt: float = 1.0) -> None:
        end = self.now + seconds
        while self.now + dt <= end + 1e-9:
            self.step(dt)

    def run_until(self, pred: Callable[[], bool], timeout: float, dt: float = 1.0) -> bool:
        end = self.now + timeout
        while self.now < end:
            if pred():
                return True
            self.step(dt)
        return pred()

    def settle(self, network: Network | None = None, intervals: int = 3) -> None:
        """Heal the network and run until every gap is filled (bounded)."""
        self.network = network or Network()
        self.run(self.interval_s * intervals)
        self.run_until(self.all_associated, timeout=self.interval_s * 10)
        # One more push after the last (re-)association reveals any gap left...
        self.run(self.interval_s + self.policy.gap_fill_delay_s + 2)
        # ...and gap-fill closes it.
        self.run_until(lambda: self.all_associated() and not self.gaps() and self.in_flight == 0,
                       timeout=self.interval_s * 10)

    # -- observations -------------------------------------------------------------

    def all_associated(self) -> bool:
        return all(
            meter.session is not None
            and self.engine.meters[mid].session is not None
            and self.engine.meters[mid].session.key == meter.session.key
            for mid, meter in self.meters.items()
        )

    def gaps(self) -> dict[str, list[int]]:
        return {mid: sorted(m.gaps) for mid, m in self.engine.meters.items() if m.gaps}

    def truth(self, mid: str, seq: int) -> Reading:
        return loadcurve.reading(self.profiles[mid], seq)

    def frames(self, direction: str | None = None, meter: str | None = None, msg: type | None = None,
               kind: str | None = None) -> list[Wire]:
        return [
            w for w in self.wire
            if (direction is None or w.direction == direction)
            and (meter is None or w.meter == meter)
            and (msg is None or isinstance(w.msg, msg))
            and (kind is None or w.kind == kind)
        ]

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("kind") == kind]

    def replies_to(self, topic: str) -> list[dict]:
        return [body for t, body in self.replies if t == topic]

    # -- the assertions every test makes ---------------------------------------

    def assert_clean(self) -> None:
        """No (key, IV) reuse, every durability rule kept, nothing misrouted."""
        problems = self.violations + self.store.problems
        assert not problems, "\n".join(problems[:20])

    def reading_problems(self, *, complete: bool = True) -> list[str]:
        """Stored exactly once, equal to the meter's curve, and (``complete``)
        no hole between the first stored reading and the last one pushed."""
        problems = []
        for ident, n in self.store.writes.items():
            if n != 1:
                problems.append(f"{ident} written {n} times")
        for (mid, seq), row in self.store.readings.items():
            r = self.truth(mid, seq)
            if row[2:6] != (r.ts, r.energy_wh, r.power_w, r.voltage_dv):
                problems.append(f"{mid} seq {seq} stored {row[2:6]}, meter has {(r.ts, r.energy_wh, r.power_w)}")
        for mid in self.titles:
            stored = set(self.store.stored_seqs(mid))
            pushed = set(self.pushed[mid])
            if pushed and not stored:
                problems.append(f"{mid} pushed {len(pushed)} readings, none stored")
                continue
            if not stored:
                continue
            hi = self.max_pushed.get(mid, -1)
            if max(stored) > hi:
                problems.append(f"{mid} has stored seq {max(stored)} above anything it pushed ({hi})")
            if complete:
                missing = sorted(set(range(min(stored), hi + 1)) - stored)
                if missing:
                    problems.append(f"{mid} missing {len(missing)} readings: {missing[:10]}")
        return problems

    def assert_readings(self, *, complete: bool = True) -> None:
        problems = self.reading_problems(complete=complete)
        assert not problems, "\n".join(problems[:20])

    def secrets_known(self) -> list[bytes]:
        """Every key of this run: factory keys, session keys, new global keys."""
        return list(self.all_keys)


def key_encodings(key: bytes) -> list[bytes | str]:
    """Every usual way a key could leak into an event or a reply."""
    key = bytes(key)
    b64 = base64.b64encode(key).decode()
    u64 = base64.urlsafe_b64encode(key).decode()
    return [key, key.hex(), key.hex().upper(), b64, b64.rstrip("="), u64, u64.rstrip("="), repr(key)[2:-1]]


def find_key_material(objs: Iterable[Any], keys: Iterable[bytes]) -> list[str]:
    """Walk events / replies (dicts, lists, str, bytes) for any key, any encoding."""
    needles = [e for k in keys for e in key_encodings(k)]
    found: list[str] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(k, path + "/key")
                walk(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, (bytes, bytearray)):
            if any(isinstance(n, bytes) and n in obj for n in needles):
                found.append(path)
        else:
            text = obj if isinstance(obj, str) else repr(obj)
            if any(isinstance(n, str) and n in text for n in needles):
                found.append(path)

    for i, obj in enumerate(objs):
        walk(obj, f"[{i}]")
    return found
