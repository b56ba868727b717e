"""Signed payments, the pure parts: the signed bytes (byte for byte, as docs/PROTOCOL.md
§7a shows them), signed ledger rows (format, hash chain, old files), and the offline
audit of a ledger's signatures (ledger/audit.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.messages import LedgerRow
from common.signing import (
    MIXER_POOL,
    PAY_TAG,
    RECEIPT_TAG,
    Signer,
    payment_bytes,
    sign,
    signed_row,
    verify,
)
from ledger.audit import SignatureAudit
from ledger.rows import (
    GENESIS_HASH,
    HEADER_V1_LINE,
    RowFormatError,
    check_chain,
    format_line,
    make_row,
    parse_line,
)
from ledger.store import load_rows

NET = "demo"
KEYS = {name: Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)
        for i, name in enumerate(("alice", "bob", "carol", "mallory"), start=1)}
PUBLIC = {name: k.public_key() for name, k in KEYS.items() if name != "mallory"}
DTG = "2026-12-01T10:00:00.000000Z"


def test_the_payers_libsodium_signer_signs_exactly_as_openssl_and_verifies() -> None:
    """Payers sign with libsodium (Signer, faster); Ed25519 is deterministic, so the
    signature is the same bytes OpenSSL gives, and the auditor's verify accepts it."""
    key = KEYS["alice"]
    args = (PAY_TAG, NET, "alice", "tx-1", "bob", 1250, "lunch")
    fast = sign(Signer(key), *args)
    assert fast == sign(key, *args)
    assert verify(PUBLIC["alice"], fast, *args)
    assert not verify(PUBLIC["alice"], fast, PAY_TAG, NET, "alice", "tx-1", "bob", 1251,
                      "lunch")


def test_the_signed_bytes_are_the_documented_ones() -> None:
    """docs/PROTOCOL.md §7a's worked example, byte for byte."""
    data = payment_bytes(PAY_TAG, "demo", "alice", "t1", "bob", 1250, "lunch")
    assert data.hex() == (
        "0000000e6a61636b7061792d7061792d76310000000464656d6f00000005616c696365000000027431"
        "00000003626f620000000431323530000000056c756e6368")
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert key.sign(data).hex() == (
        "f659c1bc1cc7fdb5be0da55a50a2aa006f2edef2a73c008c7bd3f37f2288715cf8661379b1e8a23d5b"
        "34a27be67a5612979772e2888b58f55bbc5c7ce43f2a07")


@pytest.mark.parametrize("change", ["tag", "network", "sender", "tx_id", "receiver", "amount",
                                    "memo", "key"])
def test_a_signature_is_good_for_exactly_one_row_and_meaning(change: str) -> None:
    fields = {"tag": PAY_TAG, "network_id": NET, "sender": "alice", "tx_id": "t1",
              "receiver": "bob", "amount": 1250, "memo": "lunch"}
    sig = sign(KEYS["alice"], **fields)  # type: ignore[arg-type]
    assert verify(PUBLIC["alice"], sig, **fields)  # type: ignore[arg-type]
    other = {"tag": RECEIPT_TAG, "network": "prod", "sender": "carol", "tx_id": "t2",
             "receiver": "carol", "amount": 1251, "memo": "lunch!"}
    key = PUBLIC["bob"] if change == "key" else PUBLIC["alice"]
    if change != "key":
        fields["network_id" if change == "network" else change] = other[change]
    assert not verify(key, sig, **fields)  # type: ignore[arg-type]


def test_length_prefixes_keep_fields_apart() -> None:
    assert (payment_bytes(PAY_TAG, NET, "ab", "c", "bob", 1, "")
            != payment_bytes(PAY_TAG, NET, "a", "bc", "bob", 1, ""))


def test_a_mixed_payment_signs_the_pool_never_the_payee() -> None:
    assert signed_row("bob", "secret memo", mix=True) == (MIXER_POOL, "")
    assert signed_row("bob", "lunch", mix=False) == ("bob", "lunch")


# --- signed rows in the ledger ---------------------------------------------------------


