"""The SQL both head-end store backends run, written once.

Statements are written with SQLite's ``?`` placeholders; :func:`numbered`
gives PostgreSQL's ``$1, $2...`` form (asyncpg).  Everything here is plain
SQL that SQLite (>= 3.24: ``ON CONFLICT ... DO UPDATE``, >= 3.23: ``FALSE``)
and PostgreSQL read alike.  What stays per backend: the schemas (``BLOB``
vs ``BYTEA``, ``WITHOUT ROWID``, ``CHECK``s), SQLite's transaction
statements, PostgreSQL's advisory locks and COPY path.

Imported by :mod:`headend.store` and :mod:`headend.pgstore`; imports
nothing of either.
"""

from __future__ import annotations

import re

__all__ = [
    "ACTIVE_KEY",
    "ACTIVE_VERSION",
    "DELETE_SESSION",
    "INSERT_FACTORY_KEY",
    "INSERT_METER",
    "INSERT_READING",
    "KNOWN_METERS",
    "READING_COLUMNS",
    "SELECT_LIVE_KEYS",
    "SELECT_METERS",
    "SELECT_SESSIONS",
    "UPDATE_KEY",
    "UPDATE_METER",
    "UPDATE_SESSION",
    "UPSERT_KEY",
    "UPSERT_SESSION",
    "numbered",
]


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

# -- queries ------------------------------------------------------------------------

ACTIVE_VERSION = "SELECT max(version) FROM keys WHERE meter = ? AND key_type = ? AND state = 'active'"
# The newest active version: the one ACTIVE_VERSION names.
ACTIVE_KEY = (
    "SELECT wrapped FROM keys WHERE meter = ? AND key_type = ? AND state = 'active' ORDER BY version DESC LIMIT 1"
)
