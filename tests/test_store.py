"""The head-end store, SQLite and PostgreSQL, against the same tests (no mocks).

Every test runs on both backends: SQLite in tmp_path, PostgreSQL in a
schema of its own in database ``test`` (created before, dropped after).
The PostgreSQL cases are skipped only when a connection to 127.0.0.1:5432
fails.

The security test dumps each store raw (SQLite: the .db, -wal and -shm
bytes; PostgreSQL: every column of every table, and pg_dump) and looks for
every key in every usual encoding; positive controls make sure the dump
really holds the (wrapped) key rows and that the vault recovers the keys.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import re
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from ami.protocol.keys import KeyState, KeyType, SecretBytes
from ami.security.vault import FileKeyVault, key_identity, session_identity
from ami.machines.headend_records import Commit, KeyRow, MeterRow, SessionRow
from headend import store_sql
from headend.pgstore import PostgresStore
from headend.store import SqliteStore, StoredReading, count_stored_readings, read_store_file
from headend.store_api import Store, open_store

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_UNREACHABLE = "PostgreSQL not reachable at 127.0.0.1:5432"
FACTORY_TYPES = (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)
NOW = 1_700_000_000.0

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# backends


@functools.cache
def _pg_reachable() -> bool:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


async def _pg_exec(sql: str) -> None:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Backend:
    name: str
    spec: str  # what open_store() is given
    data_dir: Path
    vault: FileKeyVault
    schema: str | None = None  # postgres only

    @property
    def db_path(self) -> Path:
        return self.data_dir / "headend.db"

    def new_store(self):
        return open_store(self.spec, self.vault, self.data_dir)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[SqliteStore | PostgresStore]:
        store = self.new_store()
        await store.open(writer=True)
        try:
            yield store
        finally:
            await store.close()

    def sql(self, text: str) -> str:
        """Tests write SQLite's ``?``; PostgresStore.query takes ``$n``."""
        if self.name == "sqlite":
            return text
        n = iter(range(1, 1000))
        return re.sub(r"\?", lambda _m: f"${next(n)}", text)

    async def q(self, store, text: str, *params) -> list[tuple]:
        return await store.query(self.sql(text), params)


@contextmanager
def _backend(kind: str, tmp_path: Path) -> Iterator[Backend]:
    vault = FileKeyVault(tmp_path / "secrets" / "kek")  # never beside the database
    data_dir = tmp_path / "data"
    try:
        if kind == "sqlite":
            yield Backend("sqlite", "sqlite:headend.db", data_dir, vault)
            return
        if not _pg_reachable():
            pytest.skip(PG_UNREACHABLE)
        schema = f"t_store_{secrets.token_hex(6)}"
        asyncio.run(_pg_exec(f"CREATE SCHEMA {schema}"))
        try:
            yield Backend("postgres", f"{PG_DSN}?schema={schema}", data_dir, vault, schema)
        finally:
            asyncio.run(_pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        vault.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path: Path) -> Iterator[Backend]:
    with _backend(request.param, tmp_path) as b:
        yield b


@pytest.fixture
def pg_backend(tmp_path: Path) -> Iterator[Backend]:
    with _backend("postgres", tmp_path) as b:
        yield b


def run(coro):
    return asyncio.run(coro)


def factory_records(n: int, start: int = 1) -> list[dict[str, str]]:
    return [
        {
            "meter": f"m{i:06d}",
            "system_title": secrets.token_bytes(8).hex(),
            "concentrator": f"c{1 + i % 2:04d}",
            **{kt.value: secrets.token_hex(16) for kt in FACTORY_TYPES},
        }
        for i in range(start, start + n)
    ]


def reading(meter: str, seq: int, energy: int = 0) -> tuple:
    return (meter, seq, 1_700_000_000 + seq, energy, 500, 2301, NOW + seq)


async def count(backend: Backend, store, table: str) -> int:
    return (await store.query(f"SELECT count(*) FROM {table}"))[0][0]


# --------------------------------------------------------------------------
# provisioning and load


