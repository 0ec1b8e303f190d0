"""``ami provision``: play the manufacturer and the utility's provisioning system.

Writes into the output folder:

* ``factory-keys.jsonl``: one JSON object per meter with the fields
  ``meter``, ``system_title``, ``concentrator``, ``ccc``, ``ak``, ``cc_lan``,
  ``cc_locale`` (hex).  The meters load it as their factory memory; the
  head-end imports it into its store (wrapped under its KEK) at start.
  Created 0600: it is a file of secrets.
* ``network.json``: the topology (which meters sit on which concentrator's
  PLC segment) and the system titles of the head-end and the handheld.
* ``bus/``: MQTT credentials, ACLs and TLS material for amqtt and Mosquitto
  (``ami.bus_auth``).

Randomness comes from ``secrets``; nothing here is deterministic on purpose.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

FACTORY_FILE = "factory-keys.jsonl"
NETWORK_FILE = "network.json"
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
    )


def iter_factory_keys(data_dir: Path):
    """Yield the factory records (dicts of hex strings) one by one."""
    with open(Path(data_dir) / FACTORY_FILE, encoding="ascii") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def provision(out_dir: Path, meters: int, concentrators: int, *, bus_security: bool = True) -> Network:
    if meters < 1 or concentrators < 1 or concentrators > meters:
        raise ValueError("need at least one meter per concentrator")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / FACTORY_FILE).exists():
        raise FileExistsError(f"{out_dir / FACTORY_FILE} exists: provision into a new folder")
    segments: dict[str, list[str]] = {concentrator_id(c + 1): [] for c in range(concentrators)}
    names = list(segments)
    lines = []
    titles: dict[str, bytes] = {}
    for i in range(meters):
        n = i + 1
        conc = names[i * concentrators // meters]  # contiguous blocks, as on a feeder
        mid = meter_id(n)
        segments[conc].append(mid)
        titles[mid] = meter_title(n)
        lines.append(
            json.dumps(
                {
                    "meter": mid,
                    "system_title": titles[mid].hex(),
                    "concentrator": conc,
                    "ccc": secrets.token_hex(16),
                    "ak": secrets.token_hex(16),
                    "cc_lan": secrets.token_hex(16),
                    "cc_locale": secrets.token_hex(16),
                }
            )
        )
    _write_private(out_dir / FACTORY_FILE, "\n".join(lines) + "\n")
    network = {
        "headend_system_title": HEADEND_TITLE.hex(),
        "tsp_system_title": TSP_TITLE.hex(),
        "segments": segments,
        "system_titles": {m: t.hex() for m, t in titles.items()},
    }
    (out_dir / NETWORK_FILE).write_text(json.dumps(network, indent=1))
    if bus_security:
        from .bus_auth import write_bus_security

        write_bus_security(out_dir, names)
    return load_network(out_dir)
