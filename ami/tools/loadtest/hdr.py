"""Merging the head-end's HDR latency histograms.

The head-end publishes, in each metrics snapshot, ``latency_ms.interval_hdr``:
the base64 of ``HdrHistogram.encode()`` (itself base64 already) of the latencies (microseconds, from
the meter's ``sealed_ns`` to the head-end accepting the reading) recorded since
the previous snapshot.  Adding those histograms gives exact percentiles over
any run of snapshots (no averaging of percentiles).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable

from hdrh.codec import HdrCookieException
from hdrh.histogram import HdrHistogram

#: Same range and precision as headend/service.py (1 us .. 10 min, 3 digits).
LOWEST_US = 1
HIGHEST_US = 600_000_000
DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def decode(encoded: str | bytes | None) -> HdrHistogram | None:
    """One ``interval_hdr`` value; ``None`` for an empty interval ("")."""
    if not encoded:
        return None
    if isinstance(encoded, str):
        encoded = encoded.encode("ascii")
    # hdrh's encode() is already base64 (of the compressed V2 payload), and
    # the head-end base64-encodes that once more for JSON: unwrap the outer
    # layer when it is there, accept a plain encode() output too.
    try:
        return HdrHistogram.decode(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError, HdrCookieException, zlib.error):
        return HdrHistogram.decode(encoded)


def merge(encoded: Iterable[str | bytes | None]) -> HdrHistogram:
    """The sum of every non-empty encoded histogram."""
    total = new_histogram()
    for item in encoded:
        h = decode(item)
        if h is not None and h.get_total_count():
            total.add(h)
    return total


def summary_ms(h: HdrHistogram | None) -> dict[str, float | int]:
    """count, p50, p90, p99, p99.9, max and mean in milliseconds (0 when empty)."""
    count = h.get_total_count() if h is not None else 0
    out: dict[str, float | int] = {"count": count}
    for p in PERCENTILES:
        key = f"p{p:g}"
        out[key] = round(h.get_value_at_percentile(p) / 1000, 3) if count else 0.0
    out["max"] = round(h.get_max_value() / 1000, 3) if count else 0.0
    out["mean"] = round(h.get_mean_value() / 1000, 3) if count else 0.0
    return out