def test_open_store_dispatches(backend: Backend) -> None:
    store = backend.new_store()
    assert isinstance(store, SqliteStore if backend.name == "sqlite" else PostgresStore)
    assert isinstance(store, Store)


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


@pytest.mark.parametrize("cls", [SqliteStore, PostgresStore])
def test_both_backends_implement_the_store_protocol(cls: type) -> None:
    """Structurally, not by inheritance: the same public methods as Store,
    each a coroutine function with the same parameters, defaults and
    annotations (and no public method the Protocol does not list)."""
    wanted = _public_methods(Store)
    assert set(wanted) == {"open", "close", "import_factory", "load", "commit", "query", "active_version",
                           "active_key"}
    assert _public_methods(cls) == wanted
    for name in wanted:
        assert inspect.iscoroutinefunction(getattr(cls, name)), name


def test_shared_sql_numbers_placeholders() -> None:
    assert store_sql.numbered("UPDATE t SET a = ? WHERE b = ? AND c = ?") == (
        "UPDATE t SET a = $1 WHERE b = $2 AND c = $3"
    )
    assert "$7" in store_sql.numbered(store_sql.INSERT_READING)
    assert "?" not in store_sql.numbered(store_sql.UPSERT_SESSION)


def test_import_factory_is_idempotent(backend: Backend) -> None:
    records = factory_records(3)

    async def body() -> None:
        async with backend.opened() as store:
            assert await store.import_factory(records, NOW) == 3
            assert await store.import_factory(records, NOW) == 0
            assert await store.import_factory(iter(records), NOW) == 0  # any iterable
            # One new meter among known ones: only it is imported.
            more = records + factory_records(1, start=10)
            assert await store.import_factory(more, NOW) == 1
            assert await count(backend, store, "meters") == 4
            assert await count(backend, store, "keys") == 16
        async with backend.opened() as store:  # and after a restart
            assert await store.import_factory(more, NOW) == 0
            assert await count(backend, store, "keys") == 16

    run(body())


def test_load_returns_the_factory_keys_unwrapped(backend: Backend) -> None:
    records = factory_records(4)

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
        async with backend.opened() as store:
            snap = await store.load()
            assert {m.meter for m in snap.meters} == {r["meter"] for r in records}
            by_meter = {m.meter: m for m in snap.meters}
            for r in records:
                m = by_meter[r["meter"]]
                assert m.system_title == bytes.fromhex(r["system_title"])
                assert type(m.system_title) is bytes
                assert m.concentrator == r["concentrator"]
                assert m.high_seq is None and m.gaps == []
            assert len(snap.keys) == 4 * len(records)
            assert snap.sessions == []
            got = {(k.meter, k.key_type): k for k in snap.keys}
            for r in records:
                for kt in FACTORY_TYPES:
                    k = got[(r["meter"], kt)]
                    assert isinstance(k.key, SecretBytes)
                    assert k.key == bytes.fromhex(r[kt.value])
                    assert (k.version, k.state, k.created, k.tx_mark, k.rx_lowest) == (
                        1, KeyState.ACTIVE, NOW, 0, 0
                    )
                    assert isinstance(k.key_type, KeyType) and isinstance(k.state, KeyState)
                    assert await store.active_key(r["meter"], kt) == bytes.fromhex(r[kt.value])
            with pytest.raises(KeyError):
                await store.active_key("nope", KeyType.AK)

    run(body())


def test_suite1_meters_keep_their_suite_and_public_key_only(backend: Backend) -> None:
    """Suite-1 meters: the store records the suite and the meter's *public*
    signing key; a factory record's private key field is never imported."""
    records = factory_records(3)
    public = secrets.token_bytes(64)
    records[1].update(suite=1, sign_public=public.hex(), sign_private="ab" * 32)

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
        async with backend.opened() as store:
            snap = await store.load()
            by_meter = {m.meter: m for m in snap.meters}
            assert (by_meter[records[1]["meter"]].suite, by_meter[records[1]["meter"]].sign_public) == (1, public)
            assert {(m.suite, m.sign_public) for mid, m in by_meter.items() if mid != records[1]["meter"]} == {
                (0, None)}
            dump = repr(await store.query("SELECT * FROM meters"))
            assert "ab" * 32 not in dump and bytes.fromhex("ab" * 32) not in dump.encode()

    run(body())


