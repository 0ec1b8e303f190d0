"""A stand-in for ``ami.runtime.mqtt.Client``'s publishing side, shared by the
hot-path benches: publishes go nowhere (``on_publish`` sees each), QoS 1
acknowledgements come back together on the next loop iteration, as a
broker's PUBACKs coalesced into one read would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Done = Callable[[BaseException | None], None]


class SinkClient:
    def __init__(self, on_publish: Callable[[str, bytes], None] | None = None) -> None:
        self.on_publish = on_publish
        self.published = 0
        self._acks: list[Done] = []
        self._ack_scheduled = False

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, done: Done | None = None,
                       retain: bool = False) -> None:
        self.published += 1
        if self.on_publish is not None:
            self.on_publish(topic, payload)
        if done is None:
            return
        if qos == 0:
            done(None)
            return
        self._acks.append(done)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._ack_all)

    def _ack_all(self) -> None:
        acks, self._acks = self._acks, []
        self._ack_scheduled = False
        for done in acks:
            done(None)
