"""The router's ledger client against a scripted ledger over real loopback TCP: which
ledger answers end a payment and which leave it in doubt (DESIGN §2)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest
from netkit import Network
from paykit import (
    assert_conserved,
    assert_router_agrees,
    connect,
    eventually,
    ledger_rows,
    up,
)

from common import PROTOCOL_VERSION
from common.aio import Channel
from common.errors import RequestFailed
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
from router.ledger_client import LedgerClient, LedgerRefused, _row_bytes

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
    await network.wait_ledger_connected()
    async with network.client("alice") as alice, network.client("bob"):
        paid = await alice.send_payment("bob", 100, tx_id="after-the-impostor")
    assert paid.seq > 0


LONGEST = RowIn(tx_id="t" * 64, sender="s" * 64, receiver="r" * 64, amount=2**62,
                memo="é" * 256, sender_sig=b"\xff" * 64, receiver_sig=b"\xff" * 64)


@pytest.mark.parametrize("row", [
    ROW, LONGEST, msgspec.structs.replace(LONGEST, memo="m" * 256),
    msgspec.structs.replace(LONGEST, receiver_sig=None),
    msgspec.structs.replace(LONGEST, sender_sig=None, receiver_sig=None, memo="")])
def test_a_rows_size_estimate_bounds_its_encoding(row: RowIn) -> None:
    """The client splits appends by this estimate (no encoding on the hot path): it must
    never be below the row's real size, signatures included."""
    assert _row_bytes(row) >= len(msgspec.msgpack.encode(row))


async def test_signed_rows_with_long_memos_go_in_frames_the_ledger_takes(
        network: Network) -> None:
    """Signed rows (two signatures each) with long memos, queued in one turn: split into
    appends that fit the ledger's frame limit, and every one written. (The estimate once
    left the signatures out: 210 such rows made a 68 KB frame against the 64 KiB limit,
    and none was ever answered.)"""
    network.write_config()
    network.start_ledger()
    client = LedgerClient("127.0.0.1", network.procs["ledger"].addr[1],
                          tls=network.ledger_tls(), timeout_s=2, retry_max_s=0.2)
    client.start()
    try:
        assert await client.wait_connected(10)
        futs = [client.append(RowIn(tx_id=f"{i:032x}", sender="alice", receiver="bob", amount=1,
                                    memo="m" * 100, sender_sig=b"s" * 64,
                                    receiver_sig=b"r" * 64)) for i in range(210)]
        results = await asyncio.wait_for(asyncio.gather(*futs), 30)
    finally:
        await client.aclose()
    assert [r.status for r in results] == ["written"] * 210
    assert [r.seq for r in results] == list(range(1, 211))


async def test_a_row_too_big_for_the_ledgers_frames_fails_its_payment_and_no_other(
        network: Network) -> None:
    """A ledger run with small frames (`max_frame_bytes = 1024`) cannot take a signed row
    with a 256-character memo of 4-byte characters: the payment ends `internal_error`,
    saying why, nothing written and nothing held — instead of waiting for ever — and the
    next payments go through."""
    network.ledger_settings["max_frame_bytes"] = 1024
    up(network, {"alice": "10.00", "bob": "5.00"})
    alice, bob = await connect(network, "alice"), await connect(network, "bob")
    rows_before = ledger_rows(network)
    with pytest.raises(RequestFailed) as failed:
        await alice.client.send_payment("bob", 100, "\U0001F600" * 256, "too-big")
    assert failed.value.code == "internal_error"
    assert "max_frame_bytes" in failed.value.message
    assert ledger_rows(network) == rows_before
    await alice.assert_no_hold()
    await eventually(lambda: [c.tx_id for c in bob.cancels] == ["too-big"])
    assert await alice.pay("bob", 100, "fits", "é" * 100) == "paid"
    assert_conserved(network)
    await assert_router_agrees(network)
