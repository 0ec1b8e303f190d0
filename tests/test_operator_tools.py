"""`ami read`, `ami tsp` and `ami keys rotate` against a running network.

The handheld (TSP) opens a local association under CC_LOCALE; with a wrong
CC_LOCALE the meter refuses it (an unciphered rejected AARE) and counts the
rejection, and it keeps serving the genuine handheld afterwards.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess

import pytest

from ami.protocol.errors import AssociationRejected
from ami.protocol.keys import SecretBytes
from ami.tools.tsp import load_local_keys, tsp_session
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

        first = _ami(net, "tsp", "m000004", "--reads", "2")
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(first.stdout.strip().splitlines()) == 2

        # Counter reservations of the handheld are durable and only grow.
        marks = json.loads((net.data / "tsp" / "counters.json").read_text())
        assert marks["m000004/cc_locale/1"] > 0

        # A handheld with a wrong CC_LOCALE is refused...
        version, _cc_locale, ak = asyncio.run(load_local_keys(net.data, {}, "m000004"))
        with pytest.raises(AssociationRejected):
            asyncio.run(tsp_session(net.broker, net.data, "m000004", cc_locale=SecretBytes(secrets.token_bytes(16)),
                                    ak=ak, key_version=version, timeout=10))
        wait_until(lambda: sum((monitor.json(net.topic("meters", "metrics")) or {}).get("rejected", {}).values())
                   >= 1, 10, what="the meter to count the refused handheld")

        # ...and after reprogramming CC_LOCALE under CCC, the old key is useless,
        # the new one (from the head-end's store) works.
        rotate = _ami(net, "keys", "rotate", "--meter", "m000004", "--key", "cc_locale")
        assert rotate.returncode == 0, rotate.stdout + rotate.stderr
        assert json.loads(rotate.stdout.strip().splitlines()[-1])["done"]
        with pytest.raises(AssociationRejected):
            asyncio.run(tsp_session(net.broker, net.data, "m000004", cc_locale=_cc_locale, ak=ak,
                                    key_version=version, timeout=10))
        again = _ami(net, "tsp", "m000004")
        assert again.returncode == 0, again.stdout + again.stderr
        new_marks = json.loads((net.data / "tsp" / "counters.json").read_text())
        assert new_marks["m000004/cc_locale/2"] > 0
    finally:
        monitor.close()
        net.kill_all()
