"""A payment's life as a table (h11 style): pure, no I/O, no clock, no asyncio.

`handle(p, event, now) -> actions`: the shell (router/payments.py) feeds what happened
(the facts at the start, a pong, the offer's answer, the ledger's answer, a deadline) and
carries out what comes back (hold, send an offer, append rows, commit, answer…), in order.
Every legal move is one entry of `TABLE`, keyed by (phase, event type).

Rules:
- a payment has one or more *legs* (ledger rows) that commit together, atomically, in one
  append; its *payee* is the participant offered the payment (None when the money goes
  to a system account such as `_mixer`: nobody is asked, no offer, no `settled`);
- the checks at `Begin` run in the seed's order — funds, receiver, ledger link — and the
  hold comes in the same call, so nothing can run between the funds check and the hold;
- before the ledger's answer no money moves: every failure releases the hold, cancels
  the payee's offer if it was sent, records the failure and answers the senders — once;
- the ledger's answer is the commit point. A lost answer is never guessed at: only the
  ledger's own answer ends an append (`PendingDue` merely tells the senders to wait);
- an event for a payment that has ended (a late pong, an answer after `Abandon`) changes
  nothing and returns no action; an event the phase does not expect raises
  IllegalTransition and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import msgspec

from common.errors import ErrorCode, InvariantViolation
from common.messages import LedgerProof, RowIn
from common.money import format_amount


class Phase(enum.Enum):
    # Members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and the table is looked up by (phase, event type) on every event).
    __hash__ = object.__hash__

    NEW = "new"
    LINKING = "linking"  # a ping to the payee is out
    OFFERED = "offered"  # the offer is out
    APPENDING = "appending"  # the rows are with the ledger
    PAID = "paid"
    FAILED = "failed"
    ABANDONED = "abandoned"  # cancelled at shutdown before the ledger answered


FINAL = frozenset({Phase.PAID, Phase.FAILED, Phase.ABANDONED})


class Link(enum.Enum):
    """How the payee's session looked when the payment began."""

    FRESH = "fresh"  # showed life within the freshness window: offer at once
    STALE = "stale"  # a session, quiet for a while: ping first
    NONE = "none"  # no session


class IllegalTransition(InvariantViolation):
    """An event the payment's phase does not expect (a bug in the shell)."""


# One ledger row of a payment: the row it commits, as the ledger takes it (tx_id, sender,
# receiver, amount, memo), so the legs go to the ledger as they are.
Leg = RowIn


