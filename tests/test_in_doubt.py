"""The in-doubt windows of DESIGN §2, one by one, with real processes and real faults.

Each test drives one payment into a window where some party cannot know its outcome —
the ledger's ack lost after its fsync, the router killed after the append, the receiver
gone between `receipt` and `settled`, the sender's daemon killed mid-payment — then
heals, and checks two things:

- the invariants of DESIGN §1, judged by `chaos.checker.check` from the ledger file,
  every answer the sender got, and the router's admin `inspect` view (money conserved,
  router balances == ledger replay, no hold or payment left in flight, no duplicate row,
  no payment decided two ways);
- the payment's final outcome is the same on every query: `status` asked by the sender
  and by the receiver, a retry of the same tx_id, and the ledger file (one row, same seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
from netkit import Network
from paykit import Decide, Peer, connect, eventually, ledger_rows

from chaos.checker import Attempt, Operation, RouterView, check
from chaos.proxy import FaultProxy
from common import PROTOCOL_VERSION
from common.aio import Channel, open_unix_channel
from common.errors import ConnectionLost, RequestFailed
from common.messages import (
    CONTROL_REPLIES,
    BalanceReply,
    Event,
    GetBalance,
    Hello,
    Offer,
    Paid,
    Send,
    Stats,
    StatsReply,
    Status,
    StatusReply,
    Watch,
    Welcome,
    decoder_for,
)
from payer_client.client import PayerClient

# --- helpers -------------------------------------------------------------------------


def configure(net: Network, participants: dict[str, str], **router_settings: object) -> None:
    net.participants = participants
    net.router_settings.update(router_settings)
    net.write_config()


@contextlib.asynccontextmanager
async def ledger_behind_proxy(net: Network) -> AsyncIterator[FaultProxy]:
    """ledger ← FaultProxy ← router. The proxy runs on this test's loop, so processes
    are started in a thread (the router's startup replay goes through the proxy)."""
    net.start_ledger()
    proxy = FaultProxy(net.procs["ledger"].addr)
    via = await proxy.start()
    try:
        await asyncio.to_thread(net.start_router, ledger=via)
        yield proxy
    finally:
        await proxy.stop()


def rows_for(net: Network, tx_id: str) -> list[dict[str, str]]:
    return [r for r in ledger_rows(net) if r["tx_id"] == tx_id]


async def attempt(op: Operation, client: PayerClient) -> Attempt:
    """Send op through an in-process client and record the answer like the workload."""
    try:
        paid = await client.send_payment(op.receiver, op.amount, op.memo, op.tx_id)
    except RequestFailed as exc:
        kind = "indeterminate" if exc.code == "outcome_pending" else "failed"
        result = Attempt(kind, str(exc.code))  # type: ignore[arg-type]
    except (ConnectionLost, TimeoutError):
        result = Attempt("indeterminate", "no_answer")
    else:
        result = Attempt("ok", seq=paid.seq)
    op.attempts.append(result)
    return result


async def quiet_view(net: Network) -> RouterView:
    """The router's admin view once no payment is in flight (bounded wait)."""
    state = await net.wait_quiet(10.0)
    return RouterView(dict(state.balances), dict(state.holds),
                      [f.tx_id for f in state.in_flight])


async def assert_invariants(net: Network, ops: list[Operation]) -> None:
    report = check(net.ledger_path.read_bytes(), ops, await quiet_view(net))
    assert report.ok, "\n".join(str(v) for v in report.violations)


async def step_of(net: Network, tx_id: str) -> str | None:
    state = await net.inspect()
    return next((f.step for f in state.in_flight if f.tx_id == tx_id), None)


async def wait_step(net: Network, tx_id: str, step: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await step_of(net, tx_id) != step:
        if time.monotonic() > deadline:
            raise AssertionError(f"{tx_id} never reached step {step}")
        await asyncio.sleep(0.01)


async def router_killed_at_append(net: Network, op: Operation,
                                  bob_on_offer: Decide) -> tuple[Peer, Peer]:
    """alice pays bob (`bob_on_offer` runs when bob is offered it: it sets the ledger
    link's fault); once the payment waits at the `append` step the router is SIGKILLed.
    Returns (alice, bob) after alice's attempt ended without an answer."""
    bob = await connect(net, "bob", bob_on_offer)
    alice = await connect(net, "alice")
    sending = asyncio.create_task(attempt(op, alice.client))
    await wait_step(net, op.tx_id, "append")
    net.procs["router"].kill()
    assert await sending == Attempt("indeterminate", "no_answer")
    return alice, bob


async def assert_paid_everywhere(net: Network, op: Operation, sender: PayerClient,
                                 receiver: PayerClient | None) -> int:
    """One ledger row; `status` from both sides and a retry of the tx_id all say paid
    with that row's seq. Returns the seq."""
    rows = rows_for(net, op.tx_id)
    assert len(rows) == 1, rows
    seq = int(rows[0]["seq"])
    assert (rows[0]["sender"], rows[0]["receiver"]) == (op.sender, op.receiver)
    for who in (sender, receiver):
        if who is None:
            continue
        st = await who.status(op.tx_id, op.sender)
        assert (st.state, st.seq, st.code) == ("paid", seq, None), (who.payer_id, st)
    assert await attempt(op, sender) == Attempt("ok", seq=seq)
    assert op.final == Attempt("ok", seq=seq)
    return seq


async def ledger_appends(net: Network) -> int:
    """How many `append` requests the ledger has received (straight, not via a proxy)."""
    ch = await net.ledger_channel(identity="auditor", role="client")
    try:
        reply = await ch.request(Stats(id=0), timeout=2)
    finally:
        ch.close()
    assert isinstance(reply, StatsReply)
    return reply.appends


class Control:
    """A CLI-like connection to a payer daemon's control socket."""

    def __init__(self, ch: Channel, welcome: Welcome) -> None:
        self.ch = ch
        self.welcome = welcome
        self.events: list[Event] = []

    @classmethod
    async def open(cls, net: Network, payer_id: str) -> Control:
        events: list[Event] = []
        ch = await open_unix_channel(
            str(net.config.control_socket(payer_id)), decoder_for(CONTROL_REPLIES),
            name=f"control({payer_id})",
            on_message=lambda c, m: events.append(m) if isinstance(m, Event) else None)
        welcome = await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="cli", peer="test"), timeout=5)
        assert isinstance(welcome, Welcome)
        ctl = cls(ch, welcome)
        ctl.events = events
        return ctl

    async def send(self, op: Operation) -> Attempt:
        try:
            reply = await self.ch.request(Send(id=0, to=op.receiver, amount=op.amount,
                                               memo=op.memo, tx_id=op.tx_id), timeout=30)
        except RequestFailed as exc:
            kind = ("indeterminate" if exc.code in ("outcome_pending", "router_unavailable",
                                                    "shutting_down") else "failed")
            result = Attempt(kind, str(exc.code))  # type: ignore[arg-type]
        except (ConnectionLost, TimeoutError):
            result = Attempt("indeterminate", "no_answer")
        else:
            assert isinstance(reply, Paid)
            result = Attempt("ok", seq=reply.seq)
        op.attempts.append(result)
        return result

    async def status(self, tx_id: str, sender: str | None = None) -> StatusReply:
        reply = await self.ch.request(Status(id=0, tx_id=tx_id, sender=sender), timeout=5)
        assert isinstance(reply, StatusReply)
        return reply

    async def balance(self) -> BalanceReply:
        reply = await self.ch.request(GetBalance(id=0), timeout=5)
        assert isinstance(reply, BalanceReply)
        return reply

    async def watch(self) -> None:
        await self.ch.request(Watch(id=0), timeout=5)

    def close(self) -> None:
        self.ch.close()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    await eventually(cond, timeout)


