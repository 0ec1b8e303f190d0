"""Gap-fill requests are bounded *in flight* (issue 10), not only per tick.

A request holds one of ``Policy.gap_fill_max_in_flight`` slots until a reply
naming it reaches the head-end or ``gap_fill_retry_s`` passes; meters whose
gaps fall due while every slot is taken wait in order (``gap_fill_deferred``).
The wire is the judge here (tests/sim.py records every frame): the engine's
own gauge is checked too, but the bound is counted from the requests sent.
"""

from __future__ import annotations

import pytest

from ami.machines.headend import Policy
from ami.protocol.messages import GapFillReply, GapFillRequest, Reading
from sim import INTERVAL, Chaos, Drop, Network, Sim, Wire, default_policy

pytestmark = pytest.mark.timeout(180)

BOUND = 3
RETRY = 10.0


def _requests(sim: Sim) -> list[Wire]:
    return sim.frames("down", msg=GapFillRequest)


def _gappy_sim(n_meters: int = 12, **policy: object) -> Sim:
    """Every meter associated, then ``missed`` readings of each dropped: as
    many gaps as meters, more than BOUND."""
    sim = Sim(n_meters, 3, policy=default_policy(gap_fill_max_in_flight=BOUND, gap_fill_retry_s=RETRY,
                                                 max_gap_requests_per_tick=1000, **policy))
    assert sim.run_until(sim.all_associated, timeout=20 * INTERVAL)
    sim.network = Drop(lambda w: w.direction == "up" and isinstance(w.msg, Reading))
    sim.run(4 * INTERVAL)
    return sim


def test_policy_reads_the_bound_from_the_config_and_has_a_default() -> None:
    assert Policy().gap_fill_max_in_flight > 0
    assert Policy.from_config({"gap_fill_max_in_flight": 7}).gap_fill_max_in_flight == 7


def test_unanswered_requests_never_exceed_the_bound_then_every_gap_is_filled() -> None:
    """Replies lost: only the retry timeout frees a slot, so in any window of
    gap_fill_retry_s at most BOUND requests may go out (the per-tick bound,
    1,000 here, would have sent one per meter at once).  Then the replies
    flow again and every missing reading is asked again and stored."""
    sim = _gappy_sim()
    # Readings flow again (the gaps show), every gap-fill reply is lost.
    sim.network = Drop(lambda w: w.direction == "up" and isinstance(w.msg, GapFillReply))
    start = len(_requests(sim))
    peak = 0
    for _ in range(int(3 * INTERVAL)):
        sim.step(1.0)
        assert sim.engine.gap_fill_in_flight <= BOUND
        sent = _requests(sim)[start:]
        recent = [w for w in sent if w.at > sim.now - RETRY]
        peak = max(peak, len(recent))
        assert len(recent) <= BOUND, f"{len(recent)} gap-fill requests unanswered within {RETRY} s (bound {BOUND})"
    c = sim.engine.counters
    assert peak == BOUND  # the bound was reached, not merely respected
    assert c["gap_fill_deferred"] > 0 and c["gap_fill_timeouts"] > 0
    assert len(sim.gaps()) == len(sim.meters)  # nothing answered yet: every meter still has its gap
    # The replies get through again: nothing is left behind.
    sim.settle()
    sim.assert_readings()
    assert not sim.gaps() and sim.engine.gap_fill_in_flight == 0
    assert c["readings_gap_filled"] > 0
    assert not sim.engine.rejected, dict(sim.engine.rejected)
    sim.assert_clean()


def test_an_answer_frees_its_slot_at_once() -> None:
    """With replies flowing, slots turn over as answers arrive: every meter's
    gap falls due at the same moment (a head-end restart reloads them all),
    yet never more than BOUND requests are unanswered (counted on the wire: a
    request is answered once a reply naming it is on its way back), and all
    are filled well within one retry period per wave."""
    sim = _gappy_sim()
    sim.network = Drop(lambda w: w.direction == "up" and isinstance(w.msg, GapFillReply))
    sim.run(INTERVAL)  # every meter pushed again: its gap is known (and stored), unanswered
    assert len(sim.gaps()) == len(sim.meters)
    sim.network = Network()
    sim.restart_headend()  # in-flight requests forgotten; every gap due again at once
    answered: set[int] = set()
    first_request = len(_requests(sim))
    t0 = sim.now
    peak = 0
    while sim.gaps() and sim.now - t0 < 3 * INTERVAL:
        sim.step(0.5)
        answered |= {w.msg.request_id for w in sim.frames("up", msg=GapFillReply)}
        open_ = [w for w in _requests(sim)[first_request:]
                 if w.msg.request_id not in answered and w.at > sim.now - RETRY]
        peak = max(peak, len(open_))
        assert len(open_) <= BOUND
        assert sim.engine.gap_fill_in_flight <= BOUND
    assert not sim.gaps()
    assert peak == BOUND
    c = sim.engine.counters
    assert c["gap_fill_timeouts"] == 0 and c["gap_fill_deferred"] > 0
    assert sim.now - t0 < 2 * RETRY  # four waves of three, each answered within a step or two
    sim.settle()
    sim.assert_readings()
    sim.assert_clean()


def test_random_losses_with_a_bound_of_one_still_fill_every_gap() -> None:
    """The tightest bound, and readings, replies and requests lost at random:
    recovery is slower, never incomplete."""
    net = Chaos(3, drop=0.15, only=lambda w: isinstance(w.msg, (Reading, GapFillReply, GapFillRequest)))
    sim = Sim(6, 2, network=net, policy=default_policy(gap_fill_max_in_flight=1, gap_fill_retry_s=RETRY))
    sim.run(20 * INTERVAL)
    assert sim.engine.counters["gaps_detected"] > 0
    sim.settle(intervals=6)
    sim.assert_readings()
    assert sim.engine.gap_fill_in_flight == 0
    sim.assert_clean()


def test_scattered_gaps_of_a_meter_are_asked_in_one_request() -> None:
    """After an overload a meter's gaps are single readings scattered among
    those the head-end holds (its batches were dropped now and then): ranges
    closer than ``gap_fill_coalesce`` go in one request, the readings held
    already come back as duplicates (ignored, never stored twice), and every
    gap is filled.  With coalescing off, one request per gap."""
    def run(coalesce: int) -> tuple[int, Sim]:
        # The gaps fall due together (as after an overload, when slots were
        # scarce): detected over 8 intervals, asked for 10 intervals later.
        sim = Sim(2, 1, policy=default_policy(gap_fill_coalesce=coalesce, max_gap_requests_per_tick=1000,
                                              gap_fill_delay_s=10 * INTERVAL))
        assert sim.run_until(sim.all_associated, timeout=20 * INTERVAL)
        odd = {}

        def drop_every_other(w: Wire) -> bool:  # per meter: drop its 1st, 3rd, 5th... reading
            if w.direction != "up" or not isinstance(w.msg, Reading):
                return False
            odd[w.meter] = not odd.get(w.meter, False)
            return odd[w.meter]

        start = len(_requests(sim))
        sim.network = Drop(drop_every_other)
        sim.run(8 * INTERVAL)
        sim.network = Network()
        sim.settle()
        sim.assert_readings()
        assert not sim.gaps()
        assert not sim.engine.rejected, dict(sim.engine.rejected)
        return len(_requests(sim)[start:]), sim

    merged, sim = run(16)
    exact, _ = run(0)
    assert sim.engine.counters["readings_duplicate"] > 0  # the holes were asked again, and ignored
    assert merged < exact, (merged, exact)
    assert merged <= 2 * len(sim.meters), merged  # about one request per meter
