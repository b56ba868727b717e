"""The ledger file on disk: recovery, refusal of corrupt files, rollback of failed writes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.messages import RowIn
from ledger.rows import HEADER_LINE
from ledger.store import LedgerCorrupt, LedgerStore
from ledger.verify import verify_file

DTG = "2026-11-27T10:00:00.000000Z"


def row(i: int, amount: int = 100, memo: str = "") -> RowIn:
    return RowIn(tx_id=f"tx{i}", sender="_issuer", receiver="alice", amount=amount, memo=memo)


def append(store: LedgerStore, *reqs: list[RowIn]) -> list[list[str]]:
    res, batch = store.resolve(list(reqs), DTG)
    total_before = store.fsync_us_total
    fsync_us = store.write_durably(batch)
    assert store.fsync_us_total - total_before == fsync_us  # returned and counted
    if not batch.data:
        assert fsync_us == 0
    store.commit(batch)
    return [r.status for r in res]


def fresh(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "ledger.csv"
    store = LedgerStore.open(path)
    for i in range(1, n + 1):
        append(store, [row(i, memo=f"m{i}")])
    store.close()
    return path


def test_new_file_gets_a_header(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    LedgerStore.open(path).close()
    assert path.read_text() == HEADER_LINE


def test_reopen_rebuilds_index(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    store = LedgerStore.open(path)
    assert store.last_seq == 3
    keys = [("_issuer", f"tx{i}") for i in range(1, 5)]
    assert {tx for _, tx in store.lookup_now(keys)} == {"tx1", "tx2", "tx3"}
    assert append(store, [row(2, memo="m2")], [row(2, amount=5)]) == [["duplicate"], ["conflict"]]
    assert store.last_seq == 3


def test_duplicate_inside_one_batch_resolves_to_first(tmp_path: Path) -> None:
    store = LedgerStore.open(tmp_path / "l.csv")
    assert append(store, [row(1), row(1)], [row(1, amount=7)]) == [["written", "duplicate"],
                                                                   ["conflict"]]
    assert store.last_seq == 1


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good + b"2026-11-27T10:00:00.000000Z,_issuer,ali")
    store = LedgerStore.open(path)
    assert store.truncated_bytes > 0
    assert store.last_seq == 3
    store.close()
    assert path.read_bytes() == good


@pytest.mark.parametrize("damage", ["edit", "delete", "swap", "garbage", "header"])
def test_corrupt_middle_refuses_to_start_and_leaves_file(tmp_path: Path, damage: str) -> None:
    """With no index, the open reads the whole file and refuses any damage."""
    path = fresh(tmp_path)
    for p in tmp_path.glob("ledger.csv.index*"):
        p.unlink()
    lines = path.read_text().splitlines(keepends=True)
    if damage == "edit":
        lines[2] = lines[2].replace(",1.00,", ",9.00,")
    elif damage == "delete":
        del lines[2]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "garbage":
        lines[2] = "this is not a row\n"
    else:
        lines[0] = "when,who,whom\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    with pytest.raises(LedgerCorrupt, match="line"):
        LedgerStore.open(path)
    assert path.read_bytes() == before
    assert not verify_file(path).ok


def test_verify_ok_and_torn(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    v = verify_file(path)
    assert v.ok
    assert v.rows == 3
    assert v.line.startswith("OK")
    path.write_bytes(path.read_bytes() + b"partial")
    assert "torn" in verify_file(path).line


def test_tx_ids_are_scoped_by_sender_and_verify_refuses_a_payment_twice(tmp_path: Path) -> None:
    from ledger.rows import GENESIS_HASH, format_line, make_row

    store = LedgerStore.open(tmp_path / "l.csv")
    same_id = [RowIn(tx_id="inv-1", sender="_issuer", receiver=r, amount=5) for r in ("a", "b")]
    bobs = RowIn(tx_id="inv-1", sender="b", receiver="a", amount=1)
    assert append(store, same_id[:1], [bobs]) == [["written"], ["written"]]
    assert append(store, [bobs], same_id[1:]) == [["duplicate"], ["conflict"]]
    store.close()
    assert verify_file(tmp_path / "l.csv").ok
    # a file holding the same sender's tx_id twice (written by hand, chain recomputed)
    prev, lines = GENESIS_HASH, [HEADER_LINE]
    for seq, receiver in ((1, "a"), (2, "b")):
        r = make_row(prev, seq, "2026-01-01T00:00:00.000000Z", "_issuer", receiver, 5, "x", "")
        lines.append(format_line(r))
        prev = r.hash
    (tmp_path / "twice.csv").write_text("".join(lines))
    verdict = verify_file(tmp_path / "twice.csv")
    assert not verdict.ok
    assert "tx_id x of _issuer is recorded twice (rows 1 and 2)" in verdict.line


FAILING_WRITE = """
import resource, signal, sys
from common.messages import RowIn
from ledger.store import LedgerStore, WriteFailed
path, limit = sys.argv[1], int(sys.argv[2])
store = LedgerStore.open(__import__("pathlib").Path(path))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
big = RowIn(tx_id="big", sender="_issuer", receiver="alice", amount=1, memo="x" * 200)
res, batch = store.resolve([[big]], "2026-11-27T10:00:00.000000Z")
try:
    store.write_durably(batch)