# --------------------------------------------------------------------------
# readings


@pytest.mark.parametrize("n", [5, 500])  # below and above PostgresStore's COPY threshold
def test_duplicate_readings_are_stored_once(backend: Backend, n: int) -> None:
    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(factory_records(2), NOW)
            batch = [reading("m000001", s, energy=1) for s in range(n)]
            batch += [reading("m000001", s, energy=2) for s in range(0, n, 2)]  # same batch
            batch += [reading("m000002", s, energy=1) for s in range(n)]
            await store.commit(Commit(readings=batch))
            # Later batches: duplicates of stored rows plus a few new ones.
            await store.commit(Commit(readings=[reading("m000001", s, energy=3) for s in range(n + 3)]))
            await store.commit(Commit(readings=[reading("m000002", 0, energy=4)]))
            rows = await backend.q(store, "SELECT meter, seq, energy_wh FROM readings ORDER BY meter, seq")
            assert len(rows) == 2 * n + 3
            assert len({(m, s) for m, s, _ in rows}) == len(rows)
            # The first copy wins (INSERT OR IGNORE), in a batch as across batches.
            assert [e for m, s, e in rows if m == "m000001" and s < n] == [1] * n
            assert [e for m, s, e in rows if m == "m000001" and s >= n] == [3] * 3
            assert {e for m, _, e in rows if m == "m000002"} == {1}
            full = await backend.q(store, "SELECT * FROM readings WHERE meter = ? AND seq = ?", "m000002", 1)
            assert full == [reading("m000002", 1, energy=1)]
            await store.commit(Commit())  # empty: a no-op

    run(body())


# --------------------------------------------------------------------------
# keys, sessions, meters


def test_key_rows_insert_update_expire(backend: Backend) -> None:
    records = factory_records(2)
    m = records[0]["meter"]
    new_ak = SecretBytes(secrets.token_bytes(16))
    replaced = SecretBytes(secrets.token_bytes(16))

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            # A new AK, version 2, NEW.
            await store.commit(Commit(keys=[KeyRow(m, KeyType.AK, 2, KeyState.NEW, NOW + 1, key=new_ak)]))
            # Counters of version 1 and the new key move (key=None: UPDATE only);
            # an update of a row that does not exist changes nothing.
            await store.commit(
                Commit(
                    keys=[
                        KeyRow(m, KeyType.AK, 1, KeyState.ACTIVE, NOW, tx_mark=1000, rx_lowest=17),
                        KeyRow(m, KeyType.AK, 2, KeyState.NEW, NOW + 1, tx_mark=5, rx_lowest=6),
                        KeyRow("ghost", KeyType.AK, 1, KeyState.ACTIVE, NOW, tx_mark=1),
                    ]
                )
            )
            snap = await store.load()
            aks = {k.version: k for k in snap.keys if k.meter == m and k.key_type is KeyType.AK}
            assert set(aks) == {1, 2}
            assert (aks[1].tx_mark, aks[1].rx_lowest, aks[1].key) == (1000, 17, bytes.fromhex(records[0]["ak"]))
            assert (aks[2].state, aks[2].tx_mark, aks[2].rx_lowest, aks[2].key) == (KeyState.NEW, 5, 6, new_ak)
            assert aks[2].created == NOW + 1
            assert await backend.q(store, "SELECT count(*) FROM keys WHERE meter = ?", "ghost") == [(0,)]
            # Switch-over: version 2 active, version 1 expired (one commit).
            await store.commit(
                Commit(
                    keys=[
                        KeyRow(m, KeyType.AK, 2, KeyState.ACTIVE, NOW + 1, tx_mark=5, rx_lowest=6),
                        KeyRow(m, KeyType.AK, 1, KeyState.EXPIRED, NOW, tx_mark=1000, rx_lowest=17),
                    ]
                )
            )
            assert await store.active_key(m, KeyType.AK) == new_ak
            # A row carrying a key replaces the stored one (INSERT OR REPLACE).
            await store.commit(
                Commit(keys=[KeyRow(m, KeyType.CC_LAN, 1, KeyState.ACTIVE, NOW + 2, 7, 8, key=replaced)])
            )
        async with backend.opened() as store:  # reload from disk
            snap = await store.load()
            mine = {(k.key_type, k.version): k for k in snap.keys if k.meter == m}
            assert (KeyType.AK, 1) not in mine  # expired keys are not loaded...
            stored = await backend.q(
                store, "SELECT state, tx_mark FROM keys WHERE meter = ? AND key_type = ? AND version = ?",
                m, "ak", 1,
            )
            assert stored == [("expired", 1000)]  # ...but kept
            assert mine[(KeyType.AK, 2)].state is KeyState.ACTIVE and mine[(KeyType.AK, 2)].key == new_ak
            lan = mine[(KeyType.CC_LAN, 1)]
            assert (lan.key, lan.created, lan.tx_mark, lan.rx_lowest) == (replaced, NOW + 2, 7, 8)
            assert len(snap.keys) == 8  # 2 meters x 4, the expired AK v1 out, the AK v2 in

    run(body())


