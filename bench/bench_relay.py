"""CPU per relayed reading of the blind relays' hot path, without a network.

Runs the real ``concentrator/relay.py`` code: N ``Relay`` objects in one
process (as ``ami concentrator`` runs them), each in its ``_session`` with its
sender task, fed PLC uplink messages through ``client.on_message`` exactly as
``ami.runtime.mqtt`` hands them over.  The stand-ins:

* each relay's MQTT client is a sink: ``publish_nowait`` counts what it is
  given and acknowledges every QoS 1 publish on the next loop iteration, all
  of them in one callback (as one read of PUBACKs would);
* a driver delivers ``--rate`` readings per second spread evenly over the
  relays, every ``--tick-ms``, each from a random meter of the segment (81-byte
  frames tagged 0xdb, precomputed topics), and every ``--aare-every``-th one an
  AARE (0x61) if asked.

It measures ``time.process_time()`` over ``--duration`` seconds after a
warm-up and divides by the readings fed; ``--baseline`` also runs the driver
alone (``on_message`` a no-op) so its own cost can be subtracted (``net``).
Checks at the end that every fed frame went out in a batch, in order.

    .venv/bin/python bench/bench_relay.py --relays 400 --rate 12000 --duration 10 --baseline
    .venv/bin/python bench/bench_relay.py --relay-file /tmp/relay_orig.py   # compare another version
    .venv/bin/python bench/bench_relay.py --profile /tmp/relay.txt          # pyinstrument text report

``--profile FILE`` runs pyinstrument (``pip install pyinstrument``) over the
measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ami.protocol.messages import decode_batch  # noqa: E402
from ami.runtime.metrics import Metrics  # noqa: E402
from _sink import SinkClient  # noqa: E402  (bench/_sink.py)


class RelaySink(SinkClient):
    """The relay's side of the client too: publishes are counted (and kept if
    asked), subscriptions granted, reading paused and resumed."""

    def __init__(self, keep: bool) -> None:
        self.kept: list[bytes] = []
        super().__init__(on_publish=(lambda _topic, payload: self.kept.append(payload)) if keep else None)
        self.on_message: Callable[[str, bytes], None] | None = None
        self.keep = keep
        self.paused = 0
        self._closed: asyncio.Future | None = None

    async def subscribe(self, topic: str, qos: int = 0, **_: object) -> list[int]:
        return [qos]

    async def wait_disconnected(self) -> None:
        self._closed = asyncio.get_running_loop().create_future()
        await self._closed

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        pass


def load_relay_module(path: str | None) -> ModuleType:
    if path is None:
        return importlib.import_module("concentrator.relay")
    spec = importlib.util.spec_from_file_location("relay_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def run(args: argparse.Namespace, relay_mod: ModuleType, noop: bool) -> dict:
    settings = relay_mod.RelaySettings(broker="mqtt://127.0.0.1:1", data_dir=Path("."),
                                       batch_max_frames=args.batch_max_frames,
                                       batch_max_delay_ms=args.batch_max_delay_ms)
    metrics = Metrics("concentrator", "bench")
    rng = random.Random(1)
    relays, clients, feeds = [], [], []
    # One flush timer for the whole process, as RelayProcess.build does (if this version has it).
    extra = (relay_mod.FlushScheduler(settings.batch_max_delay_ms / 1000.0),) if hasattr(relay_mod, "FlushScheduler") \
        else ()
    n = 0
    for i in range(args.relays):
        c = f"c{i + 1:04d}"
        meters = [f"m{n + j + 1:06d}" for j in range(args.meters_per_relay)]
        n += args.meters_per_relay
        client = RelaySink(keep=args.check)
        relay = relay_mod.Relay(c, meters, client, settings, metrics, *extra)
        relays.append(relay)
        clients.append(client)
        feeds.append([f"ami/v1/plc/{c}/up/{m}" for m in meters])
    sessions = [asyncio.create_task(r._session(cl)) for r, cl in zip(relays, clients, strict=True)]
    await asyncio.sleep(0.05)
    if noop:
        for cl in clients:
            cl.on_message = lambda _t, _p: None
    handlers = [cl.on_message for cl in clients]

    frame = b"\xdb" + bytes(range(80))
    aare = b"\x61" + bytes(range(60))
    loop = asyncio.get_running_loop()
    tick = args.tick_ms / 1000.0
    fed = 0
    fed_log: list[list[tuple[str, bytes]]] | None = [[] for _ in relays] if args.check else None
    carry = 0.0
    nrel = len(relays)
    cursor = 0
    picks = [rng.randrange(args.meters_per_relay) for _ in range(4096)]
    pick_i = 0
    aare_every = args.aare_every

    def drive() -> None:
        nonlocal fed, carry, cursor, pick_i
        carry += args.rate * tick
        k = int(carry)
        carry -= k
        for _ in range(k):
            r = cursor
            cursor = cursor + 1 if cursor + 1 < nrel else 0
            topic = feeds[r][picks[pick_i]]
            pick_i = (pick_i + 1) & 4095
            fed += 1
            payload = aare if aare_every and fed % aare_every == 0 else frame
            handlers[r](topic, payload)
            if fed_log is not None:
                fed_log[r].append((topic.rsplit("/", 1)[1], payload))

    async def driver(stop: asyncio.Event) -> None:
        next_t = loop.time()
        while not stop.is_set():
            next_t += tick
            drive()
            delay = next_t - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)

    stop = asyncio.Event()
    task = asyncio.create_task(driver(stop))
    await asyncio.sleep(args.warmup)
    profiler = None
    if args.profile and not noop:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    gc.collect()
    fed0, c0, w0 = fed, time.process_time(), time.monotonic()
    pub0 = sum(cl.published for cl in clients)
    await asyncio.sleep(args.duration)
    cpu, wall, readings = time.process_time() - c0, time.monotonic() - w0, fed - fed0
    published = sum(cl.published for cl in clients) - pub0
    if profiler is not None:
        profiler.stop()
        Path(args.profile).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    stop.set()
    await task
    for r in relays:
        r.flush()
    await asyncio.sleep(0.2)
    for s in sessions:
        s.cancel()
    await asyncio.gather(*sessions, return_exceptions=True)
    out = {
        "mode": "driver only" if noop else "relays",
        "readings": readings,
        "readings_per_s": round(readings / wall),
        "batches_per_s": round(published / wall),
        "readings_per_batch": round(readings / published, 2) if published else None,
        "cpu_pct": round(100 * cpu / wall, 1),
        "cpu_us_per_reading": round(cpu / readings * 1e6, 2) if readings else None,
    }
    if not noop:
        out["counters"] = dict(metrics.counters)
        out["rejected"] = {k: v for k, v in metrics.rejected.items() if v}
    if fed_log is not None and not noop:
        for r, cl, want in zip(relays, clients, fed_log, strict=True):
            got = [f for p in cl.kept for f in decode_batch(p).frames]
            assert got == want, f"{r.concentrator}: {len(got)} frames out, {len(want)} fed"
            assert all(decode_batch(p).concentrator == r.concentrator for p in cl.kept)
        out["check"] = "every frame forwarded unchanged, in order"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relays", type=int, default=400)
    p.add_argument("--meters-per-relay", type=int, default=50)
    p.add_argument("--rate", type=float, default=12000, help="readings per second, all relays together")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--tick-ms", type=float, default=2.0, help="the driver delivers what is due every tick")
    p.add_argument("--batch-max-frames", type=int, default=200)
    p.add_argument("--batch-max-delay-ms", type=float, default=50.0)
    p.add_argument("--aare-every", type=int, default=0, help="every n-th frame an AARE (0: none)")
    p.add_argument("--relay-file", help="load the relay module from this file (compare versions)")
    p.add_argument("--baseline", action="store_true", help="also measure the driver alone and subtract it")
    p.add_argument("--check", action="store_true", help="keep every batch and check frames out == frames in")
    p.add_argument("--profile", help="write pyinstrument's text report of the measured window here")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    relay_mod = load_relay_module(args.relay_file)
    runner: Callable = asyncio.run
    if not args.no_uvloop:
        import uvloop
        runner = uvloop.run
    results = [runner(run(args, relay_mod, noop=False))]
    if args.baseline:
        base = runner(run(args, relay_mod, noop=True))
        results.append(base)
        if results[0]["cpu_us_per_reading"] and base["cpu_us_per_reading"]:
            results[0]["net_cpu_us_per_reading"] = round(
                results[0]["cpu_us_per_reading"] - base["cpu_us_per_reading"], 2)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
