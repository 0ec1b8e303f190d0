"""Bounded queues and back-pressure for the embedded amqtt 0.12.1 broker.

What amqtt does with a PUBLISH (all unbounded): the client's reader loop
(``ProtocolHandler._reader_loop``) reads every packet as it arrives and runs it
as a task; ``_handle_qos1_message_flow`` puts the message in the session's
``delivered_message_queue`` and sends PUBACK at once; ``Broker._client_message_loop``
moves it to ``Broker._broadcast_queue``; ``Broker._run_broadcast`` matches it
against every subscription and starts one ``mqtt_publish`` task per target,
kept in ``Broker._tasks_queue``, each waiting up to 5 s for its PUBACK and then
dropping the message.  Nothing ever tells a publisher to slow down: above its
capacity the broker's one thread spends its CPU reading meters, the tasks and
queues grow (237 MB measured) and deliveries to the relays and head-end starve.

Here, for QoS 0 and 1 (QoS 2 keeps amqtt's path):

* **one bounded queue per subscriber connection** (``FlowHandler._out``),
  drained by one sender task with at most ``max_inflight`` PUBACKs
  outstanding; no task per delivery and no 5 s ack timeout that drops;
* **routing in order, before the PUBACK**: a publish is matched (a cache per
  topic), queued to its subscribers, then acknowledged, by the connection's
  reader itself (``FlowHandler._reader_loop``: amqtt ran each packet in a task,
  behind a ``wait_for`` task per read);
* **back-pressure**: a publish for a subscriber whose queue holds
  ``queue_high`` messages is *held*, its PUBACK withheld, until that queue is
  back under a quarter of it.  The publisher's own in-flight window (the
  fleet's 128 per connection) then stops it, and its readings wait in the
  meters' load curves.  The connection keeps being read, so the broker still
  sees PUBACKs for its own deliveries and PINGREQs (a paused socket would time
  the fleet's keep-alive out after 30 s, and deadlock a client that both
  publishes and subscribes).  Only a client holding more than ``max_held``
  publishes (no window of its own) has its socket paused;
* **drop, counted, only for a dead subscriber**: one that acknowledged nothing
  for ``stall_s`` no longer holds publishers back; its queue fills up to
  ``max_queued`` and what comes beyond is dropped (as Mosquitto's
  ``max_queued_messages``).  Messages kept for an offline persistent session
  have the same bound.

Counters: ``FlowStats`` (``AclBroker.flow_stats()``, logged as ``broker_flow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import (
    CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, RESERVED_0,
    RESERVED_15, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from ami.runtime.mqtt import encode_length


@dataclass(frozen=True)
class FlowSettings:
    """The [broker] keys of the packaged defaults (ami/runtime/default.toml)."""

    max_inflight: int = 64  # QoS 1 deliveries awaiting PUBACK per subscriber connection
    queue_high: int = 200  # a subscriber queue this long holds the publishes for it...
    max_queued: int = 20000  # ...a dead subscriber's queue is cut here (drops counted)
    stall_s: float = 10.0  # a subscriber that acknowledged nothing this long is dead: no more holding
    max_held: int = 1000  # publishes held per connection before its socket is paused

    @classmethod
    def from_config(cls, broker: dict[str, Any]) -> FlowSettings:
        names = {f.name: f.type for f in fields(cls)}
        kw = {k: (float(v) if names[k] == "float" else int(v)) for k, v in broker.items() if k in names}
        return cls(**kw)

    @property
    def queue_low(self) -> int:
        return self.queue_high // 4


@dataclass
class FlowStats:
    held: int = 0  # publishes whose PUBACK is withheld now
    held_max: int = 0
    held_total: int = 0  # publishes that had to wait for a subscriber's queue
    ingress_pauses: int = 0  # times a connection started holding publishes
    socket_pauses: int = 0  # times a connection's socket was paused (held > max_held)
    queue_max: int = 0  # longest subscriber queue seen
    dropped: int = 0  # deliveries dropped: a dead subscriber's queue (or an offline session's) was full
    stalls: int = 0  # times held publishes went on because their subscriber acknowledged nothing for stall_s
    routed: int = 0  # messages routed


def publish_bytes(topic: bytes, data: bytes, qos: int, pid: int) -> bytes:
    """One PUBLISH (DUP 0, RETAIN 0): built directly, amqtt's packet classes cost ~10x."""
    head = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if qos else b"")
    return bytes((0x30 | qos << 1,)) + encode_length(len(head) + len(data)) + head + data


