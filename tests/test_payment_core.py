"""The pure payment core: every entry of its table, driven by events, no sockets, no sleeps."""

from __future__ import annotations

import pytest

from common.errors import ErrorCode
from router.payment_core import (
    FINAL,
    TABLE,
    Abandon,
    Action,
    Answer,
    AppendRows,
    Begin,
    CancelOffer,
    Commit,
    Core,
    Crashed,
    Done,
    Hold,
    IllegalTransition,
    LedgerAnswer,
    LedgerAnswered,
    Leg,
    Link,
    OfferAnswer,
    OfferAnswered,
    PendingDue,
    Phase,
    PingAnswered,
    RecordFailure,
    Release,
    ReportPending,
    SendOffer,
    SendPing,
    Settle,
    StartPendingClock,
    handle,
    leg_tx_id,
)

NOW = 1000.0


def direct(amount: int = 500) -> Core:
    return Core("t1", "alice", "bob", amount, (Leg("t1", "alice", "bob", amount),), "bob")


def begin(available: int = 1000, *, known: bool = True, ledger: bool = True,
          link: Link = Link.FRESH) -> Begin:
    return Begin((available,), known, ledger, link)


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def failure(actions: list[Action]) -> ErrorCode:
    (rec,) = [a for a in actions if isinstance(a, RecordFailure)]
    (ans,) = [a for a in actions if isinstance(a, Answer)]
    assert ans.outcome.code is rec.code
    return rec.code


def offered() -> Core:
    p = direct()
    handle(p, begin(), NOW)
    assert p.phase is Phase.OFFERED
    return p


def appending() -> Core:
    p = offered()
    handle(p, OfferAnswered(OfferAnswer.RECEIPT), NOW)
    assert p.phase is Phase.APPENDING
    return p


# --- Begin ------------------------------------------------------------------------------


def test_begin_with_a_fresh_link_holds_then_offers() -> None:
    p = direct()
    actions = handle(p, begin(), NOW)
    assert actions == [Hold((("alice", 500),)), SendOffer("bob")]
    assert p.phase is Phase.OFFERED
    assert p.held


def test_begin_with_a_quiet_session_pings_first_then_offers_on_pong() -> None:
    p = direct()
    assert kinds(handle(p, begin(link=Link.STALE), NOW)) == [Hold, SendPing]
    assert p.phase is Phase.LINKING
    assert handle(p, PingAnswered(True), NOW) == [SendOffer("bob")]


def test_a_missed_ping_releases_the_hold_and_sends_no_cancel() -> None:
    p = direct()
    handle(p, begin(link=Link.STALE), NOW)
    actions = handle(p, PingAnswered(False), NOW)
    assert kinds(actions) == [Release, RecordFailure, Answer, Done]
    assert failure(actions) is ErrorCode.RECEIVER_UNREACHABLE
    assert p.phase is Phase.FAILED


@pytest.mark.parametrize(("event", "code", "step"), [
    (begin(499), ErrorCode.INSUFFICIENT_FUNDS, "funds"),
    (begin(known=False), ErrorCode.UNKNOWN_RECEIVER, "receiver"),
    (begin(ledger=False), ErrorCode.LEDGER_UNAVAILABLE, "ledger_link"),
    (begin(link=Link.NONE), ErrorCode.RECEIVER_UNREACHABLE, "link"),
])
def test_a_check_that_fails_at_begin_holds_nothing(event: Begin, code: ErrorCode,
                                                   step: str) -> None:
    p = direct()
    actions = handle(p, event, NOW)
    assert kinds(actions) == [RecordFailure, Answer, Done]  # no Hold, no Release
    assert failure(actions) is code
    assert actions[0].step == step  # type: ignore[union-attr]


def test_funds_are_checked_per_debited_account_of_every_leg() -> None:
    legs = (Leg(leg_tx_id("t1", 2), "alice", "_fees", 10), Leg("t1", "alice", "bob", 500))
    p = Core("t1", "alice", "bob", 500, legs, "bob")
    assert p.debits == (("alice", 510),)
    assert failure(handle(p, Begin((509,), True, True, Link.FRESH), NOW)) is \
        ErrorCode.INSUFFICIENT_FUNDS
    p = Core("t1", "alice", "bob", 500, legs, "bob")
    assert handle(p, Begin((510,), True, True, Link.FRESH), NOW)[0] == Hold((("alice", 510),))


def test_a_payment_to_a_system_account_goes_straight_to_the_ledger() -> None:
    p = Core("t1", "alice", "_mixer", 500, (Leg("t1", "alice", "_mixer", 500),), None)
    actions = handle(p, begin(link=Link.NONE), NOW)
    assert kinds(actions) == [Hold, AppendRows, StartPendingClock]
    actions = handle(p, LedgerAnswered(LedgerAnswer.WRITTEN, ((7, "d"),)), NOW)
    assert kinds(actions) == [Commit, Answer, Done]  # nobody to settle with


# --- the offer ---------------------------------------------------------------------------


