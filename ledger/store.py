"""The CSV store: the ledger file (recovery on open, atomic batch appends) in front of a
MemoryIndex (ledger/index.py). Blocking I/O, on the event loop (ledger/server.py says why).

Rules:
- A batch is appended with write() + fsync(); its rows become visible (index, reads,
  `last_hash`) only after the fsync returned. If write or fsync fails, the file is
  truncated back to its size before the batch and fsync'd, so it is byte-for-byte what
  it was; if even that fails, the store refuses further writes (`broken`) until restart.
- On open, a last line without its newline (a torn write, never acknowledged) is cut off;
  anything else that does not parse, breaks the sequence or the hash chain makes `open`
  raise LedgerCorrupt and leaves the file untouched.
- The server (ledger/server.py) serialises batches: `resolve`, `write_durably` and
  `commit` run one batch at a time, in that order (`append_batch` does all three: the
  LedgerStorage interface of ledger/storage.py).
- A payment is named by (sender, tx_id): appends are idempotent by that pair, and two
  senders may use the same tx_id (ledger/index.py resolves them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.errors import JackPayError
from common.files import fsync_dir
from common.messages import LedgerRow, RowIn
from ledger.index import (
    LEG_PREFIX,
    Key,
    MemoryIndex,
    ReadResult,
    Resolution,
    balances_page,
    resolve,
)
from ledger.rows import HEADER_LINE, RowFormatError, check_chain, format_line, parse_line
from ledger.storage import SLOW_FSYNC_US, AppendOutcome, StoreStats, WriteFailed

__all__ = ["LEG_PREFIX", "SLOW_FSYNC_US", "LedgerCorrupt", "LedgerStore", "PreparedBatch",
           "ReadResult", "Resolution", "WriteFailed", "load_rows"]


class LedgerCorrupt(JackPayError):
    """The file cannot be trusted; the ledger will not start on it (file left untouched)."""


@dataclass(slots=True)
class PreparedBatch:
    rows: list[LedgerRow]
    data: bytes
    size_before: int


def load_rows(data: bytes, source: str) -> tuple[list[LedgerRow], int]:
    """Parse a whole ledger file. Returns (rows, length of the trusted prefix in bytes).

    A torn last line (no newline) is excluded from the prefix, and so are the extra legs
    of a payment whose main row did not make it (`_leg…` rows at the very end: a payment's
    legs are written before its main row, in one write, and acknowledged only after the
    fsync of all of them). Every other defect raises LedgerCorrupt naming the line.
    """
    if not data:
        return [], 0
    header = HEADER_LINE.encode()
    if not data.startswith(header):
        if header.startswith(data):  # torn header: the file never held a row
            return [], 0
        raise LedgerCorrupt(f"{source}: line 1 is not the ledger header {HEADER_LINE.strip()!r}")
    rows: list[LedgerRow] = []
    pos = len(header)
    lineno = 1
    prev: LedgerRow | None = None
    starts: list[int] = []  # where each row's line begins
    end = len(data)
    while pos < end:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # torn last line: never acknowledged, cut off by the caller
        lineno += 1
        raw = data[pos:nl]
        try:
            row = parse_line(raw.decode("utf-8"))
        except (UnicodeDecodeError, RowFormatError) as exc:
            raise LedgerCorrupt(f"{source}: line {lineno}: {exc}") from None
        problem = check_chain(prev, row)
        if problem is not None:
            raise LedgerCorrupt(f"{source}: line {lineno}: {problem}")
        rows.append(row)
        starts.append(pos)
        prev = row
        pos = nl + 1
    cut = len(rows)
    while cut and rows[cut - 1].tx_id.startswith(LEG_PREFIX):
        cut -= 1
    if cut < len(rows):  # a torn group: never acknowledged, cut off with it
        pos = starts[cut]
        del rows[cut:]
    return rows, pos


class LedgerStore:
    """An open ledger file with its in-memory index."""

    kind = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = MemoryIndex()
        self.fsyncs = 0
        self.batches = 0
        # How long the disk took: total and worst fsync, and how many took >= 10 ms
        # (the bench reports them per setting; a slow fsync delays its whole batch).
        self.fsync_us_total = 0
        self.fsync_us_max = 0
        self.slow_fsyncs = 0
        self.truncated_bytes = 0
        self.broken: str | None = None
        self._fd = -1
        self._size = 0

    # --- open / close --------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> LedgerStore:
        """Open (creating if needed) and recover. Raises LedgerCorrupt, OSError."""
        store = cls(path)
        store._open()
        return store

    def _open(self) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            rows, good = load_rows(data, str(self.path))
            if good < len(data):
                # Only a torn tail gets here (load_rows raises on anything else).
                os.ftruncate(fd, good)
                os.fsync(fd)
                self.truncated_bytes = len(data) - good
            if good == 0:
                os.ftruncate(fd, 0)
                os.write(fd, HEADER_LINE.encode())
                os.fsync(fd)
                good = len(HEADER_LINE.encode())
            if created:
                fsync_dir(self.path.resolve().parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = good
        self.index = MemoryIndex(rows)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def aclose(self) -> None:
        self.close()

    # --- queries -------------------------------------------------------------------

    @property
    def rows(self) -> list[LedgerRow]:
        return self.index.rows

    @property
    def by_tx(self) -> dict[tuple[str, str], LedgerRow]:
        return self.index.by_tx

    @property
    def last_seq(self) -> int:
        return self.index.last_seq

    @property
    def last_hash(self) -> str:
        return self.index.last_hash

    def read(self, from_seq: int, limit: int, party: str | None = None) -> ReadResult:
        """Rows with seq >= from_seq (at most `limit`); with `party`, only its rows."""
        return self.index.read(from_seq, limit, party)

    async def read_rows(self, from_seq: int, limit: int, party: str | None) -> ReadResult:
        return self.index.read(from_seq, limit, party)

    async def lookup(self, keys: Iterable[Key]) -> dict[Key, LedgerRow]:
        by_tx = self.index.by_tx
        return {k: row for k in keys if (row := by_tx.get(k)) is not None}

    async def balances_page(self, after: str, limit: int) -> tuple[list[tuple[str, int]], bool]:
        return balances_page(self.index.balances, after, limit)

    def statistics(self) -> StoreStats:
        return StoreStats(rows=self.last_seq, fsyncs=self.fsyncs, batches=self.batches,
                          fsync_us_total=self.fsync_us_total, fsync_us_max=self.fsync_us_max,
                          slow_fsyncs=self.slow_fsyncs)

    # --- appends -------------------------------------------------------------------

    def resolve(self, requests: list[list[RowIn]], dtg: str,
                atomic: list[bool] | None = None) -> tuple[list[Resolution], PreparedBatch]:
        """Decide each row of a group of append requests (ledger.index.resolve) and
        serialise the new ones. Pure with respect to the file: nothing is written and the
        index is not changed."""
        index = self.index
        resolutions, new_rows = resolve(requests, dtg, atomic, last_seq=index.last_seq,
                                        last_hash=index.last_hash, lookup=index.by_tx.get)
        data = "".join(format_line(r) for r in new_rows).encode()
        return resolutions, PreparedBatch(new_rows, data, self._size)

    async def append_batch(self, requests: list[list[RowIn]], dtg: str,
                           atomic: list[bool] | None) -> AppendOutcome:
        """resolve → write_durably → commit, blocking on the event loop (no await)."""
        resolutions, prepared = self.resolve(requests, dtg, atomic)
        if not prepared.rows:
            return AppendOutcome(resolutions)
        try:
            us = self.write_durably(prepared)
        except WriteFailed as exc:
            return AppendOutcome(resolutions, failure=str(exc))
        self.commit(prepared)
        return AppendOutcome(resolutions, prepared.rows, durable_us=us)

    def write_durably(self, batch: PreparedBatch) -> int:
        """write + fsync (blocking); returns how long the fsync took, in microseconds (0:
        nothing to write). On failure: restore and raise WriteFailed."""
        if self.broken:
            raise WriteFailed(self.broken)
        if not batch.data:
            return 0
        try:
            view = memoryview(batch.data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            t0 = time.perf_counter_ns()
            os.fsync(self._fd)
            us = (time.perf_counter_ns() - t0) // 1000
            self.fsyncs += 1
            self.fsync_us_total += us
            if us > self.fsync_us_max:
                self.fsync_us_max = us
            if us >= SLOW_FSYNC_US:
                self.slow_fsyncs += 1
        except OSError as exc:
            reason = f"write to {self.path} failed: {exc.strerror or exc}"
            try:
                os.ftruncate(self._fd, batch.size_before)
                os.fsync(self._fd)
            except OSError as exc2:
                self.broken = (f"{reason}; restoring the file also failed ({exc2.strerror}); "
                               "refusing writes until restart")
                raise WriteFailed(self.broken) from exc2
            raise WriteFailed(reason) from exc
        return us

    def commit(self, batch: PreparedBatch) -> None:
        """Make a durably written batch visible. Call only after write_durably returned."""
        self._size = batch.size_before + len(batch.data)
        self.batches += 1
        self.index.add(batch.rows)
