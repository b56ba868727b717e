"""Ledger rows as CSV lines, and the SHA-256 hash chain. Pure: no files, no clock.

File format (DESIGN §4), one row per physical line, UTF-8, `\\n` line ends:

    dtg,sender,receiver,amount,seq,tx_id,memo,hash,sender_sig,receiver_sig

- A row without signatures has the first eight cells only (as every row had before
  signed payments); a row with either signature has all ten, an absent one empty. The
  signatures are Ed25519, as 128 lowercase hex digits (common/signing.py says over what).
  A file begun before signed payments keeps its eight-name header (`HEADER_V1_LINE`);
  its signed rows carry the two extra cells all the same.
- `amount` is a decimal string ("12.50"); inside JackPay it is integer minor units.
- `memo` may hold any text. So that each row stays on one line and no spreadsheet ever
  runs a formula from it, the memo cell is *encoded*: `\\` → `\\\\`, LF → `\\n`, CR → `\\r`,
  other control characters → `\\u00XX`; then, if the result starts with `=`, `+`, `-`, `@`
  or `'`, a `'` is put in front (the OWASP CSV-injection guard). Commas and quotes are
  handled by ordinary CSV quoting. `decode_memo(encode_memo(m)) == m` for every string.
- `hash` = SHA-256 (hex) of the canonical JSON array
  `[prev_hash, seq, dtg, sender, receiver, amount_minor, tx_id, memo]` (memo decoded,
  compact separators, UTF-8, non-ASCII kept), with `prev_hash` = 64 zeros for seq 1;
  for a row with a signature, two more elements: the signatures' hex ("" when absent).
  So unsigned rows hash exactly as before, and a signature cannot be removed or changed
  without breaking the chain.
  Any edit, deletion, insertion or reordering of rows breaks the chain.
"""

from __future__ import annotations

import csv
import hashlib
import re

import msgspec

from common.messages import ACCOUNT_PATTERN, LedgerRow
from common.messages import SYSTEM_TX_ID_PATTERN as TX_ID_PATTERN
from common.money import MAX_AMOUNT, AmountError, format_amount, parse_amount

HEADER_V1 = ["dtg", "sender", "receiver", "amount", "seq", "tx_id", "memo", "hash"]
HEADER = [*HEADER_V1, "sender_sig", "receiver_sig"]
HEADER_LINE = ",".join(HEADER) + "\n"
HEADER_V1_LINE = ",".join(HEADER_V1) + "\n"  # files begun before signed payments
GENESIS_HASH = "0" * 64
MAX_MEMO_CHARS = 256

_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
_TX_ID_RE = re.compile(TX_ID_PATTERN)
_DTG_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_SIG_RE = re.compile(r"[0-9a-f]{128}")
_CONTROL_RE = re.compile(r"[\\\x00-\x1f\x7f]")
_JSON = msgspec.json.Encoder()
_FORMULA_START = ("=", "+", "-", "@", "'")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
_UNESCAPE_RE = re.compile(r"\\(\\|n|r|u([0-9a-fA-F]{4}))")


class RowFormatError(ValueError):
    """A CSV line is not a well-formed ledger row; the message says which cell and why."""


def encode_memo(memo: str) -> str:
    text = _CONTROL_RE.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), memo)
    if text.startswith(_FORMULA_START):
        text = "'" + text
    return text


def decode_memo(cell: str) -> str:
    if cell.startswith("'"):
        cell = cell[1:]

    def unescape(m: re.Match[str]) -> str:
        if m.group(2):
            return chr(int(m.group(2), 16))
        return "\\" if m.group(1) == "\\" else ("\n" if m.group(1) == "n" else "\r")

    return _UNESCAPE_RE.sub(unescape, cell)


def chain_hash(prev_hash: str, seq: int, dtg: str, sender: str, receiver: str,
               amount: int, tx_id: str, memo: str, sender_sig: bytes | None = None,
               receiver_sig: bytes | None = None) -> str:
    # msgspec's JSON is byte-for-byte json.dumps(..., separators=(",", ":"),
    # ensure_ascii=False).encode() for these values (tested), at a fraction of the cost.
    fields: list[object] = [prev_hash, seq, dtg, sender, receiver, amount, tx_id, memo]
    if sender_sig or receiver_sig:
        fields += [(sender_sig or b"").hex(), (receiver_sig or b"").hex()]
    return hashlib.sha256(_JSON.encode(fields)).hexdigest()


def make_row(prev_hash: str, seq: int, dtg: str, sender: str, receiver: str,
             amount: int, tx_id: str, memo: str, sender_sig: bytes | None = None,
             receiver_sig: bytes | None = None) -> LedgerRow:
    """A new row chained onto `prev_hash`."""
    h = chain_hash(prev_hash, seq, dtg, sender, receiver, amount, tx_id, memo, sender_sig,
                   receiver_sig)
    return LedgerRow(seq=seq, dtg=dtg, sender=sender, receiver=receiver, amount=amount,
                     tx_id=tx_id, memo=memo, hash=h, sender_sig=sender_sig or None,
                     receiver_sig=receiver_sig or None)


def _quote(cell: str) -> str:
    if "," in cell or '"' in cell:
        return '"' + cell.replace('"', '""') + '"'
    return cell


def format_line(row: LedgerRow) -> str:
    """The row's CSV line, newline included."""
    line = (f"{row.dtg},{row.sender},{row.receiver},{format_amount(row.amount)},{row.seq},"
            f"{row.tx_id},{_quote(encode_memo(row.memo))},{row.hash}")
    if row.sender_sig or row.receiver_sig:
        line += f",{(row.sender_sig or b'').hex()},{(row.receiver_sig or b'').hex()}"
    return line + "\n"


