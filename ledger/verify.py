"""`ledger verify PATH|DSN [--keys CONFIG [--receipts DIR]]`: check a ledger file (or a
ledger in PostgreSQL) offline and print a one-line verdict.

Checks the header, the format of every cell, the sequence and the hash chain, that no
line is torn, and that no payment — (sender, tx_id) — is recorded twice; with `--keys`,
every row's signatures against the participants' public keys (ledger/audit.py). Exit
code 0 when the file is sound, 1 when it is not, 2 when unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.config import load_config
from common.keys import (
    ISSUER_SIGNER,
    LEDGER_SIGNER,
    POOL_SIGNER,
    KeyFileError,
    KeyStore,
)
from common.messages import ISSUER, LedgerRow
from common.money import format_amount
from common.proofs import KeptProof, check_proofs, proof_seqs, read_proofs
from ledger.audit import SignatureAudit
from ledger.pgstore import CONNECT_TIMEOUT_S, ROW_COLUMNS, row_of
from ledger.rows import check_chain
from ledger.store import LedgerCorrupt, load_rows


@dataclass(frozen=True, slots=True)
class ReceiptCheck:
    proofs: list[tuple[str, KeptProof]]
    network_id: str
    ledger_key: Ed25519PublicKey


def receipt_check(config: str, folder: Path, *, allow_none: bool = False) -> ReceiptCheck:
    """The receipts kept in `folder` (or one file), with the ledger's public key of
    `config`'s network. Raises ConfigError (no key), ValueError (a line that is not a
    receipt; no receipts at all unless `allow_none`), OSError."""
    cfg = load_config(config)
    key = KeyStore.for_config(cfg).load_signer_public(LEDGER_SIGNER)
    return ReceiptCheck(read_proofs(folder, allow_none=allow_none), cfg.network.id, key)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    line: str
    rows: int = 0


class RowWalk:
    """What `verify` checks row by row, in seq order, wherever the rows are (a file, a
    database): the issued total, every row's signatures (`audit`), and the hashes the
    payers' receipts name (`receipts`). The caller checks format, sequence and chain."""

    def __init__(self, audit: SignatureAudit | None, receipts: ReceiptCheck | None) -> None:
        self.audit = audit
        self.receipts = receipts
        self._wanted = proof_seqs(receipts.proofs) if receipts is not None else set()
        self._hashes: dict[int, str] = {}
        self.issued = 0
        self.last: LedgerRow | None = None

    def add(self, row: LedgerRow) -> None:
        if row.sender == ISSUER:
            self.issued += row.amount
        if self.audit is not None:
            self.audit.add(row)
        if row.seq in self._wanted:
            self._hashes[row.seq] = row.hash
        self.last = row

    def finish(self) -> str | None:
        """The first problem of the signatures or the receipts, or None."""
        if self.audit is not None and (problem := self.audit.finish()) is not None:
            return problem
        r = self.receipts
        if r is not None:
            return check_proofs(r.proofs, self._hashes, self.rows, r.network_id,
                                r.ledger_key)
        return None

    @property
    def rows(self) -> int:
        return self.last.seq if self.last is not None else 0

    def verdict(self, where: str, checked: str) -> Verdict:
        """The OK line: `checked` says what the store's own checks covered."""
        last = self.last.hash[:16] if self.last is not None else "-"
        extra = f"; {self.audit.summary()}" if self.audit is not None else ""
        if self.receipts is not None:
            extra += f"; {len(self.receipts.proofs)} receipts of the ledger hold"
        return Verdict(True, f"OK {where}: {self.rows} rows, {checked}, last hash {last}…, "
                             f"issued {format_amount(self.issued)}{extra}", self.rows)


