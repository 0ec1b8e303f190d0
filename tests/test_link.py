"""ami.runtime.link.run_link, the reconnect loop of every service, and the log format choice."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Self

import aiomqtt
import pytest
import structlog

from ami.runtime import link as link_module
from ami.runtime.link import close_client, run_link
from ami.runtime.logs import configure_logging, get_logger, resolve_log_format
from ami.runtime.metrics import Metrics

pytestmark = pytest.mark.timeout(30)


class FakeClient:
    """Connects after ``failures`` refused attempts; records what happened."""

    def __init__(self, failures: int = 0, hang_on_exit: bool = False) -> None:
        self.failures = failures
        self.hang_on_exit = hang_on_exit
        self.attempts = 0
        self.exits = 0

    async def __aenter__(self) -> Self:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise aiomqtt.MqttError("[Errno 111] Connection refused")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.exits += 1
        if self.hang_on_exit:
            await asyncio.sleep(3600)


def run(coro):
    return asyncio.run(coro)


def test_reconnects_with_backoff_until_the_session_returns() -> None:
    async def main() -> tuple[bool, FakeClient, Metrics]:
        client, metrics, stop = FakeClient(failures=3), Metrics("test", "t"), asyncio.Event()
        sessions: list[object] = []

        async def session(c: object) -> None:
            sessions.append(c)

        done = await run_link(client, session, stop=stop, metrics=metrics, backoff_initial=0.01, jitter=0.5)
        assert sessions == [client]
        return done, client, metrics

    done, client, metrics = run(main())
    assert done is True
    assert client.attempts == 4 and client.exits == 1
    assert metrics.counters["reconnects"] == 3


def test_a_lost_session_reconnects_and_a_factory_makes_a_client_per_attempt() -> None:
    async def main() -> tuple[list[FakeClient], Metrics]:
        made: list[FakeClient] = []
        metrics, stop = Metrics("test", "t"), asyncio.Event()

        def factory() -> FakeClient:
            made.append(FakeClient())
            return made[-1]

        async def session(c: object) -> None:
            if len(made) < 3:
                raise aiomqtt.MqttError("Disconnected during message iteration")

        assert await run_link(factory, session, stop=stop, metrics=metrics, counter="monitor_reconnects",
                              backoff_initial=0.01)
        return made, metrics

    made, metrics = run(main())
    assert len(made) == 3 and all(c.exits == 1 for c in made)
    assert metrics.counters["monitor_reconnects"] == 2


def test_never_reconnects_once_stopping() -> None:
    async def main() -> tuple[bool, FakeClient, Metrics, float]:
        client, metrics, stop = FakeClient(), Metrics("test", "t"), asyncio.Event()
        loop = asyncio.get_running_loop()

        async def session(c: object) -> None:
            stop.set()  # SIGTERM, then the broker goes away
            raise aiomqtt.MqttError("Disconnected during message iteration")

        t0 = loop.time()
        done = await run_link(client, session, stop=stop, metrics=metrics, backoff_initial=5.0)
        return done, client, metrics, loop.time() - t0

    done, client, metrics, elapsed = run(main())
    assert done is False
    assert client.attempts == 1 and client.exits == 1
    assert metrics.counters["reconnects"] == 0
    assert elapsed < 1.0


def test_the_backoff_wait_ends_when_stop_is_set() -> None:
    async def main() -> tuple[bool, FakeClient, float]:
        client, stop, extra = FakeClient(failures=100), asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, extra.set)
        t0 = loop.time()
        done = await run_link(client, lambda c: asyncio.sleep(0), stop=(stop, extra), backoff_initial=10.0)
        return done, client, loop.time() - t0

    done, client, elapsed = run(main())
    assert done is False and client.attempts == 1
    assert elapsed < 2.0


def test_the_connect_gate_and_a_bounded_exit() -> None:
    async def main() -> tuple[FakeClient, float]:
        client, stop, gate = FakeClient(hang_on_exit=True), asyncio.Event(), asyncio.Semaphore(1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await run_link(client, lambda c: asyncio.sleep(0), stop=stop, gate=gate, close_timeout=0.2)
        assert not gate.locked()
        return client, loop.time() - t0

    client, elapsed = run(main())
    assert client.exits == 1 and elapsed < 2.0


def test_close_client_never_raises() -> None:
    class Broken(FakeClient):
        async def __aexit__(self, *exc: object) -> None:
            raise aiomqtt.MqttError("The client is not currently connected.")

    run(close_client(Broken()))


def test_cancelling_the_link_still_disconnects() -> None:
    async def main() -> FakeClient:
        client, stop = FakeClient(), asyncio.Event()
        task = asyncio.create_task(run_link(client, lambda c: asyncio.sleep(3600), stop=stop))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return client

    assert run(main()).exits == 1


def test_one_warning_per_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []

    class Recorder:
        def __getattr__(self, level: str):
            return lambda event, **kw: events.append((level, event))

    monkeypatch.setattr(link_module, "log", Recorder())

    async def main() -> None:
        await run_link(FakeClient(failures=4), lambda c: asyncio.sleep(0), stop=asyncio.Event(),
                       backoff_initial=0.001)

    run(main())
    assert [e for e in events if e[0] == "warning"] == [("warning", "bus connection failed")]
    assert ("info", "bus connection restored") in events


@pytest.mark.parametrize(
    ("explicit", "env", "tty", "expected"),
    [
        (None, None, True, "console"),
        (None, None, False, "json"),
        (None, "console", False, "console"),
        (None, "json", True, "json"),
        ("json", "console", False, "json"),
        ("console", None, False, "console"),
        (None, "bogus", False, "json"),
    ],
)
def test_log_format_choice(monkeypatch, explicit, env, tty, expected) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    if env is None:
        monkeypatch.delenv("AMI_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("AMI_LOG_FORMAT", env)
    assert resolve_log_format(explicit, Stream()) == expected


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_both_formats_redact_bytes(monkeypatch, log_format) -> None:
    monkeypatch.delenv("AMI_LOG_FORMAT", raising=False)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # leave the root logger alone
    stream = io.StringIO()
    configure_logging("info", stream=stream, log_format=log_format)
    try:
        get_logger("t").info("key_loaded", key=bytes(range(16)), meter="m1")
    finally:
        structlog.reset_defaults()
    line = stream.getvalue().strip()
    assert "<16 bytes>" in line and "0102" not in line and "\\x01" not in line
    if log_format == "json":
        assert json.loads(line)["event"] == "key_loaded"
    else:
        assert not line.startswith("{") and "key_loaded" in line and "\x1b[" not in line  # no colours off a TTY


def test_the_aiomqtt_internals_bus_client_overrides_still_exist() -> None:
    """ami.runtime.bus.Client replaces two socket callbacks of aiomqtt 2.x and
    reads its disconnection future (see its docstring).  If an upgrade within
    the pinned range renames them, fail here rather than in a demo's stop."""
    import inspect

    import aiomqtt

    from ami.runtime.bus import Client, make_client

    for name in ("_on_socket_open", "_on_socket_register_write", "_misc_loop"):
        assert callable(getattr(aiomqtt.Client, name, None)), name
    assert inspect.signature(Client._on_socket_open).parameters.keys() == \
        inspect.signature(aiomqtt.Client._on_socket_open).parameters.keys()

    async def probe() -> None:
        client = make_client("mqtt://127.0.0.1:1", user=None)
        assert isinstance(client, Client)
        assert isinstance(client._disconnected, asyncio.Future)
        assert client._client.on_socket_open == client._on_socket_open  # paho calls our override

    asyncio.run(probe())