# --- 1. the ledger's ack lost after its fsync ----------------------------------------


async def test_ledger_ack_lost_after_fsync_is_resent_and_ends_paid_once(
        network: Network) -> None:
    configure(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=0.6)
    async with ledger_behind_proxy(network) as proxy:

        async def lose_the_ledgers_reply(offer: Offer) -> None:
            # The router appends right after this receipt: the append reaches the ledger
            # (written, fsync'd), its reply — and every reply after — is cut.
            proxy.cut_after(0, "down")

        bob = await connect(network, "bob", lose_the_ledgers_reply)
        alice = await connect(network, "alice")
        appends_before = await ledger_appends(network)
        op = Operation("t-ack-lost", "alice", "bob", 250, "in doubt")

        # In doubt: the row is on disk, the router cannot know; the sender is told so.
        assert await attempt(op, alice.client) == Attempt("indeterminate", "outcome_pending")
        await until(lambda: len(rows_for(network, op.tx_id)) == 1)
        assert await step_of(network, op.tx_id) == "append"
        for who in (alice, bob):
            st = await who.client.status(op.tx_id, op.sender)
            assert st.state == "pending", st
        assert await alice.balance() == (1000, 750)  # held, not moved
        assert await bob.balance() == (500, 500)
        assert bob.cancels == []
        # A retry of the same tx_id joins the payment still in doubt: it waits its own
        # `outcome_pending_after_s` and is told `outcome_pending` again (not left hanging,
        # not run a second time).
        assert await attempt(op, alice.client) == Attempt("indeterminate", "outcome_pending")
        assert [o.tx_id for o in bob.offers] == [op.tx_id]

        proxy.heal()  # the router reconnects and re-sends the same append: a duplicate
        await until(lambda: [s.tx_id for s in bob.settled] == [op.tx_id])
        seq = int(rows_for(network, op.tx_id)[0]["seq"])
        assert bob.settled[0].seq == seq
        assert await ledger_appends(network) - appends_before >= 2  # sent, then re-sent
        assert proxy.connections_total >= 2

        assert await assert_paid_everywhere(network, op, alice.client, bob.client) == seq
        assert await alice.balance() == (750, 750)
        assert await bob.balance() == (750, 750)
        assert bob.cancels == []
        assert [o.tx_id for o in bob.offers] == [op.tx_id]
        await assert_invariants(network, [op])


