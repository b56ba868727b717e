"""The JackPay demo (what `scripts/demo` runs): a three-payer network in a temp folder.

It makes the network's keys, starts ledger, router and the daemons of alice, bob and
carol on ephemeral ports, then drives the real CLI (`python -m payer_client ... --json`)
through payments that succeed and payments that hit every failure path: the ones a
person can provoke from the CLI, a receiver (dave) that never answers the offer, the
ledger stopped, and a real write failure at the ledger (restarted under a file-size
limit) — each showing that no money moved. Then a stranger who knows alice's name fails
to pay as alice; it prints every outcome, the balances and the ledger, runs
`python -m router reconcile` and `python -m ledger verify --keys --receipts` (the hash
chain, every row's signatures, the ledger's receipts the daemons kept), and stops
everything. Exit 0 only if every outcome was the expected one, the ledger verifies and
the balances add up; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common import PROTOCOL_VERSION
from common.config import load_config
from common.errors import ConnectionLost, RequestFailed
from common.framing import encode_frame
from common.keys import KeyStore
from common.messages import Hello, Offer, encode
from common.money import format_amount, parse_amount
from common.procs import ProcessFailed, fsize_limit
from common.text import printable
from common.tls import client_tls
from payer_client.client import PayerClient, PayerCredentials
from payer_client.launch import LocalNetwork
from router.inspect_cli import NotAnswering, fetch

OPENING = {"alice": "1000.00", "bob": "50.00", "carol": "20.00", "dave": "0.00"}
CONFIG = """\
[network]
id = "demo"

[ledger]
host = "127.0.0.1"
port = 0
path = "ledger.csv"

[router]
host = "127.0.0.1"
port = 0
admin_socket = "router-admin.sock"
ping_timeout_s = 1.0
freshness_window_s = 1.0
offer_timeout_s = 2.0
ledger_retry_max_s = 0.3

[payer]
control_dir = "ctl"
reconnect_max_s = 0.5
request_timeout_s = 10.0

[[participants]]
id = "alice"
name = "Alice Widgets Ltd"
kind = "corporation"
opening_balance = "1000.00"

[[participants]]
id = "bob"
name = "Bob Smith"
kind = "individual"
opening_balance = "50.00"

[[participants]]
id = "carol"
name = "Carol's Book Club"
kind = "party"
opening_balance = "20.00"
max_incoming = "100.00"

