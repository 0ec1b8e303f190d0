"""The head-end's durable store: meters, keys, sessions, counters, readings, gaps.

SQLite by default (WAL, one writer thread, batched commits).  Every key is
stored wrapped under the vault's KEK (RFC 3394), bound to its row (meter,
key type, version; see :mod:`ami.security.vault`): a copy of this database
alone yields no usable key, and a blob moved to another row fails to
unwrap.  Counter marks and lowest-acceptable values are
written in the same transaction as the readings they cover, so after a crash
the store is consistent with itself: a reading is stored iff the counter
that admitted it moved.

sqlite3 is blocking, so every call runs on one dedicated thread
(``ami.runtime.single_thread``): the connection never crosses threads and the event loop
never waits on disk.

Only one process may write: ``open(writer=True)`` takes the writer lease
(an ``flock`` on ``<store>.lock`` held for the store's life, plus the
fenced ``lease`` row, see :mod:`headend.store_sql`) or raises
:class:`StoreLocked`; every write transaction checks the lease epoch and
raises :class:`Fenced` (rolled back, nothing written) once another writer
has taken over.  A store opened without ``writer`` (``ami tsp``, reports)
only reads.  The store file, its -wal/-shm and lock sidecars are created
0600 and a folder created for them 0700.

The interface it shares with :class:`headend.pgstore.PostgresStore` is
:class:`headend.store_api.Store` (open either with
:func:`headend.store_api.open_store`); the SQL they share is in
:mod:`headend.store_sql`.  :func:`read_store_file` reads a store file as it
lies on disk, without the vault (what a copy of the file gives anyone).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ami.machines.headend_records import Commit, KeyRow, MeterRow, SessionRow, Snapshot
from ami.protocol.keys import KeyState, KeyType, SecretBytes
from ami.runtime.single_thread import SingleThread
from ami.runtime.logs import get_logger
from ami.security.vault import KeyVault, key_identity, session_identity
from headend import store_sql
from headend.store_sql import Fenced, StoreError, StoreLocked, lease_owner, unwrap_one, unwrap_rows

log = get_logger("store")

__all__ = [
    "Fenced",
    "SqliteStore",
    "StoreError",
    "StoreLocked",
    "StoreContents",
    "StoredKey",
    "StoredMeter",
    "StoredReading",
    "StoredSession",
    "count_stored_readings",
    "read_store_file",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meters (
    meter TEXT PRIMARY KEY,
    system_title BLOB NOT NULL UNIQUE,
    concentrator TEXT NOT NULL,
    high_seq INTEGER,
    gaps BLOB,
    suite INTEGER NOT NULL DEFAULT 0,
    sign_public BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    meter TEXT NOT NULL,
    key_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    created REAL NOT NULL,
    tx_mark INTEGER NOT NULL DEFAULT 0,
    rx_lowest INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (meter, key_type, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    meter TEXT NOT NULL,
    pending INTEGER NOT NULL,       -- 1: offered in an AARQ, not yet confirmed
    serial INTEGER NOT NULL,
    wrapped BLOB NOT NULL,
    created REAL NOT NULL,
    tx_mark INTEGER NOT NULL,
    rx_lowest INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    lan_version INTEGER NOT NULL,   -- the CC_LAN version that carried it
    PRIMARY KEY (meter, pending)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (
    meter TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    energy_wh INTEGER NOT NULL,
    power_w INTEGER NOT NULL,
    voltage_dv INTEGER NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (meter, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease (   -- the single-writer lease (headend.store_sql)
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    heartbeat REAL NOT NULL
);
"""

_SIDECARS = ("-wal", "-shm", "-journal")

#: The highest seq of each meter's readings (the primary key's order: one
#: index seek per meter, not a scan of the readings).
SELECT_HIGHEST_READINGS = (
    "SELECT meter, (SELECT max(seq) FROM readings WHERE readings.meter = meters.meter) FROM meters"
)