# --- 2. the router killed after the append, before replying -------------------------


async def test_router_killed_after_append_before_reply(network: Network) -> None:
    configure(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=10.0,
              ledger_timeout_s=5.0)
    async with ledger_behind_proxy(network) as proxy:

        async def slow_ledger_link(offer: Offer) -> None:
            # The append (and its reply) now take 1.5 s each way through the proxy: the
            # row lands on disk while its ack is still on the way back to the router.
            proxy.set_latency(1.5)

        bob = await connect(network, "bob", slow_ledger_link)
        alice = await connect(network, "alice")
        op = Operation("t-router-killed", "alice", "bob", 300)
        sending = asyncio.create_task(attempt(op, alice.client))
        await until(lambda: len(rows_for(network, op.tx_id)) == 1)
        network.procs["router"].kill()  # before the ack reached it
        assert await sending == Attempt("indeterminate", "no_answer")
        seq = int(rows_for(network, op.tx_id)[0]["seq"])
        assert bob.settled == []
        proxy.heal()

        await asyncio.to_thread(network.restart, "router")  # same port; replays the ledger
        alice2 = await connect(network, "alice")
        bob2 = await connect(network, "bob")
        assert alice2.client.welcome is not None
        assert bob2.client.welcome is not None
        assert (alice2.client.welcome.balance, alice2.client.welcome.available) == (700, 700)
        assert (bob2.client.welcome.balance, bob2.client.welcome.available) == (800, 800)

        assert await assert_paid_everywhere(network, op, alice2.client, bob2.client) == seq
        assert bob2.offers == []  # the retry did not run the payment again
        assert len(ledger_rows(network)) == 3
        await assert_invariants(network, [op])
        for p in (alice, bob, alice2, bob2):
            await p.client.close()


async def test_router_killed_before_append_arrives_then_retry_runs_once(
        network: Network) -> None:
    configure(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=10.0)
    async with ledger_behind_proxy(network) as proxy:

        async def swallow_ledger_link(offer: Offer) -> None:
            proxy.set_blackhole(True)  # the append never reaches the ledger

        op = Operation("t-router-killed-early", "alice", "bob", 300)
        alice, bob = await router_killed_at_append(network, op, swallow_ledger_link)
        proxy.heal()
        assert rows_for(network, op.tx_id) == []

        await asyncio.to_thread(network.restart, "router")
        bob2 = await connect(network, "bob")
        alice2 = await connect(network, "alice")
        # not in the ledger: the restarted router has never heard of it
        assert (await alice2.client.status(op.tx_id)).state == "unknown"
        # a retry of the same tx_id simply runs (once)
        assert (await attempt(op, alice2.client)).kind == "ok"
        assert [o.tx_id for o in bob2.offers] == [op.tx_id]
        await assert_paid_everywhere(network, op, alice2.client, bob2.client)
        assert await alice2.balance() == (700, 700)
        await assert_invariants(network, [op])
        for p in (alice, bob, alice2, bob2):
            await p.client.close()


