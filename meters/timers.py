"""One timer queue for every meter of a fleet: a calendar queue.

The fleet keeps, for each meter, when its ``tick`` is next due (meter
clock).  A binary heap of 20,000 ``(due, index)`` tuples did that with one
``heappop`` and one ``heappush`` per reading, each walking ~15 levels of
tuples scattered in memory: a few microseconds per reading on a busy host,
mostly cache misses.  The scheduler never needs more order than "everything
due by now", so the entries go into buckets of ``width`` meter-clock seconds
(a dict of lists: pushing is one lookup and one append) and only the numbers
of the non-empty buckets sit in a heap (hundreds, touched once per bucket,
not per meter).  ``pop_due`` hands out everything due, sorted by
``(due, index)``: the order the heap gave.

Pure data structure: no clock, no I/O.  Entries are never removed early; the
fleet recognises a superseded entry by comparing it with the meter's latest
due time, as it did with the heap.
"""

from __future__ import annotations

import heapq
import math

Entry = tuple[float, int]  # (due time on the meter clock, meter index)


class TimerWheel:
    """Calendar queue of (due, index) entries, ``width`` meter-clock seconds per bucket."""

    __slots__ = ("width", "_buckets", "_keys")

    def __init__(self, width: float) -> None:
        if not 0 < width < math.inf:
            raise ValueError("a bucket width is a positive, finite number of seconds")
        self.width = width
        self._buckets: dict[int, list[Entry]] = {}
        self._keys: list[int] = []  # heap of the numbers of the buckets in _buckets

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def __bool__(self) -> bool:
        return bool(self._keys)

    def push(self, due: float, index: int) -> None:
        """Add an entry; ``due`` must be finite (a meter with nothing to do has no entry)."""
        key = int(due // self.width)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [(due, index)]
            heapq.heappush(self._keys, key)
        else:
            bucket.append((due, index))

    def earliest(self) -> float | None:
        """The earliest due time held, or None when empty."""
        if not self._keys:
            return None
        return min(self._buckets[self._keys[0]])[0]

    def pop_due(self, now: float) -> list[Entry]:
        """Remove and return every entry due at or before ``now``, in (due, index) order."""
        keys, buckets = self._keys, self._buckets
        last = now // self.width  # the bucket that holds ``now``
        due: list[Entry] = []
        while keys and keys[0] <= last:
            key = heapq.heappop(keys)
            bucket = buckets.pop(key)
            if key == last:
                # The current bucket (the last one to look at): the part of
                # it that is not due yet stays.
                later = [entry for entry in bucket if entry[0] > now]
                if later:
                    buckets[key] = later
                    heapq.heappush(keys, key)
                    bucket = [entry for entry in bucket if entry[0] <= now]
                due += bucket
                break
            due += bucket
        due.sort()
        return due


__all__ = ["TimerWheel"]
