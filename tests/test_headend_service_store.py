"""The head-end service and its store (issue 9): a second head-end on one
store exits before sending anything; a fenced commit publishes nothing; the
inbox is bounded, commands first, and a flood loses no reading for good."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from ami.machines.headend import Effects
from ami.machines.headend_records import Commit
from ami.protocol import topics
from headend.service import EXIT_STORE_REFUSED, HeadEndService, Inbox
from headend.store_api import Fenced
from harness import RecordingClient

try:
    from tests.sim import Network, Sim
except ImportError:
    from sim import Network, Sim

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("svc") / "data"
    subprocess.run([sys.executable, "-m", "ami.cli", "provision", "--meters", "3", "--concentrators", "1",
                    "--out", str(out), "--no-bus-security"], check=True, cwd=REPO, capture_output=True)
    return out


def test_a_second_headend_on_the_same_store_exits_before_sending(data_dir: Path) -> None:
    async def body() -> int:
        first = HeadEndService({}, "mqtt://127.0.0.1:1", data_dir)
        await first.start_engine()
        try:
            second = HeadEndService({}, "mqtt://127.0.0.1:1", data_dir)
            # Refused at start, before any connection to the (absent) broker.
            return await asyncio.wait_for(second.run(asyncio.Event()), 30)
        finally:
            await first.store.close()
            first.vault.close()

    assert asyncio.run(body()) == EXIT_STORE_REFUSED


class _Engine:
    """Drains effects that would be published: frames, a reply, an event."""

    counters: dict = {}
    publish_pending = True  # HeadEndEngine's: something to publish, so the round commits now
    readings_pending = 1
    latencies_pending = 0

    def tick(self, now: float) -> None:
        pass

    def drain(self) -> Effects:
        return Effects(Commit(readings=[("m000001", 1, 1, 1, 1, 1, 1.0)]), {"c0001": [("m000001", b"frame")]},
                       [(topics.monitor_status("x", "y"), {"ok": True})], [{"kind": "boot", "meter": "m000001"}], [])


def test_a_fenced_commit_publishes_nothing(data_dir: Path) -> None:
    async def body() -> None:
        zombie = HeadEndService({}, "mqtt://127.0.0.1:1", data_dir)
        await zombie.start_engine()
        try:
            zombie.engine = _Engine()
            client = RecordingClient()
            await zombie._round(client, 1.0)
            assert len(client.published) == 3  # the control: this round does publish
            # Another head-end takes the store over (the lock file was removed).
            zombie.store.lock_path.unlink()
            thief = HeadEndService({}, "mqtt://127.0.0.1:1", data_dir)
            await thief.start_engine()
            try:
                client.published.clear()
                with pytest.raises(Fenced):
                    await zombie._round(client, 2.0)
                assert client.published == []
            finally:
                await thief.store.close()
                thief.vault.close()
        finally:
            await zombie.store.close()
            zombie.vault.close()

    asyncio.run(body())


def _message(topic: str, n: int) -> aiomqtt.Message:
    return aiomqtt.Message(topic, str(n).encode(), 1, False, n, None)


def test_the_inbox_is_bounded_and_serves_commands_first(data_dir: Path) -> None:
    service = HeadEndService({"headend": {"inbox_max": 5}}, "mqtt://127.0.0.1:1", data_dir)
    for n in range(100):  # a WAN flood
        service._enqueue(_message(topics.wan_up("c0001"), n))
    service._enqueue(_message(topics.HEADEND_COMMANDS, 1000))  # an operator command after it
    assert len(service._inbox.wan) == 5 and service._inbox.dropped == 95
    assert service._inbox.commands_dropped == 0
    assert service._inbox.pop().payload == b"1000"  # the command first, then the oldest WAN messages
    assert [service._inbox.pop().payload for _ in range(5)] == [str(n).encode() for n in range(5)]
    service.engine = type("E", (), {"counters": {}, "rejected": {}, "meters": {}, "meters_pending": 0,
                                    "meters_with_gaps": 0, "gap_fill_in_flight": 0, "association_window": 64})()
    assert service._snapshot()["counters"]["inbox_dropped"] == 95


class _Flood(Network):
    """Every step, the WAN batches go through the head-end's Inbox with room
    for ``room``: the rest is dropped, as a flooded head-end drops them."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.dropped = 0
        self.on = True

    def batches(self, sim, batches):
        if not self.on:
            return batches
        inbox = Inbox(self.room)
        for item in batches:
            inbox.put(item, command=False)
        self.dropped += inbox.dropped
        return [inbox.pop() for _ in range(len(inbox))]


def test_a_flooded_inbox_loses_no_reading_for_good() -> None:
    """Real meters and engine (the in-memory simulator): while flooded, most
    WAN batches are dropped; once the flood ends, gap-fill brings back every
    reading the meters pushed, and nothing was rejected."""
    flood = _Flood(room=1)
    sim = Sim(8, 4, network=flood)
    sim.run(6 * sim.interval_s, dt=5.0)
    assert flood.dropped > 10  # (19 since the meters back off their boot announcements)
    assert sim.reading_problems()  # the flood did leave holes...
    flood.on = False
    sim.settle()
    sim.assert_readings()  # ...and gap-fill filled every one of them
    sim.assert_clean()
