"""Suite 0 and suite 1 side by side: what each attacker gets, on one capture
of one mixed network (issue 12; docs/security.md, section 10, quotes this).

A real network (embedded broker with ACLs, head-end, relays, 20 meters on 2
segments, half of them in suite 1) runs while ``ami attack capture`` records
the traffic as the two relay users; every CC_LAN is reprogrammed half-way.
Then ``ami attack compare`` runs every attack against a copy of the store,
the file KEK beside it, the head-end's suite-1 signing key file beside it,
and one compromised meter per suite.  Each cell of the table is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO  # noqa: E402
from test_attack import ATTACK, METERS, captured_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]



@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    net, cap_path, _summary, _before = captured_run(tmp_path_factory.mktemp("attack-suites"), suite="mixed")
    out = subprocess.run(
        ATTACK + ["compare", "--store", str(net.data / "headend.db"), "--capture", str(cap_path),
                  "--kek", str(net.data / "headend.kek"), "--data", str(net.data)],
        cwd=REPO, env=net.env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr


def frac(cell: str) -> tuple[int, int]:
    a, b = cell.split("/")
    return int(a), int(b)


def test_the_table_prints_both_columns(compared):
    report, stderr = compared
    print(stderr)  # the table, for docs/security.md (pytest -s)
    assert "suite 0" in stderr and "suite 1" in stderr
    assert set(report["side_by_side"]["store+KEK: recorded DC frames opened"]) == {"0", "1"}


def test_stolen_store_alone_opens_nothing_in_either_suite(compared):
    rows = compared[0]["side_by_side"]
    assert rows["store alone: keys usable"] == {"0": 0, "1": 0}
    assert all(cell.startswith("0/") for cell in rows["store alone: frames opened"].values())


def test_store_with_kek_opens_recorded_suite0_traffic_and_not_suite1(compared):
    """Forward secrecy: suite-1 AARQs carry no key, the session keys were
    agreed by ephemeral ECDH and never stored."""
    report = compared[0]
    t = report["with_kek"]["traffic_by_suite"]
    assert t["0"]["dc_total"] > 50 and t["0"]["dc_decrypted"] == t["0"]["dc_total"]
    assert t["0"]["session_keys_recovered_from_aarqs"] > 0 and t["0"]["readings_decrypted"] > 30
    assert t["1"]["dc_total"] > 50 and t["1"]["dc_decrypted"] == 0
    assert t["1"]["session_keys_recovered_from_aarqs"] == 0 and t["1"]["readings_decrypted"] == 0
    # Stored sessions (current or offered): suite-0 meters only.
    assert set(report["with_kek"]["sessions_unwrapped_by_suite"]) == {"0"}


def test_store_with_kek_forges_suite0_readings_not_suite1(compared):
    i = compared[0]["with_kek"]["impersonation"]["by_suite"]
    assert i["0"]["forged_readings_in_commit"] == i["0"]["meters"] == METERS // 2
    assert i["1"]["meters_with_stored_session"] == 0 and i["1"]["forged_readings_in_commit"] == 0


def test_store_with_kek_takes_over_suite0_meters_not_suite1(compared):
    o = compared[0]["with_kek"]["takeover"]["by_suite"]
    assert o["0"]["aarq_accepted"] == o["0"]["cc_lan_replaced"] == METERS // 2
    assert o["1"]["aarq_accepted"] == 0 and o["1"]["cc_lan_replaced"] == 0


def test_the_signing_key_file_beside_the_store_gives_suite1_meters_away(compared):
    """Honest: the head-end's signing key is worth exactly what the KEK is;
    beside the store, it hands over every suite-1 meter (use an HSM)."""
    o = compared[0]["with_headend_signing_key"]["takeover"]["by_suite"]
    assert o["1"]["aarq_accepted"] == METERS // 2


def test_a_compromised_meter_opens_its_past_traffic_in_suite0_only(compared):
    m = compared[0]["compromised_meter"]
    assert m["0"]["dc_total"] > 5 and m["0"]["dc_decrypted"] == m["0"]["dc_total"]
    assert m["1"]["dc_total"] > 5 and m["1"]["dc_decrypted"] == 0
