"""The ledger's index: what appended rows turn into, the chain head, reads. Pure: no I/O.

Rules:
- A payment is named by (sender, tx_id): appends are idempotent by that pair, and two
  senders may use the same tx_id. `resolve` decides every row of a batch against a
  `lookup` of the rows already durable (the index, or what the database answered) and
  the chain head; it changes nothing, so a batch that fails to become durable leaves no
  trace. Rows become part of an index only after they are durable (`add`).
- The same batch resolved against the same rows and head gives the same rows and hashes,
  whichever store keeps them: the hash chain is ledger/rows.py's, seq by seq.
- `MemoryIndex` holds every row (the CSV store: reads and lookups from memory).
  `RecentIndex` holds the chain head and a bounded set of recent rows (the PostgreSQL
  store: older rows are asked of the database, so memory does not grow with the ledger).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from common.messages import LedgerRow, RowIn
from ledger.rows import GENESIS_HASH, make_row, same_payment

Key = tuple[str, str]  # (sender, tx_id)
Lookup = Callable[[Key], LedgerRow | None]

# The tx_ids of a payment's extra legs start so (router.payment_core.leg_tx_id).
LEG_PREFIX = "_leg"


@dataclass(slots=True)
class Resolution:
    """What an append request's rows turned into, before the batch is written."""

    status: list[str] = field(default_factory=list)  # written | duplicate | conflict
    rows: list[LedgerRow] = field(default_factory=list)


@dataclass(slots=True)
class ReadResult:
    rows: list[LedgerRow]
    next_seq: int
    more: bool = False  # rows (of the party, if one was given) exist from next_seq on


def resolve(requests: list[list[RowIn]], dtg: str, atomic: list[bool] | None, *,
            last_seq: int, last_hash: str,
            lookup: Lookup) -> tuple[list[Resolution], list[LedgerRow]]:
    """Decide each row of a group of append requests; returns the answers and the new
    rows, chained onto (last_seq, last_hash).

    A (sender, tx_id) repeated inside the group resolves against its first occurrence.
    An atomic request (one payment's legs) is all or nothing: a conflict on one row,
    or some rows new and others already there, answers every row `conflict` and
    writes none of them.
    """
    new_rows: list[LedgerRow] = []
    pending: dict[Key, LedgerRow] = {}
    prev_hash = last_hash
    seq = last_seq
    resolutions = []
    for i, rows_in in enumerate(requests):
        if atomic is not None and atomic[i]:
            mark = (len(new_rows), seq, prev_hash)
        else:
            mark = None
        res = Resolution()
        for r in rows_in:
            key = (r.sender, r.tx_id)
            existing = lookup(key) or pending.get(key)
            if existing is not None:
                same = same_payment(existing, r.sender, r.receiver, r.amount, r.memo)
                res.status.append("duplicate" if same else "conflict")
                res.rows.append(existing)
                continue
            seq += 1
            row = make_row(prev_hash, seq, dtg, r.sender, r.receiver, r.amount, r.tx_id, r.memo,
                           r.sender_sig, r.receiver_sig)
            prev_hash = row.hash
            pending[key] = row
            new_rows.append(row)
            res.status.append("written")
            res.rows.append(row)
        if (mark is not None and "conflict" in res.status) or (
                mark is not None and "written" in res.status and "duplicate" in res.status):
            assert mark is not None
            undone, seq, prev_hash = mark
            for row in new_rows[undone:]:
                del pending[(row.sender, row.tx_id)]
            del new_rows[undone:]
            known = next((r for r, st in zip(res.rows, res.status, strict=True)
                          if st != "written"), res.rows[0])
            res = Resolution(["conflict"] * len(rows_in), [known] * len(rows_in))
        resolutions.append(res)
    return resolutions, new_rows


def request_keys(requests: Iterable[list[RowIn]]) -> list[Key]:
    """Every (sender, tx_id) of a group of requests, once, in order."""
    return list(dict.fromkeys((r.sender, r.tx_id) for rows in requests for r in rows))


