"""The head-end's hot path (issue 10): what was made cheaper still does the same.

* the service records latencies with ``record_many``, hdrh's bucket
  arithmetic inline: the same histogram as ``record_value``;
* the service lets rows gather over rounds (``commit_max_delay_ms``) only
  while nothing waits to be published, and commits before it publishes;
* the SQLite store leaves a meter's ``high_seq`` to the reading that carries
  it when its gaps did not change, and gives it back on load, after a clean
  stop and after a crash alike;
* the engine's inline path for readings stores exactly what the general path
  stores (the whole engine suite runs through it; here: the cases it hands on).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from hdrh.histogram import HdrHistogram

from ami.machines.headend import Effects
from ami.machines.headend_records import Commit, MeterRow
from ami.protocol import topics
from ami.protocol.keys import KeyType
from ami.protocol.messages import Reading
from ami.security.vault import FileKeyVault
from headend.service import LATENCY_MAX_US, HeadEndService, record_many
from headend.store import SqliteStore, read_store_file
from harness import RecordingClient
from sim import INTERVAL, Drop, Sim, default_policy

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0


# --------------------------------------------------------------------------
# latency histograms


def test_record_many_fills_the_histogram_as_record_value_does() -> None:
    rng = random.Random(5)
    values = [1, 2, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 65_535, LATENCY_MAX_US - 1, LATENCY_MAX_US]
    values += [rng.randint(1, LATENCY_MAX_US) for _ in range(3000)] + [rng.randint(1, 200_000) for _ in range(3000)]
    slow, fast = HdrHistogram(1, LATENCY_MAX_US, 3), HdrHistogram(1, LATENCY_MAX_US, 3)
    for v in values:
        slow.record_value(v)
    record_many(fast, values[:100])
    record_many(fast, values[100:])
    assert list(fast.counts) == list(slow.counts)
    assert (fast.total_count, fast.min_value, fast.max_value) == (slow.total_count, slow.min_value, slow.max_value)
    for p in (50, 90, 99, 99.9, 100):
        assert fast.get_value_at_percentile(p) == slow.get_value_at_percentile(p)
    assert fast.encode() == slow.encode()  # what the load test merges


# --------------------------------------------------------------------------
# the service: rows gather while nothing is to be published


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hot") / "data"
    subprocess.run([sys.executable, "-m", "ami.cli", "provision", "--meters", "3", "--concentrators", "1",
                    "--out", str(out), "--no-bus-security"], check=True, cwd=REPO, capture_output=True)
    return out


class _Engine:
    """Drains one reading (and its latency) per round; publishes only when told."""

    counters: dict = {}

    def __init__(self) -> None:
        self.publish_pending = False
        self.seq = 0
        self.drained: list[int] = []
        self.rounds_since_drain = 0

    @property
    def readings_pending(self) -> int:
        return self.rounds_since_drain

    @property
    def latencies_pending(self) -> int:
        return self.rounds_since_drain

    def tick(self, now: float) -> None:
        self.seq += 1
        self.rounds_since_drain += 1

    def drain(self) -> Effects:
        n, self.rounds_since_drain = self.rounds_since_drain, 0
        first = self.seq - n + 1
        self.drained.append(n)
        readings = [("m000001", s, 1, 1, 1, 1, 1.0) for s in range(first, self.seq + 1)]
        downlink = {"c0001": [("m000001", b"frame")]} if self.publish_pending else {}
        self.publish_pending = False
        return Effects(Commit(readings=readings), downlink, [], [], [5_000_000] * n)  # 5 ms at handling


def test_rows_gather_until_the_delay_and_anything_to_publish_commits_first(data_dir: Path) -> None:
    async def body() -> None:
        service = HeadEndService({"headend": {"commit_max_delay_ms": 100, "commit_interval_ms": 0}},
                                 "mqtt://127.0.0.1:1", data_dir)
        await service.start_engine()
        try:
            engine = service.engine = _Engine()
            client = RecordingClient()
            t = time.time() - 1.0  # round times in the past: each commit ends after its rounds

            async def stored() -> int:
                return (await service.store.query("SELECT count(*) FROM readings"))[0][0]

            await service._round(client, t)  # the first round commits
            assert engine.drained == [1] and await stored() == 1
            await service._round(client, t + 0.03)  # rows only, 30 ms after the commit: they wait
            await service._round(client, t + 0.06)
            assert engine.drained == [1] and await stored() == 1
            await service._round(client, t + 0.11)  # the delay has passed: one commit for three rounds
            assert engine.drained == [1, 3] and await stored() == 4
            assert client.published == []
            # A frame to publish: this round commits at once, and publishes after.
            await service._round(client, t + 0.12)
            engine.publish_pending = True
            await service._round(client, t + 0.13)
            assert engine.drained == [1, 3, 2] and await stored() == 6
            assert [topic for topic, _ in client.published] == [topics.wan_down("c0001")]
            # Stopping flushes whatever waits.
            await service._round(client, t + 0.14, flush=True)
            assert engine.drained == [1, 3, 2, 1] and await stored() == 7
            # Latency runs to the end of the commit: never less than at handling.
            hist = service.latency_total
            assert hist.get_total_count() == 7 and service.latency_interval.get_total_count() == 7
            assert hist.get_min_value() >= 5_000
        finally:
            await service.store.close()
            service.vault.close()

    asyncio.run(body())


def test_rows_held_back_commit_when_due_even_if_no_more_traffic_comes(data_dir: Path) -> None:
    """Idle after a held round: the loop wakes when the hold is due, not only
    at the next timer tick (200 ms here), so held rows never wait longer."""
    async def body() -> None:
        service = HeadEndService({"headend": {"commit_max_delay_ms": 50, "commit_interval_ms": 200,
                                              "round_min_interval_ms": 0}}, "mqtt://127.0.0.1:1", data_dir)
        await service.start_engine()
        try:
            engine = service.engine = _Engine()
            client = RecordingClient()
            stop = asyncio.Event()
            loop_task = asyncio.create_task(service._loop(client, stop))
            await asyncio.sleep(0.05)
            service._wakeup.set()  # a round that commits (the first)
            while not engine.drained:
                await asyncio.sleep(0.001)
            start = len(engine.drained)
            service._wakeup.set()  # rows only, the last commit recent: held back
            while not service._held_rounds:
                await asyncio.sleep(0.001)
            assert len(engine.drained) == start
            t0 = time.monotonic()
            while len(engine.drained) == start and time.monotonic() - t0 < 1.0:
                await asyncio.sleep(0.005)
            waited = time.monotonic() - t0
            stop.set()
            await asyncio.wait_for(loop_task, 5)
            assert len(engine.drained) > start, "held rows never committed"
            assert waited < 0.15, f"held rows waited {waited * 1000:.0f} ms for their commit (delay 50 ms)"
        finally:
            await service.store.close()
            service.vault.close()

    asyncio.run(body())


def test_a_round_stops_at_round_max_frames_whatever_the_batch_size(data_dir: Path) -> None:
    """Relay batches carry 1 to 200 frames: a round is bounded in frames too
    (round_max_frames), not only in messages, so it never runs for seconds."""
    from ami.runtime import mqtt

    class _Batches(_Engine):
        def __init__(self) -> None:
            super().__init__()
            self.counters = {"frames_up": 0}
            self.batches = 0

        def handle_batch(self, payload: bytes, now: float, concentrator: str | None = None) -> None:
            self.batches += 1
            self.counters["frames_up"] += 50  # a batch of 50 readings

    async def body() -> None:
        service = HeadEndService({"headend": {"round_max_frames": 500, "round_max_messages": 2000}},
                                 "mqtt://127.0.0.1:1", data_dir)
        await service.start_engine()
        try:
            engine = service.engine = _Batches()
            for _ in range(100):
                service._enqueue(mqtt.Message(topics.wan_up("c0001"), b"batch", 1, False))
            await service._round(RecordingClient(), time.time())
            assert engine.batches == 10  # 500 frames, not 100 messages
            assert len(service._inbox.wan) == 90  # the rest waits for the next round
        finally:
            await service.store.close()
            service.vault.close()

    asyncio.run(body())


def test_latency_of_a_held_round_includes_its_wait_for_the_commit(data_dir: Path) -> None:
    service = HeadEndService({}, "mqtt://127.0.0.1:1", data_dir)
    # Two rounds held back (2 samples by t=100.0, 1 more by 100.02), committed
    # in the round of 100.05 (1 more sample), the commit ending at 100.1.
    service._held_rounds = [(2, 100.0), (3, 100.02)]
    service._record_latencies([1_000_000] * 4, 100.05, 100.1)
    hist = service.latency_total
    assert hist.get_total_count() == 4
    values = sorted(v for v in (hist.get_value_at_percentile(p) for p in (25, 50, 75, 100)))
    # 1 ms at handling, plus 100, 100, 80 and 50 ms to the end of the commit.
    assert [round(v / 1000) for v in values] == [51, 81, 101, 101]
    service._held_rounds = []
    service._record_latencies([1_000_000], 100.2, 100.1)  # a clock step back: no negative wait
    assert service.latency_total.get_min_value() >= 1_000


# --------------------------------------------------------------------------
# the store: high_seq left to the readings


def _records(n: int) -> list[dict[str, str]]:
    return [
        {"meter": f"m{i:06d}", "system_title": secrets.token_bytes(8).hex(), "concentrator": "c0001",
         **{kt.value: secrets.token_hex(16) for kt in (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)}}
        for i in range(1, n + 1)
    ]


def _reading(meter: str, seq: int) -> tuple:
    return (meter, seq, 1_700_000_000 + seq, seq, 500, 2301, NOW + seq)


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_high_seq_left_to_the_readings_comes_back_on_load(tmp_path: Path, stop: str) -> None:
    vault = FileKeyVault(tmp_path / "kek")
    path = tmp_path / "headend.db"
    m1, m2 = "m000001", "m000002"

    def column(meter: str) -> tuple:
        return tuple(read_store_file_raw(path, meter))

    async def body() -> None:
        store = SqliteStore(path, vault)
        await store.open(writer=True)
        await store.import_factory(_records(2), NOW)
        await store.load()
        # m1: readings in order, no gap: its high_seq is the seq of a reading of the commit.
        await store.commit(Commit(readings=[_reading(m1, 1), _reading(m1, 2)], meters=[MeterRow(m1, b"", "", 2, [])]))
        # m2: a gap opens (written), then a reading fills it without changing
        # high_seq: the gaps column changes, so the row is written.
        await store.commit(Commit(readings=[_reading(m2, 5)], meters=[MeterRow(m2, b"", "", 5, [3, 4])]))
        await store.commit(Commit(readings=[_reading(m2, 3)], meters=[MeterRow(m2, b"", "", 5, [4])]))
        await store.commit(Commit(readings=[_reading(m1, 3)], meters=[MeterRow(m1, b"", "", 3, [])]))
        # A high_seq with no reading of it in the commit is always written.
        await store.commit(Commit(meters=[MeterRow(m2, b"", "", 7, [4])]))
        assert column(m1) == (None, None)  # left to the readings
        assert column(m2) == (7, msgpack.packb([4]))
        if stop == "crash":
            store._high_lagging.clear()  # kill -9: close() never writes them
        await store.close()
        assert column(m1) == ((3, None) if stop == "clean" else (None, None))
        assert {m.meter: m.high_seq for m in read_store_file(path).meters} == {m1: 3, m2: 7}
        store = SqliteStore(path, vault)
        await store.open(writer=True)
        try:
            rows = {m.meter: m for m in (await store.load()).meters}
            assert (rows[m1].high_seq, rows[m1].gaps) == (3, [])
            assert (rows[m2].high_seq, rows[m2].gaps) == (7, [4])
        finally:
            await store.close()

    try:
        asyncio.run(body())
    finally:
        vault.close()


def read_store_file_raw(path: Path, meter: str) -> tuple:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT high_seq, gaps FROM meters WHERE meter = ?", (meter,)).fetchone()


def test_a_failed_commit_leaves_the_store_cache_as_the_table() -> None:
    """A commit that rolls back must not teach the store a gaps value the
    table does not hold (or the next commit could skip a row it must write)."""

    async def body(tmp: Path) -> None:
        vault = FileKeyVault(tmp / "kek")
        store = SqliteStore(tmp / "headend.db", vault)
        await store.open(writer=True)
        try:
            await store.import_factory(_records(1), NOW)
            await store.load()
            with pytest.raises(Exception):
                # The gap is written, then a malformed reading fails the transaction.
                await store.commit(Commit(readings=[_reading("m000001", 9), ("m000001", 10, None, 0, 0, 0, 0.0)],
                                          meters=[MeterRow("m000001", b"", "", 10, [8])]))
            assert read_store_file_raw(tmp / "headend.db", "m000001") == (None, None)
            # Same gaps again with a reading of that high_seq: must be written now.
            await store.commit(Commit(readings=[_reading("m000001", 10)], meters=[MeterRow("m000001", b"", "", 10, [8])]))
            assert read_store_file_raw(tmp / "headend.db", "m000001") == (10, msgpack.packb([8]))
        finally:
            await store.close()
            vault.close()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(body(Path(tmp)))


# --------------------------------------------------------------------------
# the engine's inline path hands everything else on


def test_readings_out_of_order_duplicated_and_across_sessions_take_the_general_path() -> None:
    """Gaps, late readings, duplicates and a renewal's previous session are
    not the inline case: stored once each all the same."""
    sim = Sim(4, 2, policy=default_policy(session_max_frames=25))  # renewals: a previous session in grace
    sim.network = Drop(lambda w: w.direction == "up" and isinstance(w.msg, Reading) and w.msg.seq % 7 == 3)
    sim.run(40 * INTERVAL)
    sim.settle()
    sim.assert_readings()
    c = sim.engine.counters
    assert c["gaps_detected"] > 0 and c["session_renewals"] > 0
    assert c["readings_stored"] == len(sim.store.readings)
    assert not sim.engine.rejected, dict(sim.engine.rejected)
    sim.assert_clean()


def test_the_inbox_is_bounded_in_bytes_as_well_as_messages() -> None:
    """A WAN batch holds 1 to 200 frames: the inbox drops (counted) once its
    payload bytes would pass wan_max_bytes, commands never."""
    from ami.runtime import mqtt
    from headend.service import Inbox

    inbox = Inbox(1000, wan_max_bytes=10)
    wan = [mqtt.Message(topics.wan_up("c0001"), b"4444", 1, False) for _ in range(3)]
    assert inbox.put(wan[0], command=False) and inbox.put(wan[1], command=False)
    assert not inbox.put(wan[2], command=False) and inbox.dropped == 1 and inbox.wan_bytes == 8
    assert inbox.put(mqtt.Message(topics.HEADEND_COMMANDS, b"x" * 100, 1, False), command=True)
    assert inbox.pop().topic.value == topics.HEADEND_COMMANDS  # commands first
    inbox.pop()
    assert inbox.wan_bytes == 4 and inbox.put(wan[2], command=False)
    big = Inbox(1000, wan_max_bytes=10)
    assert big.put(mqtt.Message(topics.wan_up("c0001"), b"x" * 50, 1, False), command=False)  # one always fits
