"""`jackpay-payer`: run the payer daemon, or talk to it over its control socket.

Rules: arguments are checked before anything is sent (a bad amount, id or tx_id exits 2
and sends nothing); amounts are decimal strings at this edge (`12.50`) and integer
minor units inside; output is for people by default and one JSON document per result
(one per line for `watch`) with `--json`. Exit codes are listed in EXIT_CODES.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from common import aio
from common.config import NetworkConfig, load_config, parse_host_port
from common.errors import ConfigError, ConnectionLost, JackPayError, RequestFailed
from common.logs import setup_logging
from common.messages import (
    PAYER_ID_PATTERN,
    TX_ID_PATTERN,
    Ack,
    BalanceReply,
    Event,
    GetBalance,
    History,
    HistoryReply,
    Message,
    Paid,
    Ping,
    Pong,
    Send,
    Status,
    StatusReply,
    Watch,
)
from common.money import AmountError, parse_amount
from common.version import add_version
from payer_client import render
from payer_client.client import PayerCredentials, new_tx_id
from payer_client.ctl import ControlClient, DaemonNotRunning

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_PENDING = 4
EXIT_UNKNOWN = 5
# `status TX`: the payment's state as an exit code (0 and 1 as for `send`). `mixed` is a
# deposit in the mixer whose payout to the payee is not made yet: not decided, like
# pending. (Replies are decoded strictly: a state reaches us only once
# common.messages.TxState lists it; tests check every TxState has a code here.)
STATUS_EXIT = {"paid": EXIT_OK, "failed": EXIT_REFUSED, "pending": EXIT_PENDING,
               "mixed": EXIT_PENDING, "unknown": EXIT_UNKNOWN}
EXIT_CODES = """exit codes:
  0  ok (status: paid)
  1  the payment (or request) was refused or failed; its error code is printed
  2  usage or config error (bad amount, id, tx_id, config file); nothing was sent
  3  the payer daemon is not reachable (not running, or it went away)
  4  status: pending (not decided yet; ask again or re-send the same tx_id); send: the
     outcome is unknown (the daemon went away, or you interrupted it): the tx_id is printed
  5  status: unknown (the router has no record of that payment)

examples:
  jackpay-payer run --config network.example.toml --id alice
  jackpay-payer send bob 12.50 --memo lunch --config network.example.toml --id alice
  jackpay-payer history --json --config network.example.toml --id alice
