#!/usr/bin/env python3
"""Per-core throughput of the sans-I/O protocol core (ami/protocol).

Measures, single-threaded (the process cannot be pinned to a core here, so
one thread is the unit):

* ``seal``: ``encode_message(Reading)`` + ``Sealer.seal`` into a DC
  (general-ded-ciphering) frame, counter taken from a reserved ``SendCounter``;
* ``open``: ``parse_apdu`` + ``Opener.open`` (counter check, GCM tag
  verification, counter move) + ``decode_message``, on genuine frames with
  increasing invocation counters, exactly what a head-end does per uplink frame;
* ``aesgcm-encrypt`` / ``aesgcm-decrypt``: one raw ``AESGCM`` call on a
  plaintext of the same size, for reference (the floor of what is possible).

Usage::

    .venv/bin/python bench/bench_protocol.py [--frames 200000] [--repeat 5] [--json out.json]

Each case runs ``--repeat`` times over ``--frames`` frames; the table shows the
best run (least disturbed by the other core's load) and the median.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from ami.protocol import (
    Opener,
    ReceiveCounter,
    Sealer,
    SendCounter,
    Suite0Cipher,
    decode_message,
    encode_message,
    parse_apdu,
)
from ami.protocol.counters import IC_LIMIT
from ami.protocol.frames import GENERAL_DED_CIPHERING
from ami.protocol.messages import Reading

SESSION_KEY = bytes(range(16))
AK = bytes(range(0xD0, 0xE0))
METER_TITLE = bytes.fromhex("4C4E4B0000BC614E")  # "LNK" + serial


def reading(i: int) -> Reading:
    # Realistic magnitudes: ~60-byte msgpack map with the latency timestamp.
    return Reading(
        seq=1_000_000 + i,
        ts=1_760_000_000 + 600 * i,
        energy_wh=12_345_678 + i,
        power_w=1_530,
        voltage_dv=2_301,
        sealed_ns=1_760_000_000_123_456_789 + i,
    )


def _sealer(start: int = 0) -> Sealer:
    counter = SendCounter(start)
    counter.confirm_reservation(IC_LIMIT)  # the bench persists nothing
    return Sealer(Suite0Cipher(SESSION_KEY, AK), METER_TITLE, counter, GENERAL_DED_CIPHERING)


def bench_seal(n: int) -> float:
    sealer = _sealer()
    msgs = [reading(i) for i in range(n)]
    seal, encode = sealer.seal, encode_message
    gc.disable()
    t0 = time.perf_counter()
    for msg in msgs:
        seal(encode(msg))
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed


def make_frames(n: int) -> list[bytes]:
    sealer = _sealer()
    return [sealer.seal(encode_message(reading(i))) for i in range(n)]


def bench_open(frames: list[bytes]) -> float:
    opener = Opener(Suite0Cipher(SESSION_KEY, AK), METER_TITLE, ReceiveCounter())
    open_, parse, decode = opener.open, parse_apdu, decode_message
    gc.disable()
    t0 = time.perf_counter()
    for frame in frames:
        decode(open_(parse(frame)))
    elapsed = time.perf_counter() - t0
    gc.enable()
    assert opener.counter.lowest_acceptable == len(frames)
    return elapsed


def bench_raw_encrypt(n: int, size: int) -> float:
    gcm = AESGCM(SESSION_KEY)
    iv = METER_TITLE + bytes(4)
    data = bytes(size)
    aad = b"\x30" + AK
    enc = gcm.encrypt
    gc.disable()
    t0 = time.perf_counter()
    for _ in range(n):
        enc(iv, data, aad)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed


def bench_raw_decrypt(n: int, size: int) -> float:
    gcm = AESGCM(SESSION_KEY)
    iv = METER_TITLE + bytes(4)
    aad = b"\x30" + AK
    sealed = gcm.encrypt(iv, bytes(size), aad)
    dec = gcm.decrypt
    gc.disable()
    t0 = time.perf_counter()
    for _ in range(n):
        dec(iv, sealed, aad)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200_000, help="frames per run (default 200000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per case, best and median reported")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    ap.add_argument("--target", type=float, default=200_000.0, help="open frames/s target (exit 1 below)")
    args = ap.parse_args(argv)
    n = args.frames

    sample_plain = encode_message(reading(0))
    frames = make_frames(n)
    sample_frame = frames[0]
    size = len(sample_plain)

    cases = {
        "seal (encode_message + Sealer.seal, DC)": lambda: bench_seal(n),
        "open (parse_apdu + Opener.open + decode_message)": lambda: bench_open(frames),
        f"raw AESGCM.encrypt ({size} B)": lambda: bench_raw_encrypt(n, size),
        f"raw AESGCM.decrypt ({size} B)": lambda: bench_raw_decrypt(n, size),
    }
    results = []
    for name, fn in cases.items():
        fn()  # warm-up
        rates = sorted(n / fn() for _ in range(args.repeat))
        results.append(
            {
                "case": name,
                "best_fps": rates[-1],
                "median_fps": statistics.median(rates),
                "best_us_per_frame": 1e6 / rates[-1],
            }
        )

    info = {
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "frames_per_run": n,
        "repeat": args.repeat,
        "plaintext_bytes": size,
        "frame_bytes": len(sample_frame),
    }
    print(
        f"Python {info['python']} on {info['cpu']} ({info['cpus']} CPUs), single thread; "
        f"Reading plaintext {size} B, DC frame {len(sample_frame)} B; "
        f"{n} frames x {args.repeat} runs"
    )
    width = max(len(r["case"]) for r in results)
    print(f"{'case':<{width}}  {'best frames/s':>14}  {'median frames/s':>16}  {'us/frame':>9}")
    for r in results:
        print(f"{r['case']:<{width}}  {r['best_fps']:>14,.0f}  {r['median_fps']:>16,.0f}  {r['best_us_per_frame']:>9.2f}")
    open_fps = results[1]["best_fps"]
    verdict = "OK" if open_fps >= args.target else "BELOW TARGET"
    print(f"open target {args.target:,.0f} frames/s: {verdict}")

    if args.json:
        doc = json.dumps({"info": info, "results": results, "target_fps": args.target}, indent=2)
        if args.json == "-":
            print(doc)
        else:
            Path(args.json).write_text(doc + "\n")
    return 0 if open_fps >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
