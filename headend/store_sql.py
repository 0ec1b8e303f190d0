"""The SQL both head-end store backends run, written once.

Statements are written with SQLite's ``?`` placeholders; :func:`numbered`
gives PostgreSQL's ``$1, $2...`` form (asyncpg).  Everything here is plain
SQL that SQLite (>= 3.24: ``ON CONFLICT ... DO UPDATE``, >= 3.23: ``FALSE``)
and PostgreSQL read alike.  What stays per backend: the schemas (``BLOB``
vs ``BYTEA``, ``WITHOUT ROWID``, ``CHECK``s), SQLite's transaction
statements, PostgreSQL's advisory locks and COPY path.

Imported by :mod:`headend.store` and :mod:`headend.pgstore`; imports
nothing of either.  Also here, for the same reason: the store errors
(:class:`StoreError`, :class:`StoreLocked`, :class:`Fenced`), the lease
statements and the one-time re-wrap of old, unbound wrapped keys.

The single-writer lease (both backends): a one-row ``lease`` table (owner,
epoch, heartbeat).  A writer first takes an OS-level lock that dies with
its process (SQLite: ``flock`` on ``<store>.lock``; PostgreSQL: a
session-level advisory lock on a connection of its own), then, in one
transaction, bumps ``epoch`` and writes itself as owner.  Every write
transaction starts with :data:`FENCE` (``... WHERE epoch = mine AND owner =
me``): when it updates no row, another writer has taken over, the
transaction is rolled back and :class:`Fenced` raised.  Liveness is the OS
lock, never a timer: a crashed writer's lock is released by the kernel (or
the server, with its session) and the next start takes over at once; a
writer that is merely slow is never declared dead, and a zombie (lock lost
without noticing: lock file deleted, PostgreSQL session cut) can no longer
commit, so it can no longer publish (the service publishes only after a
commit).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Sequence
from typing import Any

from ami.runtime.logs import get_logger
from ami.security.vault import VaultError, is_legacy_blob, key_identity, session_identity

log = get_logger("store")

__all__ = [
    "ACTIVE_KEY",
    "ACTIVE_VERSION",
    "DELETE_SESSION",
    "FENCE",
    "Fenced",
    "LEASE_OWNER",
    "SELECT_ALL_WRAPPED_KEYS",
    "SELECT_ALL_WRAPPED_SESSIONS",
    "StoreError",
    "StoreLocked",
    "TAKE_LEASE",
    "REWRAP_KEY",
    "REWRAP_SESSION",
    "INSERT_FACTORY_KEY",
    "INSERT_METER",
    "INSERT_READING",
    "KNOWN_METERS",
    "READING_COLUMNS",
    "SELECT_LIVE_KEYS",
    "SELECT_MAX_VERSIONS",
    "SELECT_METERS",
    "SELECT_METER_SUITES",
    "SET_METER_SUITE",
    "METER_SUITE_COLUMNS",
    "suite_rows",
    "SELECT_SESSIONS",
    "UPDATE_KEY",
    "UPDATE_HIGH_SEQ",
    "UPDATE_METER",
    "UPDATE_SESSION",
    "UPSERT_KEY",
    "UPSERT_SESSION",
    "lease_owner",
    "numbered",
    "rewrap_legacy",
    "unwrap_one",
    "unwrap_rows",
]


class StoreError(Exception):
    """A store refuses: messages name the store and rows, never key bytes."""


class StoreLocked(StoreError):
    """Another live head-end holds the store's writer lease: this one must not send."""


class Fenced(StoreError):
    """This store is not (or no longer) the writer: the transaction was rolled
    back, nothing was written, and nothing drained with it may be published."""


def numbered(sql: str) -> str:
    """``?`` placeholders -> ``$1, $2...`` (none of these statements has a
    ``?`` inside a string literal)."""
    n = 0

    def next_placeholder(_m: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"\?", next_placeholder, sql)


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


# -- provisioning ---------------------------------------------------------------

KNOWN_METERS = "SELECT meter FROM meters"
INSERT_METER = "INSERT INTO meters (meter, system_title, concentrator) VALUES (?, ?, ?)"
INSERT_FACTORY_KEY = "INSERT INTO keys (meter, key_type, version, state, wrapped, created) VALUES (?, ?, ?, ?, ?, ?)"

# -- cold start (column order = the order the loaders unpack) ---------------------

