"""The CSV store's index on disk: what lets the ledger start without reading its whole
file (DESIGN §6a). An SQLite database beside the file, `<file>.index` (stdlib sqlite3).

Rules:
- The file is the truth; the index is derived from it. Deleting the index is always
  safe: the next start rebuilds it from the whole file (and says so).
- The index holds rows 1..`head.seq` exactly, and the head: that row's seq and hash and
  the size of the file through it. It learns rows only after they are durable in the
  file, so it never names a row the file might not have.
- At open (`LedgerStore.open`), the head is checked against the file: the line that ends
  at `head.size` must be row `head.seq` with hash `head.hash`. If it is not (another file,
  an older copy restored, the index damaged), the index is thrown away and rebuilt. The
  rows after the head (the tail) are parsed and chain-checked from the head on and
  indexed before the ledger serves. A full check of the whole file stays `verify`'s job.
- A payment is found by a 64-bit hash of (sender, tx_id); every hit is confirmed by
  reading the row from the file, so a hash collision costs a read, never a wrong answer.
- Balances are kept per account, in the same transaction as the rows they come from.
- While serving, `IndexWriter` adds rows on its own thread (sqlite3 releases the GIL
  while it works) and commits at most every COMMIT_EVERY_S seconds or COMMIT_EVERY_ROWS
  rows; the store keeps rows in memory until a commit has them (ledger/store.py). The
  index does not fsync (WAL, synchronous=NORMAL): a crash may cost its last commits,
  which the next start re-indexes from the file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.logs import log_event
from common.messages import LedgerRow
from ledger.rows import GENESIS_HASH, HEADER_LINE

log = logging.getLogger("jackpay.ledger")

FORMAT_VERSION = 2
COMMIT_EVERY_S = 1.0
COMMIT_EVERY_ROWS = 50_000
DRAIN_EVERY_S = 0.05  # the writer thread takes the rows submitted since, this often
_IN_CHUNK = 400  # keys per `IN (...)` query, under SQLite's parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    version INTEGER NOT NULL, seq INTEGER NOT NULL, size INTEGER NOT NULL, hash TEXT NOT NULL,
    -- sum over accounts of balance * (a 64-bit hash of the name), mod 2**64: kept with
    -- every commit, recomputed at open (`inconsistency`), so balances wrong in ways that
    -- cancel out are caught too
    balance_check INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (seq INTEGER PRIMARY KEY, pos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (key INTEGER NOT NULL, seq INTEGER NOT NULL,
                                 PRIMARY KEY (key, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                                     balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS party (account INTEGER NOT NULL, seq INTEGER NOT NULL,
                                  PRIMARY KEY (account, seq)) WITHOUT ROWID;
"""
_TABLES = ("head", "rows", "keys", "accounts", "party")


def index_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".index")


