"""`scripts/bench --scale [--rows N]`: start times and ledger memory on a large ledger, in
both stores (issue 11's "start in constant time").

    scripts/bench --scale                 # 10,000,000 rows: building them takes minutes
    scripts/bench --scale --rows 1000000 --json

Builds one synthetic, valid, hash-chained ledger of N rows (100 accounts), then:
- CSV store: starts the ledger on the file twice (`csv_first` builds the index from the
  whole file, as after an upgrade or with the index deleted; `csv` then reads the index
  and nothing else) and the router on the ledger;
- PostgreSQL store: a throwaway cluster (ledger/pgcluster.py), the same rows loaded into
  its table with COPY and the balances table computed from them, then the ledger (which
  reads only the chain head) and the router;
and reports, per store, seconds from launch to READY for the ledger and for the router
(the router reads the ledger's balances and its latest `recent_rows` rows, no replay) and
the ledger's resident memory once started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.load import rss_kib
from bench.run import REPO_ROOT, Bench, Settings, synthetic_ledger
from common.procs import Proc, python_module

PAYERS = [f"r{i:03d}" for i in range(100)]

_LOAD = """
CREATE TEMP TABLE staged (dtg text, sender text, receiver text, amount text, seq bigint,
                          tx_id text, memo text, hash text);
"""
_FROM_STAGED = """
INSERT INTO jackpay_rows (seq, dtg, sender, receiver, amount, tx_id, memo, hash)
    SELECT seq, dtg, sender, receiver, replace(amount, '.', '')::bigint, tx_id,
           coalesce(memo, ''), hash
    FROM staged;
INSERT INTO jackpay_balances (account, balance)
    SELECT account, sum(delta) FROM (
        SELECT sender AS account, -amount AS delta FROM jackpay_rows
        UNION ALL SELECT receiver, amount FROM jackpay_rows) AS d
    GROUP BY account;
"""


class Scale:
    def __init__(self, root: Path, rows: int) -> None:
        self.root = root
        self.rows = rows
        self.bench = Bench(root, Settings(), progress=_Quiet())

    def _start(self, name: str, argv: list[str]) -> Proc:
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        return Proc(name, argv, self.root / "logs" / f"{name}.log", env=env,
                    cwd=self.root).start(timeout=3600)

    def start_times(self, tag: str, csv: str, extra: list[str]) -> dict[str, Any]:
        """Ledger, then router, on the config `tag`; both stopped after."""
        cfg = self.root / f"{tag}.toml"
        self.bench.write_config(cfg, PAYERS, 0, csv, opening="0.00")
        started: list[Proc] = []
        try:
            t0 = time.perf_counter()
            ledger = self._start(f"{tag}-ledger",
                                 python_module("ledger", "--config", str(cfg), *extra))
            ledger_s = time.perf_counter() - t0
            started.append(ledger)
            rss = rss_kib(ledger.pid)
            self.bench.write_config(cfg, PAYERS, ledger.addr[1], csv, opening="0.00")
            t0 = time.perf_counter()
            started.append(self._start(f"{tag}-router",
                                       python_module("router", "--config", str(cfg))))
            router_s = time.perf_counter() - t0
        finally:
            for proc in reversed(started):
                proc.stop()
        report = {"ledger_start_s": round(ledger_s, 2), "router_start_s": round(router_s, 2),
                  "ledger_rss_mib": round(rss / 1024, 1)}
        read = re.search(r"ledger serving .* rows_read_at_open=(\d+)",
                         (self.root / "logs" / f"{tag}-ledger.log").read_text())
        if read:  # the CSV store: rows parsed at open (the tail after its index's head)
            report["rows_read_at_open"] = int(read.group(1))
        return report

    async def load_postgres(self, dsn: str, csv: Path) -> tuple[float, int]:
        """The table made by the ledger's schema, filled from the CSV file (its memos
        are empty). Seconds, and the head seq it then holds."""
        t0 = time.perf_counter()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(_LOAD)
            with csv.open("rb") as f:
                await conn.copy_to_table("staged", source=f, format="csv", header=True)
            async with conn.transaction():
                await conn.execute(_FROM_STAGED)
            await conn.execute("ANALYZE")
            head = await conn.fetchval("SELECT max(seq) FROM jackpay_rows")
        finally:
            await conn.close()
        return time.perf_counter() - t0, int(head or 0)

    async def run(self) -> dict[str, Any]:
        from ledger.pgcluster import PgCluster

        csv = self.root / "scale.csv"
        t0 = time.perf_counter()
        await asyncio.to_thread(synthetic_ledger, csv, PAYERS, self.rows)
        report: dict[str, Any] = {"rows": self.rows,
                                  "build_s": round(time.perf_counter() - t0, 1)}
        # The first start builds the CSV store's index from the whole file (as after an
        # upgrade, or with the index deleted); the next reads only the index and the tail.
        report["csv_first"] = await asyncio.to_thread(self.start_times, "csv1", csv.name, [])
        report["csv"] = await asyncio.to_thread(self.start_times, "csv", csv.name, [])
        cluster = await asyncio.to_thread(PgCluster.create)
        try:
            dsn = cluster.dsn()
            # An empty start makes the tables; then the rows go in behind it.
            await asyncio.to_thread(self.start_times, "pgschema", "unused.csv", ["--dsn", dsn])
            seconds, head = await self.load_postgres(dsn, csv)
            report["postgres_load_s"] = round(seconds, 1)
            report["postgres_rows"] = head
            report["postgres"] = await asyncio.to_thread(self.start_times, "pg", "unused.csv",
                                                         ["--dsn", dsn])
        finally:
            await asyncio.to_thread(cluster.destroy)
        return report


class _Quiet:
    """The bench's progress bar, silenced."""

    def add_task(self, *_: Any, **__: Any) -> int:
        return 0

    def advance(self, *_: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jackpay-bench --scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.rows < 200:
        ap.error("--rows must be at least 200 (100 openings, then payments)")
    with tempfile.TemporaryDirectory(prefix="jackpay-scale-") as tmp:
        report = asyncio.run(Scale(Path(tmp), args.rows).run())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['rows']:,} rows (built in {report['build_s']} s; loaded into "
              f"PostgreSQL in {report['postgres_load_s']} s)")
        for store in ("csv_first", "csv", "postgres"):
            r = report[store]
            print(f"  {store:<9} ledger start {r['ledger_start_s']:>7} s   router start "
                  f"{r['router_start_s']:>6} s   ledger RSS {r['ledger_rss_mib']:>8} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
