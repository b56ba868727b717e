"""Signed payments end to end, with real processes: the sender's signature on `pay`, the
receiver's on `receipt`, both kept in the ledger row, and `jackpay-ledger verify --keys`
proving offline that every debit was ordered and every credit accepted."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from netkit import Network
from paykit import (
    Peer,
    assert_conserved,
    assert_router_agrees,
    connect,
    eventually,
    ledger_rows,
    up,
)

from common.errors import RequestFailed
from common.keys import KeyStore
from common.messages import Paid, Receipt
from common.proofs import KeptProof, proof_line
from common.signing import PAY_TAG, RECEIPT_TAG, sign, verify
from ledger.rows import format_line, make_row, parse_line
from payer_client.client import make_pay


def verify_cli(net: Network, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger", "verify", str(net.ledger_path),
                           *extra], capture_output=True, text=True, timeout=60, env=net.env())


async def test_a_paid_row_carries_the_order_and_the_acceptance(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    alice, _bob = await connect(network, "alice"), await connect(network, "bob")
    paid = await alice.client.send_payment("bob", 250, "lunch, on me", "t-signed")
    row = parse_line(network.ledger_csv().splitlines()[-1])
    assert row.seq == paid.seq
    store = KeyStore.for_config(network.config)
    net_id = network.config.network.id
    assert row.sender_sig is not None
    assert row.receiver_sig is not None
    assert verify(store.load_payer_public("alice"), row.sender_sig, PAY_TAG, net_id, "alice",
                  "t-signed", "bob", 250, "lunch, on me")
    assert verify(store.load_payer_public("bob"), row.receiver_sig, RECEIPT_TAG, net_id,
                  "alice", "t-signed", "bob", 250, "lunch, on me")
    done = verify_cli(network, "--keys", str(network.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 debits signed by their payers" in done.stdout
    assert "1 credits accepted by their receivers" in done.stdout
    # the openings were signed by the issuer (jackpay-keys), not by the router
    assert "2 openings signed by the issuer" in done.stdout
    assert "0 system debits not proven" in done.stdout
    assert "0 rows from before signing began" in done.stdout


@pytest.mark.parametrize("forgery", ["another key", "another amount", "unsigned"])
async def test_a_pay_not_signed_by_its_sender_over_this_payment_moves_nothing(
        network: Network, forgery: str) -> None:
    up(network, {"alice": "10.00", "bob": "5.00"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    rows_before = ledger_rows(network)
    store = KeyStore.for_config(network.config)
    net_id = network.config.network.id
    pay = make_pay("bob", 300, "", "t-forged")
    if forgery == "another key":
        sig = sign(store.load_payer_key("bob"), PAY_TAG, net_id, "alice", "t-forged", "bob",
                   300, "")
    else:  # alice's own key, over 1.00 instead of 3.00
        sig = sign(store.load_payer_key("alice"), PAY_TAG, net_id, "alice", "t-forged", "bob",
                   100, "")
    if forgery != "unsigned":
        pay = msgspec.structs.replace(pay, sig=sig)
    with pytest.raises(RequestFailed) as info:
        await alice.client._request(pay, Paid)  # as sent: the client does not re-sign it
    assert info.value.code == "bad_signature"
    assert not info.value.retriable
    assert ledger_rows(network) == rows_before
    assert await alice.assert_no_hold() == 1000
    assert bob.offers == []  # refused before anything was held or offered
    # refused before it began: the tx_id is not taken, a signed re-send of it pays
    assert (await alice.client.status("t-forged")).state == "unknown"
    await assert_router_agrees(network)
    assert (await alice.client.send_payment("bob", 300, "", "t-forged")).balance == 700


async def test_a_receipt_signed_by_another_key_fails_the_payment(
        network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    up(network, {"alice": "10.00", "bob": "5.00", "carol": "1.00"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    store = KeyStore.for_config(network.config)
    net_id = network.config.network.id
    carol_key = store.load_payer_key("carol")

    def carols_receipt(offer: object) -> Receipt:  # bob's daemon answers, carol's key signs
        from common.messages import Offer
        assert isinstance(offer, Offer)
        return Receipt(re=offer.id, tx_id=offer.tx_id, sig=sign(
            carol_key, RECEIPT_TAG, net_id, offer.sender, offer.tx_id, "bob", offer.amount,
            offer.memo))

    monkeypatch.setattr(bob.client, "_receipt", carols_receipt)
    rows_before = ledger_rows(network)
    assert await alice.pay("bob", 200, "t-bad-receipt") == "bad_signature"
    assert ledger_rows(network) == rows_before
    assert [o.tx_id for o in bob.offers] == ["t-bad-receipt"]
    await eventually(lambda: [c.tx_id for c in bob.cancels] == ["t-bad-receipt"])
    assert bob.cancels[0].code == "bad_signature"
    assert await alice.assert_no_hold() == 1000
    assert await bob.assert_no_hold() == 500
    assert_conserved(network)
    await assert_router_agrees(network)


async def test_verify_keys_names_a_row_forged_into_the_file(network: Network) -> None:
    up(network, {"alice": "10.00", "bob": "5.00", "mallory": "0"})
    alice, _bob = await connect(network, "alice"), await connect(network, "bob")
    for i in range(3):
        await alice.client.send_payment("bob", 100, "", f"t{i}")
    network.stop_all()
    assert verify_cli(network, "--keys", str(network.config_path)).returncode == 0
    # A forged debit of alice's to mallory, the hash chain recomputed: the file alone
    # (sequence, chain) cannot tell; the missing signature can.
    lines = network.ledger_csv().splitlines(keepends=True)
    last = parse_line(lines[-1].rstrip("\n"))
    forged = make_row(last.hash, last.seq + 1, last.dtg, "alice", "mallory", 500, "t-x", "")
    network.ledger_path.write_text("".join(lines) + format_line(forged))
    plain = verify_cli(network)
    assert plain.returncode == 0, plain.stdout  # sequence and chain are intact
    done = verify_cli(network, "--keys", str(network.config_path))
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL")
    assert f"row {forged.seq}: alice's debit (tx_id t-x) is not signed by alice" in done.stdout


async def pay_keeping_receipts(network: Network, tmp_path: Path, n: int,
                               **router_settings: object) -> tuple[Path, Paid, Peer]:
    """alice pays bob `n` times (tx_ids t0…), keeping the ledger's receipts in
    `receipts/alice.jsonl` as her daemon would: (that folder, the last `paid`, bob)."""
    up(network, {"alice": "10.00", "bob": "5.00"}, **router_settings)
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    kept = tmp_path / "receipts"
    kept.mkdir()
    lines = []
    for i in range(n):
        paid = await alice.client.send_payment("bob", 100 + i, "", f"t{i}")
        assert paid.proof is not None
        assert paid.proof.seq == paid.seq
        lines.append(proof_line(KeptProof.of(paid.proof, f"t{i}", "alice", "paid")))
    (kept / "alice.jsonl").write_bytes(b"".join(lines))
    return kept, paid, bob


async def test_a_retried_pay_gets_the_ledgers_receipt_too(network: Network,
                                                          tmp_path: Path) -> None:
    """A payer whose `paid` was lost sends the same `pay` again: the answer (from the
    router's record) carries the ledger's receipt of that row, as the first did — also
    after the router and the ledger restarted — and `verify --receipts` holds it."""
    kept, first, _bob = await pay_keeping_receipts(network, tmp_path, 2)
    assert first.proof is not None
    again = await network_client_pay(network, "alice", "t1", 101)
    network.stop_all()
    network.start_ledger()
    network.start_router()
    after_restart = await network_client_pay(network, "alice", "t1", 101)
    for paid in (again, after_restart):
        assert paid.seq == first.seq
        assert paid.proof is not None, "a retried pay was answered without a receipt"
        assert (paid.proof.seq, paid.proof.hash) == (first.proof.seq, first.proof.hash)
        assert paid.proof.head_seq >= paid.seq
    # The ledger away: still `paid` (the router's record), without a receipt for now.
    network.procs["ledger"].stop()
    await network.wait_ledger_connected(connected=False)
    unsealed = await network_client_pay(network, "alice", "t1", 101)
    assert (unsealed.seq, unsealed.proof) == (first.seq, None)
    with (kept / "alice.jsonl").open("ab") as f:
        for paid in (again, after_restart):
            assert paid.proof is not None
            f.write(proof_line(KeptProof.of(paid.proof, "t1", "alice", "paid")))
    network.stop_all()
    done = verify_cli(network, "--keys", str(network.config_path), "--receipts", str(kept))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 receipts of the ledger hold" in done.stdout


async def test_receipt_lookups_have_a_budget_of_their_own(network: Network,
                                                           tmp_path: Path) -> None:
    """With the ledger frozen, re-sends of a paid tx_id wait for their receipt, at most
    MAX_RECEIPT_LOOKUPS at once; the next is answered `paid` at once, without one. Once
    the ledger answers, the waiting ones get theirs."""
    from router.payments import MAX_RECEIPT_LOOKUPS

    # the lookups wait for the frozen ledger, not for the router's timeout
    _kept, first, _bob = await pay_keeping_receipts(network, tmp_path, 1, ledger_timeout_s=30.0)
    ledger = network.procs["ledger"]
    async with network.client("alice") as alice:
        ledger.pause()
        try:
            waiting = [asyncio.ensure_future(alice.send_payment("bob", 100, "", "t0"))
                       for _ in range(MAX_RECEIPT_LOOKUPS)]
            await asyncio.sleep(0.5)
            assert not any(w.done() for w in waiting)  # each waits for the ledger
            over = await asyncio.wait_for(alice.send_payment("bob", 100, "", "t0"), 10)
            assert (over.seq, over.proof) == (first.seq, None)
        finally:
            ledger.resume()
        answered = await asyncio.wait_for(asyncio.gather(*waiting), 30)
    assert all(p.seq == first.seq and p.proof is not None for p in answered)


async def test_a_router_stopping_answers_the_receipt_lookups_it_waits_for(
        network: Network, tmp_path: Path) -> None:
    """SIGTERM while a re-sent paid tx_id waits for its receipt (the ledger frozen): the
    drain waits for the lookup, and the payer is answered `paid` (without a receipt)
    before its connection closes — not left to time out not knowing."""
    _kept, first, _bob = await pay_keeping_receipts(network, tmp_path, 1, ledger_timeout_s=1.0)
    ledger, router = network.procs["ledger"], network.procs["router"]
    async with network.client("alice") as alice:
        ledger.pause()
        try:
            waiting = asyncio.ensure_future(alice.send_payment("bob", 100, "", "t0"))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            router.popen.send_signal(signal.SIGTERM)
            paid = await asyncio.wait_for(waiting, 10)
        finally:
            ledger.resume()
    assert (paid.seq, paid.proof) == (first.seq, None)
    assert router.popen.wait(10) == 0


async def network_client_pay(network: Network, payer: str, tx_id: str, amount: int) -> Paid:
    async with network.client(payer) as client:
        return await client.send_payment("bob", amount, "", tx_id)


async def test_receipts_kept_by_payers_find_a_row_deleted_with_the_chain_recomputed(
        network: Network, tmp_path: Path) -> None:
    """The ledger seals its chain head in every `paid` and `settled`; a payer keeps those
    receipts. Deleting a row and recomputing the whole chain fools `verify` (sequence and
    chain are intact again) and `verify --keys` (every signature still holds) — not the
    receipts."""
    kept, paid, bob = await pay_keeping_receipts(network, tmp_path, 4)
    await eventually(lambda: len(bob.settled) == 4)
    assert all(s.proof is not None and s.proof.seq == s.seq for s in bob.settled)
    network.stop_all()
    keys = ("--keys", str(network.config_path), "--receipts", str(kept))
    done = verify_cli(network, *keys)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 receipts of the ledger hold" in done.stdout
    # One payer's file works as well as the folder; a path with no receipts is an error,
    # never an OK that checked nothing; a line naming a payer no id can be is not a receipt.
    one = verify_cli(network, *keys[:2], "--receipts", str(kept / "alice.jsonl"))
    assert "4 receipts of the ledger hold" in one.stdout, one.stdout
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbled").mkdir()
    line = (kept / "alice.jsonl").read_bytes().splitlines()[0].replace(
        b'"sender":"alice"', b'"sender":"al\\u001b[31mice\\nOK fake"')
    (tmp_path / "garbled" / "x.jsonl").write_bytes(line + b"\n")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "alice.jsonl").write_bytes(b'{"tx_id": "t0", "sen')
    for where, says in ((tmp_path / "nowhere", "no receipts folder or file"),
                        (tmp_path / "empty", "no receipts in"),
                        (tmp_path / "torn", "no receipts in"),
                        (tmp_path / "torn" / "alice.jsonl", "no receipts in"),
                        (tmp_path / "garbled", "x.jsonl:1: not a receipt")):
        refused = verify_cli(network, *keys[:2], "--receipts", str(where))
        assert refused.returncode == 2, refused.stdout
        assert says in refused.stdout
        assert "\x1b" not in refused.stdout
    # Delete alice's second payment (row 4: two openings first) and recompute the chain.
    rows = [parse_line(line) for line in network.ledger_csv().splitlines()[1:]]
    del rows[3]
    header = network.ledger_csv().splitlines(keepends=True)[0]
    out, prev = [header], "0" * 64
    for seq, r in enumerate(rows, 1):
        row = make_row(prev, seq, r.dtg, r.sender, r.receiver, r.amount, r.tx_id, r.memo,
                       r.sender_sig, r.receiver_sig)
        out.append(format_line(row))
        prev = row.hash
    for p in network.ledger_path.parent.glob("ledger.csv.index*"):
        p.unlink()
    network.ledger_path.write_text("".join(out))
    assert verify_cli(network).returncode == 0  # the chain is whole again
    assert verify_cli(network, "--keys", str(network.config_path)).returncode == 0
    done = verify_cli(network, *keys)
    assert done.returncode == 1
    assert "receipt of alice's tx_id t1 (alice.jsonl:2)" in done.stdout
    assert "rows were removed or rewritten" in done.stdout
    # and a receipt the ledger never signed is a forgery
    forged = KeptProof.of(msgspec.structs.replace(paid.proof, sig=b"\x01" * 64), "t3",
                          "alice", "paid")
    (kept / "alice.jsonl").write_bytes(proof_line(forged))
    assert "not signed by the ledger's key" in verify_cli(network, *keys).stdout


async def test_receipts_find_the_newest_row_dropped_from_a_ledger_in_postgresql(
        network: Network, tmp_path: Path, pg_dsn: str) -> None:
    """`verify DSN --keys --receipts` as on a file: dropping the newest acknowledged row
    (balances mended to match) leaves a sound chain and good signatures; the payer's
    receipt of that row shows it was removed."""
    import asyncpg

    network.store, network.dsn = "postgresql", pg_dsn
    kept, paid, _bob = await pay_keeping_receipts(network, tmp_path, 3)
    network.stop_all()

    def verify_db(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ledger", "verify", pg_dsn, *extra],
                              capture_output=True, text=True, timeout=60, env=network.env())

    keys = ("--keys", str(network.config_path), "--receipts", str(kept))
    done = await asyncio.to_thread(verify_db, *keys)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "balances match" in done.stdout
    assert "3 receipts of the ledger hold" in done.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        last = await conn.fetchrow("SELECT seq, sender, receiver, amount FROM jackpay_rows "
                                   "ORDER BY seq DESC LIMIT 1")
        assert last["seq"] == paid.seq
        await conn.execute("DELETE FROM jackpay_rows WHERE seq = $1", last["seq"])
        await conn.execute("UPDATE jackpay_balances SET balance = balance + $2 "
                           "WHERE account = $1", last["sender"], last["amount"])
        await conn.execute("UPDATE jackpay_balances SET balance = balance - $2 "
                           "WHERE account = $1", last["receiver"], last["amount"])
    finally:
        await conn.close()
    done = await asyncio.to_thread(verify_db, "--keys", str(network.config_path))
    assert done.returncode == 0, done.stdout  # chain, balances, signatures: all sound
    done = await asyncio.to_thread(verify_db, *keys)
    assert done.returncode == 1
    assert "receipt of alice's tx_id t2 (alice.jsonl:3)" in done.stdout
    assert f"its row was seq {paid.seq}, and the ledger now ends at {paid.seq - 1}" in done.stdout


async def test_rows_signed_before_a_key_rotation_verify_with_the_retired_key(
        network: Network) -> None:
    from common.keygen import rotate

    up(network, {"alice": "10.00", "bob": "5.00"})
    alice, _bob = await connect(network, "alice"), await connect(network, "bob")
    await alice.client.send_payment("bob", 100, "", "before")
    await alice.client.close()
    lines = rotate(network.config, ["alice"])
    retired = KeyStore.for_config(network.config).payer_retired("alice")
    assert any(str(retired.name) in line for line in lines)
    alice = await connect(network, "alice")  # logs in with the new key
    await alice.client.send_payment("bob", 100, "", "after")
    network.stop_all()
    done = verify_cli(network, "--keys", str(network.config_path))
    assert done.returncode == 0, done.stdout
    retired.unlink()  # without the history, alice's row from before cannot be proven
    done = verify_cli(network, "--keys", str(network.config_path))
    assert done.returncode == 1
    assert "row 3: the sender's signature does not verify with alice's key" in done.stdout


@pytest.mark.parametrize("damage", ["bob missing", "unreadable"])
def test_the_router_never_issues_an_opening_the_issuer_did_not_sign(
        network: Network, damage: str) -> None:
    """A config opening missing from the signed openings, or signed openings that cannot
    be read: the router refuses to start, naming it and the fix, and nothing is written."""
    from common.procs import ProcessFailed
    from common.signing import openings_json, read_openings

    network.participants = {"alice": "10.00", "bob": "5.00"}
    network.write_config()
    network.start_ledger()  # (it writes the config and the keys again: edit them after)
    store = KeyStore.for_config(network.config)
    signed = read_openings(store.openings)
    if damage == "unreadable":
        store.openings.write_text("{not json")
    else:
        del signed["bob"]
        store.openings.write_bytes(openings_json(signed))
    with pytest.raises(ProcessFailed):
        network.start_router()
    log = network.procs["router"].log_path.read_text()
    if damage == "unreadable":
        assert "signed openings unreadable" in log
    who = "alice (10.00)" if damage == "unreadable" else "bob (5.00)"
    assert f"opening balance of {who} is not signed by the issuer's key" in log
    assert "jackpay-keys CONFIG" in log
    assert "_open:" not in network.ledger_csv()  # not even alice's: all or nothing


async def test_an_opening_added_at_run_time_without_the_issuer_key_is_refused(
        network: Network) -> None:
    from test_participants import listing, op

    up(network, {"alice": "10.00"})
    store = KeyStore.for_config(network.config)
    store.key("issuer").rename(network.root / "issuer.key.offline")  # kept offline
    refused = await op(network, "participants", "add", "dave", "--opening-balance", "1.00")
    assert refused.returncode == 1
    assert "not signed by the issuer's key (the router never mints)" in refused.stderr
    assert "dave" not in await listing(network)
    assert "_open:dave" not in network.ledger_csv()
    added = await op(network, "participants", "add", "erin")  # no opening: nothing to sign
    assert added.returncode == 0, added.stderr
