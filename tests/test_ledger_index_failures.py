"""The CSV store's index on its failure paths (ledger/csvindex.py, ledger/store.py,
MemoryIndex), from an adversarial review.

Two parts:
- bugs the review found, fixed since (the docstrings say what went wrong; line numbers
  are those of commit 394434a, the change reviewed);
- tricky cases the review checked that held (races with the index writer thread, torn
  leg groups across chunk boundaries, crashes mid-rebuild and mid-serving, write-failure
  rollback, paging across the disk/memory boundary).
Real files and real SQLite throughout; the only stand-ins force an error the disk will
not produce on demand (and one spy on the order of fsync and index commit).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_ledger_index import (
    DTG,
    PAYERS,
    append,
    every_key_hashes_to,
    fill,
    index_behind,
    index_files,
    key,
    pay,
    reference,
    restore_index,
)
from test_ledger_index import copy_index as save_index

from common.messages import LedgerRow, RowIn
from ledger import csvindex
from ledger import store as store_mod
from ledger.csvindex import IndexDb, index_path
from ledger.storage import Fenced
from ledger.store import LedgerStore, WriteFailed, load_rows
from ledger.verify import verify_file

ROOT = Path(__file__).resolve().parents[1]


def balances_of(n: int) -> dict[str, int]:
    return reference(n)[0]


def open_fds_under(folder: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return sorted(out)


def corrupt_page(db_file: Path, pageno: int) -> None:
    """Overwrite one page of a (checkpointed, closed) SQLite file with garbage."""
    size = sqlite3.connect(db_file).execute("PRAGMA page_size").fetchone()[0]
    with open(db_file, "r+b") as f:
        f.seek((pageno - 1) * size)
        f.write(b"\xa5" * size)


def pages_of(db_file: Path, table: str, pagetype: str | None = None) -> list[int]:
    db = sqlite3.connect(db_file)
    try:
        sql = "SELECT pageno FROM dbstat WHERE name = ?"
        args: tuple[str, ...] = (table,)
        if pagetype:
            sql += " AND pagetype = ?"
            args += (pagetype,)
        return [p for (p,) in db.execute(sql + " ORDER BY pageno", args)]
    finally:
        db.close()


# =====================================================================================
# Bugs the review found, each fixed since (a docstring's "Fix:" is what was done)
# =====================================================================================


@pytest.mark.parametrize("damage", ["rows page unreadable", "head size negative",
                                    "head seq 0, rows left"])
def test_a_damaged_index_found_after_it_opened_is_rebuilt_not_abandoned(
        tmp_path: Path, damage: str) -> None:
    """store.py:237-239 (`except sqlite3.Error` in _open_with_index), :278 and :284/:297.
    Damage SQLite only reports when a table is read ("database disk image is malformed",
    a DatabaseError raised by `inconsistency` or `index_rows`, not by `IndexDb.open`) is
    treated as "the index cannot be written": IndexUnavailable, the whole file read into
    memory (6.6 GiB for 10M rows per the commit message), and the damaged index left in
    place, so EVERY later start does the same; nothing ever rebuilds it. A head with a
    nonsense size (negative) makes `_row_ending_at` raise OSError(EINVAL) out of `open`:
    the ledger refuses to start ("cannot open ledger.csv: Invalid argument"). A head of
    seq 0 over tables that still hold rows (another version's layout, damage) passes the
    `head.seq == 0` shortcut unchecked; re-indexing then hits a UNIQUE constraint:
    IndexUnavailable again, at every start.
    Fix: in _open_with_index, on sqlite3.DatabaseError that is not OperationalError
    (IntegrityError included), on a head whose seq/size are out of range, and on a
    seq-0 head over non-empty tables: close, delete the index files and rebuild once
    (as _open_index does for "not a database"); keep IndexUnavailable for
    OperationalError (locked, read-only, full)."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 300, per_batch=20)
    where = index_path(path)
    if damage == "rows page unreadable":
        (root,) = sqlite3.connect(where).execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'rows'").fetchone()
        corrupt_page(where, root)
    else:
        db = IndexDb.open(where)
        db.db.execute("UPDATE head SET size = -5" if damage == "head size negative"
                      else "UPDATE head SET seq = 0")
        db.close()
    store = LedgerStore.open(path)
    try:
        assert store.index_unavailable is None, store.index_unavailable
        assert store.rebuilt
        assert store.balances == balances_of(300)
    finally:
        store.close()
    store = LedgerStore.open(path)  # and the next start reads nothing again
    try:
        assert store.index_unavailable is None
        assert store.rows_read_at_open == 0
    finally:
        store.close()


def test_damage_found_while_serving_stops_writing_and_is_rebuilt_at_the_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of the index that the open's checks did not read turns out damaged when a
    lookup reaches it: no answer can be trusted, so the index is deleted, the service is
    told to stop writing (exit 3), and the restart rebuilds the index from the file
    instead of dying on the same page again."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 30, per_batch=10)
    store = LedgerStore.open(path)
    told: list[str] = []
    store.on_fenced = told.append

    def malformed(*_: object) -> list[tuple[int, int, int]]:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(csvindex.IndexDb, "candidates", malformed)
    with pytest.raises(Fenced, match="damaged"):
        store.lookup_now([key(3)])
    assert told
    assert "restart the ledger" in told[0]
    assert not index_path(path).exists()
    with pytest.raises(Fenced):  # and no append is taken any more
        asyncio.run(store.append_batch([[pay(31)]], DTG, None))
    store.close()
    monkeypatch.undo()
    store = LedgerStore.open(path)  # the restart
    try:
        assert store.rows_read_at_open == 30
        assert len(store.lookup_now([key(i) for i in range(1, 31)])) == 30
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["keys", "rows", "balances"])
def test_an_index_wrong_in_the_middle_is_found_at_open(tmp_path: Path, damage: str) -> None:
    """An index damaged away from its head (a copy taken mid-checkpoint, a torn page
    SQLite reads without complaint): a missing key or `rows` entry would make a lookup
    miss a payment and the ledger append it a second time; off-setting balance errors
    (+100/-100) would pass a plain sum check. The counts and the balance check kept in
    the head find it at open, and the index is rebuilt."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 40)
    db = IndexDb.open(index_path(path))
    db.db.execute({
        "keys": "DELETE FROM keys WHERE seq = 17",
        "rows": "DELETE FROM rows WHERE seq = 17",
        "balances": "UPDATE accounts SET balance = balance + (CASE name WHEN 'bob' THEN 100 "
                    "ELSE -100 END) WHERE name IN ('bob', 'carol')",
    }[damage])
    db.close()
    store = LedgerStore.open(path)
    try:
        if damage == "balances":
            assert store.balances == balances_of(40)
        else:  # payment 17 sent again (the router re-sends an in-doubt append)
            assert append(store, [[pay(17)]]) == [["duplicate"]]
            assert store.last_seq == 40
    finally:
        store.close()
    assert verify_file(path).ok


@pytest.mark.parametrize("how", ["lookup", "read", "read of a party"])
def test_a_row_position_that_points_at_another_row_fences_instead_of_paying_twice(
        tmp_path: Path, how: str) -> None:
    """The index says row 17 is where row 18 is (positions are not in the open's checks):
    what reads the line there must find it is not row 17 — the index is damaged, the
    service stops writing — never miss payment 17 and write it again, nor answer a read
    with the wrong row."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 40)
    db = IndexDb.open(index_path(path))
    db.db.execute("UPDATE rows SET pos = (SELECT pos FROM rows WHERE seq = 18) "
                  "WHERE seq = 17")
    db.db.commit()
    db.close()
    store = LedgerStore.open(path)
    try:
        act: Callable[[], object] = {
            "lookup": lambda: append(store, [[pay(17)]]),  # an in-doubt append re-sent
            "read": lambda: store.read(17, 3),
            "read of a party": lambda: store.read(1, 40, party=pay(17).sender)}[how]
        with pytest.raises(Fenced, match="damaged"):
            act()
        assert store.last_seq == 40
        assert not store.statistics().index_ok  # and `stats` says so
    finally:
        store.close()
    store = LedgerStore.open(path)  # the restart rebuilds the index from the file
    try:
        assert store.rows_read_at_open == 40
        assert append(store, [[pay(17)]]) == [["duplicate"]]
    finally:
        store.close()
    assert verify_file(path).ok


def test_rows_read_at_open_are_indexed_before_they_are_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store.py:188-222 / 308-334: the rows after the index's head are read from the page
    cache and committed to the index (and served: a re-sent payment answers `duplicate`)
    without an fsync of the file. They may be rows the previous process wrote and never
    fsync'd (killed between write and fsync): a power cut then loses them from the file
    while the ledger has already told the router they exist. This breaks csvindex.py's
    own rule ("it learns rows only after they are durable in the file"). The old store
    had the serving half of this too; the index makes it a rule violation.
    Fix: `os.fsync(fd)` once in `_open` after `_check_header` (before the index learns
    the tail and before serving); it costs nothing when the page cache is clean."""
    path = tmp_path / "ledger.csv"
    index_behind(path, tmp_path, 10, 20)  # rows 11..20: the tail the next open reads
    events: list[str] = []
    real_fsync, real_commit = os.fsync, IndexDb.commit
    ledger_ino = path.stat().st_ino

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == ledger_ino:
            events.append("fsync ledger")
        real_fsync(fd)

    def commit(self: IndexDb, head: csvindex.Head) -> None:
        events.append(f"index commit {head.seq}")
        real_commit(self, head)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(IndexDb, "commit", commit)
    store = LedgerStore.open(path)
    store.close()
    assert "index commit 20" in events
    assert "fsync ledger" in events[: events.index("index commit 20")], events


def test_a_reader_failure_after_the_index_opened_falls_back_and_leaves_nothing_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store.py at 394434a: an error of the reader connection after the file was opened
    (here `reader.balances()`) left the ledger's fd open for good and escaped as a raw
    sqlite3 error (a traceback, not exit 2). It is an index failure like the others now:
    the store falls back to every row in memory, and nothing is left open."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 10)

    def io_error(self: IndexDb) -> dict[str, int]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(IndexDb, "balances", io_error)
    store = LedgerStore.open(path)
    assert store.index_unavailable
    assert store.balances == balances_of(10)
    store.close()
    gc.collect()
    assert open_fds_under(tmp_path) == []


def test_a_failed_truncation_at_open_closes_the_index_connections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store.py:206-215: when cutting off a torn tail fails (ftruncate or fsync: EIO),
    the `except BaseException` closes only the file's fd; the index's writer and reader
    connections (3 fds each with the WAL and shm, and the WAL lock) stay open until the
    cyclic garbage collector happens to run. Fix: close `reader` and `db` in that
    except too (or do the truncation before opening the index)."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 10)
    with open(path, "ab") as f:
        f.write(b"2026-12-01T10:00:00.000000Z,alice,bo")  # a torn last line

    def eio(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", eio)
    gc.disable()  # what is left open must not depend on when the collector runs
    try:
        try:
            LedgerStore.open(path)
        except OSError:
            pass
        left = open_fds_under(tmp_path)
    finally:
        gc.enable()
        gc.collect()
    assert left == []


# =====================================================================================
# REGRESSION TESTS: suspicions checked in review that turned out fine (all pass)
# =====================================================================================


def test_lookups_and_reads_never_miss_while_the_writer_thread_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread commits as fast as it can while the event loop appends, looks
    up and reads: every durable payment is found (a miss would be a double payment),
    every page is contiguous, balances stay exact, and the disk/memory boundary moves."""
    monkeypatch.setattr(csvindex, "COMMIT_EVERY_S", 0.0)
    monkeypatch.setattr(csvindex, "DRAIN_EVERY_S", 0.0005)
    path = tmp_path / "ledger.csv"
    store = LedgerStore.open(path)
    rng = random.Random(7)
    n, bases = 0, set()
    try:
        for _ in range(150):
            append(store, [[pay(i)] for i in range(n + 1, n + 4)])
            n += 3
            sample = [rng.randint(1, n) for _ in range(15)] + [n, n - 1, n - 2]
            found = store.lookup_now([key(i) for i in sample])
            assert sorted({r.seq for r in found.values()}) == sorted(set(sample))
            assert append(store, [[pay(rng.randint(1, n))]]) == [["duplicate"]]
            start = rng.randint(1, n)
            page = store.read(start, 7)
            want = list(range(start, min(n, start + 6) + 1))
            assert [r.seq for r in page.rows] == want
            assert page.more == (start + 7 <= n)
            party = rng.choice((*PAYERS, "_issuer"))
            got = store.read(start, 5, party=party)
            mine = [s for s in range(start, n + 1) if party in (pay(s).sender, pay(s).receiver)]
            assert [r.seq for r in got.rows] == mine[:5]
            assert got.more == (len(mine) > 5)
            assert store.balances == balances_of(n)
            bases.add(store.mem.base_seq)
        assert len(bases) > 5  # the boundary did move under the reads
    finally:
        store.close()
    store = LedgerStore.open(path)
    assert store.rows_read_at_open == 0
    assert store.balances == balances_of(n)
    store.close()


def build_with_groups(path: Path) -> None:
    """A ledger of single rows and atomic groups (1 to 3 `_leg` rows, then the main row)."""
    store = LedgerStore.open(path)
    rng = random.Random(3)
    for i in range(1, 30):
        n_legs = rng.choice([0, 0, 1, 2, 3])
        rows = [RowIn(tx_id=f"_leg{k + 2}:g{i}", sender="_issuer", receiver="_fees", amount=1)
                for k in range(n_legs)]
        rows.append(RowIn(tx_id=f"g{i}", sender="_issuer", receiver=PAYERS[i % 3], amount=10))
        append(store, [rows], [True])
    store.close()


def test_read_tail_matches_load_rows_for_every_cut_and_chunk_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_read_tail` (chunked, holding trailing `_leg` rows across chunk boundaries) must
    keep exactly what `load_rows` (the whole file at once) keeps, for a file cut at every
    line end, one byte short of it, and mid-line, with chunks of one or two lines."""
    path = tmp_path / "ledger.csv"
    store = LedgerStore.open(path)
    store.close()
    save_index(path, tmp_path / "empty")  # head: the header
    build_with_groups(path)
    full = path.read_bytes()
    lines_end = [i + 1 for i, b in enumerate(full) if b == 0x0A]
    # an index whose head is row 6: the tail is read from there (and it's rebuilt below)
    _, mid_good = load_rows(full[: lines_end[6]], "x")
    path.write_bytes(full[:mid_good])
    LedgerStore.open(path).close()
    save_index(path, tmp_path / "mid")
    cuts = sorted({c for k, e in enumerate(lines_end[1:])
                   for c in ((e, e - 1, e - 40) if k % 4 == 0 else (e, e - 1) if k % 2 else (e,))})
    chunk_sizes = [200, 256, 333, 500, 1000]
    for n, cut in enumerate(cuts):
        data = full[:cut]
        want_rows, want_good = load_rows(data, "x")
        path.write_bytes(data)
        restore_index(tmp_path / ("mid" if n % 2 else "empty"), path)
        monkeypatch.setattr(store_mod, "CHUNK_BYTES", chunk_sizes[n % len(chunk_sizes)])
        store = LedgerStore.open(path)
        try:
            assert store.last_seq == len(want_rows), (cut, store.last_seq)
            assert store.last_hash == (want_rows[-1].hash if want_rows else "0" * 64)
            assert store.read(1, 1000).rows == want_rows
            found = store.lookup_now([(r.sender, r.tx_id) for r in want_rows])
            assert len(found) == len(want_rows)
        finally:
            store.close()
        assert path.read_bytes() == data[:want_good]
        if n % 4:
            continue
        monkeypatch.setattr(store_mod, "CHUNK_BYTES", 10_000)
        again = LedgerStore.open(path)  # the index it left is consistent with the file
        assert again.rebuilt is None
        assert again.rows_read_at_open == 0
        assert again.last_seq == len(want_rows)
        again.close()


def test_a_crash_mid_rebuild_resumes_from_the_last_chunk_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.csv"
    fill(path, 1, 60)
    for p in index_files(path):
        p.unlink()
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 1000)
    real = csvindex.index_rows
    calls = 0

    def dies_on_the_third_chunk(db: IndexDb, chunks: list) -> object:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # the process killed mid-rebuild
        return real(db, chunks)

    monkeypatch.setattr(store_mod, "index_rows", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        LedgerStore.open(path)
    monkeypatch.setattr(store_mod, "index_rows", real)
    store = LedgerStore.open(path)
    assert store.rebuilt is None
    assert 0 < store.rows_read_at_open < 60
    assert store.balances == balances_of(60)
    assert len(store.lookup_now([key(i) for i in range(1, 61)])) == 60
    assert [r.seq for r in store.read(1, 100).rows] == list(range(1, 61))
    store.close()


KILLED_WHILE_SERVING = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from test_ledger_index import copy_index as save_index
from test_ledger_index import index_files, restore_index

from ledger import csvindex
from ledger.storage import Fenced
csvindex.COMMIT_EVERY_S = 0.0
csvindex.DRAIN_EVERY_S = 0.0005
from ledger.store import LedgerStore
from test_ledger_index_failures import append, pay
store = LedgerStore.open(Path(sys.argv[1]))
for i in range(1, 401):
    append(store, [[pay(i)]])
    if i == 397:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-serving: the writer thread is busy
"""


def test_a_ledger_killed_while_serving_restarts_with_every_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_SERVING, str(path),
                           str(Path(__file__).parent)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    store = LedgerStore.open(path)
    try:
        assert store.rebuilt is None
        assert store.last_seq == 397
        assert store.balances == balances_of(397)
        assert len(store.lookup_now([key(i) for i in range(1, 398)])) == 397
        assert append(store, [[pay(5)], [pay(397)], [pay(398)]]) == [
            ["duplicate"], ["duplicate"], ["written"]]
    finally:
        store.close()


def test_a_failed_write_never_reaches_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (ENOSPC after a short write) is truncated back; the
    index never learns those rows, and the rows written after it have the right places
    in the file (a wrong place would make a lookup miss: a double payment)."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 10)
    store = LedgerStore.open(path)
    append(store, [[pay(11)]])  # in the writer's open transaction, not committed yet
    real_write = os.write
    state = {"calls": 0}

    def short_then_enospc(fd: int, data: bytes) -> int:
        state["calls"] += 1
        if state["calls"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_enospc)
    _, batch = store.resolve([[pay(12)], [pay(13)]], DTG)
    with pytest.raises(WriteFailed):
        store.write_durably(batch)
    monkeypatch.setattr(os, "write", real_write)
    assert append(store, [[pay(12, amount=3)], [pay(14)]]) == [["written"], ["written"]]
    store.flush_index()
    store.close()
    assert verify_file(path).ok
    store = LedgerStore.open(path)
    try:
        assert store.rows_read_at_open == 0
        rows = store.read(1, 100).rows
        assert [(r.seq, r.tx_id, r.amount) for r in rows[-3:]] == [
            (11, "t11", 100), (12, "t12", 3), (13, "t14", 100)]
        found = store.lookup_now([key(i) for i in range(1, 15)])
        assert sorted(found) == sorted(key(i) for i in (*range(1, 13), 14))
        assert found[key(12)].amount == 3
    finally:
        store.close()


def test_paging_across_the_disk_memory_boundary_matches_a_memory_only_ledger(
        tmp_path: Path) -> None:
    """Every (from_seq, limit, party) page of a store with rows on disk and in memory
    equals the page of the same rows all in memory (MemoryIndex.read), including
    next_seq and more, and the router's loops (ledger/router server.py `_read_rows`)
    read every row exactly once."""
    from ledger.index import MemoryIndex

    path = tmp_path / "ledger.csv"
    fill(path, 1, 23)
    store = LedgerStore.open(path)
    for i in range(24, 31):
        append(store, [[pay(i)]])  # the writer has not committed these yet
    assert 0 < store.mem.base_seq < store.last_seq
    all_rows = store.read(1, 1000).rows
    mem = MemoryIndex(all_rows)
    try:
        for party in (None, "alice", "_issuer", "nobody"):
            for from_seq in range(1, 34):
                for limit in (1, 2, 3, 7, 30):
                    got, want = store.read(from_seq, limit, party), mem.read(from_seq, limit, party)
                    assert (got.rows, got.next_seq, got.more) == (
                        want.rows, want.next_seq, want.more), (party, from_seq, limit)
            seen, nxt = [], 1
            while True:  # the router's loop
                page = store.read(nxt, 4, party)
                seen += [r.seq for r in page.rows]
                if not page.rows or not (page.more if party else page.next_seq <= store.last_seq):
                    break
                nxt = page.next_seq
            assert seen == [r.seq for r in all_rows
                            if party is None or party in (r.sender, r.receiver)]
    finally:
        store.close()


def test_an_index_of_a_restored_older_file_is_not_trusted_even_when_rows_follow(
        tmp_path: Path) -> None:
    """The file restored from an older copy, then new (different) payments appended by a
    ledger running without the index: the old index's head is past the old copy's end,
    and the head check compares hash, not just length, so it is rebuilt."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 20)
    old = path.read_bytes()
    fill(path, 21, 30)
    save_index(path, tmp_path / "idx30")
    path.write_bytes(old)
    for p in index_files(path):
        p.unlink()
    store = LedgerStore.open(path)
    for i in range(21, 31):
        append(store, [[pay(i, amount=7)]])  # same keys, other amounts: same lengths
    store.close()
    restore_index(tmp_path / "idx30", path)
    store = LedgerStore.open(path)
    try:
        assert store.rebuilt
        assert store.balances != balances_of(30)
        assert append(store, [[pay(25, amount=7)]]) == [["duplicate"]]
        assert append(store, [[pay(25)]]) == [["conflict"]]
    finally:
        store.close()


def test_an_index_write_failure_mid_transaction_keeps_every_row_answerable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer fails on its second item of one transaction (the first item is rolled
    back with it): `committed` must not move, and no row may be forgotten from memory."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 5)
    store = LedgerStore.open(path)
    real_add = IndexDb.add
    calls = {"n": 0}

    def add(self: IndexDb, rows: list[LedgerRow], positions: list[int]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise sqlite3.OperationalError("database or disk is full")
        real_add(self, rows, positions)

    monkeypatch.setattr(IndexDb, "add", add)
    monkeypatch.setattr(csvindex, "COMMIT_EVERY_S", 5.0)
    append(store, [[pay(6)]])
    append(store, [[pay(7)]])
    append(store, [[pay(8)]])
    store.flush_index()
    try:
        assert store.index_failed
        # said to the operator: `stats` and the metrics carry it (ledger/server.py)
        st = store.statistics()
        assert not st.index_ok
        assert st.rows_in_memory == 3
        assert store.mem.base_seq == 5
        assert len(store.lookup_now([key(i) for i in range(1, 9)])) == 8
        assert store.balances == balances_of(8)
    finally:
        store.close()
    monkeypatch.undo()
    store = LedgerStore.open(path)
    assert store.rows_read_at_open == 3
    assert len(store.lookup_now([key(i) for i in range(1, 9)])) == 8
    store.close()


def test_a_64bit_key_hash_collision_with_a_row_in_memory_and_one_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    every_key_hashes_to(monkeypatch, 1)
    path = tmp_path / "ledger.csv"
    fill(path, 1, 6)
    store = LedgerStore.open(path)
    append(store, [[pay(7)]])
    assert append(store, [[pay(3)], [pay(7)], [pay(8)]]) == [
        ["duplicate"], ["duplicate"], ["written"]]
    store.close()
    assert verify_file(path).ok


def test_a_second_open_of_a_held_file_is_refused_and_a_file_system_without_locks_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One writer per file (ledger/store.py `_open`): a second open while the first holds
    it is refused `LedgerInUse`, and so is a file system that cannot lock — each leaving
    no file descriptor behind."""
    import errno
    import fcntl

    from ledger.store import LedgerInUse

    path = tmp_path / "ledger.csv"
    fill(path, 1, 3)
    first = LedgerStore.open(path)
    try:
        before = open_fds_under(tmp_path)
        with pytest.raises(LedgerInUse, match="held by another ledger"):
            LedgerStore.open(path)
        assert open_fds_under(tmp_path) == before
    finally:
        first.close()

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LedgerInUse, match="cannot be locked"):
        LedgerStore.open(path)
    assert open_fds_under(tmp_path) == []
