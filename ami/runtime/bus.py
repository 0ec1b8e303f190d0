"""Connecting to the MQTT bus: broker URLs, credentials, TLS and client options.

Every service takes ``--broker mqtt://host:port`` (``mqtts://`` for TLS) and a
data folder.  When ``ami provision`` wrote bus security there (``DATA/bus/``),
a client logs in as its role's user with that identity's own secret,
``DATA/bus/identities/<user>.secret``, and reads no other; if that file is
missing it raises ``BusIdentityMissing`` instead of trying anonymously.  A
client connects anonymously only when asked to (``user=None``, e.g. load tests
against ``ami broker --no-auth``) or when the network was provisioned with
``--no-bus-security`` (the ``DATA/bus-anonymous`` marker).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import aiomqtt

from ami.protocol import topics
from ami.runtime import mqtt
from ami.security.bus_files import BusIdentityMissing, bus_mode, read_identity


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported broker scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerUrl(parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls)


def load_credentials(data_dir: Path | None, user: str | None) -> tuple[str, str] | None:
    """(user, password) for the one identity ``user``, or None for an anonymous connection.

    Anonymous only when asked (``user`` or ``data_dir`` None) or when the network
    was provisioned with ``--no-bus-security``.  On a secured network only
    ``user``'s own file is read; if it is missing, ``BusIdentityMissing``.
    """
    if user is None or data_dir is None:
        return None
    mode = bus_mode(Path(data_dir))
    if mode == "anonymous":
        return None
    if mode == "unprovisioned":
        raise BusIdentityMissing(
            f"{data_dir} is not a provisioned network (no bus/ folder, no bus-anonymous marker): run "
            "`ami provision` (add --no-bus-security for an open bus); not connecting anonymously"
        )
    return user, read_identity(Path(data_dir) / "bus", user)


class Client(aiomqtt.Client):
    """``aiomqtt.Client`` (2.x) with two races of a vanishing broker closed.

    * When the broker drops the connection, aiomqtt stores "Unexpected
      disconnection" in ``_disconnected``, a future only the ``messages``
      iterator reads.  A session that is winding down (no reader any more)
      leaves it unretrieved and asyncio prints "Future exception was never
      retrieved" when it is collected: mark it retrieved on every connect.
    * paho asks for a write watch (``on_socket_register_write``, on a publish)
      and aiomqtt adds it with ``call_soon_threadsafe``; when the broker closes
      the socket in between, ``loop.add_writer`` runs on a closed descriptor
      and uvloop logs "Exception in callback Loop.add_writer ... KeyError /
      OSError [Errno 9] Bad file descriptor" (or, if the number was reused
      meanwhile, watches another socket).  Add the watch, and the read watch
      on connect, only if that socket is still the client's and still open;
      if uvloop refuses it (its watcher of that descriptor closed on a socket
      error: "RuntimeError ... the handler is closed"), end the connection
      as a disconnection instead of a traceback.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._disconnected.add_done_callback(_retrieve)

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self._disconnected.add_done_callback(_retrieve)  # a new future after a disconnection
        return self

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        def callback() -> None:
            # As aiomqtt: a failing read is a broken connection.
            try:
                while True:
                    client.loop_read()
                    if hasattr(client._sock, "pending") and client._sock.pending() > 0:
                        continue
                    break
            except Exception as exc:  # noqa: BLE001
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def watch() -> None:
            if client.socket() is sock and sock.fileno() >= 0 and self._watch(self._loop.add_reader, sock, callback):
                self._misc_task = self._loop.create_task(self._misc_loop())

        # Called from the executor thread that runs paho's connect().
        self._loop.call_soon_threadsafe(watch)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        def callback() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # noqa: BLE001
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def watch() -> None:
            if client.socket() is sock and sock.fileno() >= 0 and getattr(client, "_registered_write", True):
                self._watch(self._loop.add_writer, sock, callback)

        self._loop.call_soon_threadsafe(watch)

    def _watch(self, add: Any, sock: Any, callback: Any) -> bool:
        try:
            add(sock.fileno(), callback)
            return True
        except (OSError, RuntimeError) as exc:
            # uvloop closes a descriptor's watcher on a socket error (and
            # keeps it, closed): the connection is gone, say so.
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return False


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


#: broker list -> connections made so far: each new connection (a reconnect)
#: takes the next URL of a comma-separated ``--broker`` (cluster failover).
_ROTATION: dict[str, int] = {}