def test_a_receipt_sends_every_leg_in_one_append() -> None:
    legs = (Leg(leg_tx_id("t1", 2), "alice", "_fees", 10), Leg("t1", "alice", "bob", 500))
    p = Core("t1", "alice", "bob", 500, legs, "bob")
    handle(p, Begin((1000,), True, True, Link.FRESH), NOW)
    actions = handle(p, OfferAnswered(OfferAnswer.RECEIPT), NOW)
    assert kinds(actions) == [AppendRows, StartPendingClock]
    rows = actions[0].rows  # type: ignore[union-attr]
    assert [r.tx_id for r in rows] == ["_leg2:t1", "t1"]  # the main row closes the group


def test_the_payees_signed_receipt_goes_into_the_main_row_only() -> None:
    sig = bytes(range(64))
    legs = (Leg(leg_tx_id("t1", 2), "alice", "_fees", 10),
            Leg("t1", "alice", "bob", 500, sender_sig=b"s" * 64))
    p = Core("t1", "alice", "bob", 500, legs, "bob")
    handle(p, Begin((1000,), True, True, Link.FRESH), NOW)
    rows = handle(p, OfferAnswered(OfferAnswer.RECEIPT, sig=sig), NOW)[0].rows  # type: ignore[union-attr]
    assert [(r.sender_sig, r.receiver_sig) for r in rows] == [(None, None), (b"s" * 64, sig)]


@pytest.mark.parametrize(("answer", "code"), [
    (OfferAnswer.REJECTED, ErrorCode.RECEIVER_REJECTED),
    (OfferAnswer.WRONG, ErrorCode.RECEIVER_REJECTED),
    (OfferAnswer.TIMEOUT, ErrorCode.RECEIVER_TIMEOUT),
    (OfferAnswer.LOST, ErrorCode.RECEIVER_UNREACHABLE),
    (OfferAnswer.BAD_SIGNATURE, ErrorCode.BAD_SIGNATURE),
])
def test_an_offer_that_fails_releases_and_cancels(answer: OfferAnswer, code: ErrorCode) -> None:
    p = offered()
    actions = handle(p, OfferAnswered(answer, "why"), NOW)
    assert kinds(actions) == [Release, RecordFailure, CancelOffer, Answer, Done]
    assert failure(actions) is code
    assert actions[2] == CancelOffer("bob", code)


def test_an_offer_that_never_went_out_owes_no_cancel() -> None:
    p = offered()
    actions = handle(p, OfferAnswered(OfferAnswer.GONE), NOW)
    assert kinds(actions) == [Release, RecordFailure, Answer, Done]
    assert failure(actions) is ErrorCode.RECEIVER_UNREACHABLE


# --- the ledger --------------------------------------------------------------------------


def test_the_ledgers_answer_commits_answers_settles() -> None:
    p = appending()
    actions = handle(p, LedgerAnswered(LedgerAnswer.WRITTEN, ((7, "d7"),)), NOW)
    assert actions == [Commit(((7, "d7"),)), actions[1], Settle("bob", 7), Done()]
    answer = actions[1]
    assert isinstance(answer, Answer)
    assert answer.outcome.seq == 7
    assert p.phase is Phase.PAID
    assert p.committed
    assert not p.held


@pytest.mark.parametrize(("event", "code"), [
    (LedgerAnswered(LedgerAnswer.CONFLICT), ErrorCode.TX_ID_CONFLICT),
    (LedgerAnswered(LedgerAnswer.UNAVAILABLE), ErrorCode.LEDGER_UNAVAILABLE),
    (LedgerAnswered(LedgerAnswer.REFUSED, code=ErrorCode.LEDGER_WRITE_FAILED),
     ErrorCode.LEDGER_WRITE_FAILED),
    (LedgerAnswered(LedgerAnswer.REFUSED), ErrorCode.INTERNAL_ERROR),
])
def test_a_definite_ledger_failure_releases_and_cancels(event: LedgerAnswered,
                                                        code: ErrorCode) -> None:
    p = appending()
    actions = handle(p, event, NOW)
    assert kinds(actions) == [Release, RecordFailure, CancelOffer, Answer, Done]
    assert failure(actions) is code


def test_an_unanswered_append_is_reported_pending_once_and_still_commits() -> None:
    p = appending()
    assert handle(p, PendingDue(), NOW) == [ReportPending()]
    assert handle(p, PendingDue(), NOW) == []
    actions = handle(p, LedgerAnswered(LedgerAnswer.WRITTEN, ((9, "d"),)), NOW)
    assert kinds(actions) == [Commit, Answer, Settle, Done]


def test_a_cancelled_append_is_abandoned_not_failed() -> None:
    p = appending()
    actions = handle(p, LedgerAnswered(LedgerAnswer.CANCELLED), NOW)
    assert kinds(actions) == [Release, ReportPending, Done]  # no RecordFailure: unknown
    assert p.phase is Phase.ABANDONED


