"""`PayerClient`: the importable async API that programs use to hold a session with the
router, send payments and receive them (the seed's "software using our API", DESIGN §8).

Rules:
- one TLS session per client, pinned to the network CA and the router's name; `connect()`
  logs in (hello with a nonce, the router's challenge, auth signed with the payer's
  Ed25519 key: common.auth) and returns the router's `welcome`; the session is not
  re-opened here (the daemon owns reconnects);
- the router's `ping` is answered with `pong`, `offer` with `receipt` or `reject` (the
  `on_offer` callback decides; default accept), `settled` and `cancel` with `ack`;
- the balance view is read-only and refreshed only from router messages (welcome, paid,
  settled, balance replies): only the router changes balances (DESIGN §1.5);
- an error reply raises `RequestFailed` carrying its wire `code`; a dead connection fails
  every pending call with `ConnectionLost`; a call with no answer in `request_timeout_s`
  raises `TimeoutError` (a payment may then still happen: retry the same `tx_id`);
- money is integer minor units; `create_payment` validates like the router's decoder.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import PROTOCOL_VERSION
from common.aio import Channel, open_channel
from common.auth import new_nonce, sign_login
from common.config import NetworkConfig
from common.errors import ConnectionLost, ErrorCode, JackPayError
from common.keys import KeyStore
from common.messages import (
    PAYER_INBOUND,
    Ack,
    Auth,
    BalanceReply,
    Cancel,
    Challenge,
    Error,
    GetBalance,
    Hello,
    History,
    HistoryReply,
    Message,
    Offer,
    Paid,
    Pay,
    Ping,
    Pong,
    Receipt,
    Reject,
    Settled,
    Status,
    StatusReply,
    Welcome,
    decoder_for,
)
from common.signing import PAY_TAG, RECEIPT_TAG, Signer, sign, signed_row
from common.tls import ClientTls, client_tls

log = logging.getLogger("jackpay.payer.client")

OfferDecision = bool | str | None
OnOffer = Callable[[Offer], Awaitable[OfferDecision] | OfferDecision]
OnSettled = Callable[[Settled], Awaitable[None] | None]
OnCancel = Callable[[Cancel], Awaitable[None] | None]

_DECODER = decoder_for(PAYER_INBOUND)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class BalanceView:
    """The payer's read-only view of its account, as last told by the router.

    `available` is balance minus the router's holds; between balance replies it is kept
    in step with balance changes the router reports (paid, settled).
    """

    balance: int | None = None
    available: int | None = None
    last_tx_time: str | None = None


@dataclass(frozen=True, slots=True)
class PayerCredentials:
    """What a payer needs to log in: the network's id, its Ed25519 signing key, and TLS
    settings that pin the network CA and the router's certificate name."""

    network_id: str
    key: Ed25519PrivateKey
    tls: ClientTls
    signer: Signer = field(init=False, repr=False, compare=False)  # the key, by libsodium

    def __post_init__(self) -> None:
        object.__setattr__(self, "signer", Signer(self.key))

    @classmethod
    def from_config(cls, cfg: NetworkConfig, payer_id: str) -> PayerCredentials:
        """From the network's key folder. Raises KeyFileError (a ConfigError): missing
        key, or one readable by others."""
        store = KeyStore.for_config(cfg)
        return cls(cfg.network.id, store.load_payer_key(payer_id), client_tls(store, "router"))


def new_tx_id() -> str:
    """A fresh idempotency key (32 hex digits)."""
    return uuid.uuid4().hex


_last_ms = -1
_last_text = ""


