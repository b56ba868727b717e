"""Reconciliation: the router's live book against the ledger — the pure check, and
`jackpay-router reconcile` on a real network, healthy and with a row slipped into the
ledger behind the router's back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from netkit import REPO_ROOT, Network

from common.messages import Append, Appended, LedgerRow, RowIn
from router.reconcile import reconcile


def row(seq: int, sender: str, receiver: str, amount: int, tx: str) -> LedgerRow:
    return LedgerRow(seq=seq, dtg="d", sender=sender, receiver=receiver, amount=amount,
                     tx_id=tx, memo="", hash="h")


ROWS = [row(1, "_issuer", "alice", 1000, "_open:alice"), row(2, "alice", "bob", 300, "t1")]
KNOWN = {("_issuer", "_open:alice"): 1, ("alice", "t1"): 2}


def check(rows: list[LedgerRow] = ROWS, **kw: object) -> list[str]:
    args: dict[str, object] = {
        "router_last_seq": 2, "balances": {"_issuer": -1000, "alice": 700, "bob": 300},
        "holds": {}, "in_flight_debits": {}, "in_flight": set(),
        "known_seq": lambda s, t: KNOWN.get((s, t))}
    args.update(kw)
    diffs, _, _ = reconcile(rows, **args)  # type: ignore[arg-type]
    return [f"{d.what}:{d.account}" for d in diffs]


def test_a_book_that_matches_the_ledger_has_no_difference() -> None:
    assert check() == []


def test_every_kind_of_difference_is_named() -> None:
    assert check(balances={"_issuer": -1000, "alice": 600, "bob": 400}) == [
        "balance:alice", "balance:bob"]
    assert check(holds={"alice": 50}) == ["hold:alice"]
    slipped = [*ROWS, row(3, "bob", "mallory", 100, "x")]
    assert check(slipped, router_last_seq=3) == [
        "row:bob", "balance:bob", "balance:mallory"]
    issued = [row(1, "_issuer", "alice", 1000, "_open:alice")]
    assert check(issued, balances={"_issuer": -900, "alice": 1000}, router_last_seq=1) == [
        "balance:_issuer", "issued:_issuer", "balance:(sum of all)"]


def test_rows_in_flight_and_beyond_the_routers_last_seq_are_not_judged() -> None:
    ahead = [*ROWS, row(3, "alice", "bob", 5, "t2")]
    assert check(ahead) == []  # seq 3 is being committed while the check reads
    assert check(ahead, router_last_seq=3, in_flight={("alice", "t2")},
                 holds={"alice": 5}, in_flight_debits={"alice": 5}) == []


def run_reconcile(net: Network, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "reconcile", "--config",
                           str(net.config_path), *extra], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=net.env(), timeout=60)


async def test_reconcile_passes_then_names_a_row_slipped_behind_the_router(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "100.00", "bob": "0.00"})
    net.start_ledger()
    net.start_router()
    try:
        async with net.client("alice") as alice, net.client("bob"):
            await alice.send_payment("bob", 2500, tx_id="t-1")
        ok = await asyncio.to_thread(run_reconcile, net)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "OK: balances, holds and the issued total agree" in ok.stdout
        # With the router's own certificate, straight to the ledger: the router never
        # hears of this row.
        ch = await net.ledger_channel(peer="intruder")
        try:
            reply = await ch.request(Append(id=0, rows=[
                RowIn(tx_id="sneaky", sender="alice", receiver="bob", amount=1000)]))
        finally:
            await ch.aclose()
        assert isinstance(reply, Appended)
        assert reply.results[0].status == "written"
        # A payment after it, so that the router's last seq is past the slipped row.
        async with net.client("alice") as alice, net.client("bob"):
            await alice.send_payment("bob", 100, tx_id="t-2")
        bad = await asyncio.to_thread(run_reconcile, net, "--json")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        doc = json.loads(bad.stdout)
        named = {(d["what"], d["account"]) for d in doc["differences"]}
        assert ("row", "alice") in named
        assert ("balance", "alice") in named
        assert ("balance", "bob") in named
        text = await asyncio.to_thread(run_reconcile, net)
        assert "DIFFERENCES" in text.stdout
        assert "ledger row 3 (sneaky: alice -> bob)" in text.stdout  # after t-1 at 2
    finally:
        net.stop_all()
    gone = await asyncio.to_thread(run_reconcile, net)
    assert gone.returncode == 3
    assert "is the router running?" in gone.stderr


def test_which_rows_are_settled_when_read() -> None:
    """Folded at once: rows from before the router's start (even while a retry of that
    old payment runs again: its money is in the balances the router started from), and
    payments committed at that seq, not running. Held back: anything near the head, in
    flight (every leg), or not the router's."""
    from router.reconcile import settled_when_read

    known = {("alice", "t1"): 12, ("alice", "_leg2:t1"): 11}

    def settled(r: LedgerRow, in_flight: set[tuple[str, str]] = frozenset()) -> bool:  # type: ignore[assignment]
        return settled_when_read(r, base_seq=10, settled_to=20, in_flight=in_flight,
                                 known_seq=lambda s, t: known.get((s, t)))

    old = row(5, "alice", "bob", 1, "t0")
    assert settled(old)
    assert settled(old, {("alice", "t0")})  # a retry of it runs: still in the balances
    assert settled(row(12, "alice", "bob", 1, "t1"))
    assert settled(row(11, "alice", "_fee", 1, "_leg2:t1"))
    assert not settled(row(12, "alice", "bob", 1, "t1"), {("alice", "t1")})
    assert not settled(row(21, "alice", "bob", 1, "t9"))  # beyond what is committed
    assert not settled(row(13, "bob", "mallory", 1, "x"))  # not the router's
    assert not settled(row(14, "alice", "bob", 1, "t1"))  # its tx_id, at another seq


