"""Connecting to the MQTT bus: broker URLs, credentials, TLS and client options.

Every service takes ``--broker mqtt://host:port`` (``mqtts://`` for TLS) and a
data folder; when ``ami provision`` wrote bus credentials there
(``DATA/bus/credentials.json``), clients log in as their role's user,
otherwise they connect anonymously (the embedded default).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt

from ami.protocol import topics


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


def load_credentials(data_dir: Path | None) -> dict[str, str]:
    """user -> password, or {} when the network was provisioned without bus auth."""
    if data_dir is None:
        return {}
    path = Path(data_dir) / "bus" / "credentials.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def make_client(
    broker: str | BrokerUrl,
    *,
    user: str | None,
    data_dir: Path | None = None,
    identifier: str | None = None,
    status_topic: str | None = None,
    max_inflight: int = 1000,
) -> aiomqtt.Client:
    """An aiomqtt client for ``user``, with TCP_NODELAY, TLS and a Last Will."""
    url = broker if isinstance(broker, BrokerUrl) else parse_broker_url(broker)
    credentials = load_credentials(data_dir)
    username = password = None
    if credentials and user is not None:
        if user not in credentials:
            raise KeyError(f"no bus credentials for user {user!r}")
        username, password = user, credentials[user]
    tls_context = None
    if url.tls:
        ca = Path(data_dir) / "bus" / "ca.pem" if data_dir else None
        tls_context = ssl.create_default_context(cafile=str(ca) if ca and ca.exists() else None)
    will = aiomqtt.Will(status_topic, b"offline", qos=1, retain=True) if status_topic else None
    if identifier is not None:
        # Two clients with one id kick each other off the broker: keep the
        # readable name, make it unique per process.
        identifier = f"{identifier}-{os.getpid()}"
    client = aiomqtt.Client(
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
    """Wait until the broker's TCP port accepts connections (Procfile start-up order)."""
    url = parse_broker_url(broker)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _reader, writer = await asyncio.open_connection(url.host, url.port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


__all__ = ["BrokerUrl", "free_port", "port_open", "parse_broker_url", "load_credentials", "make_client", "publish_all", "wait_for_broker", "topics"]
