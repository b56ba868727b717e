"""The daemon's local control socket: a Unix socket (mode 0600) the CLI talks to.

Same framing and message types as the router link (common.messages CONTROL_REQUESTS).
Rules:
- the first frame must be `hello` with role `cli`, answered by `welcome` carrying the
  daemon's balance view; anything else first gets `hello_required` and the connection
  is closed;
- `send` → `paid` | `error{code, tx_id}`; `balance` → `balance_ok`; `history` →
  `history_ok`; `status` → `status_ok`; `ping` (router link test) → `pong`; each needs a
  router session, else `error router_unavailable` (nothing was sent);
- `watch` → `ack`, then a stream of `event` messages until the CLI hangs up;
- a stale socket file (no daemon behind it) is replaced; a live one makes start fail
  with ConfigError; the file is removed on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from common import PROTOCOL_VERSION
from common.aio import Channel, accept_hello, claim_unix_path, start_channel_server
from common.errors import ConfigError, ConnectionLost, ErrorCode, RequestFailed
from common.messages import (
    CONTROL_REQUESTS,
    Ack,
    Error,
    GetBalance,
    Hello,
    History,
    Message,
    Ping,
    Pong,
    Send,
    Status,
    Watch,
    Welcome,
    decoder_for,
)
from payer_client.client import PayerClient, make_pay, new_tx_id

if TYPE_CHECKING:
    from payer_client.daemon import PayerDaemon

log = logging.getLogger("jackpay.payer.control")

_DECODER = decoder_for(CONTROL_REQUESTS)
MAX_UNIX_PATH_BYTES = 107


class ControlServer:
    def __init__(self, daemon: PayerDaemon, path: Path) -> None:
        self.daemon = daemon
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._channels: set[Channel] = set()

    async def start(self) -> None:
        """Listen on `path`. Raises ConfigError if it is unusable or already served."""
        if len(os.fsencode(self.path)) > MAX_UNIX_PATH_BYTES:
            raise ConfigError(f"control socket path {self.path} is too long for a Unix socket; "
                              "set a shorter [payer] control_dir in the config")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        await claim_unix_path(self.path, f"another payer daemon for {self.daemon.payer_id}")
        try:
            self._server = await start_channel_server(self._accept, _DECODER,
                                                      path=str(self.path), name="cli")
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.path}: {exc.strerror}") from None
        log.info("control socket listening on %s", self.path)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        await self.stop_accepting()
        for ch in list(self._channels):
            ch.close()
        self._channels.clear()
        if self._server is not None:  # only the socket we made: the path may be another's
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _accept(self, ch: Channel) -> None:
        session = _ControlSession(self.daemon)
        ch.on_message = session.handle
        ch.on_close = self._closed
        self._channels.add(ch)
        ch.start()

    def _closed(self, ch: Channel) -> None:
        self._channels.discard(ch)
        self.daemon.watchers.discard(ch)


class _ControlSession:
    """One CLI connection: hello first, then requests relayed to the router session."""

    def __init__(self, daemon: PayerDaemon) -> None:
        self.daemon = daemon
        self.greeted = False

    async def handle(self, ch: Channel, msg: Message) -> None:
        rid: int | None = getattr(msg, "id", None)
        if not self.greeted:
            hello = accept_hello(ch, msg, ("cli",), "this payer daemon")
            if hello is not None:
                self.greeted = True
                view = self.daemon.client.balance if self.daemon.client else None
                ch.send_nowait(Welcome(re=hello.id, version=PROTOCOL_VERSION,
                                       server=f"jackpay-payer {self.daemon.payer_id}",
                                       balance=view.balance if view else None,
                                       available=view.available if view else None,
                                       last_tx_time=view.last_tx_time if view else None))
            return
        if rid is None:
            return
        if isinstance(msg, Send) and msg.tx_id is None:
            # Chosen here, so that every answer names it (an `outcome_pending` the caller
            # must ask `status` about, or re-send with the same tx_id).
            msg = msgspec.structs.replace(msg, tx_id=new_tx_id())
        tx_id = msg.tx_id if isinstance(msg, Send | Status) else None
        try:
            reply = await self._answer(ch, msg, rid)
        except RequestFailed as exc:
            _send(ch, Error(re=rid, code=str(exc.code), message=exc.message, tx_id=tx_id))
            return
        except (ConnectionLost, TimeoutError):
            _send(ch, Error(re=rid, code=ErrorCode.ROUTER_UNAVAILABLE.value,
                            message=self.daemon.no_router_text(), tx_id=tx_id))
            return
        except Exception as exc:  # a bug: answered, never left waiting
            log.exception("control request failed")
            _send(ch, Error(re=rid, code=ErrorCode.INTERNAL_ERROR.value,
                            message=f"the daemon failed: {exc!r}", tx_id=tx_id))
            return
        if reply is not None:
            _send(ch, reply)

    async def _answer(self, ch: Channel, msg: Message, rid: int) -> Message | None:
        d = self.daemon
        match msg:
            case Send():
                pay = make_pay(msg.to, msg.amount, msg.memo, msg.tx_id, mix=msg.mix)
                return _re(await d.pay(pay), rid)
            case Watch():
                d.watchers.add(ch)
                return Ack(re=rid)
            case Ping():
                await self._client().test_router_link()
                return Pong(re=rid)
            case GetBalance():
                return _re(await self._client().query_balance(), rid)
            case History():
                return _re(await self._client().history(msg.from_seq, msg.limit), rid)
            case Status():
                reply = await self._client().status(msg.tx_id, msg.sender)
                if reply.state == "unknown" and msg.tx_id in d.outbox:
                    # Not at the router yet, but this daemon will (re-)send it.
                    reply = msgspec.structs.replace(reply, state="pending",
                                                    code=ErrorCode.OUTCOME_PENDING.value)
                return _re(reply, rid)
            case Hello():
                raise RequestFailed(ErrorCode.BAD_REQUEST, "hello was already said")
        raise RequestFailed(ErrorCode.BAD_REQUEST, f"{type(msg).__name__} is not a control request")

    def _client(self) -> PayerClient:
        client = self.daemon.client
        if client is None or not client.connected:
            raise RequestFailed(ErrorCode.ROUTER_UNAVAILABLE, self.daemon.no_router_text())
        return client


def _re(reply: Message, rid: int) -> Message:
    """The router's reply, re-addressed to the CLI's request id."""
    return msgspec.structs.replace(reply, re=rid)


def _send(ch: Channel, msg: Message) -> None:
    with contextlib.suppress(ConnectionLost):
        ch.send_nowait(msg)


__all__ = ["ControlServer"]
