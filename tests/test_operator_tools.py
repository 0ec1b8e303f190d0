"""`ami read`, `ami tsp`, `ami keys handheld` and `ami keys rotate` against a running network.

The handheld (TSP) opens a local association under CC_LOCALE; with a wrong
CC_LOCALE the meter refuses it (an unciphered rejected AARE) and counts the
rejection, and it keeps serving the genuine handheld afterwards.  The
handheld runs only on its own material (`ami keys handheld`): a meter not
loaded is refused cleanly, and a handheld host without the head-end's store
and KEK works.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys

import pytest

from ami.protocol.errors import AssociationRejected
from ami.protocol.keys import SecretBytes
from ami.tools.handheld import read_local_keys
from ami.tools.tsp import tsp_session
from harness import AMI, REPO, Network, wait_until

pytestmark = pytest.mark.slow

ENV = {"AMI__METERS__TIME_COMPRESSION": "1800", "AMI__MONITOR__METRICS_INTERVAL_S": "0.5"}


def _ami(net: Network, *args: str) -> subprocess.CompletedProcess:
    """Run `ami <command...> --broker ... --data ... <args>` (`keys rotate` is two words)."""
    words = 2 if args[0] == "keys" else 1
    return subprocess.run(
        AMI + [*args[:words], "--broker", net.broker, "--data", str(net.data), *args[words:]],
        cwd=REPO, env=net.env, capture_output=True, text=True, timeout=60,
    )


def test_read_tsp_and_rotation(tmp_path):
    net = Network(tmp_path, meters=10, concentrators=2, env=ENV)
    net.provision()
    net.start_all()
    monitor = net.collector()
    try:
        wait_until(lambda: (monitor.json(net.topic("headend", "metrics")) or {}).get("counters", {})
                   .get("associations", 0) >= 10, 30, what="associations")

        read = _ami(net, "read", "m000003")
        assert read.returncode == 0, read.stdout + read.stderr
        body = json.loads(read.stdout)
        assert body["meter"] == "m000003" and body["energy_wh"] > 0 and 200 < body["voltage_v"] < 260

        unknown = _ami(net, "read", "m999999")
        assert unknown.returncode == 1 and "unknown meter" in unknown.stdout

        # The handheld holds nothing until loaded on the central system.
        unloaded = _ami(net, "tsp", "m000004")
        assert unloaded.returncode == 1 and json.loads(unloaded.stdout)["error"] == "meter_not_loaded", unloaded.stdout
        load = _ami(net, "keys", "handheld", "--meter", "m000004", "--meter", "m000005")
        assert load.returncode == 0 and json.loads(load.stdout)["loaded"] == 2, load.stdout + load.stderr

        first = _ami(net, "tsp", "m000004", "--reads", "2")
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(first.stdout.strip().splitlines()) == 2

        # Counter reservations of the handheld are durable, inside its range, and only grow.
        keys = read_local_keys(net.data / "tsp", "m000004")
        marks = json.loads((net.data / "tsp" / "counters.json").read_text())
        assert keys.ic_start < marks["m000004/cc_locale/1"] <= keys.ic_end

        # A meter of another round is refused cleanly, before anything is sent.
        other = _ami(net, "tsp", "m000003")
        assert other.returncode == 1 and json.loads(other.stdout)["error"] == "meter_not_loaded", other.stdout

        # A handheld host: network.json, its bus identity and its own folder,
        # no head-end store nor KEK; and the run never imports the head-end.
        host = tmp_path / "handheld-host"
        host.mkdir(mode=0o700)
        shutil.copy2(net.data / "network.json", host / "network.json")
        shutil.copytree(net.data / "bus", host / "bus")
        shutil.copytree(net.data / "tsp", host / "tsp")
        assert not any(p.name.startswith("headend") for p in host.iterdir())
        code = ("import sys; from ami.cli import main; rc = main(sys.argv[1:]); "
                "bad = [m for m in sys.modules if m.split('.')[0] == 'headend' or m.startswith('ami.security.vault')]; "
                "print(bad, file=sys.stderr); sys.exit(rc or (3 if bad else 0))")
        remote = subprocess.run([sys.executable, "-c", code, "tsp", "--broker", net.broker, "--data", str(host),
                                 "m000005"], cwd=REPO, env=net.env, capture_output=True, text=True, timeout=60)
        assert remote.returncode == 0, remote.stdout + remote.stderr
        assert json.loads(remote.stdout)["meter"] == "m000005"

        # A handheld with a wrong CC_LOCALE is refused...
        version, _cc_locale, ak = keys.cc_locale_version, keys.cc_locale, keys.ak
        with pytest.raises(AssociationRejected):
            asyncio.run(tsp_session(net.broker, net.data, "m000004", cc_locale=SecretBytes(secrets.token_bytes(16)),
                                    ak=ak, key_version=version, timeout=10))
        wait_until(lambda: sum((monitor.json(net.topic("meters", "metrics")) or {}).get("rejected", {}).values())
                   >= 1, 10, what="the meter to count the refused handheld")

        # ...and after reprogramming CC_LOCALE under CCC, the old key is useless
        # (the handheld must be reloaded), the new one works.
        rotate = _ami(net, "keys", "rotate", "--meter", "m000004", "--key", "cc_locale")
        assert rotate.returncode == 0, rotate.stdout + rotate.stderr
        assert json.loads(rotate.stdout.strip().splitlines()[-1])["done"]
        stale = _ami(net, "tsp", "m000004")
        assert stale.returncode == 1 and json.loads(stale.stdout)["error"] == "association_rejected", stale.stdout
        reload = _ami(net, "keys", "handheld", "--meter", "m000004")
        assert reload.returncode == 0, reload.stdout + reload.stderr
        again = _ami(net, "tsp", "m000004")
        assert again.returncode == 0, again.stdout + again.stderr
        new_marks = json.loads((net.data / "tsp" / "counters.json").read_text())
        assert new_marks["m000004/cc_locale/2"] > 0
    finally:
        monitor.close()
        net.kill_all()
