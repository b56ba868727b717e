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
  disconnected rather than allowed to grow our memory;
- a frame that repeats a key in any map gets `bad_request` (common.strict);
- with TLS (common.tls) the Channel runs the TLS session itself over a plain transport:
  a server refuses a connection over its caps before any TLS work, hands it to its owner
  only once the handshake is done, and closes any connection whose owner has not called
  `handshake_complete()` (after `hello`, and `auth` where there is one) within the
  server's `handshake_timeout_s` from accept: TLS, hello and auth share one deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import ssl
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import msgspec

from common import PROTOCOL_VERSION
from common.errors import (
    ConfigError,
    ConnectionLost,
    ErrorCode,
    FrameTooLarge,
    ProtocolError,
    RequestFailed,
)
from common.framing import DEFAULT_MAX_FRAME_BYTES, HEADER, HEADER_SIZE, FrameDecoder
from common.limits import ConnectionCaps, RateByKey, ServerLimits, address_key
from common.logs import ThrottledEvents, log_event
from common.messages import Error, Hello, Message, describe_decode_error, salvage_request_id
from common.strict import has_duplicate_keys
from common.tls import ClientTls, TlsFailed, TlsSession

log = logging.getLogger("jackpay.channel")

OnMessage = Callable[["Channel", Message], Awaitable[None] | None]
OnClose = Callable[["Channel"], None]
OnAccept = Callable[["Channel"], None]
OnReply = Callable[[Message | BaseException], None]

MAX_BUFFERED_BYTES = 8 * 1024 * 1024
# Before its handshake completes a connection may make us buffer this much for it, at
# most; a frame that fails decoding ends it; after the handshake, MAX_BAD_FRAMES do.
PRE_HANDSHAKE_MAX_BUFFERED = 64 * 1024
MAX_BAD_FRAMES = 100
# The transport's default high-water mark: above it pause_writing() is called, so the
# slow-reader check only needs the buffer size while writing is paused.
_DEFAULT_HIGH_WATER = 64 * 1024

# Same settings as common.messages.encode (msgspec defaults): identical bytes.
_encoder = msgspec.msgpack.Encoder()
_encode_into = _encoder.encode_into
_reencode = _encoder.encode
_HEADER_PLACEHOLDER = bytes(HEADER_SIZE)
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack_into
_replace = msgspec.structs.replace
_monotonic = time.monotonic
assert HEADER_SIZE == 4  # the fast path in Channel._receive reads 4-byte headers


