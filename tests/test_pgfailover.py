"""Failover of the PostgreSQL store against real servers (a cluster of this module's own:
a primary and one synchronous standby; the tests run in order and share it).

1. The store follows the new primary without waiting for an append: the primary is
   SIGKILLed, the standby promoted (with a synchronous standby named before its first
   transaction), the old primary rewound as that standby; the store has reconnected by
   itself and every acknowledged row is there.
2. An old primary left running cannot acknowledge: a service still pointed at it after
   its standby was promoted waits (its synchronous standby is gone) and is never told
   `written`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pg import new_cluster

from common.messages import RowIn
from ledger.pgcluster import PgCluster
from ledger.pgstore import PgStore

DTG = "2026-01-01T00:00:00.000000Z"


def row(i: int) -> RowIn:
    return RowIn(sender="_issuer", receiver="alice", amount=100 + i, tx_id=f"f{i}", memo="")


async def wait_for(cond: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    c = new_cluster()
    try:
        c.add_standby("s1")
        c.set_sync("s1")
        c.wait_streaming("s1", sync=True)
        yield c
    finally:
        c.destroy()


@pytest.mark.slow
async def test_the_store_follows_the_new_primary_without_an_append(cluster: PgCluster) -> None:
    old = cluster.primary.name
    pg = await PgStore.open(cluster.multi_host_dsn())
    out = await pg.append_batch([[row(1)]], DTG, None)
    acked = out.written[0]
    await asyncio.to_thread(cluster.primary.kill)
    await asyncio.to_thread(cluster.promote, "s1", sync=old)
    # The new primary waits for its named standby: the store's barrier cannot finish yet.
    await asyncio.sleep(0.5)
    assert pg.reconnects == 0
    await asyncio.to_thread(cluster.rewind, old)
    await asyncio.to_thread(cluster.wait_streaming, old, sync=True)
    await wait_for(lambda: pg.reconnects == 1, 30)  # no append asked for it
    assert pg.last_seq == acked.seq
    out = await asyncio.wait_for(pg.append_batch([[row(2)]], DTG, None), 10)
    assert out.failure is None
    assert out.written[0].seq == acked.seq + 1
    assert pg.in_doubt == 0
    await pg.aclose()


@pytest.mark.slow
async def test_an_old_primary_left_running_cannot_acknowledge(cluster: PgCluster) -> None:
    assert cluster.standbys, "runs after the first test: a primary and a sync standby"
    old, standby = cluster.primary, cluster.standbys[0]
    stale = await PgStore.open(old.dsn())  # pointed at this server only
    assert (await stale.append_batch([[row(3)]], DTG, None)).failure is None
    # Split brain: the standby is promoted while the old primary keeps running.
    await asyncio.to_thread(cluster.promote, standby.name)
    task = asyncio.create_task(stale.append_batch([[row(4)]], DTG, None))
    await asyncio.sleep(2.0)
    assert not task.done(), "an old primary acknowledged a commit without its standby"
    on_new = await asyncio.to_thread(cluster.primary.sql,
                                     "SELECT string_agg(tx_id, ',' ORDER BY seq) FROM "
                                     "jackpay_rows WHERE tx_id LIKE 'f%'", database="jackpay")
    assert on_new == "f1,f2,f3"  # the acknowledged rows, not the one left waiting
    task.cancel()
    stale.close()
    with pytest.raises(asyncio.CancelledError):
        await task
