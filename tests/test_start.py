"""The router starts from the ledger's balances, not a replay of every row (issue 11):
the pure rules of the book, the ledger's `balances` and `lookup`, and a restarted router
that remembers only the latest rows yet answers a retry of an older payment exactly once.
"""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from netkit import REPO_ROOT, Network

from common.errors import InvariantViolation, RequestFailed
from common.messages import (
    ISSUER,
    Balances,
    BalancesReply,
    Found,
    LedgerRow,
    Lookup,
    Paid,
    TxKey,
)
from router.book import Book
from router.transactions import TxParams, TxState


def row(seq: int, sender: str, receiver: str, amount: int, tx_id: str) -> LedgerRow:
    return LedgerRow(seq=seq, dtg=f"2026-01-01T00:00:{seq:02d}.000000Z", sender=sender,
                     receiver=receiver, amount=amount, tx_id=tx_id, memo="", hash="0" * 64)


# --- the book --------------------------------------------------------------------------


def test_a_retry_of_a_payment_older_than_the_start_moves_no_money_twice() -> None:
    book = Book()
    book.start_from([(ISSUER, -1000), ("alice", 700), ("bob", 300)], last_seq=2)
    assert (book.base_seq, book.last_seq) == (2, 2)
    # alice's old t1 (row 2) is retried: the router runs it, holds the money, the ledger
    # answers `duplicate` with seq 2 — already in the balances.
    book.txs.begin("t1", TxParams("alice", "bob", 300, ""))
    book.accounts.place_hold("alice", 300)
    book.commit("t1", "alice", "bob", 300, seq=2, dtg="d")
    assert book.accounts.snapshot() == {ISSUER: -1000, "alice": 700, "bob": 300}
    assert book.accounts.holds() == {}
    assert book.txs.get("alice", "t1").state is TxState.PAID  # type: ignore[union-attr]
    # A new payment after the start moves money as ever.
    book.txs.begin("t2", TxParams("alice", "bob", 100, ""))
    book.accounts.place_hold("alice", 100)
    book.commit("t2", "alice", "bob", 100, seq=3, dtg="d")
    assert book.accounts.snapshot() == {ISSUER: -1000, "alice": 600, "bob": 400}
    # An opening issued before the start comes back as a duplicate: nothing moves.
    book.record_issued(row(1, ISSUER, "alice", 1000, "_open:alice"))
    assert book.accounts.balance("alice") == 600
    # Remembered rows are known to retries and status, and move nothing.
    book.remember(row(1, ISSUER, "bob", 5, "_open:bob"))
    assert book.txs.get(ISSUER, "_open:bob") is not None
    assert book.accounts.balance("bob") == 400


@pytest.mark.parametrize("balances", [[(ISSUER, -10), ("alice", 9)],
                                      [(ISSUER, 5), ("alice", -5)]])
def test_balances_that_cannot_be_right_are_refused(balances: list[tuple[str, int]]) -> None:
    book = Book()
    with pytest.raises(InvariantViolation):
        book.start_from(balances, last_seq=1)
    assert book.accounts.snapshot() == {}


# --- on a real network -----------------------------------------------------------------


def ledger_rows(net: Network) -> list[dict[str, str]]:
    with net.ledger_path.open(newline="") as f:
        return list(csv.DictReader(f))


async def test_the_ledger_answers_balances_page_by_page_and_lookups(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={f"p{i:02d}": "1.00" for i in range(12)})
    net.start_ledger()
    net.start_router()
    try:
        await net.wait_quiet()
        ch = await net.ledger_channel(identity="auditor", role="client")
        try:
            seen: list[tuple[str, int]] = []
            after = ""
            while True:
                page = await ch.request(Balances(id=0, after=after, limit=5))
                assert isinstance(page, BalancesReply)
                assert page.last_seq == 12
                seen += page.balances
                if not page.more:
                    break
                after = page.balances[-1][0]
            assert dict(seen) == {ISSUER: -1200} | {f"p{i:02d}": 100 for i in range(12)}
            assert [a for a, _ in seen] == sorted(a for a, _ in seen)
            found = await ch.request(Lookup(id=0, keys=[
                TxKey(sender=ISSUER, tx_id="_open:p03"), TxKey(sender="p03", tx_id="nope")]))
            assert isinstance(found, Found)
            assert [(r.receiver, r.amount) for r in found.rows] == [("p03", 100)]
        finally:
            await ch.aclose()
    finally:
        net.stop_all()


