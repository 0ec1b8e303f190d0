"""``ami monitor``: a live view of ``ami/v1/monitor/#``.

``MonitorModel`` is the pure part: feed it (topic, payload) pairs and ask for
a ``summary()``.  It keeps the latest status and metrics snapshot of each
component instance, the last events and counts of events; anything it cannot
use is counted as garbage, never raised.  ``main`` connects as the bus user
``monitor`` (read-only), feeds the model and shows it with ``rich``, or
prints one text/JSON line every ``--every`` seconds (``--plain``/``--json``,
or when stdout is not a terminal).

The module imports only the standard library at import time, and loads
rich and the bus client when it runs: importing it stays cheap for tests and
for anything that only wants ``MonitorModel``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

MAX_PAYLOAD = 1 << 20  # bytes; a metrics snapshot is a few KB
MAX_INSTANCES = 10_000  # component/id pairs remembered
MAX_KEYS = 200  # distinct names kept per counter table (the rest fold into "(other)")
MAX_NAME = 128  # component, id, counter and reason names longer than this are garbage
RECENT_EVENTS = 20

METER_COUNTERS = ("readings_pushed", "frames_sent")
RELAY_COUNTERS = ("frames_up", "frames_down")
HEADEND_COUNTERS = (
    "frames_up",
    "frames_accepted",
    "frames_rejected",
    "frames_down",
    "readings_stored",
    "readings_duplicate",
    "gaps_detected",
    "readings_gap_filled",
    "readings_unrecoverable",
    "associations",
    "session_renewals",
    "associations_failed",
    "association_timeouts",
    "key_transfers_sent",
    "key_transfers_failed",
    "events_suppressed",
)
HEADEND_GAUGES = ("meters", "sessions", "pending", "meters_with_gaps", "inbox", "last_commit_ms")
#: the counters shown next to each instance (in the live view's component table)
HEADLINE = {
    "meters": METER_COUNTERS,
    "concentrator": RELAY_COUNTERS,
    "headend": ("readings_stored", "frames_rejected"),
}


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _numbers(value: Any) -> dict[str, float | int]:
    """The numeric entries of a JSON object, at most MAX_KEYS of them."""
    out: dict[str, float | int] = {}
    if not isinstance(value, dict):
        return out
    for key, v in value.items():
        n = _number(v)
        if n is not None and isinstance(key, str) and len(key) <= MAX_NAME:
            out[key] = n
            if len(out) >= MAX_KEYS:
                break
    return out


def _bump(counter: Counter[str], key: str, n: int = 1) -> None:
    if key not in counter and len(counter) >= MAX_KEYS:
        key = "(other)"
    counter[key] += n


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        return value[:100]
    if value is None or isinstance(value, bool) or _number(value) is not None:
        return value
    return None


class MonitorModel:
    """The latest state of the monitor topics, bounded in memory."""

    def __init__(self, *, recent: int = RECENT_EVENTS, clock: Callable[[], float] = time.time) -> None:
        from ami.protocol import topics  # lazy: see the module docstring

        self._prefix = f"{topics.ROOT}/monitor/"
        self._events_topic = topics.HEADEND_EVENTS
        self.clock = clock
        self.status: dict[tuple[str, str], str] = {}
        self.metrics: dict[tuple[str, str], dict[str, Any]] = {}
        self.received: dict[tuple[str, str], float] = {}  # when the last metrics arrived (our clock)
        self.rates: dict[tuple[str, str], dict[str, float]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=recent)
        self.event_kinds: Counter[str] = Counter()
        self.event_reasons: Counter[str] = Counter()  # of "rejected" events
        self.garbage: Counter[str] = Counter()
        self.messages = 0

    # -- input ---------------------------------------------------------------

    def update(self, topic: str, payload: bytes) -> None:
        """Take one message; garbage is counted in ``self.garbage``, never raised."""
        self.messages += 1
        try:
            self._update(topic, payload)
        except Exception:  # noqa: BLE001 - a dashboard must survive anything on the bus
            _bump(self.garbage, "error")

    def _update(self, topic: str, payload: bytes) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            payload = b"" if payload is None else str(payload).encode()
        if len(payload) > MAX_PAYLOAD:
            _bump(self.garbage, "too_large")
            return
        if topic == self._events_topic:
            self._event(bytes(payload))
            return
        parts = topic[len(self._prefix) :].split("/") if topic.startswith(self._prefix) else []
        if len(parts) != 3 or not parts[0] or not parts[1] or max(map(len, parts)) > MAX_NAME:
            _bump(self.garbage, "unknown_topic")
            return
        component, ident, leaf = parts
        key = (component, ident)
        if leaf not in ("status", "metrics"):
            _bump(self.garbage, "unknown_topic")
            return
        if not payload:  # an empty retained message clears the topic
            if leaf == "status":
                self.status.pop(key, None)
            else:
                for table in (self.metrics, self.received, self.rates):
                    table.pop(key, None)
            return
        if key not in self.status and key not in self.metrics and len(self._instances()) >= MAX_INSTANCES:
            _bump(self.garbage, "too_many_instances")
            return
        if leaf == "status":
            text = payload.decode("utf-8", "replace").strip()
            if text not in ("online", "offline"):
                _bump(self.garbage, "bad_status")
                return
            self.status[key] = text
        else:
            self._metrics(key, payload)

    def _metrics(self, key: tuple[str, str], payload: bytes) -> None:
        try:
            raw = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            _bump(self.garbage, "bad_json")
            return
        if not isinstance(raw, dict) or not isinstance(raw.get("counters"), dict):
            _bump(self.garbage, "bad_metrics")
            return
        now = self.clock()
        snap = {
            "time": _number(raw.get("time")) or now,
            "uptime_s": _number(raw.get("uptime_s")),
            "counters": _numbers(raw["counters"]),
            "rejected": _numbers(raw.get("rejected")),
            "gauges": _numbers(raw.get("gauges")),
            "process": _numbers(raw.get("process")),
            "latency_ms": _numbers(raw.get("latency_ms")),
        }
        old = self.metrics.get(key)
        if old is not None:
            dt = snap["time"] - old["time"]
            if dt > 0:
                before = old["counters"]
                self.rates[key] = {
                    name: (value - before.get(name, 0)) / dt
                    for name, value in snap["counters"].items()
                    # a counter that went down means the process restarted: no rate
                    if value >= before.get(name, 0)
                }
        self.metrics[key] = snap
        self.received[key] = now

    def _event(self, payload: bytes) -> None:
        try:
            raw = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            _bump(self.garbage, "bad_json")
            return
        kind = raw.get("kind") if isinstance(raw, dict) else None
        if not isinstance(kind, str) or not kind or len(kind) > MAX_NAME:
            _bump(self.garbage, "bad_event")
            return
        event = {}
        for k, v in list(raw.items())[:20]:
            if isinstance(k, str) and len(k) <= MAX_NAME and (v := _scalar(v)) is not None:
                event[k] = v
        self.events.append(event)
        _bump(self.event_kinds, kind)
        if kind == "rejected":
            reason = raw.get("reason")
            _bump(self.event_reasons, reason if isinstance(reason, str) and len(reason) <= MAX_NAME else "?")

    # -- output --------------------------------------------------------------

    def _instances(self) -> list[tuple[str, str]]:
        return sorted(set(self.status) | set(self.metrics))

    def _rate(self, key: tuple[str, str], name: str) -> float | None:
        if self.status.get(key) == "offline":
            return 0.0
        return self.rates.get(key, {}).get(name)

    def _total(self, component: str, names: tuple[str, ...], gauges: bool = False) -> dict[str, Any]:
        """Sum of ``names`` over every instance of ``component``, with summed rates."""
        keys = [k for k in self.metrics if k[0] == component]
        table = "gauges" if gauges else "counters"
        out: dict[str, Any] = {n: sum(self.metrics[k][table].get(n, 0) for k in keys) for n in names}
        if not gauges:
            rates = {}
            for n in names:
                known = [r for k in keys if (r := self._rate(k, n)) is not None]
                if known:
                    rates[n] = round(sum(known), 3)
            out["rates"] = rates
        return out

    def summary(self) -> dict[str, Any]:
        now = self.clock()
        components: dict[str, dict[str, int]] = {}
        instances: dict[str, dict[str, Any]] = {}
        for key in self._instances():
            component, ident = key
            status = self.status.get(key, "unknown")
            c = components.setdefault(component, {"online": 0, "offline": 0, "unknown": 0, "total": 0})
            c[status] += 1
            c["total"] += 1
            snap = self.metrics.get(key)
            instances[f"{component}/{ident}"] = {
                "status": status,
                "age_s": round(now - self.received[key], 1) if key in self.received else None,
                "counters": dict(snap["counters"]) if snap else {},
                "rates": {} if status == "offline" else {n: round(r, 3) for n, r in self.rates.get(key, {}).items()},
                "process": dict(snap["process"]) if snap else {},
            }

        headend = self._total("headend", HEADEND_COUNTERS)
        headend.update(self._total("headend", HEADEND_GAUGES, gauges=True))
        rejected: Counter[str] = Counter()
        reprogrammed: Counter[str] = Counter()
        latency: dict[str, float] = {}
        for key, snap in self.metrics.items():
            if key[0] != "headend":
                continue
            rejected.update({r: n for r, n in snap["rejected"].items() if n})
            for name, n in snap["counters"].items():
                if name.startswith("reprogrammed_") and n:
                    reprogrammed[name.removeprefix("reprogrammed_")] += n
            for p in ("p50", "p99"):  # several head-ends: the worst one
                if p in snap["latency_ms"] and snap["latency_ms"].get("count"):
                    latency[p] = max(latency.get(p, 0.0), snap["latency_ms"][p])
        headend.update(rejected=dict(rejected), reprogrammed=dict(reprogrammed), latency_ms=latency)

        return {
            "time": now,
            "components": components,
            "meters": self._total("meters", METER_COUNTERS),
            "relays": self._total("concentrator", RELAY_COUNTERS),
            "headend": headend,
            "events": {
                "by_kind": dict(self.event_kinds),
                "rejected_by_reason": dict(self.event_reasons),
                "recent": list(self.events),
            },
            "instances": instances,
            "messages": self.messages,
            "garbage": dict(self.garbage),
        }


# -- text --------------------------------------------------------------------


def _fmt_rate(rate: float | None) -> str:
    return "" if rate is None else f" ({rate:+.0f}/s)"


def _updown(c: dict[str, int] | None) -> str:
    if not c:
        return "?"
    if c["online"] == c["total"]:
        return "online"
    if c["online"] == 0:
        return "offline"
    return f"{c['online']}/{c['total']} online"


def summary_line(s: dict[str, Any]) -> str:
    """One compact line, e.g. ``headend online | meters 1/1 relays 1/1 | readings ...``."""
    comps, h, m = s["components"], s["headend"], s["meters"]
    meters, relays = comps.get("meters", {}), comps.get("concentrator", {})
    rejected = f"rejected {h['frames_rejected']}"
    if h["rejected"]:
        top = sorted(h["rejected"].items(), key=lambda kv: -kv[1])[:3]
        rejected += " (" + ", ".join(f"{r} {n}" for r, n in top) + ")"
    reprogrammed = " ".join(f"{k} {n}" for k, n in sorted(h["reprogrammed"].items())) or "0"
    parts = [
        f"headend {_updown(comps.get('headend'))}",
        f"meters {meters.get('online', 0)}/{meters.get('total', 0)} "
        f"relays {relays.get('online', 0)}/{relays.get('total', 0)}",
        f"readings {m['readings_pushed']}{_fmt_rate(m['rates'].get('readings_pushed'))} pushed, "
        f"{h['readings_stored']}{_fmt_rate(h['rates'].get('readings_stored'))} stored",
        rejected,
        f"sessions {h['sessions']} renewals {h['session_renewals']}",
        f"reprogrammed {reprogrammed}",
        f"p99 {h['latency_ms']['p99']:g} ms" if "p99" in h["latency_ms"] else "p99 -",
    ]
    if s["garbage"]:
        parts.append(f"garbage {sum(s['garbage'].values())}")
    return " | ".join(parts)


# -- rich --------------------------------------------------------------------


def render(s: dict[str, Any], max_rows: int = 30) -> Any:
    """The live view of one summary, as a rich renderable (names from the bus are escaped)."""
    from rich.columns import Columns
    from rich.console import Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    comps = Table(expand=True)
    for col in ("component", "id", "status", "age", "activity", "cpu s", "rss MB"):
        comps.add_column(col, justify="right" if col in ("age", "cpu s", "rss MB") else "left")
    style = {"online": "green", "offline": "red", "unknown": "yellow"}
    items = list(s["instances"].items())
    for name, inst in items[:max_rows]:
        component, ident = name.split("/", 1)
        activity = ", ".join(
            f"{n} {inst['counters'].get(n, 0)}{_fmt_rate(inst['rates'].get(n))}" for n in HEADLINE.get(component, ())
        )
        proc = inst["process"]
        comps.add_row(
            escape(component),
            escape(ident),
            f"[{style[inst['status']]}]{inst['status']}[/]",
            "-" if inst["age_s"] is None else f"{inst['age_s']:.0f}s",
            activity,
            f"{proc['cpu_s']:.1f}" if "cpu_s" in proc else "-",
            f"{proc['rss_bytes'] / 1e6:.0f}" if "rss_bytes" in proc else "-",
        )
    if len(items) > max_rows:
        comps.add_row("...", f"{len(items) - max_rows} more", "", "", "", "", "")

    h = s["headend"]
    head = Table("head-end", "value", "rate", expand=True)
    for n in HEADEND_COUNTERS:  # the essentials always, the rest once they move
        if h[n] or n in ("frames_accepted", "frames_rejected", "readings_stored", "associations", "session_renewals"):
            rate = h["rates"].get(n)
            head.add_row(n, str(h[n]), "" if rate is None else f"{rate:+.0f}/s")
    for n in HEADEND_GAUGES:
        head.add_row(f"[dim]{n}[/]", f"{h[n]:g}", "")
    for k, n in sorted(h["reprogrammed"].items()):
        head.add_row(f"reprogrammed {escape(k)}", str(n), "")
    for p, v in h["latency_ms"].items():
        head.add_row(f"latency {p}", f"{v:g} ms", "")

    rej = Table("reason", "metrics", "events", expand=True)
    by_event = s["events"]["rejected_by_reason"]
    for reason in sorted(set(h["rejected"]) | set(by_event)):
        rej.add_row(escape(reason), str(h["rejected"].get(reason, 0)), str(by_event.get(reason, 0)))

    ev = Table("time", "kind", "details", expand=True)
    for e in reversed(s["events"]["recent"]):
        t = e.get("time")
        when = time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"
        details = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "kind"))
        ev.add_row(when, escape(str(e.get("kind"))), escape(details))

    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["events"]["by_kind"].items())) or "none"
    footer = f"{s['messages']} messages, events: {kinds}"
    if s["garbage"]:
        footer += f", garbage: {s['garbage']}"
    return Group(
        Panel(escape(summary_line(s)), title="ami monitor"),
        Panel(comps, title="components"),
        Columns([Panel(head, title="head-end"), Panel(rej, title="rejections by reason")], expand=True),
        Panel(ev, title=f"last {len(s['events']['recent'])} events"),
        f"[dim]{escape(footer)}",
    )


# -- command -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    from ami.runtime.service import add_common_arguments

    add_common_arguments(parser, config)
    parser.add_argument(
        "--plain", action="store_true", help="a summary line every --every seconds (the default when stdout is no TTY)"
    )
    parser.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the broker to listen")
    parser.add_argument("--json", action="store_true", help="print each summary as a JSON line (implies --plain)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between plain/JSON lines (default 5)")
    parser.add_argument("--duration", type=float, default=None, help="exit after this many seconds")


def _emit(model: MonitorModel, as_json: bool) -> None:
    s = model.summary()
    print(json.dumps(s, separators=(",", ":")) if as_json else summary_line(s), flush=True)


async def _run(args: argparse.Namespace, plain: bool) -> int:
    import aiomqtt

    from ami.protocol import topics
    from ami.runtime.bus import make_client, wait_for_broker

    # Started beside the broker (Procfile): give it a moment to listen.
    try:
        await wait_for_broker(args.broker, timeout=args.wait)
    except OSError:
        pass  # reported below by the connection attempt itself
    model = MonitorModel()
    loop = asyncio.get_running_loop()
    # SIGTERM (honcho, systemd) ends the watch like Ctrl-C: cancel, so the
    # connection closes in order (a KeyboardInterrupt may land anywhere).
    main_task = asyncio.current_task()
    if main_task is not None:
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    deadline = None if args.duration is None else loop.time() + args.duration
    ident = f"ami-monitor-{uuid.uuid4().hex[:8]}"
    client = make_client(args.broker, user="monitor", data_dir=args.data, identifier=ident)

    async def read() -> None:
        async for message in client.messages:
            model.update(message.topic.value, message.payload)

    def remaining(step: float) -> float:
        return step if deadline is None else max(0.0, min(step, deadline - loop.time()))

    try:
        async with client:
            await client.subscribe(topics.MONITOR_FILTER, qos=0)
            reader = asyncio.create_task(read())
            try:
                if plain:
                    while deadline is None or loop.time() < deadline:
                        await asyncio.sleep(remaining(max(args.every, 0.1)))
                        _emit(model, args.json)
                else:
                    from rich.live import Live

                    with Live(render(model.summary()), auto_refresh=False, screen=False) as live:
                        while deadline is None or loop.time() < deadline:
                            await asyncio.sleep(remaining(0.5))
                            live.update(render(model.summary()), refresh=True)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    except aiomqtt.MqttError as exc:
        print(f"ami monitor: cannot use the broker {args.broker}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace, config: dict) -> int:
    plain = args.plain or args.json or not sys.stdout.isatty()
    # SIGTERM (honcho, systemd) ends the watch like Ctrl-C does: exit 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until the loop takes over
    try:
        return asyncio.run(_run(args, plain))
    except KeyError as exc:  # provisioned with bus auth, but no monitor user
        print(f"ami monitor: {exc.args[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # BusIdentityMissing: the monitor identity's file is not here
        from ami.security.bus_files import BusIdentityMissing

        if not isinstance(exc, BusIdentityMissing):
            raise
        print(f"ami monitor: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
