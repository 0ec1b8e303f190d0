"""The meters' NVM: one fleet per segment (flock), durable on power loss, private at rest.

Two fleets serving one segment would both count from the same marks and
reuse IVs.  ``Nvm.open`` locks every segment served (and the NVM file) for
the life of the process: a second opener of an overlapping segment gets
``SegmentBusy`` before anything is read or claimed, and ``ami meters`` exits
2 with a clear message before it connects to anything.  The kernel drops the
locks when the process dies (kill -9 included).
"""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from ami.machines.meter import LAN_SEND, CounterMark
from harness import AMI, REPO, Network, wait_until
from meters.nvm import Nvm, SegmentBusy


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_overlapping_segments_are_refused_in_process(tmp_path: Path) -> None:
    folder = tmp_path / "meters"

    async def scenario() -> None:
        a = Nvm(folder / "a.db")
        await a.open(["c0001", "c0002"])
        await a.commit([("m1", "c0002", CounterMark(LAN_SEND, 4096))])
        b = Nvm(folder / "b.db")
        with pytest.raises(SegmentBusy, match="segment c0002 is already served"):
            await b.open(["c0003", "c0002"])
        same_file = Nvm(folder / "a.db")  # another fleet with the same --id, other segments
        with pytest.raises(SegmentBusy, match="a.db"):
            await same_file.open(["c0009"])
        disjoint = Nvm(folder / "b.db")  # the failed open took nothing: c0003 is free
        await disjoint.open(["c0003"])
        await disjoint.close()
        await a.close()
        # Once a is gone its segment moves, marks included.
        b = Nvm(folder / "b.db")
        await b.open(["c0002", "c0003"])
        assert (await b.load())["m1"].marks == {LAN_SEND: 4096}
        await b.close()

    asyncio.run(scenario())
    assert _mode(folder) == 0o700
    assert {p.name: _mode(p) for p in folder.iterdir()} == {p.name: 0o600 for p in folder.iterdir()}


def test_nvm_is_durable_on_power_loss(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FULL or EXTRA"):
        Nvm(tmp_path / "x.db", synchronous="NORMAL")

    async def pragmas() -> tuple:
        nvm = Nvm(tmp_path / "x.db")
        await nvm.open(["c0001"])
        got = await nvm._run(lambda: (nvm._db.execute("PRAGMA synchronous").fetchone()[0],
                                      nvm._db.execute("PRAGMA journal_mode").fetchone()[0]))
        await nvm.close()
        return got

    assert asyncio.run(pragmas()) == (2, "wal")  # 2 = FULL: the WAL is fsynced at every commit


@pytest.mark.slow
def test_a_second_fleet_on_a_served_segment_exits_before_sending(tmp_path: Path) -> None:
    net = Network(tmp_path, meters=6, concentrators=3)
    net.provision()
    net.start_broker()
    first = net.start("meters", "meters", "--segments", "c0001,c0002")

    started: list[subprocess.Popen] = []

    def fleet(ident: str, segments: str) -> subprocess.Popen:
        started.append(subprocess.Popen(AMI + ["meters", "--broker", net.broker, "--data", str(net.data), "--id",
                                               ident, "--segments", segments], cwd=REPO, env=net.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return started[-1]

    try:
        wait_until(lambda: "fleet ready" in net.log_text("meters"), 30, what="the first fleet")
        second = fleet("second", "c0003,c0002")
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 2, out
        assert "segment c0002 is already served by another fleet" in out and "fleet ready" not in out
        assert first.poll() is None  # the first fleet goes on

        third = fleet("third", "c0003")  # a disjoint segment is fine
        wait_until(lambda: third.poll() is not None or (net.data / "meters" / "third.db").exists(), 30,
                   what="the third fleet")
        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0

        first.kill()  # kill -9: the kernel releases the locks
        first.wait(10)
        fourth = fleet("fourth", "c0002")
        wait_until(lambda: fourth.poll() is not None or (net.data / "meters" / "fourth.db").exists(), 30,
                   what="the fleet after the kill")
        assert fourth.poll() is None
        fourth.send_signal(signal.SIGTERM)
        out, _ = fourth.communicate(timeout=30)
        assert fourth.returncode == 0 and "fleet ready" in out, out
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        net.kill_all()
