"""The router's ledger client (the seed's `ledgerData`): address, connection, appends.

Rules:
- one connection: TLS 1.3 with the router's client certificate (mutual TLS: the ledger
  accepts appends from that identity alone), then `hello(role="router")`; re-opened
  after any loss with capped exponential backoff (`retry_max_s`); connects, losses and
  retries are logged;
- `append(row)` is synchronous and returns a future. Rows queued in the same event-loop
  turn go out as one `append` frame (split only to stay under the frame limit); many
  appends may be in flight at once;
- the in-doubt rule (DESIGN §2): once an append has been handed to a live connection,
  its outcome is unknown until the ledger answers. A timeout or a lost connection never
  fails it: the same rows are sent again (the ledger is idempotent by tx_id; a duplicate
  answers with the existing row) until an answer comes. Only two definite failures
  exist: `LedgerUnavailable` when there was no connection when the rows were to be sent
  (they never reached the ledger), and `LedgerRefused` when the ledger answered an error
  (e.g. `ledger_write_failed`: its file is unchanged);
- `read` is a plain request: any failure raises LedgerUnavailable (reads change nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from common import PROTOCOL_VERSION
from common.aio import Channel, open_channel, watch
from common.errors import (
    ConnectionLost,
    ErrorCode,
    FrameTooLarge,
    JackPayError,
    ProtocolError,
    RequestFailed,
)
from common.framing import DEFAULT_MAX_FRAME_BYTES
from common.logs import log_event
from common.messages import (
    APPEND_RESULT_BYTES,
    LEDGER_REPLIES,
    MAX_APPEND_ROWS,
    Append,
    Appended,
    AppendResult,
    Balances,
    BalancesReply,
    Found,
    Hello,
    LedgerRow,
    Lookup,
    Message,
    Ping,
    Pong,
    Read,
    RowIn,
    Rows,
    TxKey,
    Welcome,
    decoder_for,
)
from common.tls import ClientTls

log = logging.getLogger("jackpay.router.ledger")
Q = TypeVar("Q", bound=Message)

_DECODER = decoder_for(LEDGER_REPLIES)
MAX_ROWS_PER_APPEND = MAX_APPEND_ROWS
# Upper bound of one encoded AppendResult in the ledger's reply (it refuses bigger batches).
REPLY_BYTES_PER_ROW = APPEND_RESULT_BYTES
FIRST_RETRY_S = 0.05


# Where an append's answer goes: a future (`append`), or a plain callback
# (`append_cb`), called once with the AppendResult or the exception.
AppendDone = Callable[[AppendResult | BaseException], None]
Sink = asyncio.Future[AppendResult] | AppendDone
Queued = tuple[RowIn, Sink]


class LedgerUnavailable(JackPayError):
    """The request never reached the ledger (no connection), or a read failed."""


class LedgerRefused(JackPayError):
    """The ledger answered an append with an error; nothing was written."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class LedgerStats:
    connects: int = 0
    appends_sent: int = 0
    rows_sent: int = 0
    resends: int = 0
    in_doubt_now: int = 0


