"""Strict decoding of every message type: good ones round-trip, bad fields are refused."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import common.messages as m
from common.errors import ErrorCode

EXAMPLES: list[m.Message] = [
    m.Hello(id=1, version=1, role="payer", peer="alice"),
    m.Hello(id=1, version=3, role="payer", peer="alice", nonce=b"n" * 32),
    m.Challenge(re=1, nonce=b"s" * 32, server="router.testnet"),
    m.Auth(id=2, sig=b"x" * 64),
    m.Welcome(re=1, version=1, server="router", balance=100, available=90, last_tx_time=None),
    m.Ping(id=2), m.Pong(re=2),
    m.Error(re=3, code="insufficient_funds", message="no", tx_id="t1"),
    m.Error(re=None, code="frame_too_large", message="too big"),
    m.Append(id=4, rows=[m.RowIn(tx_id="t1", sender="_issuer", receiver="alice", amount=5)]),
    m.Appended(re=4, results=[m.AppendResult(status="written", seq=1,
                                             dtg="2026-01-01T00:00:00.000000Z", hash="0" * 64)]),
    m.Rows(re=5, rows=[m.LedgerRow(seq=1, dtg="2026-01-01T00:00:00.000000Z", sender="_issuer",
                                   receiver="alice", amount=5, tx_id="t1", memo="", hash="0" * 64)],
           next_seq=2, last_seq=1),
    m.Read(id=5, from_seq=3, limit=10, party="bob"), m.Rows(re=5, rows=[], next_seq=3, last_seq=2),
    m.Stats(id=6), m.StatsReply(re=6, rows=1, fsyncs=1, batches=1, appends=1, uptime_ms=5,
                                last_hash="0" * 64),
    m.Pay(id=7, tx_id="t2", to="bob", amount=1250, memo="lunch"),
    m.Paid(re=7, tx_id="t2", seq=9, dtg="2026-01-01T00:00:00.000000Z", balance=10),
    m.GetBalance(id=8), m.BalanceReply(re=8, balance=1, available=1),
    m.History(id=9), m.HistoryReply(re=9, rows=[], next_seq=1),
    m.Status(id=10, tx_id="t2"), m.Status(id=10, tx_id="t2", sender="alice"), m.StatusReply(re=10, tx_id="t2", state="paid", seq=9),
    m.Offer(id=11, tx_id="t2", sender="alice", amount=1250, memo="lunch"),
    m.Receipt(re=11, tx_id="t2"), m.Reject(re=11, tx_id="t2", reason="too much"),
    m.Settled(id=12, tx_id="t2", sender="alice", seq=9, balance=1250),
    m.Cancel(id=13, tx_id="t2", sender="alice", code="x"),
    m.Ack(re=12), m.Send(id=14, to="bob", amount=5), m.Watch(id=15),
    m.Event(kind="paid", tx_id="t2"),
    m.Inspect(id=16),
    m.InspectReply(re=16, balances={"_issuer": -5, "alice": 5}, holds={"alice": 2},
                   in_flight=[m.InFlight(tx_id="t3", sender="alice", receiver="bob", amount=2,
                                         step="offer", age_ms=12)],
                   sessions=["alice"], ledger_connected=True),
    m.Reconcile(id=17),
    m.ReconcileReply(re=17, ok=False, rows=9, router_last_seq=9, differences=[
        m.Difference(what="balance", account="alice", router=5, ledger=4)]),
    m.Lookup(id=23, keys=[m.TxKey(sender="alice", tx_id="t1")]),
    m.Found(re=23, rows=[m.LedgerRow(seq=1, dtg="d", sender="alice", receiver="bob", amount=5,
                                     tx_id="t1", memo="", hash="h")]),
    m.Balances(id=24, after="alice", limit=10),
    m.BalancesReply(re=24, balances=[("bob", 5)], last_seq=1, last_hash="h", more=True),
    m.ListParticipants(id=18),
    m.ParticipantsReply(re=18, participants=[m.ParticipantInfo(
        id="dave", name="Dave", kind="individual", opening_balance=500, max_incoming=None,
        suspended=False, added_at_run_time=True, has_key=True, online=False, balance=500,
        available=500)]),
    m.AddParticipant(id=19, payer="dave", name="Dave", opening_balance=500, key=b"k" * 32),
    m.SuspendParticipant(id=20, payer="bob"),
    m.ResumeParticipant(id=21, payer="bob"),
    m.ParticipantChanged(re=21, participant=m.ParticipantInfo(
        id="bob", name="", kind="party", opening_balance=0, max_incoming=100,
        suspended=False, added_at_run_time=False, has_key=False, online=True, balance=0,
        available=0), note="not suspended"),
    m.Reload(id=22),
    m.ReloadReply(re=22, added=["erin"], removed=[], changed=["bob"],
                  restart_needed=["[router] port"]),
]
ALL_TYPES = tuple({type(x) for x in EXAMPLES})
DECODER = m.decoder_for(ALL_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    assert DECODER.decode(m.encode(msg)) == msg


def test_every_message_type_has_an_example() -> None:
    defined = {c for c in vars(m).values()
               if isinstance(c, type) and issubclass(c, m.Message) and c is not m.Message}
    assert defined == set(ALL_TYPES)


@pytest.mark.parametrize("msg", [
    m.Offer(id=1, tx_id="t", sender="alice", amount=1),
    m.Settled(id=1, tx_id="t", sender="alice", seq=1, balance=1),
    m.Cancel(id=1, tx_id="t", sender="alice", code="x")], ids=lambda x: type(x).__name__)
def test_the_receiver_is_told_the_sender_as_from(msg: m.Message) -> None:
    raw = msgspec.msgpack.decode(m.encode(msg))
    assert raw["from"] == "alice"
    assert "sender" not in raw


def test_nonces_and_signatures_are_binary_of_exact_length() -> None:
    for frame in ({"t": "hello", "id": 1, "version": 3, "role": "payer", "nonce": b"n" * 31},
                  {"t": "hello", "id": 1, "version": 3, "role": "payer", "nonce": "n" * 32},
                  {"t": "auth", "id": 1, "sig": b"x" * 63}, {"t": "auth", "id": 1, "sig": "x" * 64},
                  {"t": "auth", "id": 1}):
        with pytest.raises(msgspec.ValidationError):
            DECODER.decode(msgspec.msgpack.encode(frame))


def _pay(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"t": "pay", "id": 1, "tx_id": "t1", "to": "bob", "amount": 100}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize("frame", [
    _pay(amount=1.5), _pay(amount=100.0), _pay(amount=True), _pay(amount=-1), _pay(amount=0),
    _pay(amount="1.00"), _pay(amount=10**16), _pay(id=-1), _pay(id=True), _pay(id=...),
    _pay(to="_issuer x"), _pay(to="a,b"), _pay(to=""), _pay(to="=cmd"), _pay(tx_id=""),
    _pay(tx_id="a" * 200), _pay(tx_id="a b"), _pay(memo="x" * 257), _pay(memo=5),
    _pay(extra=1), _pay(t="nope"), {"id": 1}, {"t": 5}, [1, 2], "pay", 5,
    {"t": "hello", "id": 1, "version": 1, "role": "boss"},
    {"t": "append", "id": 1, "rows": []},
    {"t": "read", "id": 1, "limit": 0}, {"t": "read", "id": 1, "limit": 1001},
    {"t": "read", "id": 1, "from_seq": 0},
])
def test_strict_decoding_refuses(frame: Any) -> None:
    with pytest.raises(msgspec.ValidationError):
        DECODER.decode(msgspec.msgpack.encode(frame))


def test_garbage_is_a_decode_error_and_id_is_salvaged_when_readable() -> None:
    with pytest.raises(msgspec.DecodeError):
        DECODER.decode(b"\xc1\xff\x00")
    assert m.salvage_request_id(b"\xc1\xff") is None
    assert m.salvage_request_id(msgspec.msgpack.encode(_pay(amount=1.5, id=42))) == 42
    assert m.salvage_request_id(msgspec.msgpack.encode(_pay(id=True))) is None


def test_error_codes_are_documented_and_marked() -> None:
    for code in ErrorCode:
        assert code.doc
        assert isinstance(code.retriable, bool)
    assert ErrorCode.RECEIVER_TIMEOUT.retriable
    assert not ErrorCode.INSUFFICIENT_FUNDS.retriable


def test_protocol_doc_lists_every_message_and_code() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
    for cls in ALL_TYPES:
        tag = cls.__struct_config__.tag
        assert f"`{tag}`" in doc, f"docs/PROTOCOL.md does not describe `{tag}`"
    for code in ErrorCode:
        assert f"`{code.value}`" in doc, f"docs/PROTOCOL.md does not list `{code.value}`"


def test_an_append_result_with_its_seal_fits_the_bound_appends_are_cut_by() -> None:
    import msgspec as ms

    biggest = m.AppendResult(status="duplicate", seq=2**63 - 1,
                             dtg="2026-12-01T10:00:00.000000Z", hash="f" * 64,
                             seal=m.Seal(head_seq=2**63 - 1, head_hash="f" * 64, sig=b"\xff" * 64))
    assert len(ms.msgpack.encode(biggest)) <= m.APPEND_RESULT_BYTES
