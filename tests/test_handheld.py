"""The handheld's own key material and counters (ami/tools/handheld.py), and files at rest.

* counters: concurrent reservers (processes and threads) on one handheld
  folder never get overlapping invocation-counter ranges and never lose a
  mark (the read-modify-write runs under an exclusive flock);
* key material: ``ami keys handheld`` seals only the loaded meters'
  CC_LOCALE and AK under the handheld's own KEK (not the head-end's), bound to
  (meter, key type, version, IC range); a moved or altered entry fails, a
  meter not loaded is refused; two loads (two handhelds) get disjoint ranges;
* ``ami tsp`` never imports the head-end (its store or KEK);
* ``ami provision`` leaves a 0700 folder and 0600 files.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ami.protocol.counters import IC_LIMIT
from ami.runtime.network import FACTORY_FILE, NETWORK_FILE, iter_factory_keys
from ami.tools import handheld
from ami.tools.handheld import HandheldError, NotLoaded, load_handheld, read_local_keys, reserve
from ami.tools.provision import provision
from harness import REPO

NAME = "m000001/cc_locale/1"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- counters under a lock -------------------------------------------------------------------


def _reserver(folder: str, rounds: int, out) -> None:  # runs in a child process
    got = []
    for _ in range(rounds):
        counter = reserve(Path(folder), NAME, 3)
        got.append((counter.next_value, counter.reserved_until))
    out.put(got)


def _disjoint(ranges: list[tuple[int, int]]) -> bool:
    ranges = sorted(ranges)
    return all(a_end <= b_start for (_a, a_end), (b_start, _b) in zip(ranges, ranges[1:]))


def test_concurrent_processes_never_share_a_counter_value_nor_lose_a_mark(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reserver, args=(str(tmp_path), 25, out)) for _ in range(4)]
    for p in procs:
        p.start()
    ranges = [r for _ in procs for r in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(ranges) == 100 and all(end - start == 3 for start, end in ranges)
    assert _disjoint(ranges)
    # No mark lost: the file holds the sum of every reservation.
    assert json.loads((tmp_path / "counters.json").read_text())[NAME] == 300
    assert _mode(tmp_path) == 0o700
    assert {_mode(p) for p in tmp_path.iterdir()} == {0o600}


def test_concurrent_threads_and_floors(tmp_path: Path) -> None:
    ranges: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            c = reserve(tmp_path, NAME, 1, floor=1000, ceiling=IC_LIMIT)
            with lock:
                ranges.append((c.next_value, c.reserved_until))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _disjoint(ranges) and min(s for s, _ in ranges) == 1000
    assert json.loads((tmp_path / "counters.json").read_text())[NAME] == 1120
    with pytest.raises(HandheldError, match="used up"):
        reserve(tmp_path, NAME, 1, floor=0, ceiling=1120)
    c = reserve(tmp_path, NAME, 1, floor=5000, ceiling=6000)  # a new range from a reload
    assert c.take() == 5000


def test_a_held_lock_blocks_a_second_reserver(tmp_path: Path) -> None:
    """The lock is what serialises: while held, a reserver waits (it never reads a stale mark)."""
    done: list[int] = []
    with handheld.locked(tmp_path / handheld.LOCK_FILE):
        t = threading.Thread(target=lambda: done.append(reserve(tmp_path, NAME, 1).next_value))
        t.start()
        time.sleep(0.3)
        assert done == []
        (tmp_path / "counters.json").write_text(json.dumps({NAME: 41}))  # a mark written meanwhile
    t.join(5)
    assert done == [41]


# --- key material --------------------------------------------------------------------------


@pytest.fixture
def central(tmp_path: Path) -> Path:
    """A provisioned folder whose head-end store holds the factory keys (as after a head-end start)."""
    from ami.security.vault import open_vault
    from headend.store_api import open_store

    data = tmp_path / "data"
    provision(data, meters=4, concentrators=2, bus_security=False)

    async def imported() -> None:
        vault = open_vault("file:headend.kek", data_dir=data)
        store = open_store("sqlite:headend.db", vault, data)
        await store.open(writer=True)  # as the head-end does at start
        await store.import_factory(iter_factory_keys(data), time.time())
        await store.close()
        vault.close()

    asyncio.run(imported())
    return data


def test_load_seals_only_the_round_under_the_handhelds_own_kek(central: Path) -> None:
    factory = {r["meter"]: r for r in iter_factory_keys(central)}
    assert asyncio.run(load_handheld(central, {}, ["m000001", "m000003"])) == ["m000001", "m000003"]
    folder = central / "tsp"
    assert _mode(folder) == 0o700 and {_mode(p) for p in folder.iterdir()} == {0o600}
    kek = (folder / "handheld.kek").read_bytes()
    assert len(kek) == 32 and kek != (central / "headend.kek").read_bytes()[:32]
    text = (folder / "keys.json").read_text()
    for m in factory.values():  # no key in clear in the handheld file
        for k in ("ak", "cc_lan", "cc_locale", "ccc"):
            assert m[k] not in text
    doc = json.loads(text)
    assert sorted(doc["meters"]) == ["m000001", "m000003"]
    keys = read_local_keys(folder, "m000003")
    assert keys.cc_locale.hex() == factory["m000003"]["cc_locale"] and keys.ak.hex() == factory["m000003"]["ak"]
    assert keys.cc_locale_version == keys.ak_version == 1 and keys.ic_end - keys.ic_start == handheld.RANGE
    assert factory["m000003"]["cc_locale"] not in repr(keys)
    with pytest.raises(NotLoaded, match="m000002 is not loaded"):
        read_local_keys(folder, "m000002")

    # An entry moved to another meter, or a widened range, does not open.
    doc["meters"]["m000003"] = doc["meters"]["m000001"]
    (folder / "keys.json").write_text(json.dumps(doc))
    with pytest.raises(HandheldError, match="do not open"):
        read_local_keys(folder, "m000003")
    doc["meters"]["m000001"]["ic"] = [0, IC_LIMIT]
    (folder / "keys.json").write_text(json.dumps(doc))
    with pytest.raises(HandheldError, match="do not open"):
        read_local_keys(folder, "m000001")


def test_two_handhelds_get_disjoint_counter_ranges(central: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "handheld-a", tmp_path / "handheld-b"
    asyncio.run(load_handheld(central, {}, ["m000002"], a))
    asyncio.run(load_handheld(central, {}, ["m000002"], b))
    ka, kb = read_local_keys(a, "m000002"), read_local_keys(b, "m000002")
    assert ka.cc_locale == kb.cc_locale  # the same meter key...
    assert ka.ic_end <= kb.ic_start  # ...never under the same counters
    assert (a / "handheld.kek").read_bytes() != (b / "handheld.kek").read_bytes()
    with pytest.raises(HandheldError, match="do not open"):  # a's file is useless under b's KEK
        (b / "keys.json").write_bytes((a / "keys.json").read_bytes())
        read_local_keys(b, "m000002")
    # A reload of the same handheld moves it to a fresh range above its marks.
    c = reserve(a, "m000002/cc_locale/1", 1, floor=ka.ic_start, ceiling=ka.ic_end)
    asyncio.run(load_handheld(central, {}, ["m000002"], a))
    again = read_local_keys(a, "m000002")
    assert again.ic_start >= kb.ic_end > c.reserved_until


def test_load_refuses_unknown_meters(central: Path) -> None:
    with pytest.raises(HandheldError, match="unknown meters"):
        asyncio.run(load_handheld(central, {}, ["m999999"]))


def test_tsp_never_imports_the_headend() -> None:
    code = ("import sys, ami.tools.tsp; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'headend' "
            "or m.startswith('ami.security.vault')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- provision at rest -------------------------------------------------------------------------


def test_provision_output_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    provision(data, meters=3, concentrators=1, bus_security=False)
    assert _mode(data) == 0o700
    assert _mode(data / NETWORK_FILE) == 0o600 and _mode(data / FACTORY_FILE) == 0o600
    # Every file of the data folder itself (bus/ has its own test) is private.
    assert {p.name: _mode(p) for p in data.iterdir() if p.is_file()} == {
        p.name: 0o600 for p in data.iterdir() if p.is_file()}