def signed(prev: str, seq: int, sender: str, receiver: str, amount: int, tx_id: str,
           memo: str = "", *, by: str | None = None, accepted_by: str | None = None,
           ) -> LedgerRow:
    ssig = (sign(KEYS[by], PAY_TAG, NET, sender, tx_id, receiver, amount, memo)
            if by else None)
    rsig = (sign(KEYS[accepted_by], RECEIPT_TAG, NET, sender, tx_id, receiver, amount, memo)
            if accepted_by else None)
    return make_row(prev, seq, DTG, sender, receiver, amount, tx_id, memo, ssig, rsig)


def test_a_signed_row_has_ten_cells_and_round_trips() -> None:
    row = signed(GENESIS_HASH, 1, "alice", "bob", 500, "t1", "a, \"quoted\" memo",
                 by="alice", accepted_by="bob")
    line = format_line(row)
    assert line.count(",") >= 9
    assert line.rstrip("\n").split(",")[-2] == (row.sender_sig or b"").hex()
    assert parse_line(line.rstrip("\n")) == row
    assert check_chain(None, row) is None
    unsigned = make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 500, "t1", "")
    assert format_line(unsigned).count(",") == 7  # as every row before signed payments
    only_sender = signed(GENESIS_HASH, 1, "alice", "_mixer", 500, "t1", by="alice")
    assert format_line(only_sender).endswith(",\n")
    assert parse_line(format_line(only_sender).rstrip("\n")) == only_sender


def test_the_hash_chain_covers_the_signatures() -> None:
    row = signed(GENESIS_HASH, 1, "alice", "bob", 500, "t1", by="alice", accepted_by="bob")
    for stripped in ({"sender_sig": None}, {"receiver_sig": None},
                     {"sender_sig": None, "receiver_sig": None}):
        fields = {f: getattr(row, f) for f in row.__struct_fields__} | stripped
        assert check_chain(None, LedgerRow(**fields)) is not None  # type: ignore[arg-type]
    # and an unsigned row hashes exactly as before signed payments (the 8-field array)
    unsigned = make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 500, "t1", "")
    before = json.dumps([GENESIS_HASH, 1, DTG, "alice", "bob", 500, "t1", ""],
                        separators=(",", ":"), ensure_ascii=False).encode()
    assert unsigned.hash == hashlib.sha256(before).hexdigest()


@pytest.mark.parametrize("bad", [
    ",,",  # signature cells present, both empty: an unsigned row has eight cells
    ",abc,",  # not 128 hex digits
    "," + "A" * 128 + ",",  # upper case
    ",,," ,  # eleven cells
])
def test_malformed_signature_cells_are_refused(bad: str) -> None:
    line = format_line(make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 5, "t1", "")).rstrip("\n")
    with pytest.raises(RowFormatError):
        parse_line(line + bad)


def test_a_file_begun_before_signed_payments_still_loads_with_signed_rows_after() -> None:
    old = make_row(GENESIS_HASH, 1, DTG, "_issuer", "alice", 900, "_open:alice", "")
    new = signed(old.hash, 2, "alice", "bob", 100, "t1", by="alice", accepted_by="bob")
    data = (HEADER_V1_LINE + format_line(old) + format_line(new)).encode()
    rows, good = load_rows(data, "old.csv")
    assert rows == [old, new]
    assert good == len(data)


# --- the audit -----------------------------------------------------------------------------


def audit(rows: list[LedgerRow]) -> SignatureAudit:
    a = SignatureAudit(NET, frozenset(("alice", "bob", "carol")), dict(PUBLIC))
    for r in rows:
        a.add(r)
    a.finish()
    return a


def chain(*specs: tuple[str, str, int, str, dict[str, str]]) -> list[LedgerRow]:
    rows: list[LedgerRow] = []
    prev = GENESIS_HASH
    for seq, (sender, receiver, amount, tx_id, who) in enumerate(specs, start=1):
        row = signed(prev, seq, sender, receiver, amount, tx_id, **who)  # type: ignore[arg-type]
        rows.append(row)
        prev = row.hash
    return rows


