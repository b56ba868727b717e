"""`scripts/bench` / `jackpay-bench`: JackPay's durable payment rate and latency, with the
machine's limits measured in the same run and JackPay's figures shown as ratios to them.

    scripts/bench                 # full run (a few minutes)
    scripts/bench --quick         # under a minute: smaller settings, no 1M-row rebuild
    scripts/bench --json          # one JSON document on stdout instead of tables
    scripts/bench --store postgresql   # also: the ledger on PostgreSQL vs CSV vs pgbench
    scripts/bench --scale [--rows N]   # its own run: start times on 10M rows, both stores

Every payment is fsync'd by the ledger before the sender is told `paid`. Security is on,
as in every network: TLS 1.3 on every link, payers logged in with their keys, the router
a mutual-TLS client of the ledger. For comparison only, the same closed-loop settings
(and the same offered rates) then run on a network started with TLS and login off —
labelled `plain`, never a supported way to run a network — and the report gives
secure / plain.

`--store postgresql` (only when asked: it needs the PostgreSQL 15 server and about two
more minutes) adds, in the same run, the store comparison: two throwaway clusters
(ledger.pgcluster; fsync and synchronous_commit on), one alone (`postgres`) and one with
a synchronous standby (`standby`); the same closed loop at saturation on a CSV network,
a PostgreSQL one and a PostgreSQL-with-standby one, interleaved in rounds; p99 of an open
loop at half each one's peak; the ledger's RSS and start time; and pgbench's built-in
TPC-B (`pgbench -i -s 10`, then `-c 8 -j 2 -T S`) on each cluster (`pgbench`). Ratios:
postgres / pgbench TPC-B, postgres / CSV, standby / CSV.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.load import Op, Result, closed_loop, cpu_seconds, measure_fsync, open_loop, rss_kib
from bench.stall import StallProbes
from common import PROTOCOL_VERSION
from common.aio import Channel, open_channel, run
from common.config import load_config
from common.errors import JackPayError
from common.keygen import ensure_keys
from common.keys import KeyStore
from common.messages import (
    LEDGER_REPLIES,
    Hello,
    Ping,
    Pong,
    Stats,
    StatsReply,
    Welcome,
    decoder_for,
)
from common.procs import Proc, python_module
from common.tls import ClientTls, client_tls
from common.version import add_version
from ledger.pgcluster import PgCluster
from ledger.rows import GENESIS_HASH, HEADER_LINE, format_line, make_row
from payer_client.client import PayerClient, PayerCredentials

PLAIN_FLAG = "--plain-benchmark-only"
UNSIGNED_FLAG = "--unsigned-benchmark-only"
TASK_PATH_FLAG = "--append-task-path-benchmark-only"
PAYOUT_WAIT_S = 120.0  # the mixer's rounds close within max_wait_s; far more is a failure
REPO_ROOT = str(Path(__file__).resolve().parents[1])
# The plug-in comparison: the mixer enabled (idle for direct payments), short rounds.
MIXER_PLUGINS = """plugins = ["mixer"]
plugin_tick_s = 0.05

