"""What suite 1 costs: CPU per association on each side, and a fleet-wide
session renewal storm, in process (the two state machines, no broker).

    .venv/bin/python bench/bench_suite1.py [--meters 2000] [--storm 100000] [--pkcs11]

For each suite, N meters associate, then renew every session at once
(``ami keys rotate --all --key session``, admission-controlled by
``max_pending_associations``); we time the head-end's engine (building and
signing AARQs, verifying AAREs, deriving keys) and the meters (verifying
AARQs, answering, deriving) separately with ``time.process_time``, as they
run in separate processes in the product.  ``--pkcs11`` signs the head-end's
AARQs in a throw-away SoftHSM2 token.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from ami.machines.headend import HeadEndEngine, Policy
from ami.machines.headend_records import KeyRow, MeterRow, Snapshot
from ami.machines.meter import CipherCache, Meter, MeterConfig, MeterKeys
from ami.protocol import KeyType, SecretBytes, suite1
from ami.protocol.keys import KeyState
from ami.protocol.messages import Batch, encode_batch
from ami.runtime.network import HEADEND_TITLE, TSP_TITLE, concentrator_id, meter_id, meter_title

SOFTHSM_LIB = os.environ.get("SOFTHSM2_LIB", "/usr/lib/softhsm/libsofthsm2.so")
T0 = 1_780_000_000.0
TYPES = (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)


class Rig:
    """N meters of one suite and a head-end, wired directly (per segment of 50)."""

    def __init__(self, n: int, suite: int, signer: suite1.Signer) -> None:
        self.now = T0
        config = MeterConfig(HEADEND_TITLE, TSP_TITLE, ciphers=CipherCache(0), counter_block=1 << 20,
                             headend_sign_public=signer.public_key_bytes(), rng=os.urandom)
        rows, keys = [], []
        self.meters: dict[str, Meter] = {}
        self.conc: dict[str, str] = {}
        for i in range(n):
            mid, title, conc = meter_id(i + 1), meter_title(i + 1), concentrator_id(i // 50 + 1)
            k = {kt: SecretBytes(secrets.token_bytes(16)) for kt in TYPES}
            meter_signer = suite1.SoftwareSigner.from_scalar(suite1.scalar_from_rng(os.urandom)) if suite else None
            rows.append(MeterRow(mid, title, conc, suite=suite,
                                 sign_public=meter_signer.public_key_bytes() if suite else None))
            keys += [KeyRow(mid, kt, 1, KeyState.ACTIVE, T0, 0, 0, k[kt]) for kt in TYPES]
            self.meters[mid] = Meter(mid, title, MeterKeys(*(k[kt] for kt in TYPES)), config, concentrator=conc,
                                     suite=suite, signer=meter_signer, boot_at=T0)
            self.conc[mid] = conc
        policy = Policy(session_max_age_s=0, max_events_per_s=10, cc_lan_ic_per_s=1e6)
        self.engine = HeadEndEngine(HEADEND_TITLE, policy, lambda: secrets.token_bytes(16), signer)
        self.engine.load(Snapshot(rows, keys, []), T0)
        self.cpu = {"headend": 0.0, "meters": 0.0}
        self.seq = 0

    def _headend(self, fn, *args):
        t0 = time.process_time()
        fn(*args)
        self.cpu["headend"] += time.process_time() - t0

    def round(self) -> int:
        """Downlink to the meters, their answers back, the engine's timers."""
        self.now += 0.05
        effects = self.engine.drain()
        up: dict[str, list] = defaultdict(list)
        t0 = time.process_time()
        for conc, frames in effects.downlink.items():
            for mid, frame in frames:
                out = self.meters[mid].on_downlink(frame, self.now)
                up[conc] += [(mid, f) for f in out.uplink]
        self.cpu["meters"] += time.process_time() - t0
        for conc, frames in up.items():
            self.seq += 1
            self._headend(self.engine.handle_batch, encode_batch(Batch(conc, self.seq, tuple(frames))), self.now,
                          conc)
        self._headend(self.engine.handle_timer, self.now)
        return sum(len(v) for v in effects.downlink.values())

    def boot(self) -> None:
        t0 = time.process_time()
        up: dict[str, list] = defaultdict(list)
        for mid, meter in self.meters.items():
            up[self.conc[mid]] += [(mid, f) for f in meter.tick(self.now).uplink]
        self.cpu["meters"] += time.process_time() - t0
        for conc, frames in up.items():
            self.seq += 1
            self._headend(self.engine.handle_batch, encode_batch(Batch(conc, self.seq, tuple(frames))), self.now,
                          conc)

    def settle(self, key: str) -> tuple[float, int]:
        """Run until ``counters[key]`` stops growing; (wall seconds, rounds)."""
        t0, rounds = time.perf_counter(), 0
        while True:
            rounds += 1
            if not self.round() and not self.engine.meters_pending and not self.engine._waiting:  # noqa: SLF001
                return time.perf_counter() - t0, rounds


def run(n: int, suite: int, signer: suite1.Signer, label: str) -> dict[str, object]:
    rig = Rig(n, suite, signer)
    rig.boot()
    rig.settle("associations")
    assert rig.engine.counters["associations"] == n, dict(rig.engine.counters)
    rig.cpu = {"headend": 0.0, "meters": 0.0}
    before = rig.engine.counters["associations"]
    rig._headend(rig.engine.command, {"op": "rotate", "key": "session", "meters": "all", "id": "storm"}, rig.now)
    wall, rounds = rig.settle("associations")
    renewed = rig.engine.counters["associations"] - before
    return {
        "case": label, "meters": n, "renewed": renewed, "rejected": sum(rig.engine.rejected.values()),
        "meter_rejected": 0,
        "headend_us": round(rig.cpu["headend"] / renewed * 1e6, 1),
        "meters_us": round(rig.cpu["meters"] / renewed * 1e6, 1),
        "wall_s_in_process": round(wall, 1),
        "parallel_s": round(max(rig.cpu.values()), 1),
    }


def softhsm_signer(tmp: Path):
    from ami.security.vault import Pkcs11KeyVault

    tokens = tmp / "tokens"
    tokens.mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", "1234",
                    "--pin", "5678"], check=True, capture_output=True)
    vault = Pkcs11KeyVault(SOFTHSM_LIB, "bench", "5678", "bench-kek")
    return vault, vault.signer()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meters", type=int, default=2000, help="meters for the per-association figures")
    parser.add_argument("--storm", type=int, default=0, help="also a renewal storm of this many suite-1 meters")
    parser.add_argument("--pkcs11", action="store_true", help="also with the head-end's key in SoftHSM2")
    args = parser.parse_args()
    file_signer = suite1.SoftwareSigner.from_scalar(suite1.scalar_from_rng(os.urandom))
    results = [run(args.meters, 0, file_signer, "suite 0"), run(args.meters, 1, file_signer, "suite 1, file key")]
    vault = None
    if args.pkcs11 and Path(SOFTHSM_LIB).is_file() and shutil.which("softhsm2-util"):
        tmp = Path(tempfile.mkdtemp(prefix="bench-s1-"))
        vault, token_signer = softhsm_signer(tmp)
        results.append(run(args.meters, 1, token_signer, "suite 1, PKCS#11 (SoftHSM2)"))
    if args.storm:
        results.append(run(args.storm, 1, file_signer, f"suite 1 storm, {args.storm} meters"))
    if vault is not None:
        vault.close()
    cols = ["case", "meters", "renewed", "rejected", "headend_us", "meters_us", "wall_s_in_process", "parallel_s"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