config and id may also come from JACKPAY_CONFIG and JACKPAY_ID."""

_PAYER_ID = re.compile(PAYER_ID_PATTERN)
_TX_ID = re.compile(TX_ID_PATTERN)


class UsageError(JackPayError):
    """Bad arguments; the CLI prints the message and exits 2."""


# --- arguments -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=os.environ.get("JACKPAY_CONFIG"),
                        help="network TOML file (default: $JACKPAY_CONFIG)")
    common.add_argument("--id", dest="payer_id", default=os.environ.get("JACKPAY_ID"),
                        help="your payer id (default: $JACKPAY_ID)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="jackpay-payer", description="JackPay payer: daemon and command line.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES,
                              parents=[common, *parents],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    run = add("run", "run the payer daemon (one router session + the control socket)")
    run.add_argument("--router", metavar="HOST:PORT", help="router address (default: config)")
    run.add_argument("--log-json", action="store_true", help="log JSON lines to stderr")
    run.add_argument("--metrics", metavar="HOST:PORT",
                     help="serve Prometheus metrics there (e.g. 127.0.0.1:9402; off if absent)")

    send = add("send", "pay someone; prints the outcome, tx_id and your new balance", output)
    send.add_argument("to", help="receiver's payer id")
    send.add_argument("amount", help="decimal amount, e.g. 12.50")
    send.add_argument("--memo", default="", help="a note for the receiver (<= 256 chars)")
    send.add_argument("--tx-id", help="idempotency key; re-use it to retry safely")
    send.add_argument("--mix", action="store_true",
                      help="through the network's mixer: the ledger shows you paying the pool "
                           "`_mixer`, never the receiver, who is paid later in a round (the "
                           "memo is not passed on); `status TX` follows it")

    add("balance", "your balance as the router knows it", output)
    hist = add("history", "your ledger rows, oldest first", output)
    hist.add_argument("--from-seq", type=int, default=1, help="first ledger seq (default 1)")
    hist.add_argument("--limit", type=int, default=100, help="rows per page, 1..1000")
    st = add("status", "what happened to a payment", output)
    st.add_argument("tx_id", help="the payment's tx_id")
    st.add_argument("--from", dest="sender", metavar="SENDER",
                    help="ask about a payment SENDER sent you (default: one you sent)")
    add("ping", "test the link to the router (through the daemon)", output)
    add("watch", "print payments as they arrive and settle (Ctrl-C to stop)", output)
    return parser


def _check_common(args: argparse.Namespace) -> NetworkConfig:
    if not args.config:
        raise UsageError("--config is required (or set JACKPAY_CONFIG)")
    if not args.payer_id:
        raise UsageError("--id is required (or set JACKPAY_ID)")
    if not _PAYER_ID.fullmatch(args.payer_id):
        raise UsageError(f"{args.payer_id!r} is not a payer id (letters, digits, _ . -; "
                         "not starting with _ . or -)")
    config = load_config(args.config)
    config.participant(args.payer_id)  # raises ConfigError naming the id
    return config


def _build_send(args: argparse.Namespace) -> Send:
    if not _PAYER_ID.fullmatch(args.to):
        raise UsageError(f"{args.to!r} is not a payer id")
    try:
        amount = parse_amount(args.amount)
    except AmountError as exc:
        raise UsageError(str(exc)) from None
    tx_id = args.tx_id or new_tx_id()
    if not _TX_ID.fullmatch(tx_id):
        raise UsageError(f"{tx_id!r} is not a tx_id (letters, digits, _ . : -; up to 128)")
    if len(args.memo) > 256:
        raise UsageError("memo is longer than 256 characters")
    return Send(id=0, to=args.to, amount=amount, memo=args.memo, tx_id=tx_id, mix=args.mix)


# --- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        config = _check_common(args)
        if args.command == "run":
            return _run_daemon(args, config)
        action = _prepare(args)
    except (UsageError, ConfigError) as exc:
        print(f"jackpay-payer {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _talk(args, config, action)


def _run_daemon(args: argparse.Namespace, config: NetworkConfig) -> int:
    from payer_client.daemon import serve

    if args.router:
        try:
            router = parse_host_port(args.router, listen=False)
        except ValueError as exc:
            raise UsageError(f"--router: {exc}") from None
    else:
        router = (config.router.host, config.router.port)
    # Fail now, not at the first login, when the key is missing or readable by others.
    PayerCredentials.from_config(config, args.payer_id)
    setup_logging(json_lines=args.log_json)
    return aio.run(lambda: serve(config, args.payer_id, router, args.metrics))


Action = Callable[[ControlClient], Coroutine[Any, Any, int]]


def _prepare(args: argparse.Namespace) -> Action:
    """Validate the command's arguments and return what to do once connected."""
    as_json: bool = args.json
    if args.command == "send":
        send = _build_send(args)
        return lambda c: _do_send(c, send, as_json)
    if args.command == "balance":
        return lambda c: _ask(c, GetBalance(id=0), BalanceReply, render.balance, as_json)
    if args.command == "history":
        if not 1 <= args.from_seq < 2**63:
            raise UsageError("--from-seq must be between 1 and 2^63-1")
        if not 1 <= args.limit <= 1000:
            raise UsageError("--limit must be between 1 and 1000")
        req = History(id=0, from_seq=args.from_seq, limit=args.limit)
        who: str = args.payer_id
        return lambda c: _ask(c, req, HistoryReply, lambda r, j: render.history(r, who, j),
                              as_json)
    if args.command == "status":
        if not _TX_ID.fullmatch(args.tx_id):
            raise UsageError(f"{args.tx_id!r} is not a tx_id")
        if args.sender is not None and not _PAYER_ID.fullmatch(args.sender):
            raise UsageError(f"--from {args.sender!r} is not a payer id")
        status = Status(id=0, tx_id=args.tx_id, sender=args.sender)
        return lambda c: _do_status(c, status, as_json)
    if args.command == "ping":
        return lambda c: _do_ping(c, as_json)
    if args.command == "watch":
        return lambda c: _do_watch(c, as_json)
    raise UsageError(f"unknown command {args.command}")


def _talk(args: argparse.Namespace, config: NetworkConfig, action: Action) -> int:
    path = config.control_socket(args.payer_id)
    hint = f"jackpay-payer run --config {args.config} --id {args.payer_id}"

    async def go() -> int:
        client = ControlClient(path, args.payer_id, hint)
        task = asyncio.current_task()
        if task is not None:  # SIGTERM as Ctrl-C: a `send` prints its tx_id first
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await client.connect()
            return await action(client)
        except DaemonNotRunning as exc:
            print(f"jackpay-payer: {exc}", file=sys.stderr)
            return EXIT_NO_DAEMON
        except ConnectionLost:
            print(f"jackpay-payer: the payer daemon for {args.payer_id} went away before "
                  "answering", file=sys.stderr)
            return EXIT_NO_DAEMON
        finally:
            await client.close()

    try:
        return aio.run(go, fast=False)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130  # what a shell reports for Ctrl-C; what was in hand is printed


