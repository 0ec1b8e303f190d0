"""The sans-I/O core: frames, keys, counters, messages and topic names.

No sockets, no asyncio, no files, no clock and no randomness of its own:
callers hand in bytes, keys, counters and time, and get bytes or typed
errors back.  Everything else in the project drives these functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are loaded on first use (PEP 562): a process that only parses frames
# or batches (the blind relay) never imports the cipher or `cryptography`.
_EXPORTS: dict[str, str] = {
    "ALL_REASONS": "errors",
    "Aare": "association",
    "Aarq": "association",
    "AssociationRejected": "errors",
    "AuthenticationFailed": "errors",
    "Batch": "messages",
    "CipheredApdu": "frames",
    "CounterExhausted": "errors",
    "CounterNotReserved": "errors",
    "Event": "messages",
    "ExpiredKey": "errors",
    "FrameTooLarge": "errors",
    "GENERAL_DED_CIPHERING": "frames",
    "GENERAL_GLO_CIPHERING": "frames",
    "GLO_INITIATE_REQUEST": "frames",
    "GLO_INITIATE_RESPONSE": "frames",
    "GapFillReply": "messages",
    "GapFillRequest": "messages",
    "IC_LIMIT": "counters",
    "InitiateRequest": "association",
    "InitiateResponse": "association",
    "KeyId": "keys",
    "KeyLifecycleError": "errors",
    "KeySlot": "keys",
    "KeyState": "keys",
    "KeyTransfer": "messages",
    "KeyTransferAck": "messages",
    "KeyType": "keys",
    "MAX_APDU_SIZE": "frames",
    "MalformedFrame": "errors",
    "MalformedMessage": "errors",
    "Message": "messages",
    "MessageTooLarge": "errors",
    "Opener": "channel",
    "ProtocolError": "errors",
    "REPROGRAMMABLE": "keys",
    "ReadReply": "messages",
    "ReadRequest": "messages",
    "Reading": "messages",
    "ReceiveCounter": "counters",
    "Release": "messages",
    "ReplayedFrame": "errors",
    "SC_AUTH": "cipher",
    "SC_AUTH_ENC": "cipher",
    "Sealer": "channel",
    "SecretBytes": "keys",
    "SecuritySetup": "keys",
    "SendCounter": "counters",
    "Suite0Cipher": "cipher",
    "TAG_LEN": "cipher",
    "TRANSFER_TARGET": "keys",
    "UnknownKey": "errors",
    "UnknownMeter": "errors",
    "UnsupportedSecurity": "errors",
    "WrongSegment": "errors",
    "build_aare": "association",
    "build_aarq": "association",
    "decode_batch": "messages",
    "decode_initiate_request": "association",
    "decode_initiate_response": "association",
    "decode_key_transfer": "keys",
    "decode_message": "messages",
    "encode_apdu": "frames",
    "encode_batch": "messages",
    "encode_initiate_request": "association",
    "encode_initiate_response": "association",
    "encode_key_transfer": "keys",
    "encode_message": "messages",
    "key_type_for": "keys",
    "open_apdu": "frames",
    "parse_aare": "association",
    "parse_aarq": "association",
    "parse_apdu": "frames",
    "seal_apdu": "frames",
    "unwrap_key": "keys",
    "wrap_key": "keys",
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


if TYPE_CHECKING:  # pragma: no cover
    from .association import Aare, Aarq, InitiateRequest, InitiateResponse, build_aare, build_aarq, decode_initiate_request, decode_initiate_response, encode_initiate_request, encode_initiate_response, parse_aare, parse_aarq  # noqa: F401
    from .channel import Opener, Sealer  # noqa: F401
    from .cipher import SC_AUTH, SC_AUTH_ENC, Suite0Cipher, TAG_LEN  # noqa: F401
    from .counters import IC_LIMIT, ReceiveCounter, SendCounter  # noqa: F401
    from .errors import ALL_REASONS, AssociationRejected, AuthenticationFailed, CounterExhausted, CounterNotReserved, ExpiredKey, FrameTooLarge, KeyLifecycleError, MalformedFrame, MalformedMessage, MessageTooLarge, ProtocolError, ReplayedFrame, UnknownKey, UnknownMeter, UnsupportedSecurity, WrongSegment  # noqa: F401
    from .frames import CipheredApdu, GENERAL_DED_CIPHERING, GENERAL_GLO_CIPHERING, GLO_INITIATE_REQUEST, GLO_INITIATE_RESPONSE, MAX_APDU_SIZE, encode_apdu, open_apdu, parse_apdu, seal_apdu  # noqa: F401
    from .keys import KeyId, KeySlot, KeyState, KeyType, REPROGRAMMABLE, SecretBytes, SecuritySetup, TRANSFER_TARGET, decode_key_transfer, encode_key_transfer, key_type_for, unwrap_key, wrap_key  # noqa: F401
    from .messages import Batch, Event, GapFillReply, GapFillRequest, KeyTransfer, KeyTransferAck, Message, ReadReply, ReadRequest, Reading, Release, decode_batch, decode_message, encode_batch, encode_message  # noqa: F401
