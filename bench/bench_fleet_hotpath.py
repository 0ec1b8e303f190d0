"""CPU per reading of the fleet's hot path, without a network.

Runs the real ``meters/fleet.py`` code on N provisioned meters: ``Fleet.setup``
(factory keys, NVM with synchronous=FULL), the scheduler and its timers, ``Meter.tick``
with its sealing and load curve, ``_collect``, the NVM committer and the
per-segment sending (_kick, _flush).  Only two things are stand-ins:

* each segment's MQTT client is a sink: ``publish_nowait`` keeps nothing and
  acknowledges every QoS 1 publish on the next loop iteration, all of a
  connection's acknowledgements in one callback (as one read of PUBACKs would);
* a head-end stand-in answers each meter's first boot event with a genuine
  AARQ under its CC_LAN, handed to ``Fleet._on_message`` (the real downlink path).

Once every meter is associated and a warm-up has passed, it measures
``time.process_time()`` (CPU of the whole process: NVM thread included, robust
against other load on a shared host) over ``--duration`` wall seconds and
divides by the readings pushed in that window.  The sink's own work (one
callback per publish) is included, so the figure is a slight over-estimate.

    .venv/bin/python bench/bench_fleet_hotpath.py --meters 20000 --rate 12600 --duration 10
    .venv/bin/python bench/bench_fleet_hotpath.py --meters 5000 --rate 5000 --profile /tmp/fleet.txt

``--profile FILE`` runs pyinstrument (``pip install pyinstrument``, in the
``profile`` extra) over the measured window and writes its text report.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ami.protocol import SecretBytes, Suite0Cipher, seal_apdu, topics
from ami.protocol.association import InitiateRequest, build_aarq, encode_initiate_request
from ami.protocol.frames import GENERAL_DED_CIPHERING, GENERAL_GLO_CIPHERING, GLO_INITIATE_REQUEST
from ami.tools.provision import provision
from meters.fleet import Fleet, FleetSettings

from _sink import SinkClient  # bench/_sink.py (this script's folder is on sys.path)

class HeadEndStandIn:
    """Answers each meter's first boot event (general-glo-ciphering) with an AARQ."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.answered: set[str] = set()
        self.readings = 0

    def on_publish(self, topic: str, payload: bytes) -> None:
        tag = payload[0]
        if tag == GENERAL_DED_CIPHERING:
            self.readings += 1  # readings (and any other session traffic)
            return
        if tag != GENERAL_GLO_CIPHERING:
            return  # AAREs
        _root, _v, _plc, c, _up, mid = topic.split("/")
        if mid in self.answered:
            return
        self.answered.add(mid)
        asyncio.get_running_loop().call_soon(self._associate, c, mid)

    def _associate(self, c: str, mid: str) -> None:
        fleet = self.fleet
        meter = fleet.meters[fleet.index[mid]]
        cipher = Suite0Cipher(meter.keys.cc_lan, meter.keys.ak)
        ic = meter.lan_recv.lowest_acceptable
        session = SecretBytes(os.urandom(16))
        initiate = seal_apdu(cipher, GLO_INITIATE_REQUEST, meter.config.headend_title, ic,
                             encode_initiate_request(InitiateRequest(session)))
        aarq = build_aarq(meter.config.headend_title, initiate)
        fleet._on_message(fleet.links[c], topics.plc_down(c, mid), aarq)


async def run(args: argparse.Namespace, data: Path) -> dict:
    settings = FleetSettings(
        broker="mqtt://127.0.0.1:9", data_dir=data, rate=args.rate, stamp=not args.no_stamp, pad=args.pad,
        boot_spread_s=args.boot_spread, boot_budget_per_s=0.0, metrics_interval_s=3600.0,
    )
    fleet = Fleet(settings)
    await fleet.setup()
    headend = HeadEndStandIn(fleet)
    for link in fleet.links.values():
        link.client = SinkClient(headend.on_publish)  # type: ignore[assignment]
        link.up = True
    assert fleet.metrics is not None
    counters = fleet.metrics.counters
    tasks = [asyncio.create_task(fleet._committer()), asyncio.create_task(fleet._scheduler())]
    if hasattr(fleet, "_publisher"):  # the fleet before issue 10's rework: one task per segment
        tasks += [asyncio.create_task(fleet._publisher(link)) for link in fleet.links.values()]
    try:
        t0, cpu0 = time.monotonic(), time.process_time()
        while counters["associations"] < args.meters:
            await asyncio.sleep(0.1)
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"only {counters['associations']} of {args.meters} meters associated")
        boot = {"wall_s": round(time.monotonic() - t0, 2), "cpu_s": round(time.process_time() - cpu0, 2),
                "nvm_commits": counters["nvm_commits"]}
        await asyncio.sleep(args.warmup)
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
        r0, s0, c0 = counters["readings_pushed"], counters["frames_sent"], counters["nvm_commits"]
        w0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.sleep(args.duration)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - w0
        readings, sent = counters["readings_pushed"] - r0, counters["frames_sent"] - s0
        if profiler is not None:
            profiler.stop()
            Path(args.profile).write_text(profiler.output_text(unicode=False, show_all=False))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert fleet.nvm is not None
        await fleet.nvm.close()
    return {
        "meters": args.meters, "segments": len(fleet.links), "rate_offered": args.rate,
        "stamp": not args.no_stamp, "pad": args.pad,
        "boot_and_associate": boot,
        "window_s": round(wall, 2),
        "readings": readings, "readings_per_s": round(readings / wall, 1), "frames_sent": sent,
        "nvm_commits": counters["nvm_commits"] - c0,
        "cpu_s": round(cpu, 3),
        "cpu_us_per_reading": round(cpu / max(1, readings) * 1e6, 2),
        "cpu_pct": round(100 * cpu / wall, 1),
        "queue_depth": fleet._queued,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meters", type=int, default=5000)
    parser.add_argument("--per-segment", type=int, default=50, help="meters per concentrator (50: realistic)")
    parser.add_argument("--rate", type=float, default=5000.0, help="readings/s offered (ami meters --rate)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured window, wall seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="wall seconds after the last association")
    parser.add_argument("--boot-spread", type=float, default=2.0, help="wall seconds over which meters boot")
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--no-stamp", action="store_true", help="no sealed_ns in readings (loadtest stamps)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--profile", metavar="FILE", help="pyinstrument text report of the measured window")
    parser.add_argument("--data", type=Path, help="provisioned folder to reuse (default: a fresh temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        data = args.data or Path(tmp) / "data"
        if not any(data.glob("*.json*")) if data.exists() else True:
            provision(data, meters=args.meters, concentrators=max(1, args.meters // args.per_segment),
                      bus_security=False)
        gc.collect()
        if args.loop == "uvloop":
            import uvloop

            result = uvloop.run(run(args, data))
        else:
            result = asyncio.run(run(args, data))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
