"""What a stolen head-end store, a relay and the broker give an attacker, as
runnable evidence (docs/security.md cites these tests).

A real network (harness: amqtt broker with the provisioned ACLs, head-end,
relays, 20 meters on 2 segments, 1800x time compression, a session renewal
every 4 frames) runs while ``ami attack capture`` records the traffic as the
two relay users; half-way through every CC_LAN is reprogrammed under CCC.
Then ``ami attack store`` breaks a copy of the head-end database, first
alone, then with the file KEK that lives beside it.  A second, smaller
network runs its head-end on a SoftHSM2 token for the HSM case.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import AMI, REPO, Network, wait_until  # noqa: E402
from softhsm import requires_softhsm, softhsm_token  # noqa: E402

from ami.tools import attack  # noqa: E402
from ami.protocol.keys import KeyType, SecretBytes  # noqa: E402
from ami.protocol.messages import Reading, encode_message  # noqa: E402
from ami.runtime.network import HEADEND_TITLE, TSP_TITLE, iter_factory_keys, load_network  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

ATTACK = [sys.executable, "-m", "ami.tools.attack"]
ENV = {
    "AMI__METERS__TIME_COMPRESSION": "1800",  # one 30-min interval per wall second
    "AMI__HEADEND__SESSION_MAX_FRAMES": "4",  # a session renewal (new AARQ) every 4 frames
}
METERS, CONCENTRATORS = 20, 2


def stored_readings(net: Network) -> int:
    try:
        with closing(net.db()) as db:
            return db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    except sqlite3.Error:
        return 0  # the head-end has not created its tables yet


def start_capture(net: Network, out: Path, users: list[str]) -> subprocess.Popen:
    args = ATTACK + ["capture", "--broker", net.broker, "--data", str(net.data), "--out", str(out),
                     "--duration", "300"]
    for u in users:
        args += ["--user", u]
    proc = subprocess.Popen(args, cwd=REPO, env=net.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once every subscription is in place
    assert json.loads(line)["event"] == "capturing", line + proc.stderr.read()
    return proc


def stop_capture(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# the run: capture spanning a CC_LAN reprogramming, then the stolen store


def captured_run(tmp: Path, *, suite: str = "0") -> tuple[Network, Path, dict, int]:
    """A network run under capture, every CC_LAN reprogrammed half-way;
    (network, capture file, capture summary, readings stored before the rotation)."""
    net = Network(tmp, meters=METERS, concentrators=CONCENTRATORS, env=ENV, suite=suite)
    net.provision()
    net.start_broker()
    cap_path = tmp / "capture.msgpack"
    # Capture before anything boots, so every AARQ ever sent is on record.
    cap = start_capture(net, cap_path, [f"relay-c{n:04d}" for n in range(1, CONCENTRATORS + 1)])
    try:
        net.start("headend", "headend")
        net.start("concentrator", "concentrator")
        net.start("meters", "meters")
        wait_until(lambda: stored_readings(net) >= 3 * METERS, 40, what="readings before the rotation")
        before_rotation = stored_readings(net)
        rotate = subprocess.run(
            AMI + ["keys", "rotate", "--all", "--key", "cc_lan", "--broker", net.broker, "--data", str(net.data),
                   "--timeout", "40"],
            cwd=REPO, env=net.env, capture_output=True, text=True, timeout=60,
        )
        assert rotate.returncode == 0, rotate.stdout + rotate.stderr
        done = json.loads(rotate.stdout.strip().splitlines()[-1])
        assert done["done"] and done["total"] == METERS and done["failed"] == 0
        n = stored_readings(net)
        # Long enough for every meter to renew its session under the new CC_LAN.
        wait_until(lambda: stored_readings(net) >= n + 3 * METERS, 40, what="readings after the rotation")
        # Meters first, so every frame that reaches the store is on record.
        assert net.stop("meters") == 0
        time.sleep(1.0)
        capture_summary = stop_capture(cap)
        codes = net.stop_all()
        assert all(c == 0 for c in codes.values()), codes
    except BaseException:
        if cap.poll() is None:
            cap.kill()
        net.kill_all()
        raise
    return net, cap_path, capture_summary, before_rotation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    net, cap_path, capture_summary, before_rotation = captured_run(tmp)
    data = net.data
    proc = subprocess.run(
        ATTACK + ["store", "--store", str(data / "headend.db"), "--capture", str(cap_path),
                  "--kek", str(data / "headend.kek"), "--host-dir", str(data), "--report", str(tmp / "report.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    yield {
        "net": net,
        "data": data,
        "capture": cap_path,
        "capture_summary": capture_summary,
        "report": json.loads((tmp / "report.json").read_text()),
        "summary": proc.stderr,
        "before_rotation": before_rotation,
    }


def db_readings(data: Path) -> dict[tuple[str, int], tuple[int, int, int, int]]:
    with closing(sqlite3.connect(data / "headend.db")) as db:
        return {(m, s): (ts, e, p, u) for m, s, ts, e, p, u in
                db.execute("SELECT meter, seq, ts, energy_wh, power_w, voltage_dv FROM readings")}


# --------------------------------------------------------------------------
# a compromised relay: ciphertext only


def test_relay_capture_is_ciphertext_only(run) -> None:
    s = run["capture_summary"]
    assert s["frames"] > 100 and s["frames_up"] > 0 and s["frames_down"] > 0
    assert s["by_kind"]["aarq"] > 0 and s["by_kind"]["dc"] > 0
    assert s["meters_seen"] == METERS
    # The relay holds no keys: nothing it carries decodes as a message.
    assert s["ciphered_bodies"] == s["frames"]
    assert s["bodies_decoding_as_plaintext"] == 0
    # ACLs: a relay may not widen its view to the whole bus, only its segment.
    for user, grants in s["subscriptions"].items():
        c = user.removeprefix("relay-")
        assert not any(grants[f] for f in attack.CAPTURE_FILTERS), (user, grants)
        assert grants[f"ami/v1/plc/{c}/up/+"] and grants[f"ami/v1/wan/{c}/down"], (user, grants)
    # Not one stored reading's plaintext encoding appears anywhere in the capture.
    payloads = b"\x00".join(bytes(r["p"]) for r in attack.read_capture(run["capture"]))
    readings = db_readings(run["data"])
    assert len(readings) > 0
    for (meter, seq), (ts, e, p, u) in readings.items():
        assert encode_message(Reading(seq, ts, e, p, u)) not in payloads, (meter, seq)


# --------------------------------------------------------------------------
# the stolen database alone


def test_stolen_store_without_kek_yields_no_usable_key(run) -> None:
    w = run["report"]["without_kek"]
    assert w["meters"] == METERS and w["system_titles"] == METERS and w["concentrators"] == CONCENTRATORS
    # Every key is there, wrapped, old CC_LANs included...
    assert w["key_rows_by_type_state"]["cc_lan/expired"] == METERS
    assert w["expired_key_rows"] == METERS
    assert w["wrapped_blobs"] == w["key_rows"] + w["session_rows"] > 0
    # ...but none is usable: the KEK is not in the dump, and the blobs used
    # raw as keys verify no frame and decrypt no keystream.
    assert w["kek_in_dump"]["hits"] == 0 and w["kek_in_dump"]["distinct_windows_tried"] > 1000
    assert w["blobs_as_keys"]["tag_verified_frames"] == 0
    assert w["blobs_as_keys"]["keystream_attempts"] > 1000
    assert w["blobs_as_keys"]["keystream_decodable"] == 0
    assert w["keys_usable"] == 0 and w["frames_decrypted"] == 0


def test_stolen_store_holds_the_readings_in_clear(run) -> None:
    """Residual risk: the head-end stores readings unciphered."""
    w = run["report"]["without_kek"]
    readings = db_readings(run["data"])
    assert w["readings_in_clear"] == len(readings) > 0
    meter, seq, ts, e, p, u = w["sample_readings_in_clear"][0]
    assert readings[(meter, seq)] == (ts, e, p, u)


# --------------------------------------------------------------------------
# the stolen database with the file KEK beside it


def test_stolen_store_with_kek_unwraps_every_key_including_expired(run) -> None:
    k = run["report"]["with_kek"]
    w = run["report"]["without_kek"]
    assert k["keys_unwrapped"] == w["key_rows"]
    assert k["keys_unwrapped_by_state"]["expired"] == METERS
    assert k["sessions_unwrapped"] == w["session_rows"] > 0


def test_stolen_store_with_kek_decrypts_all_past_traffic(run) -> None:
    """No forward secrecy: the AARQs (0x21 under CC_LAN, old ones under the
    EXPIRED rows) give every session key ever transported, hence every frame."""
    t = run["report"]["with_kek"]["traffic"]
    assert t["frames"] == run["capture_summary"]["frames"]
    assert t["frames_decrypted"] == t["frames"]
    assert t["dc_total"] > 0 and t["dc_decrypted"] == t["dc_total"]
    assert t["dc_up_decrypted"] == t["dc_up_total"] > 0
    assert t["session_keys_recovered_from_aarqs"] == t["aarq_total"] > METERS
    assert t["reading_frames_decrypted"] > 0
    # Traffic sealed under sessions that a CC_LAN since replaced carried.
    assert t["readings_under_superseded_cc_lan"] >= run["before_rotation"] > 0
    assert t["messages"]["KeyTransfer"] == METERS  # the reprogramming itself, in clear


def test_decrypted_readings_are_the_stored_ones(run) -> None:
    frames, _ = attack.frames_from_records(attack.read_capture(run["capture"]))
    with tempfile.TemporaryDirectory() as tmp:
        dump = attack.read_dump(attack.steal(run["data"] / "headend.db", Path(tmp)))
        keys = attack.unwrap_dump(dump, attack.RawKekVault((run["data"] / "headend.kek").read_bytes()))
    traffic = attack.decrypt_traffic(frames, keys.ring())
    stored = db_readings(run["data"])
    assert set(stored) <= set(traffic.readings)
    assert all(traffic.readings[k] == v for k, v in stored.items())


def test_forged_reading_accepted_by_engine_loaded_from_stolen_store(run) -> None:
    """Impersonation of every meter: a reading sealed under the stored session
    (IC above anything captured) passes tag and counter checks of a
    HeadEndEngine loaded from the stolen store and is committed."""
    i = run["report"]["with_kek"]["impersonation"]
    assert i["meters_with_session"] == METERS
    assert i["forged_frames"] == i["frames_accepted"] == i["readings_stored"] == METERS
    assert i["forged_readings_in_commit"] == METERS
    assert i["frames_rejected"] == 0


def real_meter(data: Path, meter: str):
    """Lab ground truth, not attacker knowledge: the meter as the fleet left it
    (factory keys overridden by its NVM: the CC_LAN it took, its counters)."""
    from ami.machines.meter import Meter, MeterConfig, MeterKeys

    rec = next(r for r in iter_factory_keys(data) if r["meter"] == meter)
    keys = MeterKeys(*(SecretBytes(bytes.fromhex(rec[k])) for k in ("ccc", "ak", "cc_lan", "cc_locale")))
    marks: dict[str, int] = {}
    for nvm in sorted((data / "meters").glob("*.db")):  # one file per fleet process (named by its id)
        with closing(sqlite3.connect(f"file:{nvm}?mode=ro", uri=True)) as db:
            try:
                rows = list(db.execute("SELECT key_type, key FROM keys WHERE meter = ?", (meter,)))
                counters = dict(db.execute("SELECT slot, value FROM counters WHERE meter = ?", (meter,)))
            except sqlite3.Error:
                continue
        for kt, key in rows:
            keys.set(KeyType(kt), SecretBytes(key))
        marks.update(counters)
    assert marks, f"no NVM state for {meter}"
    network = load_network(data)
    return Meter(meter, network.titles[meter], keys, MeterConfig(HEADEND_TITLE, TSP_TITLE),
                 concentrator=rec["concentrator"], marks=marks)


def test_meter_accepts_attackers_key_transfer(run) -> None:
    """Takeover: with the store's CCC, AK and CC_LAN an attacker associates and
    reprograms the meter's CC_LAN; the head-end is locked out."""
    o = run["report"]["with_kek"]["takeover"]
    assert o["aarq_accepted"] == o["key_transfer_acked"] == o["cc_lan_replaced"] == METERS
    assert o["headend_locked_out"] == METERS
    # And against each real meter's state after the run (the CC_LAN it took
    # in the rotation, its persisted receive counter), using only store keys.
    data = run["data"]
    with tempfile.TemporaryDirectory() as tmp:
        dump = attack.read_dump(attack.steal(data / "headend.db", Path(tmp)))
        keys = attack.unwrap_dump(dump, attack.RawKekVault((data / "headend.kek").read_bytes()))
    for row in dump.meters:
        meter = row.meter
        victim = real_meter(data, meter)
        assert victim.keys.cc_lan != bytes.fromhex(
            next(r for r in iter_factory_keys(data) if r["meter"] == meter)["cc_lan"])  # rotated
        _model, ic = attack.meter_from_store(dump, keys, meter, HEADEND_TITLE)
        result = attack.take_over(victim, ccc=keys.active(meter, KeyType.CCC), ak=keys.active(meter, KeyType.AK),
                                  cc_lan=keys.active(meter, KeyType.CC_LAN), headend_title=HEADEND_TITLE, ic=ic)
        assert result == {"aarq_accepted": True, "key_transfer_acked": True, "meter_cc_lan_is_attackers": True,
                          "headend_locked_out": True, "attacker_reassociates": True}, (meter, result)


