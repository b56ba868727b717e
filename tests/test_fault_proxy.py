"""The fault-injecting proxy in front of a real ledger: each fault does what it says."""

from __future__ import annotations

import time

import pytest
from netkit import Network

from chaos.proxy import FaultProxy
from common.aio import Channel
from common.errors import ConnectionLost
from common.messages import (
    LEDGER_REPLIES,
    Append,
    Appended,
    Ping,
    Pong,
    RowIn,
    Stats,
    StatsReply,
    decoder_for,
)

DECODER = decoder_for(LEDGER_REPLIES)


async def via(proxy_addr: tuple[str, int], net: Network) -> Channel:
    return await net.ledger_channel(proxy_addr)


def row(i: int) -> RowIn:
    return RowIn(tx_id=f"tx{i}", sender="_issuer", receiver="alice", amount=100)


@pytest.fixture
async def proxied(network: Network):  # type: ignore[no-untyped-def]
    network.start_ledger()
    proxy = FaultProxy(network.procs["ledger"].addr)
    addr = await proxy.start()
    yield proxy, addr, network
    await proxy.stop()


async def test_clean_pipe_and_latency(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, addr, net = proxied
    ch = await via(addr, net)
    assert isinstance(await ch.request(Ping(id=0), timeout=2), Pong)
    proxy.set_latency(0.2)
    t0 = time.monotonic()
    assert isinstance(await ch.request(Ping(id=0), timeout=5), Pong)
    assert time.monotonic() - t0 >= 0.4  # 0.2 s each way


async def test_trickle_one_byte_at_a_time_still_decodes(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, addr, net = proxied
    proxy.set_trickle(True)
    ch = await via(addr, net)
    reply = await ch.request(Append(id=0, rows=[row(1)]), timeout=10)
    assert isinstance(reply, Appended)
    assert reply.results[0].status == "written"


async def test_blackhole_holds_traffic_until_healed(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, addr, net = proxied
    ch = await via(addr, net)
    proxy.set_blackhole(True)
    with pytest.raises(TimeoutError):
        await ch.request(Ping(id=0), timeout=0.5)
    proxy.heal()
    assert isinstance(await ch.request(Ping(id=0), timeout=2), Pong)


async def test_cut_after_request_loses_the_reply_but_not_the_write(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, addr, net = proxied
    ch = await via(addr, net)
    proxy.cut_after(0, "down")  # the next reply byte kills the connection
    with pytest.raises(ConnectionLost):
        await ch.request(Append(id=0, rows=[row(7)]), timeout=5)
    proxy.heal()
    ch2 = await via(addr, net)
    again = await ch2.request(Append(id=0, rows=[row(7)]), timeout=5)
    assert isinstance(again, Appended)
    assert again.results[0].status == "duplicate"  # the first append did reach the disk
    st = await ch2.request(Stats(id=0))
    assert isinstance(st, StatsReply)
    assert st.rows == 1


async def test_reset_all_breaks_open_connections(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, addr, net = proxied
    ch = await via(addr, net)
    assert proxy.open_connections == 1
    proxy.reset_all()
    await ch.wait_closed()
    with pytest.raises(ConnectionLost):
        await ch.request(Ping(id=0), timeout=2)
    ch2 = await via(addr, net)
    assert isinstance(await ch2.request(Ping(id=0), timeout=2), Pong)
