"""One direction of ciphered traffic under one key: the pieces put together.

``Sealer`` = cipher + the sender's system title + its ``SendCounter``.
``Opener`` = cipher + the expected sender's title + its ``ReceiveCounter``:
check the counter, verify the tag, and only then move the counter.
"""

from __future__ import annotations

from .cipher import SC_AUTH_ENC, Suite0Cipher
from .counters import ReceiveCounter, SendCounter
from .errors import MalformedFrame, ReplayedFrame
from .frames import CipheredApdu, open_apdu, seal_apdu

__all__ = [
    "Opener",
    "Sealer",
]


class Sealer:
    __slots__ = ("cipher", "sender_title", "counter", "tag", "security_control")

    def __init__(
        self,
        cipher: Suite0Cipher,
        sender_title: bytes,
        counter: SendCounter,
        tag: int,
        security_control: int = SC_AUTH_ENC,
    ) -> None:
        self.cipher = cipher
        self.sender_title = sender_title
        self.counter = counter
        self.tag = tag
        self.security_control = security_control

    def __repr__(self) -> str:
        return f"<Sealer tag={self.tag:#04x} {self.counter!r}>"

    def seal(self, plaintext: bytes, *, tag: int | None = None) -> bytes:
        ic = self.counter.take()  # raises unless durably reserved
        return seal_apdu(
            self.cipher,
            self.tag if tag is None else tag,
            self.sender_title,
            ic,
            plaintext,
            security_control=self.security_control,
        )


class Opener:
    __slots__ = ("cipher", "sender_title", "counter")

    def __init__(self, cipher: Suite0Cipher, sender_title: bytes, counter: ReceiveCounter) -> None:
        self.cipher = cipher
        self.sender_title = sender_title
        self.counter = counter

    def __repr__(self) -> str:
        return f"<Opener {self.counter!r}>"

    def open(self, apdu: CipheredApdu) -> bytes:
        if apdu.system_title is not None and apdu.system_title != self.sender_title:
            raise MalformedFrame("frame from another sender")
        ic = apdu.invocation_counter
        self.counter.check(ic)
        plaintext = open_apdu(self.cipher, apdu, self.sender_title)
        # Only a verified frame moves the counter (a forged huge IC cannot).
        self.counter.accept(ic)
        return plaintext

    def would_accept(self, apdu: CipheredApdu) -> bool:
        try:
            self.counter.check(apdu.invocation_counter)
        except ReplayedFrame:
            return False
        return True