_FAST_LINE_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z),"
    + r"(" + ACCOUNT_PATTERN.strip("^$") + r"),(" + ACCOUNT_PATTERN.strip("^$") + r"),"
    + r"([0-9]+)\.([0-9]{2}),([1-9][0-9]*),(" + TX_ID_PATTERN.strip("^$") + r"),"
    + r"([^,\"'\\]*),([0-9a-f]{64})(?:,([0-9a-f]{128})?,([0-9a-f]{128})?)?"
)


def parse_line(line: str) -> LedgerRow:
    """Parse one CSV line (without its newline). Raises RowFormatError.

    Checks the format of every cell, not the chain (see `check_chain`). The common line
    (a plain memo) is matched by one expression; anything else takes the careful path,
    which also says exactly what is wrong.
    """
    m = _FAST_LINE_RE.fullmatch(line)
    if m is not None:
        dtg, sender, receiver, whole, cents, seq_s, tx_id, memo, h, ssig, rsig = m.groups()
        amount = int(whole) * 100 + int(cents)
        if (0 < amount <= MAX_AMOUNT and len(memo) <= MAX_MEMO_CHARS
                and (ssig or rsig or not line.endswith(",,"))):
            return LedgerRow(seq=int(seq_s), dtg=dtg, sender=sender, receiver=receiver,
                             amount=amount, tx_id=tx_id, memo=memo, hash=h,
                             sender_sig=bytes.fromhex(ssig) if ssig else None,
                             receiver_sig=bytes.fromhex(rsig) if rsig else None)
    return _parse_line_carefully(line)


def _parse_line_carefully(line: str) -> LedgerRow:
    if '"' in line:
        try:
            cells = next(csv.reader([line], strict=True))
        except (csv.Error, StopIteration) as exc:
            raise RowFormatError(f"not a CSV row: {exc}") from None
    else:  # fast path: no quoted cell, so a comma always separates cells
        cells = line.split(",")
    if len(cells) not in (len(HEADER_V1), len(HEADER)):
        raise RowFormatError(f"expected {len(HEADER_V1)} cells (unsigned) or {len(HEADER)}, "
                             f"found {len(cells)}")
    dtg, sender, receiver, amount_s, seq_s, tx_id, memo_cell, h = cells[:8]
    sigs: list[bytes | None] = [None, None]
    for i, (name, cell) in enumerate(zip(HEADER[8:], cells[8:], strict=False)):
        if cell and not _SIG_RE.fullmatch(cell):
            raise RowFormatError(f"{name} is not 128 lowercase hex digits")
        sigs[i] = bytes.fromhex(cell) if cell else None
    if len(cells) == len(HEADER) and sigs == [None, None]:
        raise RowFormatError("signature cells present but both empty (an unsigned row has "
                             f"{len(HEADER_V1)} cells)")
    if not _DTG_RE.fullmatch(dtg):
        raise RowFormatError(f"dtg {dtg!r} is not an ISO-8601 UTC time with microseconds")
    for name, value in (("sender", sender), ("receiver", receiver)):
        if not _ACCOUNT_RE.fullmatch(value):
            raise RowFormatError(f"{name} {value!r} is not a valid account id")
    try:
        amount = parse_amount(amount_s)
    except AmountError as exc:
        raise RowFormatError(f"amount: {exc}") from None
    if not seq_s.isdigit() or seq_s.startswith("0"):
        raise RowFormatError(f"seq {seq_s!r} is not a positive integer")
    if not _TX_ID_RE.fullmatch(tx_id):
        raise RowFormatError(f"tx_id {tx_id!r} is not valid")
    if not _HASH_RE.fullmatch(h):
        raise RowFormatError(f"hash {h!r} is not 64 lowercase hex digits")
    memo = decode_memo(memo_cell)
    if len(memo) > MAX_MEMO_CHARS:
        raise RowFormatError(f"memo longer than {MAX_MEMO_CHARS} characters")
    return LedgerRow(seq=int(seq_s), dtg=dtg, sender=sender, receiver=receiver, amount=amount,
                     tx_id=tx_id, memo=memo, hash=h, sender_sig=sigs[0], receiver_sig=sigs[1])


def check_chain(prev: LedgerRow | None, row: LedgerRow) -> str | None:
    """Why `row` cannot follow `prev` (None if it can): seq order and hash chain."""
    if prev is None:
        return check_link(0, GENESIS_HASH, row)
    return check_link(prev.seq, prev.hash, row)


def check_link(prev_seq: int, prev_hash: str, row: LedgerRow) -> str | None:
    """Why `row` cannot follow the row (prev_seq, prev_hash) (None if it can)."""
    if row.seq != prev_seq + 1:
        return f"seq {row.seq} where {prev_seq + 1} was expected (row missing or reordered)"
    want = chain_hash(prev_hash, row.seq, row.dtg, row.sender, row.receiver, row.amount,
                      row.tx_id, row.memo, row.sender_sig, row.receiver_sig)
    if want != row.hash:
        return "hash does not match the row's content and the previous hash (row edited?)"
    return None


def same_payment(row: LedgerRow, sender: str, receiver: str, amount: int, memo: str) -> bool:
    """Whether an existing row records exactly this payment (idempotent re-append)."""
    return (row.sender, row.receiver, row.amount, row.memo) == (sender, receiver, amount, memo)
