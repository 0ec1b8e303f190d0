"""The head-end engine against real ``Meter`` state machines, in memory (tests/sim.py).

Every test ends with ``sim.assert_clean()``: no (key, IV) pair reached the
wire twice, in either direction, and both sides kept "durable before
published" for every counter value and key they used.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ami.protocol import KeyType
from ami.protocol.keys import KeyState
from ami.protocol.messages import GapFillReply, KeyTransfer, KeyTransferAck, ReadRequest, Reading
from ami.protocol.messages import decode_batch
from ami.machines import loadcurve
from sim import INTERVAL, Chaos, Drop, Network, NvmModel, Sim, Wire, default_policy

pytestmark = pytest.mark.timeout(120)

M1, M2 = "m000001", "m000002"


def rotate(sim: Sim, key: str, meters: object = "all", cid: str = "r1") -> str:
    reply = f"ami/v1/control/replies/{cid}"
    sim.command({"op": "rotate", "key": key, "meters": meters, "id": cid, "reply": reply})
    return reply


def done_reply(sim: Sim, topic: str) -> dict:
    done = [b for b in sim.replies_to(topic) if b.get("done")]
    assert len(done) == 1, sim.replies_to(topic)
    return done[0]


def no_rejections(sim: Sim) -> None:
    assert not sim.engine.rejected, dict(sim.engine.rejected)
    assert not sim.events_of("rejected")
    assert not sim.meter_rejected, dict(sim.meter_rejected)


def active_key(sim: Sim, mid: str, kt: KeyType) -> bytes:
    return sim.engine.meters[mid].key(kt).key


# --------------------------------------------------------------------------
# the happy path


def test_boot_association_and_readings_stored_exactly_once() -> None:
    sim = Sim(6, 2)
    sim.run(15 * INTERVAL)
    assert sim.all_associated()
    c = sim.engine.counters
    assert c["associations"] == 6 and c["events_boot"] == 6
    for mid in sim.titles:
        stored = sim.store.stored_seqs(mid)
        # Every reading the meter pushed, once, and nothing it did not push.
        assert stored == sorted(sim.pushed[mid]) and len(stored) >= 14
        assert set(sim.pushed[mid].values()) == {1}
    assert c["readings_stored"] == sum(len(p) for p in sim.pushed.values()) == len(sim.store.readings)
    assert c["readings_duplicate"] == 0 and c["gaps_detected"] == 0
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()
    # Every IV on the wire is in the ledger once (boot events, AARQ, AARE and
    # its f(CtoS), readings).
    ivs = [w for w in sim.wire if w.key is not None]
    assert len(sim.ledger) == len(ivs) + sum(len(w.extra_ics) for w in ivs) > 6 * 16
    assert sum(len(w.extra_ics) for w in ivs) == 6  # one f(CtoS) per association


def test_read_command_gets_a_reply() -> None:
    sim = Sim(3, 1)
    sim.run(3 * INTERVAL)
    sim.command({"op": "read", "meter": M2, "id": "q1", "reply": "ami/v1/control/replies/q1"})
    sent_at = sim.now
    sim.run(5)
    [reply] = sim.replies_to("ami/v1/control/replies/q1")
    assert reply["id"] == "q1" and reply["meter"] == M2
    # The meter's instantaneous values at the moment it answered.
    answered = [w for w in sim.frames("down", M2, ReadRequest)][0].at + 1
    r = loadcurve.instant(sim.profiles[M2], answered)
    assert (reply["ts"], reply["energy_wh"], reply["power_w"]) == (r.ts, r.energy_wh, r.power_w)
    assert answered - sent_at <= 2
    # Errors are replies too.
    sim.command({"op": "read", "meter": "m999999", "id": "q2", "reply": "ami/v1/control/replies/q2"})
    sim.command({"op": "nope", "id": "q3", "reply": "ami/v1/control/replies/q3"})
    sim.step()
    assert "error" in sim.replies_to("ami/v1/control/replies/q2")[0] and "error" in sim.replies_to("ami/v1/control/replies/q3")[0]
    no_rejections(sim)
    sim.assert_clean()


def test_read_command_on_an_unassociated_meter_is_refused() -> None:
    sim = Sim(2, 1)
    sim.command({"op": "read", "meter": M1, "id": "q1", "reply": "ami/v1/control/replies/q1"})
    sim.step()
    assert sim.replies_to("ami/v1/control/replies/q1") == [{"id": "q1", "error": "meter not associated"}]


def test_the_simulator_catches_iv_reuse_and_frames_sent_before_their_mark() -> None:
    """Positive controls: the checks every test relies on do fire."""
    # A meter that lost its NVM boots from IC 0 again under CC_LAN.
    sim = Sim(2, 1)
    sim.run(30)
    sim.nvm[M1] = NvmModel()
    sim.kill_meter(M1)
    sim.run(3)
    assert any("(key, IV) reuse" in v and M1 in v for v in sim.violations), sim.violations
    # A meter shell that publishes before persisting its marks.
    sim = Sim(1, 1)
    sim._meter_output = lambda mid, out, **kw: Sim._meter_output(sim, mid, replace(out, persist=[]), **kw)
    sim.run(3)
    assert any("not below its durable mark" in v for v in sim.violations), sim.violations
    # A head-end shell that publishes without committing.
    sim = Sim(1, 1)
    sim.store.apply = lambda commit: None
    sim.run(3)
    assert any(v.startswith("AARQ") and "durable mark" in v for v in sim.violations), sim.violations


# --------------------------------------------------------------------------
# session renewal


@pytest.mark.parametrize(
    "policy",
    [dict(session_max_frames=3), dict(session_max_age_s=100.0), dict(session_max_frames=2, session_max_age_s=45.0)],
    ids=["by_frames", "by_age", "both"],
)
def test_session_renewal_without_rejection_or_loss(policy: dict) -> None:
    sim = Sim(4, 2, policy=default_policy(**policy))
    sim.run(20 * INTERVAL)
    sim.settle()
    c = sim.engine.counters
    assert c["session_renewals"] >= 4 * 5, dict(c)
    assert c["associations"] == 4 + c["session_renewals"]
    # Every AARQ carried a fresh session key (a meter never installs one twice).
    keys = [w.msg.dedicated_key for w in sim.frames("down", kind="aarq")]
    assert len(keys) == len(set(keys)) == c["aarq_sent"]
    assert c["gaps_detected"] == 0  # the meters never missed a push
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_frame_sealed_under_the_old_session_verifies_during_the_grace_period() -> None:
    """A reading sealed just before the meter switched sessions, delivered
    after the head-end switched too, opens under the previous session."""
    late: list[Wire] = []

    def up(s: Sim, w: Wire) -> list[tuple[float, bytes]]:
        if w.meter == M1 and isinstance(w.msg, Reading) and not late and s.now > sim_start + 2 * INTERVAL:
            late.append(w)
            return [(20.0, w.data)]  # arrives 20 s later, after the renewal
        return [(0.0, w.data)]

    sim = Sim(2, 1, network=Network(up=up))
    sim_start = sim.now
    sim.run_until(lambda: bool(late), timeout=4 * INTERVAL)
    rotate(sim, "session", [M1])
    sim.run(30)
    assert sim.engine.counters["session_renewals"] == 1
    assert sim.engine.meters[M1].previous is not None
    assert late[0].msg.seq in sim.store.stored_seqs(M1)
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


# --------------------------------------------------------------------------
# key reprogramming (key_transfer under CCC)


@pytest.mark.parametrize("key", ["cc_lan", "ak", "cc_locale"])
def test_rotation_campaign(key: str) -> None:
    sim = Sim(4, 2)
    sim.run(2 * INTERVAL)
    kt = KeyType(key)
    reply = rotate(sim, key)
    sim.run(INTERVAL)
    assert sim.replies_to(reply)[0] == {"id": "r1", "accepted": 4, "key": key}
    done = done_reply(sim, reply)
    assert done["total"] == 4 and done["failed"] == 0
    [ev] = sim.events_of("rotation_done")
    assert ev["key"] == key and ev["failed"] == 0
    for mid, meter in sim.meters.items():
        m = sim.engine.meters[mid]
        assert m.slots[kt].active == 2 and m.slots[kt].new is None
        assert meter.keys.get(kt) == active_key(sim, mid, kt) != sim.factory[mid][kt]
        assert sim.nvm[mid].keys[kt] == meter.keys.get(kt)  # persisted before the ack
        assert sim.store.keys[(mid, kt, 2)].state is KeyState.ACTIVE
        assert sim.store.keys[(mid, kt, 1)].state is KeyState.EXPIRED
    assert sim.engine.counters[f"reprogrammed_{key}"] == 4
    # Traffic goes on; then every meter reboots and associates again under the
    # (possibly new) CC_LAN, with the (possibly new) AK.
    sim.run(3 * INTERVAL)
    for mid in sim.titles:
        sim.kill_meter(mid, downtime=5.0)
    sim.run(2 * INTERVAL)
    sim.settle()
    assert sim.engine.counters["associations"] == 8
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_three_rotations_queued_on_one_meter() -> None:
    sim = Sim(2, 1)
    sim.run(INTERVAL)
    for i, key in enumerate(("cc_lan", "ak", "cc_locale")):
        rotate(sim, key, [M1], cid=f"r{i}")
    sim.run(INTERVAL)
    for i in range(3):
        assert done_reply(sim, f"ami/v1/control/replies/r{i}")["failed"] == 0
    assert sim.engine.counters["key_transfers_sent"] == 3  # one in flight at a time, none repeated
    for kt in (KeyType.CC_LAN, KeyType.AK, KeyType.CC_LOCALE):
        assert sim.meters[M1].keys.get(kt) == active_key(sim, M1, kt)
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def drop_acks(mid: str) -> Drop:
    return Drop(lambda w: w.direction == "up" and w.meter == mid and isinstance(w.msg, KeyTransferAck))


@pytest.mark.parametrize("trigger", ["session_command", "meter_reboot"])
def test_lost_cc_lan_ack_recovered_at_next_association(trigger: str) -> None:
    net = drop_acks(M1)
    sim = Sim(3, 1, network=net)
    sim.run(2 * INTERVAL)
    reply = rotate(sim, "cc_lan", [M1])
    sim.run(3)
    assert net.dropped and sim.meters[M1].keys.cc_lan != sim.factory[M1][KeyType.CC_LAN]
    slot = sim.engine.meters[M1].slots[KeyType.CC_LAN]
    assert (slot.active, slot.new) == (1, 2)  # the head-end does not know yet
    if trigger == "session_command":
        rotate(sim, "session", [M1], cid="s1")  # AARQ under NEW first
    else:
        sim.kill_meter(M1, downtime=2.0)  # boot event under NEW
    sim.run(5)
    assert (slot.active, slot.new) == (2, None)
    assert sim.engine.counters["key_recoveries"] == 1
    assert sim.meters[M1].keys.cc_lan == active_key(sim, M1, KeyType.CC_LAN)
    assert done_reply(sim, reply)["failed"] == 0
    [change] = [e for e in sim.events_of("key_change") if e["key"] == "cc_lan"]
    assert change["recovered"] is True
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_lost_ak_ack_recovered_on_next_uplink_frame() -> None:
    net = drop_acks(M1)
    sim = Sim(3, 1, network=net)
    sim.run(2 * INTERVAL)
    reply = rotate(sim, "ak", [M1])
    sim.run(3)
    assert len(net.dropped) == 1 and sim.meters[M1].keys.ak != sim.factory[M1][KeyType.AK]
    assert sim.engine.meters[M1].slots[KeyType.AK].new == 2
    # The next reading (under the new AK) activates it.
    sim.run_until(lambda: sim.engine.meters[M1].slots[KeyType.AK].new is None, timeout=INTERVAL)
    assert sim.engine.counters["key_recoveries"] == 1
    assert sim.meters[M1].keys.ak == active_key(sim, M1, KeyType.AK)
    assert done_reply(sim, reply)["failed"] == 0
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_lost_ak_ack_then_association_before_any_other_frame() -> None:
    """Bug found: the AARE (sealed under the new AK) was only tried under the
    ACTIVE AK, so the association failed for good and readings were lost."""
    sim = Sim(3, 1, network=drop_acks(M1))
    sim.run(2 * INTERVAL)
    reply = rotate(sim, "ak", [M1])
    sim.run(3)
    rotate(sim, "session", [M1], cid="s1")
    sim.run(5)
    assert sim.engine.meters[M1].slots[KeyType.AK].new is None
    assert sim.engine.counters["key_recoveries"] == 1 and sim.engine.counters["associations_failed"] == 0
    assert done_reply(sim, reply)["failed"] == 0
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_traffic_under_a_session_whose_aare_was_lost_is_not_called_a_replay() -> None:
    """Bug found by the property test: the meter took a renewal AARQ, its AARE
    was lost, and its next readings (under the new session, IC from 0) were
    checked against the old session's counter first and rejected as
    "replay" without being tried under the key the head-end had just offered;
    the head-end did not even count them as auth failures, so it stayed out
    of step until the new IC passed the old floor.  Now they are recognised
    as traffic under the offered key and the association is inferred."""
    armed = [False]
    net = Drop(lambda w: armed[0] and w.direction == "up" and w.meter == M1 and w.kind == "aare", limit=1)
    sim = Sim(2, 1, network=net)
    sim.run(4 * INTERVAL)
    meter = sim.meters[M1]
    assert sim.engine.meters[M1].session.opener.counter.lowest_acceptable >= 4
    sim.run_until(lambda: sim.now >= meter.next_due - 2, timeout=INTERVAL)
    armed[0] = True
    rotate(sim, "session", [M1])  # its AARQ reaches the meter as it pushes
    sim.run(3)
    assert len(net.dropped) == 1
    [reading] = [w for w in sim.frames("up", M1, Reading) if w.at > sim.now - 3]
    assert reading.ic == 0 and reading.key == key_of_session(sim.meters[M1])
    assert reading.msg.seq in sim.store.stored_seqs(M1)
    assert sim.engine.counters["associations_inferred"] == 1
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def key_of_session(meter) -> str:
    from sim import key_id

    return key_id(meter.session.key)


def drop_transfers(mid: str, limit: int | None = None) -> Drop:
    return Drop(lambda w: w.direction == "down" and w.meter == mid and isinstance(w.msg, KeyTransfer), limit)


def test_transfer_never_delivered_alarms_then_new_key_withdrawn() -> None:
    p = default_policy()
    net = drop_transfers(M1)
    sim = Sim(3, 1, network=net, policy=p)
    sim.run(2 * INTERVAL)
    reply = rotate(sim, "cc_lan", [M1])
    sim.run(p.transfer_timeout_s * (p.transfer_max_attempts + 1))
    assert len(net.dropped) == p.transfer_max_attempts
    [alarm] = sim.events_of("alarm")
    assert alarm["alarm"] == "key_transfer_failed" and alarm["meter"] == M1
    done = done_reply(sim, reply)
    assert done["failed"] == 1
    # NEW stays pending: the head-end cannot know the meter never took it.
    slot = sim.engine.meters[M1].slots[KeyType.CC_LAN]
    assert (slot.active, slot.new) == (1, 2)
    # The next association settles it: NEW refused, ACTIVE accepted -> withdrawn.
    rotate(sim, "session", [M1], cid="s1")
    sim.run(5)
    assert (slot.active, slot.new) == (1, None)
    [withdrawn] = sim.events_of("key_withdrawn")
    assert withdrawn["meter"] == M1 and withdrawn["key"] == "cc_lan"
    assert sim.store.keys[(M1, KeyType.CC_LAN, 2)].state is KeyState.EXPIRED
    assert sim.meters[M1].keys.cc_lan == sim.factory[M1][KeyType.CC_LAN]
    sim.settle()
    sim.assert_readings()
    assert not sim.engine.rejected
    # The meter refused the one AARQ under the key it never got.
    assert sum(sim.meter_rejected.values()) == 1
    sim.assert_clean()


def test_ak_transfer_never_delivered_stays_pending_and_a_new_campaign_retries_it() -> None:
    """An AK the meter may or may not hold is never withdrawn on a timeout
    (withdrawing one the meter took would cut it off): it stays NEW, and the
    next campaign re-sends that same key."""
    p = default_policy()
    net = drop_transfers(M1, limit=p.transfer_max_attempts)
    sim = Sim(2, 1, network=net, policy=p)
    sim.run(2 * INTERVAL)
    first = rotate(sim, "ak", [M1])
    sim.run(p.transfer_timeout_s * (p.transfer_max_attempts + 1))
    assert done_reply(sim, first)["failed"] == 1
    assert [a["alarm"] for a in sim.events_of("alarm")] == ["key_transfer_failed"]
    slot = sim.engine.meters[M1].slots[KeyType.AK]
    assert (slot.active, slot.new) == (1, 2)
    pending = sim.engine.meters[M1].keys[KeyType.AK][2].key
    sim.run(2 * INTERVAL)  # traffic under the old AK goes on
    again = rotate(sim, "ak", [M1], cid="r2")
    sim.run(5)
    assert done_reply(sim, again)["failed"] == 0
    assert (slot.active, slot.new) == (2, None)
    assert sim.meters[M1].keys.ak == pending == active_key(sim, M1, KeyType.AK)
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_meter_counts_an_aarq_under_a_key_it_never_took_as_auth_failed() -> None:
    """The head-end's recovery AARQ under a NEW CC_LAN the meter never took is
    a wrong-key case, not a replay (a false replay alarm otherwise)."""
    p = default_policy()
    sim = Sim(2, 1, network=drop_transfers(M1), policy=p)
    sim.run(2 * INTERVAL)
    rotate(sim, "cc_lan", [M1])
    sim.run(p.transfer_timeout_s * (p.transfer_max_attempts + 1))  # alarm; NEW stays pending
    rotate(sim, "session", [M1], cid="s1")  # AARQ under NEW (refused), then under ACTIVE
    sim.run(5)
    assert sim.engine.counters["keys_withdrawn"] == 1
    assert dict(sim.meter_rejected) == {"auth_failed": 1}


def test_transfer_lost_while_an_association_overtakes_it() -> None:
    """Bug found: the association withdrew NEW while the transfer was still
    pending; the transfer's retry then looked the withdrawn key up and the
    engine raised KeyError out of tick().  Now the transfer is re-sent, with
    a fresh key, under the new session."""
    net = drop_transfers(M1, limit=1)
    sim = Sim(3, 1, network=net)
    sim.run(2 * INTERVAL)
    reply = rotate(sim, "cc_lan", [M1])
    sim.run(2)
    rotate(sim, "session", [M1], cid="s1")
    sim.run(3 * INTERVAL)
    assert len(net.dropped) == 1
    assert done_reply(sim, reply)["failed"] == 0
    assert sim.engine.counters["keys_withdrawn"] == 1
    assert sim.meters[M1].keys.cc_lan == active_key(sim, M1, KeyType.CC_LAN) != sim.factory[M1][KeyType.CC_LAN]
    sim.kill_meter(M1, downtime=2.0)  # the new CC_LAN works
    sim.settle()
    sim.assert_readings()
    assert not sim.engine.rejected
    sim.assert_clean()


def test_association_retry_after_its_cc_lan_version_expired() -> None:
    """An association pending with the order [NEW, ACTIVE] keeps that order
    after the (late) transfer ack activated NEW and expired the old version;
    its timeout then went for the expired version: KeyError out of tick()
    (caught here, fixed in ``_send_aarq``, which now starts over with the
    versions the slot holds)."""
    armed = [False]

    def up(s: Sim, w: Wire) -> list[tuple[float, bytes]]:
        if w.meter == M1 and isinstance(w.msg, KeyTransferAck):
            return [(5.0, w.data)]  # the ack arrives late
        return [(0.0, w.data)]

    net = Drop(lambda w: armed[0] and w.direction == "down" and w.meter == M1 and w.kind == "aarq", limit=1,
               then=Network(up=up))
    sim = Sim(2, 1, network=net)
    sim.run(2 * INTERVAL)
    reply = rotate(sim, "cc_lan", [M1])
    sim.run(2)
    assert sim.meters[M1].keys.cc_lan != sim.factory[M1][KeyType.CC_LAN]  # taken, ack on its way
    armed[0] = True
    rotate(sim, "session", [M1], cid="s1")  # AARQ under NEW first: lost
    sim.run(30)
    assert len(net.dropped) == 1
    slot = sim.engine.meters[M1].slots[KeyType.CC_LAN]
    assert (slot.active, slot.new) == (2, None)
    assert sim.engine.counters["association_timeouts"] == 1
    assert done_reply(sim, reply)["failed"] == 0 and done_reply(sim, "ami/v1/control/replies/s1")["failed"] == 0
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


# --------------------------------------------------------------------------
# lossy, duplicating, reordering networks


def test_dropped_readings_are_gap_filled_exactly_once() -> None:
    net = Chaos(7, drop=0.1, directions=("up",), only=lambda w: isinstance(w.msg, (Reading, GapFillReply)))
    sim = Sim(8, 2, network=net)
    sim.run(40 * INTERVAL)
    sim.settle()
    c = sim.engine.counters
    assert net.stats["dropped_up"] >= 20
    assert c["gaps_detected"] > 0 and c["readings_gap_filled"] > 0 and c["gap_fill_requests"] > 0
    sim.assert_readings()
    assert c["readings_stored"] == len(sim.store.readings)
    no_rejections(sim)
    sim.assert_clean()


class DupReorder(Network):
    """Duplicates some uplink batches and holds others back for a while."""

    def __init__(self, seed: int, dup: float = 0.15, hold: float = 0.15, max_hold: int = 90) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.dup, self.hold, self.max_hold = dup, hold, max_hold
        self.held: list[tuple[float, str, bytes]] = []
        self.duplicated = self.reordered = 0
        self.delivered: list[bytes] = []  # every batch payload, in the order the head-end got them

    def batches(self, sim: Sim, batches: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        out = [(c, p) for due, c, p in self.held if due <= sim.now]
        self.held = [h for h in self.held if h[0] > sim.now]
        for c, p in batches:
            r = self.rng.random()
            if r < self.dup:
                self.duplicated += 1
                out += [(c, p), (c, p)]
            elif r < self.dup + self.hold:
                self.reordered += 1
                self.held.append((sim.now + self.rng.randint(1, self.max_hold), c, p))
            else:
                out.append((c, p))
        self.delivered += [p for _c, p in out]
        return out


def test_duplicated_and_reordered_batches() -> None:
    net = DupReorder(11)
    sim = Sim(6, 2, network=net)
    sim.run(40 * INTERVAL)
    sim.settle()
    c, rejected = sim.engine.counters, sim.engine.rejected
    assert net.duplicated > 10 and net.reordered > 10
    # Nothing but true replays (duplicates, and frames overtaken by a later
    # one of the same meter) was refused; nothing stored twice.
    assert set(rejected) == {"replay"}, dict(rejected)
    # Exactly the frames the DLMS rule calls replays: per (key, sender), a
    # frame whose IC is not above the last one accepted (a duplicate, or a
    # frame overtaken by a later one).
    wire = {w.data: w for w in sim.frames("up") if w.key is not None}
    floor: dict[tuple[str, bytes], int] = {}
    replays = 0
    for payload in net.delivered:
        for _label, apdu in decode_batch(payload).frames:
            w = wire.get(apdu)
            if w is None:
                continue  # an unciphered AARE refusal
            ident = (w.key, w.sender)
            if w.ic < floor.get(ident, 0):
                replays += 1
            else:
                floor[ident] = w.ic + 1
    assert rejected["replay"] == replays >= net.duplicated
    assert {e["reason"] for e in sim.events_of("rejected")} == {"replay"}
    assert c["readings_stored"] == len(sim.store.readings)
    sim.assert_readings()
    assert not sim.meter_rejected
    sim.assert_clean()


def test_tampered_frames_in_both_directions() -> None:
    """One bit flipped in 5% of all frames, both ways: each side refuses what
    it cannot verify, retries and gap-fill do the rest."""
    net = Chaos(3, tamper=0.05)
    sim = Sim(6, 2, network=net)
    sim.run(30 * INTERVAL)
    sim.settle()
    assert net.stats["tampered_up"] > 5 and net.stats["tampered_down"] > 0
    assert sum(sim.engine.rejected.values()) > 0
    assert set(sim.engine.rejected) <= {"auth_failed", "malformed_frame", "unknown_meter", "wrong_segment",
                                        "unsupported_security", "replay", "oversized_frame", "malformed_message"}
    sim.assert_readings()
    sim.assert_clean()


# --------------------------------------------------------------------------
# crashes


def test_meter_reboot_reassociates_and_gap_fills_the_downtime() -> None:
    sim = Sim(4, 2)
    sim.run(5 * INTERVAL)
    before = sim.max_pushed[M2]
    sim.kill_meter(M2, downtime=4 * INTERVAL)
    sim.run(6 * INTERVAL)
    sim.crash_meter_on_next_output(M1, downtime=10.0)  # marks durable, frames lost
    sim.run(INTERVAL)
    sim.kill_meter(M1, downtime=0.0)  # and again, at once
    sim.run(3 * INTERVAL)
    sim.settle()
    c = sim.engine.counters
    assert sim.meter_kills == 3 and c["events_boot"] == 4 + 3
    assert c["associations"] == 4 + 3
    # The downtime's readings were never pushed: the head-end asked for them.
    stored = set(sim.store.stored_seqs(M2))
    downtime = set(range(before + 1, before + 4))
    assert downtime <= stored and not downtime & set(sim.pushed[M2])
    assert c["readings_gap_filled"] >= 3
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()  # no boot event nor AARE reused an IV under CC_LAN


def test_power_failure_last_gasp_then_restore() -> None:
    sim = Sim(3, 1)
    sim.run(5 * INTERVAL)
    sim.power_fail(M1, 3.5 * INTERVAL)
    sim.run(6 * INTERVAL)
    sim.settle()
    events = [(e["event"], e["meter"]) for e in sim.events_of("meter_event")]
    assert events == [("outage", M1), ("restore", M1)]
    assert sim.engine.counters["readings_gap_filled"] >= 3  # the outage's intervals
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_boot_storm_never_reuses_a_cc_lan_iv() -> None:
    """A meter killed over and over, some times between persisting its mark
    and publishing: each restart skips to its durable mark."""
    sim = Sim(2, 1, boot_retry_s=1.0, meter_counter_block=4)
    for i in range(30):
        sim.run(3)
        if i % 3 == 0:
            sim.crash_meter_on_next_output(M1, downtime=1.0)
        else:
            sim.kill_meter(M1, downtime=1.0)
    sim.settle()
    boots = [w for w in sim.frames("up", M1, kind="db")]
    assert len(boots) > 20 and len({w.ic for w in boots}) == len(boots)
    sim.assert_readings()
    sim.assert_clean()


def test_headend_restart_sessions_continue_receive_only() -> None:
    """After a restart the stored sessions go on carrying readings (no storm
    of re-associations), but we never seal under them again: the store may
    be a backup whose send mark is behind what was used.  The first downlink
    need (here a read) re-associates that one meter, and only it."""
    sim = Sim(4, 2, policy=default_policy(session_max_frames=10**6))
    sim.run(5 * INTERVAL)
    sim.command({"op": "read", "meter": M1, "id": "q0", "reply": "ami/v1/control/replies/q0"})  # some downlink DC
    sim.run(5)
    sim.restart_headend()
    assert len([m for m in sim.engine.meters.values() if m.session is not None]) == 4
    assert all(m.session.receive_only for m in sim.engine.meters.values())
    sim.command({"op": "read", "meter": M1, "id": "q1", "reply": "ami/v1/control/replies/q1"})
    sim.run(INTERVAL)
    [refused] = sim.replies_to("ami/v1/control/replies/q1")
    assert "retry" in refused["error"]
    assert sim.engine.counters["associations"] == 1  # M1 only; the others carried on
    sim.command({"op": "read", "meter": M1, "id": "q2", "reply": "ami/v1/control/replies/q2"})
    sim.run(5)
    [reply] = sim.replies_to("ami/v1/control/replies/q2")
    assert reply["meter"] == M1 and "energy_wh" in reply
    sim.restart_headend(lose_undrained=True)
    sim.run(5 * INTERVAL)
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_headend_killed_before_its_commit_loses_nothing() -> None:
    """kill -9 between handling a round of batches and committing it: the
    readings in it are gone from the head-end (and so are its frames), and
    gap-fill brings them back."""
    sim = Sim(4, 2)
    sim.run(3 * INTERVAL)
    lost = 0
    for i in range(6 * INTERVAL):
        pushed = sum(len(p) for p in sim.pushed.values())
        kill = i % 7 == 0
        sim.step(kill_headend_before_commit=kill)
        if kill:  # what the meters pushed this round never reached the store
            lost += sum(len(p) for p in sim.pushed.values()) - pushed
    sim.settle()
    assert sim.headend_restarts > 40 and lost > 0
    assert sim.engine.counters["readings_gap_filled"] > 0
    sim.assert_readings()
    sim.assert_clean()


def test_headend_restart_mid_rotation_and_mid_gap() -> None:
    net = Chaos(5, drop=0.2, directions=("up",), only=lambda w: isinstance(w.msg, Reading))
    sim = Sim(4, 2, network=net)
    sim.run(5 * INTERVAL)
    reply = rotate(sim, "cc_lan")
    sim.step()
    sim.restart_headend()  # transfers in flight, acks will reach a new engine
    sim.run(5 * INTERVAL)
    sim.restart_headend()
    sim.settle()
    # The new engine had no campaign: the acks were stale for it, and the
    # meters that took NEW are recovered at their next association.
    for mid in sim.titles:
        sim.kill_meter(mid, downtime=1.0)
    sim.settle()
    for mid, meter in sim.meters.items():
        assert meter.keys.cc_lan == active_key(sim, mid, KeyType.CC_LAN)
    assert sim.replies_to(reply)[0]["accepted"] == 4
    sim.assert_readings()
    assert not sim.meter_rejected
    sim.assert_clean()


# --------------------------------------------------------------------------
# property: random schedules


ACTIONS = st.one_of(
    st.tuples(st.just("kill_meter"), st.integers(0, 3), st.floats(0, 3 * INTERVAL)),
    st.tuples(st.just("crash_meter"), st.integers(0, 3), st.floats(0, INTERVAL)),
    st.tuples(st.just("restart_headend"), st.integers(0, 0), st.floats(0, 0)),
    st.tuples(st.just("kill_headend"), st.integers(0, 0), st.floats(0, 0)),
    st.tuples(st.just("renew"), st.integers(0, 3), st.floats(0, 0)),
)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    seed=st.integers(0, 2**16),
    drop=st.floats(0, 0.25),
    dup=st.floats(0, 0.25),
    delay=st.floats(0, 0.3),
    max_delay=st.floats(0, 20),
    schedule=st.lists(st.tuples(st.integers(0, 12 * INTERVAL), ACTIONS), max_size=8),
)
def test_random_schedules_never_lose_a_reading_nor_reuse_an_iv(
    seed: int, drop: float, dup: float, delay: float, max_delay: float, schedule: list
) -> None:
    net = Chaos(seed, drop=drop, dup=dup, delay=delay, max_delay=max_delay)
    sim = Sim(4, 2, network=net, policy=default_policy(session_max_frames=7, session_max_age_s=300.0))
    t0 = sim.now
    for at, (action, idx, param) in sorted(schedule, key=lambda x: x[0]):
        sim.run(max(0.0, t0 + at - sim.now))
        mid = f"m{idx + 1:06d}"
        if action == "kill_meter":
            sim.kill_meter(mid, downtime=param)
        elif action == "crash_meter":
            sim.crash_meter_on_next_output(mid, downtime=param)
        elif action == "restart_headend":
            sim.restart_headend()
        elif action == "kill_headend":
            sim.restart_headend(lose_undrained=True)
        elif action == "renew":
            rotate(sim, "session", [mid], cid=f"s{at}")
    sim.run(max(0.0, t0 + 13 * INTERVAL - sim.now))
    sim.settle(intervals=4)
    assert sim.all_associated(), {m: (x.session is not None) for m, x in sim.meters.items()}
    assert not sim.gaps()
    sim.assert_readings()
    sim.assert_clean()
    assert set(sim.engine.rejected) <= {"replay", "auth_failed", "unknown_key", "expired_key"}


ROTATIONS = st.tuples(st.sampled_from(["rot_cc_lan", "rot_ak", "rot_cc_locale"]), st.integers(0, 3), st.floats(0, 0))


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    seed=st.integers(0, 2**16),
    drop=st.floats(0, 0.2),
    dup=st.floats(0, 0.2),
    delay=st.floats(0, 0.3),
    max_delay=st.floats(0, 15),
    schedule=st.lists(st.tuples(st.integers(0, 12 * INTERVAL), st.one_of(ACTIONS, ROTATIONS)), max_size=10),
)
def test_random_schedules_with_key_rotations(
    seed: int, drop: float, dup: float, delay: float, max_delay: float, schedule: list
) -> None:
    """Same property with CC_LAN / AK / CC_LOCALE reprogramming mixed in: a
    lost transfer or ack may fail a campaign, but no meter is ever left with
    a key the head-end does not hold, and nothing is lost."""
    net = Chaos(seed, drop=drop, dup=dup, delay=delay, max_delay=max_delay)
    sim = Sim(4, 2, network=net, policy=default_policy(session_max_frames=7, session_max_age_s=300.0))
    t0 = sim.now
    for n, (at, (action, idx, param)) in enumerate(sorted(schedule, key=lambda x: x[0])):
        sim.run(max(0.0, t0 + at - sim.now))
        mid = f"m{idx + 1:06d}"
        if action == "kill_meter":
            sim.kill_meter(mid, downtime=param)
        elif action == "crash_meter":
            sim.crash_meter_on_next_output(mid, downtime=param)
        elif action == "restart_headend":
            sim.restart_headend()
        elif action == "kill_headend":
            sim.restart_headend(lose_undrained=True)
        elif action == "renew":
            rotate(sim, "session", [mid], cid=f"s{n}")
        else:
            rotate(sim, action[4:], [mid], cid=f"k{n}")
    sim.run(max(0.0, t0 + 13 * INTERVAL - sim.now))
    sim.settle(intervals=4)
    # Every meter's keys are keys the head-end holds (ACTIVE, or NEW pending).
    for mid, meter in sim.meters.items():
        m = sim.engine.meters[mid]
        for kt in (KeyType.CC_LAN, KeyType.AK, KeyType.CC_LOCALE):
            held = {gk.key for gk in m.keys[kt].values()}
            assert meter.keys.get(kt) in held, (mid, kt)
    # Reboot everyone: each must come back under the keys it holds.
    for mid in sim.titles:
        sim.kill_meter(mid, downtime=1.0)
    sim.settle(intervals=3)
    assert sim.all_associated()
    assert not sim.gaps()
    sim.assert_readings()
    sim.assert_clean()


def test_association_storms_are_admitted_a_bounded_number_at_a_time() -> None:
    """A boot storm and a fleet-wide renewal never put more associations in
    flight than the policy allows; the rest wait their turn, and everyone
    ends up associated with nothing lost or rejected."""
    p = replace(default_policy(), max_pending_associations=3)
    sim = Sim(12, 2, policy=p)
    peak = 0
    for _ in range(40):
        sim.step()
        peak = max(peak, sim.engine._associating)
        assert sim.engine._associating == sum(1 for m in sim.engine.meters.values() if m.association is not None)
    assert peak == 3
    assert sim.engine.counters["associations_queued"] >= 9
    assert all(m.session is not None for m in sim.engine.meters.values())
    storm = rotate(sim, "session")
    for _ in range(20):
        sim.step()
        assert sim.engine._associating <= 3
    assert done_reply(sim, storm)["failed"] == 0
    sim.settle()
    sim.assert_readings()
    no_rejections(sim)
    sim.assert_clean()


def test_the_association_window_halves_on_timeouts_and_grows_with_answers() -> None:
    """Admission adapts to what the path finishes (AIMD): AAREs lost, the
    associations time out and the window halves (once per timeout period,
    never below its minimum); answers flowing again, it grows by one per
    association answered; in flight never exceeds it."""
    p = replace(default_policy(), max_pending_associations=40, association_window_start=16,
                association_window_min=2)
    sim = Sim(40, 4, policy=p)
    engine = sim.engine
    assert engine.association_window == 16
    sim.network = Drop(lambda w: w.kind == "aarq")  # a path that finishes nothing
    for _ in range(int(6 * p.association_timeout_s)):
        sim.step(1.0)
    cut = engine.association_window
    assert cut < 16 and engine.counters["association_window_cuts"] >= 2
    assert cut >= 2
    sim.network = Network()
    for _ in range(int(12 * p.association_timeout_s)):
        before = engine._associating
        sim.step(1.0)
        # What was in flight finishes; a new admission needs room in the window.
        assert engine._associating <= max(before, engine.association_window)
        if all(m.session is not None for m in engine.meters.values()):
            break
    assert all(m.session is not None for m in engine.meters.values())
    assert engine.association_window > cut  # answers made it grow back
    sim.settle()
    sim.assert_readings()
    sim.assert_clean()
