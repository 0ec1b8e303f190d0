"""Memory of the head-end's gap bookkeeping (issue 10: memory stays bounded).

Builds a head-end engine with N meters (20,000 by default), then gives each
one reading ``window`` (Policy.gap_fill_window, 2,880) seqs above its last:
every meter now misses a full window of readings, the state the 4x overload
run left the head-end in (849 MB).  Reports:

* ``structure_bytes``: the meters' gap structures themselves (``m.gaps`` and
  everything it holds, each object counted once);
* ``gap_bytes``: what tracemalloc saw allocated by the gap detection: the
  structures plus the scheduling (one heap entry per detection, the set of
  meters with gaps); the stored-readings rows of the same step are
  subtracted;
* ``rss_delta_bytes``: the process RSS growth over the same step (psutil);
* ``entries``: ``len(m.gaps)`` summed over the meters (one per missing seq
  in a per-seq map, one per run in a run list);
* ``blob_bytes``: the persisted gaps column, msgpack'd as the store writes
  it (``msgpack.packb(row.gaps)``), summed over the drained meter rows;
* ``ranges``: the gap-fill ranges (``_gap_ranges``) of every meter;
* ``detect_s`` / ``ranges_s`` / ``drain_s``: wall time of the detection, of
  computing those ranges once for the fleet, and of the drain.

Only engine methods that exist before and after the run-list change are
used, so the same file measures both.

    .venv/bin/python bench/bench_gap_memory.py [--meters 20000] [--window 2880] [--no-tracemalloc]
        [--pattern window|alternate] [--repo DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import msgpack
import psutil

REPO = Path(__file__).resolve().parents[1]
# --repo DIR measures the engine of another copy of the tree (e.g. the code
# before a change, copied aside), without touching this checkout's git state.
if "--repo" in sys.argv:
    REPO = Path(sys.argv[sys.argv.index("--repo") + 1]).resolve()
sys.path.insert(0, str(REPO))

import ami.machines.headend as _engine_module  # noqa: E402
from ami.machines.headend import HeadEndEngine, Policy  # noqa: E402

# The bench times an internal of the engine on purpose (the request builder).
gap_ranges = getattr(_engine_module, "_gap_ranges")
from ami.machines.headend_records import MeterRow, Snapshot  # noqa: E402
from ami.protocol.messages import Reading  # noqa: E402

NOW = 1_000_000.0
HIGH = 1_000_000  # every meter's last reading: a realistic interval number (not a cached small int)


def _engine(n: int, window: int) -> HeadEndEngine:
    engine = HeadEndEngine(b"HEADEND0", Policy(gap_fill_window=window), lambda: os.urandom(16))
    rows = [MeterRow(f"m{i:06d}", i.to_bytes(8, "big"), f"c{i // 50:04d}", HIGH, []) for i in range(n)]
    engine.load(Snapshot(rows, [], []), NOW)
    return engine


def _deep_size(roots: list) -> int:
    """Bytes of these objects and of everything they hold (each object once):
    the gap structures alone, whatever their type (a dict of seq -> due, or
    runs in arrays), without the heap and sets that schedule them."""
    seen: set[int] = set()
    total = 0
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        todo.extend(o for o in gc.get_referents(obj) if not isinstance(o, type))
    return total


def _rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def _seqs(pattern: str, window: int) -> list[int]:
    """The readings each meter delivers after HIGH: ``window``, one reading
    a window above (one gap of ``window`` seqs); ``alternate``, every other
    reading over a window (window / 2 one-reading gaps: the adversarial
    pattern of a relay dropping alternately, which the runs bound caps)."""
    if pattern == "window":
        return [HIGH + window + 1]
    return list(range(HIGH + 2, HIGH + window + 1, 2))


def measure(n: int, window: int, trace: bool = True, pattern: str = "window") -> dict:
    """The figures above; ``trace`` False: RSS only (tracemalloc's own
    bookkeeping, one record per allocation, inflates the RSS it measures)."""
    engine = _engine(n, window)
    meters = list(engine.meters.values())
    readings = [Reading(seq, 0, 0, 0, 2300) for seq in _seqs(pattern, window)]
    gc.collect()
    if trace:
        tracemalloc.start()
    rss0 = _rss()
    t0 = time.perf_counter()
    for m in meters:
        for r in readings:
            engine._on_reading(m, r, NOW)  # the gap detection of a reading above high_seq
    detect_s = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss()
    gap_bytes = None
    if trace:
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        # The stored-readings rows (one per meter) are not gap bookkeeping.
        rows = sum(sys.getsizeof(row) for row in engine._readings) + sys.getsizeof(engine._readings)
        gap_bytes = traced - rows
    entries = sum(len(m.gaps) for m in meters)
    structure = _deep_size([m.gaps for m in meters])
    # What one gap-fill pass over the fleet costs to find its ranges (the
    # engine asks at most 8 of them per meter per tick, but computes all).
    due_at = NOW + engine.policy.gap_fill_delay_s
    t0 = time.perf_counter()
    ranges = sum(len(gap_ranges(m.gaps, due_at, engine.policy.gap_fill_coalesce)) for m in meters)
    ranges_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    effects = engine.drain()
    drain_s = time.perf_counter() - t0
    blobs = [len(msgpack.packb(row.gaps)) for row in effects.commit.meters if row.gaps]
    return {
        "meters": n,
        "window": window,
        "pattern": pattern,
        "gaps_detected": engine.counters["gaps_detected"],
        "meters_with_gaps": engine.meters_with_gaps,
        "entries": entries,
        "structure_bytes": structure,
        "structure_bytes_per_meter": round(structure / n, 1),
        "gap_bytes": gap_bytes,
        "gap_bytes_per_meter": None if gap_bytes is None else round(gap_bytes / n, 1),
        "rss_delta_bytes": rss1 - rss0,
        "blob_bytes": sum(blobs),
        "blob_bytes_per_meter": round(sum(blobs) / max(1, len(blobs)), 1),
        "ranges": ranges,
        "detect_s": round(detect_s, 3),
        "ranges_s": round(ranges_s, 3),
        "drain_s": round(drain_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=Policy().gap_fill_window)
    parser.add_argument("--json", help="write the figures here ('-' for stdout)")
    parser.add_argument("--no-tracemalloc", action="store_true", help="RSS only (tracemalloc inflates it)")
    parser.add_argument("--repo", help="measure the ami package of this tree instead (a copy of older code)")
    parser.add_argument("--pattern", choices=("window", "alternate"), default="window",
                        help="one gap of a window per meter, or every other reading missing over a window")
    args = parser.parse_args()
    out = measure(args.meters, args.window, trace=not args.no_tracemalloc, pattern=args.pattern)
    for key, value in out.items():
        print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")
    if args.json:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
