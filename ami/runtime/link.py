"""One reconnecting MQTT link, shared by every service.

A service describes what one connection does in a *session* coroutine that
receives the connected client: subscribe, serve, and return when its work is
done (or run until cancelled).  ``run_link`` does the rest:

    async def session(client: aiomqtt.Client) -> None:
        await client.subscribe("a/#", qos=1)
        async for message in client.messages:
            ...

    await run_link(client, session, stop=stop, metrics=metrics, name="relay c0001", gate=gate)

* connects (under ``gate``, a semaphore bounding connections opening at once,
  so thousands of links do not all hit the broker in the same millisecond);
* runs the session; when it returns, disconnects and returns ``True``;
* on ``aiomqtt.MqttError`` (connect refused, connection lost): disconnects,
  counts ``counter`` in ``metrics``, waits a capped exponential backoff with
  jitter, and connects again.  An outage is logged once (a warning), the
  further failed attempts at debug level, the recovery at info;
* once ``stop`` is set it never connects again: a lost broker then is the
  expected end of a shutdown, logged at debug (and once per process at
  info), and ``run_link`` returns ``False``.  The backoff wait ends at once
  when ``stop`` is set;
* disconnecting is bounded (``close_timeout``): a dead socket cannot hold up
  a shutdown.

A session that raises anything but ``MqttError`` ends the link: the error
propagates (after the disconnect).  Cancelling the task running ``run_link``
cancels the session and still disconnects.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiomqtt

from ami.runtime.logs import get_logger

log = get_logger("link")

Session = Callable[[aiomqtt.Client], Awaitable[Any]]

_shutdown_loss_logged = False


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: no "Future exception was never retrieved"


def consume_disconnect(client: aiomqtt.Client) -> None:
    """Retrieve the exception of the client's disconnection future once it is set.

    aiomqtt (2.x) stores "Unexpected disconnection" in a future that only
    the ``messages`` iterator reads; a session winding down no longer
    iterates, and asyncio then prints "Future exception was never
    retrieved" when the future is collected.  ``ami.runtime.bus.make_client``
    clients do this on every connect; this helper covers other clients.
    """
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future):
        future.add_done_callback(_consume)


async def close_client(client: aiomqtt.Client, timeout: float = 5.0) -> None:
    """Disconnect, at most ``timeout`` seconds, never raising (but for cancellation)."""
    try:
        await asyncio.wait_for(client.__aexit__(None, None, None), timeout)
    except TimeoutError:
        _forget_connection(client)
    except Exception as exc:  # noqa: BLE001 - MqttError, OSError: it is gone either way
        log.debug("disconnect incomplete", error=str(exc) or type(exc).__name__)
    finally:
        consume_disconnect(client)


def _forget_connection(client: aiomqtt.Client) -> None:
    """After an ``__aexit__`` cut short, leave the client reusable, as aiomqtt's
    own forced disconnection does (else the next connect says "not reentrant")."""
    disconnected = getattr(client, "_disconnected", None)
    if isinstance(disconnected, asyncio.Future) and not disconnected.done():
        disconnected.set_result(None)
    if isinstance(getattr(client, "_connected", None), asyncio.Future):
        client._connected = asyncio.get_running_loop().create_future()
    lock = getattr(client, "_lock", None)
    if isinstance(lock, asyncio.Lock) and lock.locked():
        lock.release()


def _stopping(stops: tuple[asyncio.Event, ...]) -> bool:
    return any(event.is_set() for event in stops)


async def _wait_any(stops: tuple[asyncio.Event, ...], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in stops]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run_link(
    client: aiomqtt.Client | Callable[[], aiomqtt.Client],
    session: Session,
    *,
    stop: asyncio.Event | Iterable[asyncio.Event],
    metrics: Any = None,
    counter: str = "reconnects",
    name: str = "bus",
    gate: asyncio.Semaphore | None = None,
    backoff_initial: float = 0.5,
    backoff_max: float = 10.0,
    jitter: float = 0.2,
    close_timeout: float = 5.0,
) -> bool:
    """Run ``session`` on a connection to the broker, reconnecting until it returns.

    ``client`` is an aiomqtt client (reused for every attempt) or a function
    making a new one per attempt.  ``stop`` is an event (or several): once
    one is set, no new connection is attempted.  ``metrics`` (anything with
    ``incr(name)``, e.g. ``ami.runtime.metrics.Metrics``) counts each lost
    connection or failed attempt as ``counter``; ``name`` identifies the link
    in the logs.  The backoff starts at ``backoff_initial`` seconds, doubles
    up to ``backoff_max``, plus up to ``jitter`` of itself at random, and
    starts over after each successful connect.

    Returns ``True`` when the session returned, ``False`` when the link gave
    up because ``stop`` was set.
    """
    global _shutdown_loss_logged
    stops = (stop,) if isinstance(stop, asyncio.Event) else tuple(stop)
    backoff = backoff_initial
    failures = 0  # failed attempts in the current outage
    while True:
        if _stopping(stops):
            return False
        current = client() if callable(client) else client
        connected = False
        try:
            if gate is not None:
                async with gate:
                    await current.__aenter__()
            else:
                await current.__aenter__()
            connected = True
            consume_disconnect(current)
            backoff = backoff_initial
            if failures:
                log.info("bus connection restored", link=name, failed_attempts=failures)
                failures = 0
            try:
                await session(current)
            finally:
                await close_client(current, close_timeout)
            return True
        except aiomqtt.MqttError as exc:
            if _stopping(stops):
                # Expected while the system stops (e.g. the broker went first).
                log.debug("bus connection lost while stopping", link=name, error=str(exc))
                if not _shutdown_loss_logged:
                    _shutdown_loss_logged = True
                    log.info("broker gone while stopping: not reconnecting", link=name)
                return False
            if metrics is not None:
                metrics.incr(counter)
            delay = backoff * (1.0 + jitter * random.random())
            if failures == 0:
                log.warning(
                    "bus connection lost" if connected else "bus connection failed",
                    link=name, error=str(exc), retry_in_s=round(delay, 2),
                )
            else:
                log.debug("bus reconnect failed", link=name, error=str(exc), retry_in_s=round(delay, 2))
            failures += 1
            await _wait_any(stops, delay)
            backoff = min(backoff * 2, backoff_max)


__all__ = ["close_client", "consume_disconnect", "run_link"]