class LedgerClient:
    """The seed's `ledgerData`: one reconnecting session with the ledger."""

    def __init__(self, host: str, port: int, *, tls: ClientTls | None, timeout_s: float = 2.0,
                 retry_max_s: float = 2.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.timeout_s = timeout_s
        self.retry_max_s = retry_max_s
        self.max_frame_bytes = max_frame_bytes
        self._channel: Channel | None = None
        self._up = asyncio.Event()
        self._queue: list[Queued] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintainer: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = LedgerStats()
        # Runs just before rows leave (plug-ins make their state durable first); a raise
        # fails those rows, unsent (LedgerRefused "plugin_failed").
        self.before_send: Callable[[], None] | None = None
        # False: first attempts take the task path too, as before 76d3d51 (the router's
        # hidden --append-task-path-benchmark-only: the benchmark's `loop turns` only).
        self.direct_first = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- connection ------------------------------------------------------------------

    def start(self, on_death: Callable[[str], None] | None = None) -> None:
        """Begin connecting (and reconnecting) in the background. `on_death`: called if
        that loop ever ends by an exception (common.aio.watch): the router cannot work
        without it."""
        if self._maintainer is None:
            self._maintainer = asyncio.get_running_loop().create_task(
                self._maintain(), name="ledger-connection")
            if on_death is not None:
                watch(self._maintainer, "the ledger connection loop", on_death)

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected; False if `timeout` seconds pass first."""
        if self.connected:
            return True
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await self._up.wait()
                    if not self.connected:  # lost again before we ran
                        self._up.clear()
        except TimeoutError:
            return False
        return True

    async def _maintain(self) -> None:
        delay = FIRST_RETRY_S
        failures = 0
        while not self._closing:
            try:
                ch = await self._connect()
            except (OSError, TimeoutError, ConnectionLost, RequestFailed, ProtocolError) as exc:
                # ProtocolError: what answered is not our ledger (TlsFailed: no TLS, or a
                # certificate not of this network; or no `welcome`): keep trying.
                failures += 1
                if failures == 1 or failures & (failures - 1) == 0:  # 1, 2, 4, 8, ...
                    log_event(log, "ledger not reachable; retrying", logging.WARNING,
                              ledger=self.address, attempt=failures, retry_in_s=round(delay, 2),
                              error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            failures, delay = 0, FIRST_RETRY_S
            self._channel = ch
            self.stats.connects += 1
            self._up.set()
            log_event(log, "ledger connected", ledger=self.address)
            await ch.wait_closed()
            self._up.clear()
            if not self._closing:
                log_event(log, "ledger connection lost; reconnecting", logging.WARNING,
                          ledger=self.address)

    async def _connect(self) -> Channel:
        ch = await open_channel(self.host, self.port, _DECODER, name="ledger", tls=self.tls,
                                connect_timeout=self.timeout_s,
                                max_frame_bytes=self.max_frame_bytes)
        try:
            reply = await ch.request(
                Hello(id=0, version=PROTOCOL_VERSION, role="router", peer="router"),
                timeout=self.timeout_s)
        except BaseException:
            ch.close()
            raise
        if not isinstance(reply, Welcome):
            ch.close()
            raise ProtocolError(f"ledger answered hello with {type(reply).__name__}")
        return ch

    async def aclose(self) -> None:
        """Stop reconnecting and close. In-doubt appends stay unresolved (the ledger and
        a replay at the next start tell their outcome)."""
        self._closing = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        for task in list(self._tasks):
            task.cancel()
        if self._channel is not None:
            await self._channel.aclose()

    # --- link test and reads -----------------------------------------------------

    async def ping_ledger(self, timeout: float | None = None) -> bool:
        """The seed's pingLedger: does the ledger answer a ping in time?"""
        ch = self._channel
        if ch is None or ch.closed:
            return False
        try:
            reply = await ch.request(Ping(id=0), timeout=timeout or self.timeout_s)
        except (ConnectionLost, TimeoutError, RequestFailed):
            return False
        return isinstance(reply, Pong)

    async def read(self, from_seq: int, limit: int, party: str | None = None) -> Rows:
        """One page of rows. Raises LedgerUnavailable if the ledger does not answer."""
        return await self._query(Read(id=0, from_seq=from_seq, limit=limit, party=party), Rows)

    async def lookup(self, keys: list[tuple[str, str]]) -> list[LedgerRow]:
        """The rows the ledger has of these (sender, tx_id) payments (at most
        MAX_APPEND_ROWS keys). Raises LedgerUnavailable."""
        return (await self.find(keys)).rows

    async def find(self, keys: list[tuple[str, str]]) -> Found:
        """`lookup`, with the ledger's latest seal (a receipt of each row it covers)."""
        return await self._query(Lookup(id=0, keys=[TxKey(s, t) for s, t in keys]), Found)

    async def balances(self, after: str = "", limit: int = 1000) -> BalancesReply:
        """One page of the ledger's balances. Raises LedgerUnavailable."""
        return await self._query(Balances(id=0, after=after, limit=limit), BalancesReply)

    async def _query(self, request: Message, expect: type[Q]) -> Q:
        ch = self._channel
        if ch is None or ch.closed:
            raise LedgerUnavailable(f"no connection to the ledger at {self.address}")
        what = type(request).__name__.lower()
        try:
            reply = await ch.request(request, timeout=self.timeout_s)
        except (ConnectionLost, TimeoutError, RequestFailed) as exc:
            raise LedgerUnavailable(f"ledger at {self.address} did not answer a {what}: "
                                    f"{exc or type(exc).__name__}") from exc
        if not isinstance(reply, expect):
            raise LedgerUnavailable(f"ledger answered {what} with {type(reply).__name__}")
        return reply

    # --- appends -----------------------------------------------------------------

    def append(self, row: RowIn) -> asyncio.Future[AppendResult]:
        """Queue `row`; it goes out with every row queued in this loop turn.

        The future gets the ledger's AppendResult, or fails with LedgerUnavailable (never
        sent) or LedgerRefused (the ledger answered an error). It never fails for a lost
        answer: that append is re-sent until the ledger answers.
        """
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._enqueue(row, fut)
        return fut

    def append_cb(self, row: RowIn, done: AppendDone) -> None:
        """`append` with a plain callback instead of a future (the payment path: a
        future's callbacks run one loop turn later). `done` is called exactly once, with
        the AppendResult or the exception `append`'s future would carry."""
        self._enqueue(row, done)

    def _enqueue(self, row: RowIn, sink: Sink) -> None:
        self._queue.append((row, sink))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def append_atomic(self, rows: list[RowIn]) -> list[asyncio.Future[AppendResult]]:
        """Queue one payment's legs: they go out in an `append` of their own, flagged
        atomic (the ledger writes all or none). One future per row, resolved together;
        failures and re-sends as for `append`."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[AppendResult]] = [loop.create_future() for _ in rows]
        batch: list[Queued] = list(zip(rows, futs, strict=True))
        if not self.connected:
            _fail(batch, LedgerUnavailable(f"no connection to the ledger at {self.address}"))
            return futs
        if not self._barrier(batch):
            return futs
        self._send_first(batch, atomic=True)
        return futs

    def _flush(self) -> None:
        """The turn's rows: the first attempt of each batch goes out now, directly (a
        frame and a reply callback: no task, no future); re-sends take the task path."""
        self._flush_scheduled = False
        queued, self._queue = self._queue, []
        if not self.connected:
            _fail(queued, LedgerUnavailable(f"no connection to the ledger at {self.address}"))
            return
        if not self._barrier(queued):
            return
        for batch in self._split(queued):
            if self.direct_first:
                self._send_first(batch)
            else:
                self._start_task(batch, False, None)

    def _send_first(self, batch: list[Queued], atomic: bool = False) -> None:
        ch = self._channel
        if ch is None or ch.closed:
            _fail(batch, LedgerUnavailable(f"no connection to the ledger at {self.address}"))
            return
        rows = [row for row, _ in batch]
        rid = ch.next_id()
        try:
            ch.send_nowait(Append(id=rid, rows=rows, atomic=atomic))
        except ConnectionLost:
            _fail(batch, LedgerUnavailable(f"no connection to the ledger at {self.address}"))
            return
        except FrameTooLarge as exc:  # nothing was sent
            self._too_large(batch, exc)
            return
        self.stats.appends_sent += 1
        self.stats.rows_sent += len(rows)
        ch.expect_reply(rid, self.timeout_s,
                        lambda reply: self._first_answer(batch, atomic, reply))
        ch.flush_now()

    def _too_large(self, batch: list[Queued], exc: FrameTooLarge) -> None:
        """An append the ledger's frame limit cannot hold (nothing was sent). `_split`
        bounds every batch by `_row_bytes` (an upper bound) with room to spare, so only a
        row bigger than a frame on its own (a tiny `max_frame_bytes`) gets here — alone in
        its batch, or with its payment's other legs: refused, so its payment ends with a
        reason instead of waiting for ever."""
        log_event(log, "append does not fit the ledger's frame limit; refused",
                  logging.ERROR, rows=len(batch), first_tx_id=batch[0][0].tx_id,
                  error=str(exc))
        _fail(batch, LedgerRefused(ErrorCode.INTERNAL_ERROR,
                                   f"the row does not fit the ledger's frames ({exc}; "
                                   "[ledger] max_frame_bytes)"))

    def _first_answer(self, batch: list[Queued], atomic: bool,
                      reply: Message | BaseException) -> None:
        if type(reply) is Appended and len(reply.results) == len(batch):  # the common case
            for (_, sink), result in zip(batch, reply.results, strict=True):
                _deliver(sink, result)
            return
        if isinstance(reply, RequestFailed):  # answered: nothing was written
            _fail(batch, LedgerRefused(str(reply.code), reply.message))
            return
        if self._closing:  # closed under it: the outcome stays unknown (a replay tells)
            _cancel(batch)
            return
        if not isinstance(reply, ConnectionLost | TimeoutError):
            # Not an answer we can match to our rows: treat as lost and re-send.
            log_event(log, "ledger answered append oddly; re-sending", logging.ERROR,
                      reply=type(reply).__name__)
            ch = self._channel
            if ch is not None:
                ch.close()
        # In doubt: the task path re-sends the same rows until the ledger answers.
        self._start_task(batch, atomic, reply)

    def _start_task(self, batch: list[Queued], atomic: bool,
                    sent_once: BaseException | Message | None) -> None:
        task = asyncio.get_running_loop().create_task(
            self._send_batch(batch, atomic=atomic, sent_once=sent_once), name="ledger-append")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _barrier(self, batch: list[Queued]) -> bool:
        """`before_send`; False (the rows failed, unsent) if it raised."""
        if self.before_send is None:
            return True
        try:
            self.before_send()
        except Exception as exc:
            log.exception("a plug-in could not make its state durable; rows not sent")
            _fail(batch, LedgerRefused("plugin_failed", f"not sent: {exc}"))
            return False
        return True

    def _split(self, queued: list[Queued]) -> list[list[Queued]]:
        budget = self.max_frame_bytes - 512
        max_rows = min(MAX_ROWS_PER_APPEND, budget // REPLY_BYTES_PER_ROW)
        batches: list[list[Queued]] = []
        current: list[Queued] = []
        size = 0
        for item in queued:
            cost = _row_bytes(item[0])
            if current and (size + cost > budget or len(current) >= max_rows):
                batches.append(current)
                current, size = [], 0
            current.append(item)
            size += cost
        if current:
            batches.append(current)
        return batches

    async def _send_batch(self, batch: list[Queued], atomic: bool = False,
                          sent_once: BaseException | Message | None = None) -> None:
        """Re-send `batch` until the ledger answers. `sent_once`: how the first attempt
        (sent directly by `_send_first`) was lost — the rows are in doubt from the start."""
        rows = [row for row, _ in batch]
        attempt = 1 if sent_once is not None else 0
        in_doubt = sent_once is not None
        timeout = self.timeout_s
        if in_doubt:
            self.stats.in_doubt_now += len(rows)
            self.stats.resends += 1
            log_event(log, "append in doubt; sending it again", logging.WARNING,
                      ledger=self.address, rows=len(rows), attempt=attempt,
                      first_tx_id=rows[0].tx_id,
                      error=str(sent_once) or type(sent_once).__name__)
            if isinstance(sent_once, TimeoutError):
                timeout = min(timeout * 2, self.timeout_s * 8)
        try:
            while True:
                ch = self._channel
                if ch is None or ch.closed:
                    if attempt == 0:
                        _fail(batch, LedgerUnavailable(
                            f"no connection to the ledger at {self.address}"))
                        return
                    await self.wait_connected()
                    continue
                attempt += 1
                self.stats.appends_sent += 1
                self.stats.rows_sent += len(rows)
                try:
                    reply = await ch.request(Append(id=0, rows=rows, atomic=atomic),
                                             timeout=timeout)
                except FrameTooLarge as exc:  # nothing was sent
                    if not in_doubt:
                        self._too_large(batch, exc)
                        return
                    # Rows that went out before within the limit cannot be over it now;
                    # should it happen, their outcome stays unknown, as on close.
                    log_event(log, "re-send does not fit the ledger's frame limit; the "
                              "outcome stays unknown", logging.ERROR, rows=len(rows),
                              first_tx_id=rows[0].tx_id, error=str(exc))
                    _cancel(batch)
                    return
                except RequestFailed as exc:
                    if in_doubt and exc.code != ErrorCode.LEDGER_WRITE_FAILED:
                        # An earlier copy may still be written (a stopping ledger refuses
                        # new appends but writes those it queued): still in doubt, ask
                        # again. `ledger_write_failed` stays final: the ledger fails every
                        # request answered from a rolled-back batch, copies included.
                        self.stats.resends += 1
                        log_event(log, "append in doubt; ledger refused the re-send",
                                  logging.WARNING, ledger=self.address, code=str(exc.code),
                                  first_tx_id=rows[0].tx_id)
                        await asyncio.sleep(self.timeout_s)
                        continue
                    _fail(batch, LedgerRefused(str(exc.code), exc.message))
                    return
                except (ConnectionLost, TimeoutError) as exc:
                    if not in_doubt:
                        in_doubt = True
                        self.stats.in_doubt_now += len(rows)
                    self.stats.resends += 1
                    if attempt & (attempt - 1) == 0:  # log attempts 1, 2, 4, 8, ...
                        log_event(log, "append in doubt; sending it again", logging.WARNING,
                                  ledger=self.address, rows=len(rows), attempt=attempt,
                                  first_tx_id=rows[0].tx_id,
                                  error=str(exc) or type(exc).__name__)
                    if isinstance(exc, ConnectionLost):
                        await self.wait_connected()
                    else:
                        # A frozen ledger answers the request still pending when it wakes,
                        # so waiting longer each time costs nothing and spares its queue.
                        timeout = min(timeout * 2, self.timeout_s * 8)
                    continue
                if not isinstance(reply, Appended) or len(reply.results) != len(rows):
                    # Not an answer we can match to our rows: treat as lost and re-send.
                    log_event(log, "ledger answered append oddly; re-sending", logging.ERROR,
                              reply=type(reply).__name__)
                    ch.close()
                    continue
                for (_, sink), result in zip(batch, reply.results, strict=True):
                    _deliver(sink, result)
                return
        except asyncio.CancelledError:  # `aclose`: the outcome stays unknown
            _cancel(batch)
            raise
        finally:
            if in_doubt:
                self.stats.in_doubt_now -= len(rows)


def _row_bytes(row: RowIn) -> int:
    """An upper bound of `row`'s size inside an `append` frame, without encoding it:
    field names and headers fit in 48 bytes, an int in 9; ids are ASCII (their
    patterns), a memo at most 4 bytes per character; a signature its bytes, its field's
    name (at most 13) and a 3-byte header."""
    memo = row.memo
    size = (57 + len(row.tx_id) + len(row.sender) + len(row.receiver)
            + (len(memo) if memo.isascii() else 4 * len(memo)))
    for sig in (row.sender_sig, row.receiver_sig):
        if sig is not None:
            size += 16 + len(sig)
    return size


def _deliver(sink: Sink, result: AppendResult | BaseException) -> None:
    """Give an append's answer to its future or callback (once; a callback that raises
    is logged, never let loose in the ledger client)."""
    if isinstance(sink, asyncio.Future):
        if not sink.done():
            if isinstance(result, BaseException):
                sink.set_exception(result)
            else:
                sink.set_result(result)
        return
    try:
        sink(result)
    except Exception:
        log.exception("an append's callback failed")


def _cancel(batch: list[Queued]) -> None:
    """The client closed with these rows in doubt: futures are cancelled, callbacks get
    a CancelledError (the payment is abandoned; a replay tells its fate)."""
    for _, sink in batch:
        if isinstance(sink, asyncio.Future):
            sink.cancel()
        else:
            _deliver(sink, asyncio.CancelledError())


def _fail(batch: list[Queued], exc: Exception) -> None:
    for _, sink in batch:
        _deliver(sink, exc)


def durable_row(row: RowIn, result: AppendResult) -> LedgerRow:
    """The ledger row an append result stands for (`written` or `duplicate`: the same
    content as `row`, with the seq, dtg and hash the ledger assigned)."""
    return LedgerRow(seq=result.seq, dtg=result.dtg, sender=row.sender, receiver=row.receiver,
                     amount=row.amount, tx_id=row.tx_id, memo=row.memo, hash=result.hash)


def refusal_code(exc: LedgerRefused) -> ErrorCode:
    """The payment's failure code for a ledger refusal."""
    if exc.code == ErrorCode.LEDGER_WRITE_FAILED:
        return ErrorCode.LEDGER_WRITE_FAILED
    if exc.code == ErrorCode.SHUTTING_DOWN:
        return ErrorCode.LEDGER_UNAVAILABLE
    if exc.code == ErrorCode.PLUGIN_FAILED:  # never sent: a plug-in's barrier failed
        return ErrorCode.PLUGIN_FAILED
    return ErrorCode.INTERNAL_ERROR
