"""The mixer plug-in: its pure rules, and a mixed workload on a real network whose ledger
is then attacked (jackpay-mixer report)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from netkit import REPO_ROOT, Network

from common.errors import ErrorCode, RequestFailed
from common.messages import Offer
from jackpay_plugins.mixer.journal import Journal
from jackpay_plugins.mixer.pool import (
    Mixer,
    Settings,
    entropy_bits,
    note_tx_id,
    parse_note_tx_id,
    split_into_notes,
)
from jackpay_plugins.mixer.report import analyse, direct_attacks
from jackpay_plugins.mixer.report import main as report_main
from ledger.store import load_rows

# --- pure rules ---------------------------------------------------------------------------


def test_notes_are_denominations_that_add_up() -> None:
    denoms = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    assert split_into_notes(4000, denoms) == [2000, 2000]
    assert split_into_notes(3799, denoms) == [2000, 1000, 500, 200, 50, 20, 20, 5, 2, 2]
    assert sum(split_into_notes(123_457, denoms)) == 123_457
    with pytest.raises(ValueError, match="cannot be made"):
        split_into_notes(3, (2,))


def test_note_tx_ids_round_trip() -> None:
    assert parse_note_tx_id(note_tx_id(12, 3, 0)) == (12, 3, 0)
    assert parse_note_tx_id("_mix:rX:n1:a0") is None
    assert parse_note_tx_id("t-1") is None


def mixer(**kw: object) -> Mixer:
    settings = Settings(**{"min_payers": 3, "min_delay_s": 1.0, "max_delay_s": 1.0,
                           "max_wait_s": 10.0, **kw})  # type: ignore[arg-type]
    return Mixer(settings, random.Random(1))


def deposit(m: Mixer, payer: str, tx: str, payee: str, amount: int, at: float) -> None:
    m.intents[(payer, tx)] = (payee, amount)
    m.deposited(payer, tx, amount, seq=len(m.deposits) + 1, at=at)


def test_a_round_needs_k_distinct_payers_and_its_delay() -> None:
    m = mixer()
    deposit(m, "a", "1", "x", 500, at=0.0)
    deposit(m, "a", "2", "y", 500, at=0.1)  # a second deposit of `a` does not count twice
    deposit(m, "b", "1", "x", 500, at=0.2)
    assert m.rounds_due(5.0) == []
    deposit(m, "c", "1", "z", 500, at=0.3)
    assert m.rounds_due(0.5) == []  # the random delay (1 s here) has not passed
    ((amount, chosen, low),) = m.rounds_due(1.5)
    assert (amount, low) == (500, False)
    assert chosen == [("a", "1"), ("b", "1"), ("c", "1")]  # one deposit per payer
    rnd = m.plan_round(amount, chosen, low, 1.5)
    m.apply_round(rnd)
    assert sorted((n.payee, n.amount) for n in rnd.notes) == [("x", 500), ("x", 500), ("z", 500)]
    assert m.pools[500].waiting == [("a", "2")]  # waits for the next round


def test_a_pool_that_waits_too_long_is_refunded_flagged() -> None:
    m = mixer()
    deposit(m, "a", "1", "x", 700, at=0.0)
    deposit(m, "b", "1", "y", 700, at=1.0)
    ((amount, chosen, low),) = m.rounds_due(10.0)
    assert low
    rnd = m.plan_round(amount, chosen, low, 10.0)
    assert {(n.payee, n.refund) for n in rnd.notes} == {("a", True), ("b", True)}
    m = mixer(on_timeout="payout")
    deposit(m, "a", "1", "x", 700, at=0.0)
    ((amount, chosen, low),) = m.rounds_due(10.0)
    rnd = m.plan_round(amount, chosen, low, 10.0)
    assert rnd.low_anonymity
    assert {n.payee for n in rnd.notes} == {"x"}


def test_a_note_that_keeps_failing_goes_back_to_its_depositor() -> None:
    m = mixer(max_attempts=2)
    for p in "abc":
        deposit(m, p, "1", "x" if p != "x" else "y", 100, at=0.0)
    (due,) = m.rounds_due(2.0)
    rnd = m.plan_round(*due, 2.0)
    m.apply_round(rnd)
    note = rnd.notes[0]
    assert m.next_attempt(note) == (1, False)
    m.set_attempt(rnd.id, 0, 1, False, 2.0)
    assert m.next_attempt(note) == (2, True)
    m.set_attempt(rnd.id, 0, 2, True, 2.0)
    assert note.refund
    assert note.payee == note.deposit[0]
    assert note.tx_id(rnd.id) == note_tx_id(rnd.id, 0, 2)


def test_a_payout_whose_retry_cannot_be_journalled_is_still_tried_again(
        tmp_path: Path) -> None:
    """A payout note fails (its payee offline) while the journal cannot be written (here
    it is /dev/full: ENOSPC). The hook says so (the router logs it) and the note is tried
    again all the same — it once stayed `running` until a restart, the payee's money in
    the pool — but as the same attempt: the next one goes out only once journalled (else
    a restart could send both, one note paid twice)."""
    import os

    from jackpay_plugins.mixer.plugin import POOL, MixerPlugin
    from router.plugins import PaymentRequest, PluginContext

    plugin = MixerPlugin(Settings(min_payers=3, min_delay_s=1.0, max_delay_s=1.0,
                                  max_wait_s=10.0, retry_s=0.5),
                         PluginContext("t", tmp_path, lambda _id: True))
    m = plugin.mixer
    for p in "abc":
        deposit(m, p, "1", "x", 100, at=0.0)
    sent = plugin.jackpay_tick(2.0)  # the round closes (journalled) and its notes go out
    assert sent
    first = sent[0]
    round_id, index, attempt = parse_note_tx_id(first.tx_id)  # type: ignore[misc]
    assert attempt == 0

    def fails(tx_id: str) -> None:  # as the router tells it (also from its record)
        plugin.jackpay_aborted(PaymentRequest(POOL, tx_id, first.receiver, first.amount,
                                              system=True), ErrorCode.RECEIVER_UNREACHABLE)

    def attempts_sent(now: float) -> list[int]:
        return [parse_note_tx_id(r.tx_id)[2] for r in plugin.jackpay_tick(now)  # type: ignore[index]
                if parse_note_tx_id(r.tx_id)[:2] == (round_id, index)]  # type: ignore[index]

    plugin.journal.close()
    plugin.journal._fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="No space left"):
            fails(first.tx_id)
    finally:
        plugin.journal.close()
    assert attempts_sent(time.time() + 0.6) == [0]  # (retries wait on the wall clock)
    fails(first.tx_id)  # the journal takes it now: the next attempt goes out
    assert attempts_sent(time.time() + 0.6) == [1]
    entries = [e for e in plugin.journal.read() if e["e"] == "attempt"]
    assert [(e["note"], e["attempt"]) for e in entries] == [(index, 1)]


def test_entropy() -> None:
    assert entropy_bits([1, 1, 1, 1]) == 2.0
    assert entropy_bits([5]) == 0.0


def test_the_journal_ignores_a_torn_last_line_and_refuses_garbage(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl")
    j.write({"e": "intent", "payer": "a", "tx": "1", "payee": "b", "amount": 5})
    j.close()
    with (tmp_path / "j.jsonl").open("ab") as f:
        f.write(b'{"e": "rou')
    assert len(Journal(tmp_path / "j.jsonl").read()) == 1
    j = Journal(tmp_path / "j.jsonl")
    j.open()  # cuts the torn line
    j.write({"e": "intent", "payer": "c", "tx": "1", "payee": "d", "amount": 5})
    j.close()
    assert [e["payer"] for e in Journal(tmp_path / "j.jsonl").read()] == ["a", "c"]
    assert (tmp_path / "j.jsonl").stat().st_mode & 0o777 == 0o600
    (tmp_path / "j.jsonl").chmod(0o644)  # left readable by others: closed again on open
    reopened = Journal(tmp_path / "j.jsonl")
    reopened.open()
    reopened.close()
    assert (tmp_path / "j.jsonl").stat().st_mode & 0o777 == 0o600
    (tmp_path / "bad.jsonl").write_bytes(b"garbage\n{}\n")
    from jackpay_plugins.mixer.journal import JournalCorrupt
    with pytest.raises(JournalCorrupt, match="line 1"):
        Journal(tmp_path / "bad.jsonl").read()


# --- a real network -----------------------------------------------------------------------

PAYERS = [f"p{i:02d}" for i in range(25)]
AMOUNTS = [500, 1000, 1250, 2000, 3700, 5000, 7500, 12_000]  # varied: 8 amounts
K = 5


def mixed_network(tmp_path: Path, **mixer_settings: object) -> Network:
    settings: dict[str, object] = {"min_payers": K, "min_delay_s": 1.5, "max_delay_s": 2.5,
                                   "max_wait_s": 30.0, "retry_s": 0.3}
    settings.update(mixer_settings)
    return Network(tmp_path, participants={p: "1000.00" for p in PAYERS},
                   router_settings={"plugins": ["mixer"], "plugin_tick_s": 0.1,
                                    "payer_max_in_flight": 64},
                   plugin_settings={"mixer": settings})


async def wait_pool_empty(net: Network, deposits: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await net.inspect()
        rows, _ = load_rows(net.ledger_path.read_bytes(), "ledger")
        in_pool = sum(1 for r in rows if r.receiver == "_mixer")
        if in_pool >= deposits and state.balances.get("_mixer", 0) == 0 and not state.in_flight:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"the pool still holds money after {timeout}s: {state.balances}")


@pytest.mark.slow
async def test_a_mixed_workload_hides_who_paid_whom(tmp_path: Path) -> None:
    net = mixed_network(tmp_path)
    net.start_ledger()
    net.start_router()
    clients = {p: net.client(p) for p in PAYERS}
    received: dict[str, list[tuple[str, int]]] = {p: [] for p in PAYERS}

    def recorder(payee: str) -> Callable[[Offer], None]:
        def on_offer(offer: Offer) -> None:
            if not offer.tx_id.startswith("d"):  # not the direct baseline
                received[payee].append((offer.sender, offer.amount))
        return on_offer

    for p, c in clients.items():
        c.on_offer = recorder(p)
    await asyncio.gather(*(c.connect() for c in clients.values()))
    rng = random.Random(7)
    plan = []
    for payer in PAYERS:  # every payer mixes one payment of every amount, to random payees
        for amount in AMOUNTS:
            payee = rng.choice([p for p in PAYERS if p != payer])
            plan.append((payer, payee, amount))
    rng.shuffle(plan)
    try:
        results = await asyncio.gather(*(
            clients[payer].send_payment(payee, amount, tx_id=f"m{i}", memo=f"for {payee}",
                                        mix=True)
            for i, (payer, payee, amount) in enumerate(plan)))
        assert len(results) == 200
        assert all(r.seq > 0 for r in results)
        await wait_pool_empty(net, len(plan))
        status = await clients[plan[0][0]].status("m0")
        assert status.state == "paid"
        assert status.detail is not None
        assert f"paid out to {plan[0][1]}" in status.detail
        state = await net.inspect()
        # The same payments sent without the mixer, for the attacks' baseline.
        await asyncio.gather(*(
            clients[payer].send_payment(payee, amount, tx_id=f"d{i}")
            for i, (payer, payee, amount) in enumerate(plan)))
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))
        net.stop_all()
    # Every payee heard only from `_mixer`, and got what it was sent, in denominations.
    for payee in PAYERS:
        assert {s for s, _ in received[payee]} <= {"_mixer"}
        assert sum(a for _, a in received[payee]) == sum(a for _, q, a in plan if q == payee)
    # Money conserved; the pool is empty.
    assert sum(v for k, v in state.balances.items() if k != "_issuer") == 25 * 100_000
    assert state.balances.get("_mixer", 0) == 0
    all_rows, _ = load_rows(net.ledger_path.read_bytes(), "ledger")
    direct = [r for r in all_rows if r.tx_id.startswith("d")]
    rows = [r for r in all_rows if not r.tx_id.startswith("d")]
    # No row of the mixed payments names a payer next to a payee, nor carries the memo.
    for r in rows:
        assert not (r.sender in PAYERS and r.receiver in PAYERS)
        assert "for " not in r.memo
    journal = Journal(tmp_path / "plugins" / "mixer" / "journal.jsonl").read()
    report = analyse(rows, journal, K)
    assert report["deposits"] == 200
    assert report["k"]["min"] >= K, report
    assert report["payouts_below_k"] == 0
    assert report["rows_linking_payer_to_payee"] == []
    assert report["pool_balance"] == 0
    assert report["scored_payouts"] == report["payouts"]
    for name, score in report["attacks"].items():
        assert score <= 1 / K + 0.05, (name, report)
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    # The same attacks on the same payments sent directly: every payer read off its row.
    assert len(direct) == 200
    assert set(direct_attacks(direct).values()) == {1.0}


@pytest.mark.slow
async def test_mixed_payments_survive_a_router_kill_mid_round(tmp_path: Path) -> None:
    net = mixed_network(tmp_path, min_payers=3, min_delay_s=0.5, max_delay_s=0.5)
    net.start_ledger()
    net.start_router()
    payers = PAYERS[:6]
    clients = {p: net.client(p) for p in payers}
    await asyncio.gather(*(c.connect() for c in clients.values()))
    try:
        await asyncio.gather(*(clients[p].send_payment(payers[(i + 1) % 6], 3700,
                                                       tx_id=f"k{i}", mix=True)
                               for i, p in enumerate(payers)))
        # Kill the router while the round's payouts are going out (or about to).
        await asyncio.sleep(0.7)
        net.procs["router"].kill()
        net.restart("router")
        await asyncio.gather(*(c.close() for c in clients.values()))
        clients = {p: net.client(p) for p in payers}
        await asyncio.gather(*(c.connect() for c in clients.values()))
        await wait_pool_empty(net, 6)
        # A retry of a deposit after the restart is the same payment, not a second one.
        again = await clients[payers[0]].send_payment(payers[1], 3700, tx_id="k0", mix=True)
        assert again.seq > 0
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))
        net.stop_all()
    rows, _ = load_rows(net.ledger_path.read_bytes(), "ledger")
    notes = [parse_note_tx_id(r.tx_id) for r in rows if r.sender == "_mixer"]
    assert all(n is not None for n in notes)
    paid_notes = [(n[0], n[1]) for n in notes if n is not None]
    assert len(paid_notes) == len(set(paid_notes))  # every note paid exactly once
    got = {p: sum(r.amount for r in rows if r.receiver == p and r.sender == "_mixer")
           for p in payers}
    assert got == {p: 3700 for p in payers}
    assert sum(r.amount for r in rows if r.receiver == "_mixer") == 6 * 3700


async def test_mixing_without_the_mixer_is_refused(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "10.00", "bob": "0.00"})
    net.start_ledger()
    net.start_router()
    alice = net.client("alice")
    await alice.connect()
    try:
        with pytest.raises(RequestFailed) as refused:
            await alice.send_payment("bob", 100, mix=True)
        assert refused.value.code is ErrorCode.PAYMENT_REFUSED
        assert "no mixer" in refused.value.message
    finally:
        await alice.close()
        net.stop_all()


async def test_a_mixed_deposit_is_mixed_until_its_round(tmp_path: Path) -> None:
    net = mixed_network(tmp_path, max_wait_s=60.0)
    net.start_ledger()
    net.start_router()
    alice, bob = net.client("p00"), net.client("p01")
    await alice.connect()
    await bob.connect()
    try:
        paid = await alice.send_payment("p01", 250, tx_id="solo", mix=True)
        status = await alice.status("solo")
        assert status.state == "mixed"
        assert status.detail is not None
        assert "waiting for a round: 1 of 5 payers" in status.detail
        assert status.receiver == "_mixer"
        with pytest.raises(RequestFailed) as unknown:
            await alice.send_payment("nobody", 250, mix=True)
        assert unknown.value.code is ErrorCode.UNKNOWN_RECEIVER
        # One added at run time is a payee for the mixer at once (no restart).
        added = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "router", "participants", "add", "newcomer", "--config",
            str(net.config_path)], capture_output=True, text=True, cwd=REPO_ROOT,
            env=net.env(), timeout=60)
        assert added.returncode == 0, added.stderr
        await alice.send_payment("newcomer", 250, tx_id="to-the-newcomer", mix=True)
        state = await net.inspect()
        assert state.balances["_mixer"] == 500
        assert paid.balance == 100_000 - 250
        assert state.balances["p00"] == 100_000 - 500
    finally:
        await alice.close()
        await bob.close()
        logs = net.logs()
        net.stop_all()
    assert "p01" not in next(line for line in logs.splitlines() if "solo" in line)
    # The mixer's state links payers to payees: its folder and journal are the owner's.
    assert (tmp_path / "plugins" / "mixer").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "plugins" / "mixer" / "journal.jsonl").stat().st_mode & 0o777 == 0o600


def test_report_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(["report", str(tmp_path / "missing.csv")]) == 2
    (tmp_path / "l.csv").write_text("not a ledger\n")
    assert report_main(["report", str(tmp_path / "l.csv")]) == 2
    assert "jackpay-mixer:" in capsys.readouterr().err
