"""The handheld's own key material and counters: ``ami keys handheld`` loads it, ``ami tsp`` uses it.

A utility's handheld (TSP) is loaded, on the central system, with the keys of
the meters on its round, and only those: CC_LOCALE and AK of each meter.  It
never holds the head-end's KEK nor its store, so a lost or stolen handheld
gives away its round's local keys, not every key of the network.

The handheld folder (default ``DATA/tsp/``, 0700; every file 0600):

* ``handheld.kek``: the handheld's OWN key-encryption key, 32 random bytes
  (``secrets``), created on the first load.  Not the head-end's KEK.
* ``keys.json``: per meter, CC_LOCALE and AK each sealed with AES-256-GCM
  under ``handheld.kek`` (random 96-bit nonce), the associated data being
  (meter, key type, version, IC range): a blob moved to another meter, key
  type, version or range fails to open.
* ``counters.json``: the handheld's send-counter marks, one per (meter,
  CC_LOCALE version), and ``.lock``, the file every read-modify-write of the
  folder holds an exclusive ``flock`` on (two overlapping ``ami tsp`` runs
  never lose a mark).  A mark is written, fsynced and its folder fsynced
  before any counter value below it is used.

IC ranges: every handheld talks to the meter under one system title
(``network.tsp_title``), so two handhelds loaded with one meter's CC_LOCALE
must never count over the same values.  Each load takes a fresh range of
``RANGE`` invocation counters per (meter, CC_LOCALE version) from the central
ledger ``DATA/handheld-ranges.json`` (under its own flock, fsynced before the
handheld file is written); the handheld counts only inside its range and
asks to be reloaded once it runs out.

The load (:func:`load_handheld`) runs on the central system and is the only
part that opens the head-end's store and KEK, through their public APIs
(``headend.store_api.open_store``, ``ami.security.vault.open_vault``),
imported inside the function: ``ami tsp`` imports this module and never
loads either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ami.protocol.counters import IC_LIMIT, SendCounter
from ami.protocol.keys import KeyType, SecretBytes
from ami.runtime.network import load_network
from ami.security.files import SecretFileError, create_secret_file, private_dir, read_secret_file, write_private

HANDHELD_DIR = "tsp"
KEK_FILE = "handheld.kek"
KEYS_FILE = "keys.json"
COUNTERS_FILE = "counters.json"
LOCK_FILE = ".lock"
LEDGER_FILE = "handheld-ranges.json"
LEDGER_LOCK = "handheld-ranges.lock"
KEK_LEN = 32
NONCE_LEN = 12
#: Invocation counters given to a handheld per load, per (meter, CC_LOCALE version).
RANGE = 1 << 20
FORMAT = 1


class HandheldError(Exception):
    """A handheld problem.  Messages name meters and files, never key bytes."""

    reason = "handheld_error"


class NotLoaded(HandheldError):
    reason = "meter_not_loaded"


@dataclass(frozen=True, slots=True)
class LocalKeys:
    """What a handheld holds for one meter (keys are SecretBytes: no repr of the bytes)."""

    meter: str
    cc_locale_version: int
    cc_locale: SecretBytes
    ak_version: int
    ak: SecretBytes
    ic_start: int
    ic_end: int

    def __repr__(self) -> str:
        return (f"<LocalKeys {self.meter} cc_locale v{self.cc_locale_version} ak v{self.ak_version} "
                f"ic [{self.ic_start}, {self.ic_end})>")


def handheld_dir(data_dir: Path, folder: Path | None = None) -> Path:
    return Path(folder) if folder is not None else Path(data_dir) / HANDHELD_DIR


# --- files --------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created 0600) for the block: blocks until it is ours."""
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        return {}


# --- the handheld's KEK ---------------------------------------------------------------


def _read_kek(path: Path) -> bytes:
    try:
        return read_secret_file(path, KEK_LEN, "handheld KEK")
    except SecretFileError as exc:
        raise HandheldError(str(exc)) from None