[plugins.mixer]
min_payers = 5
min_delay_s = 0.05
max_delay_s = 0.2
max_wait_s = 2.0
max_waiting_per_payer = 10000
retry_s = 0.3"""
MIX_AMOUNTS = (500, 1000, 2000, 5000)  # a few common amounts: rounds fill


@dataclass
class Settings:
    payers: int = 50
    concurrency: tuple[int, ...] = (1, 16, 64, 256, 1024)
    seconds: float = 5.0
    open_loop_s: float = 5.0
    idle_sessions: int = 1000
    rebuild_rows: tuple[int, ...] = (100_000, 1_000_000)
    echo_connections: int = 50
    # Open-loop rates measured besides half the peak: half of issue 5's 6,000/s target.
    open_rates: tuple[float, ...] = (3000.0,)
    plugin_rounds: int = 8  # interleaved pairs: no plug-ins / the mixer enabled but idle
    plugin_seconds: float = 5.0  # each plug-in setting's closed loop
    metrics_rounds: int = 6  # interleaved pairs: metrics off / on and scraped every second
    metrics_seconds: float = 5.0
    signature_rounds: int = 4  # rounds of unsigned / signed, back to back
    signature_concurrency: tuple[int, ...] = (256, 1024)  # saturation: the best of these
    turns_rounds: int = 3  # interleaved pairs: append's first attempt direct / on a task
    turns_open_rate: float = 3000.0  # the open loop where the append leg is timed
    store_rounds: int = 3  # --store postgresql: interleaved rounds of csv / postgres / standby
    store_concurrency: int = 256  # the closed loop at saturation
    pgbench_seconds: float = 10.0
    fsync_seconds: float = 2.0  # the bare fsync measurement


QUICK = Settings(payers=20, concurrency=(1, 64), seconds=0.5, open_loop_s=0.5,
                 idle_sessions=200, rebuild_rows=(20_000,), echo_connections=20,
                 open_rates=(), plugin_rounds=1, plugin_seconds=0.5, metrics_rounds=1,
                 metrics_seconds=0.5, signature_rounds=1,
                 signature_concurrency=(64,), turns_rounds=1, turns_open_rate=500.0,
                 store_rounds=1, store_concurrency=64,
                 pgbench_seconds=3.0, fsync_seconds=0.5)


def median_ratio(base: list[float], other: list[float]) -> float | None:
    """The median of the pairs' other/base (pairs run back to back: the machine in the
    same mood within a pair); None without a pair."""
    ratios = sorted(y / x for x, y in zip(base, other, strict=True) if x)
    return round(ratios[len(ratios) // 2], 3) if ratios else None


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class _PaymentNetwork:
    """One network under measurement: its processes, a ledger channel for statistics,
    logged-in clients, the payments it drives and the results of each setting."""

    prefix: str  # "" (secure) or "plain "
    ledger: Proc

    router: Proc
    lch: Channel
    clients: list[PayerClient]
    payers: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    admin: str = ""  # the router's admin socket

    def __post_init__(self) -> None:
        rng = random.Random(7)
        counter = iter(range(10**9))
        clients, payers = self.clients, self.payers

        async def mixed(i: int) -> bool:
            a = rng.randrange(len(clients))
            b = rng.randrange(len(clients) - 1)
            b += b >= a
            try:
                await clients[a].send_payment(payers[b], rng.choice(MIX_AMOUNTS),
                                              tx_id=f"m{next(counter)}", mix=True)
            except (JackPayError, TimeoutError):
                return False
            return True

        self.mixed_op: Op = mixed

        async def op(i: int) -> bool:
            a = rng.randrange(len(clients))  # two distinct payers, cheaper than sample()
            b = rng.randrange(len(clients) - 1)
            b += b >= a
            try:
                await clients[a].send_payment(payers[b], rng.randint(1, 100),
                                              tx_id=f"b{next(counter)}")
            except (JackPayError, TimeoutError):
                return False
            return True

        self.op: Op = op

    async def measured(self, load: Awaitable[Result], bench: Bench) -> Result:
        """Run one setting; add rows per fsync and CPU seconds per process to it."""
        before = await bench.ledger_stats(self.lch)
        cpu0 = {n: cpu_seconds(p.pid) for n, p in (("ledger", self.ledger),
                                                    ("router", self.router))}
        cpu0["bench"] = time.process_time()
        res = await load
        after = await bench.ledger_stats(self.lch)
        bench.annotate(res, before, after, cpu0, self.ledger, self.router)
        res.annotate_stalls(bench.probes.stalls)
        self.results.append(res.summary())
        return res

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        self.lch.close()
        self.router.stop()
        self.ledger.stop()


class Bench:
    def __init__(self, root: Path, settings: Settings, progress: Any) -> None:
        self.root = root
        self.s = settings
        self.progress = progress
        self.procs: list[Proc] = []
        self.report: dict[str, Any] = {"settings": settings.__dict__.copy(), "machine": machine()}
        self.probes = StallProbes()  # bench/stall.py: the host's stalls, in every setting
        self.open_echo: Callable[[str, float], Awaitable[Result]] | None = None
        self.ledger_start_s: dict[str, float] = {}  # by network tag

    # --- processes -----------------------------------------------------------------

    def start(self, name: str, argv: list[str]) -> Proc:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        proc = Proc(name, argv, self.root / "logs" / f"{name}.log", env=env, cwd=self.root)
        proc.start(timeout=120)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def write_config(self, path: Path, payers: list[str], ledger_port: int, csv: str,
                     opening: str = "1000000.00", router_extra: str = "",
                     dsn: str = "") -> None:
        """`router_extra`: TOML lines for [router] (`plugins = [...]`, `metrics_addr`)
        and the plug-in tables after them (a blank line separates the two)."""
        router_lines, _, tables = router_extra.partition("\n\n")
        lines = ["[network]", 'id = "bench"', f'keys_dir = "keys-{path.stem}"', "",
                 "[ledger]", 'host = "127.0.0.1"', f"port = {ledger_port}", f'path = "{csv}"',
                 *([f'store = "postgresql"\ndsn = "{dsn}"'] if dsn else []),
                 "", "[router]", 'host = "127.0.0.1"', "port = 0",
                 f'admin_socket = "{path.stem}-admin.sock"', "offer_timeout_s = 10.0",
                 "ledger_timeout_s = 10.0", "outcome_pending_after_s = 30.0"]
        lines += [line for line in router_lines.splitlines() if line]
        for p in payers:
            lines += ["", "[[participants]]", f'id = "{p}"', 'kind = "software"',
                      f'opening_balance = "{opening}"']
        if tables:
            lines += ["", tables]
        path.write_text("\n".join(lines) + "\n")
        ensure_keys(load_config(path))

    def start_network(self, tag: str, payers: list[str], csv: str = "ledger.csv", *,
                      plain: bool = False, router_extra: str = "",
                      dsn: str = "", unsigned: bool = False,
                      router_flags: tuple[str, ...] = ()) -> tuple[Proc, Proc, Path]:
        """`dsn`: the ledger on PostgreSQL there (else the CSV file `csv`). `unsigned`:
        the router does not check payments' signatures (the comparison of their cost).
        `router_flags`: more of the router's hidden benchmark flags."""
        cfg = self.root / f"{tag}.toml"
        flag = [PLAIN_FLAG] if plain else []
        self.write_config(cfg, payers, 0, csv, router_extra=router_extra, dsn=dsn)
        t0 = time.perf_counter()
        ledger = self.start(f"{tag}-ledger", python_module("ledger", "--config", str(cfg),
                                                           *flag))
        self.ledger_start_s[tag] = round(time.perf_counter() - t0, 2)
        self.write_config(cfg, payers, ledger.addr[1], csv, router_extra=router_extra, dsn=dsn)
        flags = [*flag, *([UNSIGNED_FLAG] if unsigned else []), *router_flags]
        router = self.start(f"{tag}-router", python_module("router", "--config", str(cfg),
                                                           *flags))
        return ledger, router, cfg

    def clients(self, cfg: Path, router: Proc, payers: list[str], *, plain: bool = False,
                **kw: Any) -> list[PayerClient]:
        """One client per payer; logged in with its key unless `plain`."""
        config = load_config(cfg)
        return [PayerClient(*router.addr, p, credentials=None if plain else
                            PayerCredentials.from_config(config, p), **kw) for p in payers]

    # --- limits --------------------------------------------------------------------

    async def limits(self) -> None:
        task = self.progress.add_task("machine limits", total=5)
        self.report["fsync"] = await asyncio.to_thread(measure_fsync, str(self.root),
                                                      self.s.fsync_seconds)
        self.progress.advance(task)
        cfg = self.root / "echo.toml"
        self.write_config(cfg, [], 0, "unused.csv")
        store = KeyStore.for_config(load_config(cfg))
        self.report["echo"] = []
        for tls in (False, True):
            extra = ["--tls", str(cfg)] if tls else []
            client = client_tls(store, "router") if tls else None
            kind = "TLS" if tls else "plain"
            echo = self.start(f"echo-{kind}", python_module("bench.echo", *extra))
            one = await self.echo_rate(f"echo 1 hop {kind}", echo.addr, client)
            self.progress.advance(task)
            recv = self.start(f"echo-recv-{kind}", python_module("bench.echo", *extra))
            mid = self.start(f"echo-mid-{kind}", python_module(
                "bench.echo", "--upstream", "{}:{}".format(*recv.addr), *extra))
            three = await self.echo_rate(f"echo 3 hops {kind}", mid.addr, client)
            self.progress.advance(task)
            self.report["echo"] += [one.summary(), three.summary()]
            for p in (echo, recv, mid):
                p.stop()

    async def echo_channels(self, addr: tuple[str, int], tls: ClientTls | None
                            ) -> tuple[list[Channel], Op]:
        dec = decoder_for((Welcome, Pong))
        chans: list[Channel] = []
        for _ in range(self.s.echo_connections):
            ch = await open_channel(*addr, dec, name="echo", tls=tls)
            await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="client"))
            chans.append(ch)

        async def op(i: int) -> bool:
            await chans[i % len(chans)].request(Ping(id=0))
            return True

        return chans, op

    async def echo_rate(self, label: str, addr: tuple[str, int], tls: ClientTls | None) -> Result:
        chans, op = await self.echo_channels(addr, tls)
        res = await closed_loop(label, op, self.s.echo_connections * 4, self.s.seconds)
        res.annotate_stalls(self.probes.stalls)
        for ch in chans:
            ch.close()
        return res

    async def start_open_echo(self) -> None:
        """A plain three-hop echo kept running for the open loops: at each offered rate
        of the payments' open-loop settings, the echo is offered the same rate right after
        (`echo 3 hops plain open R/s`), so the report shows JackPay's tail next to the
        machine's at that rate."""
        recv = self.start("echo-open-recv", python_module("bench.echo"))
        mid = self.start("echo-open-mid", python_module(
            "bench.echo", "--upstream", "{}:{}".format(*recv.addr)))
        _, op = await self.echo_channels(mid.addr, None)

        async def run_at(label: str, rate: float) -> Result:
            res = await open_loop(label, op, rate, self.s.open_loop_s)
            res.annotate_stalls(self.probes.stalls)
            return res

        self.open_echo = run_at

    # --- payments ------------------------------------------------------------------

    async def payment_network(self, *, plain: bool, tag: str = "",
                              router_extra: str = "", dsn: str = "",
                              unsigned: bool = False,
                              router_flags: tuple[str, ...] = ()) -> _PaymentNetwork:
        """A running network (ledger, router, `payers` clients logged in) to measure;
        `dsn`: its ledger on PostgreSQL; `unsigned`: payments not signed nor checked."""
        tag = tag or ("plain" if plain else "pay")
        payers = [f"p{i:04d}" for i in range(self.s.payers)]
        ledger, router, cfg = self.start_network(tag, payers, f"{tag}.csv", plain=plain,
                                                 router_extra=router_extra, dsn=dsn,
                                                 unsigned=unsigned, router_flags=router_flags)
        auditor = None if plain else client_tls(KeyStore.for_config(load_config(cfg)),
                                                 "ledger", identity="auditor")
        lch = await open_channel(*ledger.addr, decoder_for(LEDGER_REPLIES), name="ledger",
                                 tls=auditor)
        await lch.request(Hello(id=0, version=PROTOCOL_VERSION, role="admin", peer="bench"))
        clients = self.clients(cfg, router, payers, plain=plain, request_timeout_s=60,
                               sign=not unsigned)
        for c in clients:
            await c.connect()
        net = _PaymentNetwork("plain " if plain else "", ledger, router, lch, clients, payers)
        net.admin = str(self.root / f"{tag}-admin.sock")
        return net

    async def payments(self, *, compare_plain: bool = True) -> None:
        """Every setting on the secure network and then, right after it (so the machine
        is in the same mood), on the plain one: closed loops, then open loops at half the
        secure peak and at the settings' fixed rates."""
        networks = [await self.payment_network(plain=False)]
        if compare_plain:
            networks.append(await self.payment_network(plain=True))
        # As the router does after start: the driver's full collections then skip
        # everything made so far, so its pauses are not counted as payment latency.
        gc.collect()
        gc.freeze()
        task = self.progress.add_task("payments", total=len(networks) * (
            len(self.s.concurrency) + 1 + len(self.s.open_rates)) + 1 + len(self.s.open_rates))

        async def each(label: str, load: Callable[[str, Op], Awaitable[Result]]) -> Result:
            first: Result | None = None
            for net in networks:
                res = await net.measured(load(net.prefix + label, net.op), self)
                first = first or res
                self.progress.advance(task)
            assert first is not None
            return first

        def closed(conc: int) -> Callable[[str, Op], Awaitable[Result]]:
            return lambda label, op: closed_loop(label, op, conc, self.s.seconds)

        def opened(rate: float) -> Callable[[str, Op], Awaitable[Result]]:
            return lambda label, op: open_loop(label, op, rate, self.s.open_loop_s)

        peak = 0.0
        for conc in self.s.concurrency:
            res = await each(f"closed C={conc}", closed(conc))
            peak = max(peak, res.rate)
        if self.open_echo is None:
            await self.start_open_echo()
        assert self.open_echo is not None
        echoes = self.report.setdefault("echo_open", [])
        for rate in (max(1.0, peak / 2), *self.s.open_rates):
            await each(f"open {rate:.0f}/s", opened(rate))
            echoes.append((await self.open_echo(f"echo 3 hops plain open {rate:.0f}/s",
                                                rate)).summary())
            self.progress.advance(task)
        for net in networks:
            key = "plain_" if net.prefix else ""
            self.report[f"{key}payments"] = net.results
            self.report[f"{key}peak_payments_per_s"] = round(
                max(r["per_s"] for r in net.results if "offered_per_s" not in r), 1)
            await net.close()

    async def plugin_costs(self) -> None:
        """Direct payments on a network without plug-ins and on one with the mixer enabled
        but idle, interleaved (`plugin_rounds` pairs of the same closed loop): router CPU
        per payment on each. Then mixed payments on the mixer's network: deposits for one
        setting's time, and the rate counted until the last payout is in the ledger."""
        from chaos.network import inspect_router

        rounds = self.s.plugin_rounds
        task = self.progress.add_task("plug-ins", total=2 * rounds + 1)
        bare = await self.payment_network(plain=False, tag="noplug")
        mixer = await self.payment_network(plain=False, tag="mixer",
                                           router_extra=MIXER_PLUGINS)
        conc = 64
        results, per_payment, idle_vs_none = await self.interleaved(
            (bare, "none"), (mixer, "mixer idle"), rounds, self.s.plugin_seconds,
            f"direct C={conc} plugins: ", conc, task)
        # Mixed: deposits for `seconds`, then until the pool is empty (payouts made).
        before = await self.ledger_stats(mixer.lch)
        cpu0 = cpu_seconds(mixer.router.pid)
        res = await closed_loop(f"mixed C={conc} (deposit + payouts)", mixer.mixed_op, conc,
                                self.s.plugin_seconds)
        deadline = time.perf_counter() + PAYOUT_WAIT_S
        while (await inspect_router(mixer.admin)).balances.get("_mixer"):
            # polled: the pool's balance lives in another process
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the mixer's pool still holds money {PAYOUT_WAIT_S:.0f} s "
                                   "after the last deposit; see the router's log")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - res.began  # from the measured span's start
        after = await self.ledger_stats(mixer.lch)
        deposits = res.ok
        # per_s: deposits while the loop ran (what a payer sees); paid_out_per_s: counted
        # until the last payout is in the ledger (rounds wait for K payers, a random
        # delay, and for the last stragglers max_wait_s).
        mixed = res.summary() | {
            "paid_out_per_s": round(deposits / elapsed, 1), "until_paid_out_s": round(elapsed, 2),
            "ledger_rows_per_mixed_payment": round((after.rows - before.rows) / deposits, 2)
            if deposits else 0,
            "router_cpu_us_per_payment": round((cpu_seconds(mixer.router.pid) - cpu0)
                                               / deposits * 1e6, 1) if deposits else 0}
        self.progress.advance(task)
        for net in (bare, mixer):
            await net.close()
        direct = [r for r in results if r["label"].endswith("mixer idle")]
        self.report["plugins"] = {
            "settings": [*results, mixed],
            "router_cpu_us_per_payment": per_payment,
            "idle_vs_none_router_cpu": idle_vs_none,
            "mixed_vs_direct_per_s": round(mixed["per_s"] / max(
                r["per_s"] for r in direct), 3) if direct else None,
        }

    async def router_cost(self, net: _PaymentNetwork, load: Awaitable[Result]
                          ) -> tuple[Result, float]:
        """Run one setting on `net` (`measured`): its result, and the router's CPU per
        payment written (µs; with its verifier)."""
        before = await self.ledger_stats(net.lch)
        res = await net.measured(load, self)
        after = await self.ledger_stats(net.lch)
        rows = after.rows - before.rows
        cpu = res.extra["cpu_s"]["router"]  # type: ignore[index]
        return res, round(cpu / rows * 1e6, 1) if rows else 0.0

    async def interleaved(self, a: tuple[_PaymentNetwork, str], b: tuple[_PaymentNetwork, str],
                          rounds: int, seconds: float, label: str, conc: int, task: Any
                          ) -> tuple[list[dict[str, Any]], dict[str, list[float]], float | None]:
        """`rounds` pairs of the same closed loop on networks `a` and `b`, back to back
        (the order alternating): each setting's summary with the router's CPU per
        payment, those figures per name, and the median of the pairs' b/a ratios — the
        machine in the same mood within a pair, not medians taken minutes apart."""
        per_payment: dict[str, list[float]] = {a[1]: [], b[1]: []}
        results = []
        for i in range(rounds):
            for net, name in ((a, b) if i % 2 == 0 else (b, a)):
                _, us = await self.router_cost(net, closed_loop(f"{label}{name}", net.op, conc,
                                                                seconds))
                per_payment[name].append(us)
                results.append(net.results[-1] | {"router_cpu_us_per_payment": us})
                self.progress.advance(task)
        return results, per_payment, median_ratio(per_payment[a[1]], per_payment[b[1]])

    async def signature_cost(self) -> None:
        """What signed payments cost: payments/s at saturation on a network whose payers
        sign every `pay` and `receipt` (inside the timed loop, as real payers do) and whose
        router checks both, and on one where nobody signs and the router checks nothing
        (`unsigned`, the router's hidden `--unsigned-benchmark-only`). Saturation is the
        best of the closed loops at each of `signature_concurrency` (as the payments
        section's peak is the best of its closed loops): signed payments wait longer for
        their checks, so they need more in flight to fill the machine. Each round runs
        every setting on both networks back to back, the order alternating; the ratio is
        the median of the rounds' signed peak / unsigned peak (issue 12's target: >= 0.5).
        Also the router CPU per payment (with its verifier) of each setting."""
        rounds, concs = self.s.signature_rounds, self.s.signature_concurrency
        task = self.progress.add_task("signatures", total=2 * rounds * len(concs))
        nets = {"unsigned": await self.payment_network(plain=False, tag="unsigned",
                                                       unsigned=True),
                "signed": await self.payment_network(plain=False, tag="signed")}
        settings: list[dict[str, Any]] = []
        per_s: dict[str, dict[str, list[float]]] = {n: {str(c): [] for c in concs}
                                                    for n in nets}
        cpu: dict[str, dict[str, list[float]]] = {n: {str(c): [] for c in concs} for n in nets}
        try:
            for i in range(rounds):
                order = ("unsigned", "signed") if i % 2 == 0 else ("signed", "unsigned")
                for conc in concs:
                    for name in order:
                        net = nets[name]
                        _, us = await self.router_cost(net, closed_loop(
                            f"direct C={conc} {name}", net.op, conc, self.s.seconds))
                        settings.append(net.results[-1] | {"router_cpu_us_per_payment": us})
                        per_s[name][str(conc)].append(settings[-1]["per_s"])
                        cpu[name][str(conc)].append(us)
                        self.progress.advance(task)
        finally:
            for net in nets.values():
                await net.close()

        peaks = {n: [max(per_s[n][str(c)][i] for c in concs) for i in range(rounds)]
                 for n in nets}
        self.report["signatures"] = {
            "settings": settings, "per_s": per_s, "peak_per_s": peaks,
            "router_cpu_us_per_payment": cpu,
            "signed_vs_unsigned_per_s": median_ratio(peaks["unsigned"], peaks["signed"]),
            "signed_vs_unsigned_at": {str(c): median_ratio(per_s["unsigned"][str(c)],
                                                           per_s["signed"][str(c)])
                                      for c in concs},
            "signed_vs_unsigned_router_cpu": median_ratio(
                [u for c in concs for u in cpu["unsigned"][str(c)]],
                [x for c in concs for x in cpu["signed"][str(c)]])}

    async def loop_turns(self) -> None:
        """Issue 14's fewer loop turns, before and after, interleaved: an append's first
        attempt sent directly (`direct`, today) or on the task path as before (`task`: the
        router's hidden --append-task-path-benchmark-only). Per pair: the closed loop at
        saturation (router CPU per payment) and an open loop at `turns_open_rate` (the
        append leg: the router's own histogram, rows sent -> the ledger's answer). Unsigned
        networks (TLS and login on): the verifier's CPU would hide the router's own."""
        rounds, rate = self.s.turns_rounds, self.s.turns_open_rate
        task = self.progress.add_task("loop turns", total=4 * rounds)
        metrics = 'metrics_addr = "127.0.0.1:0"'
        nets = {"direct": await self.payment_network(plain=False, tag="direct", unsigned=True,
                                                     router_extra=metrics),
                "task": await self.payment_network(plain=False, tag="task", unsigned=True,
                                                   router_extra=metrics,
                                                   router_flags=(TASK_PATH_FLAG,))}
        conc = self.s.store_concurrency
        out: dict[str, dict[str, list[Any]]] = {
            name: {"per_s": [], "router_cpu_us_per_payment": [], "append_ms_closed": [],
                   "append_ms_open": []} for name in nets}
        settings: list[dict[str, Any]] = []
        try:
            for i in range(rounds):
                for name in (("direct", "task") if i % 2 == 0 else ("task", "direct")):
                    net = nets[name]
                    for kind, load in (
                            ("closed", closed_loop(f"turns C={conc} {name}", net.op, conc,
                                                   self.s.seconds)),
                            ("open", open_loop(f"turns open {rate:.0f}/s {name}", net.op, rate,
                                               self.s.open_loop_s))):
                        h0 = await scrape_histogram(net, "jackpay_router_append_seconds")
                        _, us = await self.router_cost(net, load)
                        leg = histogram_delta(
                            h0, await scrape_histogram(net, "jackpay_router_append_seconds"))
                        summary = net.results[-1] | {"append_leg_ms": leg}
                        settings.append(summary)
                        o = out[name]
                        o[f"append_ms_{kind}"].append(leg)
                        if kind == "closed":
                            o["per_s"].append(summary["per_s"])
                            o["router_cpu_us_per_payment"].append(us)
                        self.progress.advance(task)
        finally:
            for net in nets.values():
                await net.close()
        self.report["loop_turns"] = {
            "settings": settings, **out,
            "task_vs_direct_router_cpu": median_ratio(out["direct"]["router_cpu_us_per_payment"],
                                                      out["task"]["router_cpu_us_per_payment"])}

    async def metrics_cost(self) -> None:
        """The cost of counting: router CPU per payment with metrics off and on (scraped
        every second, as a busy Prometheus would), interleaved pairs."""
        rounds = self.s.metrics_rounds
        task = self.progress.add_task("metrics", total=2 * rounds)
        off = await self.payment_network(plain=False, tag="nometrics")
        on = await self.payment_network(plain=False, tag="metrics",
                                        router_extra='metrics_addr = "127.0.0.1:0"')
        scrapes = 0

        async def scrape() -> None:
            nonlocal scrapes
            while True:
                if "jackpay_router_payments_total" in await fetch_metrics(
                        on.router.ready["metrics"]):
                    scrapes += 1
                await asyncio.sleep(1.0)

        scraper = asyncio.get_running_loop().create_task(scrape())
        try:
            results, per_payment, on_vs_off = await self.interleaved(
                (off, "off"), (on, "on"), rounds, self.s.metrics_seconds,
                "direct C=64 metrics ", 64, task)
        finally:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await scraper
            for net in (off, on):
                await net.close()
        self.report["metrics"] = {"settings": results, "router_cpu_us_per_payment": per_payment,
                                  "on_vs_off_router_cpu": on_vs_off, "scrapes": scrapes}

    async def stores(self) -> None:
        """CSV / PostgreSQL alone / PostgreSQL with a synchronous standby: the same closed
        loop at saturation, interleaved in rounds (the machine in the same mood); then an
        open loop at half each one's peak; ledger RSS and start; pgbench TPC-B on each
        cluster. Raises ClusterError when PostgreSQL cannot be started."""
        s = self.s
        task = self.progress.add_task("stores", total=3 * s.store_rounds + 3 + 2)
        alone = await asyncio.to_thread(PgCluster.create)
        replicated: PgCluster | None = None
        nets: list[tuple[str, _PaymentNetwork]] = []
        try:
            replicated = await asyncio.to_thread(PgCluster.create)

            def attach(c: PgCluster) -> None:
                c.add_standby("s1")
                c.set_sync("s1")
                c.wait_streaming("s1", sync=True)

            await asyncio.to_thread(attach, replicated)
            nets = [("csv", await self.payment_network(plain=False, tag="storecsv")),
                    ("postgres", await self.payment_network(plain=False, tag="postgres",
                                                            dsn=alone.dsn())),
                    ("standby", await self.payment_network(
                        plain=False, tag="standby", dsn=replicated.multi_host_dsn()))]
            conc = s.store_concurrency
            per_s: dict[str, list[float]] = {name: [] for name, _ in nets}
            results: list[dict[str, Any]] = []
            for i in range(s.store_rounds):
                order = nets[i % 3:] + nets[:i % 3]
                for name, net in order:
                    res = await net.measured(closed_loop(
                        f"store {name} closed C={conc}", net.op, conc, s.seconds), self)
                    per_s[name].append(res.rate)
                    results.append(net.results[-1])
                    self.progress.advance(task)
            peak = {name: max(v) for name, v in per_s.items()}
            rss = {}
            for name, net in nets:
                res = await net.measured(open_loop(f"store {name} open {peak[name] / 2:.0f}/s",
                                                   net.op, max(1.0, peak[name] / 2),
                                                   s.open_loop_s), self)
                results.append(net.results[-1])
                rss[name] = rss_kib(net.ledger.pid)
                self.progress.advance(task)
            pgbench = {}
            for name, cluster in (("pgbench", alone), ("pgbench standby", replicated)):
                pgbench[name] = await asyncio.to_thread(run_pgbench, cluster, s.pgbench_seconds)
                self.progress.advance(task)
        finally:
            for _, net in nets:
                await net.close()
            for c in (alone, replicated):
                if c is not None:
                    await asyncio.to_thread(c.destroy)
        median = {name: sorted(v)[len(v) // 2] for name, v in per_s.items()}
        tps = pgbench["pgbench"]["tps"]
        self.report["stores"] = {
            "settings": results,
            "peak_per_s": {k: round(v, 1) for k, v in peak.items()},
            "median_per_s": {k: round(v, 1) for k, v in median.items()},
            "p99_ms_at_half_peak": {r["label"].split()[1]: r["p99_ms"] for r in results
                                    if "offered_per_s" in r},
            "ledger_rss_kib": rss,
            "ledger_start_s": {name: self.ledger_start_s[net.ledger.name[:-len("-ledger")]]
                               for name, net in nets},
            "pgbench": pgbench,
            "ratios": {
                "postgres_vs_pgbench_tpcb": round(median["postgres"] / tps, 3) if tps else None,
                "postgres_vs_csv": round(median["postgres"] / median["csv"], 3),
                "standby_vs_csv": round(median["standby"] / median["csv"], 3),
                "standby_vs_pgbench_tpcb_standby": round(
                    median["standby"] / pgbench["pgbench standby"]["tps"], 3)
                if pgbench["pgbench standby"]["tps"] else None,
            },
        }

    @staticmethod
    async def ledger_stats(ch: Channel) -> StatsReply:
        st = await ch.request(Stats(id=0))
        assert isinstance(st, StatsReply)
        return st

    @staticmethod
    def annotate(res: Result, before: StatsReply, after: StatsReply, cpu0: dict[str, float],
                 ledger: Proc, router: Proc) -> None:
        fsyncs = after.fsyncs - before.fsyncs
        res.extra["rows_per_fsync"] = round((after.rows - before.rows) / fsyncs, 1) if fsyncs else 0
        res.extra["fsync_ms_avg"] = (round((after.fsync_us_total - before.fsync_us_total)
                                           / fsyncs / 1000, 2) if fsyncs else 0)
        # fsyncs of 10 ms or more in this setting: each delays every payment of its batch
        res.extra["slow_fsyncs"] = after.slow_fsyncs - before.slow_fsyncs
        res.extra["cpu_s"] = {
            "ledger": round(cpu_seconds(ledger.pid) - cpu0["ledger"], 2),
            "router": round(cpu_seconds(router.pid) - cpu0["router"], 2),
            "bench": round(time.process_time() - cpu0["bench"], 2),
        }

    # --- scale ---------------------------------------------------------------------

    async def sessions(self) -> None:
        n = self.s.idle_sessions
        payers = [f"s{i:05d}" for i in range(n)]
        _, router, cfg = self.start_network("idle", payers)
        task = self.progress.add_task("idle sessions", total=n)
        clients: list[PayerClient] = []
        rss: dict[int, int] = {}
        for i, c in enumerate(self.clients(cfg, router, payers)):
            await c.connect()
            clients.append(c)
            if i + 1 in (10, n):
                await asyncio.sleep(0.5)
                rss[i + 1] = rss_kib(router.pid)
            self.progress.advance(task)
        per = (rss[n] - rss[10]) / (n - 10)
        self.report["sessions"] = {"rss_kib_10": rss[10], f"rss_kib_{n}": rss[n],
                                   "kib_per_idle_session": round(per, 1)}
        for c in clients:
            await c.close()
        self.stop_all()

    async def rebuild(self) -> None:
        """Start times on a ledger of N rows: the ledger (it reads its file) and the router
        (balances and the latest `recent_rows` rows from the ledger, no replay)."""
        out = {}
        ledger_s = {}
        task = self.progress.add_task("start on a large ledger", total=len(self.s.rebuild_rows))
        for rows in self.s.rebuild_rows:
            csv = f"rebuild-{rows}.csv"
            payers = [f"r{i:03d}" for i in range(100)]
            await asyncio.to_thread(synthetic_ledger, self.root / csv, payers, rows)
            cfg = self.root / f"rebuild{rows}.toml"
            self.write_config(cfg, payers, 0, csv, opening="0.00")
            t0 = time.perf_counter()
            ledger = self.start(f"rebuild{rows}-ledger", python_module("ledger", "--config", str(cfg)))
            ledger_s[str(rows)] = round(time.perf_counter() - t0, 2)
            self.write_config(cfg, payers, ledger.addr[1], csv, opening="0.00")
            t0 = time.perf_counter()
            self.start(f"rebuild{rows}-router", python_module("router", "--config", str(cfg)))
            out[str(rows)] = round(time.perf_counter() - t0, 2)
            self.stop_all()
            (self.root / csv).unlink()
            self.progress.advance(task)
        self.report["rebuild_s"] = out  # the router's start (the name is older than the change)
        self.report["ledger_start_s"] = ledger_s


def run_pgbench(cluster: PgCluster, seconds: float) -> dict[str, Any]:
    """pgbench's built-in TPC-B (three balance updates and a history insert per
    transaction, one commit each) on `cluster`'s primary: `-i -s 10`, then `-c 8 -j 2`."""
    node = cluster.primary
    node.sql("DROP DATABASE IF EXISTS pgbench", "CREATE DATABASE pgbench")
    conn = ["-h", str(node.socket_dir), "-p", str(node.port), "-U", "postgres"]
    node.run("pgbench", "-i", "-q", "-s", "10", *conn, "pgbench", timeout=600)
    out = node.run("pgbench", "-c", "8", "-j", "2", "-T", str(max(1, round(seconds))), *conn,
                   "pgbench", timeout=seconds + 120)
    tps = 0.0
    latency = None
    for line in out.splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        elif line.startswith("latency average = "):
            latency = float(line.split()[3])
    return {"tps": round(tps, 1), "latency_ms_avg": latency, "clients": 8, "threads": 2,
            "scale": 10, "seconds": max(1, round(seconds)),
            "standby": bool(cluster.sync_names)}


def synthetic_ledger(path: Path, payers: list[str], rows: int) -> None:
    """A valid, chained ledger: openings, then random payments that never overdraw."""
    rng = random.Random(1)
    bal = dict.fromkeys(payers, 0)
    prev = GENESIS_HASH
    dtg = "2026-01-01T00:00:00.000000Z"
    with open(path, "w") as f:
        f.write(HEADER_LINE)
        for seq in range(1, rows + 1):
            if seq <= len(payers):
                s, r, amt, tx = "_issuer", payers[seq - 1], 10**9, f"_open:{payers[seq - 1]}"
            else:
                s, r = rng.sample(payers, 2)
                amt = rng.randint(1, 1000)
                if bal[s] < amt:
                    s, r = r, s
                tx = f"t{seq}"
            if s != "_issuer":
                bal[s] -= amt
            bal[r] += amt
            row = make_row(prev, seq, dtg, s, r, amt, tx, "")
            prev = row.hash
            f.write(format_line(row))


def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        from importlib.metadata import version

        info["uvloop"] = version("uvloop")
    except Exception:
        info["uvloop"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


async def fetch_metrics(addr: str) -> str:
    """The text of a service's /metrics at HOST:PORT (one HTTP/1.0 GET, without blocking
    the loop that drives the load)."""
    host, _, port = addr.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        response = (await reader.read()).decode()
    finally:
        writer.close()
    return response.partition("\r\n\r\n")[2]


async def scrape_histogram(net: _PaymentNetwork, name: str) -> dict[str, float]:
    """One histogram of the router's /metrics: {"le bound": cumulative count, ...,
    "sum": s, "count": n}."""
    text = await fetch_metrics(net.router.ready["metrics"])
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                out[sample.labels["le"]] = sample.value
            elif sample.name in (f"{name}_sum", f"{name}_count"):
                out[sample.name.rsplit("_", 1)[1]] = sample.value
    return out


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean (exact: sum / count) and p50 / p99 (interpolated within the buckets, as
    Prometheus' histogram_quantile does) of what a histogram saw between two scrapes, in
    milliseconds."""
    n = after.get("count", 0.0) - before.get("count", 0.0)
    if n <= 0:
        return {"n": 0}
    bounds = sorted((float(k), after[k] - before.get(k, 0.0)) for k in after
                    if k not in ("sum", "count", "+Inf"))

    def quantile(q: float) -> float | None:
        rank, lower, below = q * n, 0.0, 0.0
        for bound, cum in bounds:
            if cum >= rank:
                inside = cum - below
                return round((lower + (bound - lower) * ((rank - below) / inside
                                                         if inside else 1.0)) * 1000, 3)
            lower, below = bound, cum
        return None  # above the highest bound

    return {"n": int(n), "mean_ms": round((after["sum"] - before.get("sum", 0.0)) / n * 1000, 3),
            "p50_ms": quantile(0.5), "p99_ms": quantile(0.99)}


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    peak = report.get("peak_payments_per_s", 0.0)
    plain_peak = report.get("plain_peak_payments_per_s")
    out: dict[str, Any] = {}
    echo = {e["label"]: e["per_s"] for e in report.get("echo", [])}
    if echo:
        # The secure network against TLS echoes; the plain one against plain echoes.
        out["vs_echo_1_hop_tls"] = round(peak / echo["echo 1 hop TLS"], 3)
        out["vs_echo_3_hops_tls"] = round(peak / echo["echo 3 hops TLS"], 3)
        # Issue 14's yardstick: the secure network against the machine's plain 3-hop echo.
        out["vs_echo_3_hops_plain"] = round(peak / echo["echo 3 hops plain"], 3)
        if plain_peak:
            out["plain_vs_echo_3_hops_plain"] = round(plain_peak / echo["echo 3 hops plain"], 3)
    echo_open = {e["offered_per_s"]: e for e in report.get("echo_open", [])}
    if echo_open:
        # JackPay's tail next to the plain 3-hop echo's, offered the same rate in the run.
        same: dict[str, Any] = {}
        for r in report.get("payments", []):
            e = echo_open.get(r.get("offered_per_s"))
            if e is None:
                continue
            same[f"{r['offered_per_s']:.0f}/s"] = {
                "p50": round(r["p50_ms"] / e["p50_ms"], 2) if e["p50_ms"] else None,
                "p99": round(r["p99_ms"] / e["p99_ms"], 2) if e["p99_ms"] else None,
                "p99_away": round(r["p99_ms_away"] / e["p99_ms_away"], 2)
                if r.get("p99_ms_away") and e.get("p99_ms_away") else None}
        out["vs_echo_open_at_same_rate"] = same
    if "fsync" in report:
        out["vs_single_fsync_rate"] = round(peak / report["fsync"]["fsyncs_per_s"], 2)
    if plain_peak:
        out["secure_vs_plain_peak"] = round(peak / plain_peak, 3)
        plain_p99 = {r["offered_per_s"]: r["p99_ms"] for r in report.get("plain_payments", [])
                     if "offered_per_s" in r}
        out["secure_vs_plain_p99_at_same_rate"] = {
            f"{r['offered_per_s']:.0f}/s": round(r["p99_ms"] / plain_p99[r["offered_per_s"]], 2)
            for r in report.get("payments", [])
            if r.get("offered_per_s") in plain_p99 and plain_p99[r["offered_per_s"]]}
    return out


def _ms(value: float) -> str:
    return f"{value:.1f}"


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # piped to a file: keep every table row on one line
        con = Console(width=max(con.width, 120))
    m = report["machine"]
    con.print(f"[bold]JackPay bench[/bold] — {m.get('cpu', '?')}, {m['cpus']} CPUs, "
              f"Python {m['python']}, uvloop {m['uvloop']}")
    t = Table(title="payments (security on; every one fsync'd before `paid`; latency in ms)")
    for col in ("setting", "pay/s", "p50", "p95", "p99", "max", "p99 away", "stall ms/win/excl",
                "rows/fsync", "fsync ms/≥10ms", "CPU s L/R/B", "failed"):
        t.add_column(col, justify="right")
    rows = report.get("payments", []) + report.get("plain_payments", [])
    for i, r in enumerate(rows):
        cpu = r.get("cpu_s", {})
        away = r.get("p99_ms_away")
        t.add_row(r["label"], f"{r['per_s']:,.0f}", _ms(r["p50_ms"]), _ms(r["p95_ms"]),
                  _ms(r["p99_ms"]), _ms(r["max_ms"]), _ms(away) if away is not None else "",
                  f"{r.get('stall_ms')}/{r.get('stall_windows')}/{r.get('excluded_share')}",
                  str(r.get("rows_per_fsync")),
                  f"{r.get('fsync_ms_avg')}/{r.get('slow_fsyncs')}",
                  f"{cpu.get('ledger')}/{cpu.get('router')}/{cpu.get('bench')}", str(r["failed"]),
                  end_section=i == len(report.get("payments", [])) - 1)
    con.print(t)
    con.print("plain: the same settings with TLS and login off, for comparison only (never a "
              "network)\nCPU s L/R/B: CPU seconds of the ledger, the router and the bench in "
              "the setting\nfsync ms/≥10ms: the ledger's average fsync, and how many took 10 "
              "ms or more\np99 away: p99 of the payments that started outside every stall "
              "window; stall ms/win/excl: the host's stall time and windows in the setting, "
              "and the share of payments left out (bench/stall.py)")
    ratios = report.get("ratios", {})
    if "secure_vs_plain_peak" in ratios:
        con.print(f"[bold]secure / plain[/bold]: peak {report['peak_payments_per_s']:,.0f} / "
                  f"{report['plain_peak_payments_per_s']:,.0f} payments/s = "
                  f"{ratios['secure_vs_plain_peak']:.0%}; p99 at the same offered rate: "
                  + ", ".join(f"{k} {v}x" for k, v in
                              ratios["secure_vs_plain_p99_at_same_rate"].items()))
    lt = Table(title="limits of this machine, same run")
    lt.add_column("measure")
    lt.add_column("rate/s", justify="right")
    lt.add_column("p50 ms", justify="right")
    lt.add_column("p99 ms", justify="right")
    lt.add_column("max ms", justify="right")
    for e in report.get("echo", []) + report.get("echo_open", []):
        lt.add_row(f"{e['label']} ({report['settings']['echo_connections']} conns)",
                   f"{e['per_s']:,.0f}", str(e["p50_ms"]), str(e["p99_ms"]), str(e["max_ms"]))
    if "fsync" in report:
        f = report["fsync"]
        lt.add_row("80-byte append + fsync", f"{f['fsyncs_per_s']:,.0f}", str(f["p50_ms"]),
                   str(f["p99_ms"]), str(f["max_ms"]))
    con.print(lt)
    plugins = report.get("plugins")
    if plugins:
        pt = Table(title="plug-ins (security on; interleaved; router CPU per payment)")
        for col in ("setting", "pay/s", "paid out/s", "p50", "p99", "router µs/payment",
                    "rows/payment"):
            pt.add_column(col, justify="right")
        for r in plugins["settings"]:
            out = r.get("paid_out_per_s")
            pt.add_row(r["label"], f"{r['per_s']:,.0f}", f"{out:,.0f}" if out else "",
                       _ms(r["p50_ms"]), _ms(r["p99_ms"]),
                       str(r.get("router_cpu_us_per_payment")),
                       str(r.get("ledger_rows_per_mixed_payment", 1)))
        con.print(pt)
        con.print(f"mixer enabled but idle / no plug-ins, router CPU per direct payment "
                  f"(median of interleaved pairs): {plugins['idle_vs_none_router_cpu']}; "
                  "mixed / direct "
                  f"payments/s: {plugins['mixed_vs_direct_per_s']} (deposits while the "
                  "loop ran; `paid out/s` counts until the last payout is in the ledger)")
    metrics = report.get("metrics")
    if metrics:
        cpu = metrics["router_cpu_us_per_payment"]
        con.print(f"metrics on (scraped every second) / off, router CPU per payment (median "
                  f"of interleaved pairs): {metrics['on_vs_off_router_cpu']}; µs per payment "
                  f"off {cpu['off']}, on {cpu['on']}")
    sigs = report.get("signatures")
    if sigs:
        cpu = sigs["router_cpu_us_per_payment"]
        con.print(f"signed / unsigned payments/s at saturation (median of the rounds' peaks): "
                  f"{sigs['signed_vs_unsigned_per_s']} (target >= 0.5); at each concurrency "
                  f"{sigs['signed_vs_unsigned_at']}; peaks unsigned "
                  f"{sigs['peak_per_s']['unsigned']}, signed {sigs['peak_per_s']['signed']}; "
                  f"payments/s {sigs['per_s']}; router µs per payment {cpu}")
    con.print(f"ratios: {report.get('ratios')}")
    turns = report.get("loop_turns")
    if turns:
        con.print(f"loop turns (append's first attempt direct / on a task as before, unsigned, "
                  f"interleaved): router CPU task / direct {turns['task_vs_direct_router_cpu']}")
        for name in ("direct", "task"):
            t = turns[name]
            con.print(f"  {name}: pay/s {t['per_s']}; router µs/payment "
                      f"{t['router_cpu_us_per_payment']}; append leg at saturation "
                      f"{[a.get('mean_ms') for a in t['append_ms_closed']]} ms mean; open "
                      f"loop {[(a.get('mean_ms'), a.get('p99_ms')) for a in t['append_ms_open']]}"
                      f" ms (mean, p99)")
    stores = report.get("stores")
    if stores:
        st = Table(title="stores (security on; CSV / PostgreSQL alone / with a sync standby)")
        for col in ("setting", "pay/s", "p50", "p99", "rows/commit", "commit ms", "CPU s L/R/B"):
            st.add_column(col, justify="right")
        for r in stores["settings"]:
            cpu = r.get("cpu_s", {})
            st.add_row(r["label"], f"{r['per_s']:,.0f}", _ms(r["p50_ms"]), _ms(r["p99_ms"]),
                       str(r.get("rows_per_fsync")), str(r.get("fsync_ms_avg")),
                       f"{cpu.get('ledger')}/{cpu.get('router')}/{cpu.get('bench')}")
        for name, b in stores["pgbench"].items():
            st.add_row(f"{name} TPC-B -c 8 -j 2", f"{b['tps']:,.0f}", "", "", "1",
                       str(b["latency_ms_avg"]), "")
        con.print(st)
        con.print(f"stores: median pay/s {stores['median_per_s']}; p99 ms at half peak "
                  f"{stores['p99_ms_at_half_peak']}; ledger RSS KiB {stores['ledger_rss_kib']}; "
                  f"ledger start s {stores['ledger_start_s']}\nstore ratios: {stores['ratios']}")
    if "sessions" in report:
        con.print(f"router memory: {report['sessions']}")
    if "rebuild_s" in report:
        con.print(f"start on a ledger of N rows, seconds: router {report['rebuild_s']}, "
                  f"ledger {report.get('ledger_start_s')}")


async def amain(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    settings = QUICK if args.quick else Settings()
    if args.payers:
        settings.payers = args.payers
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="jackpay-bench-") as tmp, \
            Progress(disable=args.json or not sys.stderr.isatty(), transient=True) as progress:
        bench = Bench(Path(tmp), settings, progress)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT
        try:
            await bench.probes.start(env)
            if args.only is None:
                await bench.limits()
                await bench.payments(compare_plain=not args.secure_only)
            if args.store == "postgresql" and args.only is None:
                await bench.stores()
            if not args.skip_plugins and args.only in (None, "plugins"):
                await bench.plugin_costs()
            if not args.skip_metrics and args.only in (None, "metrics"):
                await bench.metrics_cost()
            if not args.skip_signatures and args.only in (None, "signatures"):
                await bench.signature_cost()
            if not args.skip_loop_turns and args.only in (None, "loop-turns"):
                await bench.loop_turns()
            if not args.skip_scale and args.only is None:
                await bench.sessions()
                await bench.rebuild()
        finally:
            bench.stop_all()
            await bench.probes.stop()
        report = bench.report
        report["stall_probe"] = {"realtime": bench.probes.stalls.realtime,
                                 "slow_periods": len(bench.probes.stalls.periods)}
    report["ratios"] = ratios(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--scale" in argv:  # its own run: start times on a ledger of millions of rows
        from bench import scale

        return scale.main([a for a in argv if a != "--scale"])
    p = argparse.ArgumentParser(prog="jackpay-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, under a minute")
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.add_argument("--payers", type=int, help="payer sessions (default 50)")
    p.add_argument("--skip-scale", action="store_true", help="skip memory and rebuild checks")
    p.add_argument("--store", choices=["csv", "postgresql"], default="csv",
                   help="postgresql: also compare the ledger on PostgreSQL (alone, with a "
                        "sync standby) with CSV and pgbench TPC-B, in the same run")
    p.add_argument("--secure-only", action="store_true",
                   help="skip the plain (TLS and login off) comparison run")
    add_version(p)
    p.add_argument("--skip-plugins", action="store_true",
                   help="skip the plug-in comparison (none / mixer idle / mixed payments)")
    p.add_argument("--skip-metrics", action="store_true",
                   help="skip the metrics comparison (router CPU with metrics off / on)")
    p.add_argument("--skip-signatures", action="store_true",
                   help="skip the signed / unsigned payments comparison")
    p.add_argument("--skip-loop-turns", action="store_true",
                   help="skip the append's first attempt direct / on a task comparison")
    p.add_argument("--only", choices=["plugins", "metrics", "signatures", "loop-turns"],
                   help="run just this comparison (no limits, payments or scale sections)")
    args = p.parse_args(argv)
    return run(lambda: amain(args))


if __name__ == "__main__":
    sys.exit(main())
