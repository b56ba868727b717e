"""The router's ledger client against a scripted ledger over real loopback TCP: which
ledger answers end a payment and which leave it in doubt (DESIGN §2)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from netkit import Network
from test_payments import eventually, up

from common import PROTOCOL_VERSION
from common.aio import Channel
from common.messages import (
    Append,
    Appended,
    AppendResult,
    Error,
    Hello,
    Message,
    RowIn,
    Welcome,
    decoder_for,
)
from router.ledger_client import LedgerClient, LedgerRefused

Script = Callable[[int, Append], Message | None]  # (attempt number, request) -> answer


async def scripted_ledger(script: Script) -> tuple[asyncio.Server, list[Append]]:
    seen: list[Append] = []

    def on_message(ch: Channel, msg: Message) -> None:
        if isinstance(msg, Hello):
            ch.send_nowait(Welcome(re=msg.id, version=PROTOCOL_VERSION, server="scripted"))
        elif isinstance(msg, Append):
            seen.append(msg)
            answer = script(len(seen), msg)
            if answer is not None:
                ch.send_nowait(answer)

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        Channel(r, w, decoder_for((Hello, Append)), on_message=on_message).start()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, seen


ROW = RowIn(tx_id="t1", sender="alice", receiver="bob", amount=5)


def appended(req: Append, status: str = "duplicate") -> Appended:
    return Appended(re=req.id, results=[AppendResult(
        status=status, seq=7, dtg="2026-11-27T10:00:00.000000Z", hash="a" * 64)])  # type: ignore[arg-type]


async def run_client(script: Script) -> tuple[AppendResult | Exception, list[Append]]:
    server, seen = await scripted_ledger(script)
    port = server.sockets[0].getsockname()[1]
    client = LedgerClient("127.0.0.1", port, tls=None, timeout_s=0.2, retry_max_s=0.2)
    client.start()
    try:
        assert await client.wait_connected(5)
        try:
            result: AppendResult | Exception = await asyncio.wait_for(client.append(ROW), 10)
        except LedgerRefused as exc:
            result = exc
    finally:
        await client.aclose()
        server.close()
    return result, seen


async def test_shutting_down_after_a_resend_is_still_in_doubt() -> None:
    """The first copy may still be written while the ledger drains: a `shutting_down`
    answer to the re-send must not end the payment as never-written (regression)."""
    def script(n: int, req: Append) -> Message | None:
        if n == 1:
            return None  # the answer is lost: in doubt
        if n == 2:
            return Error(re=req.id, code="shutting_down", message="stopping")
        return appended(req)  # the first copy was written after all

    result, seen = await run_client(script)
    assert isinstance(result, AppendResult), result
    assert (result.status, result.seq) == ("duplicate", 7)
    assert len(seen) >= 3


async def test_shutting_down_on_the_first_send_is_a_refusal() -> None:
    result, _ = await run_client(
        lambda n, req: Error(re=req.id, code="shutting_down", message="stopping"))
    assert isinstance(result, LedgerRefused)
    assert result.code == "shutting_down"


@pytest.mark.parametrize("first_lost", [False, True])
async def test_write_failed_is_final(first_lost: bool) -> None:
    def script(n: int, req: Append) -> Message | None:
        if first_lost and n == 1:
            return None
        return Error(re=req.id, code="ledger_write_failed", message="disk full")

    result, seen = await run_client(script)
    assert isinstance(result, LedgerRefused)
    assert result.code == "ledger_write_failed"
    assert len(seen) == (2 if first_lost else 1)


async def test_a_failing_barrier_sends_nothing_and_fails_the_rows() -> None:
    """`before_send` (a plug-in making its state durable) raising: the rows are refused
    `plugin_failed`, unsent — the ledger never sees them."""
    server, seen = await scripted_ledger(lambda n, req: appended(req))
    port = server.sockets[0].getsockname()[1]
    client = LedgerClient("127.0.0.1", port, tls=None, timeout_s=0.2, retry_max_s=0.2)

    def barrier() -> None:
        raise OSError("journal disk full")

    client.before_send = barrier
    client.start()
    try:
        assert await client.wait_connected(5)
        with pytest.raises(LedgerRefused) as refused:
            await asyncio.wait_for(client.append(ROW), 5)
        assert refused.value.code == "plugin_failed"
        got: list[AppendResult | BaseException] = []
        answered = asyncio.Event()

        def done(result: AppendResult | BaseException) -> None:
            got.append(result)
            answered.set()

        client.append_cb(ROW, done)  # the callback path, the same way
        await asyncio.wait_for(answered.wait(), 5)
        assert len(got) == 1
        assert isinstance(got[0], LedgerRefused)
        assert got[0].code == "plugin_failed"
        assert seen == []
    finally:
        await client.aclose()
        server.close()


async def test_an_odd_first_answer_is_in_doubt_and_sent_again() -> None:
    """The direct first attempt answered with something that is not `appended` for its
    rows: the connection is dropped and the same rows sent again until answered."""
    def script(n: int, req: Append) -> Message | None:
        if n == 1:
            return Appended(re=req.id, results=[])  # no result for our row
        return appended(req)

    result, seen = await run_client(script)
    assert isinstance(result, AppendResult), result
    assert len(seen) == 2  # the odd answer, then the one re-send
    assert seen[0].rows == seen[-1].rows


async def test_append_cb_delivers_the_ledgers_answer() -> None:
    server, seen = await scripted_ledger(lambda n, req: appended(req, "written"))
    port = server.sockets[0].getsockname()[1]
    client = LedgerClient("127.0.0.1", port, tls=None, timeout_s=0.2, retry_max_s=0.2)
    client.start()
    try:
        assert await client.wait_connected(5)
        done = asyncio.get_running_loop().create_future()
        client.append_cb(ROW, done.set_result)
        result = await asyncio.wait_for(done, 5)
        assert isinstance(result, AppendResult)
        assert (result.status, result.seq) == ("written", 7)
        assert len(seen) == 1
    finally:
        await client.aclose()
        server.close()


async def test_the_router_keeps_reconnecting_after_its_ledger_address_spoke_no_tls(
        network: Network) -> None:
    """While the ledger is down, something else answers on its port and does not speak
    TLS (a misdirected service, an impostor): each attempt fails its handshake, and the
    router keeps trying — it reconnects once the real ledger is back, and payments flow."""
    up(network, {"alice": "10.00", "bob": "5.00"})
    port = network.procs["ledger"].addr[1]
    network.procs["ledger"].stop()
    accepted = 0

    async def not_tls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        w.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(not_tls, "127.0.0.1", port, reuse_address=True)
    try:
        await eventually(lambda: accepted >= 3, timeout=15)  # tried again, and again
    finally:
        server.close()
        await server.wait_closed()
    network.restart("ledger")
    for _ in range(300):
        if (await network.inspect()).ledger_connected:
            break
        await asyncio.sleep(0.05)
    assert (await network.inspect()).ledger_connected
    async with network.client("alice") as alice, network.client("bob"):
        paid = await alice.send_payment("bob", 100, tx_id="after-the-impostor")
    assert paid.seq > 0
