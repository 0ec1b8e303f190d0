"""ami.runtime.mqtt, the hot paths' MQTT 3.1.1 client: its parser fuzzed (bounded,
never anything but ProtocolViolation on garbage), and the client against both
brokers the project runs on (the embedded amqtt and a private Mosquitto)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ami.runtime import mqtt
from ami.runtime.bus import free_port
from harness import AMI, wait_port

# --- the sans-I/O codec ------------------------------------------------------------------------


def test_publish_packets_round_trip() -> None:
    for qos in (0, 1):
        packet = mqtt.publish_packet(b"ami/v1/plc/c0001/up/m000001", b"\x01" * 300, qos, False, 7 if qos else 0)
        frames, used = mqtt.split_frames(packet)
        assert used == len(packet) and len(frames) == 1
        topic, payload, got_qos, pid = mqtt.parse_publish(*frames[0])
        assert (topic, payload, got_qos, pid) == ("ami/v1/plc/c0001/up/m000001", b"\x01" * 300, qos, 7 if qos else 0)


@given(st.lists(st.binary(max_size=300), max_size=5), st.integers(1, 7))
def test_split_frames_reassembles_any_chunking(payloads, cut) -> None:
    stream = b"".join(mqtt.publish_packet(b"t/x", p, 1, False, i + 1) for i, p in enumerate(payloads))
    got, buf = [], b""
    for i in range(0, len(stream), cut):
        buf += stream[i : i + cut]
        frames, used = mqtt.split_frames(buf)
        buf = buf[used:]
        got += [mqtt.parse_publish(h, b)[1] for h, b in frames]
    assert got == payloads and buf == b""


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_garbage_raises_only_protocol_violation(data) -> None:
    try:
        frames, used = mqtt.split_frames(data, max_packet=1024)
        assert 0 <= used <= len(data)
        for header, body in frames:
            if header >> 4 == 3:
                mqtt.parse_publish(header, body)
    except mqtt.ProtocolViolation:
        pass


def test_oversized_and_overlong_lengths_are_refused() -> None:
    with pytest.raises(mqtt.ProtocolViolation):
        mqtt.split_frames(b"\x30\xff\xff\xff\xff\x01", max_packet=1 << 30)  # 5-byte remaining length
    with pytest.raises(mqtt.ProtocolViolation):
        mqtt.split_frames(b"\x30" + mqtt.encode_length(2000), max_packet=1000)


def test_topic_matches() -> None:
    assert mqtt.topic_matches("a/b/c", "a/+/c") and mqtt.topic_matches("a/b/c", "a/#")
    assert not mqtt.topic_matches("a/b", "a/b/c") and not mqtt.topic_matches("a/b/c", "a/+")


# --- against real brokers ------------------------------------------------------------------------


async def _exercise(port: int) -> None:
    received: list[tuple[str, bytes]] = []
    got_all = asyncio.Event()
    sub = mqtt.Client("127.0.0.1", port, identifier="t-sub")

    def on_message(topic: str, payload: bytes) -> None:
        received.append((topic, payload))
        if len(received) == 500:
            got_all.set()

    sub.on_message = on_message
    async with sub:
        await sub.subscribe("t/#", qos=1)
        will = mqtt.Will("t/status", b"offline", 1, False)
        pub = mqtt.Client("127.0.0.1", port, identifier="t-pub", will=will, keepalive=5)
        async with pub:
            acked = []
            for i in range(500):
                pub.publish_nowait(f"t/{i % 7}", os.urandom(81) if i else b"first", 1, acked.append)
            await asyncio.wait_for(got_all.wait(), 20)
            await pub.publish("t/last", b"x", qos=1)  # the awaitable form
            assert len(acked) == 500 and all(e is None for e in acked)
        assert received[0] == ("t/0", b"first")
        # A client that vanishes without DISCONNECT: its Last Will is published.
        dead = mqtt.Client("127.0.0.1", port, identifier="t-dead", will=will, keepalive=5)
        await dead.__aenter__()
        dead._conn.transport.abort()
        await asyncio.sleep(1.0)
        assert ("t/status", b"offline") in received[-3:]
        with pytest.raises(mqtt.MqttError):
            dead.publish_nowait("t/x", b"", 1)


@pytest.mark.timeout(60)
def test_against_the_embedded_amqtt_broker(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen(AMI + ["broker", "--broker", f"mqtt://127.0.0.1:{port}", "--no-auth", "--data",
                                   str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        asyncio.run(_exercise(port))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.mosquitto
@pytest.mark.timeout(60)
def test_against_mosquitto(tmp_path) -> None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        pytest.skip("no mosquitto binary")
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        asyncio.run(_exercise(port))
    finally:
        proc.terminate()
        proc.wait(10)


def test_refused_login_is_an_mqtt_error(tmp_path) -> None:
    # Nothing listens on port 1: connecting fails as an MqttError (the link reconnects on those).
    async def body() -> None:
        with pytest.raises(mqtt.MqttError):
            async with mqtt.Client("127.0.0.1", 1, timeout=2):
                pass

    asyncio.run(body())


assert sys.version_info >= (3, 11)