GOOD: tuple[tuple[str, str, int, str, dict[str, str]], ...] = (
    ("_issuer", "alice", 1000, "_open:alice", {}),
    ("_issuer", "bob", 1000, "_open:bob", {}),
    ("alice", "bob", 100, "t1", {"by": "alice", "accepted_by": "bob"}),
    ("alice", "_fees", 5, "_leg2:t2", {}),  # a fee, authorised by t2 right after it
    ("alice", "carol", 50, "t2", {"by": "alice", "accepted_by": "carol"}),
    ("bob", "_mixer", 20, "m1", {"by": "bob"}),  # a deposit: the pool does not sign
    ("_mixer", "carol", 20, "_mix:1:0", {"accepted_by": "carol"}),  # a payout
)


def test_a_sound_signed_ledger_passes_and_is_counted() -> None:
    a = audit(chain(*GOOD))
    assert a.problem is None
    c = a.counts
    # the two openings come before the first signed row: counted as unsigned
    assert (c.ordered, c.legs, c.accepted, c.openings, c.system, c.unsigned) == (3, 1, 3, 0, 1, 2)


@pytest.mark.parametrize(("forge", "named"), [
    # a debit of alice's that she never signed, chain recomputed
    (("alice", "bob", 999, "forged", {"accepted_by": "bob"}), "not signed by alice"),
    # signed by someone else's key
    (("alice", "bob", 999, "forged", {"by": "mallory", "accepted_by": "bob"}), "does not verify"),
    # alice's signature moved onto bob's debit
    (("bob", "carol", 999, "forged", {"by": "alice", "accepted_by": "carol"}), "does not verify"),
    # a credit bob never accepted
    (("alice", "bob", 7, "forged", {"by": "alice"}), "no acceptance signed by bob"),
    # a fee leg with no payment of its payer after it
    (("alice", "_fees", 5, "_leg2:nothing", {}), "not part of a payment it signed"),
])
def test_a_forged_row_is_named(forge: tuple[str, str, int, str, dict[str, str]],
                               named: str) -> None:
    rows = chain(*GOOD, forge, ("bob", "alice", 1, "after", {"by": "bob", "accepted_by": "alice"}))
    a = audit(rows)
    assert a.problem is not None
    assert a.problem.startswith("row 8:")
    assert named in a.problem


def test_rows_before_signing_began_are_counted_unsigned_never_passed_off_as_signed() -> None:
    rows = chain(("_issuer", "alice", 1000, "_open:alice", {}),
                 ("alice", "bob", 100, "old", {}),  # written before signed payments
                 ("alice", "bob", 100, "new", {"by": "alice", "accepted_by": "bob"}),
                 ("alice", "bob", 100, "forged", {}))
    a = audit(rows)
    assert a.counts.unsigned == 2
    assert a.problem is not None
    assert a.problem.startswith("row 4:")


def test_a_participant_without_a_key_fails_its_signed_rows() -> None:
    a = SignatureAudit(NET, frozenset(("alice", "bob")), {"bob": PUBLIC["bob"]})
    for r in chain(("alice", "bob", 1, "t", {"by": "alice", "accepted_by": "bob"})):
        a.add(r)
    assert a.problem is not None
    assert "no public key for participant alice" in a.problem


# --- the router's checks, off the event loop -----------------------------------------------


class _Keys:
    """Stands in for router.keyring.PayerKeys: the raw public keys by participant."""

    def raw(self, payer_id: str) -> bytes | None:
        from common.keys import raw_public

        return raw_public(PUBLIC[payer_id]) if payer_id in PUBLIC else None