class Channel(asyncio.Protocol):
    """A framed, message-typed connection with request/reply matching by `id`/`re`.

    It is the connection's asyncio Protocol: chunks arrive in `data_received` and are
    decoded and dispatched there (no reader task, no future per read); frames go out
    with `transport.write`, coalesced per loop turn; `pause_writing`/`resume_writing`
    drive `send`'s backpressure. Three ways to get one: `open_channel` /
    `open_unix_channel` (client side), `start_channel_server` (server side), or
    `Channel(reader, writer, ...)` from a stream pair, which takes the pair's transport
    over (bytes the StreamReader had buffered are dispatched first).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter | None,
        decoder: msgspec.msgpack.Decoder[Any],
        *,
        name: str = "peer",
        on_message: OnMessage | None = None,
        on_close: OnClose | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._decode = decoder.decode
        self._frames = FrameDecoder(max_frame_bytes)
        self._max_frame_bytes = max_frame_bytes
        self._max_buffered_normally = max_buffered_bytes
        self._set_max_buffered(max_buffered_bytes)
        self.on_message = on_message
        self.on_close = on_close
        self._pending: dict[int, asyncio.Future[Message]] = {}
        # request_nowait: callbacks by id. Deadlines of both kinds of request: one FIFO
        # per timeout value (a channel uses a handful), each in deadline order because
        # the clock only moves forward; one timer for all.
        self._callbacks: dict[int, OnReply] = {}
        self._deadlines: dict[float, deque[tuple[float, int]]] = {}
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        self._next_id = 1
        self._wbuf = bytearray()
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._transport: asyncio.Transport | None = None
        # What raw bytes can be written to (a StreamWriter or the transport); tests use it.
        # Holding an adopted StreamWriter also keeps its __del__ from closing the transport.
        self._writer: Any = None
        self._peername = "local"
        self._accept: OnAccept | None = None
        self._started = False
        self._early: list[bytes] = []  # received before start()
        self._early_end: BaseException | None = None  # the end seen before start()
        self._closed = False
        self._closed_event = asyncio.Event()
        self._lost_event = asyncio.Event()  # connection_lost: the socket is gone
        self._close_reason: BaseException | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.last_seen = _monotonic()
        # TLS (None: plain). A client sets `_client_tls`; a server's factory sets
        # `_server`, which admits the connection and holds its TLS context.
        self._tls: TlsSession | None = None
        self._client_tls: ClientTls | None = None
        self._tls_ready: asyncio.Future[None] | None = None
        self._server: _ServerSide | None = None
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self.address = ""  # the peer's IP address (empty for Unix sockets)
        self.address_key = ""  # what the server counts it as (IPv6: its /64)
        # A server's connection is `handshaking` until its owner calls
        # handshake_complete(): a bad frame then ends it, and it may buffer little.
        self._handshaking = False
        self._bad_frames = 0
        # Owners that charge a peer for every frame (the router) see unmatched replies
        # too, and hear of each bad frame.
        self.deliver_unmatched = False
        self.on_bad_frame: Callable[[Channel], None] | None = None
        self.peer_identity: str | None = None  # the CN of a verified client certificate
        if writer is not None:
            self._adopt(reader, writer)

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        """Change the largest frame accepted from now on (e.g. small until login)."""
        self._max_frame_bytes = value
        self._frames.max_frame_bytes = value

    def _set_max_buffered(self, limit: int) -> None:
        """At most `limit` bytes may wait to be written to a peer that does not read."""
        self._max_buffered = limit
        # Above the transport's high-water mark it calls pause_writing(), so only a limit
        # below it needs the buffer checked at every flush.
        self._always_check_buffer = limit < _DEFAULT_HIGH_WATER

    def handshake_complete(self) -> None:
        """The owner accepted the peer's `hello` (and `auth`): the handshake deadline and
        the handshake's tighter bounds no longer apply."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._handshaking:
            self._handshaking = False
            self._set_max_buffered(self._max_buffered_normally)
            if self._server is not None:
                self._server.leave(self)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Begin dispatching. Call once, after `on_message` is set (bytes received
        before are kept and dispatched now)."""
        if self._started:
            return
        self._started = True
        early, self._early = self._early, []
        for chunk in early:
            self._receive(chunk)
            if self._closed:
                return
        if self._early_end is not None:
            self.close(self._early_end)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peername(self) -> str:
        return self._peername

    def close(self, reason: BaseException | None = None) -> None:
        """Close now; idempotent. Pending requests fail with ConnectionLost."""
        if self._closed:
            return
        self._flush()
        if self._closed:  # the flush found a dead or non-reading peer and closed
            return
        self._closed = True
        self._close_reason = reason
        self._closed_event.set()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._admitted:
            self._admitted = False
            assert self._server is not None
            self._server.caps.release(self.address_key)
            self._server.leave(self)
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                if self._tls is not None and not transport.is_closing():
                    transport.write(self._tls.close())
                transport.close()
        detail = f": {reason}" if isinstance(reason, ProtocolError) else ""
        err = ConnectionLost(f"connection to {self.name} closed{detail}")
        err.__cause__ = reason
        ready = self._tls_ready
        if ready is not None and not ready.done():
            ready.set_exception(reason if isinstance(reason, TlsFailed) else err)
            ready.exception()  # retrieved: a caller that gave up must not log it
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._wake_drainers(err)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        self._deadlines.clear()
        callbacks, self._callbacks = self._callbacks, {}
        for on_reply in callbacks.values():
            _call_back(on_reply, err)
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:  # the owner's bug must not hide the close
                log.exception("on_close callback for %s failed", self.name)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()
        if self._transport is not None:
            await self._lost_event.wait()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._set_transport(cast(asyncio.Transport, transport))
        server = self._server
        if server is not None:
            self._handshaking = True
            self._set_max_buffered(PRE_HANDSHAKE_MAX_BUFFERED)
            refused = server.admit(self)
            if refused:
                self._closed = True
                self._closed_event.set()
                transport.abort()  # type: ignore[attr-defined]
                server.events.event("refused", "connection refused", name=server.name,
                                    peer=self._peername, reason=refused)
                return
            self._admitted = True
            if server.handshake_timeout_s is not None:
                self._deadline = self._loop.call_later(server.handshake_timeout_s,
                                                       self._handshake_overdue)
            if server.tls is not None:
                self._tls = TlsSession(server.tls, server_side=True)
                return  # the owner gets the connection once the TLS handshake is done
        elif self._client_tls is not None:
            tls = self._client_tls
            self._tls = TlsSession(tls.context, server_side=False, server_name=tls.server_name)
            self._tls_ready = self._loop.create_future()
            try:
                hello = self._tls.start()
            except TlsFailed as exc:
                self.close(exc)
                return
            cast(asyncio.Transport, transport).write(hello)
            return
        self._call_accept()

    def _call_accept(self) -> None:
        accept, self._accept = self._accept, None
        if accept is not None:
            try:
                accept(self)
            except Exception:
                log.exception("accepting a connection from %s failed", self._peername)
                self.close()

    def _handshake_overdue(self) -> None:
        self._deadline = None
        if self._closed:
            return
        assert self._server is not None
        timeout = self._server.handshake_timeout_s
        self._server.events.event("overdue", "handshake not completed in time; closed",
                                  name=self._server.name, peer=self._peername,
                                  timeout_s=timeout)
        if self._started:
            self.reply_error(None, ErrorCode.HELLO_REQUIRED,
                             f"complete hello within {timeout:g}s of connecting")
        self.close(ConnectionLost("handshake not completed in time"))

    def data_received(self, data: bytes) -> None:
        self.last_seen = _monotonic()
        tls = self._tls
        if tls is not None:
            if self._closed:
                return
            was_done = tls.handshake_done
            try:
                data, out, eof = tls.receive(data)
            except TlsFailed as exc:
                self._tls_failed(tls, exc)
                return
            if out and self._transport is not None:
                self._transport.write(out)
            if not was_done and tls.handshake_done:
                self._tls_established(tls)
                if self._closed:
                    return
            if data:
                if self._started:
                    self._receive(data)
                else:
                    self._early.append(data)
            if eof:
                self._end(ConnectionLost(f"{self.name} closed the connection"))
            return
        if self._started:
            self._receive(data)
        else:
            self._early.append(bytes(data))

    def _tls_established(self, tls: TlsSession) -> None:
        self.peer_identity = tls.peer_common_name()
        if self._server is not None and self._handshaking:
            self._server.tls_done(self, verified_client=self.peer_identity is not None)
        if self._tls_ready is not None:  # a client: open_channel goes on
            if not self._tls_ready.done():
                self._tls_ready.set_result(None)
        else:
            self._call_accept()
        if self._wbuf:
            self._flush()

    def _tls_failed(self, tls: TlsSession, exc: TlsFailed) -> None:
        """A handshake or record failed: send the alert that says why, log one line
        (never a traceback: it is the peer's doing), close."""
        with contextlib.suppress(Exception):
            alert = tls.pending_output()
            if alert and self._transport is not None:
                self._transport.write(alert)
        if self._server is not None:
            # one line a second per kind of failure (OpenSSL's reasons are a small set)
            self._server.events.event(f"tls:{exc}", "TLS failed; closed",
                                      name=self._server.name, peer=self._peername,
                                      reason=str(exc))
        else:
            log.info("%s (%s): %s; closing", self.name, self._peername, exc)
        self.close(exc)

    def eof_received(self) -> bool | None:
        self._end(ConnectionLost(f"{self.name} closed the connection"))
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_event.set()
        self._write_paused = False
        self._end(exc if exc is not None else
                  ConnectionLost(f"{self.name} closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers(None)

    def _end(self, reason: BaseException) -> None:
        if self._closed:
            return
        if self._started or (self._tls is not None and not self._tls.handshake_done):
            self.close(reason)
        elif self._early_end is None:
            self._early_end = reason

    def _set_transport(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        if self._writer is None:
            self._writer = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peername = f"{peer[0]}:{peer[1]}"
            self.address = str(peer[0])
            self.address_key = address_key(self.address)
        else:
            self._peername = str(peer or "local")

    def _adopt(self, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter) -> None:
        """Take over a stream pair's transport; what its reader holds is dispatched first."""
        transport = cast(asyncio.Transport, writer.transport)
        self._writer = writer
        if reader is not None:
            buf = getattr(reader, "_buffer", None)
            if buf:
                self._early.append(bytes(buf))
                buf.clear()
            exc = reader.exception()
            if exc is not None:
                self._early_end = exc
            elif getattr(reader, "_eof", False):
                self._early_end = ConnectionLost(f"{self.name} closed the connection")
            if getattr(reader, "_paused", False):  # the reader had stopped the transport
                reader._paused = False  # type: ignore[attr-defined]
                transport.resume_reading()
        old = getattr(writer, "_protocol", None)
        if getattr(old, "_connection_lost", False):
            self._lost_event.set()
        elif getattr(old, "_paused", False):
            self._write_paused = True
        transport.set_protocol(self)
        self._set_transport(transport)

    # --- sending -------------------------------------------------------------------

    def send_nowait(self, msg: Message) -> None:
        """Queue one message; frames queued in the same loop turn go out in one write."""
        if self._closed:
            raise ConnectionLost(f"connection to {self.name} is closed")
        buf = self._wbuf
        start = len(buf)
        buf += _HEADER_PLACEHOLDER
        try:
            _encode_into(msg, buf, start + 4)
        except BaseException:
            del buf[start:]
            raise
        size = len(buf) - start - 4
        if size > self._max_frame_bytes:
            del buf[start:]
            raise FrameTooLarge(size, self._max_frame_bytes)
        _pack_header(buf, start, size)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Frames queued in this loop turn go out together, in one write, at its end."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush_now(self) -> None:
        """Write what is queued now, not at the end of the turn: for a caller that is
        itself the end of a coalescing point (the router's ledger client sends one
        `append` per turn from a callback at the turn's end; waiting for the channel's
        own flush would cost the whole batch another loop turn)."""
        self._flush()

    def send_raw(self, data: bytes) -> None:
        """Queue bytes as they are (no framing, no encoding): for tests and tools that
        must send what a broken or hostile peer would. Encrypted like any frame."""
        if self._closed:
            raise ConnectionLost(f"connection to {self.name} is closed")
        self._wbuf += data
        self._schedule_flush()

    async def send(self, msg: Message) -> None:
        """Queue one message and wait until the transport accepts more (backpressure)."""
        self.send_nowait(msg)
        self._flush()
        if self._closed:
            raise ConnectionLost(f"connection to {self.name} lost") from self._close_reason
        if self._write_paused:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._drain_waiters.remove(fut)

    def _wake_drainers(self, err: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data: bytes | bytearray = self._wbuf
        transport = self._transport
        if not data or transport is None:
            return
        tls = self._tls
        if tls is not None and not tls.handshake_done:
            return  # sent once the handshake is done (_tls_established)
        # A fresh buffer rather than clear(): the transport may keep a view of `data`.
        self._wbuf = bytearray()
        if self._closed or transport.is_closing():
            return
        try:
            if tls is not None:
                data = tls.send(data)
            transport.write(data)
        except TlsFailed as exc:
            self.close(exc)
            return
        except (ConnectionError, RuntimeError) as exc:
            self.close(exc)
            return
        if ((self._write_paused or self._always_check_buffer)
                and transport.get_write_buffer_size() > self._max_buffered):
            log.warning("%s is not reading its frames; disconnecting", self.name)
            self.close(ConnectionLost("peer not reading"))
            transport.abort()  # its unread backlog is dropped, not kept until it reads

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send `msg` with a fresh `id` and wait for its reply.

        Raises RequestFailed for an `error` reply, ConnectionLost if the connection dies
        first, TimeoutError after `timeout` seconds (the late reply is then dropped).
        """
        rid = self._next_id
        self._next_id = rid + 1
        msg = _replace(msg, id=rid)
        fut: asyncio.Future[Message] = self._loop.create_future()
        self.send_nowait(msg)
        self._pending[rid] = fut
        if timeout is not None:
            # A deadline in the channel's heap (one timer for all), not a timer each.
            self._add_deadline(rid, timeout)
        try:
            reply = await fut
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, Error):
            raise RequestFailed(reply.code, reply.message, reply.tx_id)
        return reply

    def request_nowait(self, msg: Message, timeout: float, on_reply: OnReply) -> None:
        """`request` without a future, a timer or an await, for requests whose answer
        only needs noting (a ping, `settled`): `on_reply` is called exactly once, with
        the reply, or with the exception `request` would raise (RequestFailed for an
        `error` reply, ConnectionLost, TimeoutError after `timeout` seconds; the late
        reply is then dropped). The deadlines of all such requests share one timer.
        Raises ConnectionLost at once if the channel is closed."""
        rid = self.next_id()
        self.send_nowait(_replace(msg, id=rid))
        self.expect_reply(rid, timeout, on_reply)

    def expect_reply(self, rid: int, timeout: float, on_reply: OnReply) -> None:
        """`request_nowait` for a request already sent with `id=rid` from `next_id()`
        (saves copying the message to set its id): `on_reply` is called exactly once,
        as there."""
        if self._closed:
            _call_back(on_reply, ConnectionLost(f"connection to {self.name} is closed"))
            return
        self._callbacks[rid] = on_reply
        self._add_deadline(rid, timeout)

    def _add_deadline(self, rid: int, timeout: float) -> None:
        deadline = _monotonic() + timeout
        # Queues by timeout rounded to the millisecond: callers passing ever-different
        # timeouts share a few queues (an entry may then time out up to 1 ms late).
        key = round(timeout, 3)
        queue = self._deadlines.get(key)
        if queue is None:
            queue = self._deadlines[key] = deque()
        callbacks, pending = self._callbacks, self._pending
        # Answers mostly come in the order asked: drop the answered entries at the head
        # now, a few at a time, rather than all at once when the sweep comes round (which
        # paused a busy router for milliseconds every `settle_timeout_s`).
        while queue and queue[0][1] not in callbacks and queue[0][1] not in pending:
            queue.popleft()
        queue.append((deadline, rid))
        if len(queue) > 1024 and len(queue) > 4 * (len(callbacks) + len(pending)):
            # Answers out of order leave entries behind the head until their deadline
            # comes up; drop them now and then, so the queue stays within a few times the
            # requests still waiting (amortised O(1) per request).
            self._deadlines[key] = deque(
                e for e in queue if e[1] in callbacks or e[1] in pending)
        if self._sweep_timer is None or deadline < self._sweep_at:
            self._arm_sweep(deadline)

    def _arm_sweep(self, deadline: float) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep_at = deadline
        self._sweep_timer = self._loop.call_later(max(0.0, deadline - _monotonic()),
                                                  self._sweep)

    def _sweep(self) -> None:
        """Time out the requests whose deadline has passed; drop the entries of answered
        ones (each entry is queued once and dropped once); re-arm for the next."""
        self._sweep_timer = None
        now = _monotonic()
        callbacks = self._callbacks
        pending = self._pending
        next_at: float | None = None
        # A snapshot: a timed-out callback may send requests (new queues) or close us.
        for key, queue in list(self._deadlines.items()):
            while queue and not self._closed:
                deadline, rid = queue[0]
                if deadline <= now:
                    queue.popleft()
                    on_reply = callbacks.pop(rid, None)  # None: answered already
                    if on_reply is not None:
                        _call_back(on_reply, TimeoutError())
                        continue
                    fut = pending.get(rid)
                    if fut is not None and not fut.done():
                        fut.set_exception(TimeoutError())  # `request` removes it from _pending
                elif rid not in callbacks and rid not in pending:
                    queue.popleft()  # answered: no timer for it
                else:
                    if next_at is None or deadline < next_at:
                        next_at = deadline
                    break
            if not queue and self._deadlines.get(key) is queue:
                del self._deadlines[key]  # nothing waits with this timeout: forget it
        if next_at is not None and not self._closed and (
                self._sweep_timer is None or next_at < self._sweep_at):
            self._arm_sweep(next_at)

    def reply_error(self, re: int | None, code: ErrorCode, message: str, tx_id: str | None = None) -> None:
        """Send an error frame; silently dropped if the connection is already gone."""
        with contextlib.suppress(ConnectionLost):
            self.send_nowait(Error(re=re, code=code.value, message=message, tx_id=tx_id))

    # --- receiving -----------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        frames = self._frames
        if frames.buffered:  # a frame is split across chunks: let the decoder join it
            try:
                payloads = frames.feed(data)
            except FrameTooLarge as exc:
                self._too_large(exc)
                return
            for payload in payloads:
                self._dispatch(payload)
                if self._closed:
                    return
            return
        # Fast path: whole frames straight out of this chunk; only a tail is buffered.
        pos = 0
        end = len(data)
        limit = self._max_frame_bytes
        while end - pos >= 4:
            (length,) = _unpack_header(data, pos)
            if length > limit:
                break  # the decoder below refuses it
            start = pos + 4
            stop = start + length
            if stop > end:
                break
            self._dispatch(data[start:stop])
            if self._closed:
                return
            pos = stop
        if pos < end:
            try:
                frames.feed(data[pos:] if pos else data)  # an incomplete frame: no output
            except FrameTooLarge as exc:
                self._too_large(exc)

    def _bad_frame(self, payload: bytes, reason: str) -> None:
        """`bad_request` for a frame that failed strict decoding. Logged for the first
        few of a connection (escaped: it may hold the peer's text); during the handshake,
        or past MAX_BAD_FRAMES, the connection is closed."""
        self._bad_frames += 1
        if self._bad_frames <= 3:  # a field: quoted and escaped (it holds the peer's text)
            log_event(log, "bad frame", name=self.name, peer=self._peername, reason=reason)
        self.reply_error(salvage_request_id(payload), ErrorCode.BAD_REQUEST,
                         f"invalid frame: {reason}")
        if self._handshaking or self._bad_frames > MAX_BAD_FRAMES:
            self.close(ProtocolError("bad frames"))
        elif self.on_bad_frame is not None:
            self.on_bad_frame(self)

    def _too_large(self, exc: FrameTooLarge) -> None:
        log.warning("%s (%s): %s; closing", self.name, self._peername, exc)
        self.reply_error(None, ErrorCode.FRAME_TOO_LARGE, str(exc))
        self.close(exc)

    def _dispatch(self, payload: bytes) -> None:
        try:
            msg = self._decode(payload)
        except Exception as exc:  # DecodeError, ValidationError, UnicodeDecodeError, …:
            self._bad_frame(payload, describe_decode_error(exc))  # the peer's doing
            return
        if _reencode(msg) != payload and has_duplicate_keys(payload):
            self._bad_frame(payload, "a map repeats a key; send each field once")
            return
        re = getattr(msg, "re", None)
        if re is not None:
            fut = self._pending.get(re)
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)
                return
            if self._callbacks:
                on_reply = self._callbacks.pop(re, None)
                if on_reply is not None:
                    _call_back(on_reply, RequestFailed(msg.code, msg.message, msg.tx_id)
                               if isinstance(msg, Error) else msg)
                    return
            if not isinstance(msg, Error) and not self.deliver_unmatched:
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


def accept_hello(ch: Channel, msg: Message, roles: tuple[str, ...], speaker: str) -> Hello | None:
    """Every server's first-frame rule: a `hello` from one of `roles` in this protocol
    version. Returns it; otherwise answers what is wrong — `hello_required` (not a hello),
    `bad_request` (another role), `unsupported_version` — closes the connection and
    returns None. `speaker` names the server in the messages ("this ledger")."""
    rid = getattr(msg, "id", None)
    if not isinstance(msg, Hello):
        ch.reply_error(rid, ErrorCode.HELLO_REQUIRED, "the first frame must be hello")
    elif msg.role not in roles:
        ch.reply_error(rid, ErrorCode.BAD_REQUEST,
                       f"{speaker} takes hello with role {' or '.join(roles)} only")
    elif msg.version != PROTOCOL_VERSION:
        ch.reply_error(rid, ErrorCode.UNSUPPORTED_VERSION,
                       f"{speaker} speaks protocol version {PROTOCOL_VERSION}")
    else:
        return msg
    ch.close()
    return None


def _call_back(on_reply: OnReply, result: Message | BaseException) -> None:
    try:
        on_reply(result)
    except Exception:
        log.exception("reply callback failed")


async def open_channel(
    host: str,
    port: int,
    decoder: msgspec.msgpack.Decoder[Any],
    *,
    name: str,
    tls: ClientTls | None,
    connect_timeout: float = 5.0,
    on_message: OnMessage | None = None,
    on_close: OnClose | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    local_addr: tuple[str, int] | None = None,
) -> Channel:
    """Connect over TCP (with `tls`: a TLS 1.3 session pinned to the network CA; None
    only for the plain benchmark) and start a Channel. Raises OSError/TimeoutError if
    unreachable, TlsFailed if the server's certificate or the handshake is refused."""
    ch = Channel(None, None, decoder, name=name, on_message=on_message,
                 on_close=on_close, max_frame_bytes=max_frame_bytes)
    ch._client_tls = tls
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: ch, host, port, local_addr=local_addr)
            if ch._tls_ready is not None:
                await ch._tls_ready
    except BaseException:
        ch.close()
        raise
    ch.start()
    return ch


async def open_unix_channel(
    path: str,
    decoder: msgspec.msgpack.Decoder[Any],
    *,
    name: str,
    connect_timeout: float = 5.0,
    on_message: OnMessage | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Channel:
    """Connect to a local Unix socket (the payer daemon's control socket, the router's
    admin socket: owner-only files, so no TLS)."""
    ch = Channel(None, None, decoder, name=name, on_message=on_message,
                 max_frame_bytes=max_frame_bytes)
    async with asyncio.timeout(connect_timeout):
        await asyncio.get_running_loop().create_unix_connection(lambda: ch, path)
    ch.start()
    return ch


class _ServerSide:
    """What a TCP server's connections share: its TLS context, its handshake deadline,
    and its limits (common.limits.ServerLimits): new connections per address per second,
    open connections in total and per address, and a pool of connections still in their
    handshake. When the pool or a cap is full, a connection still in its handshake is
    dropped to make room — the oldest of those that have not finished TLS first (a bare
    socket costs its sender nothing), then the oldest of those that have (the sender
    paid for a TLS handshake); for the per-address cap, one from the same address. A
    connection whose client certificate the TLS handshake verified leaves the pool at
    once (the ledger knows who it is). So idle or slow sockets cannot lock anyone out,
    and a flood of new ones has to pay for TLS to push out a client that has.
    Refusals, drops and a peer's failures are logged at most once a second per kind."""

    def __init__(self, name: str, tls: ssl.SSLContext | None, handshake_timeout_s: float | None,
                 limits: ServerLimits | None) -> None:
        self.name = name
        self.tls = tls
        self.handshake_timeout_s = handshake_timeout_s
        big = 2**62
        self.limits = limits or ServerLimits(big, big, big, float(big))
        self.caps = ConnectionCaps(self.limits.max_connections,
                                   self.limits.max_connections_per_address)
        rate = self.limits.new_connections_per_address_per_s
        self.arrivals = RateByKey(rate, 5 * rate)
        # The handshake pool, oldest first: before and after TLS.
        self.before_tls: OrderedDict[Channel, None] = OrderedDict()
        self.after_tls: OrderedDict[Channel, None] = OrderedDict()
        self.events = ThrottledEvents(log)

    def admit(self, ch: Channel) -> str | None:
        """Count `ch` in (dropping a connection still in its handshake to make room when
        needed); returns None, or why it is refused."""
        key = ch.address_key
        if not self.arrivals.take(key, _monotonic()):
            return (f"more than {self.limits.new_connections_per_address_per_s:g} new "
                    f"connections a second from {key}")
        full = self.caps.full(key)
        if full is not None:
            victim = self._victim(None if full == "total" else key)
            if victim is None:
                return self.caps.describe(full, key)
            self._drop(victim)
        refused = self.caps.admit(key)
        if refused is not None:
            return refused
        if len(self.before_tls) + len(self.after_tls) >= self.limits.max_handshaking:
            victim = self._victim(None)
            if victim is not None:
                self._drop(victim)
        self.before_tls[ch] = None
        return None

    def tls_done(self, ch: Channel, verified_client: bool) -> None:
        """`ch` finished TLS: it moves to the second tier of the pool, or leaves the pool
        when its certificate was verified."""
        was_waiting = ch in self.before_tls
        self.before_tls.pop(ch, None)
        if was_waiting and not verified_client:
            self.after_tls[ch] = None

    def leave(self, ch: Channel) -> None:
        self.before_tls.pop(ch, None)
        self.after_tls.pop(ch, None)

    def _victim(self, key: str | None) -> Channel | None:
        for pool in (self.before_tls, self.after_tls):
            for c in pool:
                if key is None or c.address_key == key:
                    return c
        return None

    def _drop(self, ch: Channel) -> None:
        self.events.event("dropped", "dropped a connection still in its handshake to make room",
                          name=self.name, peer=ch.peername)
        ch.close(ConnectionLost("dropped: too many connections still in their handshake"))


async def start_channel_server(
    accept: OnAccept,
    decoder: msgspec.msgpack.Decoder[Any],
    host: str | None = None,
    port: int = 0,
    *,
    path: str | None = None,
    name: str = "peer",
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    tls: ssl.SSLContext | None = None,
    handshake_timeout_s: float | None = None,
    limits: ServerLimits | None = None,
) -> asyncio.Server:
    """Listen on TCP `host:port` (or the Unix socket `path`, created mode 0600: only its
    owner may connect; see `claim_unix_path`); each connection is a Channel handed to
    `accept` once it is usable. `accept` sets `on_message`/`on_close` and calls `start()`
    (bytes that arrive before are kept).

    TCP servers: `limits` refuses connections over them at once (no TLS work spent);
    with `tls` the TLS handshake runs first and `accept` sees the connection after it;
    with `handshake_timeout_s` a connection is closed unless its owner calls
    `handshake_complete()` within that time of the accept."""
    loop = asyncio.get_running_loop()
    side = _ServerSide(name, tls, handshake_timeout_s, limits) if path is None else None

    def factory() -> Channel:
        ch = Channel(None, None, decoder, name=name, max_frame_bytes=max_frame_bytes,
                     max_buffered_bytes=max_buffered_bytes)
        ch._accept = accept
        ch._server = side
        return ch

    if path is not None:
        old_umask = os.umask(0o177)  # no moment when the socket file is open to others
        try:
            server = await loop.create_unix_server(factory, path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return server
    return await loop.create_server(factory, host, port)


async def claim_unix_path(path: Path, what: str) -> None:
    """Make `path` free for a new Unix socket. A socket file nobody answers on (left by a
    killed process) is removed. Raises ConfigError if `path` is something else, or if a
    live process serves it (`what` names who that would be: "another payer daemon for
    alice")."""
    try:
        mode = os.lstat(path).st_mode  # a local stat: not worth a thread
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another path")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (OSError, TimeoutError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("replaced stale socket %s", path)
        return
    writer.close()
    raise ConfigError(f"{what} already serves {path}; stop it first")


def loop_factory(fast: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when installed (optional `speed` extra) and wanted, else None."""
    if not fast:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def watch(task: asyncio.Task[Any], what: str, on_death: Callable[[str], None]) -> None:
    """`task` must live as long as its service and catches what it expects: if it ends
    by any other exception (a bug, or a failure nobody foresaw), say so at CRITICAL and
    call `on_death(reason)`, so the service stops loudly (and its supervisor restarts
    it) instead of running on without it, looking healthy."""

    def ended(t: asyncio.Task[Any]) -> None:
        if t.cancelled() or t.exception() is None:
            return
        exc = t.exception()
        logging.getLogger("jackpay").critical("%s ended by an exception it did not expect",
                                              what, exc_info=exc)
        on_death(f"{what} ended: {exc!r}")

    task.add_done_callback(ended)


def run(main: Callable[[], Coroutine[Any, Any, int]], *, fast: bool = True) -> int:
    """Run an async `main` on the best available loop and return its exit code."""
    with asyncio.Runner(loop_factory=loop_factory(fast)) as runner:
        return runner.run(main())