class FlowHandler(BrokerProtocolHandler):
    """A connection's handler with a bounded outgoing queue and held (not refused) publishes."""

    broker: FlowBroker | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._out: deque[tuple[bytes, str, bytes, int]] = deque()
        self._inflight: dict[int, OutgoingApplicationMessage] = {}
        self._wake = asyncio.Event()  # the sender has something to do
        self._drained = asyncio.Event()  # the queue is under queue_low: held publishers may go on
        self._drained.set()
        self._progress = time.monotonic()  # last write or PUBACK: a dead subscriber shows none
        self._sender: asyncio.Task[None] | None = None
        self._route_lock = asyncio.Lock()  # routes this connection's publishes in their order
        self._held = 0
        self._socket_paused = False
        self._closed = False

    # --- egress -----------------------------------------------------------------------------

    async def start(self) -> None:
        await super().start()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop())

    async def stop(self) -> None:
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        self._keep_for_session()
        self._drained.set()  # whoever waits for this queue: it is gone
        await super().stop()

    def _keep_for_session(self) -> None:
        """A persistent session keeps its queued QoS 1 messages for its next connection (as amqtt does)."""
        session, out = self.session, self._out
        if session is not None and not session.clean_session and self.broker is not None:
            for _topic_b, topic, data, qos in out:
                if qos:
                    self.broker.keep_offline(session, topic, data, qos)
        out.clear()

    def congested(self, settings: FlowSettings) -> bool:
        """Its queue is full and it is alive (it acknowledged something within stall_s)."""
        return len(self._out) >= settings.queue_high and time.monotonic() - self._progress < settings.stall_s

    def enqueue(self, topic_b: bytes, topic: str, data: bytes, qos: int, stats: FlowStats,
                settings: FlowSettings) -> None:
        out = self._out
        if self._closed:
            return
        if len(out) >= settings.max_queued:
            stats.dropped += 1
            return
        if not out and len(self._inflight) < settings.max_inflight:
            self._progress = time.monotonic()  # it was idle, not dead
        out.append((topic_b, topic, data, qos))
        n = len(out)
        if n > stats.queue_max:
            stats.queue_max = n
        if n >= settings.queue_high:
            self._drained.clear()
        self._wake.set()
        if self._socket_paused:
            self._resume_socket()  # its PUBACKs must be read for this queue to drain

    async def _send_loop(self) -> None:
        assert self.broker is not None and self.session is not None and self.writer is not None
        settings, session, writer, out = self.broker.flow, self.session, self.writer, self._out
        window = settings.max_inflight
        while True:
            if not out or len(self._inflight) >= window:
                self._wake.clear()
                await self._wake.wait()
                continue
            while out and len(self._inflight) < window:
                topic_b, topic, data, qos = out.popleft()
                pid = 0
                if qos:
                    pid = session.next_packet_id  # unique against amqtt's own flows (inflight_out)
                    message = OutgoingApplicationMessage(pid, topic, qos, data, False)
                    session.inflight_out[pid] = message
                    self._inflight[pid] = message
                writer.write(publish_bytes(topic_b, data, qos, pid))
            if len(out) <= settings.queue_low:
                self._drained.set()
            self._progress = time.monotonic()
            await writer.drain()
            self._progress = time.monotonic()

    async def handle_puback(self, puback: PubackPacket) -> None:
        if not self._acked(puback.packet_id):
            await super().handle_puback(puback)  # one of amqtt's own flows (retained replay, retries)

    def _acked(self, pid: int) -> bool:
        message = self._inflight.pop(pid, None)
        if message is None:
            waiter = self._puback_waiters.get(pid)  # one of amqtt's own flows (retained replay, retries)
            if waiter is not None and not waiter.done():
                waiter.set_result(PubackPacket.build(pid))
            return waiter is not None
        if self.session is not None:
            self.session.inflight_out.pop(pid, None)
        self._progress = time.monotonic()
        self._wake.set()
        return True

    # --- ingress ------------------------------------------------------------------------------

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """amqtt's reader loop (WebSockets) calls this for every PUBLISH, in a task."""
        if self.broker is None or publish_packet.qos == QOS_2:
            await super().handle_publish(publish_packet)  # amqtt's QoS 2 flow, then _broadcast_message
            return
        topic, data, qos = publish_packet.topic_name, publish_packet.data, publish_packet.qos or 0
        if topic is None or data is None:
            return
        pid, retain = publish_packet.packet_id, publish_packet.retain_flag
        if self._held or self.broker.congested(topic):
            self._hold()
            await self._hold_then_route(topic, bytes(data), qos, pid, retain)
            return
        async with self._route_lock:  # one task per packet here: keep them in order across ACL awaits
            ok = await self.broker.route_publish(self, topic, bytes(data), qos, pid, retain)
        if ok:
            self._puback(qos, pid)

    async def _publish_in(self, topic: str, data: bytes, qos: int, pid: int | None, retain: bool,
                          tasks: set[asyncio.Task[Any]]) -> None:
        """Route now (the reader loop keeps the order), or hold in a task: the reader must go
        on reading this connection's PUBACKs and PINGREQs."""
        assert self.broker is not None
        if self._held or self.broker.congested(topic):
            self._hold()
            task = asyncio.create_task(self._hold_then_route(topic, data, qos, pid, retain))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return
        if await self.broker.route_publish(self, topic, data, qos, pid, retain):
            self._puback(qos, pid)

    def _puback(self, qos: int, pid: int | None) -> None:
        # Written directly: amqtt's _send_packet takes a lock, drains and re-arms a
        # keep-alive timer (a no-op on the broker side) for each 4-byte PUBACK.
        if qos == QOS_1 and self.writer is not None:
            self.writer.write(b"\x40\x02" + (pid or 0).to_bytes(2, "big"))

    def _hold(self) -> None:
        """Count a publish as held, at once: later ones of this connection must see it."""
        assert self.broker is not None
        stats = self.broker.flow_stats_live
        if not self._held:
            stats.ingress_pauses += 1
        self._held += 1
        stats.held += 1
        stats.held_total += 1
        stats.held_max = max(stats.held_max, stats.held)
        if self._held > self.broker.flow.max_held and not self._inflight and not self._out:
            self._pause_socket()

    async def _hold_then_route(self, topic: str, data: bytes, qos: int, pid: int | None, retain: bool) -> None:
        """Wait for the publish's subscribers, then route it and acknowledge it (_held counted it)."""
        assert self.broker is not None
        broker, stats = self.broker, self.broker.flow_stats_live
        try:
            async with self._route_lock:  # later publishes of this connection queue up behind
                await broker.wait_uncongested(topic)
                if await broker.route_publish(self, topic, data, qos, pid, retain):
                    self._puback(qos, pid)
        finally:
            self._held -= 1
            stats.held -= 1
            if self._socket_paused and self._held <= broker.flow.max_held // 2:
                self._resume_socket()

    async def _reader_loop(self) -> None:
        """amqtt's reader loop without a task (and a wait_for task) per packet, nor a timeout
        (its broker side ignores it): PUBLISH (QoS 0, 1) and PUBACK are handled inline,
        the rest goes through amqtt's packet classes and handlers as before."""
        stream = getattr(self.reader, "_reader", None)
        if self.broker is None or self.session is None or not isinstance(stream, asyncio.StreamReader):
            await super()._reader_loop()
            return
        assert self._reader_ready is not None
        self._reader_ready.set()
        tasks: set[asyncio.Task[Any]] = set()
        read, readexactly = stream.read, stream.readexactly
        try:
            while True:
                first = await read(1)
                if not first:
                    break  # EOF
                header, length, shift = first[0], 0, 0
                while True:
                    byte = (await readexactly(1))[0]
                    length |= (byte & 127) << shift
                    if not byte & 128:
                        break
                    shift += 7
                    if shift > 21:
                        raise MQTTError("malformed remaining length")
                body = await readexactly(length) if length else b""
                kind = header >> 4
                if kind == PUBLISH and (header >> 1) & 3 < QOS_2:
                    qos = (header >> 1) & 3
                    end = 2 + int.from_bytes(body[:2], "big")
                    topic = body[2:end].decode()
                    pid = int.from_bytes(body[end:end + 2], "big") if qos else None
                    await self._publish_in(topic, body[end + 2 if qos else end:], qos, pid, bool(header & 1), tasks)
                elif kind == PUBACK and length == 2:
                    self._acked(int.from_bytes(body, "big"))
                elif not await self._other_packet(header, body, tasks):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except (MQTTError, ValueError, UnicodeDecodeError) as exc:
            self.logger.warning(f"{self.session.client_id if self.session else ''}: malformed packet, closing: {exc!r}")
        except Exception as exc:  # noqa: BLE001 - as amqtt's reader loop: log, end the connection
            self.logger.warning(f"{type(self).__name__} Unhandled exception in reader coro: {exc!r}")
        for task in list(tasks):
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _other_packet(self, header: int, body: bytes, tasks: set[asyncio.Task[Any]]) -> bool:
        """One packet as amqtt's reader loop handles it; False: close the connection."""
        kind = header >> 4
        if kind in (RESERVED_0, RESERVED_15):
            return False
        fixed = MQTTFixedHeader(kind, header & 15, len(body))
        packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
        await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
        if kind == CONNECT:
            await self.handle_connect(packet)
            return True
        handler = {
            CONNACK: self.handle_connack, SUBSCRIBE: self.handle_subscribe, UNSUBSCRIBE: self.handle_unsubscribe,
            SUBACK: self.handle_suback, UNSUBACK: self.handle_unsuback, PUBACK: self.handle_puback,
            PUBREC: self.handle_pubrec, PUBREL: self.handle_pubrel, PUBCOMP: self.handle_pubcomp,
            PINGREQ: self.handle_pingreq, PINGRESP: self.handle_pingresp, PUBLISH: self.handle_publish,
            DISCONNECT: self.handle_disconnect,
        }.get(kind)
        if handler is not None:
            task = asyncio.create_task(handler(packet))  # type: ignore[arg-type]
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return True

    def _transport(self) -> asyncio.Transport | None:
        stream = getattr(self.writer, "_writer", None)  # amqtt's StreamWriterAdapter (TCP, TLS)
        return getattr(stream, "transport", None)

    def _pause_socket(self) -> None:
        transport = self._transport()
        if transport is not None and not self._socket_paused:
            with contextlib.suppress(RuntimeError, AttributeError):
                transport.pause_reading()
                self._socket_paused = True
                assert self.broker is not None
                self.broker.flow_stats_live.socket_pauses += 1

    def _resume_socket(self) -> None:
        transport = self._transport()
        self._socket_paused = False
        if transport is not None:
            with contextlib.suppress(RuntimeError, AttributeError):
                transport.resume_reading()


