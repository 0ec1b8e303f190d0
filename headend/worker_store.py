"""PostgreSQL for the clustered head-end: the head-end store, per partition.

:class:`PartitionStore` is :class:`headend.pgstore.PostgresStore` (same
tables, same wrapped keys, same commit of a :class:`Commit`) with the
single-writer lease replaced by one lease **per partition**:

* ``cluster_partitions(partition, epoch, owner)``: a worker that becomes
  the active consumer of partition queue *p* takes it over
  (:meth:`take_over`: ``epoch = epoch + 1``, owner = itself) before it
  loads any state of *p*'s meters;
* every commit of *p* (:meth:`commit_partition`) starts with the fence
  ``UPDATE cluster_partitions ... WHERE partition = p AND epoch = mine AND
  owner = me``: the row lock orders it against a take-over, and after a
  take-over it updates no row, the transaction is rolled back and
  :class:`Fenced` raised.  A zombie worker can no longer commit, so it can
  no longer publish (frames leave only after their commit);
* ``cluster_batches`` and ``cluster_redeliveries`` are pruned past a
  retention by the partitions' owners (:meth:`prune`, BRIN index on ``at``);
* the same transaction stores the rows of the engines' Commit (readings
  under their ``(meter, seq)`` key, counter marks, sessions), the digest of
  every broker message it consumed (``cluster_batches``: a redelivery of a
  committed batch is recognised and acked without being processed again),
  the outbox of downlink frames, replies and events (``cluster_outbox``:
  published after the commit, deleted once confirmed; what a dead owner
  left there is published by the next owner of the partition) and the
  rejection counts.

Send counters: the engine reserves invocation counters in blocks
(``Policy.counter_block``) and hands the new high-water marks in the
Commit; they are durable, under the partition's fence, before any frame
sealed under them leaves.  A new owner loads those marks, and loads every
session receive-only (its first downlink re-associates under the CC_LAN
mark and IC clock): two workers never seal under the same (key, IV).

Operator commands are stored in ``cluster_commands`` and announced with
``NOTIFY ami_commands`` in the same transaction: every worker applies them
to the meters it owns, and a worker that takes a partition over applies
the rotations still open for its meters (a campaign survives a worker).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable

import asyncpg

from ami.machines.headend_records import Commit, Snapshot
from headend import store_sql
from headend.pgstore import PostgresStore
from headend.store_sql import Fenced

__all__ = ["CLUSTER_SCHEMA", "NOTIFY_CHANNEL", "PartitionStore"]

NOTIFY_CHANNEL = "ami_commands"

CLUSTER_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_partitions (
    partition INTEGER PRIMARY KEY,
    epoch BIGINT NOT NULL,
    owner TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_owners (
    partition INTEGER NOT NULL,
    epoch BIGINT NOT NULL,
    owner TEXT NOT NULL,
    worker TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (partition, epoch)
);
CREATE TABLE IF NOT EXISTS cluster_batches (
    digest BYTEA PRIMARY KEY,
    partition INTEGER NOT NULL,
    epoch BIGINT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS cluster_batches_at ON cluster_batches USING brin (at);
CREATE TABLE IF NOT EXISTS cluster_redeliveries (
    id BIGSERIAL PRIMARY KEY,
    digest BYTEA NOT NULL,
    partition INTEGER NOT NULL,
    worker TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_outbox (
    id BIGSERIAL PRIMARY KEY,
    partition INTEGER NOT NULL,
    epoch BIGINT NOT NULL,
    routing_key TEXT NOT NULL,
    body BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_rejections (
    partition INTEGER NOT NULL,
    reason TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (partition, reason)
);
CREATE TABLE IF NOT EXISTS cluster_commands (
    id BIGSERIAL PRIMARY KEY,
    body TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
"""

_FENCE = "UPDATE cluster_partitions SET since = since WHERE partition = $1 AND epoch = $2 AND owner = $3"
_CONC = "(SELECT meter FROM meters WHERE concentrator = $1)"


