"""`scripts/up --store postgresql` as a user runs it: a throwaway cluster (primary and a
synchronous standby) beside the run folder's logs, the whole network on it, the DSN in
the table, a payment through it, and Ctrl-C stops the network and then the cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from netkit import REPO_ROOT, script_env
from pg import require_pg
from test_scripts_paths import CONFIG, Lines

from ledger.pgcluster import PgCluster


def test_up_with_postgresql_runs_the_network_on_a_cluster_and_stops_it(tmp_path: Path) -> None:
    require_pg()
    run_dir = tmp_path / "run"  # inside a 0700 folder: the cluster's data goes to /tmp
    config = tmp_path / "network.toml"
    config.write_text(CONFIG)
    up = subprocess.Popen([str(REPO_ROOT / "scripts" / "up"), str(config), "--store",
                           "postgresql", "--ephemeral", "--run-dir", str(run_dir)], cwd=tmp_path,
                          env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    lines = Lines(up)
    seen = lines.seen
    cluster: PgCluster | None = None
    try:
        assert lines.wait_for("Ctrl-C stops everything", 120), "".join(seen)
        text = "".join(seen)
        assert "target_session_attrs=read-write" in text
        assert "postgresql s1 (standby)" in text
        cluster = PgCluster.open(run_dir / "pg")
        assert cluster.sync_names == "s1"
        assert cluster.primary.sql("SELECT sync_state FROM pg_stat_replication") == "sync"
        sent = subprocess.run([sys.executable, "-m", "payer_client", "send", "--config", str(config),
                               "--id", "alice", "bob", "0.01"], capture_output=True, text=True,
                              timeout=60, env=dict(script_env(), PYTHONPATH=str(REPO_ROOT)),
                              check=False)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("paid")
        rows = cluster.primary.sql("SELECT count(*) FROM jackpay_rows WHERE sender = 'alice'",
                                   database="jackpay")
        assert int(rows) == 1  # alice sent one payment
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, "".join(seen)
        assert not any(n.running() for n in cluster.nodes.values())
    finally:
        if up.poll() is None:  # a failure: let it stop its processes, then make sure
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        if cluster is not None:
            cluster.destroy()