def _run_grouped(db: sqlite3.Connection, statements: Iterable[tuple[str, tuple]]) -> None:
    """Run (sql, args) in order, each run of one statement as one executemany."""
    run_sql: str | None = None
    run: list[tuple] = []
    for sql, args in statements:
        if sql is not run_sql and run:
            db.executemany(run_sql, run)
            run = []
        run_sql = sql
        run.append(args)
    if run:
        db.executemany(run_sql, run)


def _keep_private(path: Path) -> None:
    """Make the store's folder (0700 when created here) and file (0600) before
    SQLite writes a byte; tighten an existing store written with the old 0644."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    else:
        st = folder.stat()
        # Our own data folder: tighten it.  Never a shared sticky one (/tmp).
        if st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(folder, 0o700)
    # SQLite gives -wal and -shm the main file's mode: create it 0600 first.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in _SIDECARS:
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.chmod(side, 0o600)


class SqliteStore:
    """The default store.  ``path`` is a file (``:memory:`` is refused: the
    whole point is durability)."""

    def __init__(self, path: Path, vault: KeyVault) -> None:
        self.path = Path(path)
        self.vault = vault
        self._thread = SingleThread("headend-store")
        self._db: sqlite3.Connection | None = None
        self.epoch = 0  # the lease epoch this writer holds (0: not the writer)
        self.unwrap_failures = 0  # rows whose wrapped key failed to unwrap
        self._owner: str | None = None
        self._fenced: str | None = None  # why commits are refused, once fenced
        self._lock_fd: int | None = None
        #: meter -> its gaps column as committed (packed, None: no gap), for
        #: the meters read by _load or written since; and the high_seq values
        #: not written because a reading of theirs was (see _commit).
        self._gaps_stored: dict[str, bytes | None] = {}
        self._high_lagging: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    # -- life cycle ---------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return Path(f"{self.path}.lock")

    async def open(self, *, writer: bool = False) -> None:
        await self._thread.run(self._open, writer)

    def _open(self, writer: bool) -> None:
        _keep_private(self.path)
        if writer:
            self._lock()
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # FULL, not NORMAL: in WAL mode NORMAL survives a process
                # crash but an OS crash or power loss can lose the last
                # commits, i.e. counter marks already used on the air; the
                # next start would then reuse those IVs.  FULL fsyncs the WAL
                # at every commit, so a mark the engine relies on is on disk
                # before any frame under it is published.
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(SCHEMA)
                columns = {row[1] for row in db.execute("PRAGMA table_info(meters)")}
                for ddl in store_sql.METER_SUITE_COLUMNS:
                    if ddl.split()[0] not in columns:  # a store from before suite 1
                        db.execute(f"ALTER TABLE meters ADD COLUMN {ddl}")
                if writer:
                    self._take_lease(db)
            except BaseException:
                db.close()
                raise
        except BaseException:
            self._unlock()
            raise
        self._db = db

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"store {self.path} is in use by another head-end ({self._holder()}): a second writer would reuse "
                "IVs; stop the other one first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _holder(self) -> str:
        try:
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)) as db:
                row = db.execute(store_sql.LEASE_OWNER).fetchone()
        except sqlite3.Error:
            row = None
        return f"owner {row[0]}, epoch {row[1]}" if row else f"lock {self.lock_path} held"

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _take_lease(self, db: sqlite3.Connection) -> None:
        """Under the flock: bump the epoch, write ourselves as owner, and
        re-wrap an old store's unbound keys, in one transaction."""
        owner = lease_owner()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(store_sql.LEASE_OWNER).fetchone()
            epoch = (int(row[1]) if row else 0) + 1
            db.execute(store_sql.TAKE_LEASE, (owner, epoch, time.time()))
            key_args, session_args = store_sql.rewrap_legacy(
                self.vault,
                [tuple(r) for r in db.execute(store_sql.SELECT_ALL_WRAPPED_KEYS)],
                [tuple(r) for r in db.execute(store_sql.SELECT_ALL_WRAPPED_SESSIONS)],
            )
            db.executemany(store_sql.REWRAP_KEY, key_args)
            db.executemany(store_sql.REWRAP_SESSION, session_args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if key_args or session_args:
            log.warning("store_rewrapped", store=str(self.path), keys=len(key_args), sessions=len(session_args))
        if row:
            log.info("store_lease_taken_over", store=str(self.path), previous=row[0], epoch=epoch)
        self._owner, self.epoch = owner, epoch

    def _begin_write(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, then the fence: the lease still ours, or Fenced."""
        if self._fenced:
            raise Fenced(self._fenced)
        if self._owner is None:
            raise Fenced(f"store {self.path} was opened read-only (open(writer=True) to write)")
        db.execute("BEGIN IMMEDIATE")
        if db.execute(store_sql.FENCE, (time.time(), self.epoch, self._owner)).rowcount != 1:
            db.execute("ROLLBACK")
            self._fenced = (
                f"store {self.path}: another head-end took the writer lease over (this one held epoch "
                f"{self.epoch}); nothing was committed"
            )
            log.error("store_fenced", store=str(self.path), epoch=self.epoch)
            raise Fenced(self._fenced)

    def _write_lagging(self) -> None:
        """Closing: write the high_seq values _commit left to the readings
        table, so that the meters table is exact after a clean stop."""
        if not self._high_lagging or self._fenced or self._owner is None:
            return
        db = self._db
        try:
            self._begin_write(db)
        except Fenced:
            return
        try:
            db.executemany(store_sql.UPDATE_HIGH_SEQ, [(h, m) for m, h in self._high_lagging.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._high_lagging.clear()

    def _check_lease(self) -> None:
        """An empty commit writes nothing, but a fenced writer must still stop."""
        if self._fenced:
            raise Fenced(self._fenced)
        if self._owner is None:
            return
        row = self._db.execute(store_sql.LEASE_OWNER).fetchone()
        if row is None or row[0] != self._owner or int(row[1]) != self.epoch:
            self._fenced = f"store {self.path}: another head-end took the writer lease over (epoch {self.epoch})"
            log.error("store_fenced", store=str(self.path), epoch=self.epoch)
            raise Fenced(self._fenced)

    async def close(self) -> None:
        if self._db is not None:
            await self._thread.run(self._write_lagging)
            await self._thread.run(self._db.close)
            self._db = None
        await self._thread.run(self._unlock)
        self._thread.shutdown()

    # -- provisioning -------------------------------------------------------

    async def import_factory(self, records: Iterable[dict[str, str]], now: float) -> int:
        """Import factory keys for meters not yet known; return how many."""
        return await self._thread.run(self._import_factory, list(records), now)

    def _import_factory(self, records: list[dict[str, str]], now: float) -> int:
        db = self._db
        self._begin_write(db)
        try:
            known = {meter for (meter,) in db.execute(store_sql.KNOWN_METERS)}
            fresh = [r for r in records if r["meter"] not in known]
            key_rows = []
            for r in fresh:
                for key_type in (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE):
                    raw = bytes.fromhex(r[key_type.value])
                    wrapped = self.vault.wrap(raw, key_identity(r["meter"], key_type.value, 1))
                    key_rows.append((r["meter"], key_type.value, 1, KeyState.ACTIVE.value, wrapped, now))
            db.executemany(
                store_sql.INSERT_METER,
                [(r["meter"], bytes.fromhex(r["system_title"]), r["concentrator"]) for r in fresh],
            )
            db.executemany(store_sql.INSERT_FACTORY_KEY, key_rows)
            db.executemany(store_sql.SET_METER_SUITE, store_sql.suite_rows(fresh))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(fresh)

    # -- cold start ---------------------------------------------------------

    async def load(self) -> Snapshot:
        return await self._thread.run(self._load)

    def _load(self) -> Snapshot:
        db = self._db
        suites = {m: (s, bytes(p) if p is not None else None) for m, s, p in db.execute(store_sql.SELECT_METER_SUITES)}
        highest = {m: h for m, h in db.execute(SELECT_HIGHEST_READINGS) if h is not None}
        rows = db.execute(store_sql.SELECT_METERS).fetchall()
        meters = [
            MeterRow(m, bytes(t), c, _max_seq(h, highest.get(m)), msgpack.unpackb(g) if g else [],
                     *suites.get(m, (0, None)))
            for m, t, c, h, g in rows
        ]
        self._gaps_stored = {m: (bytes(g) if g else None) for m, _t, _c, _h, g in rows}
        raw_keys = list(db.execute(store_sql.SELECT_LIVE_KEYS))
        raw_sessions = list(db.execute(store_sql.SELECT_SESSIONS))
        clear = unwrap_rows(self, raw_keys, raw_sessions)
        keys = [
            KeyRow(m, KeyType(kt), v, KeyState(st), cr, tx, rx, SecretBytes(clear[i]))
            for i, (m, kt, v, st, _w, cr, tx, rx) in enumerate(raw_keys)
        ]
        off = len(raw_keys)
        sessions = [
            SessionRow(m, serial, cr, tx, rx, fr, SecretBytes(clear[off + i]), pending=bool(p), lan_version=lv)
            for i, (m, serial, _w, cr, tx, rx, fr, p, lv) in enumerate(raw_sessions)
        ]
        versions = {(m, KeyType(kt)): v for m, kt, v in db.execute(store_sql.SELECT_MAX_VERSIONS)}
        return Snapshot(meters, keys, sessions, versions)

    # -- batched commits ----------------------------------------------------

    async def commit(self, batch: Commit) -> None:
        if batch:
            await self._thread.run(self._commit, batch)
        else:
            await self._thread.run(self._check_lease)

    def _commit(self, batch: Commit) -> None:
        """One transaction, set-based: each run of rows that take the same
        statement goes in one ``executemany`` (rows still apply in list order).

        A meter row whose gaps are unchanged and whose ``high_seq`` is the seq
        of a reading of the same commit is not written: the readings table
        holds that seq (``_load`` and :func:`read_store_file` take the
        highest of both), and the gaps column is what the store already has.
        This saves one scattered B-tree update per reading; ``close`` writes
        the high_seq values so saved (a crash leaves them to the readings)."""
        db = self._db
        self._begin_write(db)
        try:
            if batch.readings:
                # ON CONFLICT, not OR IGNORE: only a duplicate (meter, seq) is
                # skipped; a malformed row must fail the whole commit.
                db.executemany(store_sql.INSERT_READING, batch.readings)
            if batch.keys:
                _run_grouped(db, self._key_statements(batch.keys))
            if batch.sessions:
                _run_grouped(db, self._session_statements(batch.sessions))
            written: dict[str, bytes | None] = {}
            lagging: dict[str, int] = {}
            if batch.meters:
                args = self._meter_args(batch, written, lagging)
                if args:
                    db.executemany(store_sql.UPDATE_METER, args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Committed: what the meters table now holds.
        self._gaps_stored.update(written)
        for meter in written:
            self._high_lagging.pop(meter, None)
        self._high_lagging.update(lagging)

    def _key_statements(self, keys: list[KeyRow]):
        vault = self.vault
        for k in keys:
            if k.key is not None:
                yield store_sql.UPSERT_KEY, (
                    k.meter, k.key_type.value, k.version, k.state.value,
                    vault.wrap(k.key, key_identity(k.meter, k.key_type.value, k.version)), k.created, k.tx_mark,
                    k.rx_lowest,
                )
            else:
                yield store_sql.UPDATE_KEY, (k.state.value, k.tx_mark, k.rx_lowest, k.meter, k.key_type.value,
                                             k.version)

    def _session_statements(self, sessions: list[SessionRow]):
        vault = self.vault
        for s in sessions:
            if s.deleted:
                yield store_sql.DELETE_SESSION, (s.meter, int(s.pending))
            elif s.key is not None:
                yield store_sql.UPSERT_SESSION, (
                    s.meter, int(s.pending), s.serial, vault.wrap(s.key, session_identity(s.meter, s.serial)),
                    s.created, s.tx_mark, s.rx_lowest, s.frames, s.lan_version,
                )
            else:
                yield store_sql.UPDATE_SESSION, (s.tx_mark, s.rx_lowest, s.frames, s.meter, s.serial)

    def _meter_args(self, batch: Commit, written: dict[str, bytes | None],
                    lagging: dict[str, int]) -> list[tuple[int | None, bytes | None, str]]:
        """UPDATE_METER arguments, the rows that need no write left out (see _commit)."""
        here = {(r[0], r[1]) for r in batch.readings}  # (meter, seq) of the readings of this commit
        stored = self._gaps_stored
        args = []
        for m in batch.meters:
            gaps = msgpack.packb(m.gaps) if m.gaps else None
            meter = m.meter
            if (
                m.high_seq is not None
                and (meter, m.high_seq) in here
                and meter in stored
                and stored[meter] == gaps
                and meter not in written
            ):
                lagging[meter] = m.high_seq
                continue
            written[meter] = gaps
            lagging.pop(meter, None)
            args.append((m.high_seq, gaps, meter))
        return args

    # -- queries (tests, `ami tsp`, reports) ----------------------------------

    async def query(self, sql: str, params: tuple = ()) -> list[tuple[Any, ...]]:
        """Run SQLite SQL with ``?`` placeholders; rows as tuples."""
        return await self._thread.run(lambda: list(self._db.execute(sql, params)))

    async def active_version(self, meter: str, key_type: KeyType) -> int:
        rows = await self.query(store_sql.ACTIVE_VERSION, (meter, key_type.value))
        if not rows or rows[0][0] is None:
            raise KeyError(f"no active {key_type.value} for {meter}")
        return int(rows[0][0])

    async def active_key(self, meter: str, key_type: KeyType) -> SecretBytes:
        rows = await self.query(store_sql.ACTIVE_KEY, (meter, key_type.value))
        if not rows:
            raise KeyError(f"no active {key_type.value} for {meter}")
        wrapped, version = bytes(rows[0][0]), int(rows[0][1])
        # In a thread: an HSM unwrap blocks.
        return SecretBytes(await asyncio.to_thread(unwrap_one, self, wrapped, key_identity(meter, key_type.value,
                                                                                           version)))



def _max_seq(stored: int | None, highest_reading: int | None) -> int | None:
    """A meter's high_seq: its meters row's, or its highest stored reading's if higher."""
    if highest_reading is None:
        return stored
    return highest_reading if stored is None else max(stored, highest_reading)


# -- a store file as it lies on disk (no vault) -----------------------------------


@dataclass(frozen=True, slots=True)
class StoredMeter:
    meter: str
    system_title: bytes
    concentrator: str
    high_seq: int | None  # highest reading seq stored, None before the first
    suite: int = 0  # DLMS security suite of its LAN association


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A key row as stored: the key only wrapped (RFC 3394 under the KEK, bound to the row)."""

    meter: str
    key_type: str  # a KeyType value, as stored ("ccc", "ak", "cc_lan", "cc_locale")
    version: int
    state: str  # a KeyState value, as stored ("new", "active", "expired")
    wrapped: bytes = field(repr=False)
    created: float
    tx_mark: int  # send counter reserved up to here
    rx_lowest: int  # lowest receive counter still acceptable


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session row: the dedicated key only wrapped."""

    meter: str
    serial: int
    wrapped: bytes = field(repr=False)
    created: float
    tx_mark: int
    rx_lowest: int
    frames: int
    pending: bool  # offered in an AARQ, not yet confirmed (False in stores older than the column)


@dataclass(frozen=True, slots=True)
class StoredReading:
    meter: str
    seq: int
    ts: int
    energy_wh: int
    power_w: int
    voltage_dv: int


@dataclass(frozen=True, slots=True)
class StoreContents:
    """What a SQLite store file holds, read without the vault.

    Keys and sessions are as stored (wrapped); meters, counters and readings
    are in clear.  Rows are ordered: meters by meter, keys by (meter, type,
    version), sessions by (meter, serial), samples by (meter, seq).
    """

    path: Path
    meters: tuple[StoredMeter, ...]
    keys: tuple[StoredKey, ...]
    sessions: tuple[StoredSession, ...]
    reading_count: int
    readings_per_meter: dict[str, int]
    sample_readings: tuple[StoredReading, ...]  # the first few
    last_readings: dict[str, StoredReading]  # meter -> its reading of highest seq
    raw: bytes = field(repr=False)  # the file's bytes (database, then WAL), read before opening it

    @property
    def wrapped_blobs(self) -> list[bytes]:
        """Every wrapped key: the key rows', then the sessions'."""
        return [k.wrapped for k in self.keys] + [s.wrapped for s in self.sessions]

    @property
    def wrapped_identities(self) -> list[bytes]:
        """The row identity each of :attr:`wrapped_blobs` is bound to (same order)."""
        return [key_identity(k.meter, k.key_type, k.version) for k in self.keys] + [
            session_identity(s.meter, s.serial) for s in self.sessions
        ]


def count_stored_readings(path: Path | str) -> int | None:
    """How many readings a SQLite store file holds, read-only (None when there
    is no readable store there): ``ami loadtest`` counts what was stored so,
    without a vault and while the head-end may still be writing."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])
    except sqlite3.Error:
        return None


def read_store_file(path: Path | str, *, samples: int = 3) -> StoreContents:
    """Read a head-end SQLite store file with plain sqlite3: no KEK, no vault.

    This is all a copy of the file gives anyone (``ami attack store`` reads
    a stolen copy through it).  Point it at a copy: SQLite may checkpoint
    the WAL into the main file when the connection closes.
    """
    path = Path(path)
    raw = b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    with closing(sqlite3.connect(path)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(meters)")}
        suite = "suite" if "suite" in columns else "0"  # a store from before suite 1
        highest = {m: h for m, h in db.execute(SELECT_HIGHEST_READINGS) if h is not None}
        meters = tuple(
            StoredMeter(m, bytes(t), c, _max_seq(h, highest.get(m)), s)
            for m, t, c, h, s in db.execute(
                f"SELECT meter, system_title, concentrator, high_seq, {suite} FROM meters ORDER BY meter"
            )
        )
        keys = tuple(
            StoredKey(m, kt, v, st, bytes(w), cr, tx, rx)
            for m, kt, v, st, w, cr, tx, rx in db.execute(
                "SELECT meter, key_type, version, state, wrapped, created, tx_mark, rx_lowest FROM keys "
                "ORDER BY meter, key_type, version"
            )
        )
        columns = {name for _cid, name, *_rest in db.execute("PRAGMA table_info(sessions)")}
        pending = "pending" if "pending" in columns else "0"
        sessions = tuple(
            StoredSession(m, se, bytes(w), cr, tx, rx, fr, bool(p))
            for m, se, w, cr, tx, rx, fr, p in db.execute(
                f"SELECT meter, serial, wrapped, created, tx_mark, rx_lowest, frames, {pending} FROM sessions "
                "ORDER BY meter, serial"
            )
        )
        per_meter = dict(db.execute("SELECT meter, COUNT(*) FROM readings GROUP BY meter"))
        reading_columns = "meter, seq, ts, energy_wh, power_w, voltage_dv"  # StoredReading's fields
        sample = tuple(
            StoredReading(*row)
            for row in db.execute(f"SELECT {reading_columns} FROM readings ORDER BY meter, seq LIMIT ?", (samples,))
        )
        last = {
            r.meter: r
            for r in (
                StoredReading(*row)
                for row in db.execute(
                    f"SELECT {reading_columns} FROM readings r WHERE seq = "
                    "(SELECT MAX(seq) FROM readings WHERE meter = r.meter)"
                )
            )
        }
    return StoreContents(path, meters, keys, sessions, sum(per_meter.values()), per_meter, sample, last, raw)
