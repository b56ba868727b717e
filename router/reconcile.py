"""Reconciliation: the router's live book against the ledger (pure; the admin socket and
`jackpay-router reconcile` drive it).

Rules:
- the ledger is the truth. Replaying its rows 1..`router_last_seq` (the highest seq the
  router has committed) must give exactly the router's live balances, account by account;
  a row of a payment whose append is still unanswered is skipped (the router has not
  applied it *yet*), and counted;
- every ledger row after the router's start (`base_seq`: the rows before it came in as
  the ledger's balances) must be a payment the router knows (its tx table has that
  sender's tx_id at that seq); a row written behind the router's back is named by its
  seq;
- every hold must be a payment in flight: the sum of the held payments' debits, per
  account, equals the router's holds; rows from before the router's start are in the
  balances it started from, so they are judged even while a retry of theirs runs;
- the issued total: what `_issuer` paid out in the ledger equals minus its balance in the
  router, and all balances sum to zero.
Rows after `router_last_seq` are not judged (payments being committed while the check
reads); the check is exact up to that seq.
- a ledger of any size is checked in memory for its accounts, not its rows (`Replay`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from common.messages import ISSUER, Difference, LedgerRow


def settled_when_read(r: LedgerRow, *, base_seq: int, settled_to: int,
                      in_flight: set[tuple[str, str]] | dict[tuple[str, str], object],
                      known_seq: Callable[[str, str], int | None]) -> bool:
    """Whether row `r`, read now, is in the router's balances for good (`Replay.add`): a
    row from before its start (in the balances it started from, even while a retry of
    that payment runs again: `Book.commit` only releases that hold), or a payment it
    committed at that seq and is not running. Paid records are never dropped and never
    run again, and `settled_to` (`Book.last_seq`) only rises."""
    if r.seq <= base_seq:
        return True
    key = (r.sender, r.tx_id)
    return r.seq <= settled_to and key not in in_flight and known_seq(*key) == r.seq


class Replay:
    """The ledger's rows folded as they are read, so a check of a ledger of millions of
    rows holds per-account sums, not the rows.

    A row the router has settled for good when it is read (`settled`: committed at that
    seq, or from before its start and not being run again) is folded at once: nothing
    that happens later changes how it is judged. Every other row (near the head, in
    flight, or not the router's) is held back and judged at `verdict` against the
    router's state then — exactly as if every row had been read at that moment."""

    __slots__ = ("_held", "_issued", "_read", "_replayed", "base_seq")

    def __init__(self, base_seq: int = 0) -> None:
        self.base_seq = base_seq
        self._replayed: dict[str, int] = defaultdict(int)
        self._issued = 0
        self._read = 0
        self._held: list[LedgerRow] = []

    @property
    def held_back(self) -> int:
        return len(self._held)

    def add(self, r: LedgerRow, *, settled: bool = False) -> None:
        self._read += 1
        if settled:
            self._fold(r)
        else:
            self._held.append(r)

    def _fold(self, r: LedgerRow) -> None:
        self._replayed[r.sender] -= r.amount
        self._replayed[r.receiver] += r.amount
        if r.sender == ISSUER:
            self._issued += r.amount

    def verdict(self, *, router_last_seq: int, balances: Mapping[str, int],
                holds: Mapping[str, int], in_flight_debits: Mapping[str, int],
                in_flight: set[tuple[str, str]], known_seq: Callable[[str, str], int | None]
                ) -> tuple[list[Difference], int, int]:
        """(differences, rows read, rows skipped as in flight). Call it once (it folds
        the held-back rows in), with no await between reading the router's state and
        this call."""
        skipped = 0
        diffs: list[Difference] = []
        waiting, self._held = self._held, []
        for r in waiting:
            if r.seq > router_last_seq:
                continue
            if r.seq > self.base_seq and (r.sender, r.tx_id) in in_flight:
                skipped += 1
                continue
            if r.seq > self.base_seq and known_seq(r.sender, r.tx_id) != r.seq:
                diffs.append(Difference("row", r.sender, 0, r.amount,
                                        f"ledger row {r.seq} ({r.tx_id}: {r.sender} -> "
                                        f"{r.receiver}) is not a payment the router made"))
            self._fold(r)
        replayed, issued = self._replayed, self._issued
        for account in sorted(set(replayed) | {a for a, v in balances.items() if v}):
            live, truth = balances.get(account, 0), replayed.get(account, 0)
            if live != truth:
                diffs.append(Difference("balance", account, live, truth))
        for account in sorted(set(holds) | set(in_flight_debits)):
            held, owed = holds.get(account, 0), in_flight_debits.get(account, 0)
            if held != owed:
                diffs.append(Difference("hold", account, held, owed,
                                        "held funds do not match the payments in flight"))
        live_issued = -balances.get(ISSUER, 0)
        if live_issued != issued:
            diffs.append(Difference("issued", ISSUER, live_issued, issued))
        total = sum(balances.values())
        if total:
            diffs.append(Difference("balance", "(sum of all)", total, 0,
                                    "balances do not sum to zero"))
        return diffs, self._read, skipped


def reconcile(rows: Iterable[LedgerRow], *, router_last_seq: int,
              balances: Mapping[str, int], holds: Mapping[str, int],
              in_flight_debits: Mapping[str, int], in_flight: set[tuple[str, str]],
              known_seq: Callable[[str, str], int | None],
              base_seq: int = 0) -> tuple[list[Difference], int, int]:
    """Every row judged at once (`Replay` with none folded early): (differences, rows
    read, rows skipped as in flight)."""
    replay = Replay(base_seq)
    for r in rows:
        replay.add(r)
    return replay.verdict(router_last_seq=router_last_seq, balances=balances, holds=holds,
                          in_flight_debits=in_flight_debits, in_flight=in_flight,
                          known_seq=known_seq)