[[participants]]
id = "dave"
name = "Dave (never answers an offer)"
kind = "software"
"""


@dataclass
class Step:
    title: str
    who: str
    args: list[str]
    expect: str  # "paid" or an error code


class Demo:
    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self.config = root / "network.toml"
        self.config.write_text(CONFIG)
        self.net = LocalNetwork(self.config, root / "run", ephemeral=True)
        self.failures: list[str] = []

    def cli(self, who: str, *args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "payer_client", *args, "--json", "--config",
             str(self.config), "--id", who],
            capture_output=True, text=True, env=self.net.env(), timeout=60, check=False,
            cwd=self.root)  # not the user's folder: `-m` puts the cwd first on sys.path
        try:
            doc = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except json.JSONDecodeError:
            doc = {}
        if not doc:
            doc = {"outcome": "cli_error", "code": f"exit {proc.returncode}",
                   "message": proc.stderr.strip()}
        return proc.returncode, doc

    def step(self, s: Step) -> dict[str, Any]:
        rc, doc = self.cli(s.who, "send", *s.args)
        got = "paid" if doc.get("outcome") == "paid" else str(doc.get("code"))
        ok = got == s.expect and rc == (0 if s.expect == "paid" else 1)
        mark = "[green]✔[/]" if ok else "[red]✘[/]"
        detail = (f"seq={doc['seq']} balance={doc['balance']}" if got == "paid"
                  else str(doc.get("message", "")))
        self.console.print(f"{mark} {s.title}\n    {s.who} send {' '.join(s.args)} → "
                           f"[bold]{got}[/]  {detail}", highlight=False)
        if not ok:
            self.failures.append(f"{s.title}: expected {s.expect}, got {got} (exit {rc})")
        return doc

    def run(self) -> int:
        self.console.rule("starting a three-payer network")
        self.net.start_all()
        self.console.print(self.net.table())
        self.console.rule("payments")
        first = self.step(Step("a payment that succeeds", "alice",
                               ["bob", "25.00", "--memo", "invoice 17", "--tx-id", "demo-1"],
                               "paid"))
        self.step(Step("another one", "bob", ["carol", "10.00", "--memo", "dues"], "paid"))
        self.step(Step("more than the sender has", "carol", ["alice", "1000.00"],
                       "insufficient_funds"))
        self.step(Step("to someone who is not in the network", "alice", ["mallory", "1.00"],
                       "unknown_receiver"))
        self.step(Step("above carol's max_incoming (100.00)", "alice", ["carol", "150.00"],
                       "receiver_rejected"))
        again = self.step(Step("retrying tx_id demo-1: same outcome, no second row", "alice",
                               ["bob", "25.00", "--memo", "invoice 17", "--tx-id", "demo-1"],
                               "paid"))
        if first.get("seq") != again.get("seq"):
            self.failures.append("retry of demo-1 returned another seq")
        self.step(Step("tx_id demo-1 reused for another amount", "alice",
                       ["bob", "30.00", "--tx-id", "demo-1"], "tx_id_conflict"))
        self.console.print("[dim]stopping bob's daemon …[/]")
        self.net.stop("bob")
        self.step(Step("to bob while his daemon is down", "alice", ["bob", "5.00"],
                       "receiver_unreachable"))
        self.console.print("[dim]starting bob's daemon again …[/]")
        self.net.start_payer("bob")
        self.step(Step("to bob once he is back", "alice", ["bob", "5.00"], "paid"))
        self.infrastructure_failures()
        self.stranger()
        self.show_balances()
        self.show_ledger()
        self.reconcile()
        self.verify()
        return 0

    def balance_of(self, who: str) -> int | None:
        rc, doc = self.cli(who, "balance")
        return int(doc["balance_minor"]) if rc == 0 else None

    def failing_step(self, s: Step) -> None:
        """A step that must fail and move no money: the sender's balance is the same
        before and after."""
        before = self.balance_of(s.who)
        self.step(s)
        after = self.balance_of(s.who)
        if before is None or before != after:
            self.failures.append(f"{s.title}: {s.who}'s balance went from {before} to {after}")
        else:
            self.console.print(f"    no money moved: {s.who} still has "
                               f"{format_amount(after or 0)}", highlight=False)

    def infrastructure_failures(self) -> None:
        self.console.rule("when a receiver or the ledger fails")
        # dave's daemon is replaced by a client that answers pings but never an offer.
        self.net.stop("dave")
        host, port = self.net.router_addr.rsplit(":", 1)
        asyncio.run(_silent_receiver(self, host, int(port)))
        ledger_port = int(self.net.ledger_addr.rsplit(":", 1)[1])
        self.console.print("[dim]stopping the ledger …[/]")
        self.net.stop("ledger")
        time.sleep(0.3)  # the router sees the connection close
        self.failing_step(Step("while the ledger is stopped", "alice", ["bob", "1.00"],
                               "ledger_unavailable"))
        path = self.net.config.resolve(self.net.config.ledger.path)
        self.console.print("[dim]starting the ledger under a file-size limit (its next "
                           "write fails: EFBIG) …[/]")
        self.net.start_ledger(port=ledger_port, preexec_fn=fsize_limit(path.stat().st_size + 40))
        self.wait_ledger_link()
        self.failing_step(Step("a write the ledger's disk refuses", "alice", ["bob", "1.00"],
                               "ledger_write_failed"))
        self.console.print("[dim]restarting the ledger without the limit …[/]")
        self.net.stop("ledger")
        self.net.start_ledger(port=ledger_port)
        self.wait_ledger_link()

    def wait_ledger_link(self, seconds: float = 10.0) -> None:
        """Until the router has its ledger connection back."""
        admin = str(self.net.config.resolve(self.net.config.router.admin_socket))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(NotAnswering):
                if asyncio.run(fetch(admin)).ledger_connected:
                    return
            time.sleep(0.1)
        self.failures.append("the router did not reconnect to the ledger")

    def reconcile(self) -> None:
        self.console.rule("python -m router reconcile")
        proc = subprocess.run([sys.executable, "-m", "router", "reconcile", "--config",
                               str(self.config)], capture_output=True, text=True, check=False,
                              timeout=60, cwd=self.root, env=self.net.env())
        self.console.print((proc.stdout + proc.stderr).strip(), highlight=False)
        if proc.returncode != 0:
            self.failures.append(f"reconcile exited {proc.returncode}")

    def stranger(self) -> None:
        """Someone who knows alice's name and can reach the router's port tries to pay as
        alice: in plain TCP, then over TLS with a key of their own. Both get nothing."""
        self.console.rule("a stranger tries to pay as alice")
        host, port = self.net.router_addr.rsplit(":", 1)
        plain, signed = asyncio.run(_stranger(self.net.config_path, host, int(port)))
        for title, got, expect in (
                ("hello as alice in plain TCP (no TLS)", plain, "closed"),
                ("TLS, hello as alice, signed with the stranger's own key", signed,
                 "auth_failed")):
            ok = got == expect
            self.console.print(f"{'[green]✔[/]' if ok else '[red]✘[/]'} {title}\n    → "
                               f"[bold]{got}[/]", highlight=False)
            if not ok:
                self.failures.append(f"stranger, {title}: expected {expect}, got {got}")

    def show_balances(self) -> None:
        self.console.rule("balances")
        table = Table()
        for col in ("payer", "opening", "balance", "available", "last tx"):
            table.add_column(col, justify="left" if col in ("payer", "last tx") else "right")
        total = 0
        # dave's daemon was replaced by the silent client: his balance (0.00, nothing
        # reached him) is checked by reconcile below.
        shown = {who: v for who, v in OPENING.items() if who != "dave"}
        for who, opening in shown.items():
            rc, doc = self.cli(who, "balance")
            if rc != 0:
                self.failures.append(f"balance of {who}: exit {rc} {doc}")
                continue
            total += int(doc["balance_minor"])
            table.add_row(who, opening, doc["balance"], doc["available"],
                          doc.get("last_tx_time") or "")
        self.console.print(table)
        opening_total = sum(parse_amount(v, allow_zero=True) for v in OPENING.values())
        expected = {"alice": 1000_00 - 2500 - 500, "bob": 50_00 + 2500 - 1000 + 500,
                    "carol": 20_00 + 1000}
        self.console.print(f"sum of payer balances {format_amount(total)} = issued "
                           f"{format_amount(opening_total)} (so _issuer + payers = 0)")
        if total != opening_total:
            self.failures.append("balances do not add up to the opening balances")
        for who, want in expected.items():
            rc, doc = self.cli(who, "balance")
            if rc == 0 and doc["balance_minor"] != want:
                self.failures.append(f"{who}'s balance is {doc['balance']}, expected "
                                     f"{format_amount(want)}")

    def show_ledger(self) -> None:
        path = self.net.config.resolve(self.net.config.ledger.path)
        self.console.rule(f"the ledger ({path})")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        cols = ["seq", "dtg", "sender", "receiver", "amount", "tx_id", "memo", "hash"]
        table = Table()
        for col in cols:
            table.add_column(col, justify="right" if col in ("seq", "amount") else "left")
        for row in rows:
            table.add_row(*[Text((row.get(c) or "")[:12] + "…") if c == "hash"
                            else Text(printable(row.get(c) or "")) for c in cols])
        self.console.print(table)
        if len(rows) != 3 + 3:  # three openings, three paid payments
            self.failures.append(f"expected 6 ledger rows, found {len(rows)}")

    def verify(self) -> None:
        """Sequence and hash chain; every row's signatures (`--keys`); and the ledger's
        receipts the daemons kept (`--receipts`)."""
        cfg = self.net.config
        path = cfg.resolve(cfg.ledger.path)
        receipts = cfg.resolve(cfg.payer.receipts_dir)
        self.console.rule("python -m ledger verify --keys --receipts")
        proc = subprocess.run([sys.executable, "-m", "ledger", "verify", str(path), "--keys",
                               str(self.config), "--receipts", str(receipts)],
                              capture_output=True, text=True, check=False, timeout=60,
                              cwd=self.root, env=self.net.env())
        self.console.print((proc.stdout + proc.stderr).strip(), highlight=False)
        if proc.returncode != 0:
            self.failures.append(f"ledger verify exited {proc.returncode}")


async def _silent_receiver(demo: Demo, host: str, port: int) -> None:
    """dave logged in, answering pings but never an offer: alice's payment to him ends
    `receiver_timeout` after offer_timeout_s, with nothing held or written."""
    never = asyncio.Event()

    async def hold_on(offer: Offer) -> bool:
        await never.wait()
        return True

    cfg = load_config(demo.config)
    dave = PayerClient.from_config(cfg, "dave", host=host, port=port, on_offer=hold_on)
    await dave.connect()
    try:
        await asyncio.to_thread(demo.failing_step, Step(
            "to dave, whose software never answers the offer", "alice", ["dave", "2.00"],
            "receiver_timeout"))
    finally:
        never.set()
        await dave.close()


async def _stranger(config_path: Path, host: str, port: int) -> tuple[str, str]:
    """What a stranger gets: (plain TCP hello as alice, TLS login as alice with another
    key). `closed` means the router closed the connection without a frame."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode_frame(encode(Hello(id=1, version=PROTOCOL_VERSION, role="payer",
                                           peer="alice"))))
    try:
        answer = await asyncio.wait_for(reader.read(1024), 5.0)
        plain = "answered" if answer.startswith(b"\x00") else "closed"
    except (ConnectionError, TimeoutError):
        plain = "closed"
    finally:
        writer.close()
    cfg = load_config(config_path)
    forged = PayerCredentials(cfg.network.id, Ed25519PrivateKey.generate(),
                              client_tls(KeyStore.for_config(cfg), "router"))
    client = PayerClient(host, port, "alice", credentials=forged)
    try:
        await client.connect()
        await client.send_payment("bob", 100)
        signed = "paid"
    except RequestFailed as exc:
        signed = str(exc.code)
    except (ConnectionLost, OSError, TimeoutError) as exc:
        signed = type(exc).__name__
    finally:
        await client.close()
    return plain, signed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, ledger)")
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    root = Path(tempfile.mkdtemp(prefix="jackpay-demo-"))
    demo = Demo(root, console)
    code = 1
    try:
        code = demo.run()
    except ProcessFailed as exc:
        demo.failures.append(str(exc))
    finally:
        codes = demo.net.stop_all()
        console.rule("stopped")
        console.print(", ".join(f"{n} exit {c}" for n, c in codes.items()), highlight=False)
        bad_exits = {n: c for n, c in codes.items() if c != 0}
        if bad_exits:
            demo.failures.append(f"processes did not exit 0: {bad_exits}")
    if demo.failures:
        console.print("[red]demo FAILED:[/]\n  " + "\n  ".join(demo.failures), highlight=False)
        console.print(f"logs kept in {root / 'run'}")
        return 1
    console.print("[green]demo OK[/]: every outcome as expected; the ledger verifies.")
    if args.keep:
        console.print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
