"""The ledger's receipts as a payer keeps them, and how an auditor checks them.

A payer's daemon appends one JSON line per `paid` and `settled` that carried a proof
(common/messages.py `LedgerProof`) to `<[payer] receipts_dir>/<payer id>.jsonl`:

    {"tx_id": "t-1", "sender": "alice", "role": "paid", "seq": 12, "hash": "…",
     "head_seq": 15, "head_hash": "…", "sig": "<128 hex digits>"}

`sig` is the ledger's Ed25519 signature of its chain head (common/signing.py
`head_bytes`); the head's hash commits to every row up to it. `check_proofs` holds them
against a ledger's rows (`jackpay-ledger verify FILE --keys CONFIG --receipts DIR`): a
receipt the ledger did not sign is a forgery; a row or a sealed head the file no longer
has, or has with another hash, means rows were removed or rewritten after the ledger
acknowledged them — even if the whole chain was recomputed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.files import write_all
from common.messages import AccountId, LedgerProof, RowHash, Seq, TxId
from common.signing import head_bytes


class KeptProof(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Checked as on the wire: an auditor prints these, so a garbled file cannot put
    # control characters (or a forged "OK" line) on the terminal.
    tx_id: TxId
    sender: AccountId
    role: Literal["paid", "settled"]
    seq: Seq
    hash: RowHash
    head_seq: Seq
    head_hash: RowHash
    sig: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{128}$")]  # hex

    @classmethod
    def of(cls, proof: LedgerProof, tx_id: str, sender: str,
           role: Literal["paid", "settled"]) -> KeptProof:
        return cls(tx_id, sender, role, proof.seq, proof.hash, proof.head_seq,
                   proof.head_hash, proof.sig.hex())


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(KeptProof)


def proof_line(kept: KeptProof) -> bytes:
    return _ENCODER.encode(kept) + b"\n"


def append_proof(path: Path, kept: KeptProof) -> None:
    """Append one receipt line to `path`, whole or not at all: a write that fails (disk
    full, a file-size limit) is cut back off, and a line torn by a crash before is cut
    off first — a half line would make every later receipt unreadable. Raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a receiver's receipts name who paid it: the payer's own
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            size = _last_line_end(path)
            os.ftruncate(fd, size)
        try:
            write_all(fd, proof_line(kept))
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _last_line_end(path: Path) -> int:
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


def read_proofs(where: Path, *, allow_none: bool = False) -> list[tuple[str, KeptProof]]:
    """Every receipt in the `*.jsonl` files of folder `where` (or in the one file `where`),
    with where it was read ("FILE:LINE"). A last line without its newline (torn by a
    crash: never a whole receipt) is left out. Raises ValueError naming a line that is not
    a receipt, or a path with no receipts in it (an audit that checked nothing is not an
    OK; `allow_none`: [] then); OSError."""
    if where.is_dir():
        files = sorted(where.glob("*.jsonl"))
    elif where.is_file():
        files = [where]
    else:
        raise ValueError(f"{where}: no receipts folder or file there")
    out: list[tuple[str, KeptProof]] = []
    for path in files:
        data = path.read_bytes()
        lines = data.split(b"\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if n == len(lines):  # no newline after it: torn
                break
            try:
                out.append((f"{path.name}:{n}", _DECODER.decode(line)))
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{n}: not a receipt: {exc}") from None
    if not out and not allow_none:
        raise ValueError(f"no receipts in {where} (*.jsonl files of whole lines)")
    return out


def proof_seqs(proofs: Sequence[tuple[str, KeptProof]]) -> set[int]:
    """The seqs whose hashes `check_proofs` needs: each receipt's row and sealed head."""
    return {seq for _, p in proofs for seq in (p.seq, p.head_seq)}


def check_proofs(proofs: Sequence[tuple[str, KeptProof]], hashes: Mapping[int, str],
                 last_seq: int, network_id: str, ledger_key: Ed25519PublicKey) -> str | None:
    """The first receipt the ledger contradicts (what and where), or None when it holds
    every one. `hashes`: the hash of each seq in `proof_seqs(proofs)` the ledger has;
    `last_seq`: its last row (a whole, verified ledger)."""
    for where, p in proofs:
        name = f"receipt of {p.sender}'s tx_id {p.tx_id} ({where})"
        try:
            ledger_key.verify(bytes.fromhex(p.sig), head_bytes(network_id, p.head_seq,
                                                               p.head_hash))
        except (InvalidSignature, ValueError):
            return f"{name}: not signed by the ledger's key (a forged receipt)"
        for seq, want, what in ((p.seq, p.hash, "its row"),
                                (p.head_seq, p.head_hash, "the chain head the ledger sealed")):
            held = hashes.get(seq) if 1 <= seq <= last_seq else None
            if held is None:
                return (f"{name}: {what} was seq {seq}, and the ledger now ends at "
                        f"{last_seq}: rows acknowledged by the ledger were removed")
            if held != want:
                return (f"{name}: {what} (seq {seq}) had hash {want[:16]}…, the ledger now "
                        f"holds {held[:16]}…: rows were removed or rewritten")
    return None
