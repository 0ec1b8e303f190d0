"""MQTT topic builders and parsers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import topics as t

# Ids are one plain topic level (topics._ID); anything else is refused by the builders.
ids = st.from_regex(r"[A-Za-z0-9_.-]{1,30}", fullmatch=True)


@given(conc=ids, meter=ids)
def test_plc_round_trip(conc, meter):
    assert t.parse_plc_up(t.plc_up(conc, meter)) == (conc, meter)
    assert t.parse_plc_down(t.plc_down(conc, meter)) == (conc, meter)
    # direction is part of the topic: never confused
    assert t.parse_plc_up(t.plc_down(conc, meter)) is None
    assert t.parse_plc_down(t.plc_up(conc, meter)) is None
    assert t.parse_wan(t.plc_up(conc, meter)) is None


@given(conc=ids)
def test_wan_round_trip(conc):
    assert t.parse_wan(t.wan_up(conc)) == (conc, "up")
    assert t.parse_wan(t.wan_down(conc)) == (conc, "down")
    assert t.parse_plc_up(t.wan_up(conc)) is None


@given(conc=ids, meter=ids)
def test_local_port_round_trip(conc, meter):
    assert t.parse_local(t.local_in(conc, meter)) == (conc, meter, "in")
    assert t.parse_local(t.local_out(conc, meter)) == (conc, meter, "out")
    assert t.parse_plc_up(t.local_in(conc, meter)) is None
    assert t.parse_local(t.plc_up(conc, meter)) is None


@pytest.mark.parametrize(
    "topic",
    ["", "ami/v1/local/c1/m1", "ami/v1/local/c1/m1/sideways", "ami/v1/local//m1/in", "ami/v1/local/c1//in",
     "ami/v1/local/c1/m1/in/x", "ami/v2/local/c1/m1/in", "ami/v1/plc/c1/m1/in"],
)
def test_malformed_local_topics(topic):
    assert t.parse_local(topic) is None


def test_fixed_topics_and_filters():
    assert t.plc_up("c1", "m1") == "ami/v1/plc/c1/up/m1"
    assert t.plc_down("c1", "m1") == "ami/v1/plc/c1/down/m1"
    assert t.plc_up_filter("c1") == "ami/v1/plc/c1/up/+"
    assert t.plc_down_filter("c1") == "ami/v1/plc/c1/down/+"
    assert t.wan_up("c1") == "ami/v1/wan/c1/up"
    assert t.wan_down("c1") == "ami/v1/wan/c1/down"
    assert t.WAN_UP_FILTER == "ami/v1/wan/+/up"
    assert t.WAN_DOWN_FILTER == "ami/v1/wan/+/down"
    assert t.MONITOR_FILTER == "ami/v1/monitor/#"
    assert t.HEADEND_EVENTS == "ami/v1/monitor/headend/events"
    assert t.HEADEND_COMMANDS == "ami/v1/control/headend/commands"
    assert t.CONTROL_REPLIES_FILTER == "ami/v1/control/replies/#"
    assert t.control_reply("r1") == "ami/v1/control/replies/r1"
    assert t.monitor_status("relay", "c1") == "ami/v1/monitor/relay/c1/status"
    assert t.monitor_metrics("headend", "h") == "ami/v1/monitor/headend/h/metrics"
    assert t.local_in("c1", "m1") == "ami/v1/local/c1/m1/in"
    assert t.local_out("c1", "m1") == "ami/v1/local/c1/m1/out"
    assert t.local_in_filter("c1") == "ami/v1/local/c1/+/in"
    # every monitor topic is covered by the monitor filter, every reply by its filter
    assert t.monitor_status("a", "b").startswith(t.MONITOR_FILTER[:-1])
    assert t.HEADEND_EVENTS.startswith(t.MONITOR_FILTER[:-1])
    assert t.control_reply("x").startswith(t.CONTROL_REPLIES_FILTER[:-1])


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "ami/v1/plc/c1/up",
        "ami/v1/plc/c1/up/",
        "ami/v1/plc//up/m1",
        "ami/v1/plc/c1/up/m1/extra",
        "/ami/v1/plc/c1/up/m1",
        "ami/v2/plc/c1/up/m1",
        "amx/v1/plc/c1/up/m1",
        "ami/v1/wan/c1/up/m1",
        "ami/v1/plc/c1/sideways/m1",
        "ami/v1/plc/c1/UP/m1",
    ],
)
def test_malformed_plc_topics(topic):
    assert t.parse_plc_up(topic) is None
    assert t.parse_plc_down(topic.replace("/up", "/down")) is None


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "ami/v1/wan/c1",
        "ami/v1/wan//up",
        "ami/v1/wan/c1/up/x",
        "ami/v1/wan/c1/sideways",
        "ami/v2/wan/c1/up",
        "ami/v1/plc/c1/up",
        "ami/v1/wan/c1/up/",
    ],
)
def test_malformed_wan_topics(topic):
    assert t.parse_wan(topic) is None


@given(topic=st.text(max_size=60))
def test_parsers_never_raise(topic):
    for parse in (t.parse_plc_up, t.parse_plc_down, t.parse_wan, t.parse_local):
        out = parse(topic)
        assert out is None or all(out)


@pytest.mark.parametrize("bad", ["a/b", "", "+", "#", "a\x00", "x" * 65])
def test_builders_refuse_ids_that_are_not_one_topic_level(bad):
    with pytest.raises(ValueError):
        t.plc_up("c1", bad)
