"""How the CLI shows results: one function per reply type, human text or JSON.

Amounts are formatted with `format_amount` for people; JSON carries both the decimal
string and the integer minor units (`*_minor`) so scripts never parse money from text.
"""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.errors import ErrorCode, RequestFailed
from common.messages import BalanceReply, Event, HistoryReply, Paid, Send, StatusReply
from common.money import format_amount
from common.text import printable


def _money(minor: int | None) -> str | None:
    return None if minor is None else format_amount(minor)


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=False)


def paid(reply: Paid, send: Send, as_json: bool) -> str:
    """A `send` that was paid; with `--mix`, the deposit into the mixer's pool."""
    if as_json:
        return _json({"outcome": "mixed" if send.mix else "paid", "tx_id": reply.tx_id,
                      "to": send.to, "amount": format_amount(send.amount),
                      "amount_minor": send.amount, "seq": reply.seq, "dtg": reply.dtg,
                      "balance": format_amount(reply.balance), "balance_minor": reply.balance})
    if send.mix:
        return (f"mixed {format_amount(send.amount)} for {send.to}: deposited in the pool  "
                f"tx_id={reply.tx_id}  seq={reply.seq}  balance={format_amount(reply.balance)}"
                f"\n  {send.to} is paid from _mixer when a round closes; follow it with: "
                f"status {reply.tx_id}")
    return (f"paid {format_amount(send.amount)} to {send.to}  tx_id={reply.tx_id}  "
            f"seq={reply.seq}  balance={format_amount(reply.balance)}")


def failure(exc: RequestFailed, tx_id: str | None) -> str:
    code = exc.code
    doc = code.doc if isinstance(code, ErrorCode) else ""
    lines = [f"refused: {code} — {printable(exc.message)}"]
    if doc and doc not in exc.message:
        lines.append(f"  ({doc})")
    if tx_id:
        lines.append(f"  tx_id={tx_id}")
    if isinstance(code, ErrorCode) and code.retriable and tx_id:
        lines.append(f"  retriable: re-send with --tx-id {tx_id}, or ask: status {tx_id}")
    return "\n".join(lines)


def balance(reply: BalanceReply, as_json: bool) -> str:
    if as_json:
        return _json({"balance": format_amount(reply.balance), "balance_minor": reply.balance,
                      "available": format_amount(reply.available),
                      "available_minor": reply.available, "last_tx_time": reply.last_tx_time})
    text = f"balance {format_amount(reply.balance)}  available {format_amount(reply.available)}"
    return text + f"  last tx {reply.last_tx_time or 'never'}"


def status(reply: StatusReply, as_json: bool) -> str:
    if as_json:
        return _json({"tx_id": reply.tx_id, "state": reply.state, "code": reply.code,
                      "seq": reply.seq, "sender": reply.sender, "receiver": reply.receiver,
                      "amount": _money(reply.amount), "amount_minor": reply.amount,
                      "detail": reply.detail})
    detail = {"paid": f"seq {reply.seq}", "failed": reply.code or "",
              "pending": "not decided yet; ask again or re-send the same tx_id",
              "mixed": "deposited in the mixer; the payout is not made yet",
              "unknown": "the router has no record of it"}.get(reply.state, "")
    if reply.detail:  # a plug-in's word on it, e.g. where a mixed payment's money went
        detail = printable(reply.detail)
    extra = ""
    if reply.amount is not None:
        extra = f"  {reply.sender} → {reply.receiver} {format_amount(reply.amount)}"
    return f"{reply.tx_id}: {reply.state} ({detail}){extra}"


def history(reply: HistoryReply, me: str, as_json: bool) -> str:
    if as_json:
        return _json({"next_seq": reply.next_seq, "more": reply.more, "rows": [
            {"seq": r.seq, "dtg": r.dtg, "sender": r.sender, "receiver": r.receiver,
             "amount": format_amount(r.amount), "amount_minor": r.amount, "tx_id": r.tx_id,
             "memo": r.memo} for r in reply.rows]})
    if not reply.rows:
        return "no payments yet"
    table = Table(title=f"{me}'s payments")
    for col in ("seq", "when (UTC)", "with", "amount", "memo", "tx_id"):
        table.add_column(col, justify="right" if col in ("seq", "amount") else "left")
    for r in reply.rows:
        out = r.sender == me
        table.add_row(str(r.seq), r.dtg, f"→ {r.receiver}" if out else f"← {r.sender}",
                      ("-" if out else "+") + format_amount(r.amount),
                      Text(printable(r.memo)), r.tx_id)  # Text: a memo is never markup
    buf = io.StringIO()
    Console(file=buf, width=160, no_color=True).print(table)
    footer = f"next page: --from-seq {reply.next_seq}" if reply.more else ""
    return buf.getvalue().rstrip() + ("\n" + footer if footer else "")


def event(ev: Event, as_json: bool) -> str:
    if as_json:
        return _json({"kind": ev.kind, "tx_id": ev.tx_id, "peer": ev.peer,
                      "amount": format_amount(ev.amount), "amount_minor": ev.amount,
                      "memo": ev.memo, "balance": _money(ev.balance), "code": ev.code,
                      "seq": ev.seq})
    if ev.kind in ("connected", "disconnected"):
        return f"{ev.kind:12} router {ev.peer}"
    arrow = "to" if ev.kind in ("paid", "failed") else "from"
    parts = [f"{ev.kind:12} {format_amount(ev.amount):>12} {arrow} {ev.peer or '?'}",
             f"tx_id={ev.tx_id}"]
    if ev.memo:
        parts.append(f"memo={ev.memo!r}")
    if ev.code:
        parts.append(f"code={ev.code}")
    if ev.seq is not None:
        parts.append(f"seq={ev.seq}")
    if ev.balance is not None:
        parts.append(f"balance={format_amount(ev.balance)}")
    return "  ".join(parts)
