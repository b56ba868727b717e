"""scripts/bench --quick runs end to end and reports every figure (never timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from netkit import REPO_ROOT, plant_decoys, script_env


@pytest.mark.slow
def test_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    # as a user runs it: from a folder of theirs (one with a bench/ of its own), which it
    # leaves as it was
    before = plant_decoys(tmp_path)
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "bench"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == before
    report = json.loads(proc.stdout)
    payments = report["payments"]
    assert [p["label"].split()[0] for p in payments] == ["closed", "closed", "open"]
    plain = report["plain_payments"]  # TLS and login off, for comparison: labelled so
    assert [p["label"].split()[:2] for p in plain] == [
        ["plain", "closed"], ["plain", "closed"], ["plain", "open"]]
    # the plain run is offered the same open-loop rate as the secure one
    assert plain[-1]["offered_per_s"] == payments[-1]["offered_per_s"]
    for p in payments + plain:
        assert p["ok"] > 0, p
        assert p["failed"] == 0, p
        assert p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert p["rows_per_fsync"] >= 1
        assert p["fsync_ms_avg"] > 0
        assert 0 <= p["slow_fsyncs"] <= p["ok"]
        assert set(p["cpu_s"]) == {"ledger", "router", "bench"}
    assert [e["label"] for e in report["echo"]] == [
        "echo 1 hop plain", "echo 3 hops plain", "echo 1 hop TLS", "echo 3 hops TLS"]
    assert all(e["per_s"] > 0 for e in report["echo"])
    assert report["fsync"]["fsyncs_per_s"] > 0
    assert report["sessions"]["kib_per_idle_session"] is not None
    assert list(report["rebuild_s"]) == ["20000"]
    assert list(report["ledger_start_s"]) == ["20000"]
    assert report["peak_payments_per_s"] > 0
    assert report["plain_peak_payments_per_s"] > 0
    ratios = report["ratios"]
    assert set(ratios) == {"vs_echo_1_hop_tls", "vs_echo_3_hops_tls", "plain_vs_echo_3_hops_plain",
                           "vs_echo_3_hops_plain", "vs_echo_open_at_same_rate",
                           "vs_single_fsync_rate", "secure_vs_plain_peak",
                           "secure_vs_plain_p99_at_same_rate"}
    # The host's stalls, measured in every setting (bench/stall.py), and latency away
    # from them; the open-loop echo at the payments' open-loop rate, in the same run.
    for p in payments + plain + report["echo"]:
        assert isinstance(p["stall_ms"], float)
        assert p["stall_ms"] >= 0
        assert isinstance(p["stall_windows"], int)
        assert 0 <= p["excluded_share"] <= 1
        # Without windows nothing is left out and "away" is every payment's figure.
        if p["stall_windows"] == 0:
            assert p["excluded_share"] == 0
            assert p["p99_ms_away"] == p["p99_ms"]
    (echo_open,) = report["echo_open"]
    assert echo_open["label"].startswith("echo 3 hops plain open")
    assert echo_open["offered_per_s"] == payments[-1]["offered_per_s"]
    assert echo_open["ok"] > 0
    same = ratios["vs_echo_open_at_same_rate"][f"{payments[-1]['offered_per_s']:.0f}/s"]
    assert same["p99"] == round(payments[-1]["p99_ms"] / echo_open["p99_ms"], 2)
    assert isinstance(report["stall_probe"]["realtime"], bool)
    assert isinstance(report["stall_probe"]["slow_periods"], int)
    assert ratios["secure_vs_plain_peak"] == round(
        report["peak_payments_per_s"] / report["plain_peak_payments_per_s"], 3)
    assert list(ratios["secure_vs_plain_p99_at_same_rate"]) == [
        f"{payments[-1]['offered_per_s']:.0f}/s"]
    plugins = report["plugins"]  # no plug-ins / the mixer idle / mixed payments
    labels = [s["label"] for s in plugins["settings"]]
    assert labels[:2] == ["direct C=64 plugins: none", "direct C=64 plugins: mixer idle"]
    assert labels[-1].startswith("mixed")
    for s in plugins["settings"]:
        assert s["ok"] > 0, s
        assert s["router_cpu_us_per_payment"] > 0
    assert plugins["settings"][-1]["ledger_rows_per_mixed_payment"] > 1  # deposit + notes
    assert plugins["idle_vs_none_router_cpu"] > 0
    assert plugins["mixed_vs_direct_per_s"] > 0
    metrics = report["metrics"]  # metrics off / on (scraped), interleaved
    assert [s["label"] for s in metrics["settings"]] == ["direct C=64 metrics off",
                                                         "direct C=64 metrics on"]
    assert all(s["ok"] > 0 and s["router_cpu_us_per_payment"] > 0 for s in metrics["settings"])
    assert metrics["scrapes"] >= 1  # the metrics were really served while payments ran
    assert metrics["on_vs_off_router_cpu"] == round(
        metrics["router_cpu_us_per_payment"]["on"][0]
        / metrics["router_cpu_us_per_payment"]["off"][0], 3)
    sigs = report["signatures"]  # signed / unsigned payments, rounds at saturation
    assert [s["label"] for s in sigs["settings"]] == ["direct C=64 unsigned",
                                                      "direct C=64 signed"]
    assert all(s["ok"] > 0 for s in sigs["settings"])
    assert sigs["peak_per_s"] == {"unsigned": sigs["per_s"]["unsigned"]["64"],
                                  "signed": sigs["per_s"]["signed"]["64"]}
    assert sigs["signed_vs_unsigned_per_s"] == round(
        sigs["per_s"]["signed"]["64"][0] / sigs["per_s"]["unsigned"]["64"][0], 3)
    assert sigs["signed_vs_unsigned_at"] == {"64": sigs["signed_vs_unsigned_per_s"]}
    # issue 14's loop turns: an append's first attempt direct / on the task path (the
    # router's hidden flag), interleaved; both pay, and the append leg is timed by the
    # router's own histogram in the closed and the open loop
    turns = report["loop_turns"]
    assert [s["label"] for s in turns["settings"]] == [
        "turns C=64 direct", "turns open 500/s direct", "turns C=64 task",
        "turns open 500/s task"]
    for s in turns["settings"]:
        assert s["ok"] > 0, s
        assert s["failed"] == 0, s
        leg = s["append_leg_ms"]
        assert leg["n"] > 0, s
        assert leg["mean_ms"] > 0, leg
        assert leg["p50_ms"] <= leg["p99_ms"], leg
    for name in ("direct", "task"):
        assert turns[name]["router_cpu_us_per_payment"][0] > 0
    assert turns["task_vs_direct_router_cpu"] == round(
        turns["task"]["router_cpu_us_per_payment"][0]
        / turns["direct"]["router_cpu_us_per_payment"][0], 3)


def test_bench_scale_starts_both_stores_on_a_built_ledger(tmp_path: Path) -> None:
    from pg import require_pg

    require_pg()
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "bench"), "--scale", "--rows", "500",
                           "--json"], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["rows"] == report["postgres_rows"] == 500
    assert report["csv_first"]["rows_read_at_open"] == 500  # built the index from the file
    assert report["csv"]["rows_read_at_open"] == 0  # then read the index, not the file
    for store in ("csv_first", "csv", "postgres"):
        figures = report[store]
        figures.pop("rows_read_at_open", None)
        assert set(figures) == {"ledger_start_s", "router_start_s", "ledger_rss_mib"}
        assert all(v > 0 for v in figures.values()), figures


def test_cpu_seconds_still_counts_a_child_once_it_is_reaped() -> None:
    """A router's verifier replaced mid-setting: its CPU must not vanish from the sum."""
    from bench.load import cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    parent = ("import subprocess, sys, time\n"
              f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
              "print('reaped', flush=True)\ntime.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "reaped"
        assert cpu_seconds(proc.pid) >= 0.28
    finally:
        proc.kill()
        proc.wait()