def test_active_key_is_the_newest_active_version(backend: Backend) -> None:
    """Should two versions ever both be ACTIVE, active_key and active_version
    agree on the newest (PostgresStore once took the oldest: ``ORDER BY
    version`` without DESC)."""
    records = factory_records(1)
    m = records[0]["meter"]
    v3, v2 = (SecretBytes(secrets.token_bytes(16)) for _ in range(2))

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            # Inserted out of order, so neither storage nor insertion order gives the answer.
            await store.commit(Commit(keys=[KeyRow(m, KeyType.CC_LOCALE, 3, KeyState.ACTIVE, NOW, key=v3),
                                            KeyRow(m, KeyType.CC_LOCALE, 2, KeyState.ACTIVE, NOW, key=v2)]))
            assert await store.active_version(m, KeyType.CC_LOCALE) == 3
            assert await store.active_key(m, KeyType.CC_LOCALE) == v3
            with pytest.raises(KeyError):
                await store.active_version(m + "x", KeyType.CC_LOCALE)

    run(body())


def test_sessions_insert_update_delete_reload(backend: Backend) -> None:
    records = factory_records(3)
    m1, m2, m3 = (r["meter"] for r in records)
    k1, k1b, k2 = (SecretBytes(secrets.token_bytes(16)) for _ in range(3))

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            await store.commit(
                Commit(
                    sessions=[
                        SessionRow(m1, 1, NOW, 100, 0, 1, key=k1),
                        SessionRow(m2, 1, NOW, 100, 0, 1, key=k2),
                    ]
                )
            )
            # Counter updates; a stale serial and a missing meter change nothing.
            await store.commit(
                Commit(
                    sessions=[
                        SessionRow(m1, 1, NOW, 200, 50, 9),
                        SessionRow(m2, 7, NOW, 999, 999, 999),
                        SessionRow(m3, 1, NOW, 999, 999, 999),
                    ]
                )
            )
        async with backend.opened() as store:
            sessions = {s.meter: s for s in (await store.load()).sessions}
            assert set(sessions) == {m1, m2}
            s1, s2 = sessions[m1], sessions[m2]
            assert (s1.serial, s1.created, s1.tx_mark, s1.rx_lowest, s1.frames, s1.key) == (1, NOW, 200, 50, 9, k1)
            assert (s2.serial, s2.tx_mark, s2.rx_lowest, s2.frames, s2.key) == (1, 100, 0, 1, k2)
            assert isinstance(s1.key, SecretBytes) and not s1.deleted
            # A new session replaces the old one; m2's is deleted; a delete
            # of nothing is fine; rows apply in list order (delete then insert).
            await store.commit(
                Commit(
                    sessions=[
                        SessionRow(m1, 2, NOW + 5, 10, 0, 0, key=k1b),
                        SessionRow(m2, 0, 0.0, 0, 0, 0, deleted=True),
                        SessionRow(m3, 0, 0.0, 0, 0, 0, deleted=True),
                        SessionRow(m3, 3, NOW + 6, 1, 2, 3, key=k2),
                    ]
                )
            )
            await store.commit(Commit(sessions=[SessionRow(m3, 0, 0.0, 0, 0, 0, deleted=True),
                                                SessionRow(m3, 4, NOW + 7, 4, 5, 6, key=k1)]))
        async with backend.opened() as store:
            sessions = {s.meter: s for s in (await store.load()).sessions}
            assert set(sessions) == {m1, m3}
            assert (sessions[m1].serial, sessions[m1].created, sessions[m1].key) == (2, NOW + 5, k1b)
            s3 = sessions[m3]
            assert (s3.serial, s3.tx_mark, s3.rx_lowest, s3.frames, s3.key) == (4, 4, 5, 6, k1)
            await store.commit(Commit(sessions=[SessionRow(m, 0, 0.0, 0, 0, 0, deleted=True) for m in (m1, m3)]))
            assert (await store.load()).sessions == []

    run(body())


