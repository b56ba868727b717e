"""`ledger verify PATH [--keys CONFIG]`: check a ledger file offline and print a one-line
verdict.

Checks the header, the format of every cell, the sequence and the hash chain, that no
line is torn, and that no payment — (sender, tx_id) — is recorded twice; with `--keys`,
every row's signatures against the participants' public keys (ledger/audit.py). Exit
code 0 when the file is sound, 1 when it is not, 2 when unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.config import load_config
from common.keys import (
    ISSUER_SIGNER,
    LEDGER_SIGNER,
    POOL_SIGNER,
    KeyFileError,
    KeyStore,
)
from common.messages import ISSUER
from common.money import format_amount
from common.proofs import KeptProof, check_proofs, read_proofs
from ledger.audit import SignatureAudit
from ledger.store import LedgerCorrupt, load_rows


@dataclass(frozen=True, slots=True)
class ReceiptCheck:
    proofs: list[tuple[str, KeptProof]]
    network_id: str
    ledger_key: Ed25519PublicKey


def receipt_check(config: str, folder: Path) -> ReceiptCheck:
    """The receipts kept in `folder`, with the ledger's public key of `config`'s network.
    Raises ConfigError (no key), ValueError (a line that is not a receipt), OSError."""
    cfg = load_config(config)
    key = KeyStore.for_config(cfg).load_signer_public(LEDGER_SIGNER)
    return ReceiptCheck(read_proofs(folder), cfg.network.id, key)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    line: str
    rows: int = 0


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
    for r in rows:
        first = seen.setdefault((r.sender, r.tx_id), r.seq)
        if first != r.seq:
            return Verdict(False, f"FAIL {path}: tx_id {r.tx_id} of {r.sender} is recorded "
                                  f"twice (rows {first} and {r.seq})")
    last = rows[-1].hash[:16] if rows else "-"
    issued = sum(r.amount for r in rows if r.sender == ISSUER)
    signed = ""
    if audit is not None:
        for r in rows:
            audit.add(r)
        problem = audit.finish()
        if problem is not None:
            return Verdict(False, f"FAIL {path}: {problem}")
        signed = f"; {audit.summary()}"
    if receipts is not None:
        problem = check_proofs(receipts.proofs, rows, receipts.network_id, receipts.ledger_key)
        if problem is not None:
            return Verdict(False, f"FAIL {path}: {problem}")
        signed += f"; {len(receipts.proofs)} receipts of the ledger hold"
    return Verdict(True, f"OK {path}: {len(rows)} rows, sequence and hash chain intact, "
                         f"last hash {last}…, issued {format_amount(issued)}{signed}", len(rows))


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
