"""``ami monitor``: the pure MonitorModel, its rendering, and one run against Mosquitto."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ami.tools.monitor import MAX_INSTANCES, MonitorModel, render, summary_line

REPO = Path(__file__).resolve().parents[1]
M = "ami/v1/monitor"
EVENTS = f"{M}/headend/events"

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def metrics(component: str, ident: str, t: float, counters: dict, **extra) -> bytes:
    return json.dumps(
        {
            "component": component,
            "id": ident,
            "time": t,
            "uptime_s": 1.0,
            "counters": counters,
            "rejected": extra.pop("rejected", {}),
            "gauges": extra.pop("gauges", {}),
            "process": {"pid": 1, "cpu_s": 0.5, "rss_bytes": 50_000_000},
            **extra,
        }
    ).encode()


def headend_metrics(t: float, **counters) -> bytes:
    return metrics(
        "headend",
        "h1",
        t,
        counters,
        rejected={"replay": 2, "auth_failed": 1, "unknown_meter": 0},
        gauges={"sessions": 1000, "meters": 1000, "meters_with_gaps": 3},
        latency_ms={"count": 50, "p50": 7.5, "p90": 20.0, "p99": 42.0, "p99.9": 60.0, "max": 80.0,
                    "interval_count": 5, "interval_p99": 30.0, "interval_hdr": "SElTVA=="},
    )


def loaded_model() -> MonitorModel:
    model = MonitorModel(clock=Clock())
    for component, ident in (("headend", "h1"), ("meters", "f1"), ("meters", "f2"), ("concentrator", "c1")):
        model.update(f"{M}/{component}/{ident}/status", b"online")
    model.update(f"{M}/concentrator/c2/status", b"offline")
    model.update(f"{M}/meters/f1/metrics", metrics("meters", "f1", 100.0, {"readings_pushed": 10, "frames_sent": 20}))
    model.update(f"{M}/meters/f2/metrics", metrics("meters", "f2", 100.0, {"readings_pushed": 5, "frames_sent": 7}))
    for ident, up, down in (("c1", 27, 4), ("c2", 3, 1)):
        counters = {"frames_up": up, "frames_down": down}
        model.update(f"{M}/concentrator/{ident}/metrics", metrics("concentrator", ident, 100.0, counters))
    model.update(
        f"{M}/headend/h1/metrics",
        headend_metrics(
            100.0, frames_accepted=30, frames_rejected=3, readings_stored=14, associations=1000,
            session_renewals=12, reprogrammed_cc_lan=3, reprogrammed_ak=1, gaps_detected=2,
        ),
    )
    return model


def test_aggregation() -> None:
    s = loaded_model().summary()
    assert s["components"]["headend"] == {"online": 1, "offline": 0, "unknown": 0, "total": 1}
    assert s["components"]["meters"]["online"] == 2
    assert s["components"]["concentrator"] == {"online": 1, "offline": 1, "unknown": 0, "total": 2}
    assert s["meters"]["readings_pushed"] == 15 and s["meters"]["frames_sent"] == 27
    assert s["relays"]["frames_up"] == 30 and s["relays"]["frames_down"] == 5
    h = s["headend"]
    assert (h["frames_accepted"], h["frames_rejected"], h["readings_stored"]) == (30, 3, 14)
    assert (h["associations"], h["session_renewals"], h["gaps_detected"]) == (1000, 12, 2)
    assert (h["sessions"], h["meters_with_gaps"]) == (1000, 3)
    assert h["rejected"] == {"replay": 2, "auth_failed": 1}  # zero reasons left out
    assert h["reprogrammed"] == {"cc_lan": 3, "ak": 1}
    assert h["latency_ms"] == {"p50": 7.5, "p99": 42.0}
    assert s["instances"]["concentrator/c2"]["status"] == "offline"
    assert s["garbage"] == {}
    line = summary_line(s)
    assert line.startswith("headend online | meters 2/2 relays 1/2 | readings 15 pushed, 14 stored")
    assert "rejected 3 (replay 2, auth_failed 1)" in line
    assert "sessions 1000 renewals 12" in line and "reprogrammed ak 1 cc_lan 3" in line and "p99 42 ms" in line


def test_rates_between_snapshots_of_the_same_id() -> None:
    model = loaded_model()
    assert model.summary()["meters"]["rates"] == {}  # one snapshot each: no rate yet
    model.update(f"{M}/meters/f1/metrics", metrics("meters", "f1", 102.0, {"readings_pushed": 30, "frames_sent": 60}))
    model.update(f"{M}/meters/f2/metrics", metrics("meters", "f2", 104.0, {"readings_pushed": 45, "frames_sent": 7}))
    model.update(f"{M}/headend/h1/metrics", headend_metrics(102.0, readings_stored=834, frames_rejected=3))
    s = model.summary()
    assert s["instances"]["meters/f1"]["rates"] == {"readings_pushed": 10.0, "frames_sent": 20.0}
    assert s["meters"]["rates"] == {"readings_pushed": 20.0, "frames_sent": 20.0}  # 10/s + 10/s, 20/s + 0/s
    assert s["headend"]["rates"]["readings_stored"] == 410.0
    assert "14" not in summary_line(s).split("|")[2] and "834 (+410/s) stored" in summary_line(s)
    # a restart (counter went down) gives no rate; an offline instance counts as 0/s
    model.update(f"{M}/meters/f1/metrics", metrics("meters", "f1", 103.0, {"readings_pushed": 1, "frames_sent": 61}))
    assert model.summary()["instances"]["meters/f1"]["rates"] == {"frames_sent": 1.0}
    model.update(f"{M}/meters/f1/status", b"offline")
    s = model.summary()
    assert s["meters"]["rates"]["frames_sent"] == 0.0 and s["instances"]["meters/f1"]["rates"] == {}
    # an old or repeated snapshot (dt <= 0) keeps the previous rates
    model.update(f"{M}/meters/f2/metrics", metrics("meters", "f2", 104.0, {"readings_pushed": 99, "frames_sent": 7}))
    assert model.summary()["instances"]["meters/f2"]["rates"]["readings_pushed"] == 10.0


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{M}/meters/f1/metrics", b"\xff\xfe not json", "bad_json"),
        (f"{M}/meters/f1/metrics", b"[1, 2]", "bad_metrics"),
        (f"{M}/meters/f1/metrics", b'{"counters": 5}', "bad_metrics"),
        (f"{M}/meters/f1/status", b"maybe", "bad_status"),
        (f"{M}/meters/f1/other", b"online", "unknown_topic"),
        (f"{M}/meters/status", b"online", "unknown_topic"),
        ("somewhere/else", b"x", "unknown_topic"),
        (f"{M}/meters/{'x' * 500}/status", b"online", "unknown_topic"),
        (f"{M}/meters/f1/metrics", b"{" * (2 << 20), "too_large"),
        (EVENTS, b"{nope", "bad_json"),
        (EVENTS, b'{"reason": "replay"}', "bad_event"),
        (EVENTS, b'"rejected"', "bad_event"),
        (EVENTS, b'{"kind": 7}', "bad_event"),
    ],
)
def test_garbage_is_counted_not_raised(topic: str, payload: bytes, reason: str) -> None:
    model = loaded_model()
    before = model.summary()
    model.update(topic, payload)
    s = model.summary()
    assert s["garbage"] == {reason: 1}
    assert s["messages"] == before["messages"] + 1
    assert s["meters"] == before["meters"] and s["components"] == before["components"]
    assert "garbage 1" in summary_line(s)


def test_odd_values_inside_a_snapshot_are_dropped() -> None:
    model = MonitorModel(clock=Clock())
    odd = {"counters": {"readings_pushed": "many", "frames_sent": True, "ok": 3, "nan": float("inf")},
           "rejected": [1], "gauges": None, "process": "x", "time": "now"}
    model.update(f"{M}/meters/f1/metrics", json.dumps(odd).encode())
    model.update(f"{M}/meters/f1/status", None)  # not bytes at all: an empty payload
    s = model.summary()
    assert s["garbage"] == {}
    assert s["instances"]["meters/f1"]["counters"] == {"ok": 3}
    assert s["meters"]["readings_pushed"] == 0
    render(s)  # renders without process figures


def test_events_bounded_and_counted() -> None:
    model = MonitorModel(clock=Clock())
    for i in range(25):
        event = {"time": 1.0 + i, "kind": "rejected", "reason": "replay", "meter": f"m{i}"}
        model.update(EVENTS, json.dumps(event).encode())
    model.update(EVENTS, json.dumps({"time": 30.0, "kind": "key_change", "meter": "m1", "key": "cc_lan",
                                     "nested": {"secret": "x"}, "long": "y" * 1000}).encode())
    model.update(EVENTS, json.dumps({"kind": "rejected", "reason": ["list"]}).encode())
    s = model.summary()
    assert len(s["events"]["recent"]) == 20
    assert s["events"]["by_kind"] == {"rejected": 26, "key_change": 1}
    assert s["events"]["rejected_by_reason"] == {"replay": 25, "?": 1}
    key_change = s["events"]["recent"][-2]
    assert key_change["kind"] == "key_change" and "nested" not in key_change and len(key_change["long"]) == 100
    # event kinds from the bus cannot grow the counters without bound
    for i in range(1000):
        model.update(EVENTS, json.dumps({"kind": f"k{i}"}).encode())
    assert len(model.event_kinds) <= 201 and model.event_kinds["(other)"] > 0


def test_empty_retained_payload_forgets_the_instance() -> None:
    model = loaded_model()
    model.update(f"{M}/concentrator/c2/status", b"")
    model.update(f"{M}/concentrator/c2/metrics", b"")
    s = model.summary()
    assert "concentrator/c2" not in s["instances"]
    assert s["components"]["concentrator"]["total"] == 1 and s["relays"]["frames_up"] == 27
    assert s["garbage"] == {}


def test_instances_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ami.tools.monitor.MAX_INSTANCES", 3)
    model = MonitorModel(clock=Clock())
    for i in range(5):
        model.update(f"{M}/meters/f{i}/status", b"online")
    assert len(model.summary()["instances"]) == 3 and model.garbage["too_many_instances"] == 2
    model.update(f"{M}/meters/f0/status", b"offline")  # known instances still update
    assert model.status[("meters", "f0")] == "offline"
    assert MAX_INSTANCES >= 1000


def test_render_empty_and_loaded() -> None:
    from rich.console import Console

    for model in (MonitorModel(clock=Clock()), loaded_model()):
        model.update(EVENTS, b'{"time": 5, "kind": "alarm", "meter": "m7"}')
        console = Console(file=io.StringIO(), width=160)
        console.print(render(model.summary(), max_rows=3))
        out = console.file.getvalue()
        assert "ami monitor" in out and "alarm" in out
    assert "more" in out and "replay" in out and "session_renewals" in out
    assert summary_line(MonitorModel(clock=Clock()).summary()).startswith("headend ? | meters 0/0 relays 0/0")


def test_render_escapes_names_from_the_bus() -> None:
    from rich.console import Console

    model = loaded_model()
    model.update(f"{M}/meters/[red]evil[x/status", b"online")
    model.update(EVENTS, b'{"kind": "[/x]", "reason": "[/]", "meter": "[red]m"}')
    model.update(EVENTS, b'{"kind": "rejected", "reason": "[/]"}')
    console = Console(file=io.StringIO(), width=200)
    console.print(render(model.summary()))
    out = console.file.getvalue()
    assert "[red]evil[x" in out and "[/x]" in out and "[red]m" in out


# --------------------------------------------------------------------------
# against Mosquitto on 127.0.0.1:1883


def _mosquitto_listening() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
        return True
    except OSError:
        return False


async def _publish(messages: list[tuple[str, bytes, bool]]) -> None:
    from ami.runtime.bus import make_client

    ident = f"test-dash-{uuid.uuid4().hex[:8]}"
    async with make_client("mqtt://127.0.0.1:1883", user=None, identifier=ident) as client:
        for topic, payload, retain in messages:
            await client.publish(topic, payload, qos=1, retain=retain)


@pytest.mark.mosquitto
@pytest.mark.skipif(not _mosquitto_listening(), reason="no MQTT broker listening on 127.0.0.1:1883")
def test_ami_monitor_against_mosquitto(tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:10]
    head, fleet, relay = f"test-{uid}-h", f"test-{uid}-f", f"test-{uid}-c"
    reason = f"test_reason_{uid}"
    head_counters = {"readings_stored": 12345, "session_renewals": 12, "reprogrammed_cc_lan": 3}
    fleet_counters = {"readings_pushed": 12400, "frames_sent": 13000}
    retained = [
        (f"{M}/headend/{head}/status", b"online"),
        (f"{M}/headend/{head}/metrics", metrics("headend", head, 100.0, head_counters)),
        (f"{M}/meters/{fleet}/status", b"online"),
        (f"{M}/meters/{fleet}/metrics", metrics("meters", fleet, 100.0, fleet_counters)),
        (f"{M}/concentrator/{relay}/status", b"offline"),
    ]
    asyncio.run(_publish([(t, p, True) for t, p in retained]))
    from ami.security.bus_files import write_anonymous_marker

    write_anonymous_marker(tmp_path)  # the system Mosquitto is open: say so, clients never assume it
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ami.cli", "monitor", "--plain", "--json", "--duration", "3", "--every", "1",
             "--broker", "mqtt://127.0.0.1:1883", "--data", str(tmp_path)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            first = json.loads(proc.stdout.readline())  # subscribed by now: events will reach it
            asyncio.run(_publish([(EVENTS, json.dumps({"time": 1.0, "kind": "rejected", "reason": reason,
                                                       "meter": f"m-{uid}"}).encode(), False)]))
            rest, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        lines = [json.loads(line) for line in rest.splitlines()]
        assert lines, "no summary line after the first"
        last = lines[-1]
        for s in (first, last):
            inst = s["instances"]
            assert inst[f"headend/{head}"]["status"] == "online"
            assert inst[f"headend/{head}"]["counters"]["readings_stored"] == 12345
            assert inst[f"meters/{fleet}"]["counters"] == fleet_counters
            assert inst[f"concentrator/{relay}"]["status"] == "offline"
            # totals include ours (other tests may share the broker)
            assert s["meters"]["readings_pushed"] >= 12400 and s["headend"]["readings_stored"] >= 12345
            assert s["headend"]["reprogrammed"].get("cc_lan", 0) >= 3
            assert s["components"]["concentrator"]["offline"] >= 1
        assert last["events"]["rejected_by_reason"][reason] == 1
        recent = last["events"]["recent"]  # unless other tests flooded the last 20 since
        assert any(e.get("meter") == f"m-{uid}" for e in recent) or last["events"]["by_kind"]["rejected"] > 20
    finally:
        asyncio.run(_publish([(t, b"", True) for t, _ in retained]))
