"""The Channel's request deadlines over a real loopback connection: a request that is not
answered in time fails with TimeoutError exactly once, an answered one never does, and
short deadlines are not held up behind longer ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from common import PROTOCOL_VERSION
from common.aio import Channel, accept_hello, open_channel, start_channel_server
from common.errors import ConnectionLost, RequestFailed
from common.messages import Error, Hello, Message, Ping, Pong, Welcome, decoder_for

DECODER = decoder_for((Ping, Pong))


@dataclass
class Peer:
    """The far end: records every ping; answers it only when `answer` is true."""

    answer: bool = False
    seen: list[Ping] = field(default_factory=list)
    channel: Channel | None = None

    def accept(self, ch: Channel) -> None:
        self.channel = ch
        ch.on_message = self.on_message
        ch.start()

    def on_message(self, ch: Channel, msg: Message) -> None:
        if isinstance(msg, Ping):
            self.seen.append(msg)
            if self.answer:
                ch.send_nowait(Pong(re=msg.id))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Peer]]:
    peer = Peer()
    server = await start_channel_server(peer.accept, DECODER, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ch = await open_channel("127.0.0.1", port, DECODER, name="test", tls=None)
    yield ch, peer
    ch.close()
    server.close()
    await server.wait_closed()


async def test_unanswered_request_times_out_once_and_a_late_reply_is_dropped(
        pair: tuple[Channel, Peer]) -> None:
    ch, peer = pair
    with pytest.raises(TimeoutError):
        await ch.request(Ping(id=0), timeout=0.05)
    assert len(peer.seen) == 1
    assert peer.channel is not None
    peer.channel.send_nowait(Pong(re=peer.seen[0].id))  # too late: dropped quietly
    peer.answer = True
    assert isinstance(await ch.request(Ping(id=0), timeout=1.0), Pong)


async def test_short_deadline_fires_before_an_earlier_longer_one(
        pair: tuple[Channel, Peer]) -> None:
    ch, _ = pair
    results: dict[str, object] = {}

    def note(name: str):  # type: ignore[no-untyped-def]
        def on_reply(reply: object) -> None:
            assert name not in results, f"{name} answered twice"
            results[name] = reply
        return on_reply

    ch.request_nowait(Ping(id=0), 5.0, note("long"))
    ch.request_nowait(Ping(id=0), 0.05, note("short"))
    ch.request_nowait(Ping(id=0), 0.1, note("middle"))
    for _ in range(100):
        if "middle" in results:
            break
        await asyncio.sleep(0.02)
    assert set(results) == {"short", "middle"}  # not held up behind the 5 s one
    assert isinstance(results["short"], TimeoutError)
    assert isinstance(results["middle"], TimeoutError)
    ch.close()  # the long one ends now, with the close
    assert isinstance(results["long"], ConnectionLost)


async def test_answered_requests_never_time_out(pair: tuple[Channel, Peer]) -> None:
    ch, peer = pair
    peer.answer = True
    replies: list[object] = []
    for _ in range(50):
        ch.request_nowait(Ping(id=0), 0.05, replies.append)
    await asyncio.sleep(0.3)  # well past every deadline
    assert len(replies) == 50
    assert all(isinstance(r, Pong) for r in replies)


async def test_request_sent_from_a_timeout_callback_gets_its_own_deadline(
        pair: tuple[Channel, Peer]) -> None:
    ch, _ = pair
    outcomes: list[str] = []
    second_done = asyncio.Event()

    def second(reply: object) -> None:
        outcomes.append(f"second:{type(reply).__name__}")
        second_done.set()

    def first(reply: object) -> None:
        outcomes.append(f"first:{type(reply).__name__}")
        ch.request_nowait(Ping(id=0), 0.05, second)

    ch.request_nowait(Ping(id=0), 0.05, first)
    ch.request_nowait(Ping(id=0), 10.0, lambda r: outcomes.append(f"long:{type(r).__name__}"))
    await asyncio.wait_for(second_done.wait(), timeout=2.0)
    assert outcomes == ["first:TimeoutError", "second:TimeoutError"]


async def test_closing_from_a_timeout_callback_fails_the_rest_once(
        pair: tuple[Channel, Peer]) -> None:
    ch, _ = pair
    outcomes: list[str] = []

    def closer(reply: object) -> None:
        outcomes.append(f"closer:{type(reply).__name__}")
        ch.close()

    ch.request_nowait(Ping(id=0), 0.05, closer)
    ch.request_nowait(Ping(id=0), 0.05, lambda r: outcomes.append(f"a:{type(r).__name__}"))
    ch.request_nowait(Ping(id=0), 3.0, lambda r: outcomes.append(f"b:{type(r).__name__}"))
    await asyncio.sleep(0.3)
    assert outcomes == ["closer:TimeoutError", "a:ConnectionLost", "b:ConnectionLost"]


async def test_answered_requests_with_long_timeouts_do_not_pile_up(
        pair: tuple[Channel, Peer]) -> None:
    """Each request leaves a deadline entry behind; answered ones must be dropped well
    before their (long) deadline, or a busy client would hold one per request it ever
    made within the timeout. White-box: counts the channel's queued deadlines."""
    ch, peer = pair
    unanswered: list[object] = []
    ch.request_nowait(Ping(id=0), 600.0, unanswered.append)  # stays at the queue's head
    await asyncio.sleep(0.05)
    peer.answer = True
    for _ in range(5):
        await asyncio.gather(*(ch.request(Ping(id=0), timeout=600.0) for _ in range(1000)))
    queued = sum(len(q) for q in ch._deadlines.values())
    assert queued <= 2048, queued
    assert unanswered == []  # the one still waiting was kept


