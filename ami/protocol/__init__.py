"""The sans-I/O core: frames, keys, counters, messages and topic names.

No sockets, no asyncio, no files, no clock and no randomness of its own:
callers hand in bytes, keys, counters and time, and get bytes or typed
errors back.  Everything else in the project drives these functions.
"""

from __future__ import annotations

import importlib
from typing import Any

# The front door: what a caller needs to seal, open and route a frame.  Every
# other public name lives in its submodule (ami.protocol.frames, .association,
# .keys, .counters, .messages, .errors, .topics), each with its own __all__.
# This dict is the one list: __all__ and the lazy loader below both read it.
#
# Names are loaded on first use (PEP 562): a process that only parses frames
# or batches (the blind relay) never imports the cipher or `cryptography`.
_EXPORTS: dict[str, str] = {
    "Batch": "messages",
    "KeyType": "keys",
    "Opener": "channel",
    "ProtocolError": "errors",
    "ReceiveCounter": "counters",
    "Sealer": "channel",
    "SecretBytes": "keys",
    "SendCounter": "counters",
    "Suite0Cipher": "cipher",
    "decode_batch": "messages",
    "decode_message": "messages",
    "encode_batch": "messages",
    "encode_message": "messages",
    "open_apdu": "frames",
    "parse_apdu": "frames",
    "seal_apdu": "frames",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ami.protocol' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