async def test_the_router_checks_signatures_in_its_process_and_answers_on_the_loop() -> None:
    import asyncio
    import threading

    from common.messages import RowIn
    from router.signatures import PaymentSignatures

    checks = PaymentSignatures(NET, _Keys())  # type: ignore[arg-type]
    row = RowIn(tx_id="t1", sender="alice", receiver="bob", amount=5, memo="m")
    good = sign(KEYS["alice"], PAY_TAG, NET, "alice", "t1", "bob", 5, "m")
    accepted = sign(KEYS["bob"], RECEIPT_TAG, NET, "alice", "t1", "bob", 5, "m")
    loop_thread = threading.get_ident()
    answers: dict[str, tuple[bool, int]] = {}
    done = asyncio.Event()

    def answer(name: str) -> Callable[[bool], None]:
        def cb(ok: bool) -> None:
            answers[name] = (ok, threading.get_ident())
            if len(answers) == 6:
                done.set()
        return cb

    checks.check_order(row, good, answer("order"))  # queued before the process starts
    await checks.start()
    try:
        checks.check_acceptance(row, accepted, answer("acceptance"))
        checks.check_order(row, accepted, answer("receipt as order"))  # the wrong tag
        checks.check_order(row, sign(KEYS["mallory"], PAY_TAG, NET, "alice", "t1", "bob", 5,
                                     "m"), answer("another key"))
        checks.check_order(row, None, answer("unsigned"))  # no thread needed
        checks.check_order(RowIn(tx_id="t1", sender="nobody", receiver="bob", amount=5),
                           good, answer("no key"))
        await asyncio.wait_for(done.wait(), 10)
        # the verifier process dies: a new one answers the checks still waiting
        assert checks._proc is not None
        checks._proc.kill()
        again = asyncio.Event()
        checks.check_order(row, good, lambda ok: again.set() if ok else None)
        await asyncio.wait_for(again.wait(), 10)
        assert checks.restarts == 1
    finally:
        await checks.aclose()
    assert {k: ok for k, (ok, _) in answers.items()} == {
        "order": True, "acceptance": True, "receipt as order": False, "another key": False,
        "unsigned": False, "no key": False}
    assert {t for _, t in answers.values()} == {loop_thread}  # every answer on the loop


# --- system rows: the issuer's openings, the router's pool debits ---------------------------

ISSUER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
POOL_KEY = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)


def system_row(prev: str, seq: int, sender: str, receiver: str, amount: int, tx_id: str,
               memo: str, key: Ed25519PrivateKey | None, accepted_by: str | None = None
               ) -> LedgerRow:
    ssig = sign(key, PAY_TAG, NET, sender, tx_id, receiver, amount, memo) if key else None
    rsig = (sign(KEYS[accepted_by], RECEIPT_TAG, NET, sender, tx_id, receiver, amount, memo)
            if accepted_by else None)
    return make_row(prev, seq, DTG, sender, receiver, amount, tx_id, memo, ssig, rsig)


def audit_all(rows: list[LedgerRow]) -> SignatureAudit:
    a = SignatureAudit(NET, frozenset(("alice", "bob", "carol")), dict(PUBLIC),
                       issuer=ISSUER_KEY.public_key(), pool_signer=POOL_KEY.public_key())
    for r in rows:
        a.add(r)
    a.finish()
    return a


def ledger_of(*rows: tuple[str, str, int, str, str, Ed25519PrivateKey | None, str | None]
              ) -> list[LedgerRow]:
    out: list[LedgerRow] = []
    prev = GENESIS_HASH
    for seq, (sender, receiver, amount, tx_id, memo, key, accepted_by) in enumerate(rows, 1):
        if sender.startswith("_"):
            row = system_row(prev, seq, sender, receiver, amount, tx_id, memo, key, accepted_by)
        else:
            row = signed(prev, seq, sender, receiver, amount, tx_id, memo, by=sender,
                         accepted_by=accepted_by)
        out.append(row)
        prev = row.hash
    return out


OPEN = ("_issuer", "alice", 1000, "_open:alice", "opening balance", ISSUER_KEY, None)


def test_openings_signed_by_the_issuer_and_pool_debits_by_the_router_pass() -> None:
    rows = ledger_of(OPEN, ("alice", "_mixer", 300, "m1", "", None, None),
                     ("_mixer", "bob", 300, "_mix:1", "", POOL_KEY, "bob"))
    a = audit_all(rows)
    assert a.problem is None
    c = a.counts
    assert (c.issued, c.ordered, c.pooled, c.accepted, c.system, c.unsigned) == (1, 1, 1, 1, 0, 0)