def test_high_seq_and_gaps_round_trip(backend: Backend) -> None:
    records = factory_records(2)
    m1, m2 = (r["meter"] for r in records)
    title1 = bytes.fromhex(records[0]["system_title"])

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            big = list(range(1_000, 1_600, 3)) + [2**40]
            await store.commit(Commit(meters=[MeterRow(m1, title1, "c0001", 10, [3, 5, 7]),
                                              MeterRow(m2, b"", "", 2**40 + 1, big)]))
        async with backend.opened() as store:
            meters = {m.meter: m for m in (await store.load()).meters}
            assert (meters[m1].high_seq, meters[m1].gaps) == (10, [3, 5, 7])
            assert (meters[m2].high_seq, meters[m2].gaps) == (2**40 + 1, big)
            # Only high_seq and gaps are updated: title and concentrator stay.
            assert meters[m2].system_title == bytes.fromhex(records[1]["system_title"])
            assert meters[m2].concentrator == records[1]["concentrator"]
            # Gaps filled: stored as NULL, loaded as [].
            await store.commit(Commit(meters=[MeterRow(m1, title1, "c0001", 12, [])]))
            assert await backend.q(store, "SELECT high_seq, gaps FROM meters WHERE meter = ?", m1) == [(12, None)]
            meters = {m.meter: m for m in (await store.load()).meters}
            assert (meters[m1].high_seq, meters[m1].gaps) == (12, [])

    run(body())


# --------------------------------------------------------------------------
# atomicity


async def _state(backend: Backend, store) -> tuple:
    return (
        await backend.q(store, "SELECT * FROM readings ORDER BY meter, seq"),
        await backend.q(store, "SELECT * FROM keys ORDER BY meter, key_type, version"),
        await backend.q(store, "SELECT * FROM sessions ORDER BY meter"),
        await backend.q(store, "SELECT * FROM meters ORDER BY meter"),
    )


