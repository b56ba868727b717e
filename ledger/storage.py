"""What the ledger service needs of a store, whichever it is (DESIGN §6a).

A store is a pure index (ledger/index.py: idempotency by (sender, tx_id), the chain head,
reads) in front of a durable log: the CSV file (ledger/store.py, the default) or a
PostgreSQL table (ledger/pgstore.py). `[ledger] store` in the config picks one; the
router and the wire protocol do not know which runs.

Rules every store keeps:
- `append_batch` resolves a batch against the durable rows, makes the new rows durable
  as one unit (all or none), and only then lets them be seen (index, reads, head).
  Batches are strictly sequential (the chain needs the previous hash): the server awaits
  one before it starts the next.
- A batch that could not be made durable is reported in `AppendOutcome.failure`, and
  only once the store *knows* it is not there: an error at or around a commit is in
  doubt and resolved by asking the log, never guessed.
- `Fenced`: another ledger service took the log over; this one must stop writing.
- The same payments give byte-identical rows and hashes in every store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from common.errors import JackPayError
from common.messages import LedgerRow, RowIn
from ledger.index import Key, ReadResult, Resolution

# A durable write (an fsync, a commit) at least this long is counted as slow.
SLOW_FSYNC_US = 10_000


class WriteFailed(JackPayError):
    """A batch could not be made durable and is known not to be (the log is as before)."""


class Fenced(JackPayError):
    """This service must not write again: a newer ledger service holds the log (its
    fencing epoch is higher), or rows it acknowledged are missing from the log. With
    `in_doubt`, it was found while settling a batch whose outcome is unknown: that batch
    must not be answered "not written" (its requesters re-send to the next service)."""

    def __init__(self, message: str, *, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt


@dataclass(slots=True)
class AppendOutcome:
    resolutions: list[Resolution]
    written: list[LedgerRow] = field(default_factory=list)  # durable and visible now
    failure: str | None = None  # the batch's new rows are not in the ledger; why
    durable_us: int = 0  # how long the fsync / commit took


@dataclass(slots=True)
class StoreStats:
    rows: int
    fsyncs: int  # durable writes: fsyncs of the file, commits of the database
    batches: int
    fsync_us_total: int
    fsync_us_max: int
    slow_fsyncs: int
    # The CSV store's derived index (ledger/csvindex.py): False once it could not be
    # written (rows then stay in memory until a restart rebuilds it); and how many rows
    # the memory holds beyond it. Always True / 0 for PostgreSQL.
    index_ok: bool = True
    rows_in_memory: int = 0


class LedgerStorage(Protocol):
    """The store behind a ledger service."""

    kind: str  # "csv" | "postgresql"
    # Told (by the store, between appends) that it must not be written again: the index
    # found damaged, acknowledged rows missing after a failover. Set by the server.
    on_fenced: Callable[[str], None] | None

    @property
    def last_seq(self) -> int: ...

    @property
    def last_hash(self) -> str: ...

    async def append_batch(self, requests: list[list[RowIn]], dtg: str,
                           atomic: list[bool] | None) -> AppendOutcome:
        """Resolve and write one batch. Raises Fenced; every other failure is an outcome."""
        ...

    async def read_rows(self, from_seq: int, limit: int, party: str | None) -> ReadResult: ...

    async def lookup(self, keys: Iterable[Key]) -> dict[Key, LedgerRow]:
        """The durable rows of these (sender, tx_id) keys."""
        ...

    async def balances_page(self, after: str, limit: int) -> tuple[list[tuple[str, int]], bool]:
        """Balances after the head, of the accounts after `after` (ascending, at most
        `limit`), and whether more follow."""
        ...

    def statistics(self) -> StoreStats: ...

    async def aclose(self) -> None: ...
