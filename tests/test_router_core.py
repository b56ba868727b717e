"""Router core, pure units: accounts and holds, the tx table, the book's start and openings; plus
the ledger client's batching and in-doubt rule against an in-process fake ledger."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import PROTOCOL_VERSION
from common.aio import Channel
from common.errors import InvariantViolation
from common.messages import (
    ISSUER,
    LEDGER_REQUESTS,
    Append,
    Appended,
    AppendResult,
    Error,
    Hello,
    LedgerRow,
    Message,
    RowIn,
    Welcome,
    decoder_for,
)
from router.accounts import Accounts, InsufficientFunds
from router.book import Book, Opening, opening_tx_id
from router.ledger_client import LedgerClient, LedgerRefused, LedgerUnavailable
from router.transactions import TxIdConflict, TxParams, TxState, TxTable


def row(seq: int, sender: str, receiver: str, amount: int, tx_id: str, memo: str = "") -> LedgerRow:
    return LedgerRow(seq=seq, dtg=f"2026-01-01T00:00:{seq:02d}.000000Z", sender=sender,
                     receiver=receiver, amount=amount, tx_id=tx_id, memo=memo, hash="0" * 64)


# --- accounts and holds ----------------------------------------------------------------


def test_hold_reduces_available_not_balance() -> None:
    acc = Accounts()
    acc.apply(ISSUER, "alice", 100, held=False)
    acc.place_hold("alice", 60)
    assert acc.balance("alice") == 100
    assert acc.available("alice") == 40
    assert not acc.funds_available("alice", 41)
    assert acc.funds_available("alice", 40)


def test_hold_beyond_available_raises_and_changes_nothing() -> None:
    acc = Accounts()
    acc.apply(ISSUER, "alice", 100, held=False)
    acc.place_hold("alice", 70)
    with pytest.raises(InsufficientFunds):
        acc.place_hold("alice", 31)
    assert acc.held("alice") == 70


def test_apply_moves_money_and_releases_hold() -> None:
    acc = Accounts()
    acc.apply(ISSUER, "alice", 100, held=False)
    acc.place_hold("alice", 30)
    acc.apply("alice", "bob", 30, held=True, tx_time="t")
    assert (acc.balance("alice"), acc.available("alice"), acc.held("alice")) == (70, 70, 0)
    assert acc.balance("bob") == 30
    assert acc.last_tx_time("bob") == "t"
    assert acc.total() == 0


def test_release_twice_is_a_bug() -> None:
    acc = Accounts()
    acc.apply(ISSUER, "alice", 10, held=False)
    acc.place_hold("alice", 10)
    acc.release_hold("alice", 10)
    with pytest.raises(InvariantViolation):
        acc.release_hold("alice", 10)


def test_payer_never_negative_issuer_may_be() -> None:
    acc = Accounts()
    acc.apply(ISSUER, "alice", 5, held=False)
    assert acc.balance(ISSUER) == -5
    with pytest.raises(InvariantViolation):
        acc.apply("alice", "bob", 6, held=False)
    with pytest.raises(InvariantViolation):  # no hold placed
        acc.apply("alice", "bob", 5, held=True)
    assert acc.balance("alice") == 5
    assert acc.total() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]),
                          st.integers(1, 50), st.sampled_from(["commit", "release"])),
                max_size=60))
def test_property_holds_never_overspend(ops: list[tuple[str, str, int, str]]) -> None:
    acc = Accounts()
    for p in "abc":
        acc.apply(ISSUER, p, 40, held=False)
    holds: list[tuple[str, str, int, str]] = []
    for op in ops:
        sender, _, amount, _ = op
        if acc.funds_available(sender, amount):
            acc.place_hold(sender, amount)
            holds.append(op)
        assert acc.available(sender) >= 0
    for sender, receiver, amount, how in holds:
        if how == "commit" and sender != receiver:
            acc.apply(sender, receiver, amount, held=True)
        else:
            acc.release_hold(sender, amount)
        assert all(acc.balance(p) >= 0 for p in "abc")
    assert acc.total() == 0
    assert acc.total_held() == 0


# --- transaction table -----------------------------------------------------------------


def test_tx_lookup_same_params_and_conflict() -> None:
    txs = TxTable()
    p = TxParams("alice", "bob", 10, "m")
    assert txs.lookup("t1", p) is None
    txs.begin("t1", p)
    rec = txs.lookup("t1", p)
    assert rec is not None
    assert rec.state is TxState.PENDING
    with pytest.raises(TxIdConflict):
        txs.lookup("t1", TxParams("alice", "bob", 11, "m"))


def test_tx_ids_are_scoped_by_sender() -> None:
    """carol's t1 is another payment than alice's t1: she cannot squat alice's ids."""
    txs = TxTable()
    alice = TxParams("alice", "bob", 10, "m")
    carol = TxParams("carol", "bob", 99, "other")
    txs.begin("t1", alice)
    assert txs.lookup("t1", carol) is None
    txs.begin("t1", carol)
    txs.mark_failed("carol", "t1", "insufficient_funds")
    alice_rec = txs.get("alice", "t1")
    carol_rec = txs.get("carol", "t1")
    assert alice_rec is not None
    assert carol_rec is not None
    assert alice_rec.state is TxState.PENDING
    assert carol_rec.state is TxState.FAILED
    assert txs.get("bob", "t1") is None


