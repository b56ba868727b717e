"""The importable PayerClient and the payer daemon.

Tier 1 runs against `FakeRouter`, a tiny in-test router built on common.aio.Channel over
real loopback TLS with the network's keys (no mocked sockets), logging payers in with the
router's own login code (router.login): enough of the router contract to exercise the
client's offer/settled/cancel handling and the daemon's retry with the same tx_id.
Tier 2 runs against the real network (ledger + router processes) once router/ exists.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import PROTOCOL_VERSION
from common.aio import Channel, start_channel_server
from common.config import load_config
from common.errors import ConnectionLost, ErrorCode, RequestFailed
from common.keygen import ensure_keys
from common.keys import KeyStore
from common.limits import FailedLogins
from common.messages import (
    ROUTER_REQUESTS,
    BalanceReply,
    Cancel,
    Error,
    GetBalance,
    Hello,
    History,
    HistoryReply,
    LedgerRow,
    Message,
    Offer,
    Paid,
    Pay,
    Ping,
    Pong,
    Receipt,
    Reject,
    Settled,
    Status,
    StatusReply,
    Welcome,
    decoder_for,
)
from common.tls import server_context
from payer_client import PayerClient, PayerCredentials
from router.keyring import PayerKeys
from router.login import Login, LoginPolicy, LoginRefused

REPO_ROOT = Path(__file__).resolve().parents[1]
HAVE_ROUTER = (REPO_ROOT / "router" / "__main__.py").exists()
HAVE_LEDGER = (REPO_ROOT / "ledger" / "__main__.py").exists()
needs_network = pytest.mark.skipif(not (HAVE_ROUTER and HAVE_LEDGER),
                                   reason="router/ or ledger/ not built yet")


# --- a fake router -------------------------------------------------------------------


class FakeRouter:
    """Speaks the router side of the payer protocol; balances in a dict, rows in a list.

    `drop_reply_after_commit`: commit the next payment, then close the sender's connection
    instead of answering (the in-doubt case the payer must retry with the same tx_id).
    """

    def __init__(self, balances: dict[str, int], root: Path) -> None:
        self.root = root
        self.balances = dict(balances)
        self.sessions: dict[str, Channel] = {}
        self.outcomes: dict[str, Message] = {}
        self.params: dict[str, tuple[str, str, int, str]] = {}
        self.rows: list[LedgerRow] = []
        self.pays_seen: list[str] = []
        self.drop_reply_after_commit = False
        self.hold_pays = False  # never answer `pay` (the ledger-in-doubt case)
        # Runs before a `status` is answered (e.g. to send an offer first).
        self.before_status: Callable[[Channel, Status], Awaitable[None]] | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, port: int = 0) -> FakeRouter:
        if not (self.root / "network.toml").exists():
            write_config(self.root, 0)
        store = KeyStore.for_config(load_config(self.root / "network.toml"))
        keys = PayerKeys(store, list(self.balances))
        keys.load()
        self.policy = LoginPolicy(store.network_id, store.server_name("router"), keys,
                                  FailedLogins(100))
        self._server = await start_channel_server(
            self._accept, decoder_for(ROUTER_REQUESTS), "127.0.0.1", port, name="payer",
            tls=server_context(store, "router"))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for ch in list(self.sessions.values()):
            ch.close()

    def _accept(self, ch: Channel) -> None:
        state: dict[str, str] = {}
        login = Login(self.policy, ch.address)
        ch.on_message = lambda c, m: self._handle(c, m, state, login)
        ch.start()

    async def _handle(self, ch: Channel, msg: Message, state: dict[str, str],
                      login: Login) -> None:
        me = state.get("peer")
        if me is None:
            try:
                if isinstance(msg, Hello) and login.claimed is None:
                    ch.send_nowait(login.on_hello(msg, 0.0))
                    return
                peer = login.on_auth(msg, 0.0).payer_id
            except LoginRefused as refused:
                ch.reply_error(getattr(msg, "id", None), refused.code, refused.message)
                ch.close()
                return
            old = self.sessions.get(peer)
            if old is not None:
                old.close()
            state["peer"] = peer
            self.sessions[peer] = ch
            ch.handshake_complete()
            bal = self.balances[peer]
            ch.send_nowait(Welcome(re=getattr(msg, "id", 0), version=PROTOCOL_VERSION,
                                   server="fake", balance=bal, available=bal))
            return
        match msg:
            case Ping(id=rid):
                ch.send_nowait(Pong(re=rid))
            case Pay() if me is not None:
                await self._pay(ch, me, msg)
            case GetBalance(id=rid) if me is not None:
                bal = self.balances[me]
                ch.send_nowait(BalanceReply(re=rid, balance=bal, available=bal))
            case History(id=rid) if me is not None:
                rows = [r for r in self.rows if me in (r.sender, r.receiver)]
                ch.send_nowait(HistoryReply(re=rid, rows=rows, next_seq=len(self.rows) + 1))
            case Status(id=rid, tx_id=tx):
                if self.before_status is not None:
                    await self.before_status(ch, msg)
                out = self.outcomes.get(tx)
                if isinstance(out, Paid):
                    ch.send_nowait(StatusReply(re=rid, tx_id=tx, state="paid", seq=out.seq))
                elif isinstance(out, Error):
                    ch.send_nowait(StatusReply(re=rid, tx_id=tx, state="failed", code=out.code))
                else:
                    ch.send_nowait(StatusReply(re=rid, tx_id=tx, state="unknown"))

    async def _pay(self, ch: Channel, me: str, pay: Pay) -> None:
        self.pays_seen.append(pay.tx_id)
        if self.hold_pays:
            return
        params = (me, pay.to, pay.amount, pay.memo)
        if pay.tx_id in self.outcomes:
            if self.params[pay.tx_id] != params:
                ch.send_nowait(Error(re=pay.id, code="tx_id_conflict", message="other params",
                                     tx_id=pay.tx_id))
                return
            ch.send_nowait(msgspec.structs.replace(self.outcomes[pay.tx_id], re=pay.id))
            return
        self.params[pay.tx_id] = params
        reply = await self._decide(me, pay)
        self.outcomes[pay.tx_id] = reply
        if self.drop_reply_after_commit and isinstance(reply, Paid):
            self.drop_reply_after_commit = False
            ch.close()
            return
        ch.send_nowait(reply)

    async def _decide(self, me: str, pay: Pay) -> Message:
        def fail(code: str, text: str) -> Error:
            return Error(re=pay.id, code=code, message=text, tx_id=pay.tx_id)

        if pay.amount > self.balances[me]:
            return fail("insufficient_funds", "not enough")
        if pay.to not in self.balances:
            return fail("unknown_receiver", f"no {pay.to}")
        recv = self.sessions.get(pay.to)
        if recv is None or recv.closed:
            return fail("receiver_unreachable", f"{pay.to} is offline")
        try:
            answer = await recv.request(Offer(id=0, tx_id=pay.tx_id, sender=me,
                                              amount=pay.amount, memo=pay.memo), timeout=2.0)
        except (TimeoutError, ConnectionLost):
            recv.send_nowait(Cancel(id=recv.next_id(), tx_id=pay.tx_id, sender=me,
                                    code="receiver_timeout"))
            return fail("receiver_timeout", "no answer")
        if isinstance(answer, Reject):
            return fail("receiver_rejected", answer.reason)
        self.balances[me] -= pay.amount
        self.balances[pay.to] += pay.amount
        seq = len(self.rows) + 1
        self.rows.append(LedgerRow(seq=seq, dtg="2025-01-01T00:00:00Z", sender=me,
                                   receiver=pay.to, amount=pay.amount, tx_id=pay.tx_id,
                                   memo=pay.memo, hash="x"))
        try:
            await recv.request(Settled(id=0, tx_id=pay.tx_id, sender=me, seq=seq,
                                       balance=self.balances[pay.to]), timeout=2.0)
        except (TimeoutError, ConnectionLost, RequestFailed):
            pass
        return Paid(re=pay.id, tx_id=pay.tx_id, seq=seq, dtg="2025-01-01T00:00:00Z",
                    balance=self.balances[me])


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeRouter]:
    router = await FakeRouter({"alice": 10_000, "bob": 500, "carol": 0}, tmp_path).start()
    yield router
    await router.stop()


def client(router: FakeRouter, who: str, **kw: object) -> PayerClient:
    """`who` logged in with its own key (a stranger such as mallory gets a fresh one)."""
    cfg = load_config(router.root / "network.toml")
    try:
        creds = PayerCredentials.from_config(cfg, who)
    except Exception:
        creds = PayerCredentials.from_config(cfg, "alice")
        creds = PayerCredentials(creds.network_id, Ed25519PrivateKey.generate(), creds.tls)
    return PayerClient("127.0.0.1", router.port, who, credentials=creds,
                       **kw)  # type: ignore[arg-type]


# --- the client against the fake router -----------------------------------------------


async def test_connect_gives_welcome_and_balance_view(fake: FakeRouter) -> None:
    async with client(fake, "alice") as alice:
        assert alice.balance.balance == 10_000
        assert alice.balance.available == 10_000
        rtt = await alice.test_router_link()
        assert 0 < rtt < 5


async def test_unknown_payer_is_refused(fake: FakeRouter) -> None:
    mallory = client(fake, "mallory")
    with pytest.raises(RequestFailed) as info:
        await mallory.connect()
    assert info.value.code == ErrorCode.AUTH_FAILED
    assert not mallory.connected


async def test_payment_offer_settled_and_views(fake: FakeRouter) -> None:
    offers: list[Offer] = []
    settled: list[Settled] = []

    async def on_offer(o: Offer) -> None:
        offers.append(o)

    async with client(fake, "bob", on_offer=on_offer, on_settled=settled.append) as bob, \
            client(fake, "alice") as alice:
        pay = alice.create_payment("bob", 1250, memo="lunch")
        paid = await alice.send_payment(pay)
        assert paid.tx_id == pay.tx_id
        assert paid.seq == 1
        assert paid.balance == 8750
        assert alice.balance.balance == 8750
        assert alice.balance.available == 8750
        assert alice.last_tx_time == paid.dtg
        assert [o.amount for o in offers] == [1250]
        assert offers[0].memo == "lunch"
        await asyncio.sleep(0.05)
        assert [s.tx_id for s in settled] == [pay.tx_id]
        assert bob.balance.balance == 1750
        assert bob.last_tx_time is not None
        again = await alice.send_payment(pay)  # same tx_id: same outcome, no new row
        assert again.seq == paid.seq
        assert len(fake.rows) == 1
        hist = await alice.history()
        assert [r.tx_id for r in hist.rows] == [pay.tx_id]
        st = await alice.status(pay.tx_id)
        assert st.state == "paid"
        assert st.seq == 1
        bal = await bob.query_balance()
        assert bal.balance == 1750


async def test_rejecting_offer_gives_receiver_rejected(fake: FakeRouter) -> None:
    async with client(fake, "bob", on_offer=lambda o: "too much") as _bob, \
            client(fake, "alice") as alice:
        with pytest.raises(RequestFailed) as info:
            await alice.send_payment("bob", 100)
        assert info.value.code == ErrorCode.RECEIVER_REJECTED
        assert "too much" in info.value.message
        assert alice.balance.balance == 10_000


async def test_error_codes_reach_the_caller(fake: FakeRouter) -> None:
    async with client(fake, "carol") as carol:
        with pytest.raises(RequestFailed) as info:
            await carol.send_payment("alice", 1)
        assert info.value.code == ErrorCode.INSUFFICIENT_FUNDS
        assert not info.value.retriable
    async with client(fake, "alice") as alice:
        with pytest.raises(RequestFailed) as info:
            await alice.send_payment("nobody", 1)
        assert info.value.code == ErrorCode.UNKNOWN_RECEIVER
        with pytest.raises(RequestFailed) as info:
            await alice.send_payment("bob", 1)  # bob not connected
        assert info.value.code == ErrorCode.RECEIVER_UNREACHABLE


async def test_cancel_is_acked_and_reported(fake: FakeRouter) -> None:
    cancels: list[Cancel] = []

    async def slow(o: Offer) -> None:
        await asyncio.sleep(3)

    async with client(fake, "bob", on_offer=slow, on_cancel=cancels.append), \
            client(fake, "alice") as alice:
        with pytest.raises(RequestFailed) as info:
            await alice.send_payment("bob", 5)
        assert info.value.code == ErrorCode.RECEIVER_TIMEOUT
        await asyncio.sleep(0.05)
        assert [c.code for c in cancels] == ["receiver_timeout"]


async def test_create_payment_validates() -> None:
    c = PayerClient("127.0.0.1", 1, "alice", credentials=None)
    for bad in (0, -5, 10**16):
        with pytest.raises(ValueError, match="amount"):
            c.create_payment("bob", bad)
    with pytest.raises(ValueError, match="amount"):
        c.create_payment("bob", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="to"):
        c.create_payment("bad id!", 1)
    with pytest.raises(ValueError, match="tx_id"):
        c.create_payment("bob", 1, tx_id="no spaces")
    pay = c.create_payment("bob", 1)
    assert len(pay.tx_id) == 32


async def test_connection_loss_fails_pending_calls(fake: FakeRouter) -> None:
    async def never(o: Offer) -> None:
        await asyncio.sleep(10)

    async with client(fake, "bob", on_offer=never), client(fake, "alice") as alice:
        task = asyncio.create_task(alice.send_payment("bob", 5))
        await asyncio.sleep(0.2)
        fake.sessions["alice"].close()
        with pytest.raises(ConnectionLost):
            await task
    with pytest.raises(ConnectionLost):
        await alice.query_balance()


async def test_not_connected_raises_connection_lost() -> None:
    c = PayerClient("127.0.0.1", 1, "alice", credentials=None)
    with pytest.raises(ConnectionLost):
        await c.query_balance()
    with pytest.raises(ConnectionRefusedError):
        await c.connect()


# --- the daemon against the fake router ------------------------------------------------


def write_config(root: Path, port: int, *, max_incoming: dict[str, str] | None = None,
                 request_timeout_s: float = 5.0) -> Path:
    lines = ["[network]", 'id = "fake"', "", "[router]", 'host = "127.0.0.1"', f"port = {port}", "",
             "[payer]", 'control_dir = "ctl"', "reconnect_max_s = 0.3",
             f"request_timeout_s = {request_timeout_s}"]
    for pid in ("alice", "bob", "carol"):
        lines += ["", "[[participants]]", f'id = "{pid}"', 'opening_balance = "0.00"']
        if max_incoming and pid in max_incoming:
            lines.append(f'max_incoming = "{max_incoming[pid]}"')
    path = root / "network.toml"
    path.write_text("\n".join(lines) + "\n")
    ensure_keys(load_config(path))
    return path


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, control: str) -> None:
        self.proc = proc
        self.control = control

    @classmethod
    async def start(cls, config: Path, who: str, timeout: float = 10.0) -> Daemon:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        log = open(config.parent / f"{who}.log", "ab")  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "payer_client", "run", "--config", str(config), "--id", who,
            stdout=asyncio.subprocess.PIPE, stderr=log, env=env)
        log.close()
        assert proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith(f"READY payer id={who} control="), line
        return cls(proc, line.strip().split("control=", 1)[1])

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            return await self.proc.wait()


async def cli(config: Path, who: str, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payer_client", *args, "--config", str(config), "--id", who,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_daemon_serves_cli_and_applies_policy(tmp_path: Path) -> None:
    fake = await FakeRouter({"alice": 10_000, "bob": 0, "carol": 0}, tmp_path).start()
    config = write_config(tmp_path, fake.port, max_incoming={"bob": "20.00"})
    alice = await Daemon.start(config, "alice")
    bob = await Daemon.start(config, "bob")
    try:
        mode = os.stat(alice.control).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        rc, out, err = await cli(config, "alice", "send", "bob", "12.50", "--tx-id", "t-1")
        assert rc == 0, err
        assert "paid 12.50 to bob" in out
        assert "t-1" in out
        assert "balance=87.50" in out
        rc, out, err = await cli(config, "alice", "send", "bob", "20.01")
        assert rc == 1
        assert "receiver_rejected" in err
        assert "20.00" in err
        rc, out, _ = await cli(config, "bob", "balance", "--json")
        assert rc == 0
        assert '"balance_minor": 1250' in out
        rc, out, _ = await cli(config, "alice", "ping")
        assert rc == 0
        assert "router link ok" in out
    finally:
        assert await alice.stop() == 0
        assert await bob.stop() == 0
        await fake.stop()
    assert not os.path.exists(alice.control)  # noqa: ASYNC240


async def test_daemon_resends_same_tx_id_after_lost_reply(tmp_path: Path) -> None:
    fake = await FakeRouter({"alice": 10_000, "bob": 0, "carol": 0}, tmp_path).start()
    config = write_config(tmp_path, fake.port)
    alice = await Daemon.start(config, "alice")
    bob = await Daemon.start(config, "bob")
    try:
        fake.drop_reply_after_commit = True
        rc, out, err = await cli(config, "alice", "send", "bob", "1.00", "--tx-id", "lost-1",
                                 "--json")
        assert rc == 0, err
        assert '"seq": 1' in out
        assert fake.pays_seen.count("lost-1") == 2  # sent, reply lost, re-sent after reconnect
        assert len(fake.rows) == 1
        assert fake.balances["bob"] == 100
    finally:
        await alice.stop()
        await bob.stop()
        await fake.stop()


async def test_daemon_reports_outcome_pending_and_keeps_trying(tmp_path: Path) -> None:
    fake = await FakeRouter({"alice": 10_000, "bob": 0, "carol": 0}, tmp_path).start()
    config = write_config(tmp_path, fake.port, request_timeout_s=1.0)
    alice = await Daemon.start(config, "alice")
    bob = await Daemon.start(config, "bob")
    try:
        fake.hold_pays = True
        rc, out, err = await cli(config, "alice", "send", "bob", "1.00", "--tx-id", "held")
        assert rc == 1
        assert "outcome_pending" in err
        assert "status held" in err
        rc, out, _ = await cli(config, "alice", "status", "held", "--json")
        assert rc == 4  # status: pending
        assert '"state": "pending"' in out
        fake.hold_pays = False  # the daemon's next re-send of `held` goes through
        for _ in range(50):
            if fake.rows:
                break
            await asyncio.sleep(0.1)
        assert [r.tx_id for r in fake.rows] == ["held"]
        assert fake.pays_seen.count("held") >= 2
    finally:
        await alice.stop()
        await bob.stop()
        await fake.stop()


async def test_daemon_resync_keeps_a_fresh_offer_for_the_same_tx_id(tmp_path: Path) -> None:
    """Bob holds an offer when his session drops. On reconnect the daemon asks `status`;
    before the answer (`unknown`: the old run never committed) a fresh offer for the same
    tx_id arrives, as when the sender re-sends it to a restarted router. The answer was
    about the old offer: the fresh one must stay, and its `settled` names its sender."""
    fake = await FakeRouter({"alice": 10_000, "bob": 0, "carol": 0}, tmp_path).start()
    config = write_config(tmp_path, fake.port)
    bob = await Daemon.start(config, "bob")
    try:
        first = fake.sessions["bob"]
        offer = Offer(id=0, tx_id="x1", sender="alice", amount=100, memo="")
        assert isinstance(await first.request(offer, timeout=5), Receipt)
        asked: list[str] = []

        async def fresh_offer_first(ch: Channel, msg: Status) -> None:
            if msg.tx_id == "x1" and not asked:
                asked.append(msg.tx_id)
                assert isinstance(await ch.request(offer, timeout=5), Receipt)

        fake.before_status = fresh_offer_first
        first.close()  # the router "died" before `settled`
        for _ in range(100):
            if asked:
                break
            await asyncio.sleep(0.05)
        assert asked == ["x1"]
        await asyncio.sleep(0.2)  # the `unknown` answer reaches the daemon
        await fake.sessions["bob"].request(Settled(id=0, tx_id="x1", sender="alice", seq=1,
                                                   balance=100), timeout=5)
    finally:
        assert await bob.stop() == 0
        await fake.stop()
    lines = (tmp_path / "bob.log").read_text().splitlines()
    assert not [ln for ln in lines if "offer cancelled" in ln and "x1" in ln], lines
    assert [ln for ln in lines if "payment received" in ln and "tx_id=x1" in ln
            and "sender=alice" in ln and "amount=1.00" in ln], lines


async def test_a_restarted_daemon_reports_what_it_received(tmp_path: Path) -> None:
    """The offer was taken by a daemon that has since restarted: the router's `settled`
    and `cancel` still say what was paid (not 0.00 and an empty memo)."""
    fake = await FakeRouter({"alice": 10_000, "bob": 0, "carol": 0}, tmp_path).start()
    config = write_config(tmp_path, fake.port)
    bob = await Daemon.start(config, "bob")  # never saw these offers
    try:
        ch = fake.sessions["bob"]
        await ch.request(Settled(id=0, tx_id="x1", sender="alice", seq=1, balance=250,
                                 amount=250, memo="rent"), timeout=5)
        await ch.request(Cancel(id=0, tx_id="x2", sender="carol", code="ledger_write_failed",
                                amount=75), timeout=5)
    finally:
        assert await bob.stop() == 0
        await fake.stop()
    lines = (tmp_path / "bob.log").read_text().splitlines()
    assert [ln for ln in lines if "payment received" in ln and "tx_id=x1" in ln
            and "amount=2.50" in ln], lines
    assert [ln for ln in lines if "offer cancelled" in ln and "tx_id=x2" in ln
            and "amount=0.75" in ln], lines


async def test_daemon_waits_for_router_then_ready(tmp_path: Path) -> None:
    # Reserve a port, start the daemon with nothing listening there, then start the router.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    config = write_config(tmp_path, port)
    start = asyncio.create_task(Daemon.start(config, "alice", timeout=15))
    await asyncio.sleep(1.0)
    assert not start.done()
    fake = await FakeRouter({"alice": 100, "bob": 0, "carol": 0}, tmp_path).start(port)
    alice = await start
    try:
        rc, out, _ = await cli(config, "alice", "balance")
        assert rc == 0
        assert "balance 1.00" in out
    finally:
        await alice.stop()
        await fake.stop()


# --- software using the API against the real network ----------------------------------


@needs_network
def test_program_sends_and_receives_without_daemon(network: object) -> None:
    from netkit import Network

    assert isinstance(network, Network)
    network.participants.update({"alice": "100.00", "bob": "5.00"})
    network.write_config()
    network.start_ledger()
    router = network.start_router()
    _host, _port = router.addr

    async def program() -> None:
        got: list[Settled] = []
        async with network.client("bob", on_settled=got.append) as bob, \
                network.client("alice") as alice:
            assert alice.balance.balance == 10_000
            paid = await alice.send_payment("bob", 1250, memo="api")
            assert paid.balance == 8750
            again = await alice.send_payment("bob", 1250, memo="api", tx_id=paid.tx_id)
            assert again.seq == paid.seq
            with pytest.raises(RequestFailed) as info:
                await alice.send_payment("bob", 999, tx_id=paid.tx_id)
            assert info.value.code == ErrorCode.TX_ID_CONFLICT
            for _ in range(50):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert [s.tx_id for s in got] == [paid.tx_id]
            assert bob.balance.balance == 500 + 1250
            assert (await bob.query_balance()).balance == 1750

    asyncio.run(program())


def test_a_daemon_whose_session_loop_dies_exits_instead_of_hanging(tmp_path: Path) -> None:
    """The daemon announces itself on stdout once connected; with nobody reading it (the
    pipe closed) that write fails. The session loop ends with it — and the daemon exits
    (common.aio.watch) instead of living on without ever reconnecting."""
    import subprocess

    from netkit import Network
    from paykit import up

    net = Network(tmp_path)
    up(net, {"alice": "10.00"})
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "payer_client", "run", "--config", str(net.config_path),
             "--id", "alice", "--router", "{}:{}".format(*net.procs["router"].addr)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=net.env(), cwd=net.root)
        assert proc.stdout is not None
        proc.stdout.close()  # nobody will read the READY line
        try:
            code = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert code != 0, err
        assert "the router session loop ended by an exception" in err
    finally:
        net.stop_all()


async def test_the_control_socket_answers_every_send_and_names_its_tx_id(
        tmp_path: Path) -> None:
    """A program driving the daemon's control socket: a failed `send` without a tx_id is
    answered with the tx_id the daemon chose (so it can ask `status`, or re-send the same
    one: a new tx_id would be a second payment); a tx_id `pay` cannot carry is refused
    `bad_request`, never left without an answer."""
    from netkit import Network
    from paykit import up

    from common.aio import open_unix_channel
    from common.messages import CONTROL_REPLIES, Send

    net = Network(tmp_path)
    up(net, {"alice": "10.00", "bob": "0.00"})
    net.start_payer("alice")
    net.start_payer("bob")
    ch = await open_unix_channel(str(net.config.control_socket("alice")),
                                 decoder_for(CONTROL_REPLIES), name="control(alice)")
    try:
        welcome = await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="cli",
                                         peer="test"), timeout=5)
        assert isinstance(welcome, Welcome)
        with pytest.raises(RequestFailed) as poor:
            await ch.request(Send(id=0, to="bob", amount=10**9), timeout=10)
        assert poor.value.code == ErrorCode.INSUFFICIENT_FUNDS
        assert poor.value.tx_id is not None
        status = await ch.request(Status(id=0, tx_id=poor.value.tx_id), timeout=10)
        assert isinstance(status, StatusReply)
        assert (status.state, status.code) == ("failed", "insufficient_funds")
        with pytest.raises(RequestFailed) as long_id:
            await ch.request(Send(id=0, to="bob", amount=1, tx_id="t" * 150), timeout=10)
        assert long_id.value.code == ErrorCode.BAD_REQUEST
        paid = await ch.request(Send(id=0, to="bob", amount=100, tx_id="once"), timeout=10)
        assert isinstance(paid, Paid)
    finally:
        ch.close()
        net.stop_all()


async def test_a_send_through_the_mixer_does_not_join_a_direct_one_with_its_tx_id() -> None:
    """The daemon joins a `send` to one in its outbox with the same tx_id only when it
    is the same payment: through the mixer or not is part of it (the router answers
    `tx_id_conflict` otherwise; joined, the caller would be told a payment it never made
    was paid)."""
    from payer_client.client import make_pay
    from payer_client.daemon import Outgoing

    direct = make_pay("bob", 500, "", "t1")
    entry = Outgoing(direct, asyncio.get_running_loop().create_future())
    assert entry.same_params(make_pay("bob", 500, "", "t1"))
    assert not entry.same_params(make_pay("bob", 500, "", "t1", mix=True))
    assert not entry.same_params(make_pay("bob", 501, "", "t1"))