SELECT_METERS = "SELECT meter, system_title, concentrator, high_seq, gaps FROM meters"
SELECT_LIVE_KEYS = (
    "SELECT meter, key_type, version, state, wrapped, created, tx_mark, rx_lowest FROM keys WHERE state != 'expired'"
)
#: Versions ever given, EXPIRED included: the engine never reuses a number.
SELECT_MAX_VERSIONS = "SELECT meter, key_type, max(version) FROM keys GROUP BY meter, key_type"
SELECT_SESSIONS = (
    "SELECT meter, serial, wrapped, created, tx_mark, rx_lowest, frames, pending, lan_version FROM sessions"
)

# -- commits ------------------------------------------------------------------------

READING_COLUMNS = ("meter", "seq", "ts", "energy_wh", "power_w", "voltage_dv", "received")
# ON CONFLICT on the key only: a duplicate (meter, seq) is skipped (the first
# copy wins); any other bad row fails the whole Commit.
INSERT_READING = (
    f"INSERT INTO readings ({', '.join(READING_COLUMNS)}) VALUES ({_placeholders(len(READING_COLUMNS))}) "
    "ON CONFLICT (meter, seq) DO NOTHING"
)
# Upserts write every column, so they store what INSERT OR REPLACE would,
# except that a NULL in a NOT NULL column fails (REPLACE would have put the
# column's DEFAULT there) on both backends alike.
UPSERT_KEY = (
    "INSERT INTO keys (meter, key_type, version, state, wrapped, created, tx_mark, rx_lowest) "
    f"VALUES ({_placeholders(8)}) "
    "ON CONFLICT (meter, key_type, version) DO UPDATE SET state = excluded.state, "
    "wrapped = excluded.wrapped, created = excluded.created, tx_mark = excluded.tx_mark, "
    "rx_lowest = excluded.rx_lowest"
)
UPDATE_KEY = "UPDATE keys SET state = ?, tx_mark = ?, rx_lowest = ? WHERE meter = ? AND key_type = ? AND version = ?"
DELETE_SESSION = "DELETE FROM sessions WHERE meter = ? AND pending = ?"
UPSERT_SESSION = (
    "INSERT INTO sessions (meter, pending, serial, wrapped, created, tx_mark, rx_lowest, frames, lan_version) "
    f"VALUES ({_placeholders(9)}) "
    "ON CONFLICT (meter, pending) DO UPDATE SET serial = excluded.serial, wrapped = excluded.wrapped, "
    "created = excluded.created, tx_mark = excluded.tx_mark, rx_lowest = excluded.rx_lowest, "
    "frames = excluded.frames, lan_version = excluded.lan_version"
)
# Counter updates of the confirmed session only (FALSE: SQLite's 0, PostgreSQL's false).
UPDATE_SESSION = (
    "UPDATE sessions SET tx_mark = ?, rx_lowest = ?, frames = ? WHERE meter = ? AND pending = FALSE AND serial = ?"
)
UPDATE_METER = "UPDATE meters SET high_seq = ?, gaps = ? WHERE meter = ?"
UPDATE_HIGH_SEQ = "UPDATE meters SET high_seq = ? WHERE meter = ?"

# Suite 1 (the meter's LAN association suite, and its public signing key).
#: Columns added to ``meters`` (ALTER TABLE on a store from before suite 1).
METER_SUITE_COLUMNS = ("suite INTEGER NOT NULL DEFAULT 0", "sign_public BLOB")
SET_METER_SUITE = "UPDATE meters SET suite = ?, sign_public = ? WHERE meter = ?"
SELECT_METER_SUITES = "SELECT meter, suite, sign_public FROM meters WHERE suite != 0"


def suite_rows(records: list[dict]) -> list[tuple[int, bytes, str]]:
    """SET_METER_SUITE rows of the suite-1 meters among factory ``records``
    (their public signing key; the private half never reaches the head-end)."""
    return [(int(r["suite"]), bytes.fromhex(r["sign_public"]), r["meter"]) for r in records if r.get("suite")]

# -- queries ------------------------------------------------------------------------

ACTIVE_VERSION = "SELECT max(version) FROM keys WHERE meter = ? AND key_type = ? AND state = 'active'"
# The newest active version: the one ACTIVE_VERSION names.
ACTIVE_KEY = (
    "SELECT wrapped, version FROM keys WHERE meter = ? AND key_type = ? AND state = 'active' "
    "ORDER BY version DESC LIMIT 1"
)

# -- the single-writer lease ----------------------------------------------------------

