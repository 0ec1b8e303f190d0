"""Invocation counters: a sender never reuses one, a receiver never goes back.

The crash tests drive SendCounter through random interleavings of take,
reserve, persist and crash.  A crash rebuilds the counter from the last
*persisted* mark and forgets every reservation not yet confirmed; every
value ever handed out, across all crashes, is collected and must be unique.
The same harness run on a naive "save every N" counter finds a reuse, which
shows the harness can see the failure it guards against.
"""

from __future__ import annotations

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ami.protocol import ReceiveCounter, SendCounter
from ami.protocol.counters import IC_LIMIT
from ami.protocol.errors import CounterExhausted, CounterNotReserved, ReplayedFrame
from ami.protocol.counters import DEFAULT_BLOCK, DEFAULT_RENEW_AT
from ami.protocol.frames import iv_for

from ._util import FAST

TITLE = bytes.fromhex("4C4E4B0000000007")

# --- SendCounter: unit behaviour --------------------------------------------


def test_fresh_counter_hands_out_nothing_before_a_reservation():
    c = SendCounter()
    assert (c.next_value, c.reserved_until, c.available) == (0, 0, 0)
    assert c.wants_reservation
    with pytest.raises(CounterNotReserved):
        c.take()
    assert c.next_value == 0  # a refused take consumes nothing


def test_reservation_protocol():
    c = SendCounter(block=8)
    mark = c.next_reservation()
    assert mark == 8 and c.reserved_until == 0  # computing a mark reserves nothing
    c.confirm_reservation(mark)
    assert [c.take() for _ in range(8)] == list(range(8))
    with pytest.raises(CounterNotReserved):
        c.take()
    c.confirm_reservation(c.next_reservation(3))
    assert c.reserved_until == 11
    c.confirm_reservation(5)  # a stale, lower mark never shrinks the reservation
    assert c.reserved_until == 11 and c.take() == 8


def test_wants_reservation_at_half_a_block():
    c = SendCounter(block=10)
    c.confirm_reservation(10)
    wanted = []
    for _ in range(10):
        wanted.append(c.wants_reservation)
        c.take()
    assert wanted == [False] * 5 + [True] * 5  # available <= block // 2


def test_restart_from_persisted_mark_skips_everything_below():
    c = SendCounter(5000)
    assert c.next_value == 5000 and c.available == 0
    with pytest.raises(CounterNotReserved):
        c.take()
    c.confirm_reservation(c.next_reservation())
    assert c.take() == 5000 and c.reserved_until == 5000 + DEFAULT_BLOCK


def test_constructor_validation():
    for bad in (-1, IC_LIMIT + 1):
        with pytest.raises(ValueError):
            SendCounter(bad)
    with pytest.raises(ValueError):
        SendCounter(block=0)
    with pytest.raises(ValueError):
        SendCounter().confirm_reservation(IC_LIMIT + 1)
    assert "reserved_until" in repr(SendCounter(3))


def test_exhaustion_at_2_pow_32():
    c = SendCounter(IC_LIMIT - 2, block=16)
    assert c.next_reservation() == IC_LIMIT  # clamped, never beyond 2**32
    c.confirm_reservation(IC_LIMIT)
    assert not c.wants_reservation  # nothing more can be had
    assert c.take() == IC_LIMIT - 2
    assert c.take() == IC_LIMIT - 1 == 0xFFFFFFFF
    assert c.exhausted
    with pytest.raises(CounterExhausted):
        c.take()
    with pytest.raises(CounterExhausted):
        c.take()  # and it stays exhausted
    with pytest.raises(CounterExhausted):
        c.next_reservation()
    exhausted = SendCounter(IC_LIMIT)
    assert exhausted.exhausted
    with pytest.raises(CounterExhausted):
        exhausted.take()


def test_needs_renewal_at_renew_at():
    c = SendCounter(98, renew_at=100)
    c.confirm_reservation(200)
    assert not c.needs_renewal
    c.take()  # 98
    assert not c.needs_renewal
    c.take()  # 99: next value is 100
    assert c.needs_renewal
    assert SendCounter().renew_at == DEFAULT_RENEW_AT < IC_LIMIT
    assert SendCounter(DEFAULT_RENEW_AT).needs_renewal


def test_iv_for_refuses_counters_beyond_32_bits():
    assert iv_for(TITLE, IC_LIMIT - 1)[-4:] == b"\xff\xff\xff\xff"
    for ic in (IC_LIMIT, IC_LIMIT + 1, 2 * IC_LIMIT):
        # IC_LIMIT + 1 would truncate to 1: the IV of an earlier frame.
        with pytest.raises(CounterExhausted):
            iv_for(TITLE, ic)


# --- crash simulation ---------------------------------------------------------


class Store:
    """Durable storage of the high-water mark: writes never lower it."""

    def __init__(self, mark: int = 0) -> None:
        self.mark = mark

    def persist(self, mark: int) -> None:
        self.mark = max(self.mark, mark)


