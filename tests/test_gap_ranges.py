"""A meter's missing readings are runs, not one entry per seq (issue 10:
memory stays bounded in every process).

At 4x overload the head-end grew to 849 MB: every missing seq up to
``gap_fill_window`` (2,880) was a map entry, and each commit of such a meter
wrote all of them.  ``GapRuns`` keeps [first, last, due] runs, at most
``Policy.gap_fill_max_runs`` per meter (beyond, the closest two merge), and
the store keeps [first, last] pairs; a store written before (a flat list of
seqs) still opens.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import sys
from pathlib import Path

import msgpack
import pytest

from ami.machines.headend import _GAP_CHUNK, HeadEndEngine, Policy, _gap_ranges
from ami.machines.headend_records import Commit, MeterRow, Snapshot
from ami.machines.headend_state import GapRuns
from ami.protocol.keys import KeyType
from ami.protocol.messages import GapFillReply, Reading
from ami.security.vault import FileKeyVault
from headend.store import SqliteStore
from sim import INTERVAL, Drop, Network, Sim, Wire, default_policy

NOW = 1_700_000_000.0
HIGH = 1_000_000  # a realistic interval number


def _runs(gaps: GapRuns) -> list[tuple[int, int, float]]:
    return list(gaps.runs())


def _seqs(gaps: GapRuns) -> set[int]:
    return {seq for first, last, _due in gaps.runs() for seq in range(first, last + 1)}


def _engine(*rows: MeterRow, **policy: object) -> HeadEndEngine:
    engine = HeadEndEngine(b"HEADEND0", Policy(**policy), lambda: os.urandom(16))
    engine.load(Snapshot(list(rows), [], []), NOW)
    return engine


def _row(meter: str = "m000001", high: int | None = HIGH, gaps: list | None = None) -> MeterRow:
    return MeterRow(meter, meter.encode()[-8:].rjust(8, b"\0"), "c0001", high, gaps or [])


def _reading(seq: int) -> Reading:
    return Reading(seq, 1_700_000_000 + seq, seq, 500, 2301)


# -- the structure ------------------------------------------------------------------


def test_removing_a_seq_trims_or_splits_its_run() -> None:
    gaps = GapRuns()
    assert gaps.add(10, 20, 5.0) and len(gaps) == 1 and gaps.count() == 11
    assert gaps.discard(10) and _runs(gaps) == [(11, 20, 5.0)]  # the first: trimmed
    assert gaps.discard(20) and _runs(gaps) == [(11, 19, 5.0)]  # the last: trimmed
    assert gaps.discard(15) and _runs(gaps) == [(11, 14, 5.0), (16, 19, 5.0)]  # inside: split, due kept
    assert not gaps.discard(15) and not gaps.discard(10) and not gaps.discard(99)  # not missing
    assert 14 in gaps and 15 not in gaps and gaps.count() == 8
    for seq in range(11, 20):
        gaps.discard(seq)
    assert not gaps and len(gaps) == 0 and gaps.first == ()  # the last gap gone: no arrays left


def test_added_runs_stay_sorted_and_join_what_they_overlap_or_touch() -> None:
    gaps = GapRuns()
    gaps.add(50, 60, 3.0)
    gaps.add(10, 20, 2.0)
    gaps.add(30, 30, 4.0)
    assert _runs(gaps) == [(10, 20, 2.0), (30, 30, 4.0), (50, 60, 3.0)]
    gaps.add(21, 29, 9.0)  # touches both neighbours: one run, due the earliest
    assert _runs(gaps) == [(10, 30, 2.0), (50, 60, 3.0)]
    gaps.add(55, 70, 1.0)  # overlaps
    assert _runs(gaps) == [(10, 30, 2.0), (50, 70, 1.0)]
    assert gaps.next_due() == 1.0


def test_a_seq_beyond_64_bits_is_refused_not_a_crash() -> None:
    gaps = GapRuns()
    assert not gaps.add(2**63, 2**63 + 5, 1.0) and not gaps
    engine = _engine(_row(high=2**63 - 3))
    m = engine.meters["m000001"]
    engine._on_reading(m, _reading(2**63 + 2), NOW)
    assert not m.gaps and engine.counters["readings_unrecoverable"] == 4
    assert engine.counters["gaps_detected"] == 0


def test_asking_part_of_a_run_splits_it_by_due_time_and_equal_dues_join_again() -> None:
    gaps = GapRuns()
    gaps.add(1, 100, 5.0)
    gaps.set_due(1, 40, 20.0)
    assert _runs(gaps) == [(1, 40, 20.0), (41, 100, 5.0)]
    gaps.set_due(41, 60, 20.0)  # same retry time: the touching parts are one run again
    assert _runs(gaps) == [(1, 60, 20.0), (61, 100, 5.0)]
    gaps.set_due(70, 80, 30.0)
    assert _runs(gaps) == [(1, 60, 20.0), (61, 69, 5.0), (70, 80, 30.0), (81, 100, 5.0)]
    gaps.set_due(200, 300, 1.0)  # no missing seq there: nothing changes
    assert len(gaps) == 4
    # Persisted: touching runs are one [first, last] pair (due times are not stored).
    assert gaps.persisted() == [[1, 100]] and sorted(gaps) == [[1, 100]]


def _due_per_seq(gaps: GapRuns) -> dict[int, float]:
    return {seq: due for first, last, due in gaps.runs() for seq in range(first, last + 1)}


@pytest.mark.parametrize("seed", range(20))
def test_runs_match_a_per_seq_map_under_random_operations(seed: int) -> None:
    """What the map of seq -> due did, the runs do: gaps opening above the
    highest, readings filling single seqs, ranges asked (their missing seqs
    due again later).  Sorted, disjoint, and touching only with unequal dues."""
    rnd = random.Random(seed)
    gaps, model = GapRuns(), {}
    high = 0
    for step in range(400):
        op = rnd.random()
        if op < 0.2:
            first, high = high + 1, high + rnd.randint(1, 30)
            gaps.add(first, high, float(step))
            model.update({s: float(step) for s in range(first, high + 1)})
            high += 1  # the reading that revealed the gap
        elif op < 0.7 and model:
            seq = rnd.choice(list(model)) if rnd.random() < 0.8 else rnd.randint(0, high + 1)
            assert gaps.discard(seq) == (model.pop(seq, None) is not None)
        elif model:
            first = rnd.randint(0, high)
            last = first + rnd.randint(0, 40)
            due = float(rnd.choice([step, 1000 + step // 10]))
            gaps.set_due(first, last, due)
            model.update({s: due for s in model if first <= s <= last})
        assert _due_per_seq(gaps) == model
        runs = _runs(gaps)
        for (f1, l1, d1), (f2, _l2, d2) in zip(runs, runs[1:]):
            assert f1 <= l1 < f2 and (f2 > l1 + 1 or d1 != d2)
        assert gaps.count() == len(model)


# -- coalescing works on runs exactly as it did on seqs --------------------------------


def _gap_ranges_per_seq(gaps: dict[int, float], now: float, coalesce: int) -> list[list[int]]:
    """The coalescing as it was written over a map of seq -> due (the reference)."""
    seqs = sorted(seq for seq, when in gaps.items() if when <= now) if coalesce <= 0 else sorted(gaps)
    reach = 1 + max(coalesce, 0)
    ranges: list[list] = []
    for seq in seqs:
        due = gaps[seq] <= now
        if ranges and seq - ranges[-1][1] <= reach and seq - ranges[-1][0] < _GAP_CHUNK:
            ranges[-1][1] = seq
            ranges[-1][2] = ranges[-1][2] or due
        else:
            ranges.append([seq, seq, due])
    return [[first, last] for first, last, due in ranges if due]


def _runs_of(per_seq: dict[int, float]) -> GapRuns:
    """The same gaps as runs, every seq with its own due time."""
    gaps = GapRuns()
    for seq in per_seq:
        gaps.add(seq, seq, 0.0)
    for seq, due in per_seq.items():
        gaps.set_due(seq, seq, due)
    return gaps


@pytest.mark.parametrize("coalesce", [0, 1, 16])
@pytest.mark.parametrize("seed", range(12))
def test_coalescing_runs_asks_the_same_ranges_as_coalescing_seqs(coalesce: int, seed: int) -> None:
    rnd = random.Random(seed)
    per_seq: dict[int, float] = {}
    seq = HIGH
    for _ in range(rnd.randint(1, 40)):  # scattered runs, long ones too (chunked at _GAP_CHUNK)
        seq += rnd.choice([1, 2, 3, 10, 17, 18, 40])
        length = rnd.choice([1, 1, 2, 5, 255, 256, 257, 700])
        due = rnd.choice([1.0, 2.0, 9.0])
        per_seq.update({s: due for s in range(seq, seq + length)})
        seq += length
    gaps = _runs_of(per_seq)
    assert _seqs(gaps) == set(per_seq)
    for now in (0.5, 1.0, 5.0, 10.0):
        assert _gap_ranges(gaps, now, coalesce) == _gap_ranges_per_seq(per_seq, now, coalesce)


def test_a_full_window_is_asked_in_chunks_and_marked_asked_without_listing_its_seqs() -> None:
    """A 2,880-reading gap: 12 chunks of _GAP_CHUNK, 8 asked in a tick (the
    per-meter burst); the run splits in two (asked, not yet asked), and the
    next tick asks the other 4, not the first 8 again."""
    engine = _engine(_row(), gap_fill_delay_s=0.0, gap_fill_retry_s=10.0)
    m = engine.meters["m000001"]
    engine._on_reading(m, _reading(HIGH + 2881), NOW)
    assert len(m.gaps) == 1 and m.gaps.count() == 2880
    asked = _gap_ranges(m.gaps, NOW, 16)
    assert len(asked) == 12 and all(b - a + 1 == _GAP_CHUNK for a, b in asked[:-1])
    for first, last in asked[:8]:
        m.gaps.set_due(first, last, NOW + 10)
    assert _runs(m.gaps) == [(HIGH + 1, HIGH + 8 * _GAP_CHUNK, NOW + 10), (HIGH + 8 * _GAP_CHUNK + 1, HIGH + 2880, NOW)]
    assert _gap_ranges(m.gaps, NOW, 16)[0][0] == HIGH + 8 * _GAP_CHUNK + 1


# -- the bound ----------------------------------------------------------------------


def test_runs_beyond_the_bound_merge_the_closest_pair_and_keep_every_missing_seq() -> None:
    gaps = GapRuns()
    for first, due in ((10, 1.0), (20, 2.0), (23, 3.0), (40, 4.0), (41, 5.0)):
        gaps.add(first, first, due)
    assert len(gaps) == 4  # 40 and 41 touch: one run
    missing = _seqs(gaps)
    assert gaps.bound(3) == (1, 2)  # 20 and 23 are closest: two held readings between them
    assert _runs(gaps) == [(10, 10, 1.0), (20, 23, 3.0), (40, 41, 4.0)]  # due: the later
    assert gaps.bound(1) == (2, 9 + 16)
    assert _runs(gaps) == [(10, 41, 4.0)] and _seqs(gaps) >= missing
    assert gaps.bound(0) == (0, 0)  # 0: no bound


def test_an_adversarial_pattern_keeps_a_meter_within_the_bound() -> None:
    """Every other reading missing (a relay dropping alternately): one run per
    reading without a bound; with it, never more than gap_fill_max_runs runs,
    and no missing seq is forgotten (the merged runs hold readings already
    stored, asked again: counted)."""
    bound = 8
    engine = _engine(_row(), gap_fill_max_runs=bound)
    m = engine.meters["m000001"]
    missing = set()
    for seq in range(HIGH + 2, HIGH + 2000, 2):
        engine._on_reading(m, _reading(seq), NOW)
        missing.add(seq - 1)
        assert len(m.gaps) <= bound
    assert _seqs(m.gaps) >= missing
    c = engine.counters
    assert c["gaps_detected"] == len(missing)
    assert c["gap_runs_merged"] == len(missing) - bound
    assert c["gap_held_readings_merged"] == m.gaps.count() - len(missing)


def test_a_reading_splitting_a_run_at_the_bound_keeps_the_bound() -> None:
    engine = _engine(_row(), gap_fill_max_runs=2)
    m = engine.meters["m000001"]
    engine._on_reading(m, _reading(HIGH + 101), NOW)  # HIGH+1 .. HIGH+100 missing
    engine._on_reading(m, _reading(HIGH + 50), NOW)  # split: two runs
    engine._on_reading(m, _reading(HIGH + 20), NOW)  # split again: three, over the bound
    assert len(m.gaps) == 2 and engine.counters["gap_runs_merged"] == 1
    assert engine.counters["readings_stored"] == 3 and engine.counters["readings_duplicate"] == 0


def test_the_default_bound_keeps_the_whole_fleet_modest() -> None:
    """A meter at the bound (every other reading missing, the pattern of a
    relay dropping alternately) holds gap_fill_max_runs runs, ~1.9 KB; the
    whole fleet of 20,000 at the bound stays under 40 MB (a window's seq map
    was ~240 KB per meter: 4.8 GB)."""
    bound = Policy().gap_fill_max_runs
    engine = _engine(_row())
    m = engine.meters["m000001"]
    for seq in range(HIGH + 2, HIGH + 4 * bound, 2):
        engine._on_reading(m, _reading(seq), NOW)
    assert len(m.gaps) == bound
    size = sys.getsizeof(m.gaps) + sum(sys.getsizeof(a) for a in (m.gaps.first, m.gaps.last, m.gaps.due))
    assert 20_000 * size < 40 * 2**20, size


def test_with_a_tiny_bound_every_reading_still_arrives_and_rewrites_are_the_merged_ones() -> None:
    """End to end (tests/sim.py): a relay drops every other reading, gap-fill
    waits long enough for many runs to gather, the bound is 2.  Every reading
    is stored; the only readings committed twice are held ones a merge folded
    in (the store keeps one row: ON CONFLICT DO NOTHING)."""
    sim = Sim(2, 1, policy=default_policy(gap_fill_max_runs=2, max_gap_requests_per_tick=1000,
                                          gap_fill_delay_s=10 * INTERVAL))
    assert sim.run_until(sim.all_associated, timeout=20 * INTERVAL)
    odd: dict[str, bool] = {}

    def drop_every_other(w: Wire) -> bool:
        if w.direction != "up" or not isinstance(w.msg, Reading):
            return False
        odd[w.meter] = not odd.get(w.meter, False)
        return odd[w.meter]

    sim.network = Drop(drop_every_other)
    for _ in range(8):
        sim.run(INTERVAL)
        assert all(len(m.gaps) <= 2 for m in sim.engine.meters.values())
    sim.network = Network()
    sim.settle()
    assert not sim.gaps()
    c = sim.engine.counters
    assert c["gap_runs_merged"] > 0 and c["gap_held_readings_merged"] > 0
    rewritten = sum(n - 1 for n in sim.store.writes.values())
    assert rewritten <= c["gap_held_readings_merged"]
    problems = [p for p in sim.reading_problems() if " written " not in p]
    assert not problems, problems
    assert not sim.engine.rejected, dict(sim.engine.rejected)
    sim.assert_clean()


# -- loading and persistence -------------------------------------------------------


def test_a_store_written_before_the_runs_still_opens() -> None:
    """The gaps column held a flat list of seqs (any order): same gaps, as runs."""
    engine = _engine(_row(gaps=[9, 3, 4, 5, 7]), gap_fill_delay_s=3.0)
    m = engine.meters["m000001"]
    assert _runs(m.gaps) == [(3, 5, NOW + 3), (7, 7, NOW + 3), (9, 9, NOW + 3)]
    assert engine.meters_with_gaps == 1
    engine._on_reading(m, _reading(4), NOW)  # gap-filled: the run splits, the row is rewritten as runs
    rows = engine.drain().commit.meters
    assert [r.gaps for r in rows] == [[[3, 3], [5, 5], [7, 7], [9, 9]]]


def test_the_runs_format_and_a_mixed_one_load() -> None:
    engine = _engine(_row("m000001", gaps=[[3, 5], [9, 9]]), _row("m000002", gaps=[[10, 20], 21, 30]))
    assert engine.meters["m000001"].gaps.persisted() == [[3, 5], [9, 9]]
    assert engine.meters["m000002"].gaps.persisted() == [[10, 21], [30, 30]]
    assert engine.meters_with_gaps == 2


@pytest.mark.parametrize("bad", [["x"], [[5, 3]], [[1, 2, 3]], [[1.0, 2]]])
def test_a_gaps_column_that_is_neither_format_names_its_meter(bad: list) -> None:
    with pytest.raises(ValueError, match="m000001"):
        _engine(_row(gaps=bad))


def test_a_loaded_store_beyond_the_bound_is_merged_at_load() -> None:
    engine = _engine(_row(gaps=list(range(1, 200, 2))), gap_fill_max_runs=10)
    m = engine.meters["m000001"]
    assert len(m.gaps) == 10 and _seqs(m.gaps) >= set(range(1, 200, 2))


def _records(n: int) -> list[dict[str, str]]:
    return [
        {"meter": f"m{i:06d}", "system_title": secrets.token_bytes(8).hex(), "concentrator": "c0001",
         **{kt.value: secrets.token_hex(16) for kt in (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)}}
        for i in range(1, n + 1)
    ]


def test_runs_survive_a_restart_through_the_sqlite_store_and_the_old_column_still_loads(tmp_path: Path) -> None:
    """The engine's rows go into the real store and come back: the runs are
    what was missing; a meter whose column the old code wrote (a flat list
    of seqs, packed as the store packs any list) loads as runs too."""
    vault = FileKeyVault(tmp_path / "kek")
    path = tmp_path / "headend.db"

    async def body() -> None:
        store = SqliteStore(path, vault)
        await store.open(writer=True)
        await store.import_factory(_records(2), NOW)
        engine = HeadEndEngine(b"HEADEND0", Policy(), lambda: os.urandom(16))
        engine.load(await store.load(), NOW)
        m1 = engine.meters["m000001"]
        for seq in (1, 2881, 2890):  # a full window missing, then 9 more
            engine._on_reading(m1, _reading(seq), NOW)
        engine._on_reading(m1, _reading(100), NOW)  # one of them filled: a split
        commit = engine.drain().commit
        row = next(r for r in commit.meters if r.meter == "m000001")
        assert row.gaps == [[2, 99], [101, 2880], [2882, 2889]]
        assert len(msgpack.packb(row.gaps)) < 32  # was 2,887 seqs, ~14 KB
        old = MeterRow("m000002", b"", "", 12, [3, 4, 5, 11])  # as the code before the runs stored it
        await store.commit(Commit(readings=commit.readings, meters=[*commit.meters, old]))
        await store.close()

        store = SqliteStore(path, vault)
        await store.open(writer=True)
        try:
            again = HeadEndEngine(b"HEADEND0", Policy(), lambda: os.urandom(16))
            again.load(await store.load(), NOW + 60)
        finally:
            await store.close()
        due = NOW + 60 + Policy().gap_fill_delay_s
        assert _runs(again.meters["m000001"].gaps) == [(2, 99, due), (101, 2880, due), (2882, 2889, due)]
        assert _runs(again.meters["m000002"].gaps) == [(3, 5, due), (11, 11, due)]
        assert again.meters_with_gaps == 2

    try:
        asyncio.run(body())
    finally:
        vault.close()


# -- memory ----------------------------------------------------------------------------


def test_a_window_of_missing_readings_is_one_run_and_a_tiny_row() -> None:
    """The 4x-overload state: a full gap_fill_window (2,880) missing per meter.
    One run each (it was 2,880 map entries each), and a persisted row of one
    [first, last] pair (it was 2,880 packed seqs)."""
    rows = [_row(f"m{i:06d}") for i in range(1, 101)]
    engine = _engine(*rows)
    window = engine.policy.gap_fill_window
    for m in engine.meters.values():
        engine._on_reading(m, _reading(HIGH + window + 1), NOW)
    assert engine.counters["gaps_detected"] == 100 * window
    assert all(len(m.gaps) == 1 and m.gaps.count() == window for m in engine.meters.values())
    assert all(m.gaps.first.itemsize == 8 and len(m.gaps.first) == 1 for m in engine.meters.values())
    rows_out = engine.drain().commit.meters
    assert all(r.gaps == [[HIGH + 1, HIGH + window]] for r in rows_out)
    assert max(len(msgpack.packb(r.gaps)) for r in rows_out) <= 12


def test_gap_fill_reply_fills_runs_and_frees_them() -> None:
    """A reply of the first chunk trims the run from its start (no split), an
    unavailable seq counts as unrecoverable, and once all are in the meter
    has no arrays left."""
    engine = _engine(_row())
    m = engine.meters["m000001"]
    engine._on_reading(m, _reading(HIGH + 11), NOW)
    reply = GapFillReply(1, tuple(_reading(s) for s in range(HIGH + 1, HIGH + 9)), (HIGH + 9, HIGH + 10))
    engine._on_gap_fill_reply(m, reply, NOW)
    assert not m.gaps and m.gaps.first == ()
    c = engine.counters
    assert (c["readings_gap_filled"], c["readings_unrecoverable"], c["gaps_detected"]) == (8, 2, 10)