def test_tx_states_only_move_forward() -> None:
    txs = TxTable()
    txs.begin("t1", TxParams("a", "b", 1, ""))
    txs.mark_failed("a", "t1", "receiver_timeout")
    with pytest.raises(InvariantViolation):
        txs.mark_paid("a", "t1", 3, "dtg")
    rec = txs.get("a", "t1")
    assert rec is not None
    assert rec.state is TxState.FAILED
    assert rec.seq is None
    with pytest.raises(InvariantViolation):
        txs.begin("t1", TxParams("a", "b", 1, ""))


# --- book: start, openings, commits ---------------------------------------------------------


def test_the_book_starts_from_balances_and_remembers_rows_without_moving_money() -> None:
    book = Book()
    book.start_from([(ISSUER, -100), ("alice", 70), ("bob", 30)], last_seq=2)
    book.remember(row(2, "alice", "bob", 30, "t1", "lunch"))
    book.remember(row(2, "alice", "bob", 30, "t1", "lunch"))  # same row again: skipped
    assert book.accounts.balance("alice") == 70
    assert book.accounts.balance("bob") == 30
    assert book.accounts.total() == 0
    assert book.accounts.last_tx_time("bob") == row(2, "a", "b", 1, "x").dtg
    rec = book.txs.lookup("t1", TxParams("alice", "bob", 30, "lunch"))
    assert rec is not None
    assert rec.state is TxState.PAID
    assert rec.seq == 2


def test_openings_issued_once_and_never_zero() -> None:
    book = Book()
    openings = [Opening("alice", 100), Opening("bob", 0), Opening("carol", 5)]
    rows = book.missing_openings(openings)
    assert [(r.tx_id, r.sender, r.receiver, r.amount) for r in rows] == [
        (opening_tx_id("alice"), ISSUER, "alice", 100), ("_open:carol", ISSUER, "carol", 5)]
    book.record_issued(row(1, ISSUER, "alice", 100, "_open:alice", "opening balance"))
    assert book.accounts.balance("alice") == 100
    assert [r.receiver for r in book.missing_openings(openings)] == ["carol"]


def test_tx_records_are_not_tracked_by_the_garbage_collector() -> None:
    """The tx table only grows; if its records were GC-tracked, every full collection
    would walk all of them and the router's pauses would grow with its uptime."""
    book = Book()
    book.start_from([(ISSUER, -100), ("alice", 90), ("bob", 10)], last_seq=2)
    book.remember(row(1, ISSUER, "alice", 100, "_open:alice"))
    book.remember(row(2, "alice", "bob", 10, "t0"))
    book.txs.begin("t1", TxParams("alice", "bob", 40, "m"))
    book.txs.mark_failed("alice", "t1", "receiver_rejected")
    book.txs.begin("t2", TxParams("alice", "bob", 5, ""))
    records = [book.txs.get(s, t) for s, t in (
        (ISSUER, "_open:alice"), ("alice", "t0"), ("alice", "t1"), ("alice", "t2"))]
    assert all(r is not None for r in records)
    for r in records:
        assert r is not None
        assert not gc.is_tracked(r), r
        assert not gc.is_tracked(r.params), r


