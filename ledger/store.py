"""The CSV store: the ledger file (recovery on open, atomic batch appends), its index on
disk (ledger/csvindex.py: balances, (sender, tx_id) -> row, rows by seq and by party, the
chain head) and, in memory, the rows the index does not hold yet (ledger/index.py's
MemoryIndex). Blocking I/O, on the event loop (ledger/server.py says why); the index is
written on its own thread.

Rules:
- A batch is appended with write() + fsync(); its rows become visible (index, reads,
  `last_hash`) only after the fsync returned. If write or fsync fails, the file is
  truncated back to its size before the batch and fsync'd, so it is byte-for-byte what
  it was; if even that fails, the store refuses further writes (`broken`) until restart.
- On open, only the rows after the index's head are read (csvindex.py says how the head
  is checked against the file); with no usable index, the whole file is read and the
  index rebuilt. A last line without its newline (a torn write, never acknowledged) is
  cut off; anything else read that does not parse, breaks the sequence or the hash chain
  makes `open` raise LedgerCorrupt and leaves the file untouched. Rows before the head
  are checked by `jackpay-ledger verify`, not at every start.
- The server (ledger/server.py) serialises batches: `resolve`, `write_durably` and
  `commit` run one batch at a time, in that order (`append_batch` does all three: the
  LedgerStorage interface of ledger/storage.py).
- A payment is named by (sender, tx_id): appends are idempotent by that pair, and two
  senders may use the same tx_id (ledger/index.py resolves them).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from common.errors import JackPayError
from common.files import fsync_dir, write_all
from common.logs import log_event
from common.messages import LedgerRow, RowIn
from ledger.csvindex import (
    EMPTY_HEAD,
    Head,
    IndexDb,
    IndexWriter,
    index_path,
    index_rows,
    key_hash,
    remove_index,
)
from ledger.index import (
    LEG_PREFIX,
    Key,
    MemoryIndex,
    ReadResult,
    Resolution,
    balances_page,
    request_keys,
    resolve,
)
from ledger.rows import (
    GENESIS_HASH,
    HEADER_LINE,
    HEADER_V1_LINE,
    RowFormatError,
    check_link,
    format_line,
    parse_line,
)
from ledger.storage import SLOW_FSYNC_US, AppendOutcome, Fenced, StoreStats, WriteFailed

__all__ = ["LEG_PREFIX", "SLOW_FSYNC_US", "IndexUnavailable", "LedgerCorrupt", "LedgerStore", "PreparedBatch",
           "ReadResult", "Resolution", "WriteFailed", "load_rows"]


log = logging.getLogger("jackpay.ledger")

HEADERS = (HEADER_LINE.encode(), HEADER_V1_LINE.encode())  # new files get the first

CHUNK_BYTES = 32 * 1024 * 1024  # read at a time when the open parses the file's tail
# No row's line is longer (a 256-character memo of control characters is 1,536 bytes).
MAX_LINE_BYTES = 8192


class LedgerCorrupt(JackPayError):
    """The file cannot be trusted; the ledger will not start on it (file left untouched)."""


class LedgerInUse(JackPayError):
    """Another process holds the file: two writers would interleave their rows."""


class IndexUnavailable(JackPayError):
    """The index beside the file cannot be opened or written (the file is untouched)."""


@dataclass(slots=True)
class PreparedBatch:
    rows: list[LedgerRow]
    data: bytes
    size_before: int
    positions: list[int]  # where each row's line starts in the file


def scan_lines(data: bytes, pos: int, prev_seq: int, prev_hash: str, source: str
               ) -> tuple[list[LedgerRow], list[int], int]:
    """The rows of the complete lines of data[pos:], chained onto (prev_seq, prev_hash):
    (rows, where each line starts, where the first incomplete line starts). Raises
    LedgerCorrupt naming the line (line 1 is the header, so row seq k is on line k + 1)."""
    rows: list[LedgerRow] = []
    starts: list[int] = []
    end = len(data)
    while pos < end:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            row = parse_line(data[pos:nl].decode("utf-8"))
        except (UnicodeDecodeError, RowFormatError) as exc:
            raise LedgerCorrupt(f"{source}: line {prev_seq + 2}: {exc}") from None
        problem = check_link(prev_seq, prev_hash, row)
        if problem is not None:
            raise LedgerCorrupt(f"{source}: line {prev_seq + 2}: {problem}")
        rows.append(row)
        starts.append(pos)
        prev_seq, prev_hash = row.seq, row.hash
        pos = nl + 1
    return rows, starts, pos


def _index_chunk(db: IndexDb, rows: list[LedgerRow], starts: list[int], end: int) -> None:
    index_rows(db, [(rows, starts, end)])


def _torn_group(rows: list[LedgerRow]) -> int:
    """Where the trailing extra legs of a payment whose main row is missing begin."""
    cut = len(rows)
    while cut and rows[cut - 1].tx_id.startswith(LEG_PREFIX):
        cut -= 1
    return cut


def load_rows(data: bytes, source: str) -> tuple[list[LedgerRow], int]:
    """Parse a whole ledger file. Returns (rows, length of the trusted prefix in bytes).

    A torn last line (no newline) is excluded from the prefix, and so are the extra legs
    of a payment whose main row did not make it (`_leg…` rows at the very end: a payment's
    legs are written before its main row, in one write, and acknowledged only after the
    fsync of all of them). Every other defect raises LedgerCorrupt naming the line.
    """
    if not data:
        return [], 0
    header = next((h for h in HEADERS if data.startswith(h)), None)
    if header is None:
        if any(h.startswith(data) for h in HEADERS):  # torn header: never held a row
            return [], 0
        raise LedgerCorrupt(f"{source}: line 1 is not the ledger header {HEADER_LINE.strip()!r}")
    rows, starts, pos = scan_lines(data, len(header), 0, GENESIS_HASH, source)
    cut = _torn_group(rows)
    if cut < len(rows):  # a torn group: never acknowledged, cut off with it
        pos = starts[cut]
        del rows[cut:]
    return rows, pos


class LedgerStore:
    """An open ledger file, its index on disk (ledger/csvindex.py) and, in memory, the
    rows the index does not hold yet."""

    kind = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mem = MemoryIndex()
        self.fsyncs = 0
        self.batches = 0
        # How long the disk took: total and worst fsync, and how many took >= 10 ms
        # (the bench reports them per setting; a slow fsync delays its whole batch).
        self.fsync_us_total = 0
        self.fsync_us_max = 0
        self.slow_fsyncs = 0
        self.truncated_bytes = 0
        self.rebuilt: str | None = None  # why the index was rebuilt at open, if it was
        self.index_unavailable: str | None = None  # why every row is kept in memory
        self.index_damaged: str | None = None  # found damaged while serving: stop writing
        self.on_fenced: Callable[[str], None] | None = None  # set by the server
        self.rows_read_at_open = 0  # rows parsed at open (the tail after the index's head)
        self.broken: str | None = None
        self._fd = -1
        self._size = 0
        self._base_size = 0  # bytes of the file through mem.base_seq
        self._empty = EMPTY_HEAD  # the head before any row (its size: the file's header)
        self._reader: IndexDb | None = None
        self._writer: IndexWriter | None = None

    # --- open / close --------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> LedgerStore:
        """Open (creating if needed), lock and recover. Raises LedgerInUse, LedgerCorrupt,
        OSError."""
        store = cls(path)
        store._open()
        return store

    def _open(self) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # Held until the process closes the file (or dies): one writer per file.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerInUse(f"{self.path} is held by another ledger process (two writers "
                              "would interleave their rows and break the chain); stop it "
                              "first, or give this one a file of its own") from None
        except OSError as exc:  # a file system without locks (some NFS, FUSE)
            os.close(fd)
            raise LedgerInUse(f"{self.path} cannot be locked ({exc.strerror or exc}): the "
                              "ledger needs a file system with flock, so that no second "
                              "writer can open it") from None
        db: IndexDb | None = None
        reader: IndexDb | None = None
        try:
            size = self._check_header(fd)
            # The rows read below may have been written by a process that died before
            # their fsync: make them durable before anything is answered from them.
            os.fsync(fd)
            try:
                head, good, db, reader, balances = self._open_with_index(fd, size)
                rows: list[LedgerRow] = []
            except IndexUnavailable as exc:
                self.index_unavailable = str(exc)
                log_event(log, "no index: reading the whole file into memory (a slow start, "
                          "and memory grows with the ledger)", logging.WARNING, why=str(exc))
                rows = []
                self.rows_read_at_open = 0
                _, good = self._read_tail(fd, self._empty,
                                          lambda chunk, _s, _e: rows.extend(chunk))
                head, balances = self._empty, None
            if good < size:
                # Only a torn tail gets here (scan_lines raises on anything else).
                os.ftruncate(fd, good)
                os.fsync(fd)
                self.truncated_bytes = size - good
            if created:
                fsync_dir(self.path.resolve().parent)
        except BaseException:
            self._close(reader, db)
            os.close(fd)
            raise
        self._fd = fd
        self._size = self._base_size = good
        self._reader = reader
        self.mem = MemoryIndex(rows, base_seq=head.seq, base_hash=head.hash, balances=balances)
        if db is not None:
            self._writer = IndexWriter(db, head)

    def _open_with_index(self, fd: int, size: int
                         ) -> tuple[Head, int, IndexDb, IndexDb, dict[str, int]]:
        """Check the index against the file and index the rows after its head. Returns the
        head, the trusted length of the file, the writer's and the reader's connections,
        and the balances. An index found damaged on the way is deleted and rebuilt once.
        Raises IndexUnavailable when the index cannot be opened or written."""
        for attempt in (1, 2):
            db = self._open_index()
            reader: IndexDb | None = None
            try:
                head = self._usable_head(fd, size, db)
                if self.rebuilt:
                    log_event(log, "rebuilding the ledger's index from the whole file",
                              logging.WARNING, path=str(self.path), why=self.rebuilt,
                              bytes=size)
                head, good = self._read_tail(fd, head, functools.partial(_index_chunk, db))
                reader = IndexDb(db.path)
                return head, good, db, reader, reader.balances()
            except sqlite3.OperationalError as exc:  # cannot write there, locked, disk full
                self._close(db, reader)
                raise IndexUnavailable(f"cannot write the index {db.path}: {exc}") from exc
            except sqlite3.DatabaseError as exc:  # damaged, found once a page was read
                self._close(db, reader)
                if attempt == 2:
                    raise IndexUnavailable(f"the rebuilt index {db.path} is damaged: "
                                           f"{exc}") from exc
                self.rebuilt = f"the index {db.path} is damaged ({exc})"
                self.rows_read_at_open = 0
                remove_index(self.path)
            except BaseException:
                self._close(db, reader)
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _close(*conns: IndexDb | None) -> None:
        for conn in conns:
            if conn is not None:
                conn.close()

    def _check_header(self, fd: int) -> int:
        """The file's size once it starts with a header (written if the file is new or
        its header torn); sets `_empty` (the head before any row). A file begun before
        signed payments keeps its shorter header. Raises LedgerCorrupt if the file starts
        with something else."""
        size = os.fstat(fd).st_size
        first = os.pread(fd, len(HEADERS[0]), 0)
        for header in HEADERS:
            if first.startswith(header):
                self._empty = Head(0, len(header), GENESIS_HASH)
                return size
        header = HEADERS[0]
        if size <= len(header) and any(h.startswith(first) for h in HEADERS):  # no row yet
            os.ftruncate(fd, 0)
            os.write(fd, header)
            os.fsync(fd)
            self._empty = Head(0, len(header), GENESIS_HASH)
            return len(header)
        raise LedgerCorrupt(f"{self.path}: line 1 is not the ledger header "
                            f"{HEADER_LINE.strip()!r}")

    def _open_index(self) -> IndexDb:
        where = index_path(self.path)
        try:
            return IndexDb.open(where, any_thread=True)
        except sqlite3.OperationalError as exc:  # cannot write there, locked, I/O error
            raise IndexUnavailable(f"cannot open the index {where}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database: damaged, rebuilt below
            self.rebuilt = f"the index {where} could not be read ({exc})"
        remove_index(self.path)
        try:
            return IndexDb.open(where, any_thread=True)
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"cannot create the index {where}: {exc}") from exc

    def _usable_head(self, fd: int, size: int, db: IndexDb) -> Head:
        """The index's head if it describes this file; else the index is emptied."""
        head = db.head()
        if head.seq == 0:
            if not db.is_empty():  # rows without a head: a damaged index
                self.rebuilt = self.rebuilt or "the index holds rows but names none"
                db.clear()
            return self._empty
        why = (f"the index names row {head.seq} ending at byte {head.size}, which this file "
               "does not have (another file, or an older copy restored)")
        fits = head.seq > 0 and self._empty.size < head.size <= size
        row = self._row_ending_at(fd, head.size) if fits else None
        if row is not None and (row.seq, row.hash) == (head.seq, head.hash):
            problem = db.inconsistency(head, row)
            if problem is None:
                return head
            why = f"the index contradicts itself: {problem}"
        self.rebuilt = self.rebuilt or why
        db.clear()
        return self._empty

    @staticmethod
    def _row_ending_at(fd: int, end: int) -> LedgerRow | None:
        start = max(0, end - MAX_LINE_BYTES)
        data = os.pread(fd, end - start, start)
        if not data.endswith(b"\n"):
            return None
        i = data.rfind(b"\n", 0, len(data) - 1)
        if i < 0:
            return None
        try:
            return parse_line(data[i + 1 : -1].decode("utf-8"))
        except (UnicodeDecodeError, RowFormatError):
            return None

    def _read_tail(self, fd: int, head: Head,
                   sink: Callable[[list[LedgerRow], list[int], int], object]) -> tuple[Head, int]:
        """Parse and chain-check the rows after `head`, chunk by chunk, and give each
        chunk to `sink` (rows, where their lines start, where the chunk ends). Returns the
        head after the last row and the length of the trusted prefix of the file."""
        pos = head.size
        held: list[LedgerRow] = []  # trailing legs, passed on once their main row is read
        held_starts: list[int] = []
        source = str(self.path)
        while True:
            data = os.pread(fd, CHUNK_BYTES, pos)
            prev = held[-1] if held else None
            prev_seq, prev_hash = (prev.seq, prev.hash) if prev else (head.seq, head.hash)
            rows, starts, used = scan_lines(data, 0, prev_seq, prev_hash, source)
            if not rows:
                break  # the end, or a torn last line
            rows = held + rows
            starts = held_starts + [pos + s for s in starts]
            pos += used
            cut = _torn_group(rows)
            held, held_starts = rows[cut:], starts[cut:]
            if cut:
                end = held_starts[0] if held else pos
                self.rows_read_at_open += cut
                sink(rows[:cut], starts[:cut], end)
                head = Head(rows[cut - 1].seq, end, rows[cut - 1].hash)
        return head, head.size

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def aclose(self) -> None:
        self.close()

    # --- the index on disk ------------------------------------------------------------

    def _follow_index(self) -> None:
        """Forget from memory the rows the index on disk has committed."""
        if self._writer is None:
            return
        committed = self._writer.committed
        if committed.seq > self.mem.base_seq:
            self.mem.forget_through(committed.seq)
            self._base_size = committed.size

    def flush_index(self) -> None:
        """Wait until the index on disk holds every row (tests, a clean stop)."""
        if self._writer is not None:
            self._writer.flush()
        self._follow_index()

    @property
    def index_failed(self) -> str | None:
        return self._writer.failed if self._writer is not None else None

    def _row_at(self, seq: int, pos: int) -> LedgerRow:
        """Row `seq`, at byte `pos` of the file as the index says. Another row there
        means the index is damaged (Fenced): it must never answer with the wrong row."""
        data = os.pread(self._fd, MAX_LINE_BYTES, pos)
        nl = data.find(b"\n")
        if nl < 0:
            raise LedgerCorrupt(f"{self.path}: no row at byte {pos}, where the index has one")
        try:
            row = parse_line(data[:nl].decode("utf-8"))
        except (UnicodeDecodeError, RowFormatError) as exc:
            raise LedgerCorrupt(f"{self.path}: byte {pos}: {exc}") from None
        if row.seq != seq:
            self._index_damaged(f"it puts row {seq} at byte {pos}, where row {row.seq} is")
        return row

    def _find_on_disk(self, keys: list[Key]) -> dict[Key, LedgerRow]:
        """The rows of these keys among those only the index on disk holds."""
        through = self.mem.base_seq
        if not keys or through == 0 or self._reader is None:
            return {}
        wanted: dict[int, list[Key]] = {}
        for k in keys:
            wanted.setdefault(key_hash(*k), []).append(k)
        found: dict[Key, LedgerRow] = {}
        try:
            candidates = self._reader.candidates(list(wanted), through)
        except sqlite3.DatabaseError as exc:
            self._index_damaged(str(exc), exc)
        for h, seq, pos in candidates:
            row = self._row_at(seq, pos)
            key = (row.sender, row.tx_id)
            if key in wanted[h]:  # else another key with the same 64-bit hash
                found[key] = row
        return found

    def _index_damaged(self, what: str, exc: BaseException | None = None) -> NoReturn:
        """The index failed while serving: it cannot be trusted for anything now. It is
        deleted (the next start rebuilds it from the file) and this service stops writing
        (exit 3): a lookup that cannot be answered could let a payment in twice."""
        reason = (f"the ledger's index {index_path(self.path)} is damaged ({what}); it was "
                  "deleted and is rebuilt from the file at the next start: restart the ledger")
        if self.index_damaged is None:
            self.index_damaged = reason
            remove_index(self.path)
            log_event(log, "index damaged", logging.ERROR, reason=reason)
            if self.on_fenced is not None:
                self.on_fenced(reason)
        raise Fenced(reason) from exc

    def _read_disk(self, from_seq: int, limit: int, party: str | None) -> list[LedgerRow]:
        try:
            return self._read_disk_pages(from_seq, limit, party)
        except sqlite3.DatabaseError as exc:
            self._index_damaged(str(exc), exc)

    def _read_disk_pages(self, from_seq: int, limit: int, party: str | None) -> list[LedgerRow]:
        through = self.mem.base_seq
        assert self._reader is not None
        if party is not None:
            return [self._row_at(seq, pos) for seq, pos in
                    self._reader.party_positions(party, from_seq, limit, through)]
        places = self._reader.positions(from_seq, limit + 1, through)
        if not places:
            return []
        end = places[limit][1] if len(places) > limit else self._base_size
        start = places[0][1]
        rows = []
        for line in os.pread(self._fd, end - start, start).split(b"\n")[:-1]:
            try:
                rows.append(parse_line(line.decode("utf-8")))
            except (UnicodeDecodeError, RowFormatError) as exc:
                raise LedgerCorrupt(f"{self.path}: {exc}") from None
        want = [seq for seq, _ in places[:limit]]
        if [r.seq for r in rows[:limit]] != want:
            self._index_damaged(f"its positions of rows {want[0]}..{want[-1]} do not hold "
                                "those rows")
        return rows[:limit]

    # --- queries -------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.mem.last_seq

    @property
    def last_hash(self) -> str:
        return self.mem.last_hash

    @property
    def balances(self) -> dict[str, int]:
        return self.mem.balances

    def read(self, from_seq: int, limit: int, party: str | None = None) -> ReadResult:
        """Rows with seq >= from_seq (at most `limit`); with `party`, only its rows."""
        self._follow_index()
        base = self.mem.base_seq
        rows: list[LedgerRow] = []
        if from_seq <= base:
            rows = self._read_disk(from_seq, limit + 1, party)
        if len(rows) <= limit:
            rows += self.mem.page(max(from_seq, base + 1), limit + 1 - len(rows), party)
        page = rows[:limit]
        nxt = page[-1].seq + 1 if page else max(from_seq, self.last_seq + 1)
        return ReadResult(page, nxt, len(rows) > limit)

    async def read_rows(self, from_seq: int, limit: int, party: str | None) -> ReadResult:
        return self.read(from_seq, limit, party)

    def lookup_now(self, keys: Iterable[Key]) -> dict[Key, LedgerRow]:
        self._follow_index()
        by_tx = self.mem.by_tx
        found: dict[Key, LedgerRow] = {}
        missing: list[Key] = []
        for k in keys:
            row = by_tx.get(k)
            if row is not None:
                found[k] = row
            else:
                missing.append(k)
        found.update(self._find_on_disk(missing))
        return found

    async def lookup(self, keys: Iterable[Key]) -> dict[Key, LedgerRow]:
        return self.lookup_now(keys)

    async def balances_page(self, after: str, limit: int) -> tuple[list[tuple[str, int]], bool]:
        return balances_page(self.mem.balances, after, limit)

    def statistics(self) -> StoreStats:
        return StoreStats(rows=self.last_seq, fsyncs=self.fsyncs, batches=self.batches,
                          fsync_us_total=self.fsync_us_total, fsync_us_max=self.fsync_us_max,
                          slow_fsyncs=self.slow_fsyncs,
                          index_ok=(self.index_unavailable is None and self.index_failed is None
                                    and self.index_damaged is None),
                          rows_in_memory=self.last_seq - self.mem.base_seq)

    # --- appends -------------------------------------------------------------------

    def resolve(self, requests: list[list[RowIn]], dtg: str,
                atomic: list[bool] | None = None) -> tuple[list[Resolution], PreparedBatch]:
        """Decide each row of a group of append requests (ledger.index.resolve) and
        serialise the new ones. Pure with respect to the file: nothing is written and the
        index is not changed."""
        known = self.lookup_now(request_keys(requests))
        mem = self.mem
        resolutions, new_rows = resolve(requests, dtg, atomic, last_seq=mem.last_seq,
                                        last_hash=mem.last_hash, lookup=known.get)
        lines = [format_line(r).encode() for r in new_rows]
        positions = []
        pos = self._size
        for line in lines:
            positions.append(pos)
            pos += len(line)
        return resolutions, PreparedBatch(new_rows, b"".join(lines), self._size, positions)

    async def append_batch(self, requests: list[list[RowIn]], dtg: str,
                           atomic: list[bool] | None) -> AppendOutcome:
        """resolve → write_durably → commit, blocking on the event loop (no await).
        Raises Fenced when the index was found damaged."""
        if self.index_damaged is not None:
            raise Fenced(self.index_damaged)
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
            write_all(self._fd, batch.data)
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
        self.mem.add(batch.rows)
        if self._writer is not None and batch.rows:
            self._writer.submit(batch.rows, batch.positions, self._size)
