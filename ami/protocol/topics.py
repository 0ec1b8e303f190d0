"""MQTT topic names: the one place that knows how the bus is laid out.

Uplink flows meter -> relay -> head-end, downlink the other way; monitor
topics carry status, metrics and events that anyone with the monitor
credentials may read.  See docs/topics.md.
"""

from __future__ import annotations

import re

__all__ = [
    "CONTROL_REPLIES_FILTER",
    "HEADEND_COMMANDS",
    "HEADEND_EVENTS",
    "MONITOR_FILTER",
    "ROOT",
    "WAN_DOWN_FILTER",
    "WAN_UP_FILTER",
    "control_reply",
    "is_control_reply",
    "local_in",
    "local_in_filter",
    "local_out",
    "monitor_metrics",
    "monitor_status",
    "parse_local",
    "parse_plc_down",
    "parse_plc_up",
    "parse_wan",
    "plc_down",
    "plc_down_filter",
    "plc_up",
    "plc_up_filter",
    "wan_down",
    "wan_up",
]

ROOT = "ami/v1"
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _id(value: str) -> str:
    """An id must be one plain topic level: no '/', no wildcard, not empty."""
    if not _ID.fullmatch(value):
        raise ValueError(f"not a valid id for a topic level: {value!r}")
    return value


def plc_up(concentrator: str, meter: str) -> str:
    """Meter -> relay, one ciphered APDU per message (raw bytes)."""
    return f"{ROOT}/plc/{_id(concentrator)}/up/{_id(meter)}"


def plc_down(concentrator: str, meter: str) -> str:
    """Relay -> meter, one ciphered APDU per message (raw bytes)."""
    return f"{ROOT}/plc/{_id(concentrator)}/down/{_id(meter)}"


def plc_up_filter(concentrator: str) -> str:
    return f"{ROOT}/plc/{_id(concentrator)}/up/+"


def plc_down_filter(concentrator: str) -> str:
    return f"{ROOT}/plc/{_id(concentrator)}/down/+"


def wan_up(concentrator: str) -> str:
    """Relay -> head-end, msgpack batches of unchanged APDUs."""
    return f"{ROOT}/wan/{_id(concentrator)}/up"


def wan_down(concentrator: str) -> str:
    """Head-end -> relay, msgpack batches of unchanged APDUs."""
    return f"{ROOT}/wan/{_id(concentrator)}/down"


WAN_UP_FILTER = f"{ROOT}/wan/+/up"
WAN_DOWN_FILTER = f"{ROOT}/wan/+/down"
MONITOR_FILTER = f"{ROOT}/monitor/#"
HEADEND_EVENTS = f"{ROOT}/monitor/headend/events"
# Commands to the head-end (`ami keys rotate`, `ami read`); replies come back on
# the per-request reply topic the command names.
HEADEND_COMMANDS = f"{ROOT}/control/headend/commands"
CONTROL_REPLIES_FILTER = f"{ROOT}/control/replies/#"


def control_reply(request_id: str) -> str:
    return f"{ROOT}/control/replies/{_id(request_id)}"


_REPLIES = f"{ROOT}/control/replies/"


def is_control_reply(topic: str) -> bool:
    """Is ``topic`` one ``control_reply`` can name?  The head-end publishes a
    command's reply only there: a command could otherwise make it publish on
    any topic it may write (a concentrator's downlink, its own input)."""
    return topic.startswith(_REPLIES) and _ID.fullmatch(topic[len(_REPLIES):]) is not None


def monitor_status(component: str, ident: str) -> str:
    """Retained 'online'/'offline', the offline one set as the Last Will."""
    return f"{ROOT}/monitor/{_id(component)}/{_id(ident)}/status"


def monitor_metrics(component: str, ident: str) -> str:
    """Retained JSON snapshot of counters, refreshed every few seconds."""
    return f"{ROOT}/monitor/{_id(component)}/{_id(ident)}/metrics"


def parse_plc_up(topic: str) -> tuple[str, str] | None:
    """Return (concentrator, meter) for a PLC uplink topic, else None."""
    return _parse_plc(topic, "up")


def parse_plc_down(topic: str) -> tuple[str, str] | None:
    return _parse_plc(topic, "down")


def _parse_plc(topic: str, direction: str) -> tuple[str, str] | None:
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != "ami" or parts[1] != "v1" or parts[2] != "plc":
        return None
    if parts[4] != direction or not parts[3] or not parts[5]:
        return None
    return parts[3], parts[5]


def parse_wan(topic: str) -> tuple[str, str] | None:
    """Return (concentrator, 'up'|'down') for a WAN topic, else None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[:3] != ["ami", "v1", "wan"] or parts[4] not in ("up", "down"):
        return None
    if not parts[3]:
        return None
    return parts[3], parts[4]


def local_in(concentrator: str, meter: str) -> str:
    """Handheld -> meter (the optical port, not the PLC medium)."""
    return f"{ROOT}/local/{_id(concentrator)}/{_id(meter)}/in"


def local_out(concentrator: str, meter: str) -> str:
    """Meter -> handheld."""
    return f"{ROOT}/local/{_id(concentrator)}/{_id(meter)}/out"


def local_in_filter(concentrator: str) -> str:
    return f"{ROOT}/local/{_id(concentrator)}/+/in"


def parse_local(topic: str) -> tuple[str, str, str] | None:
    """Return (concentrator, meter, 'in'|'out') for a local-port topic, else None."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[:3] != ["ami", "v1", "local"] or parts[5] not in ("in", "out"):
        return None
    if not parts[3] or not parts[4]:
        return None
    return parts[3], parts[4], parts[5]