def handheld_kek(folder: Path, *, create: bool) -> bytes:
    """The handheld's own KEK (created with ``secrets`` on the first load, never by ``ami tsp``)."""
    path = folder / KEK_FILE
    try:
        return _read_kek(path)
    except FileNotFoundError:
        if not create:
            raise NotLoaded(f"no handheld key material in {folder}: load it with `ami keys handheld`") from None
    private_dir(folder)
    create_secret_file(path, KEK_LEN)  # never overwrites a KEK that keys.json depends on
    return _read_kek(path)


def _aad(meter: str, key_type: KeyType, version: int, ic_start: int, ic_end: int) -> bytes:
    return json.dumps(["ami-handheld", FORMAT, meter, key_type.value, version, ic_start, ic_end],
                      separators=(",", ":")).encode()


def _seal(aead: AESGCM, key: bytes, aad: bytes) -> dict[str, str]:
    nonce = secrets.token_bytes(NONCE_LEN)
    return {"nonce": nonce.hex(), "sealed": aead.encrypt(nonce, bytes(key), aad).hex()}


def _open(aead: AESGCM, blob: dict, aad: bytes, meter: str) -> SecretBytes:
    try:
        return SecretBytes(aead.decrypt(bytes.fromhex(blob["nonce"]), bytes.fromhex(blob["sealed"]), aad))
    except (InvalidTag, KeyError, ValueError, TypeError):
        raise HandheldError(f"the handheld keys of {meter} do not open under this handheld's KEK "
                            "(altered, moved, or loaded for another handheld)") from None


# --- the handheld side: read keys, reserve counters -------------------------------------


def read_local_keys(folder: Path, meter: str) -> LocalKeys:
    """CC_LOCALE and AK of ``meter`` from the handheld folder (NotLoaded if it is not on the round)."""
    folder = Path(folder)
    entry = _read_json(folder / KEYS_FILE).get("meters", {}).get(meter)
    if entry is None:
        raise NotLoaded(f"meter {meter} is not loaded on this handheld: load it with `ami keys handheld`")
    aead = AESGCM(handheld_kek(folder, create=False))
    try:
        start, end = (int(x) for x in entry["ic"])
        loc, ak = entry["cc_locale"], entry["ak"]
        loc_v, ak_v = int(loc["version"]), int(ak["version"])
    except (KeyError, ValueError, TypeError):
        raise HandheldError(f"the handheld entry of {meter} is malformed") from None
    return LocalKeys(
        meter=meter,
        cc_locale_version=loc_v,
        cc_locale=_open(aead, loc, _aad(meter, KeyType.CC_LOCALE, loc_v, start, end), meter),
        ak_version=ak_v,
        ak=_open(aead, ak, _aad(meter, KeyType.AK, ak_v, start, end), meter),
        ic_start=start,
        ic_end=end,
    )


def counter_name(meter: str, version: int) -> str:
    return f"{meter}/cc_locale/{version}"


def reserve(folder: Path, name: str, count: int, *, floor: int = 0, ceiling: int = IC_LIMIT) -> SendCounter:
    """A SendCounter with ``count`` values reserved durably for this run only.

    Under the folder's exclusive lock: re-read ``counters.json`` (never a copy
    read earlier), move the mark to ``max(mark, floor) + count``, write and
    fsync it, then release.  Two overlapping runs get disjoint values."""
    folder = Path(folder)
    with locked(folder / LOCK_FILE):
        marks = _read_json(folder / COUNTERS_FILE)
        start = max(int(marks.get(name, 0)), floor)
        mark = start + count
        if mark > ceiling:
            raise HandheldError(f"the handheld's counter range for {name.split('/')[0]} is used up: "
                                "reload it with `ami keys handheld`")
        marks[name] = mark
        write_private(folder / COUNTERS_FILE, json.dumps(marks, sort_keys=True).encode())
    counter = SendCounter(start)
    counter.confirm_reservation(mark)  # durable: the values below it are ours alone
    return counter


# --- the central side: load a handheld ---------------------------------------------------------


