"""Head-end cold start with N meters' keys (docs/benchmarks.md, "Load tests").

Provisions N meters into a temporary folder, then starts the head-end engine
(``HeadEndService.start_engine``: open the vault and the store, import the
factory keys, load every meter, key and session) twice, as ``ami headend``
does before it connects to the bus:

* first start: the store is empty, so every factory key is wrapped under the
  KEK and imported (what a new deployment pays once);
* restart: the keys are already in the store (what a restart pays).

The figure is the head-end's own ``cold_start_s`` gauge (it also logs it).

    .venv/bin/python bench/bench_headend_cold_start.py --meters 100000 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ami.runtime.config import load_config  # noqa: E402
from ami.tools.provision import provision  # noqa: E402
from headend.service import HeadEndService  # noqa: E402


async def start_once(config: dict, data: Path) -> dict:
    svc = HeadEndService(config, "mqtt://127.0.0.1:1", data)  # never connects
    await svc.start_engine()
    out = {
        "cold_start_s": svc.metrics.gauges["cold_start_s"],
        "meters": len(svc.engine.meters),
        "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
    }
    await svc.store.close()
    svc.vault.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=100_000)
    parser.add_argument("--concentrators", type=int, default=100)
    parser.add_argument("--target", type=float, default=10.0, help="seconds; exit 1 if the restart is slower")
    parser.add_argument("--json", help="write the figures here ('-' for stdout)")
    args = parser.parse_args()
    from ami.runtime.logs import configure_logging

    configure_logging("warning")
    tmp = Path(tempfile.mkdtemp(prefix="ami-coldstart-"))
    try:
        t0 = time.perf_counter()
        provision(tmp / "data", args.meters, args.concentrators, bus_security=False)
        provisioned = time.perf_counter() - t0
        config = load_config()
        first = asyncio.run(start_once(config, tmp / "data"))
        restart = asyncio.run(start_once(config, tmp / "data"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"meters": args.meters, "provision_s": round(provisioned, 2), "first_start": first, "restart": restart,
              "target_s": args.target}
    print(f"{args.meters:,} meters: first start (imports the factory keys) {first['cold_start_s']:.2f} s, "
          f"restart {restart['cold_start_s']:.2f} s (target <= {args.target} s), "
          f"RSS after load {restart['rss_bytes'] / 1e6:,.0f} MB")
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if max(first["cold_start_s"], restart["cold_start_s"]) <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
