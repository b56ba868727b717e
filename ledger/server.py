"""The ledger's asyncio shell: sessions, group commit, graceful stop.

Group commit: `append` requests are queued; one writer task takes everything queued (up
to `max_batch_rows` rows), resolves it against the index, writes it with one write() and
one fsync(), then commits and answers every request of the batch. The write and fsync run
on the event loop itself (as Redis does with `appendfsync always`): handing each batch to
a worker thread and back cost more CPU than the fsync at moderate load (~40 µs per
payment at 5 rows per fsync). While the disk syncs, new appends wait in the socket
buffers and all go into the next batch, so under load many rows share one fsync; pings
and reads wait for the current fsync (well under a millisecond on a healthy disk). A
request's rows are never split between batches. Batches are strictly sequential (the
chain needs the previous hash).

Who may do what (SECURITY.md): every TCP connection is TLS 1.3 with a client certificate
from the network CA (mutual TLS). The certificate's name is the identity: `router` may
append and read; the names in `[ledger] auditors` may read (`read`, `stats`, `ping`);
anyone else is refused at `hello` with `auth_failed`. An append from a reader is
`forbidden`. A connection must finish TLS and `hello` within `handshake_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.core import Metric

from common import PROTOCOL_VERSION
from common.aio import Channel, accept_hello, start_channel_server
from common.errors import ConnectionLost, ErrorCode, FrameTooLarge
from common.framing import HEADER_SIZE
from common.keys import ROUTER_IDENTITY
from common.limits import ServerLimits
from common.logs import log_event
from common.messages import (
    APPEND_RESULT_BYTES,
    DTG_FORMAT,
    LEDGER_REQUESTS,
    Append,
    Appended,
    AppendResult,
    Balances,
    BalancesReply,
    Found,
    Hello,
    Lookup,
    Message,
    Ping,
    Pong,
    Read,
    Rows,
    Seal,
    Stats,
    StatsReply,
    Welcome,
    decoder_for,
    encode,
)
from common.metrics import BUCKETS_ROWS, Histogram, counter, gauge
from common.signing import Signer, head_bytes
from ledger.storage import SLOW_FSYNC_US, Fenced, LedgerStorage

log = logging.getLogger("jackpay.ledger")

# Who may say hello: the router, operators and tools (admin), and plain clients (tests,
# the bench's probes).
LEDGER_ROLES = ("router", "admin", "client")

_DECODER = decoder_for(LEDGER_REQUESTS)


def utc_now_dtg() -> str:
    return datetime.now(UTC).strftime(DTG_FORMAT)


@dataclass(frozen=True, slots=True)
class LedgerAccess:
    """The ledger's side of the security scheme. `tls` None: plain TCP, everyone may do
    everything — only for the benchmark's comparison run, never a supported network."""

    tls: ssl.SSLContext | None
    auditors: frozenset[str] = frozenset({"auditor"})
    handshake_timeout_s: float = 10.0
    limits: ServerLimits | None = None
    # Seals the chain head after every batch (`seal` in each append result), so payers
    # keep receipts that show a removed or rewritten row later. None: no seals (plain).
    sealer: Ed25519PrivateKey | None = None
    network_id: str = ""


@dataclass(slots=True)
class _Queued:
    channel: Channel
    request: Append