def remove_index(ledger_path: Path) -> None:
    """Delete the index of this ledger file (it is rebuilt from the file at the next open)."""
    where = index_path(ledger_path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{where}{suffix}").unlink(missing_ok=True)


class IndexOfAnotherVersion(sqlite3.DatabaseError):
    """The index was written by another version of this module: rebuilt, never read."""


@functools.lru_cache(maxsize=65536)
def _name_hash(name: str) -> int:
    return key_hash(name, "")


def _wrap(n: int) -> int:
    """`n` mod 2**64, as the signed 64-bit integer SQLite stores."""
    n &= (1 << 64) - 1
    return n - (1 << 64) if n >= 1 << 63 else n


def key_hash(sender: str, tx_id: str) -> int:
    digest = hashlib.blake2b(f"{sender}\x00{tx_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    size: int  # bytes of the file through row `seq` (the header alone when seq is 0)
    hash: str


EMPTY_HEAD = Head(0, len(HEADER_LINE.encode()), GENESIS_HASH)


class IndexDb:
    """One connection to the index. Not thread-safe: one thread uses it at a time."""

    def __init__(self, path: Path, *, any_thread: bool = False) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB
        self.db.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back to 64 MiB
        self._ids: dict[str, int] | None = None  # account name -> id (writers only)
        self._check: int | None = None  # head.balance_check as of the open transaction

    @classmethod
    def open(cls, path: Path, *, any_thread: bool = False) -> IndexDb:
        """Open (creating the schema if needed). Raises sqlite3.Error on a damaged file."""
        idx = cls(path, any_thread=any_thread)
        try:
            tables = {r[0] for r in idx.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "head" in tables:
                version = idx.db.execute("SELECT max(version) FROM head").fetchone()[0]
                if version != FORMAT_VERSION:
                    raise IndexOfAnotherVersion(f"{path} was written by version {version} of "
                                                f"the index, this is {FORMAT_VERSION}")
            idx.db.executescript(_SCHEMA)
            if idx.db.execute("SELECT count(*) FROM head").fetchone()[0] == 0:
                idx._reset_head()
        except BaseException:
            idx.close()
            raise
        return idx

    def close(self) -> None:
        self.db.close()

    def _reset_head(self) -> None:
        self.db.execute("INSERT OR REPLACE INTO head VALUES (1, ?, ?, ?, ?, 0)",
                        (FORMAT_VERSION, EMPTY_HEAD.seq, EMPTY_HEAD.size, EMPTY_HEAD.hash))
        self._check = None

    def head(self) -> Head:
        seq, size, h = self.db.execute("SELECT seq, size, hash FROM head").fetchone()
        return Head(seq, size, h)

    def inconsistency(self, head: Head, last: LedgerRow) -> str | None:
        """What in the index contradicts its own head (`last` is the head's row, read from
        the file), or None. Cheap checks, not a proof: they catch an index copied while
        it was being written, or damaged."""
        db = self.db
        top = db.execute("SELECT max(seq) FROM rows").fetchone()[0] or 0
        if top != head.seq:
            return f"its last row is {top}, its head says {head.seq}"
        # One entry per row in each table (~0.1 s per million rows): a row lost from the
        # middle of either would let a payment be found nowhere and written twice.
        for table in ("rows", "keys"):
            n = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if n != head.seq:
                return f"its {table} table has {n} entries for {head.seq} rows"
        balances = self.balances()
        total = sum(balances.values())
        if total != 0:
            return f"its balances add up to {total}, not 0"
        kept = db.execute("SELECT balance_check FROM head").fetchone()[0]
        if _wrap(sum(b * _name_hash(a) for a, b in balances.items())) != kept:
            return "its balances do not match the check kept with them"
        if db.execute("SELECT 1 FROM keys WHERE key = ? AND seq = ?",
                      (key_hash(last.sender, last.tx_id), last.seq)).fetchone() is None:
            return f"row {last.seq} cannot be found by its payment"
        return None

    def is_empty(self) -> bool:
        return self.db.execute("SELECT 1 FROM rows LIMIT 1").fetchone() is None

    def clear(self) -> None:
        """Forget every row (before a rebuild)."""
        self.db.execute("BEGIN")
        for table in _TABLES:
            self.db.execute(f"DELETE FROM {table}")
        self._reset_head()
        self.db.execute("COMMIT")
        self._ids = None

    # --- reads (the event loop's connection) ----------------------------------------

    def balances(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, balance FROM accounts"))

    def candidates(self, hashes: Sequence[int], through: int) -> list[tuple[int, int, int]]:
        """(key hash, seq, pos) of the rows whose key hash is one of `hashes`."""
        out: list[tuple[int, int, int]] = []
        for i in range(0, len(hashes), _IN_CHUNK):
            chunk = hashes[i : i + _IN_CHUNK]
            out += self.db.execute(
                "SELECT k.key, k.seq, r.pos FROM keys k JOIN rows r ON r.seq = k.seq "
                f"WHERE k.key IN ({','.join('?' * len(chunk))}) AND k.seq <= ?",
                (*chunk, through)).fetchall()
        return out

    def positions(self, from_seq: int, limit: int, through: int) -> list[tuple[int, int]]:
        """(seq, pos) of rows from_seq.. (at most `limit`, none after `through`)."""
        return self.db.execute("SELECT seq, pos FROM rows WHERE seq >= ? AND seq <= ? "
                               "ORDER BY seq LIMIT ?", (from_seq, through, limit)).fetchall()

    def party_positions(self, party: str, from_seq: int, limit: int,
                        through: int) -> list[tuple[int, int]]:
        return self.db.execute(
            "SELECT p.seq, r.pos FROM party p JOIN accounts a ON a.id = p.account "
            "JOIN rows r ON r.seq = p.seq WHERE a.name = ? AND p.seq >= ? AND p.seq <= ? "
            "ORDER BY p.seq LIMIT ?", (party, from_seq, through, limit)).fetchall()

    # --- writes (one writer at a time: the open, then the IndexWriter thread) ---------

    def add(self, rows: Sequence[LedgerRow], positions: Sequence[int]) -> None:
        """Rows continuing the index, inside the caller's transaction (`begin`/`commit`)."""
        db = self.db
        if self._ids is None:
            self._ids = {name: i for i, name in db.execute("SELECT id, name FROM accounts")}
        ids = self._ids
        if self._check is None:
            self._check = db.execute("SELECT balance_check FROM head").fetchone()[0]
        check = self._check
        deltas: dict[int, int] = {}
        party: list[tuple[int, int]] = []
        for row in rows:
            check += row.amount * (_name_hash(row.receiver) - _name_hash(row.sender))
            for name in (row.sender, row.receiver):
                if name not in ids:
                    cur = db.execute("INSERT INTO accounts (name, balance) VALUES (?, 0)", (name,))
                    assert cur.lastrowid is not None
                    ids[name] = cur.lastrowid
            s, r = ids[row.sender], ids[row.receiver]
            deltas[s] = deltas.get(s, 0) - row.amount
            deltas[r] = deltas.get(r, 0) + row.amount
            party.append((s, row.seq))
            if r != s:
                party.append((r, row.seq))
        db.executemany("INSERT INTO rows (seq, pos) VALUES (?, ?)",
                       zip([r.seq for r in rows], positions, strict=True))
        db.executemany("INSERT INTO keys (key, seq) VALUES (?, ?)",
                       sorted((key_hash(r.sender, r.tx_id), r.seq) for r in rows))
        party.sort()
        db.executemany("INSERT INTO party (account, seq) VALUES (?, ?)", party)
        db.executemany("UPDATE accounts SET balance = balance + ? WHERE id = ?",
                       [(d, a) for a, d in deltas.items()])
        self._check = _wrap(check)

    def begin(self) -> None:
        self.db.execute("BEGIN")

    def commit(self, head: Head) -> None:
        self.db.execute("UPDATE head SET seq = ?, size = ?, hash = ?, balance_check = ?",
                        (head.seq, head.size, head.hash, self._check or 0))
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._ids = None
        self._check = None


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class IndexWriter:
    """Adds durable rows to the index on its own thread. `committed` is the head of the
    last commit (read by the event loop; a tuple assignment is atomic). If the index
    cannot be written (`failed`), rows stay in the store's memory and the next start
    re-indexes them from the file."""

    def __init__(self, db: IndexDb, head: Head) -> None:
        self._db = db
        self.committed = head
        self.failed: str | None = None
        self._rows: deque[tuple[list[LedgerRow], list[int], int]] = deque()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # flushes and the stop
        self._thread = threading.Thread(target=self._run, name="ledger-index", daemon=True)
        self._thread.start()

    def submit(self, rows: list[LedgerRow], positions: list[int], end: int) -> None:
        """Rows durable in the file (seq order), their line starts, the file size after.
        They wait for the thread's next round (every DRAIN_EVERY_S) without waking it: a
        wake-up per batch cost the ledger a thread switch per fsync."""
        self._rows.append((rows, positions, end))

    def flush(self, timeout: float = 30.0) -> bool:
        """Commit everything submitted so far; True once done."""
        f = _Flush()
        self._queue.put(f)
        return f.done.wait(timeout)

    def close(self) -> None:
        """Commit what is left and stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        db = self._db
        open_since: float | None = None  # when the open transaction got its first rows
        uncommitted = 0
        head = self.committed
        while True:
            try:
                item = self._queue.get(timeout=DRAIN_EVERY_S)
            except queue.Empty:
                item = None
            try:
                while self._rows:  # every batch submitted before a flush or the stop
                    rows, positions, end = self._rows.popleft()
                    if not rows or self.failed is not None:
                        continue
                    if open_since is None:
                        db.begin()
                        open_since = time.monotonic()
                    db.add(rows, positions)
                    uncommitted += len(rows)
                    head = Head(rows[-1].seq, end, rows[-1].hash)
                    if uncommitted >= COMMIT_EVERY_ROWS:  # a backlog: bounded transactions
                        db.commit(head)
                        self.committed = head
                        open_since, uncommitted = None, 0
                if open_since is not None and (
                        item is not None or uncommitted >= COMMIT_EVERY_ROWS
                        or time.monotonic() - open_since >= COMMIT_EVERY_S):
                    db.commit(head)
                    self.committed = head
                    open_since, uncommitted = None, 0
            except Exception as exc:  # sqlite3.Error, OSError, or a bug: stop indexing
                self.failed = f"the index {db.path} cannot be written: {exc!r}"
                log_event(log, "index not written; rows stay in memory until restart",
                          logging.ERROR, error=str(exc))
                try:
                    db.rollback()
                except sqlite3.Error:
                    pass
                open_since, uncommitted = None, 0
            if isinstance(item, _Flush):
                item.done.set()
            if item is _STOP:
                return


def index_rows(db: IndexDb, rows: Iterable[tuple[list[LedgerRow], list[int], int]]) -> Head | None:
    """Add chunks of rows (rows, line starts, file size after) and commit each; the last
    head written, or None if no chunk had rows."""
    head = None
    for chunk, positions, end in rows:
        if not chunk:
            continue
        db.begin()
        try:
            db.add(chunk, positions)
            head = Head(chunk[-1].seq, end, chunk[-1].hash)
            db.commit(head)
        except BaseException:
            db.rollback()
            raise
    return head