def leg_tx_id(tx_id: str, index: int) -> str:
    """The tx_id of a payment's extra leg (index 2, 3, …): reserved (`_`), derived from the
    payment's own tx_id, so a re-sent append is a duplicate, never a second row."""
    return f"_leg{index}:{tx_id}"


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What a `pay` request is answered with. `code` None means paid."""

    tx_id: str
    code: ErrorCode | None = None
    message: str = ""
    seq: int | None = None
    dtg: str | None = None
    proof: LedgerProof | None = None  # the ledger's receipt of a paid one, when it gave one


def pending_outcome(tx_id: str) -> Outcome:
    return Outcome(tx_id, ErrorCode.OUTCOME_PENDING,
                   "the ledger has not answered yet; ask `status` or retry the same tx_id")


class Core:
    """The state of one payment. `legs[-1]` is the main leg (the request's own tx_id);
    extra legs come first, so in the ledger file the main row closes the group."""

    __slots__ = ("amount", "debits", "legs", "payee", "pending_reported", "phase", "receiver",
                 "sender", "step", "tx_id")

    def __init__(self, tx_id: str, sender: str, receiver: str, amount: int,
                 legs: tuple[Leg, ...], payee: str | None) -> None:
        if not legs:
            raise InvariantViolation(f"payment {tx_id} has no legs")
        self.tx_id = tx_id
        self.sender = sender
        self.receiver = receiver  # what the main leg names (the payee, or a pool)
        self.amount = amount
        self.legs = legs
        self.payee = payee
        self.debits: tuple[tuple[str, int], ...]
        if len(legs) == 1:  # the common case
            self.debits = ((legs[0].sender, legs[0].amount),)
        else:
            debits: dict[str, int] = {}
            for leg in legs:
                debits[leg.sender] = debits.get(leg.sender, 0) + leg.amount
            self.debits = tuple(debits.items())
        self.phase = Phase.NEW
        self.step = "start"  # the step it is at, for the decision log
        self.pending_reported = False

    @property
    def held(self) -> bool:
        return self.phase in (Phase.LINKING, Phase.OFFERED, Phase.APPENDING)

    @property
    def committed(self) -> bool:
        return self.phase is Phase.PAID


# --- events ---------------------------------------------------------------------------


class Begin(msgspec.Struct, frozen=True, gc=False):
    """The facts the checks need, read in the same loop turn as the hold."""

    available: tuple[int, ...]  # per entry of `Core.debits`
    receiver_known: bool
    ledger_up: bool
    link: Link


class PingAnswered(msgspec.Struct, frozen=True, gc=False):
    alive: bool


class OfferAnswer(enum.Enum):
    RECEIPT = "receipt"
    REJECTED = "rejected"  # a reject, or an error reply
    WRONG = "wrong"  # a receipt for another tx_id, or an unexpected reply
    BAD_SIGNATURE = "bad_signature"  # a receipt not signed by the payee over this payment
    TIMEOUT = "timeout"
    LOST = "lost"  # the connection dropped while the offer was out
    GONE = "gone"  # the payee's session was gone before the offer could go out


class OfferAnswered(msgspec.Struct, frozen=True, gc=False):
    answer: OfferAnswer
    detail: str = ""
    sig: bytes | None = None  # the payee's signature of a RECEIPT, kept in the main row


class LedgerAnswer(enum.Enum):
    WRITTEN = "written"  # written, or a duplicate: durable with these seqs
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"  # never reached the ledger
    REFUSED = "refused"  # the ledger answered an error: nothing written
    CANCELLED = "cancelled"  # the ledger client closed under it: the outcome is unknown


class LedgerAnswered(msgspec.Struct, frozen=True, gc=False):
    answer: LedgerAnswer
    results: tuple[tuple[int, str], ...] = ()  # (seq, dtg) per leg, when WRITTEN
    code: ErrorCode | None = None  # when REFUSED
    detail: str = ""
    proof: LedgerProof | None = None  # the main row's, with the ledger's sealed head


class PendingDue(msgspec.Struct, frozen=True, gc=False):
    """`outcome_pending_after_s` passed with the append unanswered."""


class Abandon(msgspec.Struct, frozen=True, gc=False):
    """Shutdown: the grace period is over."""


class Crashed(msgspec.Struct, frozen=True, gc=False):
    """The shell failed while carrying out this payment's actions (a bug)."""

    detail: str


Event = Begin | PingAnswered | OfferAnswered | LedgerAnswered | PendingDue | Abandon | Crashed

# --- actions --------------------------------------------------------------------------


class Hold(msgspec.Struct, frozen=True, gc=False):
    debits: tuple[tuple[str, int], ...]


class Release(msgspec.Struct, frozen=True, gc=False):
    debits: tuple[tuple[str, int], ...]


class SendPing(msgspec.Struct, frozen=True, gc=False):
    payee: str


class SendOffer(msgspec.Struct, frozen=True, gc=False):
    payee: str


class AppendRows(msgspec.Struct, frozen=True, gc=False):
    rows: tuple[RowIn, ...]


class StartPendingClock(msgspec.Struct, frozen=True, gc=False):
    """Feed `PendingDue` if the append is still unanswered after the configured wait."""


class Commit(msgspec.Struct, frozen=True, gc=False):
    """Move the money of every leg (releasing the hold) and mark the payment paid."""

    results: tuple[tuple[int, str], ...]  # (seq, dtg) per leg


class Settle(msgspec.Struct, frozen=True, gc=False):
    payee: str
    seq: int
    proof: LedgerProof | None = None


class CancelOffer(msgspec.Struct, frozen=True, gc=False):
    payee: str
    code: ErrorCode


class RecordFailure(msgspec.Struct, frozen=True, gc=False):
    code: ErrorCode
    step: str
    message: str


class Answer(msgspec.Struct, frozen=True, gc=False):
    outcome: Outcome


class ReportPending(msgspec.Struct, frozen=True, gc=False):
    pass


class Done(msgspec.Struct, frozen=True, gc=False):
    pass


Action = (Hold | Release | SendPing | SendOffer | AppendRows | StartPendingClock | Commit
          | Settle | CancelOffer | RecordFailure | Answer | ReportPending | Done)

_START_PENDING_CLOCK = StartPendingClock()
_REPORT_PENDING = ReportPending()
_DONE = Done()


# --- the table ------------------------------------------------------------------------


def _fail(p: Core, code: ErrorCode, message: str) -> list[Action]:
    """The seed's killPayment: release, record, cancel the offer, answer; once."""
    actions: list[Action] = []
    if p.held:
        actions.append(Release(p.debits))
    actions.append(RecordFailure(code, p.step, message))
    if p.phase in (Phase.OFFERED, Phase.APPENDING) and p.payee is not None:
        actions.append(CancelOffer(p.payee, code))
    actions.append(Answer(Outcome(p.tx_id, code, message)))
    actions.append(_DONE)
    p.phase = Phase.FAILED
    return actions


def _offer_or_append(p: Core, link: Link) -> list[Action]:
    if p.payee is None:  # a system account takes the money: nobody to ask
        return _append(p)
    if link is Link.FRESH:
        return _offer(p)
    if link is Link.STALE:
        p.phase = Phase.LINKING
        p.step = "link"
        return [SendPing(p.payee)]
    p.step = "link"
    return _fail(p, ErrorCode.RECEIVER_UNREACHABLE,
                 f"{p.payee} has no live session or missed a ping")


def _offer(p: Core) -> list[Action]:
    assert p.payee is not None
    p.phase = Phase.OFFERED
    p.step = "offer"
    return [SendOffer(p.payee)]


def _append(p: Core) -> list[Action]:
    p.phase = Phase.APPENDING
    p.step = "append"
    return [AppendRows(p.legs), _START_PENDING_CLOCK]


def _on_begin(p: Core, e: Begin, now: float) -> list[Action]:
    p.step = "funds"
    for (account, amount), available in zip(p.debits, e.available, strict=True):
        if available < amount:
            return _fail(p, ErrorCode.INSUFFICIENT_FUNDS,
                         f"{account} has {format_amount(available)} available, below "
                         f"{format_amount(amount)}")
    p.step = "receiver"
    if not e.receiver_known:
        return _fail(p, ErrorCode.UNKNOWN_RECEIVER,
                     f"{p.receiver} is not a participant of this network")
    p.step = "ledger_link"
    if not e.ledger_up:
        return _fail(p, ErrorCode.LEDGER_UNAVAILABLE, "the ledger is not reachable")
    p.step = "hold"
    if p.payee is not None and e.link is Link.FRESH:  # the common case, straight
        p.phase = Phase.OFFERED
        p.step = "offer"
        return [Hold(p.debits), SendOffer(p.payee)]
    actions = _offer_or_append(p, e.link)
    if p.phase is Phase.FAILED:  # unreachable payee: nothing was held
        return actions
    actions.insert(0, Hold(p.debits))
    return actions


def _on_pong(p: Core, e: PingAnswered, now: float) -> list[Action]:
    if not e.alive:
        return _fail(p, ErrorCode.RECEIVER_UNREACHABLE,
                     f"{p.payee} has no live session or missed a ping")
    return _offer(p)


def _on_offer_answered(p: Core, e: OfferAnswered, now: float) -> list[Action]:
    answer = e.answer
    if answer is OfferAnswer.RECEIPT:
        if e.sig is not None:
            main = p.legs[-1]
            p.legs = (*p.legs[:-1], msgspec.structs.replace(main, receiver_sig=e.sig))
        return _append(p)
    payee = p.payee
    if answer is OfferAnswer.BAD_SIGNATURE:
        return _fail(p, ErrorCode.BAD_SIGNATURE,
                     e.detail or f"{payee}'s receipt is not signed by its key over this payment")
    if answer is OfferAnswer.TIMEOUT:
        return _fail(p, ErrorCode.RECEIVER_TIMEOUT, e.detail or f"{payee} did not answer the offer")
    if answer is OfferAnswer.LOST:
        return _fail(p, ErrorCode.RECEIVER_UNREACHABLE, f"{payee} disconnected during the offer")
    if answer is OfferAnswer.GONE:
        p.phase = Phase.LINKING  # the offer never went out: no cancel owed
        return _fail(p, ErrorCode.RECEIVER_UNREACHABLE,
                     f"{payee} disconnected before the offer")
    if answer is OfferAnswer.WRONG:
        return _fail(p, ErrorCode.RECEIVER_REJECTED,
                     e.detail or f"{payee} answered the offer with a wrong receipt")
    return _fail(p, ErrorCode.RECEIVER_REJECTED, e.detail or f"{payee} rejected the payment")


def _on_ledger_answered(p: Core, e: LedgerAnswered, now: float) -> list[Action]:
    answer = e.answer
    if answer is LedgerAnswer.WRITTEN:
        if len(e.results) != len(p.legs):
            raise IllegalTransition(f"payment {p.tx_id}: {len(e.results)} results for "
                                    f"{len(p.legs)} legs")
        seq, dtg = e.results[-1]
        p.phase = Phase.PAID
        p.step = "apply"
        actions: list[Action] = [Commit(e.results),
                                 Answer(Outcome(p.tx_id, seq=seq, dtg=dtg, proof=e.proof))]
        if p.payee is not None:
            actions.append(Settle(p.payee, seq, e.proof))
        actions.append(_DONE)
        return actions
    if answer is LedgerAnswer.CANCELLED:  # unknown outcome: a replay tells it later
        return _abandon(p, now)
    if answer is LedgerAnswer.CONFLICT:
        return _fail(p, ErrorCode.TX_ID_CONFLICT,
                     f"the ledger has tx_id {p.tx_id} for another payment")
    if answer is LedgerAnswer.UNAVAILABLE:
        return _fail(p, ErrorCode.LEDGER_UNAVAILABLE, e.detail or "the ledger is not reachable")
    code = e.code or ErrorCode.INTERNAL_ERROR
    return _fail(p, code, f"the ledger refused the row: {e.detail}")


def _on_pending_due(p: Core, e: PendingDue, now: float) -> list[Action]:
    if p.pending_reported:
        return []
    p.pending_reported = True
    return [_REPORT_PENDING]


def _abandon(p: Core, now: float) -> list[Action]:
    """Shutdown before the commit: give the hold back (a restart would forget it anyway)
    and leave the tx pending; a replay tells its fate. Senders hear `outcome_pending`."""
    actions: list[Action] = []
    if p.held:
        actions.append(Release(p.debits))
    p.phase = Phase.ABANDONED
    actions.append(_REPORT_PENDING)
    actions.append(_DONE)
    return actions


def _on_abandon(p: Core, e: Abandon, now: float) -> list[Action]:
    return _abandon(p, now)


def _on_crash(p: Core, e: Crashed, now: float) -> list[Action]:
    return _fail(p, ErrorCode.INTERNAL_ERROR, f"internal error at step {p.step}: {e.detail}")


Handler = Callable[[Core, Any, float], list[Action]]

TABLE: dict[tuple[Phase, type], Handler] = {
    (Phase.NEW, Begin): _on_begin,
    (Phase.NEW, Crashed): _on_crash,
    (Phase.LINKING, PingAnswered): _on_pong,
    (Phase.LINKING, Crashed): _on_crash,
    (Phase.LINKING, Abandon): _on_abandon,
    (Phase.OFFERED, OfferAnswered): _on_offer_answered,
    (Phase.OFFERED, Crashed): _on_crash,
    (Phase.OFFERED, Abandon): _on_abandon,
    (Phase.APPENDING, LedgerAnswered): _on_ledger_answered,
    (Phase.APPENDING, PendingDue): _on_pending_due,
    (Phase.APPENDING, Abandon): _on_abandon,
    # A crash while the rows are with the ledger: they may still be written, so the
    # outcome is unknown, as at shutdown (a replay tells it).
    (Phase.APPENDING, Crashed): lambda p, e, now: _abandon(p, now),
}


def handle(p: Core, event: Event, now: float) -> list[Action]:
    """The actions `event` calls for, in order; `p` moves to its next phase. Raises
    IllegalTransition (and changes nothing) for an event the phase does not expect."""
    handler = TABLE.get((p.phase, type(event)))
    if handler is None:
        if p.phase in FINAL:
            return []  # late news about a payment that has ended changes nothing
        raise IllegalTransition(f"payment {p.tx_id}: {type(event).__name__} in phase "
                                f"{p.phase.value}")
    return handler(p, event, now)
