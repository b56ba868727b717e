"""`ledger verify PATH`: check a ledger file offline and print a one-line verdict.

Checks the header, the format of every cell, the sequence and the hash chain, that no
line is torn, and that no payment — (sender, tx_id) — is recorded twice. Exit code 0 when the file is sound, 1 when it is not, 2 when unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.messages import ISSUER
from common.money import format_amount
from ledger.store import LedgerCorrupt, load_rows


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    line: str
    rows: int = 0


def verify_file(path: Path) -> Verdict:
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
    return Verdict(True, f"OK {path}: {len(rows)} rows, sequence and hash chain intact, "
                         f"last hash {last}…, issued {format_amount(issued)}", len(rows))