except WriteFailed as exc:
    print("FAILED", exc)
else:
    print("WROTE")
print("ROWS", store.last_seq, "BROKEN", bool(store.broken))
"""


def test_real_write_failure_restores_file_byte_for_byte(tmp_path: Path) -> None:
    """A file-size rlimit makes write() short, then EFBIG: the partial bytes are removed."""
    import subprocess
    import sys

    path = fresh(tmp_path)
    before = path.read_bytes()
    out = subprocess.run(
        [sys.executable, "-c", FAILING_WRITE, str(path), str(len(before) + 40)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert "FAILED" in out
    assert "File too large" in out
    assert "ROWS 3 BROKEN False" in out
    assert path.read_bytes() == before
    assert verify_file(path).ok


def test_party_reads_page_through_an_accounts_rows(tmp_path: Path) -> None:
    store = LedgerStore.open(tmp_path / "l.csv")
    reqs = [[RowIn(tx_id=f"t{i}", sender="_issuer", receiver="bob" if i % 3 == 0 else "carol",
                   amount=1)] for i in range(1, 31)]
    append(store, *reqs)
    store.close()
    store = LedgerStore.open(tmp_path / "l.csv")  # the index is rebuilt on open too
    seen, nxt = [], 1
    while True:
        page = store.read(nxt, 4, party="bob")
        assert all("bob" in (r.sender, r.receiver) for r in page.rows)
        seen += [r.seq for r in page.rows]
        nxt = page.next_seq
        if not page.more:
            break
    assert seen == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert store.read(31, 4, party="bob").rows == []
    # bob's last row is the ledger's last: a page ending exactly there says no more
    assert not store.read(27, 2, party="bob").more
    assert store.read(27, 1, party="bob").more
    assert store.read(1, 29).more
    assert not store.read(1, 30).more
    assert store.read(1, 10, party="nobody").rows == []


async def test_slow_fsyncs_are_logged_at_most_once_a_second(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ledger.server import LedgerAccess, LedgerServer

    server = LedgerServer(LedgerStore.open(tmp_path / "l.csv"), LedgerAccess(tls=None))
    with caplog.at_level(logging.WARNING, logger="jackpay.ledger"):
        for _ in range(3):
            server._note_slow_fsync(25_000, rows=7)
        server._slow_logged_at -= 1.5  # a second and a half later
        server._note_slow_fsync(40_000, rows=9)
    lines = [r for r in caplog.records if r.getMessage() == "slow fsync"]
    assert [r.fields for r in lines] == [  # type: ignore[attr-defined]
        {"ms": 25.0, "rows": 7, "slow_since_last_line": 1},
        {"ms": 40.0, "rows": 9, "slow_since_last_line": 3},
    ]
    server.store.close()


def legs(tx: str, amount: int = 100) -> list[RowIn]:
    """One payment's legs as the router sends them: the extra leg first, the main row last."""
    return [RowIn(tx_id=f"_leg2:{tx}", sender="_issuer", receiver="_fees", amount=5),
            RowIn(tx_id=tx, sender="_issuer", receiver="alice", amount=amount)]


def test_an_atomic_append_writes_all_its_rows_or_none(tmp_path: Path) -> None:
    store = LedgerStore.open(tmp_path / "ledger.csv")
    res, batch = store.resolve([legs("a"), legs("b")], DTG, [True, True])
    store.write_durably(batch)
    store.commit(batch)
    assert [r.status for r in res] == [["written", "written"], ["written", "written"]]
    # b's main row conflicts: its fee leg, new, is not written either; c goes in after it.
    res, batch = store.resolve([legs("b", amount=999), legs("c")], DTG, [True, True])
    assert [r.status for r in res] == [["conflict", "conflict"], ["written", "written"]]
    assert [r.tx_id for r in batch.rows] == ["_leg2:c", "c"]
    assert batch.rows[0].seq == 5  # no seq was used by the refused group
    store.write_durably(batch)
    store.commit(batch)
    # A re-send of a written group is a duplicate, row for row.
    res, _ = store.resolve([legs("a")], DTG, [True])
    assert res[0].status == ["duplicate", "duplicate"]
    # Half known, half new: refused whole.
    half = [RowIn(tx_id="_leg2:z", sender="_issuer", receiver="_fees", amount=5), legs("a")[1]]
    res, batch = store.resolve([half], DTG, [True])
    assert res[0].status == ["conflict", "conflict"]
    assert not batch.rows
    store.close()


def test_a_torn_group_at_the_end_of_the_file_is_cut_off_on_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    store = LedgerStore.open(path)
    _, batch = store.resolve([legs("a"), legs("b")], DTG, [True, True])
    store.write_durably(batch)
    store.commit(batch)
    store.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # b's main row never reached the disk
    store = LedgerStore.open(path)
    assert [r.tx_id for r in store.read(1, 10).rows] == ["_leg2:a", "a"]
    assert store.truncated_bytes > 0
    store.close()
    assert verify_file(path).ok
