"""The head-end store interface, and :func:`open_store`, which picks a backend.

Two backends implement :class:`Store`: :class:`headend.store.SqliteStore`
(default) and :class:`headend.pgstore.PostgresStore`.  Neither imports the
other; this module imports both (PostgreSQL lazily: asyncpg is loaded only
for a ``postgresql://`` store).  tests/test_store.py checks that both
classes have exactly these methods, with these signatures.

Contract, both backends:

* every key is wrapped with the vault before it is written and unwrapped
  (one ``unwrap_many``) by :meth:`Store.load`: the database only ever holds
  wrapped keys, each bound to its row (``key_identity(meter, key_type,
  version)``, ``session_identity(meter, serial)``): a blob moved to another
  row fails the load with a VaultError naming that row;
* one writer: ``open(writer=True)`` takes the writer lease or raises
  :class:`StoreLocked`; every write transaction (commit, import) checks the
  lease epoch first and raises :class:`Fenced`, rolled back, once another
  writer took over (an empty commit checks it too, without writing).  The
  caller publishes nothing it drained with a commit that raised.  A store
  opened without ``writer`` only reads (``ami tsp``, reports): its writes
  raise :class:`Fenced`.  ``store.epoch`` is the lease epoch (0 for a
  reader), one more at each writer start or take-over;
* one :class:`~ami.machines.headend_records.Commit` is one transaction;
  readings are stored once per ``(meter, seq)`` (the first copy wins); rows
  apply in list order;
* :meth:`Store.query` takes the backend's own SQL dialect (``?`` for
  SQLite, ``$1`` for PostgreSQL) and returns a list of tuples;
* :meth:`Store.active_key` / :meth:`Store.active_version` name the newest
  ACTIVE version of a key, and raise ``KeyError`` when there is none.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ami.machines.headend_records import Commit, Snapshot
from ami.protocol.keys import KeyType, SecretBytes
from ami.security.vault import KeyVault
from headend.store import SqliteStore
from headend.store_sql import Fenced, StoreError, StoreLocked

__all__ = ["Fenced", "Store", "StoreError", "StoreLocked", "open_store"]


@runtime_checkable
class Store(Protocol):
    """What the head-end service and the tools use of a store."""

    epoch: int

    async def open(self, *, writer: bool = False) -> None:
        """Connect, create the schema if needed; ``writer``: take the writer
        lease (StoreLocked if another head-end holds it), re-wrap an old
        store's unbound keys."""

    async def close(self) -> None:
        """Release the connection(s); the store may not be used afterwards."""

    async def import_factory(self, records: Iterable[dict[str, str]], now: float) -> int:
        """Import the factory keys of meters not yet known; return how many meters."""

    async def load(self) -> Snapshot:
        """Meters, live (not expired) keys and sessions, keys unwrapped: the engine's cold start."""

    async def commit(self, batch: Commit) -> None:
        """Apply one batch in one transaction, fenced (Fenced: nothing written); an empty batch only checks the lease."""

    async def query(self, sql: str, params: tuple = ()) -> list[tuple[Any, ...]]:
        """Run SQL in the backend's dialect; rows as tuples (tests, reports)."""

    async def active_version(self, meter: str, key_type: KeyType) -> int:
        """The newest ACTIVE version of ``meter``'s ``key_type`` (KeyError if none)."""

    async def active_key(self, meter: str, key_type: KeyType) -> SecretBytes:
        """That version's key, unwrapped (KeyError if none): ``ami tsp`` fetches CC_LOCALE and AK so."""


def open_store(spec: str, vault: KeyVault, data_dir: Path) -> Store:
    """``sqlite:PATH`` (relative to the data folder) or ``postgresql://...``; not opened yet."""
    if spec.startswith("sqlite:"):
        path = Path(spec[len("sqlite:") :])
        return SqliteStore(path if path.is_absolute() else Path(data_dir) / path, vault)
    if spec.startswith(("postgresql://", "postgres://")):
        from headend.pgstore import PostgresStore

        return PostgresStore(spec, vault)
    raise ValueError(f"unknown store {spec.split(':', 1)[0]!r}: use sqlite:PATH or postgresql://")
