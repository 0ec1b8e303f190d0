"""Issue 9 at the store: one writer (lease + fencing), durable marks, private
files, wrapped keys bound to their rows, the migration of old stores, and
the service's reaction (StoreLocked / Fenced), plus its bounded inbox.

SQLite in tmp_path; PostgreSQL in a schema of its own (skipped, with the
reason, when 127.0.0.1:5432 does not answer), as in tests/test_store.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from ami.machines.headend_records import Commit, KeyRow
from ami.protocol.keys import KeyState, KeyType, SecretBytes
from ami.security.vault import VaultError, WrongRow
from headend.store_api import Fenced, StoreError, StoreLocked

try:  # tests/ used as a package, or (pytest's default) as a plain directory
    from tests.test_store import NOW, Backend, _backend, backend, factory_records, reading  # noqa: F401
except ImportError:
    from test_store import NOW, Backend, _backend, backend, factory_records, reading  # noqa: F401

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent


def run(coro):
    return asyncio.run(coro)


async def readings(store) -> int:
    return (await store.query("SELECT count(*) FROM readings"))[0][0]


# --------------------------------------------------------------------------
# single writer: lease and fencing


def test_a_second_writer_is_refused(backend: Backend) -> None:
    async def body() -> None:
        first = backend.new_store()
        await first.open(writer=True)
        try:
            assert first.epoch >= 1
            second = backend.new_store()
            with pytest.raises(StoreLocked, match="another head-end") as err:
                await second.open(writer=True)
            assert "owner" in str(err.value) and f"epoch {first.epoch}" in str(err.value)
            await second.close()
            # A reader (ami keys handheld, reports) still opens and reads, but never writes.
            reader = backend.new_store()
            await reader.open()
            try:
                assert reader.epoch == 0 and await readings(reader) == 0
                with pytest.raises(Fenced, match="read-only"):
                    await reader.commit(Commit(readings=[reading("m000001", 1)]))
            finally:
                await reader.close()
            epoch = first.epoch
        finally:
            await first.close()
        # Once the first one is gone the next start takes over: one epoch more.
        again = backend.new_store()
        await again.open(writer=True)
        try:
            assert again.epoch == epoch + 1
        finally:
            await again.close()

    run(body())


async def _steal_lease(backend: Backend, zombie) -> object:
    """A second writer gets past the OS lock the zombie still thinks it holds
    (SQLite: lock file removed; PostgreSQL: the lock's session cut), and takes over."""
    if backend.name == "sqlite":
        zombie.lock_path.unlink()
    else:
        await zombie._lease_conn.close()  # what a server restart or a network cut does
    thief = backend.new_store()
    for _ in range(50):
        try:
            await thief.open(writer=True)
            return thief
        except StoreLocked:
            await asyncio.sleep(0.1)
    raise AssertionError("the lease was never released")


def test_a_fenced_commit_raises_and_writes_nothing(backend: Backend) -> None:
    records = factory_records(2)
    m1 = records[0]["meter"]

    async def body() -> None:
        zombie = backend.new_store()
        await zombie.open(writer=True)
        await zombie.import_factory(records, NOW)
        await zombie.commit(Commit(readings=[reading(m1, 1)]))
        thief = await _steal_lease(backend, zombie)
        try:
            assert thief.epoch == zombie.epoch + 1
            new_key = SecretBytes(secrets.token_bytes(16))
            with pytest.raises(Fenced, match="took the writer lease over"):
                await zombie.commit(Commit(readings=[reading(m1, 2), reading(m1, 3)],
                                           keys=[KeyRow(m1, KeyType.CC_LAN, 2, KeyState.NEW, NOW, key=new_key)]))
            # Nothing of the fenced batch is there; the new writer works.
            assert await readings(thief) == 1
            assert await thief.query(backend.sql("SELECT count(*) FROM keys WHERE version = ?"), (2,)) == [(0,)]
            await thief.commit(Commit(readings=[reading(m1, 2)]))
            assert await readings(thief) == 2
            # Fenced for good: every later write, and even an empty commit.
            for batch in (Commit(readings=[reading(m1, 9)]), Commit()):
                with pytest.raises(Fenced):
                    await zombie.commit(batch)
            with pytest.raises(Fenced):
                await zombie.import_factory(factory_records(1, start=50), NOW)
            assert await readings(thief) == 2
        finally:
            await thief.close()
            await zombie.close()

    run(body())


_HOLD = """
import asyncio, sys
from pathlib import Path
from ami.security.vault import FileKeyVault
from headend.store_api import open_store

async def main():
    store = open_store(sys.argv[1], FileKeyVault(Path(sys.argv[2])), Path(sys.argv[3]))
    await store.open(writer=True)
    print("epoch", store.epoch, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_crashed_writer_leaves_no_stale_lease(backend: Backend) -> None:
    """kill -9 of the writer: the kernel (or the server) drops its lock at
    once, the next start takes over with the next epoch; no timer, no
    manual cleanup."""
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, backend.spec, str(backend.vault.path), str(backend.data_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("epoch"), line
        held = int(line.split()[1])

        async def refused() -> None:
            store = backend.new_store()
            try:
                with pytest.raises(StoreLocked):
                    await store.open(writer=True)
            finally:
                await store.close()

        run(refused())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    async def after() -> int:
        store = backend.new_store()
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.open(writer=True)
                break
            except StoreLocked:  # PostgreSQL notices the dead session within moments
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        try:
            return store.epoch
        finally:
            await store.close()

    assert run(after()) == held + 1


# --------------------------------------------------------------------------
# durable marks, private files (SQLite)


def test_sqlite_store_is_durable_and_private(tmp_path: Path) -> None:
    with _backend("sqlite", tmp_path) as backend:
        old = os.umask(0)  # the most permissive umask: the store must not depend on it
        try:
            async def body() -> None:
                async with backend.opened() as store:
                    # WAL + FULL: a commit is on disk before the service publishes.
                    assert await store.query("PRAGMA synchronous") == [(2,)]
                    assert await store.query("PRAGMA journal_mode") == [("wal",)]
                    await store.import_factory(factory_records(2), NOW)
                    files = [backend.db_path, *(Path(f"{backend.db_path}{s}") for s in ("-wal", "-shm", ".lock"))]
                    for path in files:
                        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
                assert stat.S_IMODE(backend.data_dir.stat().st_mode) == 0o700

            run(body())
        finally:
            os.umask(old)
        # A store left 0644 in a 0755 folder by older code is tightened at open.
        os.chmod(backend.data_dir, 0o755)
        os.chmod(backend.db_path, 0o644)

        async def reopen() -> None:
            async with backend.opened():
                pass

        run(reopen())
        assert stat.S_IMODE(backend.db_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(backend.data_dir.stat().st_mode) == 0o700


# --------------------------------------------------------------------------
# wrapped keys bound to their rows


def test_a_copied_wrapped_key_fails_to_load(backend: Backend) -> None:
    """Who can write the store but lacks the KEK: copy the EXPIRED CC_LAN's
    blob into the ACTIVE row, or meter A's AK blob into meter B's row.  The
    load fails naming that row; nothing of a key is in the error."""
    records = factory_records(2)
    m1, m2 = (r["meter"] for r in records)
    new_lan = SecretBytes(secrets.token_bytes(16))
    sql = backend.sql

    async def blob(store, meter: str, kt: str, version: int) -> bytes:
        rows = await store.query(sql("SELECT wrapped FROM keys WHERE meter = ? AND key_type = ? AND version = ?"),
                                 (meter, kt, version))
        return bytes(rows[0][0])

    async def put(store, meter: str, kt: str, version: int, wrapped: bytes) -> None:
        await store.query(sql("UPDATE keys SET wrapped = ? WHERE meter = ? AND key_type = ? AND version = ?"),
                          (wrapped, meter, kt, version))

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            await store.commit(Commit(keys=[KeyRow(m1, KeyType.CC_LAN, 2, KeyState.ACTIVE, NOW, key=new_lan),
                                            KeyRow(m1, KeyType.CC_LAN, 1, KeyState.EXPIRED, NOW)]))
            assert await store.active_key(m1, KeyType.CC_LAN) == new_lan
            expired, active = await blob(store, m1, "cc_lan", 1), await blob(store, m1, "cc_lan", 2)
            ak_1, ak_2 = await blob(store, m1, "ak", 1), await blob(store, m2, "ak", 1)
            secrets_ = [bytes(new_lan), *(bytes.fromhex(r[kt.value]) for r in records for kt in KeyType
                                          if kt.value in r)]

            # 1. The expired key copied back into the active row.
            await put(store, m1, "cc_lan", 2, expired)
            with pytest.raises(WrongRow, match=f"ami-key\\|{m1}\\|cc_lan\\|2") as err:
                await store.load()
            with pytest.raises(WrongRow):
                await store.active_key(m1, KeyType.CC_LAN)
            assert store.unwrap_failures == 2
            for text in (str(err.value), repr(err.value)):
                assert not any(s.hex() in text.lower() for s in secrets_ + [expired, active])
            await put(store, m1, "cc_lan", 2, active)

            # 2. Meter 1's AK copied into meter 2's row.
            await put(store, m2, "ak", 1, ak_1)
            with pytest.raises(WrongRow, match=f"ami-key\\|{m2}\\|ak\\|1"):
                await store.load()
            await put(store, m2, "ak", 1, ak_2)
            snap = await store.load()  # restored: loads again
            assert {(k.meter, k.key_type, k.version) for k in snap.keys} >= {(m1, KeyType.CC_LAN, 2)}

    run(body())


def _legacy(kek: bytes, blob: bytes) -> bytes:
    """What the old code stored: plain RFC 3394 of the key (binding stripped)."""
    return aes_key_wrap(kek, aes_key_unwrap(kek, blob)[:16])


def test_an_old_store_is_rewrapped_once_and_a_mixed_one_refused(backend: Backend) -> None:
    """Migration: a store the old code wrote (every blob unbound) is re-wrapped,
    each key bound to its row, at the writer's first open; a store mixing old
    and bound blobs is refused (an unbound blob cannot be told from a copy)."""
    records = factory_records(2)
    kek = backend.vault.path.read_bytes()
    sql = backend.sql

    async def rows(store) -> list[tuple]:
        return await store.query("SELECT meter, key_type, version, wrapped FROM keys ORDER BY 1, 2, 3")

    async def body() -> None:
        async with backend.opened() as store:
            await store.import_factory(records, NOW)
            before = await store.load()
            for m, kt, v, w in await rows(store):
                await store.query(sql("UPDATE keys SET wrapped = ? WHERE meter = ? AND key_type = ? AND version = ?"),
                                  (_legacy(kek, bytes(w)), m, kt, v))
            assert {len(bytes(w)) for *_k, w in await rows(store)} == {24}
        # A reader does not migrate: the load names the old format.
        reader = backend.new_store()
        await reader.open()
        try:
            with pytest.raises(VaultError, match="old, unbound format"):
                await reader.load()
        finally:
            await reader.close()
        async with backend.opened() as store:  # the writer's first open re-wraps
            assert {len(bytes(w)) for *_k, w in await rows(store)} == {48}
            after = await store.load()
            assert sorted((k.meter, k.key_type, bytes(k.key)) for k in after.keys) == sorted(
                (k.meter, k.key_type, bytes(k.key)) for k in before.keys)
            m, kt, v, w = (await rows(store))[0]
            await store.query(sql("UPDATE keys SET wrapped = ? WHERE meter = ? AND key_type = ? AND version = ?"),
                              (_legacy(kek, bytes(w)), m, kt, v))
        store = backend.new_store()
        try:
            with pytest.raises(StoreError, match="mixes old"):
                await store.open(writer=True)
        finally:
            await store.close()

    run(body())