LEASE_OWNER = "SELECT owner, epoch, heartbeat FROM lease WHERE id = 1"
TAKE_LEASE = (
    "INSERT INTO lease (id, owner, epoch, heartbeat) VALUES (1, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, heartbeat = excluded.heartbeat"
)
# The first statement of every write transaction: one row, or Fenced.
FENCE = "UPDATE lease SET heartbeat = ? WHERE id = 1 AND epoch = ? AND owner = ?"

# -- re-wrapping the old, unbound blobs (once) -------------------------------------------

SELECT_ALL_WRAPPED_KEYS = "SELECT meter, key_type, version, wrapped FROM keys"
SELECT_ALL_WRAPPED_SESSIONS = "SELECT meter, pending, serial, wrapped FROM sessions"
REWRAP_KEY = "UPDATE keys SET wrapped = ? WHERE meter = ? AND key_type = ? AND version = ?"
REWRAP_SESSION = "UPDATE sessions SET wrapped = ? WHERE meter = ? AND pending = ?"


def rewrap_legacy(vault: Any, keys: Sequence[tuple], sessions: Sequence[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Migration of a store written before wrapped keys were bound to their rows.

    ``keys``: (meter, key_type, version, wrapped) of every key row;
    ``sessions``: (meter, pending, serial, wrapped).  Returns the
    (REWRAP_KEY, REWRAP_SESSION) arguments, empty when nothing is old.

    Policy: a store whose blobs are *all* old (what the old code wrote) is
    re-wrapped, every row bound to itself, on the writer's first open (one
    transaction).  A store that mixes old and bound blobs is refused: the
    code never writes one, so an old blob there was planted (or the store
    was downgraded), and an unbound blob cannot be told from a copied one.
    Rows copied before the migration cannot be detected by it: migrate a
    store you trust (restored from a trusted backup if in doubt).
    """
    old_keys = [r for r in keys if is_legacy_blob(bytes(r[3]))]
    old_sessions = [r for r in sessions if is_legacy_blob(bytes(r[3]))]
    if not old_keys and not old_sessions:
        return [], []
    if len(old_keys) != len(keys) or len(old_sessions) != len(sessions):
        rows = [f"{m}/{kt}/v{v}" for m, kt, v, _w in old_keys[:3]] + [f"{m}/session" for m, *_r in old_sessions[:3]]
        raise StoreError(
            f"the store mixes old (unbound) and bound wrapped keys ({len(old_keys) + len(old_sessions)} old rows, "
            f"e.g. {', '.join(rows[:3])}): an unbound key cannot be told from a copied one; restore a trusted "
            "backup or re-provision these meters"
        )
    clear = vault.unwrap_legacy_many([bytes(r[3]) for r in old_keys] + [bytes(r[3]) for r in old_sessions])
    key_args = [
        (vault.wrap(clear[i], key_identity(m, kt, v)), m, kt, v) for i, (m, kt, v, _w) in enumerate(old_keys)
    ]
    off = len(old_keys)
    session_args = [
        (vault.wrap(clear[off + i], session_identity(m, serial)), m, pending)
        for i, (m, pending, serial, _w) in enumerate(old_sessions)
    ]
    return key_args, session_args


def lease_owner() -> str:
    """Who holds a lease (host, pid, random): shown to a refused second writer."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"


def unwrap_rows(store: Any, raw_keys: list, raw_sessions: list) -> list[bytes]:
    """Unwrap the rows of a load (SELECT_LIVE_KEYS, SELECT_SESSIONS), each
    against its own identity, in one bulk call (an HSM unwraps ~6k keys/s one
    by one, far more in bulk).  A row that fails (moved, copied, corrupted)
    is counted in ``store.unwrap_failures``, logged by its identity only, and
    fails the load with a VaultError naming it."""
    identities = [key_identity(m, kt, v) for m, kt, v, *_r in raw_keys] + [
        session_identity(m, serial) for m, serial, *_r in raw_sessions
    ]
    blobs = [bytes(r[4]) for r in raw_keys] + [bytes(r[2]) for r in raw_sessions]
    return _counted(store, lambda: store.vault.unwrap_many(blobs, identities))


def unwrap_one(store: Any, wrapped: bytes, identity: bytes) -> bytes:
    return _counted(store, lambda: store.vault.unwrap(wrapped, identity))


def _counted(store: Any, unwrap: Any) -> Any:
    """Run ``unwrap()``; a failure is counted and logged by identity only, then raised."""
    try:
        return unwrap()
    except VaultError as exc:
        store.unwrap_failures += 1
        log.error("store_key_unwrap_failed", store=repr(store), reason=getattr(exc, "reason", "vault_error"),
                  error=str(exc))
        raise
