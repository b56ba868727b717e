"""The invariant checker catches each kind of violation in doctored ledgers and histories."""

from __future__ import annotations

from chaos.checker import Attempt, Operation, RouterView, check
from ledger.rows import GENESIS_HASH, HEADER_LINE, format_line, make_row

DTG = "2026-11-27T10:00:00.000000Z"
# (tx_id, sender, receiver, amount)
BASE = [
    ("_open:alice", "_issuer", "alice", 1000),
    ("_open:bob", "_issuer", "bob", 500),
    ("p1", "alice", "bob", 300),
    ("p2", "bob", "alice", 100),
]


def ledger(entries: list[tuple[str, str, str, int]]) -> bytes:
    """A well-formed, correctly chained ledger file holding exactly these rows."""
    out, prev = [HEADER_LINE], GENESIS_HASH
    for seq, (tx, s, r, amt) in enumerate(entries, 1):
        row = make_row(prev, seq, DTG, s, r, amt, tx, "")
        out.append(format_line(row))
        prev = row.hash
    return "".join(out).encode()


def history() -> list[Operation]:
    return [
        Operation("p1", "alice", "bob", 300, attempts=[Attempt("indeterminate"), Attempt("ok", seq=3)]),
        Operation("p2", "bob", "alice", 100, attempts=[Attempt("ok", seq=4)]),
        Operation("p3", "alice", "bob", 5000, attempts=[Attempt("failed", "insufficient_funds")]),
    ]


def router_view(entries: list[tuple[str, str, str, int]] = BASE) -> RouterView:
    bal: dict[str, int] = {}
    for _, s, r, amt in entries:
        bal[s] = bal.get(s, 0) - amt
        bal[r] = bal.get(r, 0) + amt
    return RouterView(balances=bal, holds={"alice": 0, "bob": 0}, in_flight=[])


def kinds(report) -> set[str]:  # type: ignore[no-untyped-def]
    return {v.kind for v in report.violations}


def test_clean_run_has_no_violation() -> None:
    report = check(ledger(BASE), history(), router_view())
    assert report.ok, report.violations
    assert report.rows == 4
    assert report.balances["alice"] == 800


def test_duplicated_row() -> None:
    doctored = [*BASE, ("p2", "bob", "alice", 100)]
    assert "duplicate_row" in kinds(check(ledger(doctored), history()))


def test_the_same_tx_id_from_two_senders_is_two_payments() -> None:
    entries = [*BASE, ("p1", "bob", "alice", 50)]  # bob's own p1, not alice's again
    ops = [*history(), Operation("p1", "bob", "alice", 50, attempts=[Attempt("ok", seq=5)])]
    report = check(ledger(entries), ops, router_view(entries))
    assert report.ok, report.violations
    # ... and alice's p1 told paid but missing is still caught when only bob's is there
    only_bobs = [e for e in entries if (e[0], e[1]) != ("p1", "alice")]
    assert "acked_missing" in kinds(check(ledger(only_bobs), ops))


def test_dropped_acked_row() -> None:
    doctored = [e for e in BASE if e[0] != "p2"]
    report = check(ledger(doctored), history())
    assert "acked_missing" in kinds(report)
    assert any("p2" in v.detail for v in report.violations)


def test_row_for_a_failed_payment() -> None:
    doctored = [*BASE, ("p3", "alice", "bob", 5000)]
    report = check(ledger(doctored), history())
    assert "row_for_failed_payment" in kinds(report)
    assert "negative_balance" in kinds(report)


def test_edited_amount() -> None:
    doctored = [("_open:alice", "_issuer", "alice", 1000), ("_open:bob", "_issuer", "bob", 500),
                ("p1", "alice", "bob", 301), ("p2", "bob", "alice", 100)]
    report = check(ledger(doctored), history(), router_view())
    assert "row_differs" in kinds(report)
    assert "router_differs_from_ledger" in kinds(report)


def test_edit_without_rechaining_fails_verify() -> None:
    raw = ledger(BASE).replace(b",3.00,", b",3.01,")
    assert kinds(check(raw, history())) == {"verify"}


def test_hold_left_and_in_flight() -> None:
    view = router_view()
    view = RouterView(view.balances, {"alice": 300}, ["p9"])
    assert kinds(check(ledger(BASE), history(), view)) == {"hold_left"}


def test_decided_two_ways() -> None:
    ops = history()
    ops[1].attempts.append(Attempt("failed", "receiver_timeout"))
    report = check(ledger(BASE), ops)
    assert "decided_twice" in kinds(report)
    assert "row_for_failed_payment" in kinds(report)


def test_router_money_not_conserved() -> None:
    view = router_view()
    view.balances["alice"] += 1
    assert "money_not_conserved" in kinds(check(ledger(BASE), history(), view))


def test_no_progress_after_heal() -> None:
    report = check(ledger(BASE), history(), require_success_after_heal=True,
                   succeeded_after_heal=False)
    assert kinds(report) == {"no_progress_after_heal"}


# --- the mixer's promises (check_mixer), on doctored ledgers and journals ---------------

MIX_BASE = [
    ("_open:alice", "_issuer", "alice", 1000),
    ("_open:bob", "_issuer", "bob", 1000),
    ("d1", "alice", "_mixer", 500),
    ("d2", "bob", "_mixer", 500),
]
ROUND = {"e": "round", "id": 1, "deposits": [["alice", "d1"], ["bob", "d2"]],
         "notes": [["carol", 500, "alice", "d1", False], ["dave", 500, "bob", "d2", False]]}


def note(i: int, receiver: str, amount: int = 500, attempt: int = 0) -> tuple[str, str, str, int]:
    from jackpay_plugins.mixer.pool import note_tx_id

    return (note_tx_id(1, i, attempt), "_mixer", receiver, amount)


def mixer_kinds(entries: list[tuple[str, str, str, int]],
                journal: list[dict[str, object]] | None = None) -> list[str]:
    from chaos.checker import check_mixer

    return sorted({v.kind for v in check_mixer(ledger(entries), journal or [ROUND])})


def test_a_clean_mixer_round_has_no_violation() -> None:
    assert mixer_kinds([*MIX_BASE, note(0, "carol"), note(1, "dave")]) == []


def test_every_broken_mixer_promise_is_named() -> None:
    paid = [*MIX_BASE, note(0, "carol"), note(1, "dave")]
    assert mixer_kinds([*paid, note(1, "dave", attempt=1)]) == ["payout_twice",
                                                                "stranded_deposit"]
    assert mixer_kinds([*MIX_BASE, note(0, "carol"), note(1, "mallory")]) == ["payout_wrong"]
    assert mixer_kinds([*MIX_BASE, note(0, "carol")]) == ["stranded_deposit"]  # note 1 unpaid
    assert "payout_unplanned" in mixer_kinds([*paid, ("_mix:r9:n0:a0", "_mixer", "eve", 1)])
    assert mixer_kinds([*paid, ("d3", "alice", "_mixer", 500)]) == ["stranded_deposit"]
    assert mixer_kinds([*paid, ("odd", "_mixer", "eve", 1)]) == ["mixer_row",
                                                                 "stranded_deposit"]
