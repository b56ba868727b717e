"""`jackpay-router inspect` and `reconcile`: the operator's view of a running router, from
its admin socket.

    jackpay-router inspect [--config network.toml] [--admin PATH] [--json]
    jackpay-router reconcile [--config network.toml] [--admin PATH] [--json]

`reconcile` checks the router's live balances against a replay of the ledger, its holds
against the payments in flight and the issued total against `_issuer`, and names every
account that differs (router/reconcile.py). Exit codes: 0 all agree, 1 a difference, 2
usage or config error, 3 the router did not answer (or could not read its ledger).

Shows the ledger link (connected, appends sent, re-sends, rows in doubt), how payments
ended since the router started, the payers with a live session, the payments in flight
(step and age), open holds and every balance. Read-only. Exit codes: 0 shown, 1 the
router did not answer (not running, or not at that socket), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from common import PROTOCOL_VERSION
from common.aio import open_unix_channel, run
from common.config import load_config
from common.errors import ConfigError, ConnectionLost, JackPayError, RequestFailed
from common.messages import (
    ADMIN_MAX_FRAME_BYTES,
    ADMIN_REPLIES,
    Hello,
    Inspect,
    InspectReply,
    Message,
    Reconcile,
    ReconcileReply,
    decoder_for,
)
from common.money import format_amount

TIMEOUT_S = 5.0


class NotAnswering(JackPayError):
    """The router's admin socket could not be reached or did not answer."""


def _parse_args(argv: list[str], prog: str = "jackpay-router inspect") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("JACKPAY_CONFIG"),
                    help="network TOML file (default: $JACKPAY_CONFIG)")
    ap.add_argument("--admin", metavar="PATH",
                    help="admin socket (default: [router] admin_socket of the config; with "
                         "--admin no config is read)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    return ap.parse_args(argv)


async def fetch(path: str, timeout: float = TIMEOUT_S) -> InspectReply:
    """One `inspect` over the admin socket. Raises NotAnswering."""
    reply = await ask(path, Inspect(id=0), timeout)
    if not isinstance(reply, InspectReply):
        raise NotAnswering(f"the router answered inspect with {type(reply).__name__}")
    return reply


async def ask(path: str, request: Message, timeout: float = TIMEOUT_S, *,
              refusals: bool = False) -> Message:
    """One admin request. Raises NotAnswering (also for an `error` answer, unless
    `refusals`: then RequestFailed)."""
    try:
        ch = await open_unix_channel(path, decoder_for(ADMIN_REPLIES), name="router-admin",
                                     connect_timeout=timeout,
                                     max_frame_bytes=ADMIN_MAX_FRAME_BYTES)
    except (OSError, TimeoutError) as exc:
        raise NotAnswering(f"cannot reach the router's admin socket {path}: "
                           f"{getattr(exc, 'strerror', None) or exc or 'timed out'}"
                           " (is the router running?)") from None
    try:
        await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="admin", peer="inspect"),
                         timeout=timeout)
        return await ch.request(request, timeout=timeout)
    except RequestFailed as exc:
        if refusals:
            raise
        raise NotAnswering(f"the router at {path} did not answer: {exc}") from None
    except (ConnectionLost, TimeoutError) as exc:
        raise NotAnswering(f"the router at {path} did not answer: "
                           f"{exc or type(exc).__name__}") from None
    finally:
        await ch.aclose()


def as_document(r: InspectReply) -> dict[str, Any]:
    def money(minor: int) -> dict[str, Any]:
        return {"amount": format_amount(minor), "amount_minor": minor}

    return {
        "ledger_connected": r.ledger_connected,
        "ledger_link": r.ledger_link,
        "outcomes": r.outcomes,
        "refused_logins": r.refused_logins,
        "sessions": r.sessions,
        "in_flight": [{"tx_id": p.tx_id, "sender": p.sender, "receiver": p.receiver,
                       **money(p.amount), "step": p.step, "age_ms": p.age_ms}
                      for p in r.in_flight],
        "holds": {k: money(v) for k, v in sorted(r.holds.items())},
        "balances": {k: money(v) for k, v in sorted(r.balances.items())},
    }