@pytest.mark.parametrize(
    "where",
    ["null-reading", "null-reading-bulk", "short-reading", "short-reading-bulk", "null-session-frames"],
)
def test_failed_commit_rolls_back_entirely(backend: Backend, where: str) -> None:
    """A Commit that fails midway leaves nothing of itself behind.

    "-bulk" cases are large enough for PostgresStore's COPY path.  The
    failing row comes last: readings, then keys, then sessions are applied
    in that order, so in "null-session-frames" everything else of the
    Commit has already been written when the error hits.
    """
    records = factory_records(2)
    m1, m2 = (r["meter"] for r in records)
    title1 = bytes.fromhex(records[0]["system_title"])

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            await store.commit(
                Commit(
                    readings=[reading(m1, 1)],
                    sessions=[SessionRow(m1, 1, NOW, 100, 0, 1, key=SecretBytes(secrets.token_bytes(16)))],
                )
            )
            before = await _state(backend, store)
            n = 300 if where.endswith("-bulk") else 3
            readings = [reading(m1, s) for s in range(2, 2 + n)] + [reading(m2, s) for s in range(n)]
            sessions = [SessionRow(m2, 1, NOW, 1, 1, 1, key=SecretBytes(secrets.token_bytes(16)))]
            if where == "null-session-frames":
                sessions.append(SessionRow(m1, 1, NOW, 200, 10, None))  # frames NOT NULL
            elif where.startswith("null-reading"):
                readings.append((m2, 10_000, 1, None, 1, 1, NOW))  # energy_wh NOT NULL
            else:
                readings.append((m2, 10_000, 1, 1, 1, 1))  # one column short
            bad = Commit(
                readings=readings,
                keys=[
                    KeyRow(m1, KeyType.AK, 2, KeyState.NEW, NOW, key=SecretBytes(secrets.token_bytes(16))),
                    KeyRow(m1, KeyType.AK, 1, KeyState.EXPIRED, NOW, tx_mark=5),
                ],
                sessions=sessions,
                meters=[MeterRow(m1, title1, "c0001", 99, [4])],
            )
            try:
                await store.commit(bad)
            except Exception:
                pass
            else:
                pytest.fail("the bad Commit was accepted")
            assert await _state(backend, store) == before
            # The store is still usable, and the same Commit, fixed, goes in.
            if where == "null-session-frames":
                sessions[-1].frames = 2
            else:
                readings[-1] = reading(m2, 10_000)
            await store.commit(bad)
            after = await _state(backend, store)
            assert len(after[0]) == len(before[0]) + 2 * n + (where != "null-session-frames")
            assert after[3] != before[3] and after[2] != before[2]
        async with backend.opened() as store:
            assert await _state(backend, store) == after

    run(body())


# --------------------------------------------------------------------------
# security: no key in the store in any form


def _encodings(key: bytes) -> dict[str, bytes]:
    b64 = base64.b64encode(key)
    u64 = base64.urlsafe_b64encode(key)
    return {
        "raw": key,
        "hex": key.hex().encode(),
        "HEX": key.hex().upper().encode(),
        "base64": b64,
        "base64-nopad": b64.rstrip(b"="),
        "urlsafe-base64": u64.rstrip(b"="),
    }


def _leaks(dump: bytes, keys: list[bytes]) -> list[str]:
    return [f"key #{i} as {name}" for i, k in enumerate(keys) for name, enc in _encodings(k).items() if enc in dump]


def _sqlite_dump(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


async def _pg_dump_selects(store: PostgresStore, schema: str) -> tuple[bytes, list[bytes]]:
    """Every column of every table of the schema, raw and as text."""
    out = bytearray()
    blobs: list[bytes] = []
    tables = await store.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", (schema,)
    )
    assert {t for (t,) in tables} >= {"meters", "keys", "sessions", "readings"}
    for (table,) in tables:
        columns = await store.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
            "ORDER BY ordinal_position",
            (schema, table),
        )
        cols = ", ".join(f'"{c}"' for (c,) in columns)
        for row in await store.query(f'SELECT {cols} FROM "{schema}"."{table}"'):
            for value in row:
                if isinstance(value, bytes):
                    out += value
                    blobs.append(value)
                else:
                    out += str(value).encode()
        # And the server's own text rendering of each row (bytea as \x hex).
        for (text,) in await store.query(f'SELECT t::text FROM "{schema}"."{table}" AS t'):
            out += text.encode()
    return bytes(out), blobs