def test_commit_releases_hold_and_marks_paid() -> None:
    book = Book()
    book.record_issued(row(1, ISSUER, "alice", 100, "_open:alice"))
    book.txs.begin("t1", TxParams("alice", "bob", 40, ""))
    book.accounts.place_hold("alice", 40)
    r = row(2, "alice", "bob", 40, "t1")
    book.commit(r.tx_id, r.sender, r.receiver, r.amount, r.seq, r.dtg)
    assert book.accounts.available("alice") == book.accounts.balance("alice") == 60
    rec = book.txs.get("alice", "t1")
    assert rec is not None
    assert rec.state is TxState.PAID
    assert rec.seq == 2


# --- ledger client against an in-process fake ledger -------------------------------------


@dataclass
class FakeLedger:
    """Answers hello; answers appends via `behaviour` (returns a reply or None to drop)."""

    behaviour: Callable[[Append, int], Message | None]
    appends: list[Append] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = Channel(reader, writer, decoder_for(LEDGER_REQUESTS), name="fake")
        ch.on_message = self._on_message
        ch.start()

    def _on_message(self, ch: Channel, msg: Message) -> None:
        if isinstance(msg, Hello):
            ch.send_nowait(Welcome(re=msg.id, version=PROTOCOL_VERSION, server="fake"))
        elif isinstance(msg, Append):
            self.appends.append(msg)
            reply = self.behaviour(msg, len(self.appends))
            if reply is not None:
                ch.send_nowait(reply)


def ok_reply(msg: Append, status: str = "written") -> Appended:
    return Appended(re=msg.id, results=[
        AppendResult(status=status, seq=i + 1, dtg="d", hash="h")  # type: ignore[arg-type]
        for i in range(len(msg.rows))])


@pytest.fixture
async def fake_ledger() -> AsyncIterator[Callable[..., asyncio.Future[FakeLedger]]]:
    made: list[FakeLedger] = []

    async def make(behaviour: Callable[[Append, int], Message | None]) -> FakeLedger:
        fl = FakeLedger(behaviour)
        await fl.start()
        made.append(fl)
        return fl

    yield make  # type: ignore[misc]
    for fl in made:
        assert fl.server is not None
        fl.server.close()


def rin(tx_id: str) -> RowIn:
    return RowIn(tx_id=tx_id, sender="alice", receiver="bob", amount=1)


async def test_rows_queued_in_one_turn_go_as_one_append(fake_ledger) -> None:  # type: ignore[no-untyped-def]
    fl = await fake_ledger(lambda msg, n: ok_reply(msg))
    client = LedgerClient("127.0.0.1", fl.port, tls=None, timeout_s=1.0)
    client.start()
    assert await client.wait_connected(2.0)
    futs = [client.append(rin(f"t{i}")) for i in range(50)]
    results = await asyncio.gather(*futs)
    assert len(fl.appends) == 1
    assert [r.seq for r in results] == list(range(1, 51))
    await client.aclose()


async def test_lost_answer_is_resent_until_answered(fake_ledger) -> None:  # type: ignore[no-untyped-def]
    # The first two appends are "lost" (no answer); the third gets a duplicate answer.
    fl = await fake_ledger(lambda msg, n: None if n < 3 else ok_reply(msg, "duplicate"))
    client = LedgerClient("127.0.0.1", fl.port, tls=None, timeout_s=0.2)
    client.start()
    assert await client.wait_connected(2.0)
    result = await asyncio.wait_for(client.append(rin("t1")), 5.0)
    assert result.status == "duplicate"
    assert len(fl.appends) == 3
    assert all(a.rows == fl.appends[0].rows for a in fl.appends)
    await client.aclose()


async def test_error_answer_is_definite(fake_ledger) -> None:  # type: ignore[no-untyped-def]
    fl = await fake_ledger(lambda msg, n: Error(re=msg.id, code="ledger_write_failed",
                                                message="disk full"))
    client = LedgerClient("127.0.0.1", fl.port, tls=None, timeout_s=1.0)
    client.start()
    assert await client.wait_connected(2.0)
    with pytest.raises(LedgerRefused) as info:
        await client.append(rin("t1"))
    assert info.value.code == "ledger_write_failed"
    assert len(fl.appends) == 1
    await client.aclose()


