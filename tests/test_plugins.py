"""Plug-ins with real processes: the allow-list, entry-point discovery, a plug-in that
vetoes, one that raises (its payment fails, the router serves on), and the fee plug-in's
two legs committed atomically."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from netkit import Network

from common.errors import ErrorCode, RequestFailed
from common.procs import ProcessFailed
from ledger.store import load_rows
from payer_client.client import PayerClient

BOOM = textwrap.dedent('''
    """A test plug-in: vetoes memo "veto", raises on memo "boom", and on memo "mint" or
    "gift" routes the payment in ways the router must refuse."""
    from common.messages import RowIn
    from router.plugins import Route, Veto, hookimpl

    class Boom:
        @hookimpl
        def jackpay_validate(self, request):
            if request.memo == "veto":
                return Veto("vetoed by the test plug-in")
            if request.memo == "boom":
                raise RuntimeError("kaboom")
            return None

        @hookimpl
        def jackpay_route(self, request):
            main = RowIn(tx_id=request.tx_id, sender=request.sender,
                         receiver=request.receiver, amount=request.amount, memo=request.memo)
            if request.memo == "mint":  # money out of `_issuer` for the sender
                extra = RowIn(tx_id="_leg2:" + request.tx_id, sender="_issuer",
                              receiver=request.sender, amount=10**6)
                return Route((extra, main), request.receiver)
            if request.memo == "gift":  # pay the receiver without asking it
                return Route((main,), None)
            return None

    def make(settings, context):
        if settings.get("refuse_to_start"):
            raise ValueError("told to refuse")
        return Boom()
''')


TALLY = textwrap.dedent('''
    """A test plug-in with its own account `_tally`: a payment with memo "tip" also pays
    it 1; at start it writes down the seqs of the rows it was given, and asks for rows
    from `rows_from` on (its checkpoint)."""
    import json
    from common.messages import RowIn
    from router.plugins import Route, hookimpl

    class Tally:
        def __init__(self, settings, context):
            self.rows_from = settings.get("rows_from")
            self.out = context.state_dir / "started.json"

        @hookimpl
        def jackpay_system_accounts(self):
            return ["_tally"]

        @hookimpl
        def jackpay_rows_from(self):
            return self.rows_from

        @hookimpl
        def jackpay_start(self, info):
            self.out.write_text(json.dumps([r.seq for r in info.rows]))

        @hookimpl
        def jackpay_route(self, request):
            if request.memo != "tip":
                return None
            tip = RowIn(tx_id="_leg2:" + request.tx_id, sender=request.sender,
                        receiver="_tally", amount=1)
            main = RowIn(tx_id=request.tx_id, sender=request.sender,
                         receiver=request.receiver, amount=request.amount, memo=request.memo)
            return Route((tip, main), request.receiver)

    def make(settings, context):
        return Tally(settings, context)
''')


def install_test_plugin(folder: Path) -> Path:
    """A real distribution on sys.path with `jackpay.plugins` entry points `boom` and
    `tally`."""
    site = folder / "site"
    dist = site / "jp_testplugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jp-testplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[jackpay.plugins]\nboom = jp_testplugin:make\n"
                                           "tally = jp_tally:make\n")
    (site / "jp_testplugin.py").write_text(BOOM)
    (site / "jp_tally.py").write_text(TALLY)
    return site


def with_site(net: Network, site: Path) -> None:
    base = net.env

    def env() -> dict[str, str]:
        e = base()
        e["PYTHONPATH"] = f"{site}:{e['PYTHONPATH']}"
        return e

    net.env = env  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def running(net: Network) -> AsyncIterator[tuple[PayerClient, PayerClient]]:
    """The network's ledger and router, and alice and bob logged in; all stopped after."""
    net.start_ledger()
    net.start_router()
    alice, bob = net.client("alice"), net.client("bob")
    await alice.connect()
    await bob.connect()
    try:
        yield alice, bob
    finally:
        await alice.close()
        await bob.close()
        net.stop_all()


async def test_a_plugin_not_named_in_the_config_is_never_loaded(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "100.00", "bob": "0.00"},
                  router_settings={"plugins": ["fee"]})
    with_site(net, install_test_plugin(tmp_path))
    async with running(net) as (alice, _):
        paid = await alice.send_payment("bob", 1000, memo="veto")  # boom is installed, not named
        assert paid.seq > 0