def verify_file(path: Path, audit: SignatureAudit | None = None,
                receipts: ReceiptCheck | None = None) -> Verdict:
    """With `audit`, the rows' signatures are checked too (ledger/audit.py); with
    `receipts`, the payers' receipts against the rows (common/proofs.py)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Verdict(False, f"FAIL {path}: cannot read: {exc.strerror or exc}")
    try:
        rows, good = load_rows(data, str(path))
    except LedgerCorrupt as exc:
        return Verdict(False, f"FAIL {exc}")
    if not data:
        return Verdict(False, f"FAIL {path}: empty file (no header)")
    if good < len(data):
        return Verdict(False, f"FAIL {path}: last line is torn ({len(data) - good} bytes "
                              "without a newline; the ledger cuts it off on start)")
    seen: dict[tuple[str, str], int] = {}
    walk = RowWalk(audit, receipts)
    for r in rows:
        first = seen.setdefault((r.sender, r.tx_id), r.seq)
        if first != r.seq:
            return Verdict(False, f"FAIL {path}: tx_id {r.tx_id} of {r.sender} is recorded "
                                  f"twice (rows {first} and {r.seq})")
        walk.add(r)
    if (problem := walk.finish()) is not None:
        return Verdict(False, f"FAIL {path}: {problem}")
    return walk.verdict(str(path), "sequence and hash chain intact")


async def verify_database(dsn: str, audit: SignatureAudit | None = None,
                          receipts: ReceiptCheck | None = None) -> Verdict:
    """The same checks on a ledger in PostgreSQL, in one read-only snapshot: seq order
    and hash chain of every row, no (sender, tx_id) twice, balances equal to a replay of
    the rows; `audit` and `receipts` as for a file. Raises DB_ERRORS when it cannot be
    read."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    where = dsn.split("@")[-1]
    walk = RowWalk(audit, receipts)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            async for rec in conn.cursor(f"SELECT {ROW_COLUMNS} FROM jackpay_rows ORDER BY seq",
                                         prefetch=5000):
                row = row_of(rec)
                problem = check_chain(walk.last, row)
                if problem is not None:
                    return Verdict(False, f"FAIL {where}: row {row.seq}: {problem}")
                walk.add(row)
            twice = await conn.fetchrow(
                "SELECT sender, tx_id, min(seq), max(seq) FROM jackpay_rows "
                "GROUP BY sender, tx_id HAVING count(*) > 1 LIMIT 1")
            if twice is not None:
                return Verdict(False, f"FAIL {where}: tx_id {twice[1]} of {twice[0]} is "
                                      f"recorded twice (rows {twice[2]} and {twice[3]})")
            off = await conn.fetchrow("""
                WITH d AS (SELECT sender AS account, -amount AS delta FROM jackpay_rows
                           UNION ALL SELECT receiver, amount FROM jackpay_rows),
                     c AS (SELECT account, sum(delta) AS balance FROM d GROUP BY account)
                SELECT coalesce(c.account, b.account), c.balance, b.balance
                FROM c FULL JOIN jackpay_balances AS b USING (account)
                WHERE c.balance IS DISTINCT FROM b.balance LIMIT 1""")
            if off is not None:
                return Verdict(False, f"FAIL {where}: balance of {off[0]} is {off[2]} in "
                                      f"jackpay_balances but {off[1]} by the rows")
    finally:
        await conn.close()
    if (problem := walk.finish()) is not None:
        return Verdict(False, f"FAIL {where}: {problem}")
    return walk.verdict(where, "sequence and hash chain intact, balances match")


def signature_audit(config: str) -> SignatureAudit:
    """An audit of signed payments with the public keys of `config`'s participants (a
    participant without a key file is listed without one: its signed rows fail). Raises
    ConfigError."""
    cfg = load_config(config, with_changes=True)
    store = KeyStore.for_config(cfg)
    keys = {}
    retired = {}
    for p in cfg.participants:
        retired[p.id] = store.load_payer_retired(p.id)
        try:
            keys[p.id] = store.load_payer_public(p.id)
        except KeyFileError:
            continue
    signers = {}
    for name in (ISSUER_SIGNER, POOL_SIGNER):
        if store.signer_public(name).exists():
            signers[name] = store.load_signer_public(name)
    return SignatureAudit(cfg.network.id, frozenset(p.id for p in cfg.participants), keys,
                          retired=retired, issuer=signers.get(ISSUER_SIGNER), pool_signer=signers.get(POOL_SIGNER))
