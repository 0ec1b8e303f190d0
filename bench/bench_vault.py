"""Wrap/unwrap throughput of the key vault backends.

    .venv/bin/python bench/bench_vault.py [--n 20000]

The file backend runs in-process with cryptography.  The PKCS#11 backend
runs on a throw-away SoftHSM2 token (own temp dir and softhsm2.conf), so the
figures include the single-worker-thread hop that every PKCS#11 call takes.
Results go to stdout as a small table; see docs/vault.md.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ami.security.vault import FileKeyVault, KeyVault, Pkcs11KeyVault, key_identity

SOFTHSM_LIB = os.environ.get("SOFTHSM2_LIB", "/usr/lib/softhsm/libsofthsm2.so")


def rate(n: int, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def measure(vault: KeyVault, n: int) -> dict[str, float]:
    keys = [secrets.token_bytes(16) for _ in range(n)]
    ids = [key_identity(f"m{i:07d}", "cc_lan", 1) for i in range(n)]  # each key bound to its row
    wrapped: list[bytes] = []
    res = {"wrap/s": rate(n, lambda: wrapped.extend(vault.wrap(k, i) for k, i in zip(keys, ids)))}
    res["unwrap/s"] = rate(n, lambda: [vault.unwrap(w, i) for w, i in zip(wrapped, ids)])
    res["unwrap_many/s"] = rate(n, lambda: vault.unwrap_many(wrapped, ids))

    # 8 caller threads at once: what a busy async head-end would see.
    per = n // 8

    def worker(i: int) -> None:
        for j in range(i * per, (i + 1) * per):
            vault.unwrap(wrapped[j], ids[j])

    with ThreadPoolExecutor(max_workers=8) as pool:
        res["unwrap/s 8 thr"] = rate(per * 8, lambda: list(pool.map(worker, range(8))))
    assert vault.unwrap_many(wrapped[:100], ids[:100]) == keys[:100]
    return res


def softhsm_vault(tmp: Path) -> Pkcs11KeyVault:
    tokens = tmp / "tokens"
    tokens.mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench",
         "--so-pin", "1234", "--pin", "5678"],
        check=True, capture_output=True,
    )
    return Pkcs11KeyVault(SOFTHSM_LIB, "bench", "5678", "bench-kek")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="keys per measurement")
    args = parser.parse_args()

    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with FileKeyVault(Path(tmp) / "kek") as fv:
            rows.append(("file", measure(fv, args.n)))
        if Path(SOFTHSM_LIB).is_file() and shutil.which("softhsm2-util"):
            with softhsm_vault(Path(tmp)) as hv:
                rows.append(("pkcs11 (SoftHSM2)", measure(hv, args.n)))
        else:
            sys.stderr.write("SoftHSM2 not installed: skipping the PKCS#11 backend\n")

    cols = list(rows[0][1])
    out = [f"n={args.n} keys of 16 bytes, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
           f"{'backend':<20}" + "".join(f"{c:>16}" for c in cols)]
    out += [f"{name:<20}" + "".join(f"{r[c]:>16,.0f}" for c in cols) for name, r in rows]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
