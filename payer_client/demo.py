"""The JackPay demo (what `scripts/demo` runs): a three-payer network in a temp folder.

It makes the network's keys, starts ledger, router and the daemons of alice, bob and
carol on ephemeral ports, then drives the real CLI (`python -m payer_client ... --json`)
through payments that succeed and payments that hit each failure path a person can
provoke from the CLI, shows a stranger who knows alice's name failing to pay as alice,
prints every outcome, the balances and the ledger, runs `python -m ledger verify`, and
stops everything. Exit 0 only if every outcome was the expected one, the ledger verifies
and the balances add up; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
from common.messages import Hello, encode
from common.money import format_amount, parse_amount
from common.procs import ProcessFailed
from common.tls import client_tls
from payer_client.client import PayerClient, PayerCredentials
from payer_client.launch import REPO_ROOT, LocalNetwork
from payer_client.render import printable

OPENING = {"alice": "1000.00", "bob": "50.00", "carol": "20.00"}
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
offer_timeout_s = 3.0

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
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-m", "payer_client", *args, "--json", "--config",
             str(self.config), "--id", who],
            capture_output=True, text=True, env=env, timeout=60, check=False,
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
        self.stranger()
        self.show_balances()
        self.show_ledger()
        self.verify()
        return 0

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
        for who, opening in OPENING.items():
            rc, doc = self.cli(who, "balance")
            if rc != 0:
                self.failures.append(f"balance of {who}: exit {rc} {doc}")
                continue
            total += int(doc["balance_minor"])
            table.add_row(who, opening, doc["balance"], doc["available"],
                          doc.get("last_tx_time") or "")
        self.console.print(table)
        opening_total = sum(parse_amount(v) for v in OPENING.values())
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
        path = self.net.config.resolve(self.net.config.ledger.path)
        self.console.rule("python -m ledger verify")
        proc = subprocess.run([sys.executable, "-m", "ledger", "verify", str(path)],
                              capture_output=True, text=True, check=False, timeout=60,
                              cwd=self.root)
        self.console.print((proc.stdout + proc.stderr).strip(), highlight=False)
        if proc.returncode != 0:
            self.failures.append(f"ledger verify exited {proc.returncode}")


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