def as_text(r: InspectReply, path: str) -> str:
    link = r.ledger_link
    lines = [f"router admin socket {path}"]
    state = "connected" if r.ledger_connected else "NOT CONNECTED"
    lines.append(f"ledger: {state}; connects {link.get('connects', 0)}, appends sent "
                 f"{link.get('appends_sent', 0)} ({link.get('rows_sent', 0)} rows), re-sends "
                 f"{link.get('resends', 0)}, rows in doubt now {link.get('in_doubt_now', 0)}")
    ended = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items(),
                                                     key=lambda kv: (kv[0] != "paid", kv[0])))
    lines.append(f"payments since start: {ended or 'none'}")
    lines.append(f"sessions: {len(r.sessions)} live" +
                 (f" ({', '.join(r.sessions)})" if r.sessions else "") +
                 f"; logins refused since start: {r.refused_logins}")
    lines.append(f"in flight: {len(r.in_flight)}")
    for p in sorted(r.in_flight, key=lambda p: -p.age_ms):
        lines.append(f"  {p.tx_id}  {p.sender} → {p.receiver}  {format_amount(p.amount)}  "
                     f"step {p.step}, {p.age_ms} ms")
    lines.append(f"holds: {len(r.holds)}")
    for k, v in sorted(r.holds.items()):
        lines.append(f"  {k}  {format_amount(v)}")
    lines.append(f"balances: {len(r.balances)} accounts")
    width = max((len(k) for k in r.balances), default=0)
    for k, v in sorted(r.balances.items()):
        lines.append(f"  {k:<{width}}  {format_amount(v):>16}")
    return "\n".join(lines)


def admin_path(args: argparse.Namespace, prog: str) -> str | None:
    """The admin socket from --admin or the config; None (after a message) on error."""
    if args.admin:
        return str(Path(args.admin))
    if not args.config:
        print(f"{prog}: --config (or JACKPAY_CONFIG, or --admin PATH) is required",
              file=sys.stderr)
        return None
    try:
        cfg = load_config(args.config, with_changes=False)  # only the socket path is needed
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    return str(cfg.resolve(cfg.router.admin_socket))


def reconcile_main(argv: list[str]) -> int:
    prog = "jackpay-router reconcile"
    try:
        args = _parse_args(argv, prog)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    path = admin_path(args, prog)
    if path is None:
        return 2
    timeout = 600.0  # a replay of a large ledger takes a while

    async def go() -> int:
        try:
            reply = await ask(path, Reconcile(id=0), timeout)
        except NotAnswering as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 3
        if not isinstance(reply, ReconcileReply):
            print(f"{prog}: the router answered with {type(reply).__name__}", file=sys.stderr)
            return 3
        if args.json:
            print(json.dumps(msgspec.to_builtins(reply), indent=2))
        else:
            print(reconcile_text(reply))
        return 0 if reply.ok else 1

    return run(go, fast=False)


def reconcile_text(r: ReconcileReply) -> str:
    head = (f"{r.rows} ledger rows read; the router has committed up to seq "
            f"{r.router_last_seq}" + (f"; {r.in_flight_skipped} rows of payments in flight "
                                      "skipped" if r.in_flight_skipped else ""))
    if r.ok:
        return f"{head}\nOK: balances, holds and the issued total agree with the ledger"
    lines = [head, f"DIFFERENCES: {len(r.differences)}"]
    for d in r.differences:
        lines.append(f"  {d.what:<8} {d.account:<16} router {format_amount(d.router):>14}  "
                     f"ledger {format_amount(d.ledger):>14}" + (f"  {d.detail}" if d.detail
                                                               else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        args = _parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    path = admin_path(args, "jackpay-router inspect")
    if path is None:
        return 2

    async def go() -> int:
        try:
            reply = await fetch(path)
        except NotAnswering as exc:
            print(f"jackpay-router inspect: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(as_document(reply), indent=2) if args.json else as_text(reply, path))
        return 0

    return run(go, fast=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["NotAnswering", "as_document", "as_text", "ask", "fetch", "main", "reconcile_main"]