# --- 3. the receiver gone between receipt and settled -------------------------------


async def test_receiver_killed_between_receipt_and_settled(network: Network) -> None:
    configure(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=10.0,
              ledger_timeout_s=5.0)
    async with ledger_behind_proxy(network) as proxy:
        network.start_payer("bob")  # a real daemon: it accepts and sends its receipt
        alice = await connect(network, "alice")
        proxy.set_latency(0.4)  # the append takes ~0.8 s: time to kill bob after his receipt
        op = Operation("t-receiver-killed", "alice", "bob", 400)
        sending = asyncio.create_task(attempt(op, alice.client))
        await wait_step(network, op.tx_id, "append")  # bob's receipt is in
        network.procs["bob"].kill()
        result = await sending
        assert result.kind == "ok"  # the payment stands: it is in the ledger
        proxy.heal()
        assert len(rows_for(network, op.tx_id)) == 1
        assert "bob" not in (await network.inspect()).sessions

        await asyncio.to_thread(network.restart, "bob")
        bob = await Control.open(network, "bob")
        try:
            assert bob.welcome.balance == 900  # the daemon's view on reconnect
            assert (await bob.balance()).balance == 900
            st = await bob.status(op.tx_id, op.sender)
            assert (st.state, st.seq) == ("paid", result.seq)
            assert await assert_paid_everywhere(network, op, alice.client, None) == result.seq
        finally:
            bob.close()
        assert await alice.balance() == (600, 600)
        await assert_invariants(network, [op])
        await alice.client.close()


async def test_receiver_link_lost_between_receipt_and_settled_resyncs(
        network: Network) -> None:
    """The receiver's daemon survives but its link drops after the receipt: it misses
    `settled`, and on reconnect asks `status` for its pending offer (DESIGN §2)."""
    configure(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=10.0,
              ledger_timeout_s=5.0)
    async with ledger_behind_proxy(network) as ledger_link:
        payer_link = FaultProxy(network.procs["router"].addr)
        via = await payer_link.start()
        try:
            await asyncio.to_thread(network.start_payer, "bob", router=via)
            bob = await Control.open(network, "bob")
            await bob.watch()
            alice = await connect(network, "alice")
            ledger_link.set_latency(0.4)
            op = Operation("t-receiver-cut", "alice", "bob", 400)
            sending = asyncio.create_task(attempt(op, alice.client))
            await wait_step(network, op.tx_id, "append")
            payer_link.cut_after(0, "up")  # bob's reconnects are cut too, until healed
            payer_link.reset_all()
            result = await sending
            assert result.kind == "ok"
            await wait_gone(network, op.tx_id)
            assert not any(e.kind == "settled" for e in bob.events)
            ledger_link.heal()
            payer_link.heal()
            # bob's daemon reconnects and resolves its pending offer by `status`
            await until(lambda: any(e.kind == "settled" and e.tx_id == op.tx_id
                                    for e in bob.events))
            ev = next(e for e in bob.events if e.kind == "settled")
            assert ev.seq == result.seq
            st = await bob.status(op.tx_id, op.sender)
            assert (st.state, st.seq) == ("paid", result.seq)
            assert (await bob.balance()).balance == 900
            assert await assert_paid_everywhere(network, op, alice.client, None) == result.seq
            bob.close()
            await assert_invariants(network, [op])
            await alice.client.close()
        finally:
            await payer_link.stop()


async def wait_gone(net: Network, tx_id: str) -> None:
    deadline = time.monotonic() + 10
    while await step_of(net, tx_id) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{tx_id} still in flight")
        await asyncio.sleep(0.02)


# --- 4. the sender's daemon killed with a payment in flight -------------------------


