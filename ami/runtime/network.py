"""A provisioned network as every service reads it: topology, system titles, factory keys.

``ami provision`` (ami.tools.provision) writes these files; services only read
them, so the read side lives here, below the services and the tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FACTORY_FILE = "factory-keys.jsonl"
NETWORK_FILE = "network.json"
#: Suite 1: each suite-1 meter's private signing key (the fleet's file: the
#: head-end never reads it).  The head-end's own: ami.security.signing.
METER_SIGN_FILE = "meter-sign-keys.jsonl"
#: System titles: 3 manufacturer letters + 5-byte serial (DLMS).
METER_MANUFACTURER = b"SAG"
HEADEND_TITLE = b"ENE" + bytes(5)
TSP_TITLE = b"TSP" + (1).to_bytes(5, "big")


def meter_id(n: int) -> str:
    return f"m{n:06d}"


def concentrator_id(n: int) -> str:
    return f"c{n:04d}"


def meter_title(n: int) -> bytes:
    return METER_MANUFACTURER + n.to_bytes(5, "big")


@dataclass(frozen=True, slots=True)
class Network:
    """What `network.json` holds: topology and system titles (no secrets)."""

    headend_title: bytes
    tsp_title: bytes
    segments: dict[str, list[str]]  # concentrator -> meter ids
    titles: dict[str, bytes]  # meter id -> system title
    #: Suite 1: the head-end's public signing key (X || Y), installed in meters.
    headend_sign_public: bytes | None = None

    @property
    def concentrators(self) -> list[str]:
        return list(self.segments)

    def concentrator_of(self) -> dict[str, str]:
        return {m: c for c, ms in self.segments.items() for m in ms}


def load_network(data_dir: Path) -> Network:
    raw = json.loads((Path(data_dir) / NETWORK_FILE).read_text())
    return Network(
        headend_title=bytes.fromhex(raw["headend_system_title"]),
        tsp_title=bytes.fromhex(raw["tsp_system_title"]),
        segments={c: list(ms) for c, ms in raw["segments"].items()},
        titles={m: bytes.fromhex(t) for m, t in raw["system_titles"].items()},
        headend_sign_public=bytes.fromhex(raw["headend_sign_public"]) if raw.get("headend_sign_public") else None,
    )


def iter_factory_keys(data_dir: Path):
    """Yield the factory records (dicts of hex strings) one by one."""
    with open(Path(data_dir) / FACTORY_FILE, encoding="ascii") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def load_meter_sign_keys(data_dir: Path) -> dict[str, bytes]:
    """Suite-1 meters' private signing scalars (meter id -> 32 bytes), for the
    fleet; empty when the network has no suite-1 meter."""
    path = Path(data_dir) / METER_SIGN_FILE
    if not path.exists():
        return {}
    out = {}
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                out[record["meter"]] = bytes.fromhex(record["sign_private"])
    return out
