"""Issue 9, findings 1, 2 and 8: what a relay that only drops, holds back,
re-delivers and forges *unciphered* frames could do to key state, what the
system's own past (a restored store) could do to IVs, and what forged frames
could make the head-end do.  Each test replays the attack that worked before
and checks that it no longer does (sim: tests/sim.py, real Meter and
HeadEndEngine state machines; ``assert_clean`` checks the (key, IV) ledger).
"""

from __future__ import annotations

import secrets

import pytest

from ami.machines.handshakes import (
    ASSOCIATION,
    TRANSFER,
    AssociationEvent,
    AssociationState,
    IllegalTransition,
    TransferEvent,
    TransferState,
    advance,
)
from ami.machines.meter import CounterMark, LAN_SEND
from ami.protocol import KeyType, Suite0Cipher
from ami.protocol.association import (
    CHALLENGE_LEN,
    build_aare,
    build_aarq,
    hls_gmac,
    parse_aare,
    parse_aarq,
    verify_hls_gmac,
)
from ami.protocol.errors import AuthenticationFailed, MalformedFrame
from ami.protocol.keys import KeyState
from ami.protocol.messages import KeyTransfer, KeyTransferAck
from ami.runtime.network import HEADEND_TITLE
from sim import INTERVAL, Network, Sim, Wire, default_policy

pytestmark = pytest.mark.timeout(120)

M1, M2 = "m000001", "m000002"
C1 = "c0001"


def reply_topic(cid: str) -> str:
    return f"ami/v1/control/replies/{cid}"


def rotate(sim: Sim, key: str, meters: object, cid: str) -> None:
    sim.command({"op": "rotate", "key": key, "meters": meters, "id": cid, "reply": reply_topic(cid)})


class Adversary(Network):
    """A relay that follows ``rules``: (predicate, action) pairs, first match
    wins; an action returns what to deliver ([] drops) and may keep the frame."""

    def __init__(self) -> None:
        super().__init__()
        self.rules: list = []
        self.kept: dict[str, list[Wire]] = {}

    def keep(self, name: str, pred) -> None:
        self.kept.setdefault(name, [])
        self.rules.append((pred, lambda w, name=name: self.kept[name].append(w) or []))

    def drop(self, pred) -> None:
        self.rules.append((pred, lambda w: []))

    def honest(self) -> None:
        self.rules.clear()

    def route(self, sim: Sim, wire: Wire) -> list[tuple[float, bytes]]:
        for pred, action in self.rules:
            if pred(wire):
                return action(wire)
        return [(0.0, wire.data)]


def up(mid: str, kind: str | None = None, msg: type | None = None):
    return lambda w: w.direction == "up" and w.meter == mid and (kind is None or w.kind == kind) and (
        msg is None or isinstance(w.msg, msg))


def down(mid: str, kind: str | None = None, msg: type | None = None):
    return lambda w: w.direction == "down" and w.meter == mid and (kind is None or w.kind == kind) and (
        msg is None or isinstance(w.msg, msg))


def converged(sim: Sim) -> None:
    """Honest network from now on: every meter ends with a working session."""
    sim.settle(Network())
    assert sim.all_associated()
    sim.assert_readings()
    sim.assert_clean()


# --------------------------------------------------------------------------
# the AARE challenge (protocol)


