"""The router's book: accounts plus the transaction table, from the ledger.

Pure (no I/O). The ledger is the truth (DESIGN §1.2). At start the book takes the
ledger's balances after its last row (`start_from`: no replay of every row) and
`remember`s the most recent rows, so retries and `status` of recent payments are
answered from memory; `base_seq` is that last row. A row at or below `base_seq` is
already in the balances: if a retry of such an old payment comes back from the ledger as
a `duplicate`, `commit` only releases its hold — money never moves twice. Opening balances are ledger rows
`_issuer -> <id>` with the deterministic tx_id `_open:<id>`; issuing one again is a
duplicate at the ledger, so a restart never issues twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.messages import ISSUER, LedgerRow, RowIn
from common.signing import OPENING_MEMO, opening_tx_id
from router.accounts import Accounts
from router.transactions import TxParams, TxTable

__all__ = ["OPENING_MEMO", "Book", "Opening", "opening_row", "opening_tx_id"]


def opening_row(payer_id: str, amount: int) -> RowIn:
    """The row of a participant's opening balance (`_issuer` -> id, signed by the issuer)."""
    return RowIn(tx_id=opening_tx_id(payer_id), sender=ISSUER, receiver=payer_id,
                 amount=amount, memo=OPENING_MEMO)


@dataclass(frozen=True, slots=True)
class Opening:
    payer_id: str
    amount: int


class Book:
    def __init__(self) -> None:
        self.accounts = Accounts()
        self.txs = TxTable()
        self.last_seq = 0
        self.base_seq = 0  # rows up to here came in as balances (`start_from`)

    def start_from(self, balances: list[tuple[str, int]], last_seq: int) -> None:
        """Begin with the ledger's balances after row `last_seq`. Raises
        InvariantViolation if they cannot be (they do not sum to zero, a payer is
        negative)."""
        self.accounts.load(balances)
        self.base_seq = self.last_seq = last_seq

    def remember(self, row: LedgerRow) -> None:
        """A row at or below `base_seq` (its money is in the balances): known from now on
        to retries and `status`, nothing moved."""
        if self.txs.get(row.sender, row.tx_id) is None:
            self.txs.record_row(row)
        self.accounts.touch(row.sender, row.dtg)
        self.accounts.touch(row.receiver, row.dtg)

    def record_issued(self, row: LedgerRow) -> None:
        """An opening balance this router just had written (at start or when a
        participant is added at run time). Other payments may have
        committed later rows meanwhile, so the order is not checked. A row already known
        is skipped."""
        if self.txs.get(row.sender, row.tx_id) is not None:
            return
        if row.seq <= self.base_seq:  # issued before this start: in the balances
            self.remember(row)
            return
        self.txs.record_row(row)
        self.accounts.apply(row.sender, row.receiver, row.amount, held=False, tx_time=row.dtg)
        if row.seq > self.last_seq:
            self.last_seq = row.seq

    def commit(self, tx_id: str, sender: str, receiver: str, amount: int, seq: int,
               dtg: str) -> None:
        """The ledger just acked row `seq` for a payment that holds `amount` on its
        sender: move the money, release the hold, mark the tx paid. (A row at or below
        `base_seq` — a retry of a payment made before this start — only releases the
        hold: its money is in the balances the book started from.)"""
        if seq <= self.base_seq:
            self.accounts.release_hold(sender, amount)
        else:
            self.accounts.apply(sender, receiver, amount, held=True, tx_time=dtg)
        self.txs.mark_paid(sender, tx_id, seq, dtg)
        if seq > self.last_seq:
            self.last_seq = seq

    def commit_leg(self, tx_id: str, sender: str, receiver: str, amount: int, memo: str,
                   seq: int, dtg: str) -> None:
        """An extra leg of a payment (e.g. a fee) was acked with the payment's main row:
        move its money, release its hold, remember its row (`commit`'s rule for old rows)."""
        if seq <= self.base_seq:
            self.accounts.release_hold(sender, amount)
        else:
            self.accounts.apply(sender, receiver, amount, held=True, tx_time=dtg)
        if self.txs.get(sender, tx_id) is None:  # (a `status` may have recalled it already)
            self.txs.add_paid(tx_id, TxParams(sender, receiver, amount, memo), seq, dtg)
        if seq > self.last_seq:
            self.last_seq = seq

    def missing_openings(self, openings: list[Opening]) -> list[RowIn]:
        """Opening-balance rows still to issue (zero balances are never issued). A
        `_open:<id>` row already in the ledger wins over a changed config."""
        rows = []
        for o in openings:
            if o.amount <= 0:
                continue
            if self.txs.get(ISSUER, opening_tx_id(o.payer_id)) is None:
                rows.append(opening_row(o.payer_id, o.amount))
        return rows
