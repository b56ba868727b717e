"""Thin asyncio shell around the codec: one `Channel` per TCP or Unix connection.

A Channel reads chunks, feeds the pure `FrameDecoder`, decodes each payload strictly and
then either resolves the pending request it answers (`re`) or hands it to the owner's
`on_message` callback (requests, server-initiated messages). Outgoing frames queued in
the same event-loop turn are coalesced into one `write`. When the connection dies every
pending request fails with `ConnectionLost` whose `__cause__` is the original error.

Rules the owner can rely on:
- a frame that fails strict decoding gets `error bad_request` (addressed to its `id` when
  one can be read) and the connection keeps serving; the peer may be buggy, not hostile;
- a declared length above the limit gets `error frame_too_large` and the connection is
  closed (the stream has lost its framing);
- a peer that stops reading while more than `max_buffered_bytes` wait to be written is
  disconnected rather than allowed to grow our memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from common.errors import ConnectionLost, ErrorCode, FrameTooLarge, RequestFailed
from common.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame
from common.messages import Error, Message, describe_decode_error, encode, salvage_request_id

log = logging.getLogger("jackpay.channel")

OnMessage = Callable[["Channel", Message], Awaitable[None] | None]
OnClose = Callable[["Channel"], None]

READ_CHUNK = 256 * 1024
MAX_BUFFERED_BYTES = 8 * 1024 * 1024


class Channel:
    """A framed, message-typed connection with request/reply matching by `id`/`re`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: msgspec.msgpack.Decoder[Any],
        *,
        name: str = "peer",
        on_message: OnMessage | None = None,
        on_close: OnClose | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self._frames = FrameDecoder(max_frame_bytes)
        self._max_frame_bytes = max_frame_bytes
        self._max_buffered = max_buffered_bytes
        self.on_message = on_message
        self.on_close = on_close
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 1
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._close_reason: BaseException | None = None
        self.last_seen = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Begin reading. Call once, after `on_message` is set."""
        if self._reader_task is None:
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_loop(), name=f"read:{self.name}"
            )

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def peername(self) -> str:
        peer = self._writer.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer or "local")

    def close(self, reason: BaseException | None = None) -> None:
        """Close now; idempotent. Pending requests fail with ConnectionLost."""
        if self._closed.is_set():
            return
        self._flush()
        self._close_reason = reason
        self._closed.set()
        with contextlib.suppress(Exception):
            self._writer.close()
        err = ConnectionLost(f"connection to {self.name} closed")
        err.__cause__ = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:  # the owner's bug must not hide the close
                log.exception("on_close callback for %s failed", self.name)

    async def wait_closed(self) -> None:
        await self._closed.wait()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    # --- sending -------------------------------------------------------------------

    def send_nowait(self, msg: Message) -> None:
        """Queue one message; frames queued in the same loop turn go out in one write."""
        if self._closed.is_set():
            raise ConnectionLost(f"connection to {self.name} is closed")
        self._out.append(encode_frame(encode(msg), self._max_frame_bytes))
        self.frames_out += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def send(self, msg: Message) -> None:
        """Queue one message and wait until the transport accepts more (backpressure)."""
        self.send_nowait(msg)
        self._flush()
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self.close(exc)
            raise ConnectionLost(f"connection to {self.name} lost") from exc

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        if self._closed.is_set() or self._writer.is_closing():
            return
        try:
            self._writer.write(data)
        except (ConnectionError, RuntimeError) as exc:
            self.close(exc)
            return
        transport = self._writer.transport
        if transport.get_write_buffer_size() > self._max_buffered:
            log.warning("%s is not reading its frames; disconnecting", self.name)
            self.close(ConnectionLost("peer not reading"))

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send `msg` with a fresh `id` and wait for its reply.

        Raises RequestFailed for an `error` reply, ConnectionLost if the connection dies
        first, TimeoutError after `timeout` seconds (the late reply is then dropped).
        """
        rid = self.next_id()
        msg = msgspec.structs.replace(msg, id=rid)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[rid] = fut
        # A plain timer on the future: cheaper than an asyncio.timeout() scope per request.
        timer = None if timeout is None else loop.call_later(timeout, _expire, fut)
        try:
            self.send_nowait(msg)
            reply = await fut
        finally:
            self._pending.pop(rid, None)
            if timer is not None:
                timer.cancel()
        if isinstance(reply, Error):
            raise RequestFailed(reply.code, reply.message)
        return reply

    def reply_error(self, re: int | None, code: ErrorCode, message: str, tx_id: str | None = None) -> None:
        """Send an error frame; silently dropped if the connection is already gone."""
        with contextlib.suppress(ConnectionLost):
            self.send_nowait(Error(re=re, code=code.value, message=message, tx_id=tx_id))

    # --- receiving -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason: BaseException | None = None
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    reason = ConnectionLost(f"{self.name} closed the connection")
                    break
                self.last_seen = time.monotonic()
                try:
                    payloads = self._frames.feed(data)
                except FrameTooLarge as exc:
                    log.warning("%s (%s): %s; closing", self.name, self.peername, exc)
                    self.reply_error(None, ErrorCode.FRAME_TOO_LARGE, str(exc))
                    reason = exc
                    break
                for payload in payloads:
                    self._dispatch(payload)
                    if self._closed.is_set():
                        return
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError) as exc:
            reason = exc
        finally:
            if not self._closed.is_set():
                self.close(reason)

    def _dispatch(self, payload: bytes) -> None:
        self.frames_in += 1
        try:
            msg = self._decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            rid = salvage_request_id(payload)
            reason = describe_decode_error(exc)
            log.info("bad frame from %s (%s): %s", self.name, self.peername, reason)
            self.reply_error(rid, ErrorCode.BAD_REQUEST, f"invalid frame: {reason}")
            return
        re = getattr(msg, "re", None)
        if re is not None:
            fut = self._pending.get(re)
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)
                return
            if not isinstance(msg, Error):
                log.debug("late or unmatched reply re=%s from %s dropped", re, self.name)
                return
        if self.on_message is None:
            return
        try:
            result = self.on_message(self, msg)
        except Exception:
            log.exception("handler for %s from %s failed", type(msg).__name__, self.name)
            rid = getattr(msg, "id", None)
            self.reply_error(rid, ErrorCode.INTERNAL_ERROR, "internal error; see server log")
            return
        if result is not None and inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handler task on %s failed", self.name, exc_info=task.exception())