def pick_broker(broker: str) -> BrokerUrl:
    """``mqtt://a:1,mqtt://b:2,...``: the next URL in turn (the first one first);
    a single URL: that one.  The nodes of a cluster (``ami cluster``) are given so."""
    urls = [u.strip() for u in broker.split(",") if u.strip()]
    if len(urls) <= 1:
        return parse_broker_url(broker)
    n = _ROTATION.get(broker, 0)
    _ROTATION[broker] = n + 1
    return parse_broker_url(urls[n % len(urls)])


def _connection(
    broker: str | BrokerUrl, user: str | None, data_dir: Path | None, identifier: str | None
) -> tuple[BrokerUrl, str | None, str | None, ssl.SSLContext | None, str]:
    """What both clients need: the URL, this identity's credentials (never a
    silent anonymous fallback), TLS, and a client id that cannot be guessed."""
    url = broker if isinstance(broker, BrokerUrl) else pick_broker(broker)
    credentials = load_credentials(data_dir, user)
    username, password = credentials if credentials else (None, None)
    tls_context = None
    if url.tls:
        ca = Path(data_dir) / "bus" / "ca.pem" if data_dir else None
        tls_context = ssl.create_default_context(cafile=str(ca) if ca and ca.exists() else None)
    # Two clients with one id kick each other off the broker, and whoever can
    # predict an id can aim at that session: keep the readable name, add 64
    # random bits (not the pid, which the retained metrics publish).
    return url, username, password, tls_context, f"{identifier or user or 'anon'}-{secrets.token_hex(8)}"


def make_client(
    broker: str | BrokerUrl,
    *,
    user: str | None,
    data_dir: Path | None = None,
    identifier: str | None = None,
    status_topic: str | None = None,
    max_inflight: int = 1000,
) -> aiomqtt.Client:
    """An aiomqtt client for ``user``, with TCP_NODELAY, TLS and a Last Will.

    ``user=None`` asks for an anonymous connection; otherwise see
    `load_credentials` (never a silent anonymous fallback).
    """
    url, username, password, tls_context, identifier = _connection(broker, user, data_dir, identifier)
    will = aiomqtt.Will(status_topic, b"offline", qos=1, retain=True) if status_topic else None
    client = Client(
        url.host,
        url.port,
        username=username,
        password=password,
        identifier=identifier,
        will=will,
        keepalive=30,
        tls_context=tls_context,
        max_inflight_messages=max_inflight,
        # paho does not set TCP_NODELAY; without it QoS 1 round trips wait on Nagle.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        timeout=30,
    )
    # aiomqtt warns past 10 concurrent publishes; we pipeline hundreds on purpose.
    client.pending_calls_threshold = 100_000
    return client


def make_fast_client(
    broker: str | BrokerUrl,
    *,
    user: str | None,
    data_dir: Path | None = None,
    identifier: str | None = None,
    status_topic: str | None = None,
) -> mqtt.Client:
    """The hot paths' client (``ami.runtime.mqtt``: fleet segments, relays, head-end),
    with the same identity, TLS, Last Will and client-id rules as `make_client`."""
    url, username, password, tls_context, identifier = _connection(broker, user, data_dir, identifier)
    will = mqtt.Will(status_topic, b"offline", 1, True) if status_topic else None
    return mqtt.Client(
        url.host, url.port, username=username, password=password, identifier=identifier, will=will, keepalive=30,
        tls_context=tls_context, timeout=30,
    )


async def publish_all(
    client: aiomqtt.Client, items: Iterable[tuple[str, bytes]], *, qos: int, window: int = 256
) -> None:
    """Publish many messages with up to ``window`` in flight.

    aiomqtt's publish awaits each QoS 1 acknowledgement; publishing one at a
    time would cost a round trip per message.
    """
    pending: list[asyncio.Task] = []
    for topic, payload in items:
        pending.append(asyncio.ensure_future(client.publish(topic, payload, qos=qos)))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    if pending:
        await asyncio.gather(*pending)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for brokers started by tests and load tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


async def wait_for_broker(broker: str, *, timeout: float = 30.0) -> None:
    """Wait until the broker's TCP port accepts connections (Procfile start-up order);
    of a comma-separated list, any one of them."""
    urls = [parse_broker_url(u) for u in broker.split(",") if u.strip()] or [parse_broker_url(broker)]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for url in urls:
            try:
                _reader, writer = await asyncio.open_connection(url.host, url.port)
                writer.close()
                return
            except OSError:
                if asyncio.get_running_loop().time() > deadline and url is urls[-1]:
                    raise
        await asyncio.sleep(0.2)


__all__ = ["BrokerUrl", "Client", "free_port", "port_open", "parse_broker_url", "load_credentials", "BusIdentityMissing", "make_client",
           "make_fast_client", "pick_broker", "publish_all", "wait_for_broker", "topics"]