def run_send_counter(ops, start: int = 0, block: int = 4) -> list[int]:
    """Play ops against SendCounter; return every value handed out."""
    store = Store(start)
    counter = SendCounter(store.mark, block=block)
    pending: list[int] = []
    handed: list[int] = []
    for op, arg in ops:
        if op == "take":
            try:
                value = counter.take()
            except (CounterNotReserved, CounterExhausted):
                continue
            # Below a mark that is already durable, never beyond 32 bits.
            assert value < store.mark and value < IC_LIMIT
            handed.append(value)
        elif op == "reserve":
            try:
                pending.append(counter.next_reservation(arg or None))
            except CounterExhausted:
                pass
        elif op == "persist" and pending:
            mark = pending.pop(arg % len(pending))  # in any order, stale ones too
            store.persist(mark)
            counter.confirm_reservation(mark)
        elif op == "persist_then_crash" and pending:
            store.persist(pending.pop(arg % len(pending)))  # crash before confirming
            counter, pending = SendCounter(store.mark, block=block), []
        elif op == "crash":
            counter, pending = SendCounter(store.mark, block=block), []
    return handed


def run_naive(ops, every: int = 4) -> list[int]:
    """A counter that saves its value every ``every`` takes, after using it."""
    saved = value = 0
    handed: list[int] = []
    for op, _arg in ops:
        if op == "take":
            handed.append(value)
            value += 1
            if value % every == 0:
                saved = value
        elif op in ("crash", "persist_then_crash"):
            value = saved
    return handed


op = st.one_of(
    st.tuples(st.just("take"), st.just(0)),
    st.tuples(st.just("reserve"), st.integers(0, 6)),
    st.tuples(st.just("persist"), st.integers(0, 5)),
    st.tuples(st.just("persist_then_crash"), st.integers(0, 5)),
    st.tuples(st.just("crash"), st.just(0)),
)
ops_lists = st.lists(op, max_size=120)


@settings(deadline=None, max_examples=400)
@given(ops=ops_lists, block=st.integers(1, 8), near_end=st.booleans())
def test_no_value_is_ever_handed_out_twice_across_crashes(ops, block, near_end):
    start = IC_LIMIT - 20 if near_end else 0  # also run into exhaustion
    handed = run_send_counter(ops, start, block)
    assert len(handed) == len(set(handed))
    assert all(start <= v < IC_LIMIT for v in handed)


def test_the_harness_catches_a_naive_save_every_n_counter():
    reusing = find(ops_lists, lambda ops: len(run_naive(ops)) != len(set(run_naive(ops))))
    handed = run_naive(reusing)
    assert len(handed) != len(set(handed))
    # The shrunk counterexample is the classic: use a value, crash before the save.
    names = [o for o, _ in reusing]
    assert len(names) == 3 and names[0] == names[2] == "take"
    assert names[1] in ("crash", "persist_then_crash")
    # The same operations are harmless to SendCounter.
    assert len(run_send_counter(reusing)) == len(set(run_send_counter(reusing)))


class SendCounterMachine(RuleBasedStateMachine):
    """The same property as a stateful test, with invariants checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.store = Store()
        self.counter = SendCounter(0, block=4)
        self.pending: list[int] = []
        self.handed: set[int] = set()
        self.confirmed = 0  # highest mark confirmed to the live counter

    @rule()
    def take(self):
        try:
            value = self.counter.take()
        except CounterNotReserved:
            assert self.counter.next_value >= self.counter.reserved_until
            return
        assert value not in self.handed
        assert value < self.confirmed <= self.store.mark
        self.handed.add(value)

    @rule(count=st.integers(0, 6))
    def reserve(self, count):
        self.pending.append(self.counter.next_reservation(count or None))

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 5))
    def persist(self, i):
        mark = self.pending.pop(i % len(self.pending))
        self.store.persist(mark)
        self.counter.confirm_reservation(mark)
        self.confirmed = max(self.confirmed, mark)

    @rule()
    def crash(self):
        self.counter = SendCounter(self.store.mark, block=4)
        self.pending = []
        self.confirmed = self.store.mark

    @invariant()
    def reservation_is_durable(self):
        assert self.counter.reserved_until <= self.store.mark
        assert self.counter.next_value <= self.counter.reserved_until


TestSendCounterMachine = SendCounterMachine.TestCase
TestSendCounterMachine.settings = settings(deadline=None, max_examples=150, stateful_step_count=40)


# --- ReceiveCounter ---------------------------------------------------------------


def test_receive_counter_rules():
    r = ReceiveCounter()
    r.accept(0)
    with pytest.raises(ReplayedFrame):
        r.check(0)  # equal: replay
    r.accept(10)  # a gap is fine
    assert r.lowest_acceptable == 11
    for ic in (0, 5, 10):
        with pytest.raises(ReplayedFrame):
            r.check(ic)
        with pytest.raises(ReplayedFrame):
            r.accept(ic)
    assert r.lowest_acceptable == 11  # refused accepts change nothing
    r.check(11)
    r.check(IC_LIMIT - 1)
    assert r.lowest_acceptable == 11  # check alone never moves it
    r.accept(IC_LIMIT - 1)
    with pytest.raises(ReplayedFrame):
        r.check(IC_LIMIT - 1)
    assert "lowest_acceptable=4294967296" in repr(r)


@FAST
@given(ics=st.lists(st.integers(0, 50), max_size=60), start=st.integers(0, 10))
def test_receive_counter_accepts_exactly_the_increasing_values(ics, start):
    r = ReceiveCounter(start)
    highest = start - 1
    for ic in ics:
        if ic > highest:
            r.accept(ic)
            highest = ic
        else:
            with pytest.raises(ReplayedFrame):
                r.accept(ic)
        assert r.lowest_acceptable == highest + 1
