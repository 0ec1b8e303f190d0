"""``ami attack`` sub-commands: capture, store, hsm (``add_arguments``/``main``), and the reports' summary."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from ami.tools.attack.capture import capture, read_captures
from ami.tools.attack.hsm import hsm_attack, pkcs11_params
from ami.tools.attack.runs import store_report
from ami.tools.attack.store import read_dump, steal, without_kek
from ami.tools.attack.traffic import frames_from_records


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    from ami.runtime.service import add_common_arguments

    sub = parser.add_subparsers(dest="attack_command", required=True)
    cap = sub.add_parser("capture", help="record what a relay or broker operator sees")
    add_common_arguments(cap, config)
    cap.add_argument("--out", type=Path, required=True)
    cap.add_argument("--duration", type=float, default=10.0)
    cap.add_argument("--user", action="append", help="bus user to capture as (repeatable; default anonymous)")

    st = sub.add_parser("store", help="break a stolen head-end database")
    add_common_arguments(st, config)
    st.add_argument("--store", type=Path, required=True, help="the head-end SQLite file")
    st.add_argument("--capture", type=Path, action="append", default=[], help="capture file(s)")
    which = st.add_mutually_exclusive_group()
    which.add_argument("--kek", type=Path, help="the stolen file KEK")
    which.add_argument("--vault", help="a vault spec the attacker can use (pkcs11: on the live host)")
    which.add_argument("--no-kek", action="store_true", help="the database alone (default)")
    st.add_argument("--host-dir", type=Path, help="also search the files beside the database")
    st.add_argument("--report", type=Path, help="write the JSON report here (default stdout)")

    hsm = sub.add_parser("hsm", help="the stolen database when the KEK is in a PKCS#11 token")
    add_common_arguments(hsm, config)
    hsm.add_argument("--store", type=Path, required=True)
    hsm.add_argument("--capture", type=Path, action="append", default=[])
    hsm.add_argument("--vault", required=True, help="pkcs11:lib=...;token=...;label=...;pin_env=...")
    hsm.add_argument("--token-copy", type=Path, help="a copied token dir (see copy_token_dir)")
    hsm.add_argument("--live", action="store_true", help="also use the token with the PIN from pin_env")
    hsm.add_argument("--report", type=Path)

    cmp_ = sub.add_parser("compare", help="suite 0 and suite 1 side by side on one capture (mixed network)")
    add_common_arguments(cmp_, config)
    cmp_.add_argument("--store", type=Path, required=True, help="the head-end SQLite file")
    cmp_.add_argument("--capture", type=Path, action="append", default=[], required=True)
    cmp_.add_argument("--kek", type=Path, required=True, help="the stolen file KEK")
    cmp_.add_argument("--report", type=Path)


def main(args: argparse.Namespace, config: dict) -> int:
    if args.attack_command == "capture":
        return _capture_main(args)
    if args.attack_command == "store":
        return _store_main(args)
    if args.attack_command == "compare":
        from ami.tools.attack.compare import main_compare

        return main_compare(args)
    return _hsm_main(args)


def _capture_main(args: argparse.Namespace) -> int:
    from ami.runtime.service import run_service

    result: dict[str, Any] = {}

    async def service(stop: asyncio.Event) -> int:
        def ready() -> None:
            print(json.dumps({"event": "capturing", "out": str(args.out)}), flush=True)

        result.update(await capture(args.broker, args.data, args.out, duration=args.duration,
                                    users=args.user or [None], stop=stop, ready=ready))
        return 0

    code = run_service(service)
    print(json.dumps({"event": "captured", **result}), flush=True)
    print(f"captured {result.get('frames', 0)} frames in {result.get('messages', 0)} messages; "
          f"{result.get('bodies_decoding_as_plaintext', 0)} of {result.get('ciphered_bodies', 0)} ciphered "
          "bodies decode as plaintext (a relay holds no keys)", file=sys.stderr)
    return code


def _store_main(args: argparse.Namespace) -> int:
    vault = None
    kek = args.kek.read_bytes() if args.kek else None
    if args.vault:
        from ami.security.vault import open_vault

        vault = open_vault(args.vault, data_dir=args.data)
    try:
        report = store_report(args.store, args.capture, kek=kek, vault=vault, host_dir=args.host_dir)
    finally:
        if vault is not None:
            vault.close()
    _emit(report, args.report)
    print(human_summary(report), file=sys.stderr)
    return 0


def _hsm_main(args: argparse.Namespace) -> int:
    frames, _ = frames_from_records(read_captures(args.capture)) if args.capture else ([], Counter())
    pin = None
    if args.live:
        pin_env = pkcs11_params(args.vault).get("pin_env") or "AMI_HSM_PIN"
        pin = os.environ.get(pin_env)
        if not pin:
            print(f"--live needs the PIN in {pin_env}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="ami-dump-") as tmp:
        dump = read_dump(steal(args.store, Path(tmp)))
        report = {"without_kek": without_kek(dump, frames),
                  "hsm": hsm_attack(dump, frames, vault_spec=args.vault, token_copy=args.token_copy,
                                    live_pin=pin)}
    _emit(report, args.report)
    print(human_summary(report), file=sys.stderr)
    return 0


def _emit(report: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(report, indent=1, default=str)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


def human_summary(report: dict[str, Any]) -> str:
    lines = []
    w = report.get("without_kek")
    if w:
        b = w["blobs_as_keys"]
        lines.append(
            f"database alone: {w['meters']} meters, {w['system_titles']} system titles, "
            f"{w['key_rows']} wrapped key rows ({w['expired_key_rows']} expired) and {w['session_rows']} sessions; "
            f"{w['readings_in_clear']} readings IN CLEAR. KEK in the dump: {w['kek_in_dump']['hits']} hits; "
            f"blobs used as keys: {b['tag_verified_frames']} frames verified, "
            f"{b['keystream_decodable']}/{b['keystream_attempts']} keystream attempts decoded."
        )
    k = report.get("with_kek")
    if k:
        t = k["traffic"]
        lines.append(
            f"with the KEK: {k['keys_unwrapped']} keys unwrapped {k['keys_unwrapped_by_state']}, "
            f"{k['sessions_unwrapped']} stored sessions (current or offered); "
            f"{t['session_keys_recovered_from_aarqs']} session keys "
            f"recovered from {t['aarq_total']} captured AARQs; {t['frames_decrypted']}/{t['frames']} frames and "
            f"{t['dc_decrypted']}/{t['dc_total']} DC frames decrypted; {t['readings_decrypted']} readings, "
            f"{t['readings_under_superseded_cc_lan']} of them under a CC_LAN since replaced (no forward secrecy)."
        )
        by_suite = k.get("traffic_by_suite", {})
        if len(by_suite) > 1:
            lines.append("by suite (recorded DC frames opened, readings read): " + "; ".join(
                f"suite {s}: {t['dc_decrypted']}/{t['dc_total']}, {t['readings_decrypted']}"
                for s, t in sorted(by_suite.items())))
        if "impersonation" in k:
            i = k["impersonation"]
            lines.append(f"impersonation: {i['readings_stored']}/{i['forged_frames']} forged readings accepted by "
                         "a head-end engine loaded from the stolen store.")
        if "takeover" in k:
            o = k["takeover"]
            lines.append(f"takeover: {o['cc_lan_replaced']}/{o['meters']} meters took the attacker's CC_LAN under "
                         f"CCC; the head-end is locked out of {o['headend_locked_out']}.")
    h = report.get("host_files")
    if h:
        lines.append(f"host files: KEK found in {h['kek_found_in'] or 'nothing'}")
        if "factory_file" in h:
            t = h["factory_file"]["traffic"]
            lines.append(f"factory key file beside the database, no KEK needed: {t['frames_decrypted']}/"
                         f"{t['frames']} frames decrypted, {t['keys_learned_from_key_transfers']} new keys "
                         "followed through captured key_transfers (CCC is never reprogrammed).")
    s = report.get("hsm")
    if s:
        r = s["without_pin"]
        lines.append(f"HSM, database + token copy without the PIN: KEK hits {r['db']['hits']}"
                     f"+{r.get('token_copy_files', {}).get('hits', 0)}, PIN guesses refused "
                     f"{r.get('pin_guesses_refused')}/{r.get('pin_guesses')}: nothing usable.")
        live = s.get("live_host_with_pin")
        if live:
            a = live["after_access"]
            lines.append(f"HSM, live host with the PIN: KEK value read -> {live['kek_value_read']}, export -> "
                         f"{live['kek_export_by_wrapping']}; used to unwrap {live['use']['keys_unwrapped']} keys "
                         f"and decrypt {live['use']['frames_decrypted']} frames; after access: unwrap "
                         f"{live['after_access_unwrap']}, KEK held: {a['kek_held']}, but {a['meter_keys_kept']} "
                         f"meter keys kept still decrypt {a['frames_still_decrypted_with_kept_keys']} frames.")
    return "\n".join(lines)
