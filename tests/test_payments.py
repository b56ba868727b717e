"""Payments end to end with real processes (ledger, router, payer daemons) on port 0.

Every row of DESIGN §2's table is exercised. After each failure the test checks that
nothing moved: no balance change, no ledger row, no hold left (balance == available),
and the receiver was told `cancel` where it had been offered the payment. After every
test, the ledger replayed from its CSV sums to zero with `_issuer` included and nobody
else negative.

A handful of representative tests (paid, insufficient funds, ledger killed, ledger
restarted mid-append, outcome_pending) run on both stores: `BOTH_STORES` runs them with
the CSV file and with PostgreSQL (a fresh database on the session's throwaway cluster,
tests/pg.py); the ledger's rows are then read from the database.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
from netkit import Network, fsize_limit
from paykit import (
    Peer,
    assert_conserved,
    assert_router_agrees,
    connect,
    eventually,
    ledger_rows,
    replay,
    up,
)

from common import PROTOCOL_VERSION
from common.aio import open_channel
from common.errors import ConnectionLost, RequestFailed
from common.framing import encode_frame
from common.messages import (
    ISSUER,
    PAYER_INBOUND,
    Error,
    GetBalance,
    Hello,
    Offer,
    Paid,
    Ping,
    Pong,
    decoder_for,
)

INBOUND = decoder_for(PAYER_INBOUND)
BOTH_STORES = pytest.mark.parametrize("store", ["csv", "postgresql"], indirect=True)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The ledger's store of this test: "csv" unless parametrized with BOTH_STORES."""
    return str(getattr(request, "param", "csv"))


@pytest.fixture
def network(network: Network, store: str, request: pytest.FixtureRequest) -> Network:
    if store == "postgresql":
        network.store = store
        network.dsn = request.getfixturevalue("pg_dsn")
        network.write_config()
    return network


# --- helpers -------------------------------------------------------------------------


async def assert_failed_cleanly(net: Network, alice: Peer, code: str, *, to: str = "bob",
                                amount: int = 100, offered: Peer | None = None) -> str:
    """Pay and expect `code`; then nothing moved and no hold is left."""
    rows_before = ledger_rows(net)
    bal_before = await alice.balance()
    tx_id = f"t-{code}-{random.randrange(10**9)}"
    assert await alice.pay(to, amount, tx_id) == code
    assert ledger_rows(net) == rows_before
    assert await alice.balance() == bal_before
    await alice.assert_no_hold()
    if offered is not None:
        assert [o.tx_id for o in offered.offers] == [tx_id]
        await eventually(lambda: [c.tx_id for c in offered.cancels] == [tx_id])
        assert offered.cancels[0].code == code
        assert offered.cancels[0].amount == amount
    status = await alice.client.status(tx_id)
    assert status.state == "failed"
    assert status.code == code
    assert_conserved(net)
    await assert_router_agrees(net)
    return tx_id


# --- the happy path ----------------------------------------------------------------------