async def test_a_veto_and_a_raising_plugin_fail_their_payment_only(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "100.00", "bob": "0.00"},
                  router_settings={"plugins": ["boom"]})
    with_site(net, install_test_plugin(tmp_path))
    async with running(net) as (alice, _):
        with pytest.raises(RequestFailed) as vetoed:
            await alice.send_payment("bob", 1000, memo="veto")
        assert vetoed.value.code is ErrorCode.PAYMENT_REFUSED
        assert "vetoed by the test plug-in" in vetoed.value.message
        with pytest.raises(RequestFailed) as boom:
            await alice.send_payment("bob", 1000, memo="boom")
        assert boom.value.code is ErrorCode.PLUGIN_FAILED
        assert "boom" in boom.value.message  # the plug-in is named
        for memo in ("mint", "gift"):  # routes that would move money unasked: refused
            with pytest.raises(RequestFailed) as wrong:
                await alice.send_payment("bob", 1000, memo=memo)
            assert wrong.value.code is ErrorCode.PLUGIN_FAILED
            assert "routed this payment wrongly" in wrong.value.message
        paid = await alice.send_payment("bob", 1000, memo="fine")  # the router serves on
        assert net.procs["router"].alive()
        rows, _ = load_rows(net.ledger_path.read_bytes(), "ledger")
        assert [r.memo for r in rows if r.sender == "alice"] == ["fine"]
        assert paid.balance == 9000
        assert "kaboom" in net.logs()  # the traceback is in the router's log


@pytest.mark.parametrize(("plugins", "settings", "expected"), [
    (["nosuch"], {}, "plug-in 'nosuch' is not installed"),
    (["boom"], {"boom": {"refuse_to_start": True}}, "plug-in 'boom' failed to start"),
    (["fee"], {"fee": {"amount": "-1"}}, "[plugins.fee]"),
    (["fee"], {"fee": {"colour": "red"}}, "colour"),
])
async def test_a_plugin_that_cannot_start_stops_the_router_with_a_clear_message(
        tmp_path: Path, plugins: list[str], settings: dict[str, dict[str, object]],
        expected: str) -> None:
    net = Network(tmp_path, participants={"alice": "1.00"},
                  router_settings={"plugins": plugins}, plugin_settings=settings)
    with_site(net, install_test_plugin(tmp_path))
    net.start_ledger()
    try:
        with pytest.raises(ProcessFailed) as failed:
            net.start_router()
        assert expected in str(failed.value) + net.logs()
    finally:
        net.stop_all()


def test_plugin_settings_for_a_plugin_not_enabled_are_refused(tmp_path: Path) -> None:
    from common.config import load_config
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[plugins.fee\] is configured but 'fee' is not in"):
        Network(tmp_path, participants={"alice": "1.00"}, plugin_settings={"fee": {}})
    with pytest.raises(ConfigError, match="is configured but"):
        load_config(tmp_path / "network.toml")


async def test_the_fee_plugin_commits_two_legs_in_one_append(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "10.00", "bob": "0.00"},
                  router_settings={"plugins": ["fee"]},
                  plugin_settings={"fee": {"amount": "0.05", "account": "_fees"}})
    async with running(net) as (alice, _):
        paid = await alice.send_payment("bob", 900, tx_id="t-1")
        assert paid.balance == 1000 - 905
        with pytest.raises(RequestFailed) as short:  # 0.95 + 0.05 fee > 0.95 left
            await alice.send_payment("bob", 95, tx_id="t-2")
        assert short.value.code is ErrorCode.INSUFFICIENT_FUNDS
        again = await alice.send_payment("bob", 900, tx_id="t-1")  # a retry: no new rows
        assert again.seq == paid.seq
        state = await net.inspect()
        assert state.balances["_fees"] == 5
        assert state.balances["bob"] == 900
        assert not state.holds
    rows, _ = load_rows(net.ledger_path.read_bytes(), "ledger")
    fee, main = rows[-2], rows[-1]
    assert (fee.tx_id, fee.sender, fee.receiver, fee.amount) == ("_leg2:t-1", "alice", "_fees", 5)
    assert (main.tx_id, main.receiver, main.amount, main.seq) == ("t-1", "bob", 900, paid.seq)
    assert fee.dtg == main.dtg  # one batch
    assert len(rows) == 3  # alice's opening (bob's is zero), the fee, the payment