def test_a_written_answer_with_the_wrong_number_of_results_is_illegal() -> None:
    p = appending()
    with pytest.raises(IllegalTransition):
        handle(p, LedgerAnswered(LedgerAnswer.WRITTEN, ((1, "d"), (2, "d"))), NOW)
    assert p.phase is Phase.APPENDING  # unchanged


# --- shutdown, crashes, late and illegal events ---------------------------------------------


@pytest.mark.parametrize("make", [offered, appending])
def test_abandon_releases_and_reports_pending(make) -> None:  # type: ignore[no-untyped-def]
    p = make()
    assert kinds(handle(p, Abandon(), NOW)) == [Release, ReportPending, Done]


def test_abandon_while_linking() -> None:
    p = direct()
    handle(p, begin(link=Link.STALE), NOW)
    assert kinds(handle(p, Abandon(), NOW)) == [Release, ReportPending, Done]


@pytest.mark.parametrize(("make", "expected"), [
    (direct, [RecordFailure, Answer, Done]),
    (offered, [Release, RecordFailure, CancelOffer, Answer, Done]),
])
def test_a_crash_before_the_append_fails_the_payment(make, expected) -> None:  # type: ignore[no-untyped-def]
    p = make()
    actions = handle(p, Crashed("KeyError"), NOW)
    assert kinds(actions) == expected
    assert failure(actions) is ErrorCode.INTERNAL_ERROR


def test_a_crash_while_linking_fails_the_payment() -> None:
    p = direct()
    handle(p, begin(link=Link.STALE), NOW)
    assert failure(handle(p, Crashed("x"), NOW)) is ErrorCode.INTERNAL_ERROR


def test_a_crash_while_appending_leaves_the_outcome_to_the_ledger() -> None:
    p = appending()
    assert kinds(handle(p, Crashed("x"), NOW)) == [Release, ReportPending, Done]


@pytest.mark.parametrize("event", [PingAnswered(True), OfferAnswered(OfferAnswer.RECEIPT),
                                   LedgerAnswered(LedgerAnswer.WRITTEN, ((1, "d"),)),
                                   PendingDue(), Abandon(), Crashed("x")])
def test_late_news_after_the_end_changes_nothing(event) -> None:  # type: ignore[no-untyped-def]
    for end in (Phase.PAID, Phase.FAILED, Phase.ABANDONED):
        p = direct()
        p.phase = end
        assert handle(p, event, NOW) == []
        assert p.phase is end


@pytest.mark.parametrize(("phase", "event"), [
    (Phase.NEW, OfferAnswered(OfferAnswer.RECEIPT)),
    (Phase.NEW, PendingDue()),
    (Phase.OFFERED, Begin((1,), True, True, Link.FRESH)),
    (Phase.OFFERED, LedgerAnswered(LedgerAnswer.WRITTEN, ((1, "d"),))),
    (Phase.APPENDING, OfferAnswered(OfferAnswer.RECEIPT)),
    (Phase.LINKING, LedgerAnswered(LedgerAnswer.CONFLICT)),
])
def test_an_unexpected_event_raises_and_changes_nothing(phase: Phase, event) -> None:  # type: ignore[no-untyped-def]
    p = direct()
    p.phase = phase
    with pytest.raises(IllegalTransition):
        handle(p, event, NOW)
    assert p.phase is phase


def test_every_table_entry_is_driven_by_these_tests() -> None:
    # The table is the list of legal moves; a new entry needs a test above.
    assert sorted((ph.value, ev.__name__) for ph, ev in TABLE) == sorted([
        ("new", "Begin"), ("new", "Crashed"),
        ("linking", "PingAnswered"), ("linking", "Crashed"), ("linking", "Abandon"),
        ("offered", "OfferAnswered"), ("offered", "Crashed"), ("offered", "Abandon"),
        ("appending", "LedgerAnswered"), ("appending", "PendingDue"),
        ("appending", "Abandon"), ("appending", "Crashed"),
    ])
    assert not any(ph in FINAL for ph, _ in TABLE)


def test_a_payment_ends_exactly_once_on_every_path() -> None:
    """Every path through the table answers once and is done once."""
    paths: list[list[object]] = [
        [begin(), OfferAnswered(OfferAnswer.RECEIPT),
         LedgerAnswered(LedgerAnswer.WRITTEN, ((1, "d"),))],
        [begin(link=Link.STALE), PingAnswered(True), OfferAnswered(OfferAnswer.TIMEOUT)],
        [begin(), OfferAnswered(OfferAnswer.RECEIPT), PendingDue(), Abandon()],
        [begin(0)],
    ]
    for events in paths:
        p = direct()
        out: list[Action] = []
        for ev in events:
            out += handle(p, ev, NOW)  # type: ignore[arg-type]
        assert sum(isinstance(a, Done) for a in out) == 1
        assert sum(isinstance(a, Answer | ReportPending) for a in out) >= 1
        assert p.phase in FINAL
        holds = sum(isinstance(a, Hold) for a in out)
        releases = sum(isinstance(a, Release) for a in out)
        commits = sum(isinstance(a, Commit) for a in out)
        assert holds == releases + commits  # a hold ends in a release or a commit


