"""`scripts/chaos` for a few short seeds: random payments under a seeded fault schedule,
then the checker judges the whole history. The runs are started together (each in its
own temp folder, on its own ports) so the whole file takes about one run's time.
One more seed runs the ledger on PostgreSQL (`--store postgresql`: a primary killed and
its standby promoted, the standby killed, the ledger restarted): 0 violations, RPO 0,
an RTO measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from netkit import REPO_ROOT
from pg import pg_missing, require_pg

SEEDS = (3, 11, 42)
MIX_SEED = 1005  # with --mix: the mixer on, half the payments mixed
SECONDS = 6
PG_SEED = 21  # with --store postgresql (needs the PostgreSQL 15 server; else skipped)


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[int, subprocess.Popen[str]]]:
    procs = {
        seed: subprocess.Popen(
            [sys.executable, "-m", "chaos.run", "--seconds", str(SECONDS), "--seed", str(seed),
             "--json", *(["--mix"] if seed == MIX_SEED else [])],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (*SEEDS, MIX_SEED)
    }
    if pg_missing() is None:
        procs[PG_SEED] = subprocess.Popen(
            [sys.executable, "-m", "chaos.run", "--seconds", str(SECONDS), "--seed",
             str(PG_SEED), "--json", "--store", "postgresql"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [*SEEDS, MIX_SEED, PG_SEED])
def test_chaos_run_passes(runs: dict[int, subprocess.Popen[str]], seed: int) -> None:
    if seed not in runs:
        require_pg()
    try:
        out, err = runs[seed].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        runs[seed].kill()
        out, err = runs[seed].communicate()
        pytest.fail(f"chaos seed {seed} did not finish in time:\n{err[-3000:]}")
    assert runs[seed].returncode == 0, f"seed {seed} exit {runs[seed].returncode}:\n{out}\n{err[-3000:]}"
    summary: dict[str, Any] = json.loads(out)
    assert summary["seed"] == seed
    assert summary["verdict"] == "PASS", summary["violations"]
    assert summary["violations"] == []
    assert summary["schedule"], "the seed produced no fault schedule"
    assert sum(summary["faults_injected"].values()) == len(summary["schedule"])
    assert summary["outcomes"].get("ok", 0) > 0
    if seed == MIX_SEED:  # the checker judged the mixer too (payouts once, none stranded)
        assert summary["mix"]
        assert summary["mixed_payments"] > 0
        assert summary["ledger_rows"] > summary["payers"] + summary["outcomes"]["ok"]
        return
    if seed == PG_SEED:  # failover of the database: nothing acknowledged lost
        assert summary["store"] == "postgresql"
        assert {"kill_pg_primary", "kill_pg_standby"} <= set(summary["faults_injected"])
        assert summary["failovers"]
        assert all(f["rpo_lost"] == 0 and f["acked_before"] > 0 for f in summary["failovers"])
        assert all(f["rto_s"] is not None for f in summary["failovers"])
        assert summary["standby_outages"]  # commits waited: nobody told paid meanwhile
        assert all(o["paid_while_down"] == 0 for o in summary["standby_outages"])
    # every ledger row is an opening balance or a payment its sender was told is paid
    assert summary["ledger_rows"] == summary["payers"] + summary["outcomes"]["ok"]


@pytest.mark.parametrize("seconds", [6.0, 30.0])
def test_a_postgresql_schedule_always_kills_the_primary_and_the_standby(seconds: float) -> None:
    from chaos.run import PG_FAULTS, make_schedule

    payers = [f"payer{i}" for i in range(4)]
    for seed in range(300):
        kinds = [f.kind for f in make_schedule(seed, seconds, payers, "postgresql")]
        if len(kinds) >= len(PG_FAULTS):
            assert set(PG_FAULTS) <= set(kinds), (seed, kinds)
        assert "ledger_write_failure" not in kinds
        assert make_schedule(seed, seconds, payers, "postgresql") == make_schedule(
            seed, seconds, payers, "postgresql")  # deterministic