class PartitionStore(PostgresStore):
    """A worker's store: many partitions, each fenced by its own epoch."""

    def __init__(self, dsn: str, vault, *, pool_size: int = 8) -> None:
        # A connection per partition in flight (commit, digest lookup, outbox),
        # plus one for loads and housekeeping.
        super().__init__(dsn, vault, pool_size=pool_size)

    async def open(self, *, writer: bool = False, partitions: int = 0) -> None:
        await super().open(writer=False)
        async with self._require_pool().acquire() as conn:
            await self._create_schema(conn, CLUSTER_SCHEMA)
            if partitions:
                await conn.executemany(
                    "INSERT INTO cluster_partitions (partition, epoch, owner, since) VALUES ($1, 0, '', 0) "
                    "ON CONFLICT (partition) DO NOTHING", [(p,) for p in range(partitions)])

    async def _fence(self, conn: asyncpg.Connection) -> None:
        # Only import_factory reaches this (insert-only, under its advisory
        # lock): the partitions' own fence is in commit_partition.
        return None

    # -- ownership ---------------------------------------------------------------

    async def take_over(self, partition: int, owner: str, worker: str) -> tuple[int, list[tuple[int, str, bytes]]]:
        """Become partition's owner: its epoch + 1.  Returns (epoch, what the
        previous owners left in the outbox: (id, routing key, body))."""
        async with self._require_pool().acquire() as conn, conn.transaction():
            epoch = await conn.fetchval(
                "UPDATE cluster_partitions SET epoch = epoch + 1, owner = $2, since = $3 WHERE partition = $1 "
                "RETURNING epoch", partition, owner, time.time())
            if epoch is None:
                raise Fenced(f"partition {partition} is not declared in this store")
            await conn.execute("INSERT INTO cluster_owners VALUES ($1, $2, $3, $4, $5)", partition, epoch, owner,
                               worker, time.time())
            left = await conn.fetch("SELECT id, routing_key, body FROM cluster_outbox WHERE partition = $1 "
                                    "ORDER BY id", partition)
        return int(epoch), [(r["id"], r["routing_key"], bytes(r["body"])) for r in left]

    async def load_concentrator(self, concentrator: str) -> Snapshot:
        """The state of one concentrator's meters (keys unwrapped), one snapshot."""
        pool = self._require_pool()
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            meter_rows = await conn.fetch(store_sql.SELECT_METERS + " WHERE concentrator = $1", concentrator)
            raw_keys = await conn.fetch(store_sql.SELECT_LIVE_KEYS + f" AND meter IN {_CONC}", concentrator)
            raw_sessions = await conn.fetch(store_sql.SELECT_SESSIONS + f" WHERE meter IN {_CONC}", concentrator)
            raw_versions = await conn.fetch(
                f"SELECT meter, key_type, max(version) FROM keys WHERE meter IN {_CONC} GROUP BY meter, key_type",
                concentrator)
        return await self._snapshot(meter_rows, raw_keys, raw_sessions, raw_versions)

    # -- the batch transaction ----------------------------------------------------

    async def seen(self, digests: list[bytes]) -> set[bytes]:
        rows = await self._require_pool().fetch("SELECT digest FROM cluster_batches WHERE digest = ANY($1)",
                                                digests)
        return {bytes(r[0]) for r in rows}

    async def note_redelivery(self, digest: bytes, partition: int, worker: str) -> None:
        await self._require_pool().execute(
            "INSERT INTO cluster_redeliveries (digest, partition, worker, at) VALUES ($1, $2, $3, $4)",
            digest, partition, worker, time.time())

    async def commit_partition(
        self,
        partition: int,
        epoch: int,
        owner: str,
        batch: Commit,
        digests: Iterable[bytes],
        outbox: list[tuple[str, bytes]],
        rejections: dict[str, int],
    ) -> list[int]:
        """One transaction: fence, the Commit's rows, the consumed messages'
        digests, the outbox, the rejection counts.  Returns the outbox ids."""
        prepared = await self._prepare(batch)
        now = time.time()
        # No process-wide write lock (the single head-end's): partitions own
        # disjoint rows (their concentrators' meters, their fence row, their
        # rejection rows), so their transactions run side by side, on several
        # pool connections, exactly as those of different workers do.
        async with self._require_pool().acquire() as conn, conn.transaction():
            if await conn.execute(_FENCE, partition, epoch, owner) != "UPDATE 1":
                raise Fenced(f"partition {partition}: another worker took it over (this one held epoch {epoch}); "
                             "nothing was committed")
            await self._apply(conn, batch, prepared)
            digests = list(digests)
            if digests:
                # A duplicate digest here means another transaction committed
                # the same message: fail (roll back) rather than store twice.
                await conn.executemany("INSERT INTO cluster_batches VALUES ($1, $2, $3, $4)",
                                       [(d, partition, epoch, now) for d in digests])
            ids: list[int] = []
            if outbox:
                ids = [r[0] for r in await conn.fetch(
                    "INSERT INTO cluster_outbox (partition, epoch, routing_key, body) "
                    "SELECT $1, $2, k, b FROM unnest($3::text[], $4::bytea[]) AS t(k, b) RETURNING id",
                    partition, epoch, [k for k, _ in outbox], [b for _, b in outbox])]
            if rejections:
                await conn.executemany(
                    "INSERT INTO cluster_rejections VALUES ($1, $2, $3) ON CONFLICT (partition, reason) "
                    "DO UPDATE SET n = cluster_rejections.n + excluded.n",
                    [(partition, r, n) for r, n in rejections.items()])
        return ids

    async def prune(self, partitions: list[int], before: float, *, chunk: int = 10_000) -> tuple[int, int]:
        """Delete ``cluster_batches`` and ``cluster_redeliveries`` rows of these
        partitions older than ``before`` (epoch seconds), ``chunk`` rows per
        transaction (never a long lock beside the commits); returns the counts.

        Only rows past the retention go: a digest is needed while a message it
        covers can still come back (a redelivery, a QoS 1 copy)."""
        pool = self._require_pool()
        counts = []
        for table in ("cluster_batches", "cluster_redeliveries"):
            total = 0
            while True:
                status = await pool.execute(
                    f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                    "WHERE partition = ANY($1::int[]) AND at < $2 LIMIT $3))", partitions, before, chunk)
                n = int(status.rsplit(" ", 1)[-1])
                total += n
                if n < chunk:
                    break
            counts.append(total)
        return counts[0], counts[1]

    async def outbox_sent(self, ids: list[int]) -> None:
        if ids:
            await self._require_pool().execute("DELETE FROM cluster_outbox WHERE id = ANY($1)", ids)

    # -- commands -------------------------------------------------------------------

    async def add_command(self, cmd: dict) -> int:
        async with self._require_pool().acquire() as conn, conn.transaction():
            cid = await conn.fetchval("INSERT INTO cluster_commands (body, at) VALUES ($1, $2) RETURNING id",
                                      json.dumps(cmd), time.time())
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(cid))
        return int(cid)

    async def commands_since(self, after_id: int, not_before: float) -> list[tuple[int, dict, float]]:
        rows = await self._require_pool().fetch(
            "SELECT id, body, at FROM cluster_commands WHERE id > $1 AND at >= $2 ORDER BY id", after_id, not_before)
        return [(int(r["id"]), json.loads(r["body"]), float(r["at"])) for r in rows]

    async def listen(self, callback) -> asyncpg.Connection:
        """A connection of its own that calls ``callback(command id)`` on each NOTIFY."""
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: callback(int(payload)))
        return conn


async def wait_closed(conn: asyncpg.Connection | None) -> None:
    if conn is not None:
        await asyncio.shield(conn.close())
