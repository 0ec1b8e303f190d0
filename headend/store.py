"""The head-end's durable store: meters, keys, sessions, counters, readings, gaps.

SQLite by default (WAL, one writer thread, batched commits).  Every key is
stored wrapped under the vault's KEK (RFC 3394): a copy of this database
alone yields no usable key.  Counter marks and lowest-acceptable values are
written in the same transaction as the readings they cover, so after a crash
the store is consistent with itself: a reading is stored iff the counter
that admitted it moved.

sqlite3 is blocking, so every call runs on one dedicated thread
(``ami.runtime.single_thread``): the connection never crosses threads and the event loop
never waits on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack

from ami.protocol.keys import KeyState, KeyType, SecretBytes
from ami.runtime.single_thread import SingleThread
from ami.security.vault import KeyVault

from ami.machines.headend_records import Commit, KeyRow, MeterRow, SessionRow, Snapshot

__all__ = ["Commit", "KeyRow", "MeterRow", "SessionRow", "Snapshot", "SqliteStore", "open_store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meters (
    meter TEXT PRIMARY KEY,
    system_title BLOB NOT NULL UNIQUE,
    concentrator TEXT NOT NULL,
    high_seq INTEGER,
    gaps BLOB
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
"""


class SqliteStore:
    """The default store.  ``path`` is a file (``:memory:`` is refused: the
    whole point is durability)."""

    def __init__(self, path: Path, vault: KeyVault) -> None:
        self.path = Path(path)
        self.vault = vault
        self._thread = SingleThread("headend-store")
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    # -- life cycle ---------------------------------------------------------

    async def open(self) -> None:
        await self._thread.run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only an OS
        # crash can lose the last transactions.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._thread.run(self._db.close)
            self._db = None
        self._thread.shutdown()

    # -- provisioning -------------------------------------------------------

    async def import_factory(self, records: Iterable[dict[str, str]], now: float) -> int:
        """Import factory keys for meters not yet known; return how many."""
        return await self._thread.run(self._import_factory, list(records), now)

    def _import_factory(self, records: list[dict[str, str]], now: float) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            known = {row[0] for row in db.execute("SELECT meter FROM meters")}
            fresh = [r for r in records if r["meter"] not in known]
            key_rows = []
            for r in fresh:
                for key_type in (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE):
                    raw = bytes.fromhex(r[key_type.value])
                    key_rows.append((r["meter"], key_type.value, 1, KeyState.ACTIVE.value, self.vault.wrap(raw), now))
            db.executemany(
                "INSERT INTO meters (meter, system_title, concentrator) VALUES (?, ?, ?)",
                [(r["meter"], bytes.fromhex(r["system_title"]), r["concentrator"]) for r in fresh],
            )
            db.executemany(
                "INSERT INTO keys (meter, key_type, version, state, wrapped, created) VALUES (?, ?, ?, ?, ?, ?)",
                key_rows,
            )
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
        meters = [
            MeterRow(m, bytes(t), c, h, msgpack.unpackb(g) if g else [])
            for m, t, c, h, g in db.execute("SELECT meter, system_title, concentrator, high_seq, gaps FROM meters")
        ]
        raw_keys = list(
            db.execute(
                "SELECT meter, key_type, version, state, wrapped, created, tx_mark, rx_lowest FROM keys "
                "WHERE state != 'expired'"
            )
        )
        raw_sessions = list(
            db.execute(
                "SELECT meter, serial, wrapped, created, tx_mark, rx_lowest, frames, pending, lan_version FROM sessions"
            )
        )
        # One bulk call: an HSM unwraps ~6k keys/s one by one, far more in bulk.
        clear = self.vault.unwrap_many([r[4] for r in raw_keys] + [r[2] for r in raw_sessions])
        keys = [
            KeyRow(m, KeyType(kt), v, KeyState(st), cr, tx, rx, SecretBytes(clear[i]))
            for i, (m, kt, v, st, _w, cr, tx, rx) in enumerate(raw_keys)
        ]
        off = len(raw_keys)
        sessions = [
            SessionRow(m, serial, cr, tx, rx, fr, SecretBytes(clear[off + i]), pending=bool(p), lan_version=lv)
            for i, (m, serial, _w, cr, tx, rx, fr, p, lv) in enumerate(raw_sessions)
        ]
        return Snapshot(meters, keys, sessions)

    # -- batched commits ----------------------------------------------------

    async def commit(self, batch: Commit) -> None:
        if batch:
            await self._thread.run(self._commit, batch)

    def _commit(self, batch: Commit) -> None:
        db = self._db
        wrap = self.vault.wrap
        db.execute("BEGIN")
        try:
            if batch.readings:
                db.executemany(
                    # ON CONFLICT, not OR IGNORE: only a duplicate (meter, seq) is
                    # skipped; a malformed row must fail the whole commit.
                    "INSERT INTO readings (meter, seq, ts, energy_wh, power_w, voltage_dv, received) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (meter, seq) DO NOTHING",
                    batch.readings,
                )
            for k in batch.keys:
                if k.key is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO keys (meter, key_type, version, state, wrapped, created, tx_mark, "
                        "rx_lowest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (k.meter, k.key_type.value, k.version, k.state.value, wrap(k.key), k.created, k.tx_mark,
                         k.rx_lowest),
                    )
                else:
                    db.execute(
                        "UPDATE keys SET state = ?, tx_mark = ?, rx_lowest = ? "
                        "WHERE meter = ? AND key_type = ? AND version = ?",
                        (k.state.value, k.tx_mark, k.rx_lowest, k.meter, k.key_type.value, k.version),
                    )
            for s in batch.sessions:
                if s.deleted:
                    db.execute("DELETE FROM sessions WHERE meter = ? AND pending = ?", (s.meter, int(s.pending)))
                elif s.key is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO sessions (meter, pending, serial, wrapped, created, tx_mark, "
                        "rx_lowest, frames, lan_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (s.meter, int(s.pending), s.serial, wrap(s.key), s.created, s.tx_mark, s.rx_lowest, s.frames,
                         s.lan_version),
                    )
                else:
                    db.execute(
                        "UPDATE sessions SET tx_mark = ?, rx_lowest = ?, frames = ? "
                        "WHERE meter = ? AND pending = 0 AND serial = ?",
                        (s.tx_mark, s.rx_lowest, s.frames, s.meter, s.serial),
                    )
            if batch.meters:
                db.executemany(
                    "UPDATE meters SET high_seq = ?, gaps = ? WHERE meter = ?",
                    [(m.high_seq, msgpack.packb(m.gaps) if m.gaps else None, m.meter) for m in batch.meters],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- queries (tests, `ami tsp`, reports) ----------------------------------

    async def query(self, sql: str, params: tuple = ()) -> list[tuple[Any, ...]]:
        return await self._thread.run(lambda: list(self._db.execute(sql, params)))

    async def active_version(self, meter: str, key_type: KeyType) -> int:
        rows = await self.query(
            "SELECT max(version) FROM keys WHERE meter = ? AND key_type = ? AND state = 'active'",
            (meter, key_type.value),
        )
        if not rows or rows[0][0] is None:
            raise KeyError(f"no active {key_type.value} for {meter}")
        return int(rows[0][0])

    async def active_key(self, meter: str, key_type: KeyType) -> SecretBytes:
        rows = await self.query(
            "SELECT wrapped FROM keys WHERE meter = ? AND key_type = ? AND state = 'active' ORDER BY version DESC",
            (meter, key_type.value),
        )
        if not rows:
            raise KeyError(f"no active {key_type.value} for {meter}")
        # In a thread: an HSM unwrap blocks.
        return SecretBytes(await asyncio.to_thread(self.vault.unwrap, bytes(rows[0][0])))


def open_store(spec: str, vault: KeyVault, data_dir: Path):
    """``sqlite:PATH`` (relative to the data folder) or ``postgresql://...``."""
    if spec.startswith("sqlite:"):
        path = Path(spec[len("sqlite:") :])
        return SqliteStore(path if path.is_absolute() else Path(data_dir) / path, vault)
    if spec.startswith(("postgresql://", "postgres://")):
        from headend.pgstore import PostgresStore

        return PostgresStore(spec, vault)
    raise ValueError(f"unknown store {spec.split(':', 1)[0]!r}: use sqlite:PATH or postgresql://")
