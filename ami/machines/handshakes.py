"""The head-end's two per-meter handshakes as explicit state machines.

Association (AARQ -> AARE) and key transfer (KeyTransfer -> KeyTransferAck)
each have a small set of states and a table of the events that move between
them, one table each, as h11 writes its connection states.  The engine
(headend.py) keeps the data (keys, counters, challenges) and calls
``advance`` at every step; an event the table does not list for the current
state is a bug in the engine, raised at once (``IllegalTransition``) rather
than silently leaving a meter in a state nothing will ever leave.

What each state promises, and the timer that leaves it:

==================  ============================================  ==========================
association state   meaning                                       left by
==================  ============================================  ==========================
IDLE                nothing in flight (with or without session)   WANTED
QUEUED              wants an AARQ: waits for admission (at most   ADMITTED (admission, its
                    ``max_pending_associations`` in flight), its  rate budget, the CC_LAN
                    per-meter rate budget or the CC_LAN IC clock  IC clock)
AWAITING_AARE       an AARQ with a fresh challenge is out         ANSWERED, REFUSED,
                                                                  TIMED_OUT, GAVE_UP
COOLING_DOWN        ``association_max_attempts`` rounds failed:   COOLED_DOWN (timer)
                    wait, then start over (never give up for
                    good: a relay that stops meddling must not
                    leave a meter out)
==================  ============================================  ==========================

==================  ============================================  ==========================
transfer state      meaning                                       left by
==================  ============================================  ==========================
IDLE                no KeyTransfer in flight                      SENT
AWAITING_ACK        a KeyTransfer of (type, version) is out       CONFIRMED, REFUSED,
                                                                  RESENT, FAILED,
                                                                  SESSION_LOST, RECOVERED
==================  ============================================  ==========================

Only authenticated evidence moves key state: ANSWERED needs an AARE whose
f(CtoS) verifies against a challenge of this association (or traffic under
the offered session key), CONFIRMED an ack naming the key type, version and
check value of the key in flight, RECOVERED a frame that verifies under the
NEW key.  An unciphered refusal (REFUSED) only makes the engine try the next
CC_LAN version sooner; it never withdraws or activates a key.
"""

from __future__ import annotations

import enum

__all__ = [
    "ASSOCIATION",
    "AssociationEvent",
    "AssociationState",
    "IllegalTransition",
    "TRANSFER",
    "TransferEvent",
    "TransferState",
    "advance",
]


class IllegalTransition(RuntimeError):
    """The engine asked for a transition its table does not have (a bug)."""


class AssociationState(enum.Enum):
    IDLE = "idle"
    QUEUED = "queued"
    AWAITING_AARE = "awaiting_aare"
    COOLING_DOWN = "cooling_down"


class AssociationEvent(enum.Enum):
    WANTED = "wanted"  # boot event, no session, renewal, command, key transfer...
    ADMITTED = "admitted"  # first AARQ of the association goes out
    ANSWERED = "answered"  # bound AARE, or traffic under an offered session key
    REFUSED = "refused"  # unciphered refusal: next attempt (a hint, not proof)
    TIMED_OUT = "timed_out"  # no answer: the same AARQ again, or the next attempt
    GAVE_UP = "gave_up"  # max attempts: alarm, cool down
    COOLED_DOWN = "cooled_down"


class TransferState(enum.Enum):
    IDLE = "idle"
    AWAITING_ACK = "awaiting_ack"


class TransferEvent(enum.Enum):
    SENT = "sent"
    CONFIRMED = "confirmed"  # ack names (type, version, check value) of the key in flight
    REFUSED = "refused"  # authenticated refusal of that version: withdraw it
    RESENT = "resent"  # no ack in time: the same key again
    FAILED = "failed"  # attempts exhausted: alarm; the NEW key stays for recovery
    SESSION_LOST = "session_lost"  # the session that carried it ended: send again later
    RECOVERED = "recovered"  # traffic under the NEW key proved it (ack lost)


_A, _AE = AssociationState, AssociationEvent
ASSOCIATION: dict[tuple[AssociationState, AssociationEvent], AssociationState] = {
    (_A.IDLE, _AE.WANTED): _A.QUEUED,
    (_A.QUEUED, _AE.WANTED): _A.QUEUED,
    (_A.AWAITING_AARE, _AE.WANTED): _A.AWAITING_AARE,
    (_A.COOLING_DOWN, _AE.WANTED): _A.COOLING_DOWN,
    (_A.QUEUED, _AE.ADMITTED): _A.AWAITING_AARE,
    (_A.AWAITING_AARE, _AE.ANSWERED): _A.IDLE,
    (_A.AWAITING_AARE, _AE.REFUSED): _A.AWAITING_AARE,
    (_A.AWAITING_AARE, _AE.TIMED_OUT): _A.AWAITING_AARE,
    (_A.AWAITING_AARE, _AE.GAVE_UP): _A.COOLING_DOWN,
    (_A.COOLING_DOWN, _AE.COOLED_DOWN): _A.QUEUED,
}

_T, _TE = TransferState, TransferEvent
TRANSFER: dict[tuple[TransferState, TransferEvent], TransferState] = {
    (_T.IDLE, _TE.SENT): _T.AWAITING_ACK,
    (_T.AWAITING_ACK, _TE.CONFIRMED): _T.IDLE,
    (_T.AWAITING_ACK, _TE.REFUSED): _T.IDLE,
    (_T.AWAITING_ACK, _TE.RESENT): _T.AWAITING_ACK,
    (_T.AWAITING_ACK, _TE.FAILED): _T.IDLE,
    (_T.AWAITING_ACK, _TE.SESSION_LOST): _T.IDLE,
    (_T.AWAITING_ACK, _TE.RECOVERED): _T.IDLE,
}


def advance(table: dict[tuple[enum.Enum, enum.Enum], enum.Enum], state: enum.Enum, event: enum.Enum) -> enum.Enum:
    """The state ``event`` leads to from ``state``, or IllegalTransition."""
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value!r} is not allowed in state {state.value!r}") from None