class FlowBroker(Broker):
    """amqtt's Broker with FlowHandler's queues: routing done once per publish, in order."""

    _MATCH_CACHE_MAX = 50_000

    def __init__(self, config: dict[str, Any], *, flow: FlowSettings | None = None) -> None:
        super().__init__(config)
        self.flow = flow or FlowSettings()
        self.flow_stats_live = FlowStats()
        # topic -> (topic bytes, [(session, qos)]): amqtt matched every filter for every message
        # (its cost grew with the subscriptions: two per concentrator).
        self._match_cache: dict[str, tuple[bytes, list[tuple[Session, int]]]] = {}

    def flow_stats(self) -> dict[str, Any]:
        stats = asdict(self.flow_stats_live)
        handlers = [h for _s, h in list(self._sessions.values()) if isinstance(h, FlowHandler)]
        stats["queued"] = sum(len(h._out) for h in handlers)
        stats["inflight"] = sum(len(h._inflight) for h in handlers)
        return stats

    # --- subscriptions: every change empties the match cache ----------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        try:
            return await super().add_subscription(subscription, session)
        finally:  # after: amqtt awaits the ACL check before it appends, a publish may fill the cache meanwhile
            self._match_cache.clear()

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        self._match_cache.clear()
        return super()._del_subscription(a_filter, session)

    def _targets(self, topic: str) -> tuple[bytes, list[tuple[Session, int]]]:
        hit = self._match_cache.get(topic)
        if hit is None:
            if len(self._match_cache) >= self._MATCH_CACHE_MAX:
                self._match_cache.clear()
            targets = [(s, q) for f, subs in self._subscriptions.items() if self._matches(topic, f) for s, q in subs]
            hit = self._match_cache[topic] = (topic.encode(), targets)
        return hit

    # --- back-pressure ------------------------------------------------------------------------

    def congested(self, topic: str) -> bool:
        settings = self.flow
        for session, _qos in self._targets(topic)[1]:
            handler = self._get_handler(session)
            if isinstance(handler, FlowHandler) and handler.congested(settings):
                return True
        return False

    async def wait_uncongested(self, topic: str) -> None:
        settings = self.flow
        while True:
            blocking = next((h for s, _q in self._targets(topic)[1]
                             if isinstance(h := self._get_handler(s), FlowHandler) and h.congested(settings)), None)
            if blocking is None:
                return
            try:
                await asyncio.wait_for(blocking._drained.wait(), settings.stall_s)
            except TimeoutError:
                if not blocking.congested(settings):  # it acknowledged nothing for stall_s: no longer waited for
                    self.flow_stats_live.stalls += 1

    # --- routing ------------------------------------------------------------------------------

    async def route_publish(self, handler: FlowHandler, topic: str, data: bytes, qos: int, pid: int | None,
                            retain: bool) -> bool:
        """amqtt's _handle_message_delivery + _run_broadcast for one QoS 0/1 publish; False: close the connection."""
        session = handler.session
        assert session is not None
        message = IncomingApplicationMessage(pid, topic, qos, data, retain)
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_RECEIVED, client_id=session.client_id,
                                              message=message)
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            self.logger.warning(f"[MQTT-4.7] {session.client_id}: invalid topic in PUBLISH, closing connection")
            await handler.handle_connection_closed()
            return False
        if not await self._topic_filtering(session, topic=topic, action=Action.PUBLISH):
            self.logger.info(f"{session.client_id} not allowed to publish to TOPIC {topic}.")
            return True
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_BROADCAST, client_id=session.client_id,
                                              message=message)
        await self._fan_out(topic, data, qos)
        if retain:
            await self.retain_message(session, topic, data, qos)
        return True

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        # Wills, QoS 2 publishes and internal messages: the same queues, never held
        # (a disconnect must not wait for a subscriber).
        if topic:
            await self._fan_out(topic, bytes(data or b""), QOS_2 if force_qos is None else force_qos)

    async def _fan_out(self, topic: str, data: bytes, qos: int) -> None:
        topic_b, targets = self._targets(topic)
        settings, stats = self.flow, self.flow_stats_live
        stats.routed += 1
        check = self.plugins_manager.is_topic_filtering_enabled()
        for target, sub_qos in targets:
            q = min(qos, sub_qos)
            if check and not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                continue
            if target.transitions.state != "connected":
                if not target.clean_session and q and not target.is_anonymous:
                    self.keep_offline(target, topic, data, q)
                continue
            handler = self._get_handler(target)
            if isinstance(handler, FlowHandler) and q < QOS_2:
                handler.enqueue(topic_b, topic, data, q, stats, settings)
            elif handler is not None:  # QoS 2 deliveries keep amqtt's flow (never used by this project)
                self._tasks_queue.append(asyncio.ensure_future(handler.mqtt_publish(topic, data, q, retain=False)))

    def keep_offline(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        """amqtt's _retain_broadcast_message, bounded like a live queue."""
        if session.retained_messages.qsize() >= self.flow.max_queued:
            self.flow_stats_live.dropped += 1
            return
        session.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, data, qos))
