"""Who may say what on the MQTT bus: the identities and the ACL table.

The table below is the single source of truth, built from the topic builders
of ami.protocol.topics.  `acl_allows` evaluates it directly (the amqtt plugins
in ami.broker.plugins call it); ami.security.bus_files renders it into the
files each broker reads.  See docs/bus-security.md.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ami.protocol.topics import ROOT

Action = Literal["publish", "subscribe"]

# Segment ids end up inside topic filters, so anything that is a topic
# separator or wildcard ('/', '+', '#') must never get through.
_SEGMENT_ID = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


# Per-segment identities: "{c}" is the concentrator id taken from the user name.
_SEGMENT_ROLES: dict[str, Permissions] = {
    # All meters of one PLC segment share one connection (and one identity).
    "plc": Permissions(
        publish=(f"{ROOT}/plc/{{c}}/up/+", f"{ROOT}/local/{{c}}/+/out"),
        subscribe=(f"{ROOT}/plc/{{c}}/down/+", f"{ROOT}/local/{{c}}/+/in"),
    ),
    "relay": Permissions(
        publish=(f"{ROOT}/plc/{{c}}/down/+", f"{ROOT}/wan/{{c}}/up"),
        subscribe=(f"{ROOT}/plc/{{c}}/up/+", f"{ROOT}/wan/{{c}}/down"),
    ),
}

_FIXED_ROLES: dict[str, Permissions] = {
    "meters": Permissions(publish=(f"{ROOT}/monitor/meters/#",), subscribe=()),
    "concentrator": Permissions(publish=(f"{ROOT}/monitor/concentrator/#",), subscribe=()),
    "headend": Permissions(
        publish=(f"{ROOT}/wan/+/down", f"{ROOT}/monitor/headend/#", f"{ROOT}/control/replies/#"),
        subscribe=(f"{ROOT}/wan/+/up", f"{ROOT}/control/headend/commands"),
    ),
    "operator": Permissions(
        publish=(f"{ROOT}/control/headend/commands",),
        subscribe=(f"{ROOT}/control/replies/#", f"{ROOT}/monitor/#"),
    ),
    "tsp": Permissions(publish=(f"{ROOT}/local/+/+/in",), subscribe=(f"{ROOT}/local/+/+/out",)),
    "monitor": Permissions(publish=(), subscribe=(f"{ROOT}/monitor/#",)),
}

FIXED_USERS: tuple[str, ...] = tuple(_FIXED_ROLES)


def check_segment_id(concentrator: str) -> str:
    if not _SEGMENT_ID.fullmatch(concentrator):
        raise ValueError(f"invalid concentrator id {concentrator!r}")
    return concentrator


def bus_users(concentrators: Iterable[str]) -> list[str]:
    """Every identity a network with these concentrators needs."""
    users: list[str] = []
    for c in concentrators:
        check_segment_id(c)
        users += [f"plc-{c}", f"relay-{c}"]
    return users + list(FIXED_USERS)


def permissions(user: str) -> Permissions | None:
    """The table row for `user`, with the segment filled in; None if unknown."""
    if user in _FIXED_ROLES:
        return _FIXED_ROLES[user]
    role, sep, c = user.partition("-")
    if not sep or role not in _SEGMENT_ROLES or not _SEGMENT_ID.fullmatch(c):
        return None
    row = _SEGMENT_ROLES[role]
    return Permissions(
        publish=tuple(f.format(c=c) for f in row.publish),
        subscribe=tuple(f.format(c=c) for f in row.subscribe),
    )


def _valid_filter(levels: list[str]) -> bool:
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_covers(allowed: str, requested: str) -> bool:
    """True if every topic matched by `requested` is also matched by `allowed`.

    A concrete topic is a filter matching only itself, so this is also plain
    topic matching.  Unlike amqtt's own ACL matcher, an allowed '+' does not
    cover a requested '#' (that would widen a one-level grant to a subtree).
    """
    a_levels, r_levels = allowed.split("/"), requested.split("/")
    if not _valid_filter(r_levels):
        return False
    for i, a in enumerate(a_levels):
        if a == "#":
            return True  # '#' also matches its parent level, so a shorter request is fine
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return False  # a subtree request is only covered by '#'
        if a != "+" and a != r:
            return False  # literal must match literally; a requested '+' needs an allowed '+'
    return len(r_levels) == len(a_levels)


@functools.lru_cache(maxsize=65536)  # called per message by the amqtt plugin
def acl_allows(user: str, action: Action, topic: str) -> bool:
    """Whether `user` may publish to `topic`, or subscribe to the filter `topic`."""
    perms = permissions(user) if user else None
    if perms is None or not topic:
        return False
    if action == "publish":
        if "+" in topic or "#" in topic:
            return False  # wildcards are never valid in a PUBLISH topic
        filters = perms.publish
    elif action == "subscribe":
        filters = perms.subscribe
    else:
        raise ValueError(f"unknown action {action!r}")
    return any(filter_covers(f, topic) for f in filters)


# --------------------------------------------------------------------------
# Generated files