def allocate_ranges(data_dir: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """Fresh IC ranges, one per counter name, from the central ledger (durable before returned)."""
    data_dir = Path(data_dir)
    with locked(data_dir / LEDGER_LOCK):
        ledger = _read_json(data_dir / LEDGER_FILE)
        # Marks of a handheld loaded before ranges existed (from the head-end's keys).
        legacy = _read_json(data_dir / HANDHELD_DIR / COUNTERS_FILE)
        out = {}
        for name in names:
            start = max(int(ledger.get(name, 0)), int(legacy.get(name, 0)))
            end = start + RANGE
            if end > IC_LIMIT:
                raise HandheldError(f"no handheld counter range left for {name.split('/')[0]}: renew its CC_LOCALE")
            ledger[name] = end
            out[name] = (start, end)
        write_private(data_dir / LEDGER_FILE, json.dumps(ledger, sort_keys=True).encode())
    return out


async def load_handheld(data_dir: Path, config: dict, meters: list[str], folder: Path | None = None) -> list[str]:
    """Export CC_LOCALE and AK of ``meters`` into the handheld folder, sealed under its own KEK.

    Runs on the central system: it opens the head-end's store and KEK."""
    from ami.security.vault import open_vault
    from headend.store_api import open_store

    data_dir = Path(data_dir)
    folder = handheld_dir(data_dir, folder)
    known = set(load_network(data_dir).titles)
    unknown = [m for m in meters if m not in known]
    if unknown:
        raise HandheldError(f"unknown meters: {', '.join(unknown[:5])}")
    hcfg = config.get("headend", {})
    vault = open_vault(hcfg.get("vault", "file:headend.kek"), data_dir=data_dir)
    try:
        store = open_store(hcfg.get("store", "sqlite:headend.db"), vault, data_dir)
        await store.open()
        try:
            found = []
            for meter in meters:
                loc_v = await store.active_version(meter, KeyType.CC_LOCALE)
                ak_v = await store.active_version(meter, KeyType.AK)
                found.append((meter, loc_v, await store.active_key(meter, KeyType.CC_LOCALE),
                              ak_v, await store.active_key(meter, KeyType.AK)))
        finally:
            await store.close()
    finally:
        vault.close()
    ranges = allocate_ranges(data_dir, [counter_name(m, v) for m, v, *_ in found])
    aead = AESGCM(handheld_kek(folder, create=True))
    with locked(folder / LOCK_FILE):
        doc = _read_json(folder / KEYS_FILE) or {"format": FORMAT, "meters": {}}
        for meter, loc_v, loc, ak_v, ak in found:
            start, end = ranges[counter_name(meter, loc_v)]
            doc["meters"][meter] = {
                "ic": [start, end],
                "cc_locale": {"version": loc_v, **_seal(aead, loc, _aad(meter, KeyType.CC_LOCALE, loc_v, start, end))},
                "ak": {"version": ak_v, **_seal(aead, ak, _aad(meter, KeyType.AK, ak_v, start, end))},
            }
        write_private(folder / KEYS_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    return [m for m, *_ in found]


# --- ``ami keys handheld`` ---------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--meter", action="append", help="meter id on the round (repeatable)")
    target.add_argument("--segment", action="append", help="every meter of this concentrator (repeatable)")
    target.add_argument("--all", action="store_true", help="every meter (a handheld for the whole network)")
    parser.add_argument("--handheld", type=Path, help="handheld folder (default DATA/tsp)")


def load_main(args: argparse.Namespace, config: dict) -> int:
    network = load_network(args.data)
    if args.all:
        meters = sorted(network.titles)
    elif args.segment:
        unknown = [c for c in args.segment if c not in network.segments]
        if unknown:
            print(json.dumps({"error": f"unknown segments: {', '.join(unknown[:5])}"}))
            return 1
        meters = [m for c in args.segment for m in network.segments[c]]
    else:
        meters = list(dict.fromkeys(args.meter))
    try:
        loaded = asyncio.run(load_handheld(args.data, config, meters, args.handheld))
    except (HandheldError, KeyError) as exc:
        reason = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(json.dumps({"error": reason}))
        return 1
    print(json.dumps({"loaded": len(loaded), "handheld": str(handheld_dir(args.data, args.handheld))}))
    return 0


__all__ = [
    "HandheldError",
    "LocalKeys",
    "NotLoaded",
    "allocate_ranges",
    "counter_name",
    "handheld_dir",
    "load_handheld",
    "read_local_keys",
    "reserve",
]