def test_read_store_file_needs_no_vault(tmp_path: Path) -> None:
    """The public reader of a SQLite store file (``ami attack store`` uses it):
    named rows, keys as stored (wrapped), readings in clear."""
    records = factory_records(2)
    m1, m2 = (r["meter"] for r in records)
    session_key = SecretBytes(secrets.token_bytes(16))

    with _backend("sqlite", tmp_path) as backend:
        async def body() -> None:
            async with backend.opened() as store:
                await store.import_factory(records, NOW)
                await store.commit(Commit(readings=[reading(m1, s, 10 * s) for s in range(5)] + [reading(m2, 3)],
                                          sessions=[SessionRow(m1, 4, NOW, 100, 7, 9, key=session_key)],
                                          meters=[MeterRow(m1, b"", "", 4, [])]))

        run(body())
        contents = read_store_file(backend.db_path, samples=2)
        assert count_stored_readings(backend.db_path) == 6  # what ami loadtest counts
    assert count_stored_readings(tmp_path / "absent.db") is None
    assert contents.path == backend.db_path
    assert [(m.meter, m.system_title.hex(), m.concentrator) for m in contents.meters] == [
        (r["meter"], r["system_title"], r["concentrator"]) for r in records
    ]
    # The highest reading seq stored: the meters row's, or the readings' when
    # higher (SqliteStore._commit leaves a high_seq to the reading that has it).
    assert [m.high_seq for m in contents.meters] == [4, 3]
    assert [(k.meter, k.key_type, k.version, k.state) for k in contents.keys] == sorted(
        (r["meter"], kt.value, 1, "active") for r in records for kt in FACTORY_TYPES
    )
    (s,) = contents.sessions
    assert (s.meter, s.serial, s.tx_mark, s.rx_lowest, s.frames, s.pending) == (m1, 4, 100, 7, 9, False)
    clear = [bytes.fromhex(r[kt.value]) for r in records for kt in FACTORY_TYPES] + [bytes(session_key)]
    assert len(contents.wrapped_blobs) == 9 and not set(contents.wrapped_blobs) & set(clear)
    assert contents.reading_count == 6 and contents.readings_per_meter == {m1: 5, m2: 1}
    assert contents.sample_readings == (StoredReading(m1, 0, 1_700_000_000, 0, 500, 2301),
                                        StoredReading(m1, 1, 1_700_000_001, 10, 500, 2301))
    assert contents.last_readings[m1].seq == 4 and contents.last_readings[m2].energy_wh == 0
    assert "wrapped" not in repr(contents.keys[0]) and "raw" not in repr(contents)
    assert all(w in contents.raw for w in contents.wrapped_blobs)