def test_files_beside_the_store_give_everything(run) -> None:
    """The KEK search is not vacuous: on the host it finds the KEK file.  And
    the factory key file the head-end imports at each start stays beside the
    database in clear: with it and the capture, no KEK is needed at all
    (the CCC in it is never reprogrammed, so captured key_transfers give
    every new CC_LAN)."""
    h = run["report"]["host_files"]
    assert h["kek_found_in"] == ["headend.kek"]
    t = h["factory_file"]["traffic"]
    assert t["frames_decrypted"] == t["frames"] > 0
    assert t["keys_learned_from_key_transfers"] == METERS


def test_human_summary(run) -> None:
    assert "IN CLEAR" in run["summary"] and "no forward secrecy" in run["summary"]
    assert "20/20 forged readings accepted" in run["summary"]


# --------------------------------------------------------------------------
# the HSM case: head-end KEK in a SoftHSM2 token


@requires_softhsm
def test_hsm_store_theft_without_pin_gives_nothing_and_live_use_is_not_theft(tmp_path: Path) -> None:
    with softhsm_token(tmp_path) as tok:
        spec = f"pkcs11:lib={tok['lib']};token={tok['token']};pin_env=AMI_HSM_PIN;label=ami-kek"
        env = {**ENV, "AMI__HEADEND__VAULT": spec, "AMI_HSM_PIN": str(tok["pin"])}
        # An open broker this time: the capture is the broker operator's view.
        # A mixed network: the head-end's suite-1 signing key is made in the
        # token too, and signs there (ami keys signing-key).
        net = Network(tmp_path, meters=6, concentrators=1, env=env, bus_security=False, suite="mixed")
        net.provision()
        signing = subprocess.run(AMI + ["keys", "signing-key", "--data", str(net.data), "--vault", spec],
                                 cwd=REPO, env=net.env, capture_output=True, text=True, timeout=60)
        assert signing.returncode == 0 and json.loads(signing.stdout)["changed"], signing.stdout + signing.stderr
        net.start_broker()
        cap_path = tmp_path / "capture.msgpack"
        cap = start_capture(net, cap_path, [])
        try:
            net.start("headend", "headend")
            net.start("concentrator", "concentrator")
            net.start("meters", "meters")
            wait_until(lambda: stored_readings(net) >= 30 and len(net.readings()) == 6, 40,
                       what="readings from every meter, both suites")
            operator_view = stop_capture(cap)
            codes = net.stop_all()
            assert all(c == 0 for c in codes.values()), codes
        except BaseException:
            if cap.poll() is None:
                cap.kill()
            net.kill_all()
            raise
        assert "pkcs11:" in net.log_text("headend")  # the head-end really ran on the token
        stolen = tmp_path / "stolen"
        attack.copy_token_dir(tmp_path / "softhsm-tokens", stolen)
        proc = subprocess.run(
            ATTACK + ["hsm", "--store", str(net.data / "headend.db"), "--capture", str(cap_path), "--vault", spec,
                      "--token-copy", str(stolen), "--live", "--report", str(tmp_path / "hsm.json")],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "AMI_HSM_PIN": str(tok["pin"])},
        )
        assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "hsm.json").read_text())
    # The broker operator sees every frame twice (PLC and WAN hops), all ciphertext.
    assert all(operator_view["subscriptions"]["anonymous"].values())
    assert operator_view["duplicates_dropped"] > 0 and operator_view["frames"] > 0
    assert operator_view["bodies_decoding_as_plaintext"] == 0
    # Database + copied token directory, no PIN: nothing.
    w = report["without_kek"]
    assert w["keys_usable"] == 0 and w["frames_decrypted"] == 0
    rest = report["hsm"]["without_pin"]
    assert rest["db"]["hits"] == 0 and rest["token_copy_files"]["hits"] == 0
    assert rest["pin_guesses_refused"] == rest["pin_guesses"] > 0
    assert rest["private_objects_visible_without_login"] == 0
    assert rest["keys_usable"] == 0 and rest["frames_decrypted"] == 0
    # Live host with the PIN: the KEK can be used, not read or exported...
    live = report["hsm"]["live_host_with_pin"]
    assert live["kek_attributes"] == {"extractable": False, "sensitive": True, "never_extractable": True}
    assert live["kek_value_read"] == "AttributeSensitive"
    assert live["kek_export_by_wrapping"] == "KeyUnextractable"
    assert live["use"]["keys_unwrapped"] > 0 and live["use"]["frames_decrypted"] > 0
    # Suite 1 beside it: every stored key unwrapped, and still no recorded
    # suite-1 session opens (its keys were agreed, never stored).
    by_suite = live["use"]["by_suite"]
    assert by_suite["0"]["dc_total"] > 0 and by_suite["0"]["dc_decrypted"] == by_suite["0"]["dc_total"]
    assert by_suite["1"]["dc_total"] > 0 and by_suite["1"]["dc_decrypted"] == 0
    # ...and once the access ends the token refuses; the meter keys the
    # attacker had unwrapped (in the head-end's memory) are what remains.
    assert live["after_access_unwrap"] == "refused"
    assert live["after_access"]["kek_held"] is False
    assert live["after_access"]["frames_still_decrypted_with_kept_keys"] == live["use"]["frames_decrypted"]
    # SoftHSM is software: a copy of its token plus the PIN is the KEK.
    assert report["hsm"]["token_copy_with_pin_unwraps"] is True