def test_aare_answers_the_challenge_of_its_aarq_only() -> None:
    key, ak, title = secrets.token_bytes(16), secrets.token_bytes(16), b"SAG\x00\x00\x00\x00\x01"
    cipher = Suite0Cipher(key, ak)
    challenge = secrets.token_bytes(CHALLENGE_LEN)
    value = hls_gmac(cipher, title, 7, challenge)
    assert verify_hls_gmac(cipher, title, value, challenge) == 7
    for wrong in (secrets.token_bytes(CHALLENGE_LEN), challenge[:-1] + bytes([challenge[-1] ^ 1])):
        with pytest.raises(AuthenticationFailed):
            verify_hls_gmac(cipher, title, value, wrong)
    with pytest.raises(AuthenticationFailed):  # another key, another title
        verify_hls_gmac(Suite0Cipher(secrets.token_bytes(16), ak), title, value, challenge)
    with pytest.raises(AuthenticationFailed):
        verify_hls_gmac(cipher, b"SAG\x00\x00\x00\x00\x02", value, challenge)
    with pytest.raises(MalformedFrame):
        verify_hls_gmac(cipher, title, value[1:], challenge)
    aarq = parse_aarq(build_aarq(HEADEND_TITLE, b"\x21\x02\x30\x00", challenge))
    assert aarq.challenge == challenge
    assert parse_aarq(build_aarq(HEADEND_TITLE, b"\x21\x02\x30\x00")).challenge is None
    aare = parse_aare(build_aare(title, True, b"\x28\x02\x30\x00", value))
    assert aare.auth_value == value


def test_the_meter_binds_its_aare_to_the_challenge_with_an_iv_of_its_own() -> None:
    sim = Sim(1, 1)
    sim.run(2 * INTERVAL)
    aarq = [w for w in sim.wire if w.kind == "aarq"][-1]
    aare = [w for w in sim.wire if w.kind == "aare"][-1]
    challenge = parse_aarq(aarq.data).challenge
    assert challenge is not None and len(challenge) == CHALLENGE_LEN
    value = parse_aare(aare.data).auth_value
    m = sim.engine.meters[M1]
    cipher = Suite0Cipher(m.key(KeyType.CC_LAN).key, m.ak)
    ic_f = verify_hls_gmac(cipher, sim.titles[M1], value, challenge)
    assert aare.extra_ics == (ic_f,) and ic_f != aare.ic  # f(CtoS) and the response: two IVs
    sim.assert_clean()


# --------------------------------------------------------------------------
# the state tables


def test_every_transition_of_the_tables_is_reachable_and_others_are_refused() -> None:
    for table, states, events in (
        (ASSOCIATION, AssociationState, AssociationEvent),
        (TRANSFER, TransferState, TransferEvent),
    ):
        # Every state is entered and left by some event.
        assert {s for s, _ in table} == set(states) == set(table.values())
        for state in states:
            for event in events:
                if (state, event) in table:
                    assert advance(table, state, event) is table[(state, event)]
                else:
                    with pytest.raises(IllegalTransition):
                        advance(table, state, event)


def assert_states_match_data(sim: Sim) -> None:
    for m in sim.engine.meters.values():
        assert (m.association is not None) == (m.assoc_state is AssociationState.AWAITING_AARE), m.meter
        assert (m.transfer is not None) == (m.transfer_state is TransferState.AWAITING_ACK), m.meter


# --------------------------------------------------------------------------
# finding 1: a relay with no key