@BOTH_STORES
async def test_success_moves_money_once_and_settles(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00", "carol": "0"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    assert len(ledger_rows(network)) == 2  # openings; none for carol's zero
    paid = await alice.client.send_payment("bob", 250, "lunch", "t-ok")
    assert isinstance(paid, Paid)
    assert paid.balance == 750
    rows = ledger_rows(network)
    assert len(rows) == 3
    assert (rows[-1]["sender"], rows[-1]["receiver"], rows[-1]["amount"], rows[-1]["tx_id"],
            rows[-1]["memo"]) == ("alice", "bob", "2.50", "t-ok", "lunch")
    assert int(rows[-1]["seq"]) == paid.seq
    assert await alice.assert_no_hold() == 750
    assert await bob.assert_no_hold() == 750
    await eventually(lambda: [s.tx_id for s in bob.settled] == ["t-ok"])
    assert bob.settled[0].balance == 750
    assert bob.settled[0].seq == paid.seq
    assert (bob.settled[0].amount, bob.settled[0].memo) == (250, "lunch")  # the offer's
    assert assert_conserved(network) == {ISSUER: -1500, "alice": 750, "bob": 750}
    await assert_router_agrees(network)
    history = await bob.client.history()
    assert [r.tx_id for r in history.rows] == ["_open:bob", "t-ok"]
    await alice.client.close()
    await bob.client.close()


# --- refusals before anyone is offered anything ------------------------------------------


@BOTH_STORES
async def test_insufficient_funds(network: Network) -> None:
    up(network, {"alice": "1.00", "bob": "5.00"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    await assert_failed_cleanly(network, alice, "insufficient_funds", amount=101)
    assert bob.offers == []
    assert await alice.pay("bob", 100) == "paid"  # exactly the balance is fine
    await eventually(lambda: len(bob.settled) == 1)  # bob acked it before the teardown


async def test_unknown_receiver(network: Network) -> None:
    up(network, {"alice": "1.00", "bob": "5.00"})
    alice = await connect(network, "alice")
    await assert_failed_cleanly(network, alice, "unknown_receiver", to="zed")
    assert await alice.pay("_issuer", 1) == "unknown_receiver"
    assert await alice.pay("alice", 1) == "bad_request"
    assert_conserved(network)


async def test_receiver_unreachable_without_session(network: Network) -> None:
    up(network, {"alice": "1.00", "bob": "5.00"})
    alice = await connect(network, "alice")
    await assert_failed_cleanly(network, alice, "receiver_unreachable")


async def test_receiver_unreachable_when_frozen(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    bob = network.start_payer("bob")
    alice = await connect(network, "alice")
    assert await alice.pay("bob", 10) == "paid"  # bob's daemon is alive and accepts
    bob.pause()
    try:
        await asyncio.sleep(0.8)  # past the freshness window: the router must ping
        started = time.monotonic()
        await assert_failed_cleanly(network, alice, "receiver_unreachable")
        assert time.monotonic() - started < 3.0  # the ping timeout, not the offer timeout
    finally:
        bob.resume()


# --- the receiver's answer ----------------------------------------------------------------


async def test_receiver_rejected_by_policy(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"}, max_incoming={"bob": "1.00"})
    bob = network.start_payer("bob")
    alice = await connect(network, "alice")
    tx_id = await assert_failed_cleanly(network, alice, "receiver_rejected", amount=101)
    # the daemon logged the offer it rejected and the cancel it got
    await eventually(lambda: "offer cancelled" in bob.log_path.read_text()
                     and tx_id in bob.log_path.read_text())
    assert await alice.pay("bob", 100) == "paid"  # at the limit: accepted


async def test_receiver_rejected_in_process(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})

    async def refuse(offer: Offer) -> str:
        return "not today"

    bob = await connect(network, "bob", refuse)
    alice = await connect(network, "alice")
    await assert_failed_cleanly(network, alice, "receiver_rejected", offered=bob)


async def test_receiver_timeout(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    release = asyncio.Event()

    async def never(offer: Offer) -> None:  # answers pings, never the offer
        await release.wait()

    bob = await connect(network, "bob", never)
    alice = await connect(network, "alice")
    await asyncio.sleep(0.7)  # stale: the link test pings bob, who answers
    started = time.monotonic()
    await assert_failed_cleanly(network, alice, "receiver_timeout", offered=bob)
    assert time.monotonic() - started >= 1.4  # offer_timeout_s = 1.5
    release.set()


# --- the ledger ---------------------------------------------------------------------------


@BOTH_STORES
async def test_ledger_unavailable_when_killed(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    network.procs["ledger"].kill()
    await asyncio.sleep(0.3)
    await assert_failed_cleanly(network, alice, "ledger_unavailable")
    assert bob.offers == []
    assert (await alice.client.query_balance()).balance == 1000  # cache still answers



async def test_ledger_write_failed_on_a_real_write_error(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    ledger = network.procs["ledger"]
    port = ledger.addr[1]
    assert ledger.stop() == 0
    os.replace(ledger.log_path, ledger.log_path.with_suffix(".first.log"))
    size = network.ledger_path.stat().st_size
    network.start_ledger(preexec_fn=fsize_limit(size + 20), port=port)
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    before = network.ledger_path.read_bytes()
    deadline = time.monotonic() + 5
    while True:  # until the router has reconnected to the new ledger
        tx_id = f"t-{random.randrange(10**9)}"
        code = await alice.pay("bob", 100, tx_id)
        if code != "ledger_unavailable" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert code == "ledger_write_failed"
    assert network.ledger_path.read_bytes() == before
    assert [o.tx_id for o in bob.offers] == [tx_id]
    await eventually(lambda: [c.tx_id for c in bob.cancels] == [tx_id])
    assert await alice.assert_no_hold() == 1000
    assert await bob.assert_no_hold() == 500
    assert assert_conserved(network) == {ISSUER: -1500, "alice": 1000, "bob": 500}
    await assert_router_agrees(network)


# --- exactly once -------------------------------------------------------------------------


async def test_same_tx_id_same_outcome_and_conflict(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    first = await alice.client.send_payment("bob", 300, "x", "t-same")
    again = await alice.client.send_payment("bob", 300, "x", "t-same")
    assert (again.seq, again.dtg) == (first.seq, first.dtg)
    assert [r["tx_id"] for r in ledger_rows(network)].count("t-same") == 1
    assert await alice.pay("bob", 301, "t-same", "x") == "tx_id_conflict"
    assert await alice.pay("bob", 300, "t-same", "other memo") == "tx_id_conflict"
    assert await alice.pay("bob", 5000, "t-poor") == "insufficient_funds"
    assert await alice.pay("bob", 5000, "t-poor") == "insufficient_funds"
    assert len(ledger_rows(network)) == 3
    assert await alice.assert_no_hold() == 700
    assert len(bob.settled) == 1
    # tx_ids are scoped by sender: bob's t-same is his own payment, alice's is untouched
    assert await bob.pay("alice", 300, "t-same", "x") == "paid"
    rows = [(r["sender"], r["tx_id"]) for r in ledger_rows(network)]
    assert rows.count(("alice", "t-same")) == rows.count(("bob", "t-same")) == 1
    st = await alice.client.status("t-same")
    assert (st.sender, st.receiver, st.amount, st.seq) == ("alice", "bob", 300, first.seq)
    st = await alice.client.status("t-same", sender="bob")  # received from bob
    assert (st.state, st.sender, st.receiver) == ("paid", "bob", "alice")
    # and a payment between two others is none of alice's business
    assert (await alice.client.status("_open:bob", sender="_issuer")).state == "unknown"
    assert_conserved(network)


async def test_200_concurrent_payments_exactly_100_succeed(network: Network) -> None:
    up(network, {"alice": "100.00", "bob": "0"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    codes = await asyncio.gather(*(alice.pay("bob", 100, f"c{i}") for i in range(200)))
    assert codes.count("paid") == 100
    assert codes.count("insufficient_funds") == 100
    assert await alice.assert_no_hold() == 0
    assert await bob.assert_no_hold() == 10000
    assert len(ledger_rows(network)) == 101
    assert assert_conserved(network) == {ISSUER: -10000, "alice": 0, "bob": 10000}
    await assert_router_agrees(network)


@pytest.mark.slow
async def test_router_sigkill_mid_load_then_retries_never_pay_twice(network: Network) -> None:
    up(network, {"alice": "100.00", "bob": "0"})

    async def slow(offer: Offer) -> None:
        await asyncio.sleep(random.uniform(0, 0.4))

    alice, bob = await connect(network, "alice"), await connect(network, "bob", slow)
    acked: dict[str, int] = {}

    async def send(tx_id: str) -> None:
        try:
            paid = await alice.client.send_payment("bob", 100, "", tx_id)
        except (ConnectionLost, RequestFailed):
            return
        acked[tx_id] = paid.seq

    tx_ids = [f"k{i}" for i in range(60)]
    tasks = [asyncio.create_task(send(t)) for t in tx_ids]
    await eventually(lambda: len(acked) >= 5)
    network.procs["router"].kill()
    await asyncio.gather(*tasks)
    assert 5 <= len(acked) < 60
    committed = {r["tx_id"]: int(r["seq"]) for r in ledger_rows(network)}
    assert all(committed[t] == seq for t, seq in acked.items())

    network.start_router()
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    replayed = replay(network)
    assert (await alice.balance()) == (replayed["alice"], replayed["alice"])
    assert (await bob.balance())[0] == replayed.get("bob", 0)
    # every client retries every tx_id: committed ones keep their seq, the rest run once
    results = await asyncio.gather(*(alice.client.send_payment("bob", 100, "", t)
                                      for t in tx_ids))
    for t, paid in zip(tx_ids, results, strict=True):
        if t in committed:
            assert paid.seq == committed[t]
    rows = ledger_rows(network)
    assert sorted(r["tx_id"] for r in rows if r["sender"] == "alice") == sorted(tx_ids)
    assert await alice.assert_no_hold() == 10000 - 60 * 100
    assert assert_conserved(network)["bob"] == 6000
    await assert_router_agrees(network)


@BOTH_STORES
@pytest.mark.slow
async def test_ledger_frozen_during_append_gives_outcome_pending_then_one_end(
        network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=1.0,
       ledger_timeout_s=0.3)
    ledger = network.procs["ledger"]

    async def freeze_ledger(offer: Offer) -> None:
        ledger.pause()  # the router appends right after our receipt

    bob = await connect(network, "bob", freeze_ledger)
    alice = await connect(network, "alice")
    started = time.monotonic()
    try:
        assert await alice.pay("bob", 100, "t-doubt") == "outcome_pending"
        assert time.monotonic() - started >= 0.9  # not before outcome_pending_after_s
        status = await alice.client.status("t-doubt")
        assert status.state == "pending"
        balance, available = await alice.balance()
        assert (balance, available) == (1000, 900)  # still held, not moved
        assert await alice.pay("bob", 100, "t-doubt") == "outcome_pending"  # joins, waits
    finally:
        ledger.resume()
    await eventually(lambda: [s.tx_id for s in bob.settled] == ["t-doubt"])
    paid = await alice.client.send_payment("bob", 100, "", "t-doubt")
    assert (await alice.client.status("t-doubt")).state == "paid"
    rows = [r for r in ledger_rows(network) if r["tx_id"] == "t-doubt"]
    assert len(rows) == 1
    assert int(rows[0]["seq"]) == paid.seq
    assert bob.cancels == []
    assert await alice.assert_no_hold() == 900
    assert assert_conserved(network) == {ISSUER: -1500, "alice": 900, "bob": 600}
    await assert_router_agrees(network)


@BOTH_STORES
@pytest.mark.slow
async def test_ledger_restarted_mid_append_resolves_the_payment_once(network: Network) -> None:
    """The ledger service dies with an append in doubt (frozen, then SIGKILLed) and comes
    back on the same store: the router asks again by tx_id, the payment ends once."""
    up(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=1.0,
       ledger_timeout_s=0.3)
    ledger = network.procs["ledger"]

    async def freeze_ledger(offer: Offer) -> None:
        ledger.pause()

    bob = await connect(network, "bob", freeze_ledger)
    alice = await connect(network, "alice")
    assert await alice.pay("bob", 100, "t-restart") == "outcome_pending"
    ledger.kill()
    network.restart("ledger")
    await eventually(lambda: [s.tx_id for s in bob.settled] == ["t-restart"], 15)
    assert (await alice.client.status("t-restart")).state == "paid"
    assert [r["tx_id"] for r in ledger_rows(network)].count("t-restart") == 1
    await network.wait_ledger_connected()
    assert await alice.pay("bob", 100, "t-after") == "paid"
    assert assert_conserved(network) == {ISSUER: -1500, "alice": 800, "bob": 700}
    await assert_router_agrees(network)


# --- sessions and lifecycle ---------------------------------------------------------------


async def test_sender_disconnect_does_not_abort_payment(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})

    async def slow(offer: Offer) -> None:
        await asyncio.sleep(0.5)

    bob = await connect(network, "bob", slow)
    alice = await connect(network, "alice")
    send = asyncio.create_task(alice.pay("bob", 100, "t-gone"))
    await eventually(lambda: len(bob.offers) == 1)
    await alice.client.close()
    with pytest.raises(ConnectionLost):
        await send
    await eventually(lambda: len(bob.settled) == 1)
    alice = await connect(network, "alice")
    assert (await alice.client.status("t-gone")).state == "paid"
    assert await alice.pay("bob", 100, "t-gone") == "paid"
    assert [r["tx_id"] for r in ledger_rows(network)].count("t-gone") == 1
    assert_conserved(network)


async def test_session_rules(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    host, port = network.procs["router"].addr
    tls = network.router_tls()
    # first frame not hello: refused and closed
    ch = await open_channel(host, port, INBOUND, name="t", tls=tls)
    with pytest.raises(RequestFailed) as info:
        await ch.request(GetBalance(id=0), timeout=2)
    assert info.value.code == "hello_required"
    await asyncio.wait_for(ch.wait_closed(), 2)
    # a payer's hello without a nonce (protocol 2's login): refused and closed
    ch = await open_channel(host, port, INBOUND, name="t", tls=tls)
    with pytest.raises(RequestFailed) as info:
        await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer", peer="alice"),
                         timeout=2)
    assert info.value.code == "bad_request"
    await asyncio.wait_for(ch.wait_closed(), 2)
    # a payer speaking an older protocol version: refused and closed, at the router and
    # at the ledger (an old peer could not decode fields added since)
    for addr, role, link in ((network.procs["router"].addr, "payer", tls),
                             (network.procs["ledger"].addr, "router", network.ledger_tls())):
        ch = await open_channel(*addr, INBOUND, name="t", tls=link)
        with pytest.raises(RequestFailed) as info:
            await ch.request(Hello(id=0, version=PROTOCOL_VERSION - 1, role=role, peer="alice"),
                             timeout=2)
        assert info.value.code == "unsupported_version"
        await asyncio.wait_for(ch.wait_closed(), 2)
    # a bad frame gets bad_request, the session goes on
    old_errors: list[Error] = []
    old = network.client("alice", on_error=old_errors.append)
    await old.connect()
    ch = old._channel
    assert ch is not None
    ch.send_raw(encode_frame(b"\x81\xa1t\xa3pay"))  # a pay with no fields
    await eventually(lambda: any(e.code == "bad_request" for e in old_errors))
    assert isinstance(await ch.request(Ping(id=0), timeout=2), Pong)
    # a second login for alice replaces this session
    alice = await connect(network, "alice")
    await asyncio.wait_for(ch.wait_closed(), 2)
    assert any(e.code == "session_replaced" for e in old_errors)
    assert await alice.assert_no_hold() == 1000


@pytest.mark.slow
async def test_sigterm_finishes_in_flight_and_refuses_new(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})

    async def slow(offer: Offer) -> None:
        await asyncio.sleep(0.6)

    bob = await connect(network, "bob", slow)
    alice = await connect(network, "alice")
    first = asyncio.create_task(alice.pay("bob", 100, "t-before"))
    await eventually(lambda: len(bob.offers) == 1)
    router = network.procs["router"]
    router.signal(signal.SIGTERM)
    await asyncio.sleep(0.1)
    assert await alice.pay("bob", 100, "t-after") == "shutting_down"
    assert await first == "paid"
    rc = await asyncio.to_thread(router.wait, 10)
    assert rc == 0
    assert [r["tx_id"] for r in ledger_rows(network)][-1] == "t-before"
    assert_conserved(network)


@pytest.mark.slow
async def test_sigterm_with_a_payment_stuck_at_the_ledger_answers_outcome_pending(
        network: Network) -> None:
    """A payment still waiting for the ledger when the grace period ends is abandoned: its
    sender is told `outcome_pending` (not left with a dropped connection), and the ledger
    decides its fate: here it writes the row, and the restarted router knows it is paid."""
    up(network, {"alice": "10.00", "bob": "5.00"}, shutdown_grace_s=0.5,
       outcome_pending_after_s=30.0)
    await connect(network, "bob")
    alice = await connect(network, "alice")
    ledger, router = network.procs["ledger"], network.procs["router"]
    ledger.pause()
    stuck = asyncio.create_task(alice.pay("bob", 100, "t-stuck"))
    await asyncio.sleep(0.3)  # offered, received, appended: the append is unanswered
    router.signal(signal.SIGTERM)
    assert await asyncio.wait_for(stuck, 10) == "outcome_pending"
    assert await asyncio.to_thread(router.wait, 10) == 0
    ledger.resume()  # the append was in its socket before the pause: it writes the row
    await eventually(lambda: any(r["tx_id"] == "t-stuck" for r in ledger_rows(network)))
    network.start_router()
    alice = await connect(network, "alice")
    st = await alice.client.status("t-stuck")
    assert st.state == "paid"  # the replay tells the new router
    assert await alice.assert_no_hold() == 900
    assert_conserved(network)
