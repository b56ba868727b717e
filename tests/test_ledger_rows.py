"""Ledger rows: CSV encoding, spreadsheet safety, the hash chain."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.rows import (
    GENESIS_HASH,
    RowFormatError,
    check_chain,
    decode_memo,
    encode_memo,
    format_line,
    make_row,
    parse_line,
)

DTG = "2026-11-27T10:00:00.000000Z"


def chain(n: int, memo: str = "") -> list:
    rows, prev = [], GENESIS_HASH
    for i in range(1, n + 1):
        r = make_row(prev, i, DTG, "alice", "bob", i * 100, f"tx{i}", memo)
        rows.append(r)
        prev = r.hash
    return rows


@given(st.text(max_size=256))
def test_memo_round_trips_and_stays_on_one_line(memo: str) -> None:
    row = make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 1, "t1", memo)
    line = format_line(row)
    assert line.count("\n") == 1
    assert line.endswith("\n")
    assert parse_line(line[:-1]) == row


@pytest.mark.parametrize("memo", ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "'quoted"])
def test_spreadsheet_never_sees_a_formula(memo: str) -> None:
    line = format_line(make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 1, "t1", memo))
    cells = next(csv.reader(io.StringIO(line)))
    assert cells[6].startswith("'")
    assert decode_memo(cells[6]) == memo
    for cell in cells:  # no cell at all starts like a formula
        assert not cell.startswith(("=", "+", "-", "@"))


def test_commas_quotes_newlines_survive() -> None:
    memo = 'rent, "march"\nline two\r\\end'
    assert decode_memo(encode_memo(memo)) == memo
    row = make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 1, "t1", memo)
    assert parse_line(format_line(row).rstrip("\n")).memo == memo


def test_amount_is_a_decimal_string_in_the_file() -> None:
    line = format_line(make_row(GENESIS_HASH, 1, DTG, "alice", "bob", 1250, "t1", ""))
    assert ",12.50," in line


def test_chain_detects_edit_delete_reorder() -> None:
    rows = chain(3)
    assert check_chain(None, rows[0]) is None
    assert check_chain(rows[0], rows[1]) is None
    assert "missing or reordered" in (check_chain(rows[0], rows[2]) or "")
    assert "missing or reordered" in (check_chain(rows[1], rows[0]) or "")
    edited = parse_line(format_line(rows[1]).replace(",2.00,", ",2.01,").rstrip("\n"))
    assert "hash does not match" in (check_chain(rows[0], edited) or "")


@pytest.mark.parametrize("line", [
    "garbage",
    "2026-11-27T10:00:00.000000Z,alice,bob,1.00,1,t1,,",
    "2026-11-27T10:00:00Z,alice,bob,1.00,1,t1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,al ice,bob,1.00,1,t1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,alice,bob,1.001,1,t1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,alice,bob,-1.00,1,t1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,alice,bob,1.00,01,t1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,alice,bob,1.00,x,t1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,alice,bob,1.00,1,t 1,," + "0" * 64,
    "2026-11-27T10:00:00.000000Z,alice,bob,1.00,1,t1,,XYZ",
    '2026-11-27T10:00:00.000000Z,alice,bob,1.00,1,t1,"unterminated,' + "0" * 64,
])
def test_bad_lines_are_refused_with_a_reason(line: str) -> None:
    with pytest.raises(RowFormatError):
        parse_line(line)


@given(st.text(max_size=64), st.integers(1, 2**62))
def test_hash_input_is_the_documented_canonical_json(memo: str, amount: int) -> None:
    import hashlib
    import json

    from ledger.rows import chain_hash

    fields = [GENESIS_HASH, 7, DTG, "alice", "_issuer", amount, "tx:7", memo]
    doc = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    assert chain_hash(*fields) == hashlib.sha256(doc).hexdigest()  # type: ignore[arg-type]