def assert_receipt(paid: Paid) -> None:
    """Every `paid` of a sealing ledger carries a receipt of its row, however the router
    learnt the outcome (the append, its record, the ledger asked)."""
    assert paid.proof is not None, f"paid {paid.tx_id} without the ledger's receipt"
    assert paid.proof.seq == paid.seq <= paid.proof.head_seq


async def test_a_restarted_router_remembers_the_latest_rows_and_asks_for_older_ones(
        tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "100.00", "bob": "5.00", "carol": "5.00"},
                  router_settings={"recent_rows": 2})
    net.start_ledger()
    net.start_router()
    try:
        async with net.client("alice") as alice, net.client("bob"), \
                net.client("carol") as carol:
            spent = await carol.send_payment("bob", 500, tx_id="all-of-it")  # carol: 0 left
            first = await alice.send_payment("bob", 100, tx_id="old-1")
            for i in range(4):
                await alice.send_payment("bob", 100, tx_id=f"new-{i}")
        net.procs["router"].stop()
        net.restart("router")
        log = (net.root / "logs" / "router.log").read_text()
        assert "book loaded" in log
        assert "recent_rows=2" in log  # it read back two rows, not the whole ledger
        async with net.client("alice") as alice, net.client("bob"):
            again = await alice.send_payment("bob", 100, tx_id="old-1")  # older than kept
            assert (again.seq, again.dtg) == (first.seq, first.dtg)
            assert_receipt(again)
            recent = await alice.send_payment("bob", 100, tx_id="new-3")  # kept in memory
            assert recent.seq == 9
            assert_receipt(recent)  # answered from the router's record
            with pytest.raises(RequestFailed) as conflict:
                await alice.send_payment("bob", 999, tx_id="old-1")
            assert conflict.value.code == "tx_id_conflict"
            status = await alice.status("old-1")
            assert (status.state, status.seq) == ("paid", first.seq)
        async with net.client("alice") as alice:  # bob offline: the re-run fails...
            offline = await alice.send_payment("bob", 100, tx_id="new-0")
            assert offline.seq == 6  # ...and the ledger, asked before it is answered, says paid
            assert_receipt(offline)
        async with net.client("carol") as carol, net.client("bob"):
            # carol could not pay it now (insufficient funds): the router asks the ledger
            # before it answers a failure, and the old payment is paid, once.
            net.procs["ledger"].stop()  # unless the ledger cannot tell: nothing recorded
            with pytest.raises(RequestFailed) as unsure:
                await carol.send_payment("bob", 500, tx_id="all-of-it")
            assert unsure.value.code == "ledger_unavailable"
            net.restart("ledger")
            await net.wait_ledger_connected()
            again_spent = await carol.send_payment("bob", 500, tx_id="all-of-it")
            assert again_spent.seq == spent.seq
            assert_receipt(again_spent)  # sealed by the restarted ledger
            with pytest.raises(RequestFailed) as poor:
                await carol.send_payment("bob", 500, tx_id="never-made")
            assert poor.value.code == "insufficient_funds"
        state = await net.wait_quiet()
        assert state.balances["alice"] == 10000 - 500  # five payments, each once
        assert state.holds == {}
        assert state.balances["bob"] == 500 + 500 + 500
        assert state.balances.get("carol", 0) == 0
        assert len(ledger_rows(net)) == 9  # 3 openings + 6 payments; no row twice
        done = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "router", "reconcile", "--config", str(net.config_path)],
            capture_output=True, text=True, cwd=REPO_ROOT, env=net.env(), timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        # A changed opening balance in the config: the ledger's row wins, as ever (the
        # router looks `_open:alice` up, older than its recent rows, and sends nothing).
        net.participants["alice"] = "999.00"
        net.write_config(ledger_port=net.procs["ledger"].addr[1])
        net.procs["router"].stop()
        net.restart("router")
        assert (await net.wait_quiet()).balances["alice"] == 10000 - 500
        assert len(ledger_rows(net)) == 9
    finally:
        net.stop_all()
