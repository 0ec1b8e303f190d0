"""structlog set-up: readable console lines for a person, JSON lines for machines.

The format is ``console`` or ``json``, chosen by ``configure_logging``'s
``log_format`` (the services' ``--log-format``), else the environment variable
``AMI_LOG_FORMAT``, else ``auto``: console on a terminal, JSON otherwise
(systemd, containers, log shippers).  Console output has colours only on a
terminal and without ``NO_COLOR``.

A processor before the renderer turns any ``bytes`` value into its length, so
a key that slipped into a log call shows as ``<16 bytes>`` instead of its value,
whatever the format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def _redact_bytes(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            event[key] = f"<{len(value)} bytes>"
    return event


#: Values of ``--log-format`` and ``AMI_LOG_FORMAT``.
LOG_FORMATS = ("auto", "console", "json")


def resolve_log_format(log_format: str | None = None, stream: Any = None) -> str:
    """``console`` or ``json``: the explicit choice, else ``AMI_LOG_FORMAT``, else by TTY."""
    stream = stream or sys.stderr
    choice = (log_format or os.environ.get("AMI_LOG_FORMAT") or "auto").strip().lower()
    if choice not in LOG_FORMATS:
        choice = "auto"  # a typo in the environment must not stop a service
    if choice == "auto":
        choice = "console" if _isatty(stream) else "json"
    return choice


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_logging(
    level: str = "info", *, json: bool | None = None, stream: Any = None, log_format: str | None = None
) -> None:
    """Configure structlog; ``json`` (a bool) wins over ``log_format`` (auto/console/json)."""
    stream = stream or sys.stderr
    if json is None:
        json = resolve_log_format(log_format, stream) == "json"
    if json:
        renderer: Any = structlog.processors.JSONRenderer()
    else:
        colors = _isatty(stream) and not os.environ.get("NO_COLOR")
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_bytes,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # aiomqtt/paho/amqtt log through the standard library: keep them quiet.
    logging.basicConfig(level=logging.WARNING, stream=stream)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