def test_a_held_back_aare_and_a_forged_refusal_never_withdraw_an_installed_cc_lan() -> None:
    """Before: the head-end took an old AARE under the ACTIVE CC_LAN (held
    back by the relay from an earlier renewal) as the answer to its AARQ
    under ACTIVE, concluded that the meter had kept ACTIVE and withdrew the
    NEW key the meter had installed: every association refused from then on."""
    adv = Adversary()
    sim = Sim(2, 1, network=adv)
    sim.run(2 * INTERVAL)
    # 1. A renewal whose AAREs the relay keeps (the session still comes up:
    #    the head-end sees the meter's traffic under the key it offered).
    adv.keep("aare", up(M1, "aare"))
    rotate(sim, "session", [M1], "s1")
    sim.run(INTERVAL)
    adv.honest()
    assert adv.kept["aare"] and sim.all_associated()
    held = adv.kept["aare"][0]
    # 2. A CC_LAN transfer the meter applies, every ack dropped.
    adv.drop(up(M1, msg=KeyTransferAck))
    rotate(sim, "cc_lan", [M1], "k1")
    sim.run(INTERVAL)
    new_version = sim.engine.meters[M1].slots[KeyType.CC_LAN].new
    assert new_version is not None
    assert sim.meters[M1].keys.cc_lan == sim.engine.meters[M1].keys[KeyType.CC_LAN][new_version].key
    # 3. A renewal: the relay swallows each AARQ, answers the one under NEW
    #    with a forged refusal and the one under ACTIVE with the held AARE.
    adv.honest()
    adv.keep("aarq", down(M1, "aarq"))
    rotate(sim, "session", [M1], "s2")
    sim.step(0.1)
    assert len(adv.kept["aarq"]) == 1
    sim.inject_frames(C1, [(M1, build_aare(sim.titles[M1], False, None))])  # forged refusal
    sim.step(0.1)
    assert len(adv.kept["aarq"]) == 2  # the head-end went on to ACTIVE
    sim.inject_frames(C1, [(M1, held.data)])
    sim._drain()  # noqa: SLF001
    m = sim.engine.meters[M1]
    assert m.slots[KeyType.CC_LAN].new == new_version  # nothing withdrawn
    assert not sim.events_of("key_withdrawn")
    assert sim.engine.counters["stale_aare"] >= 1
    assert_states_match_data(sim)
    adv.honest()
    converged(sim)
    assert sim.engine.meters[M1].slots[KeyType.CC_LAN].active == new_version


def test_an_ack_held_back_across_a_restart_confirms_only_what_it_names() -> None:
    """Before: acks named a request id, and ids restarted at 1: a CC_LOCALE
    ack held back over a restart confirmed an AK transfer the meter never
    received, and the meter was locked out."""
    adv = Adversary()
    sim = Sim(2, 1, network=adv)
    sim.run(2 * INTERVAL)
    adv.keep("ack", up(M1, msg=KeyTransferAck))
    rotate(sim, "cc_locale", [M1], "l1")
    sim.run(5)
    [held] = adv.kept["ack"][:1]
    sim.restart_headend()
    adv.honest()
    # The AK transfer never reaches the meter (CC_LOCALE's, resumed, does).
    adv.drop(lambda w: down(M1, msg=KeyTransfer)(w) and w.msg.setup == "lan")
    rotate(sim, "ak", [M1], "a1")
    # (It re-associates first: sessions loaded at start only receive.)
    # (The interrupted CC_LOCALE change is resumed first, then comes the AK.)
    assert sim.run_until(lambda: (t := sim.engine.meters[M1].transfer) is not None and t.key_type is KeyType.AK,
                         timeout=INTERVAL, dt=0.1)
    m = sim.engine.meters[M1]
    ak_new = m.slots[KeyType.AK].new
    assert ak_new is not None and m.transfer.key_type is KeyType.AK
    sim.inject_frames(C1, [(M1, held.data)])  # while the AK transfer is in flight
    sim._drain()  # noqa: SLF001
    m = sim.engine.meters[M1]
    assert m.slots[KeyType.AK].new == ak_new  # the AK was not confirmed by the old ack
    assert m.key(KeyType.AK).key == sim.meters[M1].keys.ak
    adv.honest()
    converged(sim)


