"""`jackpay-router top`: a live view of a running router, refreshed every second.

    jackpay-router top [--config network.toml] [--admin PATH] [--interval 1] [--count N]

Polls the admin socket's `inspect` and shows, per interval: payments/s by outcome (paid
and each error code), payments in flight (and the oldest), sessions, the ledger link
(connected, appends/s, re-sends/s, rows in doubt), held funds; and, when the router runs
with metrics on (`[router] metrics_addr`), the interval's payment latency p50 / p99 from
its histogram. Ctrl-C stops it; `--count N` stops after N refreshes (and, when not on a
terminal, prints each as plain text). Exit codes: 0, 2 usage, 3 the router did not
answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from common.aio import run
from common.messages import InspectReply
from common.metrics import BUCKETS_S
from common.money import format_amount
from router.inspect_cli import NotAnswering, admin_path, fetch


def quantile_ms(before: list[int], after: list[int], q: float) -> float | None:
    """The q-quantile (upper bucket bound, ms) of what was observed between two
    snapshots of the histogram; None if nothing was."""
    if not after:
        return None
    delta = [a - (before[i] if i < len(before) else 0) for i, a in enumerate(after)]
    total = sum(delta)
    if total <= 0:
        return None
    want = q * total
    running = 0
    for i, n in enumerate(delta):
        running += n
        if running >= want:
            return BUCKETS_S[i] * 1000 if i < len(BUCKETS_S) else float("inf")
    return float("inf")


def frame(prev: InspectReply, cur: InspectReply, seconds: float) -> Table:
    """One refresh: the interval between two `inspect` replies."""
    t = Table(title=f"jackpay-router top — every {seconds:.1f} s", show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    rates = {k: (v - prev.outcomes.get(k, 0)) / seconds for k, v in cur.outcomes.items()}
    t.add_row("paid/s", f"{rates.get('paid', 0.0):,.1f}")
    failed = {k: r for k, r in rates.items() if k != "paid" and r > 0}
    t.add_row("failed/s", ", ".join(f"{k} {r:,.1f}" for k, r in sorted(failed.items()))
              or "0")
    p50 = quantile_ms(prev.payment_seconds_buckets, cur.payment_seconds_buckets, 0.5)
    p99 = quantile_ms(prev.payment_seconds_buckets, cur.payment_seconds_buckets, 0.99)
    t.add_row("latency p50 / p99 (ms, ≤)",
              "metrics off" if not cur.payment_seconds_buckets
              else "no payments" if p50 is None else f"{p50:g} / {p99:g}")
    oldest = max((p.age_ms for p in cur.in_flight), default=0)
    t.add_row("in flight", f"{len(cur.in_flight)} (oldest {oldest} ms)")
    t.add_row("sessions", str(len(cur.sessions)))
    link, was = cur.ledger_link, prev.ledger_link
    t.add_row("ledger", ("connected" if cur.ledger_connected else "NOT CONNECTED") +
              f"; appends/s {(link.get('appends_sent', 0) - was.get('appends_sent', 0)) / seconds:,.1f}"
              f", re-sends/s {(link.get('resends', 0) - was.get('resends', 0)) / seconds:,.1f}"
              f", rows in doubt {link.get('in_doubt_now', 0)}")
    t.add_row("held", format_amount(sum(cur.holds.values())))
    t.add_row("logins refused", str(cur.refused_logins))
    return t


def main(argv: list[str]) -> int:
    prog = "jackpay-router top"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("JACKPAY_CONFIG"))
    ap.add_argument("--admin", metavar="PATH")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    ap.add_argument("--count", type=int, help="stop after this many refreshes")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if not 0.1 <= args.interval <= 3600 or (args.count is not None and args.count < 1):
        print(f"{prog}: --interval must be 0.1..3600 s and --count at least 1",
              file=sys.stderr)
        return 2
    path = admin_path(args, prog)
    if path is None:
        return 2
    console = Console()

    async def go() -> int:
        try:
            prev = await fetch(path)
            prev_t = time.monotonic()
            shown = 0
            with Live(console=console, auto_refresh=False,
                      transient=False) if console.is_terminal else _Plain(console) as live:
                while args.count is None or shown < args.count:
                    await asyncio.sleep(args.interval)
                    cur = await fetch(path)
                    now = time.monotonic()
                    live.update(frame(prev, cur, now - prev_t), refresh=True)
                    prev, prev_t = cur, now
                    shown += 1
        except NotAnswering as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 3
        return 0

    try:
        return run(go, fast=False)
    except KeyboardInterrupt:
        return 0


class _Plain:
    """Not a terminal: print each refresh, one after the other."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, table: Table, refresh: bool = True) -> None:
        self.console.print(table)
