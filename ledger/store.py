"""The ledger file: recovery on open, atomic batch appends, the tx_id index. Blocking I/O.

Rules:
- A batch is appended with write() + fsync(); its rows become visible (index, reads,
  `last_hash`) only after the fsync returned. If write or fsync fails, the file is
  truncated back to its size before the batch and fsync'd, so it is byte-for-byte what
  it was; if even that fails, the store refuses further writes (`broken`) until restart.
- On open, a last line without its newline (a torn write, never acknowledged) is cut off;
  anything else that does not parse, breaks the sequence or the hash chain makes `open`
  raise LedgerCorrupt and leaves the file untouched.
- The server (ledger/server.py) serialises batches: `resolve`, `write_durably` and
  `commit` run one batch at a time, in that order.
- A payment is named by (sender, tx_id): appends are idempotent by that pair, and two
  senders may use the same tx_id.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import JackPayError
from common.messages import LedgerRow, RowIn
from ledger.rows import (
    GENESIS_HASH,
    HEADER_LINE,
    RowFormatError,
    check_chain,
    format_line,
    make_row,
    parse_line,
    same_payment,
)

# The tx_ids of a payment's extra legs start so (router.payment_core.leg_tx_id).
LEG_PREFIX = "_leg"

# An fsync at least this long is counted as slow (`slow_fsyncs` in the `stats` reply).
SLOW_FSYNC_US = 10_000


class LedgerCorrupt(JackPayError):
    """The file cannot be trusted; the ledger will not start on it (file left untouched)."""


class WriteFailed(JackPayError):
    """A batch could not be made durable; the file was restored to its previous size."""


@dataclass(slots=True)
class Resolution:
    """What an append request's rows turned into, before the batch is written."""

    status: list[str] = field(default_factory=list)  # written | duplicate | conflict
    rows: list[LedgerRow] = field(default_factory=list)


@dataclass(slots=True)
class PreparedBatch:
    rows: list[LedgerRow]
    data: bytes
    size_before: int


@dataclass(slots=True)
class ReadResult:
    rows: list[LedgerRow]
    next_seq: int
    more: bool = False  # rows (of the party, if one was given) exist from next_seq on


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[LedgerRow] = []
        self.by_tx: dict[tuple[str, str], LedgerRow] = {}  # by (sender, tx_id)
        # seqs of the rows each account sent or received, ascending: `read(party=…)` is
        # a binary search, not a scan of the whole ledger on the event loop.
        self.by_party: dict[str, list[int]] = {}
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
        self.rows = rows
        self.by_tx = {(r.sender, r.tx_id): r for r in rows}
        for r in rows:
            self._index_party(r)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # --- queries -------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return len(self.rows)

    @property
    def last_hash(self) -> str:
        return self.rows[-1].hash if self.rows else GENESIS_HASH

    def read(self, from_seq: int, limit: int, party: str | None = None) -> ReadResult:
        """Rows with seq >= from_seq (at most `limit`); with `party`, only its rows."""
        start = from_seq - 1
        if party is None:
            page = self.rows[start : start + limit]
            return ReadResult(page, from_seq + len(page), from_seq + len(page) <= self.last_seq)
        seqs = self.by_party.get(party, [])
        i = bisect.bisect_left(seqs, from_seq)
        page = [self.rows[seq - 1] for seq in seqs[i : i + limit]]
        return ReadResult(page, page[-1].seq + 1 if page else max(from_seq, self.last_seq + 1),
                          i + len(page) < len(seqs))

    def _index_party(self, row: LedgerRow) -> None:
        self.by_party.setdefault(row.sender, []).append(row.seq)
        if row.receiver != row.sender:
            self.by_party.setdefault(row.receiver, []).append(row.seq)

    # --- appends -------------------------------------------------------------------

    def resolve(self, requests: list[list[RowIn]], dtg: str,
                atomic: list[bool] | None = None) -> tuple[list[Resolution], PreparedBatch]:
        """Decide each row of a group of append requests and serialise the new ones.

        Pure with respect to the file: nothing is written and the index is not changed.
        A (sender, tx_id) repeated inside the group resolves against its first occurrence.
        An atomic request (one payment's legs) is all or nothing: a conflict on one row,
        or some rows new and others already there, answers every row `conflict` and
        writes none of them.
        """
        new_rows: list[LedgerRow] = []
        pending: dict[tuple[str, str], LedgerRow] = {}
        prev_hash = self.last_hash
        seq = self.last_seq
        resolutions = []
        for i, rows_in in enumerate(requests):
            if atomic is not None and atomic[i]:
                mark = (len(new_rows), seq, prev_hash)
            else:
                mark = None
            res = Resolution()
            for r in rows_in:
                key = (r.sender, r.tx_id)
                existing = self.by_tx.get(key) or pending.get(key)
                if existing is not None:
                    same = same_payment(existing, r.sender, r.receiver, r.amount, r.memo)
                    res.status.append("duplicate" if same else "conflict")
                    res.rows.append(existing)
                    continue
                seq += 1
                row = make_row(prev_hash, seq, dtg, r.sender, r.receiver, r.amount, r.tx_id, r.memo)
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
        data = "".join(format_line(r) for r in new_rows).encode()
        return resolutions, PreparedBatch(new_rows, data, self._size)

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
        for row in batch.rows:
            self.rows.append(row)
            self.by_tx[(row.sender, row.tx_id)] = row
            self._index_party(row)
