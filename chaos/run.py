"""`scripts/chaos`: random concurrent payments while a seeded schedule of faults hits every
process and link; then heal, wait for quiescence and judge the whole history.

    scripts/chaos --seconds 30 --seed 7 [--payers 5] [--mix] [--store postgresql] [--json]

Topology: ledger ← proxy L ← router ← proxy R ← payer daemons ← workload (control sockets).
Faults (one at a time, each healed after a short while): SIGKILL + restart of the router,
the ledger, or a payer daemon; SIGSTOP/SIGCONT of router or ledger; on proxy L or R:
latency, trickle, black hole, reset, cut after N bytes (either direction); ledger write
failures (the ledger restarted under a file-size limit). The same seed gives the same
schedule. Exit code 0 when the checker finds no violation, 1 otherwise.

`--mix`: the mixer plug-in is on and half the payments are mixed (a few common amounts,
K = 3 distinct payers a round, short delays), so router and ledger kills land in the
middle of rounds; after healing the run waits for the pool to empty and the checker also
judges the mixer (every note paid exactly once, to its payee or back to its depositor;
no deposit stranded past max wait + grace).

`--store postgresql`: the ledger runs on a throwaway PostgreSQL cluster (a primary and
one synchronous standby, ledger.pgcluster; the ledger service follows the multi-host
DSN). Faults of the new parts join the schedule (each at least once), instead of the CSV
file's write failures:
- `kill_pg_primary`: SIGKILL the primary, promote the standby (named the old primary as
  its synchronous standby before its first commit), bring the old primary back with
  pg_rewind as that standby. Measured per failover: RPO, payments told `paid` before
  the promotion that the promoted server does not hold (must be 0), and RTO, seconds
  from the primary's death to the next `paid`.
- `kill_pg_standby`: SIGKILL the synchronous standby; commits wait (payments end
  `outcome_pending`), and no payment may be told `paid` while it is down (a violation
  `paid_without_standby`, with half a second's grace for answers already on their way);
  started again, the waiting commits finish.
- `kill_ledger` (as with CSV): the ledger service restarted on the same database.
At the end the checker reads the rows from the current primary (the promoted server)
and `verify` checks the database (chain, no key twice, balances = rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.checker import Report, RouterView, Violation, check, check_mixer
from chaos.network import Network
from chaos.proxy import FaultProxy
from chaos.workload import Workload
from common.aio import run
from common.procs import fsize_limit
from jackpay_plugins.mixer.journal import Journal
from ledger.audit import SignatureAudit
from ledger.pgcluster import PgCluster
from ledger.store import load_rows
from ledger.verify import RowWalk, receipt_check, signature_audit, verify_database

PROCESS_FAULTS = ["kill_router", "kill_ledger", "kill_payer", "pause_router", "pause_ledger",
                  "ledger_write_failure"]
LINK_FAULTS = ["latency", "trickle", "blackhole", "reset", "cut_up", "cut_down"]
PG_FAULTS = ["kill_pg_primary", "kill_pg_standby"]
STANDBY_DOWN_MIN_S = 2.0  # longer than outcome_pending_after_s: payments end pending
STANDBY_GRACE_S = 0.5  # a `paid` this soon after the standby's death was committed before it


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    target: str
    duration_s: float

    def __str__(self) -> str:
        return f"t={self.at_s:6.2f}s  {self.kind:<22} {self.target:<8} for {self.duration_s:.2f}s"


def make_schedule(seed: int, seconds: float, payers: list[str],
                  store: str = "csv") -> list[Fault]:
    """A deterministic fault schedule: same seed and settings, same schedule. With
    PostgreSQL, the PG faults (twice as likely as the others) replace the file's write
    failures, and each of them is in the schedule at least once."""
    rng = random.Random(seed)
    kinds = PROCESS_FAULTS + [f"{f}@{link}" for f in LINK_FAULTS for link in ("L", "R")]
    if store == "postgresql":
        kinds = [k for k in kinds if k != "ledger_write_failure"] + PG_FAULTS * 2
    out: list[Fault] = []
    t = rng.uniform(0.5, 1.5)
    while t < seconds - 0.5:
        kind = rng.choice(kinds)
        target = ""
        if kind == "kill_payer":
            target = rng.choice(payers)
        elif "@" in kind:
            kind, target = kind.split("@")
            target = "ledger-link" if target == "L" else "payer-link"
        duration = round(rng.uniform(0.3, 1.5), 2)
        out.append(Fault(round(t, 2), kind, target, duration))
        t += duration + rng.uniform(0.3, 1.2)
    if store == "postgresql":
        for kind in PG_FAULTS:
            if kind in {f.kind for f in out}:
                continue
            # Replace a fault that is not a PostgreSQL one (never the other PG fault).
            free = [i for i, f in enumerate(out) if f.kind not in PG_FAULTS]
            if not free:
                break
            slot = free[len(free) // 2]
            f = out[slot]
            out[slot] = Fault(f.at_s, kind, "", f.duration_s)
    return out


@dataclass
class Failover:
    """One kill of the PostgreSQL primary: RPO (acknowledged payments the promoted server
    does not hold) and RTO (seconds from the primary's death to the next `paid`)."""

    killed_at: float
    acked: int = 0
    lost: int = 0
    rto_s: float | None = None

    def __str__(self) -> str:
        rto = f"{self.rto_s:.2f} s" if self.rto_s is not None else "no paid afterwards"
        return (f"RPO {self.lost} acknowledged payments lost (of {self.acked} acknowledged "
                f"before the promotion), RTO {rto} (primary killed -> next paid)")



# The mixer's settings under --mix: rounds that fill and close within a run.
MIX_SETTINGS = {"min_payers": 3, "min_delay_s": 0.3, "max_delay_s": 1.0, "max_wait_s": 8.0,
                "retry_s": 0.3}
MIX_GRACE_S = 20.0  # after healing, beyond max_wait_s, for the pool to empty


class Chaos:
    def __init__(self, root: Path, seed: int, seconds: float, payers: int,
                 mix: bool = False, store: str = "csv") -> None:
        self.root = root
        self.seed = seed
        self.seconds = seconds
        self.mix = mix
        self.store = store
        self.cluster: PgCluster | None = None
        self.failovers: list[Failover] = []
        self.signatures: SignatureAudit | None = None  # the audit of the final ledger
        self.receipts_held = 0  # the ledger's receipts kept by the daemons, all checked
        self.reconciled_rows = 0  # rows the router's own reconcile read at the end
        self.standby_outages: list[tuple[float, float]] = []  # (died, restarted), monotonic
        self.workload: Workload | None = None
        self.payer_ids = [f"payer{i}" for i in range(payers)]
        # recent_rows: a restarted router keeps only its 20 latest rows in memory, so
        # the daemons' retries after a restart exercise the ledger's lookup and
        # `duplicate` paths (router/payments.py, Book.base_seq), not only the table.
        router_settings: dict[str, Any] = {"outcome_pending_after_s": 1.0,
                                           "offer_timeout_s": 1.0, "ledger_timeout_s": 0.5,
                                           "recent_rows": 20}
        plugin_settings: dict[str, dict[str, Any]] = {}
        if mix:
            router_settings.update(plugins=["mixer"], plugin_tick_s=0.1)
            plugin_settings["mixer"] = dict(MIX_SETTINGS)
        self.net = Network(root, participants=dict.fromkeys(self.payer_ids, "50.00"),
                           router_settings=router_settings, plugin_settings=plugin_settings)
        self.schedule = make_schedule(seed, seconds, self.payer_ids, store)
        self.injected: Counter[str] = Counter()
        self.proxy_l: FaultProxy | None = None
        self.proxy_r: FaultProxy | None = None
        self.log: list[str] = []
        self._rto_tasks: list[asyncio.Task[None]] = []

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    def _start_cluster(self) -> PgCluster:
        cluster = PgCluster.create()  # its own temp folder (the servers' user must enter it)
        try:
            cluster.add_standby("s1")
            cluster.set_sync("s1")
            cluster.wait_streaming("s1", sync=True)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    async def start(self) -> Workload:
        net = self.net
        if self.store == "postgresql":
            self.cluster = await self._blocking(self._start_cluster)
            net.store, net.dsn = "postgresql", self.cluster.multi_host_dsn()
            net.write_config()
        await self._blocking(net.start_ledger)
        self.proxy_l = FaultProxy(net.procs["ledger"].addr)
        ledger_via = await self.proxy_l.start()
        router = await self._blocking(net.start_router, ledger=ledger_via)
        self.proxy_r = FaultProxy(router.addr)
        router_via = await self.proxy_r.start()
        for p in self.payer_ids:
            await self._blocking(net.start_payer, p, router=router_via)
        sockets = {p: net.config.control_socket(p) for p in self.payer_ids}
        self.workload = Workload(self.payer_ids, sockets, self.seed,
                                 mix_share=0.5 if self.mix else 0.0)
        return self.workload

    async def kill_pg_primary(self) -> None:
        """SIGKILL the primary, promote the standby, measure what it holds (RPO), bring the
        old primary back as its synchronous standby (pg_rewind); RTO is measured in the
        background (the next `paid` after the kill)."""
        cluster, workload = self.cluster, self.workload
        assert cluster is not None
        assert workload is not None
        old, new = cluster.primary.name, cluster.standbys[0].name
        failover = Failover(time.monotonic())
        await self._blocking(cluster.primary.kill)
        await self._blocking(cluster.promote, new, sync=old)
        # Nothing can be acknowledged from here until the old primary is back as the
        # standby: the promoted server waits for it. So this is every acknowledged payment.
        acked = {(op.sender, op.tx_id) for op in workload.ops
                 if not op.mix and any(a.kind == "ok" for a in op.attempts)}
        stored = await self._blocking(cluster.primary.sql,
                                      "SELECT sender || chr(31) || tx_id || chr(31) || seq "
                                      "FROM jackpay_rows", database="jackpay")
        have = {tuple(line.split("\x1f")[:2]) for line in stored.splitlines()}
        head = max((int(line.split("\x1f")[2]) for line in stored.splitlines()), default=0)
        failover.acked, failover.lost = len(acked), len(acked - have)
        self.failovers.append(failover)
        await self._blocking(cluster.rewind, old)
        await self._blocking(cluster.wait_streaming, old, sync=True)

        async def wait_rto() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                # The first payment committed by the promoted server (answers of commits
                # made before the kill may still arrive after it).
                after = [t for t, seq in workload.successes if seq > head]
                if after:
                    failover.rto_s = round(min(after) - failover.killed_at, 2)
                    return
                await asyncio.sleep(0.05)

        self._rto_tasks.append(asyncio.create_task(wait_rto()))

    async def kill_pg_standby(self, seconds: float) -> None:
        cluster = self.cluster
        assert cluster is not None
        node = cluster.standbys[0]
        died = time.monotonic()
        await self._blocking(node.kill)
        await asyncio.sleep(seconds)
        self.standby_outages.append((died, time.monotonic()))
        await self._blocking(node.start)
        await self._blocking(cluster.wait_streaming, node.name, sync=True)

    def outage_summary(self) -> list[dict[str, Any]]:
        """Per standby outage: its length, the payments asked for before it ended that were
        told `paid` only after it (their commits waited; the router said outcome_pending
        and the payer daemons asked again), and those told `paid` while it lasted (after
        the grace: must be 0)."""
        w = self.workload
        assert w is not None
        return [{"seconds": round(back - died, 2),
                 "waited_then_paid": sum(1 for t0, t1, kind in w.timeline
                                         if kind == "ok" and t0 < back <= t1),
                 "paid_while_down": sum(1 for t, _ in w.successes
                                        if died + STANDBY_GRACE_S < t < back)}
                for died, back in self.standby_outages]

    def paid_without_standby(self) -> list[Violation]:
        """A `paid` answered while the only synchronous standby was dead (after a short
        grace for answers already on their way)."""
        assert self.workload is not None
        out = []
        for died, back in self.standby_outages:
            n = sum(1 for t, _ in self.workload.successes if died + STANDBY_GRACE_S < t < back)
            if n:
                out.append(Violation("paid_without_standby", f"{n} payments told paid while "
                                     f"the synchronous standby was down ({back - died:.1f} s)"))
        return out

    async def inject(self, f: Fault) -> None:
        net = self.net
        self.injected[f.kind] += 1
        proxy = self.proxy_l if f.target == "ledger-link" else self.proxy_r
        assert proxy is not None
        if f.kind == "kill_pg_primary":
            await self.kill_pg_primary()
        elif f.kind == "kill_pg_standby":
            await self.kill_pg_standby(max(f.duration_s, STANDBY_DOWN_MIN_S))
        elif f.kind in ("kill_router", "kill_ledger", "kill_payer"):
            name = {"kill_router": "router", "kill_ledger": "ledger"}.get(f.kind, f.target)
            await self._blocking(net.procs[name].kill)
            await asyncio.sleep(f.duration_s)
            await self._blocking(net.restart, name)
        elif f.kind in ("pause_router", "pause_ledger"):
            proc = net.procs[f.kind.split("_")[1]]
            proc.pause()
            await asyncio.sleep(f.duration_s)
            proc.resume()
        elif f.kind == "ledger_write_failure":
            await self._blocking(net.procs["ledger"].stop)
            size = net.ledger_path.stat().st_size
            await self._blocking(net.restart, "ledger", preexec_fn=fsize_limit(size + 300))
            await asyncio.sleep(f.duration_s)
            await self._blocking(net.procs["ledger"].stop)
            await self._blocking(net.restart, "ledger", preexec_fn=None)
        elif f.kind == "latency":
            proxy.set_latency(0.05)
            await asyncio.sleep(f.duration_s)
        elif f.kind == "trickle":
            proxy.set_trickle(True)
            await asyncio.sleep(f.duration_s)
        elif f.kind == "blackhole":
            proxy.set_blackhole(True)
            await asyncio.sleep(f.duration_s)
        elif f.kind == "reset":
            proxy.reset_all()
            await asyncio.sleep(f.duration_s)
        elif f.kind in ("cut_up", "cut_down"):
            proxy.cut_after(random.Random(f.at_s).randint(1, 400), f.kind[4:])  # type: ignore[arg-type]
            await asyncio.sleep(f.duration_s)
        proxy.heal()

    async def run_schedule(self, t0: float) -> None:
        for f in self.schedule:
            delay = t0 + f.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.log.append(str(f))
            await self.inject(f)

    async def heal_all(self) -> None:
        for proxy in (self.proxy_l, self.proxy_r):
            if proxy is not None:
                proxy.heal()
        for name, proc in self.net.procs.items():
            proc.resume()
            if not proc.alive():
                await self._blocking(self.net.restart, name)
        if self.cluster is not None:
            for node in self.cluster.standbys:
                if not node.running():
                    await self._blocking(node.start)

    def ledger_bytes(self) -> bytes:
        """The ledger's rows as the CSV file; with PostgreSQL, from the current primary
        (the promoted server after a failover)."""
        return self.net.ledger_csv().encode()

    async def wait_pool_empty(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = await self.net.inspect()
            if not state.balances.get("_mixer") and not state.in_flight:
                return True
            await asyncio.sleep(0.5)
        return False

    async def run(self) -> tuple[Report, Workload, bool]:
        try:
            return await self._run()
        finally:
            for task in self._rto_tasks:
                task.cancel()
            # Whatever failed (a process that would not start, a crash in the checker),
            # nothing this run started outlives it.
            for proxy in (self.proxy_r, self.proxy_l):
                if proxy is not None:
                    await proxy.stop()
            await self._blocking(self.net.stop_all)
            if self.cluster is not None:
                await self._blocking(self.cluster.destroy)

    async def _run(self) -> tuple[Report, Workload, bool]:
        workload = await self.start()
        try:
            t0 = time.monotonic()
            await asyncio.gather(workload.run_for(self.seconds), self.run_schedule(t0))
            await self.heal_all()
            healed_at = time.monotonic()
            decided = await workload.settle_undecided(60.0)
            progressed = await workload.probe_success()
            progressed = progressed and workload.last_success_at > healed_at
            pool_empty = await self.wait_pool_empty(float(MIX_SETTINGS["max_wait_s"])
                                                    + MIX_GRACE_S) if self.mix else True
            state = await self.net.wait_quiet(20.0)
            reconciled = await self.net.reconcile()  # the router's own check, too
            if self._rto_tasks:
                await asyncio.wait(self._rto_tasks, timeout=5)
        finally:
            await workload.close()
            for proxy in (self.proxy_r, self.proxy_l):
                if proxy is not None:
                    await proxy.stop()
            await self._blocking(self.net.stop_all)
        view = RouterView(dict(state.balances), dict(state.holds),
                          [f.tx_id for f in state.in_flight])
        ledger_bytes = await self._blocking(self.ledger_bytes)
        report = check(ledger_bytes, workload.ops, view,
                       require_success_after_heal=True, succeeded_after_heal=progressed)
        # `jackpay-ledger verify --keys --receipts` on the final ledger (ledger/verify.py's
        # row walk): every debit ordered and every credit accepted by the participant's
        # own key; every receipt the payers' daemons kept holds (a row acknowledged, then
        # lost or rewritten, would break one).
        self.signatures = signature_audit(str(self.net.config_path))
        folder = self.net.config.resolve(self.net.config.payer.receipts_dir)
        kept = (receipt_check(str(self.net.config_path), folder, allow_none=True)
                if folder.is_dir() else None)
        self.receipts_held = len(kept.proofs) if kept is not None else 0
        walk = RowWalk(self.signatures, kept)
        for row in load_rows(ledger_bytes, "ledger")[0]:
            walk.add(row)
        if (problem := walk.finish()) is not None:
            report.violations.append(Violation("verify --keys --receipts", problem))
        self.reconciled_rows = reconciled.rows
        if not reconciled.ok:
            report.violations.append(Violation("reconcile", "; ".join(
                f"{d.what} {d.account}: router {d.router}, ledger {d.ledger} {d.detail}".strip()
                for d in reconciled.differences)))
        if self.cluster is not None:
            verdict = await verify_database(self.net.dsn)
            if not verdict.ok:
                report.violations.append(Violation("verify", verdict.line))
            report.violations += self.paid_without_standby()
            for i, f in enumerate(self.failovers, 1):
                if f.lost:
                    report.violations.append(Violation(
                        "acked_lost_in_failover", f"failover {i}: {f}"))
        if self.mix:
            journal = Journal(self.root / "plugins" / "mixer" / "journal.jsonl").read()
            report.violations += check_mixer(ledger_bytes, journal)
            if not pool_empty:
                report.violations.append(Violation(
                    "stranded_deposit", "the pool was not empty max_wait + grace after healing"))
        if not decided:
            report.violations.append(Violation(
                "undecided", f"{len(workload.undecided)} payments still undecided after healing: "
                + ", ".join(sorted(workload.undecided)[:10])))
        return report, workload, progressed


def summarise(chaos: Chaos, report: Report, workload: Workload) -> dict[str, Any]:
    first = Counter[str]()
    resolved = 0
    for op in workload.ops:
        if op.attempts and op.attempts[0].kind == "indeterminate" and op.final is not None:
            resolved += 1
        final = op.final
        first[(final.code or "ok") if final else "undecided"] += 1
    return {
        "seed": chaos.seed, "seconds": chaos.seconds, "payers": len(chaos.payer_ids),
        "mix": chaos.mix, "mixed_payments": sum(1 for op in workload.ops if op.mix),
        "schedule": [str(f) for f in chaos.schedule],
        "attempted": len(workload.ops), "outcomes": dict(first),
        "indeterminate_then_resolved": resolved, "faults_injected": dict(chaos.injected),
        "ledger_rows": report.rows, "violations": [str(v) for v in report.violations],
        "signatures": chaos.signatures.summary() if chaos.signatures else None,
        "receipts_checked": chaos.receipts_held,
        "reconciled_rows": chaos.reconciled_rows,
        "store": chaos.store,
        "failovers": [{"rpo_lost": f.lost, "acked_before": f.acked, "rto_s": f.rto_s}
                      for f in chaos.failovers],
        "standby_outages": chaos.outage_summary(),
        "verdict": "PASS" if report.ok else "FAIL",
    }


async def amain(args: argparse.Namespace) -> int:
    keep = args.keep
    tmp = tempfile.mkdtemp(prefix="jackpay-chaos-")
    chaos = Chaos(Path(tmp), args.seed, args.seconds, args.payers, mix=args.mix,
                  store=args.store)
    try:
        report, workload, _ = await chaos.run()
    except Exception:
        print(chaos.net.logs(), file=sys.stderr)
        raise
    summary = summarise(chaos, report, workload)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"chaos seed={chaos.seed} seconds={chaos.seconds} payers={len(chaos.payer_ids)}"
              f" store={chaos.store}"
              + (f" mix: {summary['mixed_payments']} mixed payments" if chaos.mix else ""))
        print("schedule:")
        for line in summary["schedule"]:
            print("  " + line)
        print(f"attempted {summary['attempted']} payments; outcomes {summary['outcomes']}")
        print(f"indeterminate then resolved: {summary['indeterminate_then_resolved']}")
        print(f"verify --keys: {summary['signatures']}; receipts checked: "
              f"{summary['receipts_checked']}")
        print(f"router reconcile: {summary['reconciled_rows']} ledger rows read, no difference"
              if not any(v.startswith("reconcile") for v in summary["violations"])
              else "router reconcile: differences (see violations)")
        print(f"faults injected: {summary['faults_injected']}")
        print(f"ledger rows: {summary['ledger_rows']}")
        for i, f in enumerate(chaos.failovers, 1):
            print(f"failover {i}: {f}")
        for i, o in enumerate(summary["standby_outages"], 1):
            print(f"standby outage {i}: {o['seconds']:.2f} s, {o['paid_while_down']} paid while "
                  f"down; {o['waited_then_paid']} payments waited and were paid once it was "
                  "back")
        for v in summary["violations"]:
            print(f"VIOLATION {v}")
        print(f"verdict: {summary['verdict']}")
    if not report.ok or keep:
        print(f"run folder kept: {tmp}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jackpay-chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the faulty phase")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--payers", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the run folder")
    p.add_argument("--mix", action="store_true",
                   help="the mixer on, half the payments mixed; the checker judges it too")
    p.add_argument("--store", choices=["csv", "postgresql"], default="csv",
                   help="postgresql: the ledger on a throwaway cluster (primary + sync "
                        "standby); PostgreSQL faults join the schedule")
    args = p.parse_args(argv)
    if args.payers < 2:
        p.error("--payers must be at least 2")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    return run(lambda: amain(args))


if __name__ == "__main__":
    sys.exit(main())
