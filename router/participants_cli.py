"""`jackpay-router participants ...` and `jackpay-router reload`: the operator changes the
participants of a running router, over its admin socket (router/participants.py).

    jackpay-router participants list [--json]
    jackpay-router participants add ID [--name N] [--kind K] [--opening-balance 0.00]
                                       [--max-incoming AMOUNT] [--key FILE.pub] [--json]
    jackpay-router participants suspend ID
    jackpay-router participants resume ID
    jackpay-router reload            # the config's [[participants]] again (also: SIGHUP)

Each takes `--config network.toml` (or $JACKPAY_CONFIG) or `--admin PATH`. Changes are
recorded in `[network] participants_file` before they take effect, so they survive a
restart, and every tool reading the config sees them. A participant added without
`--key` logs in once `jackpay-keys CONFIG` has made its key pair.

Exit codes: 0 done, 1 refused (the reason is printed: an unknown id, an id already taken,
a key that does not match, a config that does not parse...), 2 usage or config error, 3
the router did not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import msgspec

from common.aio import run
from common.config import load_config
from common.errors import ConfigError, RequestFailed
from common.files import updating, write_atomically
from common.keys import ISSUER_SIGNER, KeyFileError, KeyStore, load_public_key, raw_public
from common.messages import (
    PAYER_ID_PATTERN,
    AddParticipant,
    ListParticipants,
    Message,
    ParticipantChanged,
    ParticipantInfo,
    ParticipantsReply,
    Reload,
    ReloadReply,
    ResumeParticipant,
    SuspendParticipant,
)
from common.money import AmountError, format_amount, parse_amount
from common.participants import KINDS
from common.signing import openings_json, read_openings, sign_opening
from common.text import has_control, printable
from router.inspect_cli import NotAnswering, admin_path, ask

TIMEOUT_S = 15.0  # an add waits up to 5 s for its opening balance


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=os.environ.get("JACKPAY_CONFIG"),
                    help="network TOML file (default: $JACKPAY_CONFIG)")
    ap.add_argument("--admin", metavar="PATH",
                    help="admin socket (default: [router] admin_socket of the config)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jackpay-router participants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True, metavar="list|add|suspend|resume")
    _common(sub.add_parser("list", help="every participant: state, key, session, balance"))
    add = sub.add_parser("add", help="a new participant, at once and across restarts")
    add.add_argument("payer_id", metavar="ID")
    add.add_argument("--name", default="")
    add.add_argument("--kind", choices=KINDS, default="individual")
    add.add_argument("--opening-balance", default="0.00", metavar="AMOUNT",
                     help="issued once from _issuer (e.g. 100.00; default 0.00)")
    add.add_argument("--max-incoming", metavar="AMOUNT",
                     help="its daemon rejects offers above this")
    add.add_argument("--key", metavar="FILE.pub",
                     help="its Ed25519 public key (PEM); without it, run jackpay-keys CONFIG")
    _common(add)
    for name, text in (("suspend", "no payments to or from it, no login; balance kept"),
                       ("resume", "undo a suspension")):
        p = sub.add_parser(name, help=text)
        p.add_argument("payer_id", metavar="ID")
        _common(p)
    return ap


def _request(args: argparse.Namespace) -> Message:
    """The admin request for the parsed command. Raises ValueError with a message."""
    if args.command == "list":
        return ListParticipants(id=0)
    pid = args.payer_id
    if re.match(PAYER_ID_PATTERN, pid) is None:
        raise ValueError(f"{pid!r} is not a valid participant id (letters, digits, _ . -; "
                         "not starting with _ ; at most 64)")
    if args.command == "suspend":
        return SuspendParticipant(id=0, payer=pid)
    if args.command == "resume":
        return ResumeParticipant(id=0, payer=pid)
    try:
        opening = parse_amount(args.opening_balance, allow_zero=True)
        cap = None if args.max_incoming is None else parse_amount(args.max_incoming,
                                                                  allow_zero=True)
    except AmountError as exc:
        raise ValueError(str(exc)) from None
    key = None
    if args.key:
        path = Path(args.key)
        try:
            key = raw_public(load_public_key(path.read_bytes(), str(path)))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
    if len(args.name) > 200 or has_control(args.name):
        raise ValueError("--name: at most 200 characters, none of them control characters "
                         "(newlines, tabs, escapes, bidi overrides)")
    return AddParticipant(id=0, payer=pid, name=args.name, kind=args.kind,
                          opening_balance=opening, max_incoming=cap, key=key)


def _row(p: ParticipantInfo) -> str:
    state = "SUSPENDED" if p.suspended else ("online" if p.online else "offline")
    flags = [f for f, on in (("no key", not p.has_key), ("added at run time",
                                                           p.added_at_run_time)) if on]
    return (f"{p.id:<16} {state:<9} {format_amount(p.balance):>14} "
            f"{p.kind:<11} {printable(p.name)}" + (f"  ({', '.join(flags)})" if flags else ""))


def _text(reply: Message) -> str:
    match reply:
        case ParticipantsReply(participants=ps):
            head = f"{'ID':<16} {'STATE':<9} {'BALANCE':>14} {'KIND':<11} NAME"
            return "\n".join([head, *(_row(p) for p in ps), f"{len(ps)} participants"])
        case ParticipantChanged(participant=p, note=note):
            return _row(p) + (f"\nnote: {note}" if note else "")
        case ReloadReply():
            lines = [f"added: {', '.join(reply.added) or 'none'}",
                     f"removed: {', '.join(reply.removed) or 'none'}",
                     f"changed: {', '.join(reply.changed) or 'none'}"]
            if reply.restart_needed:
                lines.append("in force only after a restart: " + ", ".join(reply.restart_needed))
            return "\n".join(lines)
    return repr(reply)


def _exchange(prog: str, args: argparse.Namespace, request: Message) -> int:
    path = admin_path(args, prog)
    if path is None:
        return 2

    async def go() -> int:
        try:
            reply = await ask(path, request, TIMEOUT_S, refusals=True)
        except NotAnswering as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 3
        except RequestFailed as exc:
            print(f"{prog}: refused ({exc.code}): {exc.message}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(msgspec.to_builtins(reply), indent=2))
        else:
            print(_text(reply))
        return 0

    return run(go, fast=False)


def main(argv: list[str]) -> int:
    prog = "jackpay-router participants"
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        request = _request(args)
    except ValueError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    signed_here = False
    if isinstance(request, AddParticipant) and request.opening_balance > 0 and args.config:
        note, signed_here = _sign_opening(args.config, request.payer, request.opening_balance)
        if note:
            print(f"{prog} add: {note}", file=sys.stderr)
    code = _exchange(f"{prog} {args.command}", args, request)
    if signed_here and code == 1 and isinstance(request, AddParticipant):
        # Refused: the opening signed for it is taken back (not on 3, no answer: it may
        # have been added).
        _unsign_opening(args.config, request.payer)
    return code


def _sign_opening(config: str, payer_id: str, amount: int) -> tuple[str | None, bool]:
    """Sign the new participant's opening balance with the issuer's key, when it is here,
    into keys/public/openings.json (the router presents it with the row). Returns a note
    when it cannot (the router then refuses the addition unless the opening was signed
    before, elsewhere), and whether it signed one now."""
    try:
        cfg = load_config(config, with_changes=False)  # the network id and its keys only
        store = KeyStore.for_config(cfg)
        if not store.key(ISSUER_SIGNER).exists():
            return (f"the opening balance of {payer_id} is not signed here: the issuer's key "
                    f"({store.key(ISSUER_SIGNER)}) is not on this machine"), False
        with updating(store.openings):
            return _sign_into(store, cfg.network.id, payer_id, amount)
    except (ConfigError, ValueError, OSError) as exc:
        return f"the opening balance of {payer_id} could not be signed ({exc})", False


def _unsign_opening(config: str, payer_id: str) -> None:
    """Take back an opening signed for an addition the router refused: a later `add`
    with another amount would otherwise find it signed, and be refused."""
    try:
        store = KeyStore.for_config(load_config(config, with_changes=False))
        with updating(store.openings):
            signed = read_openings(store.openings)
            if signed.pop(payer_id, None) is not None:
                write_atomically(store.openings, openings_json(signed), 0o644)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"note: the opening signed for {payer_id} could not be taken back ({exc})",
              file=sys.stderr)


def _sign_into(store: KeyStore, network_id: str, payer_id: str, amount: int
               ) -> tuple[str | None, bool]:
    """`_sign_opening`'s read-modify-write of the signed openings (under their lock)."""
    signed = read_openings(store.openings)
    if payer_id in signed:
        # An opening is issued once: one signed before (perhaps still waiting for the
        # ledger) is never replaced, whatever this request says — the router checks the
        # request against it.
        before = signed[payer_id][0]
        if before == amount:
            return None, False
        return (f"an opening balance of {format_amount(before)} is already signed for "
                f"{payer_id}; left as it is (an opening is issued once)"), False
    signed[payer_id] = (amount, sign_opening(store.load_signer(ISSUER_SIGNER), network_id,
                                             payer_id, amount))
    write_atomically(store.openings, openings_json(signed), 0o644)
    return None, True


def reload_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="jackpay-router reload", allow_abbrev=False,
                                 description="Read the config file again and apply its "
                                             "[[participants]] (as SIGHUP does). Exit codes "
                                             "as for `participants`.")
    _common(ap)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return _exchange("jackpay-router reload", args, Reload(id=0))