def test_a_row_from_before_the_start_is_judged_even_while_its_retry_runs() -> None:
    """Its money is in the balances the router started from (`Book.commit` only releases
    a retry's hold): skipping it would name a false difference."""
    rows = [*ROWS, row(3, "alice", "bob", 5, "t2")]
    state = {"router_last_seq": 3, "balances": {"_issuer": -1000, "alice": 695, "bob": 305},
             "holds": {"alice": 5}, "in_flight_debits": {"alice": 5},
             "in_flight": {("alice", "t2")}, "known_seq": lambda s, t: None}
    diffs, _, skipped = reconcile(rows, base_seq=3, **state)  # type: ignore[arg-type]
    assert (diffs, skipped) == ([], 0)


def test_rows_settled_when_read_are_folded_not_kept() -> None:
    """`Replay` keeps only the rows it cannot judge yet: folding the settled ones as they
    are read gives the verdict of reading them all at the end."""
    from router.reconcile import Replay

    state = {"router_last_seq": 3, "balances": {"_issuer": -1000, "alice": 695, "bob": 305},
             "holds": {}, "in_flight_debits": {}, "in_flight": set(),
             "known_seq": lambda s, t: {**KNOWN, ("alice", "t2"): 3}.get((s, t))}
    rows = [*ROWS, row(3, "alice", "bob", 5, "t2")]
    replay = Replay()
    for r in rows[:2]:
        replay.add(r, settled=True)
    replay.add(rows[2])  # committed only after it was read: judged at the verdict
    assert replay.held_back == 1
    assert replay.verdict(**state) == reconcile(rows, **state) == ([], 3, 0)  # type: ignore[arg-type]
    # a held-back row whose payment is in flight at the verdict is skipped, as before
    late = Replay()
    for r in rows[:2]:
        late.add(r, settled=True)
    late.add(rows[2])
    pending = state | {"balances": {"_issuer": -1000, "alice": 700, "bob": 300},
                       "in_flight": {("alice", "t2")}, "holds": {"alice": 5},
                       "in_flight_debits": {"alice": 5}}
    assert late.verdict(**pending) == ([], 3, 1)  # type: ignore[arg-type]