def test_versions_are_never_reused_not_even_after_a_withdrawal_and_a_restart() -> None:
    adv = Adversary()
    sim = Sim(2, 1, network=adv)
    sim.run(2 * INTERVAL)
    adv.drop(down(M1, msg=KeyTransfer))  # the meter never gets version 2
    rotate(sim, "cc_lan", [M1], "k1")
    sim.run(2 * INTERVAL)
    assert sim.events_of("alarm")
    adv.honest()
    rotate(sim, "session", [M1], "s1")  # tries NEW, then ACTIVE: withdraws version 2
    sim.run(INTERVAL)
    withdrawn = sim.events_of("key_withdrawn")
    assert [e["version"] for e in withdrawn] == [2]
    row_v2 = sim.store.keys[(M1, KeyType.CC_LAN, 2)]
    assert row_v2.state is KeyState.EXPIRED
    sim.restart_headend()  # the EXPIRED row is not loaded: its number must still be known
    rotate(sim, "cc_lan", [M1], "k2")
    sim.run(INTERVAL)
    assert sim.engine.meters[M1].slots[KeyType.CC_LAN].active == 3
    assert sim.store.keys[(M1, KeyType.CC_LAN, 2)] is row_v2 and row_v2.state is KeyState.EXPIRED
    converged(sim)


def test_forged_refusals_alone_only_delay_an_association() -> None:
    """Every answer the relay lets through is a forged refusal: the head-end
    tries, backs off, cools down, and never changes key state; once the
    relay is honest the meter is associated again."""
    adv = Adversary()
    sim = Sim(2, 1, network=adv, policy=default_policy(association_cooldown_s=120.0))
    sim.run(2 * INTERVAL)
    adv.drop(up(M1, "aare"))
    adv.drop(down(M1, "aarq"))
    rotate(sim, "session", [M1], "s1")
    keys_before = {kt: dict(v) for kt, v in sim.engine.meters[M1].keys.items()}
    for _ in range(40):
        sim.inject_frames(C1, [(M1, build_aare(sim.titles[M1], False, None))])
        sim.step(5.0)
    m = sim.engine.meters[M1]
    assert sim.engine.counters["associations_failed"] >= 1  # gave up a round...
    assert {kt: dict(v) for kt, v in m.keys.items()} == keys_before  # ...and changed no key
    assert_states_match_data(sim)
    adv.honest()
    converged(sim)


# --------------------------------------------------------------------------
# finding 2: the past


@pytest.mark.parametrize("age", [1, 6])
def test_a_headend_restored_from_a_backup_never_reuses_an_iv(age: int) -> None:
    """Before: a head-end started on a backup of its store sealed AARQs and
    session frames under (key, IV) pairs it had used after the backup."""
    sim = Sim(3, 1, policy=default_policy(session_max_age_s=INTERVAL))
    sim.run(2 * INTERVAL)
    backup = sim.store.copy()
    for i in range(age):  # renewals, reads and rotations after the backup
        rotate(sim, "session", "all", f"s{i}")
        sim.command({"op": "read", "meter": M1, "id": f"q{i}", "reply": reply_topic(f"q{i}")})
        sim.run(INTERVAL / 2)
    rotate(sim, "ak", [M2], "a1")
    sim.run(INTERVAL)
    sim.restore_headend(backup)
    for i in range(3):
        rotate(sim, "session", "all", f"t{i}")
        sim.command({"op": "read", "meter": M1, "id": f"r{i}", "reply": reply_topic(f"r{i}")})
        sim.run(INTERVAL / 2)
    sim.assert_clean()  # the ledger saw every IV of both lives
    assert sim.engine.counters["aarq_sent"] > 0


def test_the_cc_lan_ic_clock_jumps_every_send_mark_on_start() -> None:
    sim = Sim(1, 1, policy=default_policy(cc_lan_ic_per_s=2.0, cc_lan_ic_burst=10))
    sim.run(INTERVAL)
    gk = sim.engine.meters[M1].key(KeyType.CC_LAN)
    used = gk.tx.next_value
    sim.run(100)
    sim.restart_headend()
    gk = sim.engine.meters[M1].key(KeyType.CC_LAN)
    elapsed = sim.now - gk.created
    assert gk.tx.next_value == max(used, int(elapsed * 2.0) + 10 + 1) > used


# --------------------------------------------------------------------------
# finding 8: work caused by frames no key verifies


