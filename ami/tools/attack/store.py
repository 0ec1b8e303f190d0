"""The stolen head-end database, without the KEK.

The copy is read through the head-end's public store-file reader
(:func:`headend.store.read_store_file`, plain sqlite3, no vault): topology,
titles and readings in clear, keys only wrapped.  What that gives: nothing
usable (the wrapped blobs tried as keys, the dump searched for the KEK),
unless a file lying beside the database (the KEK file, the factory key
file) gives it.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from ami.protocol.keys import KeyType
from ami.runtime.network import FACTORY_FILE
from ami.tools.attack.traffic import Frame, KeyRing, decrypt_traffic, keystream_probe
from headend.store import StoreContents, read_store_file

#: What a copy of the head-end database holds (the head-end's own reader, no vault).
Dump = StoreContents


def steal(db_path: Path, dest: Path) -> Path:
    """Copy the database as a thief would (main file, WAL and shared memory)."""
    db_path = Path(db_path)
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(db_path) + suffix)
        if src.exists():
            shutil.copyfile(src, dest / (db_path.name + suffix))
    return dest / db_path.name


def read_dump(copy: Path) -> Dump:
    """Read the stolen copy (plain sqlite3: the database alone needs no KEK)."""
    return read_store_file(copy)


def kek_search(data: bytes, blob: bytes) -> dict[str, int]:
    """Try every 16-byte window of ``data`` as the KEK of ``blob``."""
    windows = {data[i : i + 16] for i in range(max(0, len(data) - 15))}
    hits = 0
    for w in windows:
        try:
            aes_key_unwrap(w, blob)
            hits += 1
        except InvalidUnwrap:
            pass
    return {"bytes_searched": len(data), "distinct_windows_tried": len(windows), "hits": hits}


def without_kek(dump: Dump, frames: list[Frame]) -> dict[str, Any]:
    """Everything a copy of the database gives on its own."""
    states = Counter((k.key_type, k.state) for k in dump.keys)
    blobs = dump.wrapped_blobs
    # Every wrapped blob, used raw (both 16-byte halves), as every kind of key.
    ring = KeyRing()
    cands: dict[str, list[bytes]] = defaultdict(list)
    for row in (*dump.keys, *dump.sessions):
        for half in (row.wrapped[:16], row.wrapped[-16:]):
            cands[row.meter].append(half)
    for meter, halves in cands.items():
        for h in halves:
            for kt in (KeyType.CC_LAN, KeyType.AK, KeyType.CCC):
                ring.add_global(meter, kt, h, "blob")
            ring.add_session(meter, h, "blob")
    traffic = decrypt_traffic(frames, ring)
    probe = keystream_probe(frames, cands)
    search = kek_search(dump.raw, blobs[0]) if blobs else {"hits": 0}
    return {
        "meters": len(dump.meters),
        "system_titles": len({m.system_title for m in dump.meters}),
        "concentrators": len({m.concentrator for m in dump.meters}),
        "topology_in_clear": True,
        "key_rows": len(dump.keys),
        "key_rows_by_type_state": {f"{kt}/{st}": n for (kt, st), n in sorted(states.items())},
        "expired_key_rows": sum(1 for k in dump.keys if k.state == "expired"),
        "session_rows": len(dump.sessions),
        "wrapped_blobs": len(blobs),
        "readings_in_clear": dump.reading_count,
        "sample_readings_in_clear": [
            [r.meter, r.seq, r.ts, r.energy_wh, r.power_w, r.voltage_dv] for r in dump.sample_readings
        ],
        "kek_in_dump": search,
        "blobs_as_keys": {
            "candidate_keys": sum(len(v) for v in cands.values()),
            "tag_verified_frames": len(traffic.opened),
            "keystream_attempts": probe["attempts"],
            "keystream_decodable": probe["decodable"],
        },
        "keys_usable": len(blobs) if search["hits"] else 0,
        "frames_decrypted": len(traffic.opened) + probe["decodable"],
    }


def host_files(host_dir: Path, dump: Dump, frames: list[Frame], skip: Iterable[Path] = ()) -> dict[str, Any]:
    """What else sits on the head-end host: a KEK file is found by trying every
    16-byte window of every file as the KEK; the factory key file (clear hex)
    is replayed against the capture with no KEK at all."""
    skip = {Path(p).resolve() for p in skip}
    blobs = dump.wrapped_blobs
    blob = blobs[0] if blobs else None
    found: list[str] = []
    scanned = 0
    for path in sorted(Path(host_dir).rglob("*")):
        if not path.is_file() or path.resolve() in skip or path.stat().st_size > 4 << 20:
            continue
        if path.name.startswith(dump.path.name):
            continue
        scanned += 1
        if blob is not None and kek_search(path.read_bytes(), blob)["hits"]:
            found.append(str(path.relative_to(host_dir)))
    out: dict[str, Any] = {"files_scanned": scanned, "kek_found_in": found}
    factory = Path(host_dir) / FACTORY_FILE
    if factory.exists():
        ring = KeyRing()
        for line in factory.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for kt in (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE):
                ring.add_global(rec["meter"], kt, bytes.fromhex(rec[kt.value]), "factory")
        traffic = decrypt_traffic(frames, ring)
        out["factory_file"] = {"path": FACTORY_FILE, "meters": len(ring.glob), "traffic": traffic.summary()}
    return out
