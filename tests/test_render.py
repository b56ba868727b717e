"""What people see: another payer's text can neither break the CLI nor fake output."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from common.logs import _PlainFormatter
from common.messages import HistoryReply, LedgerRow
from common.text import printable
from payer_client.render import history


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
    # bidi overrides and isolates, line separators: they reorder or break the line
    assert printable("x\u202ey\u2066z\u2028é€") == "x\\u202ey\\u2066z\\u2028é€"
    out = history(HistoryReply(re=1, rows=[row("evil\n\x1b[2J")], next_seq=2), "bob", False)
    assert "\x1b" not in out
    assert "evil\\x0a" in out


def test_log_fields_cannot_forge_a_line() -> None:
    rec = logging.LogRecord("jackpay.router", logging.INFO, __file__, 1, "payment", None, None)
    rec.fields = {"tx_id": "t1", "reason": "no\n12:00:00.000 info forged: line"}
    line = _PlainFormatter().format(rec)
    assert "\n" not in line
    assert 'reason="no\\n12:00:00.000 info forged: line"' in line


@pytest.mark.parametrize(("value", "shown"), [
    ("alice", "payer=alice"),                                   # plain values stay plain
    ("alice outcome=paid", 'payer="alice outcome=paid"'),       # cannot forge a field
    ("a=b", 'payer="a=b"'),
    ('say "hi"', 'payer="say \\"hi\\""'),
    ("x\u2028y\x85z", 'payer="x\\u2028y\\u0085z"'),           # not printable: escaped
    ("Böb's club", 'payer="Böb\'s club"'),                     # printable text stays readable
])
def test_log_values_are_quoted_like_logfmt(value: str, shown: str) -> None:
    rec = logging.LogRecord("jackpay.router", logging.INFO, __file__, 1, "login refused",
                            None, None)
    rec.fields = {"payer": value, "n": 1}
    line = _PlainFormatter().format(rec)
    assert line.endswith(f"login refused {shown} n=1")



def test_log_event_fast_path_writes_the_record_path_line(monkeypatch: Any) -> None:
    import io
    import time

    from common import logs

    saved_handlers, saved_level = logging.root.handlers[:], logging.root.level
    lg = logging.getLogger("jackpay.router.payments")
    out: dict[tuple[bool, bool], str] = {}
    try:
        monkeypatch.setattr(time, "time", lambda: 1764244680.123456)
        for fast in (True, False):
            for json_lines in (False, True):
                buf = io.StringIO()
                monkeypatch.setattr(logs, "_block_buffered_stderr", lambda b=buf: b)
                logs.setup_logging(json_lines=json_lines)
                assert logs._fast_handler is not None
                if not fast:
                    logs._fast_handler = None
                logs.log_event(lg, "payment", tx_id="t1", amount=5, outcome="paid", reason=None)
                logs.log_event(lg, "payment", tx_id="t2", reason="no\n12:00:00.000 info forged")
                logs.log_event(lg, "hidden", logging.DEBUG, a=1)
                logs.log_event(lg, "stop", logging.WARNING, a=1)
                out[fast, json_lines] = buf.getvalue()
    finally:
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        logs._fast_handler = None
    assert out[True, False] == out[False, False]
    assert out[True, True] == out[False, True]
    assert 'reason="no\\n12:00:00.000 info forged"' in out[True, False]
    assert "hidden" not in out[True, False]
    assert out[True, False].count("\n") == 3
