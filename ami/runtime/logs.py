"""structlog set-up: JSON lines by default, readable console output on a TTY.

A last processor turns any ``bytes`` value into its length, so a key that
slipped into a log call shows as ``<16 bytes>`` instead of its value.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _redact_bytes(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            event[key] = f"<{len(value)} bytes>"
    return event


def configure_logging(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
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