async def test_the_router_restarts_on_a_ledger_with_legs(tmp_path: Path) -> None:
    # recent_rows 0: the restarted router keeps no row in memory, so the retry runs
    # again and both legs come back `duplicate` (nothing moves twice).
    net = Network(tmp_path, participants={"alice": "10.00", "bob": "0.00"},
                  router_settings={"plugins": ["fee"], "recent_rows": 0},
                  plugin_settings={"fee": {"amount": "0.10"}})
    async with running(net) as (alice, _):
        await alice.send_payment("bob", 100, tx_id="t-1")
        net.procs["router"].stop()
        net.restart("router")
        async with net.client("alice") as again_alice, net.client("bob"):
            leg = await again_alice.status("_leg2:t-1")  # recalls the fee leg's row first
            assert (leg.state, leg.receiver) == ("paid", "_fees")
            again = await again_alice.send_payment("bob", 100, tx_id="t-1")
        assert again.balance == 1000 - 110  # the retry found the payment: nothing twice
        state = await net.wait_quiet()
        assert state.balances["_fees"] == 10
        assert state.holds == {}


def test_routes_that_would_move_money_unasked_are_refused() -> None:
    from common.messages import RowIn
    from router.plugins import PaymentRequest, Route, route_problem

    req = PaymentRequest("alice", "t1", "bob", 500)
    main = RowIn(tx_id="t1", sender="alice", receiver="bob", amount=500)
    fee = RowIn(tx_id="_leg2:t1", sender="alice", receiver="_fees", amount=5)
    pools = frozenset({"_fees", "_mixer"})

    def problem(*legs: RowIn, payee: str | None = "bob") -> str | None:
        return route_problem(req, Route(legs, payee), pools)

    assert problem(fee, main) is None
    assert problem(RowIn(tx_id="t1", sender="alice", receiver="_mixer", amount=500),
                   payee=None) is None
    assert "at least one leg" in str(problem())
    assert "main leg must be last" in str(problem(main, fee))
    assert "share" in str(problem(main, main))
    assert "moves 0" in str(problem(RowIn(tx_id="_leg2:t1", sender="alice",
                                          receiver="_fees", amount=0), main))
    assert "never mints" in str(problem(RowIn(tx_id="_leg2:t1", sender="_issuer",
                                              receiver="alice", amount=5), main))
    assert "neither the sender" in str(problem(RowIn(tx_id="_leg2:t1", sender="carol",
                                                     receiver="_fees", amount=5), main))
    assert "not a system account" in str(problem(RowIn(tx_id="_leg2:t1", sender="alice",
                                                       receiver="carol", amount=5), main))
    assert "without being offered" in str(problem(main, payee=None))
    assert "not the main leg's receiver" in str(problem(main, payee="carol"))


async def test_a_plugin_gets_the_rows_of_its_accounts_from_its_own_checkpoint(
        tmp_path: Path) -> None:
    import json

    net = Network(tmp_path / "net", participants={"alice": "10.00", "bob": "0.00"},
                  router_settings={"plugins": ["tally"]})
    with_site(net, install_test_plugin(tmp_path))
    started = net.root / "plugins" / "tally" / "started.json"
    async with running(net) as (alice, _):
        for i in range(3):
            await alice.send_payment("bob", 100, tx_id=f"t-{i}", memo="tip")
        await alice.send_payment("bob", 100, tx_id="plain")  # no row of `_tally`
        assert json.loads(started.read_text()) == []
        net.procs["router"].stop()
        net.restart("router")
        assert json.loads(started.read_text()) == [2, 4, 6]  # every `_tally` row
        net.plugin_settings = {"tally": {"rows_from": 4}}
        net.write_config(ledger_port=net.procs["ledger"].addr[1])
        net.procs["router"].stop()
        net.restart("router")
        assert json.loads(started.read_text()) == [4, 6]  # from its checkpoint on
        assert (await net.inspect()).balances["_tally"] == 3
