"""The meters' non-volatile memory: one SQLite file per fleet process.

Holds, per meter, what a real meter keeps in flash: the keys it received by
key_transfer (the factory file is the initial state; a row here overrides
it), the high-water marks of its send counters and the lowest acceptable
values of its receive counters under CC_LAN and CC_LOCALE.  Sessions are
never stored: a rebooted meter re-associates.

Durability: WAL with ``synchronous=FULL`` (or ``EXTRA``), never ``NORMAL``.
In WAL mode ``NORMAL`` fsyncs only at checkpoints: a committed transaction
survives a crash of the process but the last ones can be rolled back by a
power loss or a host crash, and a rolled-back counter mark means a rebooted
meter sends again under a (key, IV) pair it already used.  ``FULL`` fsyncs
the WAL at every commit; the fleet batches its marks, so that is one fsync
per batch, not per frame.  ``commit`` returns only once the transaction is
durable, and the shell publishes no frame before the commit covering its
counter marks has returned.

One fleet per segment: marks are per meter, so two processes serving one
segment would each count from the same marks and reuse IVs.  ``open`` takes
an exclusive ``flock`` on a lock file per segment served and one on the NVM
file itself, held until ``close`` (the kernel drops them if the process
dies, kill -9 included), and raises :class:`SegmentBusy` before anything is
read, claimed or sent if another process holds one of them.  Lock files and
the NVM files are 0600 in a 0700 folder: the NVM holds keys.

sqlite3 connections must stay on the thread that made them: every call runs
on one dedicated worker thread.

Re-sharding (``--shard 1/2`` today, ``--segments c0001`` tomorrow) must not
lose marks: each file records which segments it *claims* and when.  On open,
for every segment we serve, the file with the newest claim is authoritative;
its rows are copied here, and the claim is removed from the other files.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ami.machines.meter import CounterMark, KeyWrite, PersistItem
from ami.protocol import KeyType, SecretBytes
from ami.runtime.single_thread import SingleThread
from ami.security.files import fsync_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (concentrator TEXT PRIMARY KEY, claimed_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    meter TEXT NOT NULL, key_type TEXT NOT NULL, key BLOB NOT NULL,
    concentrator TEXT NOT NULL, written_ns INTEGER NOT NULL,
    PRIMARY KEY (meter, key_type)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    meter TEXT NOT NULL, slot TEXT NOT NULL, value INTEGER NOT NULL, concentrator TEXT NOT NULL,
    PRIMARY KEY (meter, slot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 0), anchor_wall REAL NOT NULL, anchor_sim REAL NOT NULL,
    compression REAL NOT NULL);
"""

#: A persisted item with the meter it belongs to: (meter, concentrator, item).
Record = tuple[str, str, PersistItem]

#: Durable on power loss (see the module docstring); ``NORMAL`` is refused.
SYNCHRONOUS = ("FULL", "EXTRA")
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SegmentBusy(RuntimeError):
    """Another process serves one of our segments (or uses our NVM file)."""


