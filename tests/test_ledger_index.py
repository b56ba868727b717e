"""The CSV store's index on disk (ledger/csvindex.py): the open reads only the rows after
the index's head, an index that does not describe the file is rebuilt, and lookups,
reads and balances give the same answers from disk as from memory."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from common.messages import RowIn
from ledger import csvindex
from ledger import store as store_mod
from ledger.csvindex import index_path
from ledger.store import LedgerCorrupt, LedgerStore
from ledger.verify import verify_file

DTG = "2026-12-01T10:00:00.000000Z"
PAYERS = ("alice", "bob", "carol")


def pay(i: int, amount: int = 100) -> RowIn:
    sender = "_issuer" if i % 4 == 0 else PAYERS[i % 3]
    return RowIn(tx_id=f"t{i}", sender=sender, receiver=PAYERS[(i + 1) % 3], amount=amount,
                 memo=f"#{i}")


def key(i: int) -> tuple[str, str]:
    r = pay(i)
    return r.sender, r.tx_id


def append(store: LedgerStore, reqs: list[list[RowIn]],
           atomic: list[bool] | None = None) -> list[list[str]]:
    res, batch = store.resolve(reqs, DTG, atomic)
    store.write_durably(batch)
    store.commit(batch)
    return [r.status for r in res]


def fill(path: Path, first: int, last: int, per_batch: int = 1) -> None:
    store = LedgerStore.open(path)
    for i in range(first, last + 1, per_batch):
        append(store, [[pay(j)] for j in range(i, min(i + per_batch, last + 1))])
    store.close()


def index_files(path: Path) -> list[Path]:
    where = index_path(path)
    return [p for p in (where, Path(f"{where}-wal"), Path(f"{where}-shm")) if p.exists()]


def copy_index(path: Path, to: Path) -> None:
    to.mkdir()
    for p in index_files(path):
        shutil.copy(p, to / p.name)


def restore_index(saved: Path, path: Path) -> None:
    for p in index_files(path):
        p.unlink()
    for p in saved.iterdir():
        shutil.copy(p, path.parent / p.name)


def reference(n: int) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """Balances and (seq, sender, tx_id) of rows pay(1..n), computed here."""
    balances: dict[str, int] = {}
    rows = []
    for i in range(1, n + 1):
        r = pay(i)
        balances[r.sender] = balances.get(r.sender, 0) - r.amount
        balances[r.receiver] = balances.get(r.receiver, 0) + r.amount
        rows.append((i, r.sender, r.tx_id))
    return balances, rows


def check_answers(store: LedgerStore, n: int) -> None:
    balances, rows = reference(n)
    assert store.last_seq == n
    assert store.balances == balances
    assert [(r.seq, r.sender, r.tx_id) for r in store.read(1, n + 5).rows] == rows
    found = store.lookup_now([(s, t) for _, s, t in rows] + [("alice", "nope")])
    assert sorted(r.seq for r in found.values()) == list(range(1, n + 1))
    for party in ("alice", "_issuer"):
        seqs, nxt = [], 1
        while True:  # small pages, so they cross from disk to memory
            page = store.read(nxt, 3, party=party)
            seqs += [r.seq for r in page.rows]
            nxt = page.next_seq
            if not page.more:
                break
        assert seqs == [s for s, snd, t in rows if party in (snd, pay(s).receiver)]
    # every old payment re-sent is a duplicate, and one changed is a conflict
    assert append(store, [[pay(1)], [pay(n)], [pay(2, amount=7)]]) == [
        ["duplicate"], ["duplicate"], ["conflict"]]
    assert store.last_seq == n


def index_behind(path: Path, tmp_path: Path, indexed: int, total: int) -> None:
    """A ledger file of rows 1..total whose index holds rows 1..indexed only (as after a
    crash before the index's last commit)."""
    fill(path, 1, indexed)
    copy_index(path, tmp_path / "old")
    fill(path, indexed + 1, total)
    restore_index(tmp_path / "old", path)


def every_key_hashes_to(monkeypatch: pytest.MonkeyPatch, value: int) -> None:
    """Every (sender, tx_id) hashes alike, in the index and in the store: each lookup
    meets a collision."""
    monkeypatch.setattr(csvindex, "key_hash", lambda sender, tx_id: value)
    monkeypatch.setattr(store_mod, "key_hash", lambda sender, tx_id: value)


def test_a_clean_stop_leaves_nothing_to_read_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    fill(path, 1, 40)
    store = LedgerStore.open(path)
    assert store.rows_read_at_open == 0
    assert store.rebuilt is None
    assert store.mem.rows == []  # nothing in memory: every answer comes from the disk
    check_answers(store, 40)
    store.close()


def test_rows_after_the_index_head_are_read_and_indexed_at_open(tmp_path: Path) -> None:
    """A crash before the index committed its last rows: the open reads only those."""
    path = tmp_path / "ledger.csv"
    index_behind(path, tmp_path, 25, 40)
    store = LedgerStore.open(path)
    assert store.rebuilt is None
    assert store.rows_read_at_open == 15
    check_answers(store, 40)
    store.close()
    assert LedgerStore.open(path).rows_read_at_open == 0


def test_rows_in_memory_and_on_disk_answer_together(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    fill(path, 1, 20)
    store = LedgerStore.open(path)
    for i in range(21, 33):  # in memory until the writer thread commits them
        append(store, [[pay(i)]])
    check_answers(store, 32)
    store.flush_index()
    assert store.mem.rows == []
    check_answers(store, 32)
    store.close()


@pytest.mark.parametrize("case", ["older file", "garbage", "version", "deleted"])
def test_an_index_that_does_not_describe_the_file_is_rebuilt(tmp_path: Path, case: str) -> None:
    path = tmp_path / "ledger.csv"
    fill(path, 1, 30)
    if case == "older file":  # the file restored from a copy older than the index
        data = path.read_bytes()
        fill(path, 31, 35)
        path.write_bytes(data)
    elif case == "version":  # written by another version of the index
        db = csvindex.IndexDb.open(index_path(path))
        db.db.execute("UPDATE head SET version = version + 1")
        db.close()
    else:
        for p in index_files(path):
            p.unlink()
        if case == "garbage":
            index_path(path).write_bytes(b"this is not a database" * 100)
    store = LedgerStore.open(path)
    assert bool(store.rebuilt) == (case != "deleted")  # a new index: nothing to distrust
    assert store.rows_read_at_open == 30
    check_answers(store, 30)
    store.close()


def test_an_index_of_another_ledger_is_not_trusted(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "a" / "ledger.csv", tmp_path / "b" / "ledger.csv"
    mine.parent.mkdir()
    theirs.parent.mkdir()
    fill(mine, 1, 30)
    store = LedgerStore.open(theirs)
    for i in range(1, 31):
        append(store, [[pay(i, amount=5)]])  # same keys and lengths, other amounts
    store.close()
    for p in index_files(mine):
        p.unlink()
    for p in index_files(theirs):
        shutil.copy(p, mine.parent / p.name)
    store = LedgerStore.open(mine)
    assert store.rebuilt
    assert "does not have" in store.rebuilt
    assert store.rows_read_at_open == 30
    check_answers(store, 30)
    store.close()


def test_damage_after_the_index_head_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    index_behind(path, tmp_path, 10, 15)
    lines = path.read_text().splitlines(keepends=True)
    lines[13] = lines[13].replace(",1.00,", ",9.00,")  # row 13, after the head (row 10)
    path.write_text("".join(lines))
    before = path.read_bytes()
    with pytest.raises(LedgerCorrupt, match="line 14"):
        LedgerStore.open(path)
    assert path.read_bytes() == before


def test_damage_before_the_head_is_found_by_verify_not_at_every_start(tmp_path: Path) -> None:
    """The documented trade-off: a start reads only the tail; `verify` reads everything."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 10)
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace(",1.00,", ",9.00,")  # same length: the head still matches
    path.write_text("".join(lines))
    LedgerStore.open(path).close()
    verdict = verify_file(path)
    assert not verdict.ok
    assert "line 4" in verdict.line


def test_a_hash_collision_costs_a_read_never_a_wrong_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key hashes alike: each lookup must check the rows it reads from the file."""
    every_key_hashes_to(monkeypatch, 42)
    path = tmp_path / "ledger.csv"
    fill(path, 1, 12)
    store = LedgerStore.open(path)
    check_answers(store, 12)
    assert append(store, [[pay(13)]]) == [["written"]]
    store.close()


def test_without_a_usable_index_every_row_is_kept_in_memory(tmp_path: Path) -> None:
    """The index cannot be opened (here its path is a folder): the ledger still starts,
    reading the whole file the slow way, and answers everything from memory."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 20)
    for p in index_files(path):
        p.unlink()
    index_path(path).mkdir()
    store = LedgerStore.open(path)
    assert store.index_unavailable
    assert "cannot open the index" in store.index_unavailable
    assert store.rows_read_at_open == 20
    assert len(store.mem.rows) == 20
    check_answers(store, 20)
    append(store, [[pay(21)]])
    store.close()
    assert verify_file(path).ok


def test_an_index_write_failure_while_serving_keeps_the_rows_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.csv"
    fill(path, 1, 10)
    store = LedgerStore.open(path)

    def disk_full(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(csvindex.IndexDb, "add", disk_full)
    for i in range(11, 16):
        append(store, [[pay(i)]])
    store.flush_index()
    assert store.index_failed
    assert "disk is full" in store.index_failed
    assert [r.seq for r in store.mem.rows] == [11, 12, 13, 14, 15]  # never dropped
    check_answers(store, 15)
    store.close()
    monkeypatch.undo()
    store = LedgerStore.open(path)  # the next start indexes what the index missed
    assert store.rows_read_at_open == 5
    check_answers(store, 15)
    store.close()


@pytest.mark.parametrize("damage", ["rows", "balances", "keys"])
def test_an_index_that_contradicts_itself_is_rebuilt(tmp_path: Path, damage: str) -> None:
    """What a copy of the index taken mid-write could look like: its head matches the
    file, its tables do not match its head."""
    path = tmp_path / "ledger.csv"
    fill(path, 1, 12)
    db = csvindex.IndexDb.open(index_path(path))
    sql = {"rows": "DELETE FROM rows WHERE seq = 12",
           "balances": "UPDATE accounts SET balance = balance + 1 WHERE name = 'bob'",
           "keys": "DELETE FROM keys WHERE seq = 12"}[damage]
    db.db.execute(sql)
    db.close()
    store = LedgerStore.open(path)
    assert store.rebuilt
    assert "contradicts itself" in store.rebuilt
    check_answers(store, 12)
    store.close()
