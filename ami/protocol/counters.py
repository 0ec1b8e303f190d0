"""Invocation counters: never reuse one as a sender, never go back as a receiver.

Sender side (``SendCounter``): every value handed out lies below a high-water
mark that the caller has already made durable.  After a crash the caller
restarts from the persisted mark, so values used before the crash are never
used again; at worst a block of never-used values is skipped.  The protocol:

    if counter.wants_reservation:
        mark = counter.next_reservation()
        persist(mark)                      # fsync / commit BEFORE using it
        counter.confirm_reservation(mark)
    ic = counter.take()

``wants_reservation`` turns true while half a block is still left, so a
service can persist in the background without ever stalling a send.

Receiver side (``ReceiveCounter``): the DLMS lowest-acceptable-value rule.
``check`` before opening, ``accept`` only after the tag verified, so a forged
frame with a huge counter can never block genuine traffic.
"""

from __future__ import annotations

from .errors import CounterExhausted, CounterNotReserved, ReplayedFrame

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_RENEW_AT",
    "IC_LIMIT",
    "ReceiveCounter",
    "SendCounter",
]

IC_LIMIT = 1 << 32  # first value that does not fit the 32-bit IC field
DEFAULT_BLOCK = 1024
#: Renew a key well before its counter runs out (configurable per service).
DEFAULT_RENEW_AT = 0xF000_0000


class SendCounter:
    """The invocation counter of one sender under one key."""

    __slots__ = ("_next", "_reserved_until", "block", "renew_at")

    def __init__(
        self,
        persisted_mark: int = 0,
        *,
        block: int = DEFAULT_BLOCK,
        renew_at: int = DEFAULT_RENEW_AT,
    ) -> None:
        """``persisted_mark``: the durable high-water mark (0 for a new key).

        Every value below it may have been used before a crash, so counting
        restarts there and nothing is reserved until the caller persists more.
        """
        if not 0 <= persisted_mark <= IC_LIMIT:
            raise ValueError("persisted mark outside the 32-bit range")
        if block < 1:
            raise ValueError("block must be positive")
        self._next = persisted_mark
        self._reserved_until = persisted_mark
        self.block = block
        self.renew_at = renew_at

    def __repr__(self) -> str:
        return f"<SendCounter next={self._next} reserved_until={self._reserved_until}>"

    @property
    def next_value(self) -> int:
        return self._next

    @property
    def reserved_until(self) -> int:
        return self._reserved_until

    @property
    def available(self) -> int:
        """Values that may be used right now without persisting anything."""
        return self._reserved_until - self._next

    @property
    def wants_reservation(self) -> bool:
        """True once half a block or less is left (and more can be had)."""
        return self._reserved_until < IC_LIMIT and self.available <= self.block // 2

    @property
    def needs_renewal(self) -> bool:
        """The key should be replaced: its counter crossed the threshold."""
        return self._next >= self.renew_at

    @property
    def exhausted(self) -> bool:
        return self._next >= IC_LIMIT

    def next_reservation(self, count: int | None = None) -> int:
        """The high-water mark to persist for a further block of values."""
        if self._reserved_until >= IC_LIMIT:
            raise CounterExhausted("no counter values left under this key")
        return min(self._reserved_until + (count or self.block), IC_LIMIT)

    def confirm_reservation(self, mark: int) -> None:
        """Declare ``mark`` durable: values below it may now be used."""
        if mark > IC_LIMIT:
            raise ValueError("mark beyond the 32-bit range")
        if mark > self._reserved_until:
            self._reserved_until = mark

    def take(self) -> int:
        """Hand out the next counter value, once, ever."""
        value = self._next
        if value >= IC_LIMIT:
            raise CounterExhausted("invocation counter exhausted: renew the key")
        if value >= self._reserved_until:
            raise CounterNotReserved("no durable reservation covers the next counter")
        self._next = value + 1
        return value


class ReceiveCounter:
    """Lowest acceptable invocation counter of one sender under one key."""

    __slots__ = ("lowest_acceptable",)

    def __init__(self, lowest_acceptable: int = 0) -> None:
        self.lowest_acceptable = lowest_acceptable

    def __repr__(self) -> str:
        return f"<ReceiveCounter lowest_acceptable={self.lowest_acceptable}>"

    def check(self, invocation_counter: int) -> None:
        """Raise ``ReplayedFrame`` if this counter was (or could have been) seen."""
        if invocation_counter < self.lowest_acceptable:
            raise ReplayedFrame(
                f"invocation counter {invocation_counter} below lowest acceptable {self.lowest_acceptable}"
            )

    def accept(self, invocation_counter: int) -> None:
        """Move past ``invocation_counter``: call only after the tag verified."""
        self.check(invocation_counter)
        self.lowest_acceptable = invocation_counter + 1