@pytest.mark.parametrize(("bad", "named"), [
    # minted: an opening the issuer never signed (the router signed it, or nobody did)
    (("_issuer", "bob", 5000, "_open:bob", "opening balance", POOL_KEY, None), "minted"),
    (("_issuer", "bob", 5000, "_open:bob", "opening balance", None, None), "minted"),
    # a pool debit not signed by the router's key
    (("_mixer", "bob", 100, "_mix:2", "", ISSUER_KEY, "bob"), "moved without its authority"),
    # the pool pays out more than was paid in (signed by the router all the same)
    (("_mixer", "bob", 400, "_mix:2", "", POOL_KEY, "bob"), "pays out more than was paid"),
])
def test_system_rows_without_their_authority_are_named(
        bad: tuple[str, str, int, str, str, Ed25519PrivateKey | None, str | None],
        named: str) -> None:
    rows = ledger_of(OPEN, ("alice", "_mixer", 300, "m1", "", None, None), bad)
    a = audit_all(rows)
    assert a.problem is not None
    assert a.problem.startswith("row 3:")
    assert named in a.problem


def test_a_rotated_key_verifies_the_rows_it_signed_and_only_those() -> None:
    old, new = KEYS["alice"], Ed25519PrivateKey.from_private_bytes(b"\x33" * 32)
    rotated = "2026-12-01T12:00:00.000000Z"

    def row(prev: str, seq: int, dtg: str, key: Ed25519PrivateKey) -> LedgerRow:
        ssig = sign(key, PAY_TAG, NET, "alice", f"t{seq}", "bob", 1, "")
        rsig = sign(KEYS["bob"], RECEIPT_TAG, NET, "alice", f"t{seq}", "bob", 1, "")
        return make_row(prev, seq, dtg, "alice", "bob", 1, f"t{seq}", "", ssig, rsig)

    def audit_rows(*specs: tuple[str, Ed25519PrivateKey], retired: bool = True) -> str | None:
        a = SignatureAudit(NET, frozenset(("alice", "bob")),
                           {"alice": new.public_key(), "bob": PUBLIC["bob"]},
                           retired={"alice": [(rotated, old.public_key())]} if retired else {})
        prev = GENESIS_HASH
        for seq, (dtg, key) in enumerate(specs, 1):
            r = row(prev, seq, dtg, key)
            a.add(r)
            prev = r.hash
        return a.finish()

    before, just_after, later = ("2026-12-01T11:00:00.000000Z", "2026-12-01T12:00:30.000000Z",
                                 "2026-12-01T13:00:00.000000Z")
    assert audit_rows((before, old), (just_after, old), (just_after, new), (later, new)) is None
    problem = audit_rows((before, old), (later, old))  # the old key, an hour after
    assert problem is not None
    assert problem.startswith("row 2:")
    problem = audit_rows((before, new))  # the new key before it existed
    assert problem is not None
    assert problem.startswith("row 1:")
    problem = audit_rows((before, old), retired=False)  # without the history: unproven
    assert problem is not None
    assert problem.startswith("row 1:")


async def test_a_verifier_that_cannot_run_leaves_the_checks_to_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from common.messages import RowIn
    from router import signatures as sigmod

    monkeypatch.setattr(sigmod, "VERIFIER_ARGS", ("-c", "raise SystemExit(3)"))
    checks = sigmod.PaymentSignatures(NET, _Keys())  # type: ignore[arg-type]
    row = RowIn(tx_id="t1", sender="alice", receiver="bob", amount=5)
    good = sign(KEYS["alice"], PAY_TAG, NET, "alice", "t1", "bob", 5, "")
    answers: list[bool] = []
    checks.check_order(row, good, answers.append)
    checks.check_order(row, b"\x00" * 64, answers.append)
    await checks.start()
    try:
        for _ in range(200):  # five quick deaths, then the loop answers what waited
            if len(answers) == 2:
                break
            await asyncio.sleep(0.05)
        assert answers == [True, False]
        checks.check_order(row, good, answers.append)  # and answers at once from now on
        assert answers == [True, False, True]
    finally:
        await checks.aclose()


