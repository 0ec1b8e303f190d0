"""Overload without collapse, in CI: a small topology offered several times its
capacity, with a mass boot, for a few seconds; after the load drops and the
drain, nothing pushed is lost and nothing genuine was rejected.

Not a timed benchmark (docs/benchmarks.md has the figures): it asserts the
behaviour, whatever this machine's capacity is.  The embedded amqtt broker
carries a few thousand readings/s end to end on a 2-vCPU machine; the fleet
is asked for 10,000/s (it pushes what it can; the rest of each interval's
readings wait in the meters' load curves), every meter boots at once, and
the window opens while they associate.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from harness import AMI, REPO


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_overload_with_a_mass_boot_loses_nothing_and_rejects_nothing(tmp_path):
    report = tmp_path / "r.json"
    out = subprocess.run(
        AMI + ["loadtest", "--meters", "1000", "--rate", "10000", "--duration", "4", "--mass-boot",
               "--drain", "15", "--quiet", "--workdir", str(tmp_path / "runs"), "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=140,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(report.read_text())
    assert r["config"]["concentrators"] == 20  # the realistic topology: 50 meters per concentrator
    assert r["config"]["mass_boot"] is True
    f = r["frames"]
    assert f["run"]["pushed"] > 0 and f["accepted"] > 0
    assert f["rejected"] == 0, f["rejected_by_reason"]
    assert f["run"]["relay_rejected"] == {} and f["run"]["fleet_rejected"] == {}, f["run"]
    assert f["lost"] == 0, (f, r["control"], r["notes"])
    assert f["run"]["stored"] >= f["run"]["pushed"]
    assert "recovery_s" in r  # seconds until every reading was stored with no gap left (None: not within --drain)
    # Every budget and deferral is counted (and the boots went through the budget).
    control = r["control"]
    assert {"fleet.boots_deferred", "fleet.gap_fill_replies_shed", "relays.control_shed",
            "headend.inbox_dropped", "headend.association_timeouts"} <= set(control)
    assert control["fleet.boot_events"] >= 1000
    # Bounded memory: no process grew past a few hundred MB on 1,000 meters.
    assert all(p["rss_max_bytes"] < 400e6 for p in r["processes"]), r["processes"]
