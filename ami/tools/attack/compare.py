"""``ami attack compare``: suite 0 and suite 1 side by side, on one capture
of one mixed network.

Each row is an attacker; each column the meters of one suite; each cell what
that attacker gets against those meters, counted on the same captured traffic
and the same stolen files:

* the stolen store alone;
* the store with the KEK (file beside it, or an HSM used on the live host):
  recorded traffic opened, readings forged, meters taken over;
* the same plus the head-end's suite-1 signing key, when it is a file beside
  the store (with a PKCS#11 vault it stays in the token);
* one compromised meter of each suite (its NVM and factory keys): its own
  recorded traffic opened.

Every number comes from running the attack (ami/tools/attack/*), never from
a table: tests/test_attack_suites.py checks each cell.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from typing import Any

from ami.protocol.keys import KeyType, SecretBytes
from ami.runtime.network import iter_factory_keys, load_network
from ami.security.signing import load_headend_signer
from ami.tools.attack.traffic import Frame, KeyRing, decrypt_traffic

__all__ = ["compromised_meters", "side_by_side", "table"]

_TYPES = (KeyType.CCC, KeyType.AK, KeyType.CC_LAN, KeyType.CC_LOCALE)


def _nvm_keys(data_dir: Path) -> dict[str, dict[KeyType, bytes]]:
    """What a meter's NVM holds (keys received by key_transfer), per meter."""
    out: dict[str, dict[KeyType, bytes]] = defaultdict(dict)
    for path in sorted((Path(data_dir) / "meters").glob("*.db")):
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            for meter, key_type, key in db.execute("SELECT meter, key_type, key FROM keys"):
                out[meter][KeyType(key_type)] = bytes(key)
    return out


def compromised_meters(data_dir: Path, frames: list[Frame], suite_of: dict[str, int]) -> dict[str, Any]:
    """For the first meter of each suite: open the recorded traffic with
    everything that meter holds (factory keys, keys received since)."""
    nvm = _nvm_keys(data_dir)
    factory = {r["meter"]: r for r in iter_factory_keys(data_dir)}
    out: dict[str, Any] = {}
    for suite in sorted(set(suite_of.values())):
        meter = min(m for m, s in suite_of.items() if s == suite)
        ring = KeyRing()
        for kt in _TYPES:
            ring.add_global(meter, kt, SecretBytes(bytes.fromhex(factory[meter][kt.value])), "factory",
                            superseded=kt in nvm.get(meter, {}))
            if kt in nvm.get(meter, {}):
                ring.add_global(meter, kt, SecretBytes(nvm[meter][kt]), "nvm")
        mine = [f for f in frames if f.meter == meter]
        result = decrypt_traffic(mine, ring)
        out[str(suite)] = {"meter": meter, **result.by_suite({meter: suite})[str(suite)]}
    return out


def side_by_side(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cells of the table, from a ``store_report`` with the KEK plus the
    ``compromised_meter`` and ``with_headend_signing_key`` parts."""
    w, k = report["without_kek"], report.get("with_kek", {})
    suites = sorted(k.get("traffic_by_suite", {"0": {}}))
    rows: dict[str, dict[str, Any]] = {}
    rows["store alone: frames opened"] = {s: f"0/{k['traffic_by_suite'][s]['frames']}" if k else "0"
                                         for s in suites}
    rows["store alone: keys usable"] = {s: w["blobs_as_keys"]["tag_verified_frames"] for s in suites}
    if k:
        t = k["traffic_by_suite"]
        rows["store+KEK: session keys from recorded AARQs"] = {
            s: f"{t[s]['session_keys_recovered_from_aarqs']}/{t[s]['aarq_total']}" for s in suites}
        rows["store+KEK: recorded DC frames opened"] = {s: f"{t[s]['dc_decrypted']}/{t[s]['dc_total']}" for s in suites}
        rows["store+KEK: recorded readings read"] = {s: t[s]["readings_decrypted"] for s in suites}
        if "impersonation" in k:
            i = k["impersonation"]["by_suite"]
            rows["store+KEK: forged readings stored"] = {
                s: f"{i[s]['forged_readings_in_commit']}/{i[s]['meters']}" for s in suites}
        if "takeover" in k:
            o = k["takeover"]["by_suite"]
            rows["store+KEK: meters taken over"] = {s: f"{o[s]['aarq_accepted']}/{o[s]['meters']}" for s in suites}
    signed = report.get("with_headend_signing_key")
    if signed:
        o = signed["takeover"]["by_suite"]
        rows["+ head-end signing key file: meters taken over"] = {
            s: f"{o[s]['aarq_accepted']}/{o[s]['meters']}" for s in suites}
    meters = report.get("compromised_meter")
    if meters:
        rows["one compromised meter: its recorded DC frames opened"] = {
            s: f"{meters[s]['dc_decrypted']}/{meters[s]['dc_total']}" for s in suites if s in meters}
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    suites = sorted({s for cells in rows.values() for s in cells})
    head = ["attacker and what it gets"] + [f"suite {s}" for s in suites]
    lines = [head] + [[name] + [str(cells.get(s, "")) for s in suites] for name, cells in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*lines[0]), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines[1:]]
    return "\n".join(out)


def compare_report(db: Path, captures: list[Path], data_dir: Path, *, kek: bytes | None = None,
                   vault: Any = None, vault_spec: str = "file:headend.kek") -> dict[str, Any]:
    """Run every attack of the table and return the report (JSON-able)."""
    from ami.tools.attack.capture import read_captures
    from ami.tools.attack.runs import store_report
    from ami.tools.attack.store import read_dump, steal
    from ami.tools.attack.traffic import frames_from_records
    from ami.tools.attack.with_kek import RawKekVault, takeover_all, unwrap_dump
    from ami.tools.attack.traffic import headend_title_from
    import tempfile

    network = load_network(data_dir)
    report = store_report(db, captures, kek=kek, vault=vault, headend_sign_public=network.headend_sign_public)
    frames, _ = frames_from_records(read_captures(captures))
    with tempfile.TemporaryDirectory(prefix="ami-dump-") as tmp:
        dump = read_dump(steal(db, Path(tmp)))
        suite_of = {m.meter: m.suite for m in dump.meters}
        signer = None if vault_spec.startswith("pkcs11:") else load_headend_signer(None, data_dir)
        if signer is not None and (kek is not None or vault is not None):
            keys = unwrap_dump(dump, RawKekVault(kek) if kek is not None else vault)
            report["with_headend_signing_key"] = {"takeover": takeover_all(
                dump, keys, headend_title_from(frames), headend_sign_public=network.headend_sign_public,
                headend_signer=signer)}
    report["compromised_meter"] = compromised_meters(data_dir, frames, suite_of)
    report["side_by_side"] = side_by_side(report)
    return report


def main_compare(args: Any) -> int:
    import sys

    kek = args.kek.read_bytes() if args.kek else None
    report = compare_report(args.store, args.capture, args.data, kek=kek)
    text = json.dumps(report, indent=1, default=str)
    if args.report:
        Path(args.report).write_text(text)
    else:
        print(text)
    print(table(report["side_by_side"]), file=sys.stderr)
    return 0