class LedgerServer:
    def __init__(self, store: LedgerStorage, access: LedgerAccess, *, host: str = "127.0.0.1",
                 port: int = 0, max_frame_bytes: int = 64 * 1024,
                 max_batch_rows: int = 4096, stop_grace_s: float = 30.0) -> None:
        self.store = store
        self.access = access
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.max_batch_rows = max_batch_rows
        self.stop_grace_s = stop_grace_s
        self._server: asyncio.Server | None = None
        self._channels: set[Channel] = set()
        self._greeted: dict[Channel, bool] = {}  # greeted connection -> may append
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # the batch being written
        self._stopping = False
        self.fenced: str | None = None  # why this service may no longer write
        self.on_fenced: asyncio.Event = asyncio.Event()
        store.on_fenced = self._stop_writing  # a store can learn it while idle
        self._reads: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self.appends = 0
        self._slow_logged_at = -1.0e9  # `slow fsync` lines: at most one a second
        self._slow_unlogged = 0
        self._sealer = Signer(access.sealer) if access.sealer is not None else None
        self._last_seal: Seal | None = None  # of a durable head: what `found` carries
        # For the metrics (common/metrics.py): observed per batch, read at scrape time.
        self.fsync_seconds = Histogram()
        self.batch_rows = Histogram(BUCKETS_ROWS)
        self.write_failures = 0

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        access = self.access
        self._last_seal = self._seal()  # the head the store opened at is durable
        self._server = await start_channel_server(
            self._on_connect, _DECODER, self.host, self.port, name="client",
            max_frame_bytes=self.max_frame_bytes, tls=access.tls,
            handshake_timeout_s=access.handshake_timeout_s, limits=access.limits)
        self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")
        self._writer.add_done_callback(self._writer_ended)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        return self.host, self.port

    async def stop(self) -> None:
        """Stop accepting, write everything already queued, close connections. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        self._wake.set()
        if self._writer is not None:
            # A batch whose commit waits for an absent synchronous standby may never
            # finish: after the grace period it is cancelled and stays in doubt (nothing
            # was acknowledged; the router asks again, the next service settles it).
            done, _ = await asyncio.wait({self._writer}, timeout=self.stop_grace_s)
            if not done:
                log_event(log, "stopping with a batch still committing; it stays in doubt",
                          logging.WARNING, grace_s=self.stop_grace_s)
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
        for task in list(self._reads):
            task.cancel()
        for ch in list(self._channels):
            ch.close()
        await self.store.aclose()

    def statistics(self) -> dict[str, int | str | bool]:
        st = self.store.statistics()
        return {"rows": st.rows, "fsyncs": st.fsyncs,
                "batches": st.batches, "appends": self.appends,
                "uptime_ms": int((time.monotonic() - self._started) * 1000),
                "last_hash": self.store.last_hash,
                "fsync_us_total": st.fsync_us_total,
                "fsync_us_max": st.fsync_us_max, "slow_fsyncs": st.slow_fsyncs,
                "index_ok": st.index_ok, "rows_in_memory": st.rows_in_memory}

    def metrics(self) -> Iterator[Metric]:
        """The ledger's Prometheus metrics (read at scrape time, from the HTTP thread)."""
        st = self.statistics()
        yield gauge("jackpay_ledger_rows", "Rows in the ledger", int(st["rows"]))
        yield counter("jackpay_ledger_appends", "Append requests since start",
                      int(st["appends"]))
        yield counter("jackpay_ledger_batches", "Batches written (one fsync each)",
                      int(st["batches"]))
        yield counter("jackpay_ledger_slow_fsyncs", "fsyncs of 10 ms or more",
                      int(st["slow_fsyncs"]))
        yield counter("jackpay_ledger_write_failures", "Batches that could not be made "
                      "durable (file restored)", self.write_failures)
        yield gauge("jackpay_ledger_connections", "Open connections", len(self._channels))
        yield gauge("jackpay_ledger_index_ok", "1 while the CSV store's index is written "
                    "(0: rows stay in memory until a restart rebuilds it)",
                    1.0 if st["index_ok"] else 0.0)
        yield gauge("jackpay_ledger_rows_in_memory", "Rows held in memory beyond the index",
                    int(st["rows_in_memory"]))
        yield self.fsync_seconds.family("jackpay_ledger_fsync_seconds", "fsync of a batch")
        yield self.batch_rows.family("jackpay_ledger_batch_rows", "Rows per batch")

    # --- connections ---------------------------------------------------------------

    def _on_connect(self, ch: Channel) -> None:
        ch.on_message = self._on_message
        ch.on_close = self._on_close
        self._channels.add(ch)
        log_event(log, "connection opened", peer=ch.peername, identity=ch.peer_identity)
        ch.start()

    def _on_close(self, ch: Channel) -> None:
        self._channels.discard(ch)
        self._greeted.pop(ch, None)
        log_event(log, "connection closed", peer=ch.peername, name=ch.name)

    def _grant(self, ch: Channel, hello: Hello) -> bool | None:
        """What the connection may do: True append and read, False read only, None
        nothing (refused: `auth_failed`, reason logged, connection closed)."""
        identity = ch.peer_identity
        if self.access.tls is None:
            return True  # the plain benchmark: no identities to check
        if identity == ROUTER_IDENTITY:
            return hello.role == "router"
        if identity in self.access.auditors:
            if hello.role == "router":
                reason = f"{identity} said hello as the router"
            else:
                return False
        else:
            reason = f"certificate {identity!r} is neither the router nor an auditor"
        log_event(log, "hello refused", logging.WARNING, peer=ch.peername, identity=identity,
                  role=hello.role, reason=reason)
        ch.reply_error(hello.id, ErrorCode.AUTH_FAILED, "authentication failed")
        ch.close()
        return None

    def _on_message(self, ch: Channel, msg: Message) -> None:
        if ch not in self._greeted:
            hello = accept_hello(ch, msg, LEDGER_ROLES, "this ledger")
            if hello is None:
                return
            may_append = self._grant(ch, hello)
            if may_append is None:
                return
            self._greeted[ch] = may_append
            ch.handshake_complete()
            ch.name = f"{hello.role}:{hello.peer or ch.peername}"
            welcome = Welcome(re=hello.id, version=PROTOCOL_VERSION, server="jackpay-ledger")
            if hello.role == "router" and hello.peer:
                self._fence(ch)
                writing = self._writing
                if writing is not None and not writing.done():
                    # Welcome (and so the new router's replay) only once the rows a
                    # fenced connection may have in this batch are durable and readable.
                    writing.add_done_callback(lambda _: self._send(ch, welcome))
                    return
            ch.send_nowait(welcome)
            return
        match msg:
            case Append():
                if not self._greeted.get(ch):
                    log_event(log, "append refused", logging.WARNING, peer=ch.peername,
                              identity=ch.peer_identity, code="forbidden")
                    ch.reply_error(msg.id, ErrorCode.FORBIDDEN, "only the router may append")
                    return
                if self._stopping or self.fenced:
                    ch.reply_error(msg.id, ErrorCode.SHUTTING_DOWN,
                                   f"the ledger is stopping{': ' + self.fenced if self.fenced else ''}")
                    return
                if len(msg.rows) * APPEND_RESULT_BYTES + 64 > self.max_frame_bytes:
                    ch.reply_error(msg.id, ErrorCode.BAD_REQUEST,
                                   f"too many rows in one append for a {self.max_frame_bytes}-byte"
                                   " frame limit; split it")
                    return
                self.appends += 1
                self._queue.append(_Queued(ch, msg))
                self._wake.set()
            case Read(id=rid, from_seq=from_seq, limit=limit, party=party):
                task = asyncio.create_task(self._read(ch, rid, from_seq, limit, party))
                self._reads.add(task)
                task.add_done_callback(self._reads.discard)
            case Lookup() | Balances():
                task = asyncio.create_task(self._answer_query(ch, msg))
                self._reads.add(task)
                task.add_done_callback(self._reads.discard)
            case Ping(id=rid):
                ch.send_nowait(Pong(re=rid))
            case Stats(id=rid):
                st = self.statistics()
                ch.send_nowait(StatsReply(re=rid, rows=int(st["rows"]), fsyncs=int(st["fsyncs"]),
                                          batches=int(st["batches"]), appends=int(st["appends"]),
                                          uptime_ms=int(st["uptime_ms"]),
                                          last_hash=str(st["last_hash"]),
                                          fsync_us_total=int(st["fsync_us_total"]),
                                          fsync_us_max=int(st["fsync_us_max"]),
                                          slow_fsyncs=int(st["slow_fsyncs"]),
                                          index_ok=bool(st["index_ok"]),
                                          rows_in_memory=int(st["rows_in_memory"])))
            case Hello():
                ch.reply_error(msg.id, ErrorCode.BAD_REQUEST, "hello was already received")
            case _:
                ch.reply_error(getattr(msg, "id", None), ErrorCode.BAD_REQUEST,
                               f"{type(msg).__name__.lower()} is not a ledger request")

    def _fence(self, ch: Channel) -> None:
        """A router said hello (restarted, or reconnected after a lost link): its older
        connections are dead to us. Close them and drop the appends of closed
        connections not yet taken into a batch, so that an append from an old session
        can never land after the new session has replayed the ledger (a row the router
        would not know: balances off, `status` wrong). Nothing dropped was acked; a
        live router re-sends its in-doubt appends on the new connection."""
        for c in [c for c in self._greeted if c is not ch and c.name == ch.name]:
            log_event(log, "router session replaced; old connection fenced", logging.WARNING,
                      peer=c.peername, name=c.name)
            c.close()
        self._queue = [q for q in self._queue if not q.channel.closed]

    async def _read(self, ch: Channel, rid: int, from_seq: int, limit: int,
                    party: str | None) -> None:
        try:
            reply = await self._rows_reply(rid, from_seq, limit, party)
        except Exception as exc:  # the database is away: say so, keep serving
            log_event(log, "read failed", logging.ERROR, error=repr(exc))
            ch.reply_error(rid, ErrorCode.LEDGER_UNAVAILABLE, f"the ledger's store cannot be "
                           f"read right now ({type(exc).__name__}); retry")
            return
        self._send(ch, reply)

    async def _answer_query(self, ch: Channel, msg: Lookup | Balances) -> None:
        """`lookup` → `found`; `balances` → `balances_ok` (a page that fits one frame)."""
        try:
            reply: Message
            if isinstance(msg, Lookup):
                found = await self.store.lookup((k.sender, k.tx_id) for k in msg.keys)
                # The latest seal, of a durable head: a receipt of each row at or before
                # it (a row of the batch being written is newer; it gets none).
                reply = Found(re=msg.id, rows=sorted(found.values(), key=lambda r: r.seq),
                              seal=self._last_seal if found else None)
            else:
                limit = msg.limit
                while True:
                    head = (self.store.last_seq, self.store.last_hash)
                    page, more = await self.store.balances_page(msg.after, limit)
                    if head != (self.store.last_seq, self.store.last_hash):
                        continue  # a batch landed meanwhile: the page must match its head
                    reply = BalancesReply(re=msg.id, balances=page, last_seq=head[0],
                                          last_hash=head[1], more=more)
                    if limit == 1 or len(encode(reply)) + HEADER_SIZE <= self.max_frame_bytes:
                        break
                    limit = max(1, limit // 2)
        except Exception as exc:  # the database is away: say so, keep serving
            log_event(log, "query failed", logging.ERROR, t=type(msg).__name__, error=repr(exc))
            ch.reply_error(msg.id, ErrorCode.LEDGER_UNAVAILABLE, "the ledger's store cannot be "
                           f"read right now ({type(exc).__name__}); retry")
            return
        self._send(ch, reply)

    async def _rows_reply(self, rid: int, from_seq: int, limit: int, party: str | None) -> Rows:
        """A page of rows that fits in one frame: fewer rows than asked when they are large
        (the client continues from `next_seq`)."""
        while True:
            res = await self.store.read_rows(from_seq, limit, party)
            reply = Rows(re=rid, rows=res.rows, next_seq=res.next_seq, last_seq=self.store.last_seq,
                         more=res.more)
            size = len(encode(reply)) + HEADER_SIZE
            if limit == 1 or size <= self.max_frame_bytes:
                return reply
            # Shrink in proportion to the overshoot (with a margin), not by halves: the
            # next try nearly always fits and the page stays close to the frame limit.
            n = max(len(res.rows), 1)
            limit = max(1, min(n - 1, int(n * self.max_frame_bytes * 0.95 / size)))

    def _send(self, ch: Channel, msg: Message) -> None:
        """Send a reply; a vanished client or an unsendable frame never stops the service."""
        try:
            ch.send_nowait(msg)
        except ConnectionLost:
            pass
        except FrameTooLarge as exc:
            log_event(log, "reply too large for one frame", logging.ERROR, error=str(exc))
            ch.reply_error(getattr(msg, "re", None), ErrorCode.INTERNAL_ERROR,
                           "reply too large for one frame; ask for fewer rows")

    # --- group commit --------------------------------------------------------------

    def _take_batch(self) -> list[_Queued]:
        taken: list[_Queued] = []
        rows = 0
        while self._queue:
            n = len(self._queue[0].request.rows)
            if taken and rows + n > self.max_batch_rows:
                break
            taken.append(self._queue.pop(0))
            rows += n
        return taken

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """The write loop ends only at stop; if it died of a bug, no append could ever be
        answered again: say why and stop the process (exit 3), never look healthy."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("the write loop failed; stopping", exc_info=exc)
        self._stop_writing(f"the write loop failed: {exc!r}")

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            self._writing = asyncio.ensure_future(self._write_batch(batch))
            await self._writing

    def _note_slow_fsync(self, us: int, rows: int) -> None:
        """A slow disk delays every payment of the batch: say so, at most once a second
        (with how many more were slow since the last line)."""
        now = time.monotonic()
        self._slow_unlogged += 1
        if now - self._slow_logged_at < 1.0:
            return
        log_event(log, "slow fsync", logging.WARNING, ms=round(us / 1000, 1), rows=rows,
                  slow_since_last_line=self._slow_unlogged)
        self._slow_logged_at = now
        self._slow_unlogged = 0

    def _seal(self) -> Seal | None:
        """The signed chain head, once per batch (one Ed25519 signature by libsodium:
        ~30 µs)."""
        key, store = self._sealer, self.store
        if key is None or store.last_seq == 0:
            return None
        head_seq, head_hash = store.last_seq, store.last_hash
        sig = key.sign(head_bytes(self.access.network_id, head_seq, head_hash))
        return Seal(head_seq=head_seq, head_hash=head_hash, sig=sig)

    def _stop_writing(self, reason: str) -> None:
        """The store must not be written again (found between appends, or by a batch):
        stop taking appends now and let the process stop (exit 3)."""
        if self.fenced is None:
            self.fenced = reason
            log_event(log, "fenced: not writing again", logging.ERROR, reason=reason)
        self.on_fenced.set()

    async def _write_batch(self, batch: list[_Queued]) -> None:
        store = self.store
        try:
            out = await store.append_batch([q.request.rows for q in batch], utc_now_dtg(),
                                           [q.request.atomic for q in batch])
        except Fenced as exc:
            self._stop_writing(str(exc))
            for q in batch:
                if exc.in_doubt:  # perhaps written: no answer; the router re-sends elsewhere
                    q.channel.close()
                else:
                    q.channel.reply_error(q.request.id, ErrorCode.SHUTTING_DOWN,
                                          f"not written: {self.fenced}")
            for q in self._queue:
                q.channel.reply_error(q.request.id, ErrorCode.SHUTTING_DOWN,
                                      f"not written: {self.fenced}")
            self._queue.clear()
            return
        failure = out.failure
        if failure is not None:
            self.write_failures += 1
            log_event(log, "write failed; nothing of the batch is in the ledger", logging.ERROR,
                      reason=failure, requests=len(batch))
        elif out.written:
            self.fsync_seconds.observe(out.durable_us / 1e6)
            self.batch_rows.observe(len(out.written))
            if out.durable_us >= SLOW_FSYNC_US:
                self._note_slow_fsync(out.durable_us, len(out.written))
        last_seq = store.last_seq
        seal = self._seal() if failure is None else None
        if seal is not None:
            self._last_seal = seal
        for q, res in zip(batch, out.resolutions, strict=True):
            # After a failed write, a request fails if any of its answers names a row of
            # this batch: its own new rows, and also a `duplicate` or `conflict` resolved
            # against another request's row in the same batch (a re-sent append) — those
            # rows were rolled back and must not be reported as recorded.
            if failure is not None and any(r.seq > last_seq for r in res.rows):
                q.channel.reply_error(q.request.id, ErrorCode.LEDGER_WRITE_FAILED, failure)
                continue
            results = [AppendResult(status=s, seq=r.seq, dtg=r.dtg, hash=r.hash,  # type: ignore[arg-type]
                                    seal=None if s == "conflict" else seal)
                       for s, r in zip(res.status, res.rows, strict=True)]
            self._send(q.channel, Appended(re=q.request.id, results=results))
            for s, r in zip(res.status, res.rows, strict=True):
                if s == "conflict":
                    log_event(log, "append refused", logging.WARNING, tx_id=r.tx_id,
                              code="tx_id_conflict")