@pytest.mark.parametrize("decided_while_down", [False, True])
async def test_sender_daemon_killed_mid_payment_then_resent(
        network: Network, decided_while_down: bool) -> None:
    configure(network, {"alice": "10.00", "bob": "5.00"}, offer_timeout_s=15.0,
              outcome_pending_after_s=10.0)
    network.start_ledger()
    network.start_router()
    release = asyncio.Event()

    async def hold_the_offer(offer: Offer) -> None:
        await release.wait()

    bob: Peer = await connect(network, "bob", hold_the_offer)
    network.start_payer("alice")
    alice = await Control.open(network, "alice")
    op = Operation("t-sender-killed", "alice", "bob", 200, "kill me")
    sending = asyncio.create_task(alice.send(op))
    await until(lambda: [o.tx_id for o in bob.offers] == [op.tx_id])
    network.procs["alice"].kill()
    assert await sending == Attempt("indeterminate", "no_answer")
    alice.close()
    if decided_while_down:
        release.set()
        await until(lambda: len(rows_for(network, op.tx_id)) == 1)

    await asyncio.to_thread(network.restart, "alice")
    alice = await Control.open(network, "alice")
    # the workload re-sends the same tx_id through the restarted daemon
    assert alice.welcome.balance == (800 if decided_while_down else 1000)
    resend = asyncio.create_task(alice.send(op))
    if not decided_while_down:
        st = await alice.status(op.tx_id)
        assert st.state == "pending", st
        assert (await alice.balance()).available == 800  # one hold, not two
        release.set()
    result = await resend
    assert result.kind == "ok"
    rows = rows_for(network, op.tx_id)
    assert len(rows) == 1
    assert int(rows[0]["seq"]) == result.seq
    assert [o.tx_id for o in bob.offers] == [op.tx_id]  # offered once
    await until(lambda: [s.tx_id for s in bob.settled] == [op.tx_id])

    st = await alice.status(op.tx_id)
    assert (st.state, st.seq) == ("paid", result.seq)
    assert await alice.send(op) == Attempt("ok", seq=result.seq)
    assert (await alice.balance()).balance == 800
    bst = await bob.client.status(op.tx_id, op.sender)
    assert (bst.state, bst.seq) == ("paid", result.seq)
    assert await bob.assert_no_hold() == 700
    alice.close()
    await assert_invariants(network, [op])
    await bob.client.close()


async def test_append_from_a_killed_router_never_lands_after_restart_replay(
        network: Network) -> None:
    """The dead router's append is still on the wire (here: held by the link) when the
    new router connects and replays the ledger. Were it written now, the router would
    not know the row: `status` unknown while the ledger says paid, balances off (and the
    sender could spend the money twice). The ledger fences the old session when the new
    router says hello, so the stale append is dropped and a retry runs the payment once."""
    configure(network, {"alice": "10.00", "bob": "5.00"}, outcome_pending_after_s=10.0,
              ledger_timeout_s=5.0)
    async with ledger_behind_proxy(network) as proxy:

        async def slow_ledger_link(offer: Offer) -> None:
            proxy.set_latency(2.0)  # the append is on the wire for 2 s

        op = Operation("t-stale-append", "alice", "bob", 300)
        alice, bob = await router_killed_at_append(network, op, slow_ledger_link)
        proxy.heal()  # new connections are clean; the held append is still delivered
        await asyncio.to_thread(network.restart, "router")
        assert rows_for(network, op.tx_id) == []
        await asyncio.sleep(2.5)  # bounded: past the moment the held append is delivered
        assert rows_for(network, op.tx_id) == []
        alice2 = await connect(network, "alice")
        bob2 = await connect(network, "bob")
        assert (await alice2.client.status(op.tx_id)).state == "unknown"
        await assert_invariants(network, [op])  # router balances == ledger replay
        assert (await attempt(op, alice2.client)).kind == "ok"  # the retry runs, once
        assert [o.tx_id for o in bob2.offers] == [op.tx_id]
        await assert_paid_everywhere(network, op, alice2.client, bob2.client)
        assert await alice2.balance() == (700, 700)
        await assert_invariants(network, [op])
        for p in (alice, bob, alice2, bob2):
            await p.client.close()