def test_forged_frames_cause_at_most_one_reassociation_per_interval() -> None:
    """Before: three forged frames forced a re-association, every time."""
    sim = Sim(2, 1, policy=default_policy(unverified_trigger_interval_s=60.0))
    sim.run(2 * INTERVAL)
    genuine = [w for w in sim.wire if w.meter == M1 and w.kind == "dc" and w.direction == "up"][-1]
    before = sim.engine.counters["aarq_sent"]
    for second in range(30):  # 300 forgeries in 30 s
        for i in range(10):
            forged = bytearray(genuine.data)
            forged[-1 - i] ^= 1 + second
            sim.inject_frames(C1, [(M1, bytes(forged))])
        sim.step(1.0)
    assert sim.engine.rejected["auth_failed"] >= 300
    assert sim.engine.counters["aarq_sent"] - before <= 1
    assert sim.engine.counters["associations_rate_limited"] >= 1
    converged(sim)


def test_replies_only_go_to_the_control_replies_namespace() -> None:
    sim = Sim(1, 1)
    sim.run(2 * INTERVAL)
    for topic in ("ami/v1/wan/c0001/down", "ami/v1/control/headend/commands", "ami/v1/control/replies/#",
                  "ami/v1/control/replies/a/b", "x"):
        sim.command({"op": "status", "id": "x", "reply": topic})
    sim.command({"op": "status", "id": "ok", "reply": reply_topic("ok")})
    sim._drain()  # noqa: SLF001
    assert [t for t, _ in sim.replies] == [reply_topic("ok")]
    assert sim.engine.counters["replies_refused_topic"] == 5


def test_an_unanswered_read_expires_with_a_timeout_reply() -> None:
    adv = Adversary()
    sim = Sim(1, 1, network=adv, policy=default_policy(read_timeout_s=30.0))
    sim.run(2 * INTERVAL)
    adv.drop(down(M1, "dc"))
    sim.command({"op": "read", "meter": M1, "id": "q", "reply": reply_topic("q")})
    sim.run(29)
    assert sim.engine.meters[M1].reads and not sim.replies_to(reply_topic("q"))
    sim.run(2)
    assert sim.replies_to(reply_topic("q")) == [{"id": "q", "meter": M1, "error": "timeout"}]
    assert not sim.engine.meters[M1].reads and sim.engine.counters["reads_expired"] == 1


@pytest.mark.parametrize("key_type", [KeyType.CC_LAN, KeyType.CC_LOCALE])
def test_global_keys_are_renewed_on_counter_grounds(key_type: KeyType) -> None:
    """The meter reports a global key's counters near their end (it alone
    sees CC_LOCALE's); the head-end reprograms that key."""
    sim = Sim(1, 1)
    sim.run(2 * INTERVAL)
    meter = sim.meters[M1]
    send = meter.locale_send if key_type is KeyType.CC_LOCALE else meter.lan_send
    # Far along (as after years of handheld visits), reserved like any mark.
    send._next = send._reserved_until = meter.config.renew_at  # noqa: SLF001
    sim.nvm[M1].marks["locale_send" if key_type is KeyType.CC_LOCALE else LAN_SEND] = meter.config.renew_at
    sim.run(2 * INTERVAL)
    assert sim.engine.counters[f"counter_renewals_{key_type.value}"] == 1
    assert sim.engine.meters[M1].key(key_type).version == 2
    assert meter.keys.get(key_type) == sim.engine.meters[M1].key(key_type).key
    sim.assert_clean()


def test_the_meter_never_reuses_an_iv_when_its_cc_lan_counter_runs_out() -> None:
    sim = Sim(1, 1)
    meter = sim.meters[M1]
    meter.lan_send._next = meter.lan_send._reserved_until = 1 << 32  # noqa: SLF001
    out = meter.tick(sim.now + 1)  # boots: its boot event would need a value
    assert out.uplink == [] and "counter_exhausted" in out.counters
    assert not [p for p in out.persist if isinstance(p, CounterMark) and p.slot == LAN_SEND]
