"""The router's admin socket: a Unix socket (mode 0600) for operators and the chaos checker.

Rules: the first frame is `hello {role: "admin"}` (anything else: an error, then close);
then `ping` → `pong`, `reconcile` → `reconcile_ok` (router/reconcile.py) and `inspect` →
`inspect_ok` with every balance, every open hold,
every payment in flight (its step and age), the payers with a live session, whether the
ledger is connected, the ledger client's counters and how payments ended since start
(`jackpay-router inspect` prints it). The operator's participant commands
(router/participants.py): `participants` → `participants_ok`; `participant_add`,
`participant_suspend`, `participant_resume` → `participant_ok`; `reload` → `reload_ok`;
a refused one → `error` with its code, nothing changed. The only money these move is a new
participant's opening balance. Whoever can open the socket (mode 0600: the router's user)
is the operator. A stale socket file left by a killed router is replaced at start; the
file is removed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from common import PROTOCOL_VERSION
from common.aio import Channel, accept_hello, claim_unix_path, start_channel_server
from common.errors import ErrorCode
from common.logs import log_event
from common.messages import (
    ADMIN_MAX_FRAME_BYTES,
    ADMIN_REQUESTS,
    AddParticipant,
    InFlight,
    Inspect,
    InspectReply,
    ListParticipants,
    Message,
    ParticipantsReply,
    Ping,
    Pong,
    Reconcile,
    Reload,
    ResumeParticipant,
    SuspendParticipant,
    Welcome,
    decoder_for,
)
from router.ledger_client import LedgerUnavailable
from router.participants import OperatorRefused

if TYPE_CHECKING:
    from router.server import RouterService

log = logging.getLogger("jackpay.router.admin")
_DECODER = decoder_for(ADMIN_REQUESTS)


class AdminServer:
    def __init__(self, service: RouterService, path: Path) -> None:
        self.service = service
        self.path = path
        self._server: asyncio.Server | None = None
        self._channels: set[Channel] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on the socket path (mode 0600). Raises OSError if it cannot, ConfigError
        if another live router serves it (RouterService.start checks that first)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await claim_unix_path(self.path, "another router")
        self._server = await start_channel_server(
            self._on_connect, _DECODER, path=str(self.path), name="admin",
            max_frame_bytes=ADMIN_MAX_FRAME_BYTES)

    def inspect(self, rid: int) -> InspectReply:
        svc = self.service
        accounts = svc.book.accounts
        now = time.monotonic()
        in_flight = [
            InFlight(tx_id=p.tx_id, sender=p.params.sender, receiver=p.params.receiver,
                     amount=p.params.amount, step=p.step, age_ms=int((now - p.started) * 1000))
            for p in svc.pipeline.inflight.values()
        ]
        return InspectReply(re=rid, balances=accounts.snapshot(), holds=accounts.holds(),
                            in_flight=in_flight,
                            sessions=sorted(s.payer_id for s in svc.registry.live_sessions()),
                            ledger_connected=svc.ledger.connected,
                            outcomes=dict(svc.pipeline.counts),
                            ledger_link=dataclasses.asdict(svc.ledger.stats),
                            refused_logins=svc.refused_logins,
                            payment_seconds_buckets=list(times.payment.counts)
                            if (times := svc.pipeline.times) is not None else [])

    def _on_connect(self, ch: Channel) -> None:
        greeted = False
        ops = self.service.participant_ops

        def on_message(ch: Channel, msg: Message) -> None:
            nonlocal greeted
            rid = getattr(msg, "id", None)
            if not greeted:
                hello = accept_hello(ch, msg, ("admin",), "the router's admin socket")
                if hello is not None:
                    greeted = True
                    ch.send_nowait(Welcome(re=hello.id, version=PROTOCOL_VERSION,
                                           server="jackpay-router-admin"))
                return
            match msg:
                case Inspect(id=i):
                    ch.send_nowait(self.inspect(i))
                case Reconcile(id=i):
                    self.spawn(self._reconcile(ch, i))
                case ListParticipants(id=i):
                    ch.send_nowait(ParticipantsReply(re=i, participants=ops.listing()))
                case AddParticipant() | Reload():
                    self.spawn(self._operator(ch, msg))
                case SuspendParticipant(id=i, payer=pid):
                    self._answer(ch, i, lambda: ops.suspend(i, pid))
                case ResumeParticipant(id=i, payer=pid):
                    self._answer(ch, i, lambda: ops.resume(i, pid))
                case Ping(id=i):
                    ch.send_nowait(Pong(re=i))
                case _:
                    ch.reply_error(rid, ErrorCode.BAD_REQUEST,
                                   "admin takes inspect, reconcile, participants, "
                                   "participant_add|suspend|resume, reload and ping")

        ch.on_message = on_message
        ch.on_close = self._channels.discard
        self._channels.add(ch)
        ch.start()

    @staticmethod
    def _answer(ch: Channel, rid: int, act: Callable[[], Message]) -> None:
        try:
            reply = act()
        except OperatorRefused as exc:
            ch.reply_error(rid, exc.code, str(exc))
            return
        ch.send_nowait(reply)

    async def _operator(self, ch: Channel, msg: AddParticipant | Reload) -> None:
        ops = self.service.participant_ops
        try:
            reply: Message = (await ops.add(msg) if isinstance(msg, AddParticipant)
                              else await ops.reload(msg.id))
        except OperatorRefused as exc:
            ch.reply_error(msg.id, exc.code, str(exc))
            return
        except Exception as exc:  # a bug: the operator gets an answer, the router serves on
            log.exception("%s failed", type(msg).__name__)
            ch.reply_error(msg.id, ErrorCode.INTERNAL_ERROR,
                           f"the router failed this request ({type(exc).__name__}: {exc}); "
                           "see its log")
            return
        if not ch.closed:
            ch.send_nowait(reply)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="admin-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile(self, ch: Channel, rid: int) -> None:
        try:
            reply = await self.service.reconcile()
        except LedgerUnavailable as exc:
            ch.reply_error(rid, ErrorCode.LEDGER_UNAVAILABLE, str(exc))
            return
        except RuntimeError as exc:
            ch.reply_error(rid, ErrorCode.RATE_LIMITED, f"{exc}; try again")
            return
        if not ch.closed:
            ch.send_nowait(msgspec.structs.replace(reply, re=rid))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for ch in list(self._channels):
            ch.close()
        if self._server is None:  # never listened: the path may be another router's
            return
        self._server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        log_event(log, "admin socket closed", path=str(self.path))
