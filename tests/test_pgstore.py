"""The PostgreSQL store against real servers: the same chain as the CSV store, batches all
or none, fencing of a stale service, a synchronous standby that holds commits back, an
in-doubt commit settled by asking, failover by promotion and pg_rewind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from netkit import Network
from pg import new_cluster

from common.errors import RequestFailed
from common.messages import Append, Appended, RowIn
from ledger.index import RecentIndex
from ledger.pgcluster import PgCluster
from ledger.pgstore import PgStore, export_csv
from ledger.storage import Fenced, LedgerStorage
from ledger.store import LedgerStore
from ledger.verify import verify_database

DTG = "2026-11-27T10:00:00.000000Z"


def row(i: int, amount: int = 100, memo: str = "", sender: str = "_issuer",
        receiver: str = "alice") -> RowIn:
    return RowIn(tx_id=f"tx{i}", sender=sender, receiver=receiver, amount=amount, memo=memo)


def legs(tx: str, amount: int = 100) -> list[RowIn]:
    return [RowIn(tx_id=f"_leg2:{tx}", sender="_issuer", receiver="_fees", amount=5),
            RowIn(tx_id=tx, sender="_issuer", receiver="alice", amount=amount)]


# Batches as the server would take them: (requests, atomic flags). Memos with commas,
# quotes, newlines, formula starts and non-ASCII; duplicates and conflicts inside and
# across batches; atomic groups refused whole; two senders with the same tx_id.
BATCHES: list[tuple[list[list[RowIn]], list[bool] | None]] = [
    ([[row(1, memo='a,"b"\n=c')], [row(2, memo="ünïcödé €")], [row(3)]], None),
    ([[row(2, memo="ünïcödé €")], [row(2, amount=7)], [row(4), row(4)]], None),
    ([legs("p1"), legs("p2")], [True, True]),
    ([legs("p2", amount=999), legs("p3"), [row(1, sender="alice", receiver="bob")]],
     [True, True, False]),
    ([[row(5, memo="+1"), row(1, sender="bob", receiver="alice", amount=3)]], None),
]


async def run_batches(store: LedgerStorage) -> list[list[tuple[str, int, str]]]:
    answers = []
    for requests, atomic in BATCHES:
        out = await store.append_batch(requests, DTG, atomic)
        assert out.failure is None
        answers.append([(s, r.seq, r.hash) for res in out.resolutions
                        for s, r in zip(res.status, res.rows, strict=True)])
    return answers


async def test_same_payments_give_byte_identical_rows_in_both_stores(
        tmp_path: Path, pg_dsn: str) -> None:
    csv = LedgerStore.open(tmp_path / "ledger.csv")
    pg = await PgStore.open(pg_dsn, cache_rows=1)  # nearly every lookup asks the table
    try:
        assert await run_batches(pg) == await run_batches(csv)
        assert (pg.last_seq, pg.last_hash) == (csv.last_seq, csv.last_hash)
        csv.flush_index()  # the CSV store's pages then come from the file by its index
        assert csv.mem.rows == []
        for party in (None, "alice", "bob", "_fees"):
            for limit in (1, 3, 100):
                nxt, pages_pg, pages_csv = 1, [], []
                for _ in range(20):
                    a, b = await pg.read_rows(nxt, limit, party), csv.read(nxt, limit, party)
                    assert (a.rows, a.next_seq, a.more) == (b.rows, b.next_seq, b.more)
                    pages_pg.append(a.rows)
                    pages_csv.append(b.rows)
                    nxt = a.next_seq
                    if not a.more:
                        break
        balances = await pg.balances()
        assert sum(balances.values()) == 0
        assert balances == csv.balances
        rows = csv.read(1, 1000).rows
        assert balances["alice"] == sum(r.amount for r in rows if r.receiver == "alice") - \
            sum(r.amount for r in rows if r.sender == "alice")
    finally:
        await pg.aclose()
        csv.close()
    assert await export_csv(pg_dsn, tmp_path / "export.csv") == csv.last_seq
    assert (tmp_path / "export.csv").read_bytes() == (tmp_path / "ledger.csv").read_bytes()
    verdict = await verify_database(pg_dsn)
    assert verdict.ok, verdict.line
    assert verdict.rows == csv.last_seq
    # A reopened store continues the chain from the table's head.
    pg = await PgStore.open(pg_dsn)
    out = await pg.append_batch([[row(1, memo='a,"b"\n=c')], [row(6)]], DTG, None)
    assert [r.status for r in out.resolutions] == [["duplicate"], ["written"]]
    assert out.written[0].seq == csv.last_seq + 1
    await pg.aclose()


async def test_a_batch_the_database_refuses_is_written_not_at_all(
        pg_cluster: PgCluster, pg_dsn: str) -> None:
    pg = await PgStore.open(pg_dsn)
    await pg.append_batch([[row(1)]], DTG, None)
    head = (pg.last_seq, pg.last_hash)
    db = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.primary.sql("ALTER TABLE jackpay_rows ADD CONSTRAINT no_bob "
                           "CHECK (receiver <> 'bob')", database=db)
    out = await pg.append_batch([[row(2)], [row(3, receiver="bob")], [row(4)]], DTG, None)
    assert out.failure is not None
    assert "no_bob" in out.failure
    assert (pg.last_seq, pg.last_hash) == head
    assert (await pg.read_rows(1, 10, None)).rows[-1].seq == 1
    assert await pg.balances() == {"_issuer": -100, "alice": 100}
    pg_cluster.primary.sql("ALTER TABLE jackpay_rows DROP CONSTRAINT no_bob", database=db)
    out = await pg.append_batch([[row(2)], [row(3, receiver="bob")]], DTG, None)
    assert out.failure is None
    assert [r.seq for r in out.written] == [2, 3]
    await pg.aclose()
    verdict = await verify_database(pg_dsn)
    assert verdict.ok, verdict.line


async def test_a_stale_store_is_fenced_and_the_new_one_writes(pg_dsn: str) -> None:
    old = await PgStore.open(pg_dsn)
    await old.append_batch([[row(1)]], DTG, None)
    new = await PgStore.open(pg_dsn)
    assert new.epoch == old.epoch + 1
    with pytest.raises(Fenced, match="epoch"):
        await old.append_batch([[row(2)]], DTG, None)
    out = await new.append_batch([[row(2)]], DTG, None)
    assert [r.seq for r in out.written] == [2]
    await old.aclose()
    await new.aclose()


async def test_acknowledged_rows_missing_after_a_reconnect_stop_the_store(pg_dsn: str) -> None:
    """As after a promotion of a server that lacks rows already acknowledged: the store
    must stop writing, never give those seqs to other payments."""
    store = await PgStore.open(pg_dsn)
    try:
        await store.append_batch([[row(1)], [row(2)], [row(3)]], DTG, None)
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("DELETE FROM jackpay_rows WHERE seq = 3")
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = 'jackpay-ledger'")
        finally:
            await conn.close()
        with pytest.raises(Fenced, match="acknowledged rows are missing"):
            await store.append_batch([[row(4)]], DTG, None)
        with pytest.raises(Fenced):  # and it stays so
            await store.append_batch([[row(5)]], DTG, None)
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await conn.fetchval("SELECT max(seq) FROM jackpay_rows") == 2
        finally:
            await conn.close()
    finally:
        await store.aclose()


async def test_a_stale_ledger_service_stops_and_exits_3(network: Network, pg_dsn: str) -> None:
    network.store, network.dsn = "postgresql", pg_dsn
    network.write_config()
    network.start_ledger()
    ch = await network.ledger_channel()
    reply = await ch.request(Append(id=0, rows=[row(1)]), timeout=10)
    assert isinstance(reply, Appended)
    # A second service takes the database over (as after a failover of the ledger).
    taker = await PgStore.open(pg_dsn)
    with pytest.raises(RequestFailed) as info:
        await ch.request(Append(id=0, rows=[row(2)]), timeout=10)
    assert info.value.code == "shutting_down"
    assert "fenced" in str(info.value)
    assert network.procs["ledger"].wait(10) == 3
    assert (await taker.read_rows(1, 10, None)).rows[-1].tx_id == "tx1"
    await taker.aclose()


async def test_an_idle_stale_ledger_service_stops_when_it_reconnects(
        network: Network, pg_dsn: str) -> None:
    """No append needed: the service's lost connection is re-made in the background, finds
    the store taken over, and the service stops (exit 3) at once."""
    network.store, network.dsn = "postgresql", pg_dsn
    network.write_config()
    network.start_ledger()
    taker = await PgStore.open(pg_dsn)
    try:
        conn = await asyncpg.connect(pg_dsn)
        try:  # the old service's writer connection goes away (a network blip, a restart)
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = 'jackpay-ledger' AND pid <> $1",
                               taker._backend[0] if taker._backend else 0)
        finally:
            await conn.close()
        assert network.procs["ledger"].wait(15) == 3
        assert "fenced" in network.procs["ledger"].log_path.read_text()
    finally:
        await taker.aclose()


def test_a_postgresql_store_needs_a_dsn(tmp_path: Path) -> None:
    from common.config import parse_config
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="needs dsn"):
        parse_config('[network]\nid = "n"\n[ledger]\nstore = "postgresql"\n')
    with pytest.raises(ConfigError, match="postgresql://"):
        parse_config('[network]\nid = "n"\n[ledger]\nstore = "postgresql"\ndsn = "db1:5432"\n')


def test_recent_index_is_bounded() -> None:
    from ledger.rows import GENESIS_HASH, make_row

    idx = RecentIndex(0, GENESIS_HASH, capacity=3)
    prev, rows = GENESIS_HASH, []
    for i in range(1, 6):
        r = make_row(prev, i, DTG, "_issuer", "alice", 1, f"t{i}", "")
        rows.append(r)
        prev = r.hash
    idx.add(rows)
    assert len(idx) == 3
    assert idx.get(("_issuer", "t1")) is None  # forgotten: the store is asked
    assert idx.get(("_issuer", "t5")) == rows[-1]
    assert (idx.last_seq, idx.last_hash) == (5, rows[-1].hash)


def test_export_and_verify_from_the_command_line(tmp_path: Path, pg_dsn: str) -> None:
    async def fill() -> None:
        pg = await PgStore.open(pg_dsn)
        await run_batches(pg)
        await pg.aclose()

    asyncio.run(fill())
    out = tmp_path / "seed.csv"
    cli = [sys.executable, "-m", "ledger"]
    done = subprocess.run([*cli, "export", "--dsn", pg_dsn, "--csv", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    for target in (str(out), pg_dsn):
        done = subprocess.run([*cli, "verify", target], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("OK")
    # A row changed behind the ledger's back: the database's chain no longer verifies.
    async def tamper() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE jackpay_rows SET amount = amount + 1 WHERE seq = 2")
        finally:
            await conn.close()

    asyncio.run(tamper())
    done = subprocess.run([*cli, "verify", pg_dsn], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("FAIL")
    # A DSN that does not parse: a message and exit 2, not a traceback.
    done = subprocess.run([*cli, "verify", "postgresql://u:pw@127.0.0.1:abc/db"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "cannot read the database" in done.stdout


# --- replication: a cluster of this module's own, with a synchronous standby ----------


@pytest.fixture(scope="module")
def replicated() -> Iterator[PgCluster]:
    cluster = new_cluster()
    try:
        cluster.add_standby("s1")
        cluster.set_sync("s1")
        cluster.wait_streaming("s1", sync=True)
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.slow
async def test_a_commit_waits_for_its_standby_and_a_lost_commit_is_asked_not_guessed(
        replicated: PgCluster) -> None:
    pg = await PgStore.open(replicated.dsn())
    await pg.append_batch([[row(1)]], DTG, None)
    s1 = replicated.nodes["s1"]
    await asyncio.to_thread(s1.stop)
    task = asyncio.create_task(pg.append_batch([[row(2)]], DTG, None))
    await asyncio.sleep(1.0)
    assert not task.done(), "a commit returned without its synchronous standby"
    # Cut the writer's connection while its COMMIT waits: committed locally, maybe not
    # replicated. The store must not answer until the standby has it.
    await asyncio.to_thread(replicated.primary.sql,
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'jackpay-ledger'")
    await asyncio.sleep(1.0)
    assert not task.done(), "an in-doubt commit was answered before the standby had it"
    await asyncio.to_thread(s1.start)
    out = await asyncio.wait_for(task, 30)
    assert out.failure is None
    assert [r.tx_id for r in out.written] == ["tx2"]
    assert pg.in_doubt == 1
    await asyncio.to_thread(replicated.wait_streaming, "s1", sync=True)
    stored = await asyncio.to_thread(replicated.primary.sql,
                                     "SELECT count(*) FROM jackpay_rows WHERE tx_id = 'tx2'",
                                     database="jackpay")
    assert stored == "1"
    await pg.aclose()


@pytest.mark.slow
async def test_failover_promote_then_rewind_the_old_primary(replicated: PgCluster) -> None:
    old_primary = replicated.primary.name
    pg = await PgStore.open(replicated.multi_host_dsn())
    before = pg.last_seq
    out = await pg.append_batch([[row(100)]], DTG, None)
    acked = out.written[0]
    # The primary's machine is lost; the synchronous standby has every acknowledged row.
    await asyncio.to_thread(replicated.primary.kill)
    # Promoted with the old primary named as its synchronous standby: the append waits
    # until the old primary is back as a standby (pg_rewind), never acknowledged alone.
    await asyncio.to_thread(replicated.promote, "s1", sync=old_primary)
    task = asyncio.create_task(pg.append_batch([[row(101)]], DTG, None))
    await asyncio.sleep(0.5)
    assert not task.done()
    await asyncio.to_thread(replicated.rewind, old_primary)
    await asyncio.to_thread(replicated.wait_streaming, old_primary, sync=True)
    out = await asyncio.wait_for(task, 60)
    assert out.failure is None
    assert out.written[0].seq == acked.seq + 1
    got = await pg.read_rows(before + 1, 10, None)
    assert [r.hash for r in got.rows] == [acked.hash, out.written[0].hash]
    out = await asyncio.wait_for(pg.append_batch([[row(102)]], DTG, None), 30)
    assert out.failure is None
    await pg.aclose()
    query = ("SELECT string_agg(tx_id, ',' ORDER BY seq) FROM jackpay_rows WHERE seq > "
             + str(before))
    for _ in range(100):  # a synchronous commit is flushed on the standby, not yet replayed
        on_old = await asyncio.to_thread(replicated.nodes[old_primary].sql, query,
                                         database="jackpay")
        if on_old == "tx100,tx101,tx102":
            break
        await asyncio.sleep(0.05)
    assert on_old == "tx100,tx101,tx102"
    verdict = await verify_database(replicated.multi_host_dsn())
    assert verdict.ok, verdict.line


@pytest.mark.slow
def test_the_cluster_command_line_starts_stops_and_destroys(tmp_path: Path) -> None:
    import tempfile

    from pg import require_pg

    require_pg()
    root = Path(tempfile.mkdtemp(prefix="jackpay-pgcli-")) / "cluster"  # not in tmp_path: 0700
    root.parent.chmod(0o755)  # the servers' user must be able to enter it
    cli = [sys.executable, "-m", "ledger.pgcluster"]
    try:
        done = subprocess.run([*cli, "start", str(root), "--standbys", "1"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
        assert set(lines) == {"primary", "standby", "dsn"}
        assert lines["dsn"].endswith("?target_session_attrs=read-write")
        cluster = PgCluster.open(root)
        assert cluster.sync_names == "s1"
        assert cluster.primary.sql("SELECT sync_state FROM pg_stat_replication") == "sync"
        done = subprocess.run([*cli, "stop", str(root)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert not any(n.running() for n in cluster.nodes.values())
    finally:
        subprocess.run([*cli, "destroy", str(root)], capture_output=True, timeout=120)
        import shutil

        shutil.rmtree(root.parent, ignore_errors=True)
    assert not root.exists()
