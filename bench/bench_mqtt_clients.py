"""CPU per MQTT message of the candidate clients for the hot paths.

    .venv/bin/python bench/bench_mqtt_clients.py                       # private Mosquitto, 50,000 messages
    .venv/bin/python bench/bench_mqtt_clients.py --broker mqtt://127.0.0.1:1884 --clients ami,aiomqtt

For each client, on uvloop, QoS 1, 81-byte payloads (a stamped reading):

* **publish**: one connection publishes ``--messages`` with up to 128
  unacknowledged (the fleet's window); CPU of this process (user + system,
  ``time.process_time``) per message, and the wall rate;
* **receive**: one connection subscribed to ``bench/#`` at QoS 1 receives
  ``--messages`` published by another process (``ami.runtime.mqtt``, the
  cheapest publisher, so the receiver is what is measured); CPU per message
  of the receiving process from the first message to the last.

Clients: ``aiomqtt`` (as ``ami.runtime.bus.make_client`` builds it),
``gmqtt`` (if installed; ``version=MQTTv311``; its window through a
``persistent_storage`` subclass, its only per-PUBACK hook) and ``ami``
(``ami.runtime.mqtt``, the project's asyncio.Protocol client).  A benchmark,
not a test: nothing asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import uvloop

from ami.runtime import mqtt
from ami.runtime.bus import free_port, make_client, port_open

PAYLOAD = os.urandom(81)
WINDOW = 128


async def _pub_ami(host: str, port: int, n: int) -> None:
    client = mqtt.Client(host, port, identifier=f"bench-pub-{os.getpid()}")
    async with client:
        room = asyncio.Semaphore(WINDOW)

        def done(_error: BaseException | None) -> None:
            room.release()

        for i in range(n):
            await room.acquire()
            client.publish_nowait(f"bench/{i % 100}", PAYLOAD, 1, done)
        for _ in range(WINDOW):
            await room.acquire()


async def publish_aiomqtt(host: str, port: int, n: int) -> None:
    client = make_client(f"mqtt://{host}:{port}", user=None, max_inflight=WINDOW)
    client.pending_calls_threshold = WINDOW + 16
    async with client:
        room = asyncio.Semaphore(WINDOW)
        tasks: set[asyncio.Task] = set()

        async def one(topic: str) -> None:
            try:
                await client.publish(topic, PAYLOAD, qos=1)
            finally:
                room.release()

        for i in range(n):
            await room.acquire()
            task = asyncio.ensure_future(one(f"bench/{i % 100}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        for _ in range(WINDOW):
            await room.acquire()


async def publish_gmqtt(host: str, port: int, n: int) -> None:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311
    from gmqtt.storage import PersistentStorage

    room = asyncio.Semaphore(WINDOW)

    class Acked(PersistentStorage):
        def remove_message_by_mid(self, mid):  # noqa: ANN001 - gmqtt's signature
            super().remove_message_by_mid(mid)
            room.release()

    client = gmqtt.Client(f"bench-gmqtt-{os.getpid()}", persistent_storage=Acked())
    await client.connect(host, port, version=MQTTv311)
    for i in range(n):
        await room.acquire()
        client.publish(f"bench/{i % 100}", PAYLOAD, qos=1)
    for _ in range(WINDOW):
        await room.acquire()
    await client.disconnect()


async def receive(kind: str, host: str, port: int, n: int) -> tuple[float, float]:
    """(CPU s, wall s) of receiving ``n`` messages with client ``kind``."""
    got = 0
    first: list[tuple[float, float]] = []
    finished = asyncio.get_running_loop().create_future()

    def on_one() -> None:
        nonlocal got
        if not got:
            first.append((time.process_time(), time.perf_counter()))
        got += 1
        if got == n and not finished.done():
            finished.set_result((time.process_time(), time.perf_counter()))

    async def run_publisher() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_pub", "--host", host, "--port", str(port), "--messages", str(n))
        await proc.wait()

    if kind == "ami":
        client = mqtt.Client(host, port, identifier=f"bench-sub-{os.getpid()}")
        client.on_message = lambda _t, _p: on_one()
        async with client:
            await client.subscribe("bench/#", qos=1)
            pub = asyncio.create_task(run_publisher())
            end = await finished
            await pub
    elif kind == "aiomqtt":
        client = make_client(f"mqtt://{host}:{port}", user=None)
        async with client:
            await client.subscribe("bench/#", qos=1)
            pub = asyncio.create_task(run_publisher())
            async for _message in client.messages:
                on_one()
                if finished.done():
                    break
            end = finished.result()
            await pub
    else:
        import gmqtt
        from gmqtt.mqtt.constants import MQTTv311

        client = gmqtt.Client(f"bench-gsub-{os.getpid()}")
        client.on_message = lambda *_a, **_k: on_one() or 0
        await client.connect(host, port, version=MQTTv311)
        client.subscribe("bench/#", qos=1)
        await asyncio.sleep(0.3)
        pub = asyncio.create_task(run_publisher())
        end = await finished
        await pub
        await client.disconnect()
    return end[0] - first[0][0], end[1] - first[0][1]


async def bench(kinds: list[str], host: str, port: int, n: int) -> list[dict]:
    rows = []
    for kind in kinds:
        publish = {"aiomqtt": publish_aiomqtt, "gmqtt": publish_gmqtt, "ami": _pub_ami}[kind]
        await publish(host, port, min(n, 2000))  # warm-up
        c0, w0 = time.process_time(), time.perf_counter()
        await publish(host, port, n)
        pub_cpu, pub_wall = time.process_time() - c0, time.perf_counter() - w0
        rcv_cpu, rcv_wall = await receive(kind, host, port, n)
        rows.append({
            "client": kind, "messages": n,
            "publish_us_per_msg": round(pub_cpu / n * 1e6, 1), "publish_msgs_per_s": round(n / pub_wall),
            "receive_us_per_msg": round(rcv_cpu / n * 1e6, 1), "receive_msgs_per_s": round(n / rcv_wall),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_pub"])
    parser.add_argument("--broker", help="mqtt://host:port (default: a private Mosquitto on a free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--clients", default="aiomqtt,gmqtt,ami")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.mode == "_pub":
        uvloop.run(_pub_ami(args.host, args.port, args.messages))
        return 0
    kinds = [k for k in args.clients.split(",") if k]
    if "gmqtt" in kinds:
        try:
            import gmqtt  # noqa: F401
        except ImportError:
            print("gmqtt not installed (pip install 'gmqtt>=0.8,<0.9'): skipped", file=sys.stderr)
            kinds.remove("gmqtt")
    broker = None
    folder = tempfile.mkdtemp(prefix="bench-mqtt-")
    try:
        if args.broker:
            url = mqtt_url = args.broker.split("://")[-1]
            host, port = url.rsplit(":", 1)[0], int(mqtt_url.rsplit(":", 1)[1])
        else:
            host, port = "127.0.0.1", free_port()
            conf = os.path.join(folder, "mosquitto.conf")
            with open(conf, "w") as fh:
                fh.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                         "max_queued_messages 1000000\nmax_inflight_messages 0\nset_tcp_nodelay true\n")
            broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not port_open(host, port) and time.monotonic() < deadline:
                time.sleep(0.05)
        rows = uvloop.run(bench(kinds, host, port, args.messages))
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'client':10} {'publish us/msg':>15} {'publish msg/s':>14} {'receive us/msg':>15} {'receive msg/s':>14}")
    for r in rows:
        print(f"{r['client']:10} {r['publish_us_per_msg']:>15} {r['publish_msgs_per_s']:>14} "
              f"{r['receive_us_per_msg']:>15} {r['receive_msgs_per_s']:>14}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": os.uname().machine, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
