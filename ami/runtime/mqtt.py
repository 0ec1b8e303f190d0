"""A small MQTT 3.1.1 client on ``asyncio.Protocol``, for the hot paths.

The fleet's publishes, the relays' receive + forward and the head-end's
receive go through this client; everything else (tools, monitor, the
services' monitor connections) keeps aiomqtt.  Why: per message, aiomqtt
(on paho) costs ~80 us to publish and ~40 us to receive on this project's
2-vCPU machine, this client a fraction of that (``bench/bench_mqtt_clients.py``,
docs/benchmarks.md): it builds each packet with one ``struct`` call, coalesces
everything written during one event-loop iteration into one ``write``, and
hands received messages to a plain callback.

What it does, and nothing more: MQTT 3.1.1 (protocol level 4, the level
amqtt, Mosquitto and RabbitMQ all speak), clean sessions, CONNECT with user
name, password and a Last Will, TLS (an ``ssl.SSLContext``), SUBSCRIBE,
PUBLISH QoS 0 and 1 both ways (PUBACK sent at once for received QoS 1;
QoS 2 is refused), keep-alive pings, DISCONNECT.  Its interface mirrors the
part of ``aiomqtt.Client`` the services use (``async with``, ``subscribe``,
``await publish``, ``messages``) so ``ami.runtime.link.run_link`` drives it
unchanged; its errors are ``aiomqtt.MqttError`` subclasses.  Fast paths:
``publish_nowait(topic, payload, qos, done)`` (``done(None)`` on PUBACK,
``done(error)`` when the connection is lost first), ``on_message =
callback(topic, payload)``, ``pause_reading()`` / ``resume_reading()`` (TCP
back-pressure) and ``wait_disconnected()``.

The packet parser (`split_frames`, `parse_publish`) is sans-I/O and bounded
(``max_packet``); anything malformed from the broker ends the connection with
``ProtocolViolation`` (tests/test_mqtt_client.py fuzzes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import aiomqtt

DEFAULT_MAX_PACKET = 4 * 1024 * 1024 + 1024  # a WAN batch (2 MiB) with room to spare

_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

_H = struct.Struct("!H")
_PUBACK = struct.Struct("!BBH")
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"


class MqttError(aiomqtt.MqttError):
    """A lost or refused connection (an ``aiomqtt.MqttError``, so every
    service's reconnecting link treats both clients alike)."""


class ProtocolViolation(MqttError):
    """The broker sent something that is not MQTT 3.1.1."""


class Will(NamedTuple):
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Topic:
    """``message.topic`` as aiomqtt gives it: ``.value`` and ``.matches(filter)``."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def matches(self, wildcard: str) -> bool:
        return topic_matches(self.value, wildcard)

    def __str__(self) -> str:
        return self.value


class Message:
    __slots__ = ("topic", "payload", "qos", "retain")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.topic = Topic(topic)
        self.payload = payload
        self.qos = qos
        self.retain = retain


def topic_matches(topic: str, wildcard: str) -> bool:
    t, w = topic.split("/"), wildcard.split("/")
    for i, part in enumerate(w):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(t) == len(w)


# --- sans-I/O codec ----------------------------------------------------------------------


def encode_length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 127, n >> 7
        out.append(byte | 128 if n else byte)
        if not n:
            return bytes(out)


def _field(data: bytes) -> bytes:
    return _H.pack(len(data)) + data


def connect_packet(
    client_id: str, *, username: str | None, password: str | None, will: Will | None, keepalive: int,
    clean: bool = True,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _field(client_id.encode())
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _field(will.topic.encode()) + _field(bytes(will.payload))
    if username is not None:
        flags |= 0x80
        payload += _field(username.encode())
        if password is not None:
            flags |= 0x40
            payload += _field(password.encode())
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + _H.pack(keepalive) + payload
    return b"\x10" + encode_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int, retain: bool, pid: int) -> bytes:
    n = 2 + len(topic) + len(payload) + (2 if qos else 0)
    head = (0x30 | (qos << 1) | (1 if retain else 0)).to_bytes(1, "big") + encode_length(n) + _H.pack(len(topic))
    if qos:
        return b"".join((head, topic, _H.pack(pid), payload))
    return b"".join((head, topic, payload))


def subscribe_packet(pid: int, topic: str, qos: int) -> bytes:
    body = _H.pack(pid) + _field(topic.encode()) + bytes((qos,))
    return b"\x82" + encode_length(len(body)) + body


def split_frames(buf: bytes, max_packet: int = DEFAULT_MAX_PACKET) -> tuple[list[tuple[int, bytes]], int]:
    """The complete packets at the head of ``buf``: ([(first byte, body)], bytes used).

    Raises ``ProtocolViolation`` on a remaining length longer than 4 bytes
    or larger than ``max_packet``; an incomplete packet is left for later.
    """
    out: list[tuple[int, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        header = buf[pos]
        b = buf[pos + 1]
        i = pos + 2
        if b < 128:
            length = b
        else:
            length, mult = b & 127, 128
            while True:
                if i >= n:
                    return out, pos
                b = buf[i]
                i += 1
                length += (b & 127) * mult
                if b < 128:
                    break
                mult <<= 7
                if mult > 128**3:
                    raise ProtocolViolation("remaining length longer than 4 bytes")
        if length > max_packet:
            raise ProtocolViolation(f"packet of {length} bytes over the {max_packet}-byte limit")
        end = i + length
        if end > n:
            return out, pos
        out.append((header, buf[i:end]))
        pos = end
    return out, pos


def parse_publish(header: int, body: bytes) -> tuple[str, bytes, int, int]:
    """(topic, payload, qos, packet id or 0) of a PUBLISH; ``ProtocolViolation`` if malformed."""
    qos = (header >> 1) & 3
    if qos == 3 or len(body) < 2:
        raise ProtocolViolation("malformed PUBLISH")
    end = 2 + ((body[0] << 8) | body[1])
    if end == 2 or end > len(body):
        raise ProtocolViolation("malformed PUBLISH topic")
    try:
        topic = body[2:end].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("PUBLISH topic is not UTF-8") from None
    pid = 0
    if qos:
        if end + 2 > len(body):
            raise ProtocolViolation("PUBLISH without packet id")
        pid = (body[end] << 8) | body[end + 1]
        end += 2
        if pid == 0:
            raise ProtocolViolation("PUBLISH with packet id 0")
    return topic, body[end:], qos, pid


# --- the connection ----------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection's state; a client makes one per connect."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.acks: dict[int, Any] = {}  # packet id -> callback(exc) | Future
        self.next_pid = 0
        self.connack: asyncio.Future = self.loop.create_future()
        self.closed: asyncio.Future = self.loop.create_future()
        self.last_in = self.last_out = time.monotonic()
        self.ping_timer: asyncio.TimerHandle | None = None
        self.ping_sent = 0.0
        self.error: BaseException | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        buf = self.buf + data if self.buf else data
        try:
            frames, used = split_frames(buf, self.client.max_packet)
            self.buf = buf[used:]
            for header, body in frames:
                self.dispatch(header, body)
        except ProtocolViolation as exc:
            self.abort(exc)
        except Exception as exc:  # noqa: BLE001 - a failing handler ends the connection with its error
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = MqttError(f"connection lost: {exc}" if exc else "connection closed")
        self.transport = None
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        if not self.connack.done():
            self.connack.set_exception(self.error)
            self.connack.exception()
        acks, self.acks = self.acks, {}
        for done in acks.values():
            _complete(done, self.error)
        if not self.closed.done():
            self.closed.set_result(None)
        self.client._lost(self)

    def pause_writing(self) -> None:  # the kernel buffer is full: callers' windows bound what we buffer
        pass

    def resume_writing(self) -> None:
        pass

    # packets in
    def dispatch(self, header: int, body: bytes) -> None:
        kind = header >> 4
        if kind == 3:
            topic, payload, qos, pid = parse_publish(header, body)
            if qos == 2:
                raise ProtocolViolation("QoS 2 PUBLISH (subscriptions ask for at most QoS 1)")
            if qos:
                self.send(_PUBACK.pack(0x40, 2, pid))
            self.client._deliver(topic, payload, qos, bool(header & 1))
        elif kind == 4:  # PUBACK
            if len(body) != 2:
                raise ProtocolViolation("malformed PUBACK")
            done = self.acks.pop((body[0] << 8) | body[1], None)
            if done is not None:
                _complete(done, None)
        elif kind == 9:  # SUBACK
            if len(body) < 3:
                raise ProtocolViolation("malformed SUBACK")
            done = self.acks.pop((body[0] << 8) | body[1], None)
            if done is not None and not done.done():
                done.set_result(list(body[2:]))
        elif kind == 2:  # CONNACK
            if len(body) != 2 or self.connack.done():
                raise ProtocolViolation("unexpected CONNACK")
            rc = body[1]
            if rc:
                raise MqttError(f"connection refused: {_CONNACK_REASONS.get(rc, rc)} (code {rc})")
            self.connack.set_result(None)
        elif kind == 13:  # PINGRESP
            self.ping_sent = 0.0
        elif kind == 11:  # UNSUBACK
            done = self.acks.pop((body[0] << 8) | body[1], None) if len(body) >= 2 else None
            if done is not None and not done.done():
                done.set_result(None)
        else:
            raise ProtocolViolation(f"unexpected packet type {kind}")

    # packets out
    def send(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.transport.write(data)
            self.last_out = time.monotonic()
        self.out.clear()

    def pid(self) -> int:
        acks = self.acks
        if len(acks) >= 65535:
            raise MqttError("no packet id free (65,535 messages awaiting acknowledgement)")
        pid = self.next_pid
        while True:
            pid = pid + 1 if pid < 65535 else 1
            if pid not in acks:
                self.next_pid = pid
                return pid

    def abort(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()

    def start_keepalive(self, keepalive: int) -> None:
        if keepalive <= 0:
            return
        period = max(0.5, keepalive / 4)

        def check() -> None:
            if self.transport is None:
                return
            now = time.monotonic()
            if self.ping_sent and now - self.ping_sent > keepalive:
                self.abort(MqttError("no PINGRESP within the keep-alive"))
                return
            if not self.ping_sent and now - min(self.last_out, self.last_in) >= keepalive / 2:
                self.ping_sent = now
                self.send(_PINGREQ)
            self.ping_timer = self.loop.call_later(period, check)

        self.ping_timer = self.loop.call_later(period, check)


def _complete(done: Any, error: BaseException | None) -> None:
    if isinstance(done, asyncio.Future):
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # retrieved: nobody may be waiting any more
    else:
        done(error)


class Client:
    """A reusable MQTT 3.1.1 client: ``async with client:`` connects, leaving disconnects."""

    def __init__(
        self,
        hostname: str,
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        identifier: str = "",
        will: Will | None = None,
        keepalive: int = 30,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        max_packet: int = DEFAULT_MAX_PACKET,
        queue_max: int = 10_000,
    ) -> None:
        self.hostname = hostname
        self.port = port
        self.username = username
        self.password = password
        self.identifier = identifier
        self.will = will
        self.keepalive = keepalive
        self.tls_context = tls_context
        self.timeout = timeout
        self.max_packet = max_packet
        #: callback(topic, payload) for every received message; None: they go to ``messages``
        self.on_message: Callable[[str, bytes], None] | None = None
        self._queue: deque[Message] = deque()
        self._queue_max = queue_max
        self._queue_wake: asyncio.Event | None = None
        self._conn: _Connection | None = None
        self._topics: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"<mqtt.Client {self.identifier} {'connected' if self.connected else 'disconnected'}>"

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.transport is not None and conn.connack.done()

    # --- connection -------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._conn is not None:
            raise MqttError("already connected (the client is not reentrant)")
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        self._conn = conn
        self._queue.clear()
        try:
            async with asyncio.timeout(self.timeout):
                await loop.create_connection(
                    lambda: conn, self.hostname, self.port, ssl=self.tls_context,
                    server_hostname=self.hostname if self.tls_context else None,
                )
                conn.send(connect_packet(self.identifier, username=self.username, password=self.password,
                                         will=self.will, keepalive=self.keepalive))
                await conn.connack
        except BaseException as exc:
            self._conn = None
            if conn.transport is not None:
                conn.transport.abort()
            if isinstance(exc, MqttError):
                raise
            if isinstance(exc, (OSError, TimeoutError, ssl.SSLError)):
                raise MqttError(f"connecting to {self.hostname}:{self.port} failed: {exc!r}") from exc
            raise
        conn.start_keepalive(self.keepalive)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.transport is not None:
            conn.error = MqttError("disconnected")
            conn.send(_DISCONNECT)
            conn.flush()
            conn.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(conn.closed)
            if conn.transport is not None:
                conn.transport.abort()
        self._wake()

    def _lost(self, conn: _Connection) -> None:
        self._wake()

    async def wait_disconnected(self) -> None:
        """Return never while connected; raise ``MqttError`` (or a message handler's
        error) once the connection is lost."""
        conn = self._conn
        if conn is None:
            raise MqttError("not connected")
        await asyncio.shield(conn.closed)
        raise conn.error or MqttError("connection closed")

    def pause_reading(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_reading(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

    # --- out --------------------------------------------------------------------------

    def _live(self) -> _Connection:
        conn = self._conn
        if conn is None or conn.transport is None:
            raise (conn.error if conn is not None and isinstance(conn.error, MqttError) else MqttError("not connected"))
        return conn

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, done: Callable[[BaseException | None], None] | None = None,
        retain: bool = False,
    ) -> None:
        """Queue a PUBLISH for this loop iteration's write.  QoS 1: ``done(None)`` on
        its PUBACK, ``done(error)`` if the connection is lost first; QoS 0:
        ``done(None)`` at once.  Raises ``MqttError`` when not connected."""
        conn = self._live()
        t = self._topics.get(topic)
        if t is None:
            t = topic.encode()
            if len(self._topics) < 100_000:
                self._topics[topic] = t
        if qos == 1:
            pid = conn.pid()
            conn.acks[pid] = done or _ignore
            conn.send(publish_packet(t, payload, 1, retain, pid))
        elif qos == 0:
            conn.send(publish_packet(t, payload, 0, retain, 0))
            if done is not None:
                done(None)
        else:
            raise ValueError("QoS 2 is not supported by ami.runtime.mqtt")

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                **_ignored: Any) -> asyncio.Future:
        """As aiomqtt: ``await client.publish(...)`` returns once it is acknowledged (QoS 1)
        or written (QoS 0)."""
        future = asyncio.get_running_loop().create_future()
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        try:
            self.publish_nowait(topic, data, min(qos, 1), future if qos else None, retain)
        except MqttError as exc:
            future.set_exception(exc)
            return future
        if not qos:
            future.set_result(None)
        return future

    async def subscribe(self, topic: str, qos: int = 0, **_ignored: Any) -> list[int]:
        conn = self._live()
        pid = conn.pid()
        future = asyncio.get_running_loop().create_future()
        conn.acks[pid] = future
        conn.send(subscribe_packet(pid, topic, min(qos, 1)))
        async with asyncio.timeout(self.timeout):
            return await future

    # --- in ---------------------------------------------------------------------------

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        handler = self.on_message
        if handler is not None:
            handler(topic, payload)
            return
        if len(self._queue) >= self._queue_max:
            raise MqttError(f"{self._queue_max} messages unread: the reader stalled")
        self._queue.append(Message(topic, payload, qos, retain))
        self._wake()

    def _wake(self) -> None:
        if self._queue_wake is not None:
            self._queue_wake.set()

    @property
    def messages(self) -> Client:
        return self

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._queue:
                return self._queue.popleft()
            conn = self._conn
            if conn is None or conn.transport is None:
                raise (conn.error if conn is not None and conn.error else MqttError("not connected"))
            if self._queue_wake is None:
                self._queue_wake = asyncio.Event()
            self._queue_wake.clear()
            await self._queue_wake.wait()


def _ignore(_error: BaseException | None) -> None:
    pass


__all__ = [
    "Client", "Message", "MqttError", "ProtocolViolation", "Topic", "Will", "connect_packet", "encode_length",
    "parse_publish", "publish_packet", "split_frames", "subscribe_packet", "topic_matches",
]