async def test_no_connection_means_unavailable() -> None:
    client = LedgerClient("127.0.0.1", 1, tls=None, timeout_s=0.2, retry_max_s=0.1)
    client.start()
    with pytest.raises(LedgerUnavailable):
        await client.append(rin("t1"))
    assert not await client.ping_ledger()
    await client.aclose()


def test_failures_remembered_are_bounded_oldest_forgotten_first() -> None:
    txs = TxTable(max_failed=3)
    params = TxParams("alice", "bob", 5, "")
    for i in range(5):
        txs.begin(f"f{i}", params)
        txs.mark_failed(params.sender, f"f{i}", "insufficient_funds")
    txs.begin("paid", params)
    txs.mark_paid(params.sender, "paid", 1, "2026-11-27T10:00:00.000000Z")
    assert [t for t in ("f0", "f1", "f2", "f3", "f4")
            if txs.get(params.sender, t) is not None] == ["f2", "f3", "f4"]
    assert txs.get(params.sender, "paid") is not None  # paid records are never dropped
    assert txs.lookup("f0", params) is None  # an old failure simply runs again
    # another sender's failures are not pushed out by this one's
    other = TxParams("mallory", "bob", 1, "")
    txs.begin("m-keep", TxParams("carol", "bob", 1, ""))
    txs.mark_failed("carol", "m-keep", "insufficient_funds")
    for i in range(10):
        txs.begin(f"m{i}", other)
        txs.mark_failed("mallory", f"m{i}", "insufficient_funds")
    assert txs.get("carol", "m-keep") is not None
    assert [i for i in range(10) if txs.get("mallory", f"m{i}") is not None] == [7, 8, 9]
    # in all at most max_failed_total, taken from whoever has the most
    small = TxTable(max_failed=100, max_failed_total=6)
    for who, n in (("carol", 2), ("mallory", 10)):
        for i in range(n):
            small.begin(f"{who}{i}", TxParams(who, "bob", 1, ""))
            small.mark_failed(who, f"{who}{i}", "insufficient_funds")
    assert [i for i in range(2) if small.get("carol", f"carol{i}") is not None] == [0, 1]
    assert [i for i in range(10) if small.get("mallory", f"mallory{i}") is not None] == [
        6, 7, 8, 9]


async def test_openings_answered_out_of_seq_order_are_all_recorded(  # type: ignore[no-untyped-def]
        fake_ledger, tmp_path) -> None:
    """300 participants: the openings go out as two appends. Here the
    ledger wrote the second one first (as after a re-sent first append), so the answers
    come back out of seq order; every opening is recorded once all the same."""
    from common.config import load_config
    from router.server import RouterSecurity, RouterService

    def answer(msg: Append, n: int) -> Appended:
        # the rows of the second append hold seqs 1..(300 - the first append's rows)
        first_seq = 300 - len(msg.rows) + 1 if n == 1 else 1
        return Appended(re=msg.id, results=[
            AppendResult(status="written", seq=first_seq + i, dtg="d", hash="h")
            for i in range(len(msg.rows))])

    fl = await fake_ledger(answer)
    lines = ["[network]", 'id = "t"', "", "[ledger]", 'host = "127.0.0.1"', f"port = {fl.port}",
             "", "[router]", 'host = "127.0.0.1"', "port = 0"]
    for i in range(300):
        lines += ["", "[[participants]]", f'id = "p{i:03d}"', 'opening_balance = "1.00"']
    (tmp_path / "net.toml").write_text("\n".join(lines) + "\n")
    cfg = load_config(tmp_path / "net.toml")
    svc = RouterService(cfg, RouterSecurity.from_config(cfg, plain=True), host="127.0.0.1", port=0,
                        ledger_host="127.0.0.1", ledger_port=fl.port,
                        admin_path=tmp_path / "admin.sock")
    svc.ledger.start()
    try:
        assert await svc.ledger.wait_connected(5)
        await asyncio.wait_for(svc.issue_openings(), 10)
    finally:
        await svc.ledger.aclose()
    # as many rows as their replies (each up to APPEND_RESULT_BYTES) fit in one frame
    first = len(fl.appends[0].rows)
    assert 150 < first < 256
    assert [len(a.rows) for a in fl.appends] == [first, 300 - first]
    assert svc.book.last_seq == 300
    assert all(svc.book.accounts.balance(f"p{i:03d}") == 100 for i in range(300))
    assert svc.book.accounts.total() == 0
