"""Typed protocol errors, each with a stable reason code that services count.

A reason is a short snake_case string that never changes once published: it
is what the metrics, the monitor events and the load-test reports group by.
Messages say what was wrong with the input, never which key was involved or
what it contained: no error carries key material.
"""

from __future__ import annotations

__all__ = [
    "ALL_REASONS",
    "AssociationRejected",
    "AuthenticationFailed",
    "CounterExhausted",
    "CounterNotReserved",
    "ExpiredKey",
    "FrameTooLarge",
    "KeyLifecycleError",
    "MalformedFrame",
    "MalformedMessage",
    "MessageTooLarge",
    "ProtocolError",
    "ReplayedFrame",
    "UnknownKey",
    "UnknownMeter",
    "UnsupportedSecurity",
    "WrongSegment",
]


class ProtocolError(Exception):
    """Base of every error the core raises on bad input."""

    reason = "protocol_error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class MalformedFrame(ProtocolError):
    """The bytes are not a well-formed ciphered APDU we accept."""

    reason = "malformed_frame"


class FrameTooLarge(MalformedFrame):
    reason = "oversized_frame"


class UnsupportedSecurity(MalformedFrame):
    """Security control byte we refuse (not suite 0, compression, no tag...)."""

    reason = "unsupported_security"


class AuthenticationFailed(ProtocolError):
    """The GCM tag (or a key wrap's integrity check) did not verify."""

    reason = "auth_failed"


class ReplayedFrame(ProtocolError):
    """Invocation counter below the lowest acceptable value for this key."""

    reason = "replay"


class UnknownMeter(ProtocolError):
    reason = "unknown_meter"


class UnknownKey(ProtocolError):
    """No key (or no session) under which this frame could be opened."""

    reason = "unknown_key"


class ExpiredKey(ProtocolError):
    reason = "expired_key"


class WrongSegment(ProtocolError):
    """A relay forwarded a frame for a meter it does not serve."""

    reason = "wrong_segment"


class CounterExhausted(ProtocolError):
    """The 32-bit invocation counter of a key is used up: renew the key."""

    reason = "counter_exhausted"


class CounterNotReserved(ProtocolError):
    """A sender tried to use a counter value it has not durably reserved."""

    reason = "counter_not_reserved"


class MalformedMessage(ProtocolError):
    """The deciphered payload (or a WAN batch) is not a valid message."""

    reason = "malformed_message"


class MessageTooLarge(MalformedMessage):
    reason = "oversized_message"


class KeyLifecycleError(ProtocolError):
    """An illegal transition of the NEW -> ACTIVE -> EXPIRED lifecycle."""

    reason = "key_lifecycle"


class AssociationRejected(ProtocolError):
    """The peer answered an association request with a rejection."""

    reason = "association_rejected"


#: Every reason code, for metrics that must report zeros too.
ALL_REASONS: tuple[str, ...] = tuple(
    sorted(
        {
            cls.reason
            for cls in (
                ProtocolError,
                MalformedFrame,
                FrameTooLarge,
                UnsupportedSecurity,
                AuthenticationFailed,
                ReplayedFrame,
                UnknownMeter,
                UnknownKey,
                ExpiredKey,
                WrongSegment,
                CounterExhausted,
                CounterNotReserved,
                MalformedMessage,
                MessageTooLarge,
                KeyLifecycleError,
                AssociationRejected,
            )
        }
    )
)