class MemoryIndex:
    """Rows after `base_seq` in memory (the CSV store: the rows its index on disk does not
    hold yet), with lookups by (sender, tx_id), pages by seq and by party, and the
    balances of every account (those before `base_seq` given at construction)."""

    def __init__(self, rows: list[LedgerRow] | None = None, *, base_seq: int = 0,
                 base_hash: str = GENESIS_HASH, balances: dict[str, int] | None = None) -> None:
        self.base_seq = base_seq
        self._base_hash = base_hash
        self.rows: list[LedgerRow] = []  # seq base_seq + 1, base_seq + 2, ...
        self.by_tx: dict[Key, LedgerRow] = {}
        # seqs of the rows each account sent or received, ascending: `page(party=…)` is
        # a binary search, not a scan on the event loop.
        self.by_party: dict[str, list[int]] = {}
        self.balances: dict[str, int] = dict(balances or {})  # after the last row
        self.add(rows or [])

    @property
    def last_seq(self) -> int:
        return self.base_seq + len(self.rows)

    @property
    def last_hash(self) -> str:
        return self.rows[-1].hash if self.rows else self._base_hash

    def add(self, rows: list[LedgerRow]) -> None:
        """Durable rows, in seq order, continuing the chain."""
        by_tx = self.by_tx
        by_party = self.by_party
        balances = self.balances
        for row in rows:
            self.rows.append(row)
            by_tx[(row.sender, row.tx_id)] = row
            by_party.setdefault(row.sender, []).append(row.seq)
            if row.receiver != row.sender:
                by_party.setdefault(row.receiver, []).append(row.seq)
            balances[row.sender] = balances.get(row.sender, 0) - row.amount
            balances[row.receiver] = balances.get(row.receiver, 0) + row.amount

    def forget_through(self, seq: int) -> None:
        """Drop the rows up to `seq` (kept elsewhere now); balances stay whole."""
        n = min(seq, self.last_seq) - self.base_seq
        if n <= 0:
            return
        gone, self.rows = self.rows[:n], self.rows[n:]
        self.base_seq += n
        self._base_hash = gone[-1].hash
        parties: set[str] = set()
        for row in gone:
            del self.by_tx[(row.sender, row.tx_id)]
            parties.add(row.sender)
            parties.add(row.receiver)
        for p in parties:
            seqs = self.by_party[p]
            del seqs[: bisect.bisect_right(seqs, self.base_seq)]
            if not seqs:
                del self.by_party[p]

    def page(self, from_seq: int, limit: int, party: str | None = None) -> list[LedgerRow]:
        """Rows held here with seq >= from_seq (at most `limit`); with `party`, only its."""
        base = self.base_seq
        if party is None:
            start = max(from_seq - base - 1, 0)
            return self.rows[start : start + limit]
        seqs = self.by_party.get(party, [])
        i = bisect.bisect_left(seqs, from_seq)
        return [self.rows[seq - base - 1] for seq in seqs[i : i + limit]]

    def read(self, from_seq: int, limit: int, party: str | None = None) -> ReadResult:
        """Rows with seq >= from_seq (at most `limit`); with `party`, only its rows.
        Complete only when base_seq is 0 (nothing kept elsewhere)."""
        got = self.page(from_seq, limit + 1, party)
        page = got[:limit]
        nxt = page[-1].seq + 1 if page else max(from_seq, self.last_seq + 1)
        return ReadResult(page, nxt, len(got) > limit)


def balances_page(balances: dict[str, int], after: str, limit: int
                  ) -> tuple[list[tuple[str, int]], bool]:
    """The balances of the accounts after `after` (ascending, at most `limit`), and
    whether more follow."""
    names = sorted(a for a in balances if a > after)
    return [(a, balances[a]) for a in names[:limit]], len(names) > limit


class RecentIndex:
    """The chain head and the most recent rows by (sender, tx_id), at most `capacity`
    of them (oldest forgotten first). A miss means "ask the store", never "new"."""

    def __init__(self, last_seq: int, last_hash: str, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.last_seq = last_seq
        self.last_hash = last_hash
        self.capacity = capacity
        self._recent: OrderedDict[Key, LedgerRow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recent)

    def get(self, key: Key) -> LedgerRow | None:
        return self._recent.get(key)

    def remember(self, rows: Iterable[LedgerRow]) -> None:
        """Rows known durable (found in the store), without moving the head."""
        recent = self._recent
        for row in rows:
            recent[(row.sender, row.tx_id)] = row
        while len(recent) > self.capacity:
            recent.popitem(last=False)

    def add(self, rows: list[LedgerRow]) -> None:
        """Durable rows, in seq order, continuing the chain: they become the head."""
        if rows:
            self.remember(rows)
            self.last_seq = rows[-1].seq
            self.last_hash = rows[-1].hash

    def set_head(self, last_seq: int, last_hash: str) -> None:
        self.last_seq = last_seq
        self.last_hash = last_hash