def _expire(fut: asyncio.Future[Message]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def open_channel(
    host: str,
    port: int,
    decoder: msgspec.msgpack.Decoder[Any],
    *,
    name: str,
    connect_timeout: float = 5.0,
    on_message: OnMessage | None = None,
    on_close: OnClose | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Channel:
    """Connect over TCP and start a Channel. Raises OSError/TimeoutError if unreachable."""
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK)
    ch = Channel(reader, writer, decoder, name=name, on_message=on_message,
                 on_close=on_close, max_frame_bytes=max_frame_bytes)
    ch.start()
    return ch


async def open_unix_channel(
    path: str,
    decoder: msgspec.msgpack.Decoder[Any],
    *,
    name: str,
    connect_timeout: float = 5.0,
    on_message: OnMessage | None = None,
) -> Channel:
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK)
    ch = Channel(reader, writer, decoder, name=name, on_message=on_message)
    ch.start()
    return ch


def loop_factory(fast: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when installed (optional `speed` extra) and wanted, else None."""
    if not fast:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Callable[[], Coroutine[Any, Any, int]], *, fast: bool = True) -> int:
    """Run an async `main` on the best available loop and return its exit code."""
    with asyncio.Runner(loop_factory=loop_factory(fast)) as runner:
        return runner.run(main())