def test_no_key_in_a_raw_dump(backend: Backend) -> None:
    records = factory_records(3)
    keys = [bytes.fromhex(r[kt.value]) for r in records for kt in FACTORY_TYPES]
    session_keys = [SecretBytes(secrets.token_bytes(16)) for _ in records]
    new_key = SecretBytes(secrets.token_bytes(16))
    every_key = keys + [bytes(k) for k in session_keys] + [bytes(new_key)]
    assert len(set(every_key)) == len(every_key)

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            await store.commit(
                Commit(
                    readings=[reading(r["meter"], 1) for r in records],
                    keys=[KeyRow(records[0]["meter"], KeyType.CC_LAN, 2, KeyState.NEW, NOW, key=new_key)],
                    sessions=[
                        SessionRow(r["meter"], 1, NOW, 10, 0, 1, key=k) for r, k in zip(records, session_keys)
                    ],
                )
            )
            key_rows = await store.query("SELECT wrapped, meter, key_type, version FROM keys")
            session_rows = await store.query("SELECT wrapped, meter, serial FROM sessions")
            wrapped = [bytes(w) for w, *_r in key_rows] + [bytes(w) for w, *_r in session_rows]
            identities = [key_identity(m, kt, v) for _w, m, kt, v in key_rows] + [
                session_identity(m, serial) for _w, m, serial in session_rows
            ]
            assert len(wrapped) == len(every_key)
            # Not vacuous: the vault recovers every key from what is stored.
            assert sorted(backend.vault.unwrap_many(wrapped, identities)) == sorted(every_key)
            snap = await store.load()
            assert sorted(bytes(k.key) for k in snap.keys) + sorted(bytes(s.key) for s in snap.sessions) == sorted(
                keys + [bytes(new_key)]
            ) + sorted(bytes(k) for k in session_keys)

            dumps: dict[str, bytes] = {}
            if backend.name == "sqlite":
                assert Path(f"{backend.db_path}-wal").exists()  # the commits are still in the WAL
                dumps["sqlite .db+-wal+-shm (open)"] = _sqlite_dump(backend.db_path)
            else:
                selects, blobs = await _pg_dump_selects(store, backend.schema)
                assert set(wrapped) <= set(blobs)
                dumps["SELECT every column"] = selects
                if shutil.which("pg_dump"):
                    proc = subprocess.run(
                        ["pg_dump", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "test",
                         "-n", backend.schema, "--no-owner"],
                        capture_output=True, timeout=60, check=True,
                    )
                    dumps["pg_dump"] = proc.stdout
                    proc = subprocess.run(
                        ["pg_dump", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "test",
                         "-n", backend.schema, "--no-owner", "--inserts"],
                        capture_output=True, timeout=60, check=True,
                    )
                    dumps["pg_dump --inserts"] = proc.stdout
        if backend.name == "sqlite":
            dumps["sqlite .db (closed)"] = _sqlite_dump(backend.db_path)

        for name, dump in dumps.items():
            # Positive control: the dump holds the wrapped key rows, in the
            # form this dump would show a clear key in.
            assert any(all(e in dump for e in (_encodings(w)[form] for w in wrapped)) for form in ("raw", "hex")), name
            assert _leaks(dump + keys[0].hex().upper().encode(), keys) == ["key #0 as HEX"]  # the search works
            assert _leaks(dump, every_key) == [], f"{name} leaks keys"

    run(body())


# --------------------------------------------------------------------------
# PostgreSQL specifics


@pytest.mark.postgres
def test_pg_schema_isolation_and_repr(pg_backend: Backend) -> None:
    backend = pg_backend
    store = PostgresStore(PG_DSN.replace("postgres@", "postgres:hunter2@") + f"?schema={backend.schema}", backend.vault)
    assert "hunter2" not in repr(store) and backend.schema in repr(store)
    with pytest.raises(ValueError):
        PostgresStore(f"{PG_DSN}?schema=x;DROP", backend.vault)

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(factory_records(2), NOW)
            tables = await store.query(
                "SELECT table_schema, table_name FROM information_schema.tables WHERE table_name = 'meters' "
                "AND table_schema = $1",
                (backend.schema,),
            )
            assert tables == [(backend.schema, "meters")]
        # The libpq-style options= works too (the server applies it).
        options = f"-c search_path={backend.schema}"
        other = PostgresStore(f"{PG_DSN}?options={options.replace(' ', '%20').replace('=', '%3D')}", backend.vault)
        await other.open()
        try:
            assert await count(backend, other, "meters") == 2
        finally:
            await other.close()

    run(body())


# --------------------------------------------------------------------------
# throughput (measured, not asserted)


def test_commit_throughput(backend: Backend, capsys) -> None:
    n, batches = 10_000, 6
    records = factory_records(100)

    async def body() -> list[float]:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            meters = [r["meter"] for r in records]
            seconds = []
            for b in range(batches):
                rows = [reading(meters[i % 100], b * n + i, energy=i) for i in range(n)]
                t0 = time.perf_counter()
                await store.commit(Commit(readings=rows))
                seconds.append(time.perf_counter() - t0)
            assert await count(backend, store, "readings") == n * batches
            return seconds

    seconds = run(body())
    med = statistics.median(seconds[1:])  # first one warms caches
    with capsys.disabled():
        print(
            f"\n[throughput] {backend.name}: {n} readings/commit, median {med * 1000:.1f} ms "
            f"= {n / med:,.0f} readings/s (min {min(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms)"
        )