def _take_lock(path: Path, what: str) -> int:
    """An exclusive flock on ``path`` (created 0600), or SegmentBusy; returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise SegmentBusy(f"{what} is already served by another fleet process (pid {holder}): "
                          "one fleet per segment, or two would reuse the meters' IVs") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above; the lock is the flock
    return fd


class MeterState:
    """What NVM holds for one meter (keys override the factory ones)."""

    __slots__ = ("keys", "marks")

    def __init__(self) -> None:
        self.keys: dict[KeyType, SecretBytes] = {}
        self.marks: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<MeterState keys={sorted(self.keys)} marks={self.marks}>"


class Nvm:
    """Async facade over one SQLite file, all I/O on one worker thread."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in SYNCHRONOUS:
            # NORMAL loses the last commits on power loss: marks lost = IVs reused.
            raise ValueError("the meters' NVM synchronous must be FULL or EXTRA (NORMAL loses marks on power loss)")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._thread = SingleThread("nvm")
        self._db: sqlite3.Connection | None = None
        self._locks: list[int] = []
        self.commits = 0
        self.rows = 0

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._thread.run(fn, *args)

    # --- open / claim ---------------------------------------------------------

    async def open(self, segments: Sequence[str]) -> None:
        """Lock the segments (SegmentBusy if taken), open the file, claim the segments."""
        try:
            await self._run(self._open, list(segments))
        except BaseException:
            self._thread.shutdown()
            raise

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(_SCHEMA)
        return db

    def _open(self, segments: list[str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self._lock(segments)
        try:
            if not self.path.exists():
                # A file of keys: private from the first byte (WAL/SHM inherit the mode).
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
                fsync_dir(self.path.parent)
            os.chmod(self.path, 0o600)
            self._db = self._connect(self.path)
            self._claim(segments)
        except BaseException:
            self._close()
            raise

    def _lock(self, segments: list[str]) -> None:
        """Exclusive locks on our NVM file and on every segment we serve, or SegmentBusy."""
        for seg in segments:
            if not _SEGMENT_NAME.fullmatch(seg):
                raise ValueError("a segment name is letters, digits, '_', '.', '-'")
        try:
            self._locks.append(_take_lock(self.path.with_name(self.path.name + ".lock"),
                                          f"NVM file {self.path.name} (one --id per fleet)"))
            for seg in sorted(set(segments)):
                self._locks.append(_take_lock(self.path.parent / f"{seg}.segment.lock", f"segment {seg}"))
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        while self._locks:
            os.close(self._locks.pop())  # closing the only fd drops the flock

    def _claim(self, segments: list[str]) -> None:
        db = self._db
        assert db is not None
        wanted = set(segments)
        others = []
        for other in sorted(self.path.parent.glob("*.db")):
            if other.resolve() == self.path.resolve():
                continue
            odb = self._connect(other)
            claims = {c: ns for c, ns in odb.execute("SELECT concentrator, claimed_ns FROM segments") if c in wanted}
            if claims:
                others.append((odb, claims))
            else:
                odb.close()
        own = dict(db.execute("SELECT concentrator, claimed_ns FROM segments"))
        now_ns = time.time_ns()
        db.execute("BEGIN IMMEDIATE")
        try:
            for seg in segments:
                best_ns, best_db = own.get(seg, -1), None
                for odb, claims in others:
                    if claims.get(seg, -1) > best_ns:
                        best_ns, best_db = claims[seg], odb
                if best_db is not None:
                    # Another file holds the newest state of this segment: take it.
                    db.execute("DELETE FROM keys WHERE concentrator = ?", (seg,))
                    db.execute("DELETE FROM counters WHERE concentrator = ?", (seg,))
                    db.executemany(
                        "INSERT INTO keys VALUES (?, ?, ?, ?, ?)",
                        best_db.execute("SELECT meter, key_type, key, concentrator, written_ns FROM keys "
                                        "WHERE concentrator = ?", (seg,)).fetchall(),
                    )
                    db.executemany(
                        "INSERT INTO counters VALUES (?, ?, ?, ?)",
                        best_db.execute("SELECT meter, slot, value, concentrator FROM counters "
                                        "WHERE concentrator = ?", (seg,)).fetchall(),
                    )
                    self._copy_clock(best_db)
                db.execute("INSERT INTO segments VALUES (?, ?) ON CONFLICT(concentrator) "
                           "DO UPDATE SET claimed_ns = excluded.claimed_ns", (seg, now_ns))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Only now that our copy is durable, drop the claims (and rows) elsewhere.
        for odb, claims in others:
            with odb:
                odb.execute("BEGIN IMMEDIATE")
                for seg in claims:
                    odb.execute("DELETE FROM keys WHERE concentrator = ?", (seg,))
                    odb.execute("DELETE FROM counters WHERE concentrator = ?", (seg,))
                    odb.execute("DELETE FROM segments WHERE concentrator = ?", (seg,))
            odb.close()

    def _copy_clock(self, other: sqlite3.Connection) -> None:
        """Keep the meters' clock from going back when their segment moves here."""
        row = other.execute("SELECT anchor_wall, anchor_sim, compression FROM clock").fetchone()
        if row is None:
            return
        theirs = row[1] + (time.time() - row[0]) * row[2]
        mine = self._clock_now()
        if mine is None or theirs > mine:
            self._db.execute(  # type: ignore[union-attr]
                "INSERT INTO clock VALUES (0, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "anchor_wall = excluded.anchor_wall, anchor_sim = excluded.anchor_sim, "
                "compression = excluded.compression",
                (time.time(), theirs, row[2]),
            )

    def _clock_now(self) -> float | None:
        row = self._db.execute("SELECT anchor_wall, anchor_sim, compression FROM clock").fetchone()  # type: ignore[union-attr]
        return None if row is None else row[1] + (time.time() - row[0]) * row[2]

    # --- clock -------------------------------------------------------------------

    async def clock_anchor(self, compression: float, start: float | None = None) -> tuple[float, float]:
        """(anchor_wall, anchor_sim) of the simulated clock, persisted so that
        meter time never goes back across restarts (which would replay seqs).

        A fresh file starts the meter clock at ``start`` (default: wall time
        now).  A changed compression re-anchors at the current meter time."""
        return await self._run(self._clock_anchor, compression, start)

    def _clock_anchor(self, compression: float, start: float | None) -> tuple[float, float]:
        db = self._db
        assert db is not None
        row = db.execute("SELECT anchor_wall, anchor_sim, compression FROM clock").fetchone()
        wall = time.time()
        if row is not None and row[2] == compression and start is None:
            return row[0], row[1]
        if start is not None:
            sim = start
        elif row is not None:
            sim = row[1] + (wall - row[0]) * row[2]
        else:
            sim = wall
        with db:
            db.execute(
                "INSERT INTO clock VALUES (0, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "anchor_wall = excluded.anchor_wall, anchor_sim = excluded.anchor_sim, "
                "compression = excluded.compression",
                (wall, sim, compression),
            )
        return wall, sim

    # --- load / commit -------------------------------------------------------------

    async def load(self) -> dict[str, MeterState]:
        return await self._run(self._load)

    def _load(self) -> dict[str, MeterState]:
        db = self._db
        assert db is not None
        states: dict[str, MeterState] = {}
        for meter, key_type, key in db.execute("SELECT meter, key_type, key FROM keys"):
            states.setdefault(meter, MeterState()).keys[KeyType(key_type)] = SecretBytes(key)
        for meter, slot, value in db.execute("SELECT meter, slot, value FROM counters"):
            states.setdefault(meter, MeterState()).marks[slot] = value
        return states

    async def commit(self, records: Iterable[Record]) -> None:
        """Write records in one transaction; returns once it is committed.

        Records apply in order, so "new key, counter reset to 0, new mark"
        sequences come out right: per (meter, slot) the last value wins.
        """
        counters: dict[tuple[str, str], tuple[str, str, int, str]] = {}
        keys: dict[tuple[str, str], tuple[str, str, bytes, str, int]] = {}
        now_ns = time.time_ns()
        for meter, concentrator, item in records:
            if isinstance(item, CounterMark):
                counters[(meter, item.slot)] = (meter, item.slot, item.value, concentrator)
            elif isinstance(item, KeyWrite):
                keys[(meter, item.key_type.value)] = (meter, item.key_type.value, bytes(item.key), concentrator, now_ns)
            else:  # pragma: no cover - a programming error, never silently dropped
                raise TypeError(f"cannot persist {type(item).__name__}")
        if counters or keys:
            await self._run(self._commit, list(counters.values()), list(keys.values()))

    def _commit(self, counters: list[tuple], keys: list[tuple]) -> None:
        db = self._db
        assert db is not None
        with db:  # BEGIN ... COMMIT (or ROLLBACK and raise)
            db.execute("BEGIN")
            if keys:
                db.executemany(
                    "INSERT INTO keys VALUES (?, ?, ?, ?, ?) ON CONFLICT(meter, key_type) DO UPDATE SET "
                    "key = excluded.key, written_ns = excluded.written_ns",
                    keys,
                )
            if counters:
                db.executemany(
                    "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT(meter, slot) DO UPDATE SET "
                    "value = excluded.value",
                    counters,
                )
        self.commits += 1
        self.rows += len(counters) + len(keys)

    async def close(self) -> None:
        if self._db is not None or self._locks:
            await self._run(self._close)
        self._thread.shutdown()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._unlock()
