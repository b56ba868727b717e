"""The transaction table: what the router knows about each `tx_id`. Pure, no I/O.

Rules (DESIGN §1.3, exactly once):
- a payment is named by its sender and its `tx_id`: alice's `inv-1` and bob's `inv-1`
  are two payments (a payer cannot squat another's ids). (sender, tx_id) names one
  payment: (receiver, amount, memo). Asking again with the same parameters gets the same
  payment (its outcome, or the in-flight run to join); other parameters raise
  TxIdConflict and change nothing;
- states move only forward: pending → paid | failed. `paid` carries the ledger row's
  seq and dtg; `failed` carries the error code. An illegal move raises
  InvariantViolation and changes nothing;
- committed rows come from the ledger (replay at start, or an acked append), so after a
  restart every paid `tx_id` is known again; failures live in memory only: after a
  restart a retried `tx_id` that never committed simply runs (DESIGN §2). They are
  also bounded: each sender's most recent `max_failed` failures, and `max_failed_total`
  in all, taken from whoever has the most remembered then — so a payer sending refused
  payments with fresh tx_ids can grow the router's memory only so far, and pushes out
  its own failures before anyone else's; an older failed `tx_id` retried simply runs
  again, as after a restart.
"""

from __future__ import annotations

import enum
from collections import deque

import msgspec

from common.errors import InvariantViolation, JackPayError
from common.messages import LedgerRow


