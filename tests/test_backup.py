"""Backup and restore, once per store, as the README says to do it (real processes):
back up while the ledger serves (CSV: copy the file; PostgreSQL: pg_basebackup), restore
into a new network folder, `jackpay-ledger verify` it, start ledger and router on it, and
payments continue from the restored balances (openings are not issued twice)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from netkit import Network

from ledger.pgcluster import PgCluster, PgNode, free_port

PARTICIPANTS = {"alice": "10.00", "bob": "5.00"}


async def pay(net: Network, sender: str, to: str, amount: int) -> int:
    client = net.client(sender)
    await client.connect()
    try:
        paid = await client.send_payment(to, amount, "")
        return paid.balance
    finally:
        await client.close()


def verify(target: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ledger", "verify", target],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def up(net: Network) -> None:
    net.participants = dict(PARTICIPANTS)
    net.write_config()
    net.start_ledger()
    net.start_router()
    net.start_payer("bob")  # the receiver's daemon accepts payments


async def test_csv_backup_is_a_file_copy_while_serving(tmp_path: Path) -> None:
    net = Network(tmp_path / "live")
    try:
        up(net)
        assert await pay(net, "alice", "bob", 300) == 700
        backup = tmp_path / "ledger-backup.csv"
        shutil.copyfile(net.ledger_path, backup)  # the ledger keeps serving
        assert await pay(net, "alice", "bob", 100) == 600  # after the copy: not in it
    finally:
        net.stop_all()
    restored = Network(tmp_path / "restored")
    shutil.copyfile(backup, restored.ledger_path)
    assert verify(str(restored.ledger_path)).startswith("OK")
    try:
        up(restored)
        assert await pay(restored, "alice", "bob", 50) == 650
        assert restored.ledger_csv().count("_open:alice") == 1
    finally:
        restored.stop_all()


async def test_postgresql_backup_is_a_base_backup_while_serving(
        tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str) -> None:
    net = Network(tmp_path / "live", store="postgresql", dsn=pg_dsn)
    primary = pg_cluster.primary
    copy = PgNode(f"restored{free_port()}", free_port(), pg_cluster.root, pg_cluster.bindir,
                  pg_cluster.run_as)
    try:
        up(net)
        assert await pay(net, "alice", "bob", 300) == 700
        copy.run("pg_basebackup", "-h", str(primary.socket_dir), "-p", str(primary.port),
                 "-U", "postgres", "-D", str(copy.datadir), "-X", "stream",
                 "--checkpoint=fast", "--no-password", timeout=120)
        assert await pay(net, "alice", "bob", 100) == 600  # after the backup: not in it
        net.stop_all()
        copy.start()  # a new server on the copy: recovers to the end of the backup
        restored_dsn = pg_dsn.replace(f":{primary.port}/", f":{copy.port}/")
        assert verify(restored_dsn).startswith("OK")
        restored = Network(tmp_path / "restored", store="postgresql", dsn=restored_dsn)
        try:
            up(restored)
            assert await pay(restored, "alice", "bob", 50) == 650
            assert restored.ledger_csv().count("_open:alice") == 1
        finally:
            restored.stop_all()
    finally:
        net.stop_all()
        copy.kill()
        shutil.rmtree(copy.datadir, ignore_errors=True)