async def test_a_verifier_that_cannot_be_restarted_for_a_while_is_started_later() -> None:
    """The verifier dies while no process can be started (here: no file descriptor left
    for its pipes): the router keeps trying, and the checks that waited are answered once
    it can — they are never lost with a dead reader."""
    import asyncio
    import os
    import resource
    import signal

    from common.messages import RowIn
    from router import signatures as sigmod

    checks = sigmod.PaymentSignatures(NET, _Keys())  # type: ignore[arg-type]
    row = RowIn(tx_id="t1", sender="alice", receiver="bob", amount=5)
    good = sign(KEYS["alice"], PAY_TAG, NET, "alice", "t1", "bob", 5, "")
    answers: list[bool] = []
    await checks.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        checks.check_order(row, good, answers.append)
        for _ in range(200):
            if answers:
                break
            await asyncio.sleep(0.02)
        assert answers == [True]
        proc = checks._proc
        assert proc is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        proc.send_signal(signal.SIGKILL)
        await asyncio.sleep(0.5)  # it died; starting another fails (EMFILE), again and again
        checks.check_order(row, good, answers.append)
        checks.check_order(row, b"\x00" * 64, answers.append)
        await asyncio.sleep(0.3)
        assert answers == [True]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for _ in range(300):
            if len(answers) == 3:
                break
            await asyncio.sleep(0.02)
        assert answers == [True, True, False]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await checks.aclose()


async def test_a_pay_is_refused_rate_limited_while_too_many_checks_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue of signatures to check is bounded: beyond it a `pay` is answered
    `rate_limited` at once (nothing queued, held or written), never left to pile up."""
    from common.config import RouterConfig
    from common.errors import ErrorCode
    from common.messages import Pay
    from common.participants import Participant
    from router import signatures as sigmod
    from router.book import Book
    from router.ledger_client import LedgerClient
    from router.payments import Pipeline
    from router.sessions import Registry

    checks = sigmod.PaymentSignatures(NET, _Keys())  # type: ignore[arg-type]
    pipeline = Pipeline(Book(), Registry([Participant(id="alice"), Participant(id="bob")]),
                        LedgerClient("127.0.0.1", 9, tls=None), RouterConfig(),
                        signatures=checks)
    pay = Pay(id=1, tx_id="t1", to="bob", amount=5,
              sig=sign(KEYS["alice"], PAY_TAG, NET, "alice", "t1", "bob", 5, ""))
    replies: list[object] = []
    assert pipeline.begin("alice", pay, replies.append) is None  # queued for its check
    monkeypatch.setattr(sigmod, "MAX_WAITING", 1)  # one waits: the queue is full now
    outcome = pipeline.begin("alice", pay, replies.append)
    assert outcome is not None
    assert outcome.code is ErrorCode.RATE_LIMITED
    assert replies == []
    assert pipeline.inflight == {}


RECEIPT_WRITER = """
import resource, sys
from pathlib import Path
from common.proofs import KeptProof, append_proof, proof_line
path = Path(sys.argv[1])
def kept(i):
    return KeptProof(tx_id=f"t{i}", sender="alice", role="paid", seq=i, hash="a" * 64,
                     head_seq=i, head_hash="b" * 64, sig="c" * 128)
