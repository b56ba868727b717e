"""What people see: another payer's text can neither break the CLI nor fake output."""

from __future__ import annotations

import logging

from common.logs import _PlainFormatter
from common.messages import HistoryReply, LedgerRow
from payer_client.render import history, printable


def row(memo: str) -> LedgerRow:
    return LedgerRow(seq=1, dtg="2026-11-27T10:00:00.000000Z", sender="alice", receiver="bob",
                     amount=5, tx_id="t1", memo=memo, hash="0" * 64)


def test_memo_is_never_rich_markup() -> None:
    # "[/]" used to raise rich's MarkupError and crash `jackpay-payer history`.
    out = history(HistoryReply(re=1, rows=[row("[/]"), row("[bold red]x")], next_seq=2),
                  "bob", as_json=False)
    assert "[/]" in out
    assert "[bold red]x" in out


def test_control_characters_are_escaped() -> None:
    assert printable("a\x1b[31mb\nc") == "a\\x1b[31mb\\x0ac"
    out = history(HistoryReply(re=1, rows=[row("evil\n\x1b[2J")], next_seq=2), "bob", False)
    assert "\x1b" not in out
    assert "evil\\x0a" in out


def test_log_fields_cannot_forge_a_line() -> None:
    rec = logging.LogRecord("jackpay.router", logging.INFO, __file__, 1, "payment", None, None)
    rec.fields = {"tx_id": "t1", "reason": "no\n12:00:00.000 info forged: line"}
    line = _PlainFormatter().format(rec)
    assert "\n" not in line
    assert "reason='no\\n12:00:00.000 info forged: line'" in line
