"""``ami attack capture``: what a compromised relay or broker operator sees.

Subscribes to the PLC and WAN topics (as each bus user, or anonymously),
records every message, and summarises the capture: frames by kind, and
proof that none of their ciphered bodies decodes as plaintext.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack

from ami.tools.attack.traffic import (
    body_of,
    decodes_as_plaintext,
    frames_from_records,
    kind_of,
)

#: What a relay or broker operator would like to read: every PLC and WAN topic.
CAPTURE_FILTERS = ("ami/v1/plc/+/up/+", "ami/v1/plc/+/down/+", "ami/v1/wan/#")


def capture_filters(user: str | None) -> list[str]:
    """The broad filters, plus the PLC/WAN filters ``user`` is granted (a relay
    may not subscribe to ``plc/+/up/+``, only to its own segment)."""
    filters = list(CAPTURE_FILTERS)
    if user:
        from ami.security.bus_acl import permissions

        perms = permissions(user)
        for f in perms.subscribe if perms else ():
            if f.startswith(("ami/v1/plc/", "ami/v1/wan/")) and f not in filters:
                filters.append(f)
    return filters


async def capture(
    broker: str,
    data_dir: Path | None,
    out: Path,
    *,
    duration: float,
    users: Iterable[str | None] = (None,),
    stop: asyncio.Event | None = None,
    ready: Any = None,
) -> dict[str, Any]:
    """Record every PLC/WAN message ``users`` may read until ``duration`` or ``stop``."""
    from ami.runtime.bus import make_client

    stop = stop or asyncio.Event()
    users = list(users) or [None]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    granted: dict[str, dict[str, bool]] = {}
    subscribed = 0
    fh = open(out, "wb")

    async def one(user: str | None) -> None:
        nonlocal subscribed
        name = user or "anonymous"
        client = make_client(broker, user=user, data_dir=data_dir, identifier=f"ami-attack-{secrets.token_hex(4)}")
        async with client:
            granted[name] = {}
            for f in capture_filters(user):
                result = await client.subscribe(f, qos=1)
                codes = list(result) if isinstance(result, (list, tuple)) else [result]
                granted[name][f] = all(_granted(c) for c in codes)
            subscribed += 1
            if subscribed == len(users) and ready is not None:
                ready()
            async for message in client.messages:
                payload = message.payload
                if not isinstance(payload, (bytes, bytearray)):
                    payload = b"" if payload is None else str(payload).encode()
                fh.write(msgpack.packb({"t": time.time(), "u": name, "topic": message.topic.value,
                                        "p": bytes(payload)}, use_bin_type=True))
                fh.flush()

    tasks = [asyncio.create_task(one(u)) for u in users]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({*tasks, stopper}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                raise t.exception()
    finally:
        for t in (*tasks, stopper):
            t.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
        fh.close()
    summary = capture_summary(read_capture(out))
    summary["subscriptions"] = granted
    return summary


def _granted(code: Any) -> bool:
    """The SUBACK answer (amqtt refuses a forbidden filter with 0x80; Mosquitto
    grants it and filters each delivery instead, so there it reads True)."""
    value = getattr(code, "value", code)
    try:
        return int(value) < 0x80
    except (TypeError, ValueError):
        return not getattr(code, "is_failure", False)


def read_capture(path: Path | str) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        return list(msgpack.Unpacker(fh, raw=False, strict_map_key=False))


def read_captures(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for p in paths:
        records += read_capture(p)
    return sorted(records, key=lambda r: r["t"])


def capture_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    frames, stats = frames_from_records(records)
    kinds = Counter(kind_of(f.data) for f in frames)
    bodies = [b for b in (body_of(f.data) for f in frames) if b is not None]
    return {
        "messages": stats["messages"],
        "wan_batches": stats["batches"],
        "frames": len(frames),
        "frames_up": sum(1 for f in frames if f.direction == "up"),
        "frames_down": sum(1 for f in frames if f.direction == "down"),
        "duplicates_dropped": stats["duplicate_frames"],
        "by_kind": dict(sorted(kinds.items())),
        "ciphered_bodies": len(bodies),
        "bodies_decoding_as_plaintext": sum(1 for b in bodies if decodes_as_plaintext(b)),
        "meters_seen": len({f.meter for f in frames}),
        "concentrators_seen": sorted({f.concentrator for f in frames}),
        "in_clear": "topics (meter ids), system titles, invocation counters, sizes, timing, "
        "rejected AAREs (unciphered by design)",
    }
