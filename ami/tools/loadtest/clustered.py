"""``ami loadtest --cluster-workers N``: the clustered head-end under load.

What a clustered run needs besides the single-process one
(docs/scale-out.md, docs/benchmarks.md):

* a 3-node RabbitMQ cluster of its own in the run folder
  (:func:`ami.tools.cluster.up`: own node names, free ports, random cookie),
  stopped by PID at the end, also when the run fails;
* a fresh PostgreSQL database (``ami_lt_<pid>_<random>``) on the server of
  ``--cluster-pg`` (trust auth), dropped at the end unless ``--keep``;
* N ``ami headend-worker`` processes (spawned by ``run.LoadTest``);
* per-process figures for the three ``beam.smp`` nodes (role ``broker``) and
  for the PostgreSQL backends serving this run's database (role
  ``postgres``: only the backends of our database, so other users of the
  server are not counted; the server's shared WAL writer and checkpointer
  are not attributed);
* the final counts from PostgreSQL: rows in ``readings``, rejections by
  reason (``cluster_rejections``), recognised redeliveries, take-overs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil

from ami.runtime.bus import port_open
from ami.tools import cluster as rmq

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
NODES = 3
# Port ranges of our own (tests use 25700-26000 / 21900-22200, the demo 5681 / 1891).
AMQP_RANGE = (26100, 26600)
MQTT_RANGE = (22300, 22800)


def _server(dsn: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _with_db(dsn: str, db: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{db}"))


def missing(pg: str = DEFAULT_PG) -> str | None:
    """Why a clustered run cannot happen here (None: it can)."""
    why = rmq.rabbitmq_missing()
    if why:
        return why
    host, port = _server(pg)
    if not port_open(host, port):
        return f"PostgreSQL not listening on {host}:{port} (--cluster-pg {pg})"
    try:
        asyncio.run(_execute(_with_db(pg, "postgres"), "SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any refusal: report it
        return f"PostgreSQL at {host}:{port} refused us: {type(exc).__name__}: {exc}"
    return None


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch(dsn: str, queries: dict[str, str]) -> dict[str, list]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        out = {}
        for name, sql in queries.items():
            try:
                out[name] = [tuple(r) for r in await conn.fetch(sql)]
            except asyncpg.UndefinedTableError:
                out[name] = []
        return out
    finally:
        await conn.close()


class ClusterRun:
    """The cluster and the database of one run."""

    def __init__(self, root: Path, tag: str, pg: str = DEFAULT_PG) -> None:
        self.root = Path(root)
        self.tag = tag
        self.pg = pg
        self.db = f"ami_lt_{os.getpid()}_{secrets.token_hex(3)}"
        self.cluster: rmq.Cluster | None = None
        self.db_created = False
        self.owned = False  # the cluster was started here (and is stopped here)
        self.started_s: float | None = None
        self._pg_procs: dict[int, psutil.Process] = {}
        self._postmaster: psutil.Process | None = None

    @property
    def dsn(self) -> str:
        return _with_db(self.pg, self.db)

    def start(self, existing: Path | None = None) -> rmq.Cluster:
        """Start a cluster of the run's own under ``root`` or, with ``existing``,
        use the running one there (``ami cluster up --dir``: never stopped
        here); then create the database."""
        t0 = time.monotonic()
        if existing is not None:
            cluster = rmq.Cluster.load(Path(existing))
            down = [n.name for n in cluster.nodes if not cluster.running(n)]
            if down:
                raise rmq.ClusterError(f"nodes of the cluster in {existing} are not running: {down}")
            self.cluster, self.owned = cluster, False
        else:
            amqp = rmq.free_run(NODES, *AMQP_RANGE, also=20000)
            mqtt = rmq.free_run(NODES, *MQTT_RANGE)
            self.owned = True
            self.cluster = rmq.up(self.root, nodes=NODES, amqp_base=amqp, mqtt_base=mqtt,
                                  prefix=f"ami{self.tag}-")
        try:
            asyncio.run(_execute(_with_db(self.pg, "postgres"), f'CREATE DATABASE "{self.db}"'))
            self.db_created = True
        except BaseException:
            if self.owned:
                rmq.down(self.root)
            raise
        self.started_s = round(time.monotonic() - t0, 1)
        return self.cluster

    def node_processes(self) -> list[tuple[str, psutil.Process | None]]:
        assert self.cluster is not None
        out: list[tuple[str, psutil.Process | None]] = []
        for node in self.cluster.nodes:
            try:
                pid = self.cluster.vm_pid(node)  # beam.smp, not the start script
                ps = psutil.Process(pid) if pid else None
                if ps is not None:
                    ps.cpu_percent(None)
            except psutil.Error:
                ps = None
            out.append((f"rabbitmq-{node.index}", ps))
        return out

    def pg_backends(self) -> list[psutil.Process]:
        """The server's backends serving our database (``postgres: user db host state``)."""
        marker = f" {self.db} "
        found: dict[int, psutil.Process] = {}
        candidates: list[psutil.Process]
        if self._postmaster is not None and self._postmaster.is_running():
            try:
                candidates = self._postmaster.children()
            except psutil.Error:
                candidates = []
        else:
            candidates = list(psutil.process_iter())
        for ps in candidates:
            try:
                title = " ".join(ps.cmdline())
                if title.startswith("postgres: ") and marker in title + " ":
                    found[ps.pid] = self._pg_procs.get(ps.pid, ps)
                    if self._postmaster is None:
                        self._postmaster = ps.parent()
            except psutil.Error:
                continue
        self._pg_procs = found
        return list(found.values())

    def final_counts(self) -> dict[str, Any]:
        """What PostgreSQL holds at the end of the run."""
        rows = asyncio.run(_fetch(self.dsn, {
            "readings": "SELECT count(*) FROM readings",
            "distinct": "SELECT count(*) FROM (SELECT DISTINCT meter, seq FROM readings) x",
            "meters": "SELECT count(DISTINCT meter) FROM readings",
            "rejections": "SELECT reason, sum(n)::bigint FROM cluster_rejections GROUP BY reason",
            "redeliveries": "SELECT count(*) FROM cluster_redeliveries",
            "batches": "SELECT count(*) FROM cluster_batches",
            "owners": "SELECT partition, count(DISTINCT owner), max(epoch) FROM cluster_owners GROUP BY partition",
            "partitions_used": "SELECT count(DISTINCT partition) FROM cluster_batches",
            "outbox_left": "SELECT count(*) FROM cluster_outbox",
        }))

        def one(name: str) -> int:
            return int(rows[name][0][0]) if rows[name] else 0

        return {
            "readings": one("readings"),
            "readings_distinct": one("distinct"),
            "meters_with_readings": one("meters"),
            "rejections": {str(r): int(n) for r, n in rows["rejections"] if n},
            "redeliveries_recognised": one("redeliveries"),
            "batches_committed": one("batches"),
            "partitions_used": one("partitions_used"),
            "takeovers": sum(int(e) for _p, _o, e in rows["owners"]),
            "outbox_left": one("outbox_left"),
        }

    def stop(self, *, keep: bool = False) -> list[str]:
        """Stop the nodes (by PID), drop the database unless ``keep``; notes of what failed."""
        notes: list[str] = []
        if self.cluster is not None and self.owned:
            try:
                rmq.down(self.root)
            except Exception as exc:  # noqa: BLE001 - report, go on with the database
                notes.append(f"stopping the RabbitMQ cluster: {exc}")
        if self.db_created and not keep:
            try:
                asyncio.run(_execute(_with_db(self.pg, "postgres"), f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
                self.db_created = False
            except Exception as exc:  # noqa: BLE001
                notes.append(f"dropping database {self.db}: {exc}")
        elif self.db_created:
            notes.append(f"database kept: {self.dsn}")
        return notes


__all__ = ["DEFAULT_PG", "ClusterRun", "missing"]