# --- commands ----------------------------------------------------------------------


def _emit(text: str) -> None:
    print(text, flush=True)


def _fail(exc: RequestFailed, as_json: bool, tx_id: str | None = None) -> int:
    if as_json:
        _emit(json.dumps({"outcome": "failed", "code": str(exc.code), "message": exc.message,
                          "tx_id": tx_id}))
    else:
        print(render.failure(exc, tx_id), file=sys.stderr, flush=True)
    return EXIT_REFUSED


async def _do_send(client: ControlClient, send: Send, as_json: bool) -> int:
    tx_id = send.tx_id or ""  # never empty: the CLI picks one when none is given
    try:
        paid = await client.request(send, Paid)
    except RequestFailed as exc:
        return _fail(exc, as_json, send.tx_id)
    except ConnectionLost:
        _outcome_unknown(tx_id, f"the payer daemon for {client.payer_id} went away "
                         "before answering", as_json)
        return EXIT_PENDING
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM: the daemon goes on with it
        _outcome_unknown(tx_id, "interrupted before the answer", as_json)
        raise
    _emit(render.paid(paid, send, as_json))
    return EXIT_OK


def _outcome_unknown(tx_id: str, why: str, as_json: bool) -> None:
    """A `send` the daemon had and did not answer: it may be paid. Its tx_id (ours) is how
    to ask, or to send it again without paying twice — a new `send` could pay twice."""
    message = (f"{why}: tx_id {tx_id} may or may not be paid. `jackpay-payer status "
               f"{tx_id}` tells (once the daemon runs); `jackpay-payer send ... --tx-id "
               f"{tx_id}` pays it at most once")
    if as_json:
        _emit(json.dumps({"outcome": "unknown", "tx_id": tx_id, "message": message}))
    else:
        print(f"jackpay-payer: {message}", file=sys.stderr, flush=True)


async def _ask(client: ControlClient, req: Message, expect: type[Any],
               show: Callable[[Any, bool], str], as_json: bool) -> int:
    try:
        reply = await client.request(req, expect)
    except RequestFailed as exc:
        return _fail(exc, as_json, getattr(req, "tx_id", None))
    _emit(show(reply, as_json))
    return EXIT_OK


def status_exit_code(state: str) -> int:
    """The exit code of `status` for a payment in `state` (STATUS_EXIT). A state this CLI
    does not know (a newer daemon's) is not "paid": 1, like any other failed request."""
    return STATUS_EXIT.get(state, EXIT_REFUSED)


async def _do_status(client: ControlClient, req: Status, as_json: bool) -> int:
    try:
        reply = await client.request(req, StatusReply)
    except RequestFailed as exc:
        return _fail(exc, as_json, req.tx_id)
    _emit(render.status(reply, as_json))
    return status_exit_code(reply.state)


async def _do_ping(client: ControlClient, as_json: bool) -> int:
    import time

    start = time.perf_counter()
    try:
        await client.request(Ping(id=0), Pong)
    except RequestFailed as exc:
        return _fail(exc, as_json)
    rtt_ms = (time.perf_counter() - start) * 1000
    _emit(json.dumps({"outcome": "pong", "rtt_ms": round(rtt_ms, 3)}) if as_json
          else f"router link ok: round trip {rtt_ms:.2f} ms (CLI → daemon → router → back)")
    return EXIT_OK


async def _do_watch(client: ControlClient, as_json: bool) -> int:
    import asyncio

    def on_event(msg: Message) -> None:
        if isinstance(msg, Event):
            _emit(render.event(msg, as_json))

    client.on_event = on_event
    try:
        await client.request(Watch(id=0), Ack)
    except RequestFailed as exc:
        return _fail(exc, as_json)
    if not as_json:
        print(f"watching {client.payer_id}'s payments (Ctrl-C to stop)", file=sys.stderr,
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    closed = asyncio.ensure_future(client.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    stopped.cancel()
    if stop.is_set():
        return EXIT_OK
    print(f"jackpay-payer: the payer daemon for {client.payer_id} stopped", file=sys.stderr)
    return EXIT_NO_DAEMON


__all__ = ["EXIT_CODES", "main"]