line = len(proof_line(kept(1)))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(line * 2.5), hard))  # room for 2.5 lines
failed = 0
for i in range(1, 5):
    try:
        append_proof(path, kept(i))
    except OSError:
        failed += 1
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # the disk has room again
append_proof(path, kept(5))
print(failed)
"""


def test_a_receipt_that_cannot_be_written_whole_leaves_the_others_readable(
        tmp_path: Path) -> None:
    """A payer's receipts file under a file-size limit (a full disk): the receipt that
    does not fit is cut back off, not left as half a line that would make every later
    one unreadable to `verify --receipts`; a line torn by a crash is cut off by the next
    append, and ignored by a reader as the last line."""
    import subprocess
    import sys

    from common.proofs import read_proofs

    folder = tmp_path / "receipts"
    folder.mkdir()
    path = folder / "alice.jsonl"
    done = subprocess.run([sys.executable, "-c", RECEIPT_WRITER, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"  # the third and fourth did not fit
    assert [p.tx_id for _, p in read_proofs(folder)] == ["t1", "t2", "t5"]
    assert path.read_bytes().endswith(b"\n")
    assert path.stat().st_mode & 0o777 == 0o600  # they name who paid whom: the payer's own
    with path.open("ab") as f:  # a crash in the middle of a line
        f.write(b'{"tx_id": "t6", "sen')
    assert [p.tx_id for _, p in read_proofs(folder)] == ["t1", "t2", "t5"]
    from common.proofs import KeptProof, append_proof

    append_proof(path, KeptProof(tx_id="t7", sender="alice", role="paid", seq=7,
                                 hash="a" * 64, head_seq=7, head_hash="b" * 64, sig="c" * 128))
    assert [p.tx_id for _, p in read_proofs(folder)] == ["t1", "t2", "t5", "t7"]


async def test_a_verifier_that_stops_answering_is_replaced_and_the_checks_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier is alive but answers nothing (stopped: SIGSTOP; or wedged): after
    STALL_S it is killed, another is started and the checks that waited are answered —
    never a payment holding its funds for ever."""
    import asyncio
    import signal

    from common.messages import RowIn
    from router import signatures as sigmod

    monkeypatch.setattr(sigmod, "STALL_S", 0.5)
    checks = sigmod.PaymentSignatures(NET, _Keys())  # type: ignore[arg-type]
    row = RowIn(tx_id="t1", sender="alice", receiver="bob", amount=5)
    good = sign(KEYS["alice"], PAY_TAG, NET, "alice", "t1", "bob", 5, "")
    answers: list[bool] = []
    await checks.start()
    try:
        proc = checks._proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        checks.check_order(row, good, answers.append)
        checks.check_order(row, b"\x00" * 64, answers.append)
        for _ in range(300):
            if len(answers) == 2:
                break
            await asyncio.sleep(0.02)
        assert answers == [True, False]
        assert checks.restarts == 1
    finally:
        await checks.aclose()


def test_signed_files_nested_past_the_recursion_limit_are_named(tmp_path: Path) -> None:
    """`[[[[…` in openings.json or a retired-keys file: a ValueError / KeyFileError naming
    the file (it was a RecursionError traceback from every tool that read them)."""
    from common.files import load_json
    from common.keys import KeyFileError, KeyStore
    from common.signing import read_openings

    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        load_json(deep)
    openings = tmp_path / "openings.json"
    openings.write_bytes(deep)
    with pytest.raises(ValueError, match=r"openings\.json: not JSON"):
        read_openings(openings)
    store = KeyStore(tmp_path / "keys", "t")
    store.payers_public_dir.mkdir(parents=True)
    store.payer_retired("alice").write_bytes(deep)
    with pytest.raises(KeyFileError, match=r"alice\.retired\.json is not JSON"):
        store.load_payer_retired("alice")


def test_a_seal_is_a_receipt_only_of_rows_at_or_before_its_head() -> None:
    """`found` may name a row of the batch being written, newer than the latest seal (a
    PostgreSQL lookup sees it first): it gets no receipt rather than one that does not
    cover it."""
    from common.messages import Seal
    from router.payments import ledger_proof

    seal = Seal(head_seq=10, head_hash="b" * 64, sig=b"s" * 64)
    assert ledger_proof(11, "a" * 64, seal) is None
    for seq in (1, 10):
        proof = ledger_proof(seq, "a" * 64, seal)
        assert proof is not None
        assert (proof.seq, proof.hash, proof.head_seq, proof.head_hash) == (
            seq, "a" * 64, 10, "b" * 64)