def _utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds (formatted once per millisecond)."""
    global _last_ms, _last_text
    now = time.time()
    ms = int(now * 1000)
    if ms != _last_ms:
        stamp = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
        _last_text = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        _last_ms = ms
    return _last_text


def make_pay(to: str, amount_minor: int, memo: str = "", tx_id: str | None = None, *,
             mix: bool = False) -> Pay:
    """A validated `pay` message (id 0; the channel assigns the real one). `mix`: through
    the network's mixer (the ledger then names `_mixer`, not `to`).

    Raises ValueError naming the bad field (amount must be int minor units, > 0).
    """
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise ValueError(f"amount must be an int of minor units, not {type(amount_minor).__name__}")
    fields: dict[str, object] = {"id": 0, "tx_id": tx_id or new_tx_id(), "to": to,
                                 "amount": amount_minor, "memo": memo}
    if mix:
        fields["mix"] = True
    try:
        return msgspec.convert(fields, Pay)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid payment: {exc}") from None


class PayerClient:
    """One authenticated session with the router for `payer_id`.

    `credentials` None means plain TCP and no login: only the benchmark's comparison
    against a router started that way; a real router refuses it."""

    def __init__(
        self,
        host: str,
        port: int,
        payer_id: str,
        *,
        credentials: PayerCredentials | None,
        on_offer: OnOffer | None = None,
        on_settled: OnSettled | None = None,
        on_cancel: OnCancel | None = None,
        on_disconnect: Callable[[PayerClient], None] | None = None,
        on_error: Callable[[Error], None] | None = None,
        request_timeout_s: float = 20.0,
        connect_timeout_s: float = 5.0,
        local_addr: tuple[str, int] | None = None,
        sign: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.payer_id = payer_id
        self.credentials = credentials
        # False: payments and receipts go unsigned — only against a router started with
        # the benchmark's `--unsigned-benchmark-only`; a real router refuses them.
        self.sign = sign
        self.on_offer = on_offer
        self.on_settled = on_settled
        self.on_cancel = on_cancel
        self.on_disconnect = on_disconnect
        self.on_error = on_error  # errors the router sends unasked (session_replaced, ...)
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.local_addr = local_addr  # the source address to connect from (None: any)
        self._channel: Channel | None = None
        self._view = BalanceView()
        self.welcome: Welcome | None = None

    @classmethod
    def from_config(cls, cfg: NetworkConfig, payer_id: str, *, host: str | None = None,
                    port: int | None = None, **kw: Any) -> PayerClient:
        """A client for `payer_id` of the network `cfg` (the router's address from the
        config unless given; the key and CA from its key folder). Raises KeyFileError."""
        return cls(host or cfg.router.host, cfg.router.port if port is None else port,
                   payer_id, credentials=PayerCredentials.from_config(cfg, payer_id), **kw)

    # --- lifecycle -----------------------------------------------------------------

    async def connect(self) -> Welcome:
        """Open the session and log in. Raises OSError/TimeoutError if the router is not
        reachable, TlsFailed if its certificate is not this network's, RequestFailed
        (`auth_failed`, `rate_limited`) if it refuses us; the client is then closed."""
        if self._channel is not None and not self._channel.closed:
            raise JackPayError(f"{self.payer_id} is already connected")
        creds = self.credentials
        ch = await open_channel(self.host, self.port, _DECODER, name=f"router({self.payer_id})",
                                tls=creds.tls if creds is not None else None,
                                connect_timeout=self.connect_timeout_s,
                                on_message=self._on_message, on_close=self._on_close,
                                local_addr=self.local_addr)
        self._channel = ch
        try:
            reply = await self._log_in(ch, creds)
        except BaseException:
            ch.close()
            raise
        if not isinstance(reply, Welcome):
            ch.close()
            raise ConnectionLost(f"router answered hello with {type(reply).__name__}")
        self.welcome = reply
        self._view = BalanceView(reply.balance, reply.available, reply.last_tx_time)
        return reply

    async def _log_in(self, ch: Channel, creds: PayerCredentials | None) -> Message:
        timeout = self.connect_timeout_s
        if creds is None:
            return await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer",
                                          peer=self.payer_id), timeout=timeout)
        client_nonce = new_nonce()
        challenge = await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer",
                                           peer=self.payer_id, nonce=client_nonce),
                                     timeout=timeout)
        if not isinstance(challenge, Challenge):
            raise ConnectionLost(f"router answered hello with {type(challenge).__name__}")
        # The server id signed is the name the TLS handshake verified, not the one the
        # server announces: a signature is only ever good for the server we checked.
        sig = sign_login(creds.key, creds.network_id, creds.tls.server_name, challenge.nonce,
                         client_nonce, self.payer_id)
        return await ch.request(Auth(id=0, sig=sig), timeout=timeout)

    async def close(self) -> None:
        """Close the session; idempotent. Pending calls fail with ConnectionLost."""
        if self._channel is not None:
            await self._channel.aclose()

    async def wait_closed(self) -> None:
        """Return when the session has ended (closed by either side)."""
        if self._channel is not None:
            await self._channel.wait_closed()

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    async def __aenter__(self) -> PayerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the balance view (read-only) ----------------------------------------------

    @property
    def balance(self) -> BalanceView:
        return self._view

    @property
    def last_tx_time(self) -> str | None:
        return self._view.last_tx_time

    def _set_balance(self, balance: int, tx_time: str | None) -> None:
        old = self._view
        available = old.available
        if available is not None and old.balance is not None:
            available += balance - old.balance
        self._view = BalanceView(balance, available, tx_time or old.last_tx_time)

    # --- requests (seed: createPayment, sendPayment, queryBalance, testRouterLink) ---

    def create_payment(self, to: str, amount_minor: int, memo: str = "",
                       tx_id: str | None = None, *, mix: bool = False) -> Pay:
        """A validated payment to send (tx_id generated when None), signed by this payer
        when it has credentials. Raises ValueError."""
        return self.signed(make_pay(to, amount_minor, memo, tx_id, mix=mix))

    def signed(self, pay: Pay) -> Pay:
        """`pay` with this payer's signature over the row it writes (common/signing.py);
        as it is without credentials (the benchmark's plain run) or already signed."""
        creds = self.credentials
        if creds is None or pay.sig is not None or not self.sign:
            return pay
        receiver, memo = signed_row(pay.to, pay.memo, pay.mix)
        sig = sign(creds.signer, PAY_TAG, creds.network_id, self.payer_id, pay.tx_id, receiver,
                   pay.amount, memo)
        return msgspec.structs.replace(pay, sig=sig)

    def _receipt(self, offer: Offer) -> Receipt:
        """The receipt of `offer`, signed by this payer (its acceptance of the row)."""
        creds = self.credentials
        if creds is None or not self.sign:
            return Receipt(re=offer.id, tx_id=offer.tx_id)
        sig = sign(creds.signer, RECEIPT_TAG, creds.network_id, offer.sender, offer.tx_id,
                   self.payer_id, offer.amount, offer.memo)
        return Receipt(re=offer.id, tx_id=offer.tx_id, sig=sig)

    async def send_payment(self, pay_or_to: Pay | str, amount: int | None = None,
                           memo: str = "", tx_id: str | None = None,
                           *, timeout: float | None = None, mix: bool = False) -> Paid:
        """Send a payment and wait for its outcome.

        Raises RequestFailed (`.code`: insufficient_funds, receiver_rejected, … or the
        retriable outcome_pending), ConnectionLost, TimeoutError. After the last two the
        outcome is unknown: re-send the same `tx_id` (never moves money twice).
        """
        if isinstance(pay_or_to, Pay):
            pay = self.signed(pay_or_to)
        else:
            if amount is None:
                raise ValueError("amount is required when paying by receiver id")
            pay = self.create_payment(pay_or_to, amount, memo, tx_id, mix=mix)
        paid = await self._request(pay, Paid, timeout)
        self._set_balance(paid.balance, paid.dtg)
        return paid

    async def query_balance(self) -> BalanceReply:
        reply = await self._request(GetBalance(id=0), BalanceReply)
        self._view = BalanceView(reply.balance, reply.available,
                                 reply.last_tx_time or self._view.last_tx_time)
        return reply

    async def test_router_link(self, timeout: float | None = None) -> float:
        """Ping the router; returns the round trip in seconds."""
        start = time.perf_counter()
        await self._request(Ping(id=0), Pong, timeout)
        return time.perf_counter() - start

    async def history(self, from_seq: int = 1, limit: int = 100) -> HistoryReply:
        """This payer's ledger rows from `from_seq`, oldest first (a page; see next_seq)."""
        return await self._request(History(id=0, from_seq=from_seq, limit=limit), HistoryReply)

    async def status(self, tx_id: str, sender: str | None = None) -> StatusReply:
        """What the router knows of the payment (`sender`, `tx_id`) — by default one this
        payer sent; name the sender to ask about one it was offered: paid, failed,
        pending or unknown."""
        return await self._request(Status(id=0, tx_id=tx_id, sender=sender), StatusReply)

    async def _request(self, msg: Message, expect: type[M], timeout: float | None = None) -> M:
        ch = self._channel
        if ch is None or ch.closed:
            raise ConnectionLost(f"{self.payer_id} has no session with the router")
        reply = await ch.request(msg, timeout=self.request_timeout_s if timeout is None else timeout)
        if not isinstance(reply, expect):
            raise ConnectionLost(f"router answered {type(msg).__name__} with {type(reply).__name__}")
        return reply

    # --- messages the router starts ------------------------------------------------

    def _on_message(self, ch: Channel, msg: Message) -> Awaitable[None] | None:
        # Without callbacks the answer goes out at once; a task runs only for callbacks.
        match msg:
            case Ping(id=rid):
                ch.send_nowait(Pong(re=rid))
            case Offer():
                if self.on_offer is None:
                    _send_quietly(ch, self._receipt(msg))
                    return None
                return self._answer_offer(ch, msg)
            case Settled():
                self._set_balance(msg.balance, _utc_now())
                if self.on_settled is None:
                    _send_quietly(ch, Ack(re=msg.id))
                    return None
                return self._ack_after(ch, msg, self.on_settled)
            case Cancel():
                if self.on_cancel is None:
                    _send_quietly(ch, Ack(re=msg.id))
                    return None
                return self._ack_after(ch, msg, self.on_cancel)
            case Error(code=code, message=text):
                log.warning("router says %s: %s", code, text)
                if self.on_error is not None:
                    try:
                        self.on_error(msg)
                    except Exception:
                        log.exception("on_error callback failed")
                if code == ErrorCode.SESSION_REPLACED:
                    ch.close(ConnectionLost("session replaced by a newer one"))
            case _:
                log.info("unexpected %s from router ignored", type(msg).__name__)
        return None

    async def _ack_after(self, ch: Channel, msg: Settled | Cancel,
                         cb: Callable[..., object]) -> None:
        await _call(cb, msg)
        _send_quietly(ch, Ack(re=msg.id))

    async def _answer_offer(self, ch: Channel, offer: Offer) -> None:
        try:
            decision = await _call(self.on_offer, offer)
        except Exception:
            log.exception("on_offer callback failed; rejecting %s", offer.tx_id)
            decision = "receiver could not process the offer"
        if decision is None or decision is True:
            _send_quietly(ch, self._receipt(offer))
        else:
            reason = decision if isinstance(decision, str) else "declined"
            _send_quietly(ch, Reject(re=offer.id, tx_id=offer.tx_id, reason=reason[:256]))

    def _on_close(self, ch: Channel) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect(self)


async def _call(cb: Callable[..., object] | None, arg: object) -> OfferDecision:
    if cb is None:
        return None
    result = cb(arg)
    if inspect.isawaitable(result):
        result = await result
    if result is None or isinstance(result, bool | str):
        return result
    return None


def _send_quietly(ch: Channel, msg: Message) -> None:
    try:
        ch.send_nowait(msg)
    except ConnectionLost:
        pass


__all__ = ["BalanceView", "PayerClient", "PayerCredentials", "make_pay", "new_tx_id"]
