"""The head-end's hot path in one process: CPU per accepted reading.

What ``ami headend`` does per reading, without the broker: genuine WAN
batches (meters sealed by the real ``Meter`` machine, grouped per
concentrator every ``--batch-ms`` as the relays do) go through the real
service shell (``HeadEndService._on_message`` -> ``_round``: inbox, engine,
SQLite commit on the store thread, latency histograms, publish of what is
drained) in rounds at most every ``--round-ms``, with the metrics snapshot
every 2 s.  The clock is simulated (rounds are not slept), so the figure is
the head-end's CPU at the offered rate, not at whatever this host sustains.

CPU is ``time.process_time()`` (every thread of the process: the engine and
the store thread): robust against other load on a shared machine, unlike
wall time.

    .venv/bin/python bench/bench_headend_hotpath.py                    # 20,000 meters / 400 conc., 12,600/s
    .venv/bin/python bench/bench_headend_hotpath.py --rate 5000 --meters 5000 --concentrators 100
    .venv/bin/python bench/bench_headend_hotpath.py --profile /tmp/hot.html   # pyinstrument of the measured part

Preparation (provisioning, associating every meter, sealing every frame) is
not measured.  ``--json`` prints the result as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ami.machines.meter import CipherCache, Meter, MeterConfig, MeterKeys  # noqa: E402
from ami.protocol import topics  # noqa: E402
from ami.protocol.keys import SecretBytes  # noqa: E402
from ami.protocol.messages import Batch, decode_batch, encode_batch  # noqa: E402
from ami.runtime.network import iter_factory_keys, load_network  # noqa: E402
from ami.tools.provision import provision  # noqa: E402
from headend.service import HeadEndService  # noqa: E402

INTERVAL_S = 1800  # the meters' load-curve interval (meter clock), as `ami meters`


class FakeClient:
    """Stands in for the MQTT client: publishes are kept (downlink) or counted."""

    def __init__(self) -> None:
        self.downlink: list[tuple[str, bytes]] = []
        self.published = 0

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published += 1
        if topic.endswith("/down"):
            self.downlink.append((topic, payload))


class Bench:
    def __init__(self, args: argparse.Namespace, data: Path) -> None:
        self.args = args
        self.data = data
        # Meter clock = wall * compression: each meter pushes once per interval,
        # so the fleet pushes meters / interval readings per meter-clock second.
        self.compression = INTERVAL_S * args.rate / args.meters
        self.t0 = time.time()
        self.client = FakeClient()

    def meter_now(self, t: float) -> float:
        return (t - self.t0) * self.compression + 10 * INTERVAL_S

    async def setup(self) -> None:
        a = self.args
        provision(self.data, a.meters, a.concentrators, bus_security=False)
        config = {"headend": {"round_min_interval_ms": a.round_ms, **dict(a.policy)}}
        self.service = HeadEndService(config, "mqtt://127.0.0.1:1", self.data)
        await self.service.start_engine()
        network = load_network(self.data)
        mconfig = MeterConfig(
            headend_title=network.headend_title, tsp_title=network.tsp_title, interval_s=INTERVAL_S,
            # Wall-clock durations on the meter clock, as the fleet scales them.
            boot_retry_s=30 * self.compression, boot_retry_max_s=120 * self.compression,
            ak_grace_s=60 * self.compression, ciphers=CipherCache(4096), rng=os.urandom,
        )
        self.meters: dict[str, Meter] = {}
        records = sorted(iter_factory_keys(self.data), key=lambda r: r["meter"])
        n = len(records)
        if a.spread == "interleaved":
            # Consecutive pushes rotate through the concentrators: every relay
            # forwards a few readings per batch (the estimate, ~2.5 per
            # 50 ms at 5,000/s on 100 relays).  "contiguous" is what `ami meters
            # --rate` does (offsets by sorted meter id: a segment pushes in a burst).
            seen: dict[str, int] = defaultdict(int)
            slot = {}
            for j, r in enumerate(records):
                slot[r["meter"]] = (seen[r["concentrator"]], j)
                seen[r["concentrator"]] += 1
            position = {m: j for j, m in enumerate(sorted(slot, key=slot.__getitem__))}
        else:
            position = {r["meter"]: j for j, r in enumerate(records)}
        for r in records:
            i = position[r["meter"]]
            keys = MeterKeys(*(SecretBytes(bytes.fromhex(r[k])) for k in ("ccc", "ak", "cc_lan", "cc_locale")))
            self.meters[r["meter"]] = Meter(
                r["meter"], network.titles[r["meter"]], keys, mconfig, concentrator=r["concentrator"],
                push_offset=i / n * INTERVAL_S,  # evenly spaced, as `ami meters --rate`
                boot_at=self.meter_now(self.t0),
            )

    async def round(self, t: float, batches: list[tuple[str, bytes]]) -> None:
        for topic, payload in batches:
            self.service._on_message(topic, payload)
        await self.service._round(self.client, t)

    def deliver_down(self, t: float) -> list[tuple[str, bytes]]:
        """Downlink frames to their meters; returns the uplink they answer with, batched."""
        now = self.meter_now(t)
        up: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        downlink, self.client.downlink = self.client.downlink, []
        for _topic, payload in downlink:
            batch = decode_batch(payload)
            for mid, apdu in batch.frames:
                out = self.meters[mid].on_downlink(apdu, now)
                up[batch.concentrator].extend((mid, f) for f in out.uplink)
        return self._encode(up)

    def _encode(self, up: dict[str, list[tuple[str, bytes]]]) -> list[tuple[str, bytes]]:
        self._seq = getattr(self, "_seq", 0)
        out = []
        for conc, frames in up.items():
            for i in range(0, len(frames), 200):
                self._seq += 1
                out.append((topics.wan_up(conc), encode_batch(Batch(conc, self._seq, tuple(frames[i: i + 200])))))
        return out

    async def associate(self) -> float:
        """Boot every meter and run rounds until each holds a session: not measured."""
        t = self.t0
        engine = self.service.engine
        up: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        for mid, meter in self.meters.items():
            out = meter.tick(self.meter_now(t))
            up[meter.concentrator].extend((mid, f) for f in out.uplink)
        pending = self._encode(up)
        deadline = time.monotonic() + 600
        while True:
            t += 0.05
            await self.round(t, pending)
            pending = self.deliver_down(t)
            done = sum(1 for mid, m in self.meters.items()
                       if m.session is not None and engine.meters[mid].session is not None)
            if done == len(self.meters) and not pending and not self.client.downlink:
                return t
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {len(self.meters)} meters associated")
            if not pending:
                # Let the meters' boot retries and the engine's timers run.
                for mid, meter in self.meters.items():
                    if meter.session is None and self.meter_now(t) >= meter.next_due:
                        out = meter.tick(self.meter_now(t))
                        up = defaultdict(list)
                        up[meter.concentrator].extend((mid, f) for f in out.uplink)
                        pending += self._encode(up)

    def generate(self, start: float, seconds: float) -> list[tuple[float, str, bytes]]:
        """Every WAN batch the relays would send in ``seconds`` from ``start``:
        meters tick when due, each relay forwards what it holds every batch delay."""
        a = self.args
        heap = [(m.next_due, mid) for mid, m in self.meters.items()]
        heapq.heapify(heap)
        step = a.batch_ms / 1000
        out: list[tuple[float, str, bytes]] = []
        seq = 0
        for k in range(1, int(seconds / step) + 1):
            t = start + k * step
            now = self.meter_now(t)
            held: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
            while heap and heap[0][0] <= now:
                _due, mid = heapq.heappop(heap)
                meter = self.meters[mid]
                # Sealed inside the batch window (wall clock stamp, for latencies).
                output = meter.tick(now, int((t - step / 2) * 1e9))
                held[meter.concentrator].extend((mid, f) for f in output.uplink)
                heapq.heappush(heap, (meter.next_due, mid))
            for conc, frames in held.items():
                seq += 1
                # A relay's offset inside the batch window (they are not in phase).
                phase = (hash(conc) % 1000) / 1000 * step
                for i in range(0, len(frames), a.batch_frames):
                    out.append((t + phase, topics.wan_up(conc), encode_batch(Batch(conc, seq, tuple(frames[i: i + a.batch_frames])))))
        out.sort(key=lambda x: x[0])
        return out

    def instrument(self) -> dict[str, float]:
        """Thread CPU spent in the main pieces (seconds), by wrapping them."""
        spent: dict[str, float] = defaultdict(float)

        def wrap(obj: object, name: str, label: str) -> None:
            fn = getattr(obj, name)

            def timed(*args, **kwargs):
                t0 = time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[label] += time.thread_time() - t0

            setattr(obj, name, timed)

        engine = self.service.engine
        wrap(engine, "handle_batch", "engine.handle_batch")
        wrap(engine, "drain", "engine.drain")
        wrap(engine, "tick", "engine.tick")
        wrap(self.service.store, "_commit", "store._commit (store thread)")
        if hasattr(self.service, "_record_latencies"):
            wrap(self.service, "_record_latencies", "latency histograms")
        else:  # the shell before issue 10's hot-path work
            wrap(self.service.latency_total, "record_value", "latency histograms")
            wrap(self.service.latency_interval, "record_value", "latency histograms")
        return spent

    async def measure(self, start: float, batches: list[tuple[float, str, bytes]], warmup: float) -> dict:
        a = self.args
        engine = self.service.engine
        spent = self.instrument() if a.breakdown else None
        gap = a.round_ms / 1000
        t = start
        i = 0
        next_metrics = start + 2.0
        measuring = False
        stored0 = frames0 = 0
        cpu0 = wall0 = 0.0
        rounds = batches_fed = 0
        profiler = None
        end = batches[-1][0] + gap if batches else start
        chunk = a.seconds / max(1, a.repeat)
        chunks: list[float] = []  # CPU us per reading of each sub-window
        mark = None
        while t < end + gap:
            t += gap
            if measuring and t >= mark[0] + chunk:
                n = engine.counters["readings_stored"] - mark[1]
                chunks.append(round((time.process_time() - mark[2]) / max(1, n) * 1e6, 2))
                mark = (t, engine.counters["readings_stored"], time.process_time())
            if not measuring and t >= start + warmup:
                measuring = True
                if a.profile:
                    from pyinstrument import Profiler

                    profiler = Profiler(interval=0.0005)
                    profiler.start()
                stored0 = engine.counters["readings_stored"]
                frames0 = engine.counters["frames_up"]
                cpu0, wall0 = time.process_time(), time.perf_counter()
                mark = (t, stored0, cpu0)
                rounds = batches_fed = 0
                if spent is not None:
                    spent.clear()
            now_batches = []
            while i < len(batches) and batches[i][0] <= t:
                now_batches.append(batches[i][1:])
                i += 1
            await self.round(t, now_batches)
            rounds += 1
            batches_fed += len(now_batches)
            if t >= next_metrics:
                self.service._snapshot()
                next_metrics += 2.0
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        if profiler is not None:
            profiler.stop()
            Path(a.profile).write_text(profiler.output_html())
            if a.profile_text:
                print(profiler.output_text(unicode=False, color=False, show_all=False), file=sys.stderr)
        stored = engine.counters["readings_stored"] - stored0
        breakdown = {k: round(v / max(1, stored) * 1e6, 2) for k, v in sorted(spent.items())} if spent else {}
        return {
            "meters": a.meters,
            "concentrators": a.concentrators,
            "rate_offered": a.rate,
            "seconds_simulated": round(t - start - warmup, 2),
            "readings_accepted": stored,
            "frames_up": engine.counters["frames_up"] - frames0,
            "rejected": sum(engine.rejected.values()),
            "batches": batches_fed,
            "rounds": rounds,
            "readings_per_batch": round(stored / max(1, batches_fed), 2),
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "cpu_us_per_reading": round(cpu / max(1, stored) * 1e6, 2),
            **({"cpu_us_per_reading_windows": chunks, "cpu_us_per_reading_min": min(chunks)} if len(chunks) > 1 else {}),
            "capacity_one_core_per_s": round(stored / cpu) if cpu else None,
            **({"breakdown_us_per_reading": breakdown} if breakdown else {}),
        }


async def main_async(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="ami-hotpath-") as tmp:
        bench = Bench(args, Path(tmp) / "data")
        await bench.setup()
        try:
            t = await bench.associate()
            # Drain the association rounds' leftovers; start on a clean slate.
            for _ in range(3):
                t += 0.05
                await bench.round(t, bench.deliver_down(t))
            batches = bench.generate(t, args.seconds + args.warmup)
            result = await bench.measure(t, batches, args.warmup)
            result["associated"] = sum(1 for m in bench.service.engine.meters.values() if m.session is not None)
            return result
        finally:
            await bench.service.store.close()
            bench.service.vault.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=20000)
    p.add_argument("--concentrators", type=int, default=400)
    p.add_argument("--rate", type=float, default=12600, help="readings per second offered (simulated clock)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window (simulated seconds)")
    p.add_argument("--repeat", type=int, default=1,
                   help="also report CPU per reading of this many equal sub-windows, and their minimum (noisy hosts)")
    p.add_argument("--warmup", type=float, default=2.0, help="simulated seconds before measuring")
    p.add_argument("--spread", choices=("interleaved", "contiguous"), default="interleaved",
                   help="push offsets: concentrators interleaved (small batches) or by meter id (ami meters --rate)")
    p.add_argument("--batch-ms", type=float, default=50.0, help="relay batch delay")
    p.add_argument("--batch-frames", type=int, default=200, help="relay batch size cap")
    p.add_argument("--round-ms", type=float, default=20.0, help="head-end round_min_interval_ms")
    p.add_argument("--set", dest="policy", action="append", default=[], type=lambda s: _kv(s),
                   help="[headend] KEY=VALUE override (repeatable)")
    p.add_argument("--profile", help="write a pyinstrument HTML profile of the measured part here")
    p.add_argument("--profile-text", action="store_true", help="also print the profile as text (stderr)")
    p.add_argument("--breakdown", action="store_true", help="thread CPU per reading of the main pieces")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import uvloop  # as every service runs

    result = uvloop.run(main_async(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v}")


def _kv(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


if __name__ == "__main__":
    main()