async def test_ever_different_timeouts_do_not_keep_a_queue_each(
        pair: tuple[Channel, Peer]) -> None:
    """A caller passing the time it has left as the timeout must not leave one deadline
    queue per value behind. White-box: counts the channel's deadline queues."""
    ch, peer = pair
    peer.answer = True
    for i in range(300):
        await ch.request(Ping(id=0), timeout=0.05 + i * 0.0001)  # 0.1 ms apart
    peer.answer = False
    timed_out: list[object] = []
    ch.request_nowait(Ping(id=0), 0.02, timed_out.append)  # its timeout runs a sweep
    await asyncio.sleep(0.3)
    assert len(timed_out) == 1
    assert isinstance(timed_out[0], TimeoutError)
    assert len(ch._deadlines) == 0, sorted(ch._deadlines)


@pytest.mark.parametrize(("first", "code"), [
    (Ping(id=0), "hello_required"),
    (Hello(id=0, version=PROTOCOL_VERSION, role="payer"), "bad_request"),
    (Hello(id=0, version=PROTOCOL_VERSION - 1, role="admin"), "unsupported_version"),
    (Hello(id=0, version=PROTOCOL_VERSION, role="admin"), None),
])
async def test_accept_hello_answers_what_is_wrong_and_closes(first: Message,
                                                             code: str | None) -> None:
    """The first-frame rule every server shares (router, its admin socket, ledger, payer
    daemon): one refusal code per fault, then close; a good hello keeps the connection."""
    accepted: list[Hello | None] = []

    def accept(ch: Channel) -> None:
        def on_message(c: Channel, msg: Message) -> None:
            hello = accept_hello(c, msg, ("admin",), "the test server")
            accepted.append(hello)
            if hello is not None:
                c.send_nowait(Welcome(re=hello.id, version=PROTOCOL_VERSION, server="t"))
        ch.on_message = on_message
        ch.start()

    server = await start_channel_server(accept, decoder_for((Hello, Ping)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ch = await open_channel("127.0.0.1", port, decoder_for((Welcome, Error)), name="t",
                            tls=None)
    try:
        if code is None:
            assert isinstance(await ch.request(first, timeout=2), Welcome)
            assert [h.role if h else None for h in accepted] == ["admin"]
            assert not ch.closed
        else:
            with pytest.raises(RequestFailed) as info:
                await ch.request(first, timeout=2)
            assert info.value.code == code
            await asyncio.wait_for(ch.wait_closed(), 2)  # and the server closed it
            assert accepted == [None]
    finally:
        ch.close()
        server.close()
        await server.wait_closed()


async def test_watch_tells_when_a_task_that_must_live_ends_by_an_exception() -> None:
    """common.aio.watch: a task that ends by an exception calls `on_death` with why; one
    cancelled (a close) or ended normally does not."""
    from common.aio import watch

    deaths: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0)
        raise OSError("no more file descriptors")

    async def ends() -> None:
        await asyncio.sleep(0)

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(f()) for f in (fails, ends, forever)]
    for task, what in zip(tasks, ("the failing loop", "the ending loop", "the endless loop"),
                          strict=True):
        watch(task, what, deaths.append)
    tasks[2].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)  # done-callbacks run one turn later
    assert deaths == ["the failing loop ended: OSError('no more file descriptors')"]