class TxState(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"


# Records are msgspec Structs with gc=False: they hold only strings, ints and enum
# members (no reference cycles), so the garbage collector never tracks them. A router
# that has seen millions of payments keeps its collections as short as on its first day
# (with tracked records every full collection walked the whole table).


class TxParams(msgspec.Struct, frozen=True, gc=False):
    """What a `tx_id` promises; two requests with the same tx_id must agree on all of it."""

    sender: str
    receiver: str
    amount: int
    memo: str


class TxRecord(msgspec.Struct, gc=False):
    tx_id: str
    params: TxParams
    state: TxState = TxState.PENDING
    code: str | None = None
    seq: int | None = None
    dtg: str | None = None


class TxIdConflict(JackPayError):
    """The tx_id is known with other parameters."""

    def __init__(self, record: TxRecord) -> None:
        super().__init__(f"tx_id {record.tx_id} was used for another payment")
        self.record = record


_ALLOWED = {
    (TxState.PENDING, TxState.PAID),
    (TxState.PENDING, TxState.FAILED),
}


MAX_FAILED_REMEMBERED = 10_000  # per sender
MAX_FAILED_TOTAL = 200_000


TxKey = tuple[str, str]  # (sender, tx_id)


class TxTable:
    """Every payment the router has seen, keyed by (sender, tx_id)."""

    def __init__(self, max_failed: int = MAX_FAILED_REMEMBERED,
                 max_failed_total: int = MAX_FAILED_TOTAL) -> None:
        self.max_failed = max_failed
        self.max_failed_total = max_failed_total
        self._failed: dict[str, deque[TxKey]] = {}  # per sender, oldest first
        self._failed_total = 0
        # A replayed row is kept as the LedgerRow itself (no objects made per row while
        # replaying a large ledger); `get` turns it into a TxRecord when first asked.
        self._records: dict[TxKey, TxRecord | LedgerRow] = {}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, sender: str, tx_id: str) -> TxRecord | None:
        key = (sender, tx_id)
        rec = self._records.get(key)
        if rec is None or isinstance(rec, TxRecord):
            return rec
        full = TxRecord(rec.tx_id, TxParams(rec.sender, rec.receiver, rec.amount, rec.memo),
                        TxState.PAID, seq=rec.seq, dtg=rec.dtg)
        self._records[key] = full
        return full

    def lookup(self, tx_id: str, params: TxParams) -> TxRecord | None:
        """The record of params.sender's tx_id, or None if unknown. Raises TxIdConflict
        if known with other parameters."""
        rec = self.get(params.sender, tx_id)
        if rec is not None and rec.params != params:
            raise TxIdConflict(rec)
        return rec

    def begin(self, tx_id: str, params: TxParams) -> TxRecord:
        """Start a new pending payment. Raises InvariantViolation if it is known."""
        key = (params.sender, tx_id)
        if key in self._records:
            raise InvariantViolation(f"tx_id {tx_id} of {params.sender} begun twice")
        rec = TxRecord(tx_id, params)
        self._records[key] = rec
        return rec

    def add_paid(self, tx_id: str, params: TxParams, seq: int, dtg: str) -> TxRecord:
        """A row the router wrote without a run of its own (a payment's extra leg).
        Raises InvariantViolation if it is known."""
        rec = self.begin(tx_id, params)
        rec.state, rec.seq, rec.dtg = TxState.PAID, seq, dtg
        return rec

    def forget_pending(self, sender: str, tx_id: str) -> None:
        """Drop a pending record whose outcome cannot be told (nothing was written for
        it): the sender may run the same tx_id again."""
        rec = self.get(sender, tx_id)
        if rec is not None and rec.state is TxState.PENDING:
            del self._records[(sender, tx_id)]

    def mark_paid(self, sender: str, tx_id: str, seq: int, dtg: str) -> TxRecord:
        rec = self._move(sender, tx_id, TxState.PAID)
        rec.seq, rec.dtg = seq, dtg
        return rec

    def mark_failed(self, sender: str, tx_id: str, code: str) -> TxRecord:
        rec = self._move(sender, tx_id, TxState.FAILED)
        rec.code = code
        failed = self._failed.get(sender)
        if failed is None:
            failed = self._failed[sender] = deque()
        failed.append((sender, tx_id))
        self._failed_total += 1
        while len(failed) > self.max_failed:
            self._forget_oldest(sender)
        if self._failed_total > self.max_failed_total:
            # From whoever has the most: this sender when it has at least its share
            # (the usual case, O(1)), else the largest (a scan, only at the cap).
            if len(failed) * len(self._failed) >= self._failed_total:
                self._forget_oldest(sender)
            else:
                self._forget_oldest(max(self._failed, key=lambda k: len(self._failed[k])))
        return rec

    def _forget_oldest(self, sender: str) -> None:
        failed = self._failed[sender]
        key = failed.popleft()
        self._failed_total -= 1
        if not failed:
            del self._failed[sender]
        old = self._records.get(key)
        if isinstance(old, TxRecord) and old.state is TxState.FAILED:
            del self._records[key]

    def record_row(self, row: LedgerRow) -> None:
        """A durable ledger row (replay): known as paid from now on. Raises
        InvariantViolation if (sender, tx_id) is already known as another payment."""
        key = (row.sender, row.tx_id)
        if key not in self._records:  # the common case: nothing to check
            self._records[key] = row
            return
        params = TxParams(row.sender, row.receiver, row.amount, row.memo)
        rec = self.get(row.sender, row.tx_id)
        if rec is not None:
            if rec.params != params or (rec.state is TxState.PAID and rec.seq != row.seq):
                raise InvariantViolation(f"ledger has tx_id {row.tx_id} of {row.sender} twice")
            if rec.state is TxState.PAID:
                return
        self._records[key] = TxRecord(row.tx_id, params, TxState.PAID, seq=row.seq,
                                      dtg=row.dtg)

    def _move(self, sender: str, tx_id: str, new: TxState) -> TxRecord:
        rec = self.get(sender, tx_id)
        if rec is None:
            raise InvariantViolation(f"unknown tx_id {tx_id} of {sender}")
        if (rec.state, new) not in _ALLOWED:
            raise InvariantViolation(f"tx {tx_id}: {rec.state} -> {new} is not allowed")
        rec.state = new
        return rec

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in TxState}
        for rec in self._records.values():
            out[rec.state.value if isinstance(rec, TxRecord) else TxState.PAID.value] += 1
        return out
